import { OpenAPIHono } from "@hono/zod-openapi";
import { swaggerUI } from "@hono/swagger-ui";
import { bodyLimit } from "hono/body-limit";
import type { ActorRegistry } from "../actors/registry.ts";
import type { Clock } from "../core/clock.ts";
import { GatewayError } from "../core/errors.ts";
import type { Logger } from "../core/logger.ts";
import type { Store } from "../db/store.ts";
import type { DeviceService } from "../services/devices.ts";
import type { TokenService } from "../services/tokens.ts";
import type { UserService } from "../services/users.ts";
import { adminDeviceRoutes } from "./admin_devices.ts";
import { adminUserRoutes } from "./admin_users.ts";
import { authRoutes } from "./auth.ts";
import { errorHandler } from "./errors.ts";
import { healthRoutes } from "./health.ts";
import { meterRoutes } from "./meters.ts";
import { metricsRoutes } from "./metrics.ts";
import type { Metrics } from "../core/metrics.ts";
import { strictUtf8 } from "./middleware.ts";
import { wsRoutes } from "./ws.ts";
import type { WsHub } from "./ws_hub.ts";

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
  registerPerMinute: number;
  loginPerMinute: number;
  writerStalled: () => string | null;
  /** Whether the external MQTT broker connection is up (always true without one). */
  mqttConnected: () => boolean;
  metrics: Metrics;
}

/** Builds the Hono app: REST under /api, /ws, health, OpenAPI and docs. */
export function createApp(deps: AppDeps): OpenAPIHono {
  const app = new OpenAPIHono();
  app.onError(errorHandler(deps.logger));
  app.notFound((c) => {
    throw new GatewayError("not_found", `No route for ${c.req.method} ${c.req.path}`);
  });

  // Body checks only on /api: header-changing middleware on the WebSocket route breaks upgrades.
  const limit = (maxSize: number) =>
    bodyLimit({
      maxSize,
      onError: () => {
        throw new GatewayError("payload_too_large", `Request body exceeds ${maxSize} bytes`);
      },
    });
  const small = limit(deps.bodyLimit);
  // Fleet imports carry thousands of devices in one request.
  const large = limit(deps.importBodyLimit);
  app.use(
    "/api/*",
    (c, next) => c.req.path === "/api/admin/devices/import" ? large(c, next) : small(c, next),
  );
  app.use("/api/*", strictUtf8());

  app.route("/", healthRoutes(deps));
  app.route("/", metricsRoutes(deps.metrics));
  app.route("/api/auth", authRoutes(deps));
  app.route("/api/admin/users", adminUserRoutes(deps));
  app.route(
    "/api/admin/devices",
    adminDeviceRoutes({ ...deps, registerPerMinute: deps.registerPerMinute }),
  );
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
  app.get("/docs", swaggerUI({ url: "/openapi.json" }));
  return app;
}
