import { Hono } from "hono";
import type { Metrics } from "../core/metrics.ts";

/** `GET /metrics` in the Prometheus text format. */
export function metricsRoutes(metrics: Metrics): Hono {
  return new Hono().get(
    "/metrics",
    (c) =>
      c.text(metrics.render(), 200, { "content-type": "text/plain; version=0.0.4; charset=utf-8" }),
  );
}
