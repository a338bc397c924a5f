import { Hono } from "hono";
import type { Store } from "../db/store.ts";

/** `/healthz` (process alive) and `/readyz` (store reachable, writer not stalled). */
export function healthRoutes(deps: { store: Store; writerStalled: () => string | null }) {
  return new Hono()
    .get("/healthz", (c) => c.json({ status: "ok" }))
    .get("/readyz", async (c) => {
      const checks: Record<string, string> = {};
      try {
        await deps.store.ping();
        checks.store = "ok";
      } catch (error) {
        checks.store = `down: ${(error as Error).message}`;
      }
      const stalled = deps.writerStalled();
      checks.writer = stalled === null ? "ok" : `stalled: ${stalled}`;
      const ready = Object.values(checks).every((v) => v === "ok");
      return c.json({ status: ready ? "ready" : "not_ready", checks }, ready ? 200 : 503);
    });
}
