import { Hono } from "hono";
import type { Logger } from "../core/logger.ts";
import type { Store } from "../db/store.ts";

/** What the health routes need. */
export interface HealthDeps {
  /** Pinged by every `/readyz`. */
  store: Store;
  /** Why the writer is stalled, or `null` while it keeps up. */
  writerStalled: () => string | null;
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
      try {
        await deps.store.ping();
        checks.store = "ok";
      } catch (error) {
        deps.logger.warn("readiness: store is down", { error });
        checks.store = "down";
      }
      const stalled = deps.writerStalled();
      if (stalled === null) {
        checks.writer = "ok";
      } else {
        deps.logger.warn("readiness: writer is stalled", { reason: stalled });
        checks.writer = "stalled";
      }
      const ready = Object.values(checks).every((v) => v === "ok");
      return c.json({ status: ready ? "ready" : "not_ready", checks }, ready ? 200 : 503);
    });
}
