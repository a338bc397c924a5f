import { OpenAPIHono } from "@hono/zod-openapi";
import type { Context } from "hono";
import type { ActorRegistry } from "../actors/registry.ts";
import type { Clock } from "../core/clock.ts";
import { GatewayError } from "../core/errors.ts";
import type { Logger } from "../core/logger.ts";
import type { Store } from "../db/store.ts";
import type { StoreReads } from "../cache/read_cache.ts";
import type { DeviceService } from "../services/devices.ts";
import type { TokenService } from "../services/tokens.ts";
import type { UserService } from "../services/users.ts";
import { adminDeviceRoutes } from "./admin_devices.ts";
import { adminUserRoutes } from "./admin_users.ts";
import { adminMetricsRoutes } from "./admin_metrics.ts";
import { authRoutes } from "./auth.ts";
import { docsRoutes } from "./docs.ts";
import { errorHandler } from "./errors.ts";
import { healthRoutes } from "./health.ts";
import { type MeterOwners, meterRoutes } from "./meters.ts";
import { metricsRoutes } from "./metrics.ts";
import { httpMetrics } from "./http_metrics.ts";
import type { ReadingCounters } from "../core/reading_counters.ts";
import type { Metrics } from "../core/metrics.ts";
import { type AuthEnv, bearerAuth } from "./middleware.ts";
import { BodyBudget, boundedBody } from "./body.ts";
import { wsRoutes } from "./ws.ts";
import { requestLog } from "./request_log.ts";
import { adminBatchRoutes, BATCH_SUBMIT_PATH, batchRoutes } from "./batches.ts";
import type { BatchRunner } from "../services/batch_runner.ts";
import type { WsHub } from "../ws/hub.ts";

/** `/api` routes that take no bearer token. */
const PUBLIC_API = new Set(["/api/auth/login"]);
/** Roles that may import devices (see routes/admin_devices.ts). */
const IMPORTERS = new Set<string | undefined>(["admin", "operator"]);

/** Everything the HTTP layer needs, passed in by the composition root. */
export interface AppDeps {
  store: Store;
  registry: ActorRegistry;
  users: UserService;
  devices: DeviceService;
  tokens: TokenService;
  hub: WsHub;
  clock: Clock;
  logger: Logger;
  bodyLimit: number;
  importBodyLimit: number;
  /** Bytes of request bodies read at once, over all requests (HTTP_BODY_BUDGET). */
  bodyBudget: number;
  registerPerMinute: number;
  loginPerMinute: number;
  writerStalled: () => string | null;
  /** Whether the external MQTT broker connection is up (always true without one). */
  mqttConnected: () => boolean;
  /** TimescaleDB policy jobs: `failing` when one's last run failed (reported, not fatal). */
  policyJobs?: () => "ok" | "failing" | undefined;
  /** The Redis bus's connection (advisory in /readyz); absent in-process. */
  busConnected?: () => boolean | undefined;
  metrics: Metrics;
  /** Counts reading submissions and early refusals (metrics). */
  counters?: ReadingCounters;
  /** HTTP request durations (`http_request_duration_seconds`); default on. */
  httpMetrics?: boolean;
  /** Bearer token `/metrics` requires (METRICS_TOKEN); absent: open. */
  metricsToken?: string;
  /** Each meter's owner, cached (ownership checks of every read and subscribe). */
  owners?: MeterOwners;
  /** Read-through cache of reading listings and stats (cache/read_cache.ts); absent: none. */
  cache?: StoreReads;
  /** Runs batch jobs (wakes it when a job is created, waits for sync ones). */
  runner: Pick<BatchRunner, "submitted" | "awaitFinished" | "wake">;
  batch: { maxSize: number; syncMax: number; bodyLimit: number; maxOpenPerUser: number };
  /** How long `?mode=sync` waits for a batch's result. */
  syncWaitMs: number;
}

/** Builds the Hono app: REST under /api, /ws, health, OpenAPI and docs. */
export function createApp(deps: AppDeps): OpenAPIHono {
  const app = new OpenAPIHono();
  // First: every request's log lines carry its request_id; one access line per request.
  app.use("*", requestLog({ logger: deps.logger }));
  app.onError(errorHandler(deps.logger));
  if (deps.httpMetrics !== false) app.use(httpMetrics(deps.metrics));
  app.notFound((c) => {
    throw new GatewayError("not_found", `No route for ${c.req.method} ${c.req.path}`);
  });

  // Body checks only on /api: header-changing middleware on the WebSocket route breaks upgrades.
  // Callers that send a body are authenticated before a byte of it is read, so an anonymous
  // upload costs its headers only. The routes' own bearerAuth then finds the token verified by
  // this request (a verification costs ~100 µs: not done twice).
  const authenticate = bearerAuth(deps.tokens);
  app.use("/api/*", (c, next) => {
    if (c.req.raw.body === null || PUBLIC_API.has(c.req.path)) return next();
    return authenticate(c as Context<AuthEnv>, next);
  });
  app.use(
    "/api/*",
    boundedBody({
      budget: new BodyBudget(deps.bodyBudget),
      // Fleet imports carry thousands of devices in one request; only their callers get more.
      // Batches of readings get room for BATCH_MAX_SIZE readings; every other route keeps its own.
      limitOf: (c) =>
        c.req.path === "/api/admin/devices/import" &&
          IMPORTERS.has((c as Context<AuthEnv>).var.principal?.role)
          ? deps.importBodyLimit
          : c.req.path === BATCH_SUBMIT_PATH
          ? deps.batch.bodyLimit
          : deps.bodyLimit,
    }),
  );

  app.route("/", healthRoutes(deps));
  app.route("/", metricsRoutes(deps.metrics, deps.metricsToken));
  app.route("/api/auth", authRoutes(deps));
  app.route("/api/admin/users", adminUserRoutes(deps));
  app.route("/api/admin/metrics", adminMetricsRoutes(deps));
  app.route(
    "/api/admin/devices",
    adminDeviceRoutes({ ...deps, registerPerMinute: deps.registerPerMinute }),
  );
  app.route("/api/admin/batches", adminBatchRoutes(deps));
  app.route("/api/meters", batchRoutes(deps));
  app.route("/api/meters", meterRoutes(deps));
  app.route("/ws", wsRoutes(deps));

  app.openAPIRegistry.registerComponent("securitySchemes", "bearer", {
    type: "http",
    scheme: "bearer",
    bearerFormat: "JWT",
  });
  app.doc31("/openapi.json", {
    openapi: "3.1.0",
    info: {
      title: "GridTokenX Meter Gateway",
      version: "0.1.0",
      description: "Signed smart-meter readings in, stored exactly once, streamed live.",
    },
  });
  app.route("/", docsRoutes());
  return app;
}
