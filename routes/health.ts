import { Hono } from "hono";
import type { Logger } from "../core/logger.ts";
import type { Store } from "../db/store.ts";

const PING_TIMEOUT_MS = 2_000;

/** What the health routes need. */
export interface HealthDeps {
  /** Pinged by every `/readyz`. */
  store: Store;
  /** Why the writer is stalled, or `null` while it keeps up. */
  writerStalled: () => string | null;
  /** Whether the external MQTT broker connection is up (always true without one). */
  mqttConnected?: () => boolean;
  /**
   * State of the TimescaleDB policy jobs, where there are any. Reported, but not a reason to
   * take the instance out of service: ingestion does not depend on them.
   */
  policyJobs?: () => "ok" | "failing" | undefined;
  /**
   * Whether events of other instances arrive (Redis bus), where there is a bus to lose.
   * Reported, not a reason to take the instance out: ingestion and storage go on without it.
   */
  busConnected?: () => boolean | undefined;
  /** Receives the details that `/readyz` keeps from its unauthenticated callers. */
  logger: Logger;
}

/**
 * `/healthz` (process alive) and `/readyz` (store reachable, writer not stalled). `/readyz` is
 * unauthenticated, so each check answers only `ok`, `down` or `stalled`; the cause is logged.
 */
export function healthRoutes(deps: HealthDeps): Hono {
  return new Hono()
    .get("/healthz", (c) => c.json({ status: "ok" }))
    .get("/readyz", async (c) => {
      const checks: Record<string, "ok" | "down" | "stalled"> = {};
      let timer: ReturnType<typeof setTimeout> | undefined;
      try {
        // A store that does not answer within the probe's patience is down for the probe.
        await Promise.race([
          deps.store.ping(),
          new Promise((_, reject) => {
            timer = setTimeout(() => reject(new Error("ping timed out")), PING_TIMEOUT_MS);
          }),
        ]);
        checks.store = "ok";
      } catch (error) {
        deps.logger.warn("readiness: store is down", { error });
        checks.store = "down";
      }
      clearTimeout(timer);
      const stalled = deps.writerStalled();
      if (stalled === null) {
        checks.writer = "ok";
      } else {
        deps.logger.warn("readiness: writer is stalled", { reason: stalled });
        checks.writer = "stalled";
      }
      if (deps.mqttConnected) checks.mqtt = deps.mqttConnected() ? "ok" : "down";
      const ready = Object.values(checks).every((v) => v === "ok");
      const jobs = deps.policyJobs?.();
      const bus = deps.busConnected?.();
      const advisory = {
        ...(jobs === undefined ? {} : { timescale_jobs: jobs }),
        ...(bus === undefined ? {} : { bus: bus ? "ok" : "down" }),
      };
      return c.json(
        { status: ready ? "ready" : "not_ready", checks: { ...checks, ...advisory } },
        ready ? 200 : 503,
      );
    });
}
