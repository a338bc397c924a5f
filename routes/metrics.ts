import { Hono } from "hono";
import type { Metrics } from "../core/metrics.ts";
import { GatewayError } from "../core/errors.ts";
import { timingSafeEqual } from "node:crypto";

/** `GET /metrics` in the Prometheus text format; with `token`, only for `Bearer <token>`. */
export function metricsRoutes(metrics: Metrics, token?: string): Hono {
  const expected = token ? new TextEncoder().encode(`Bearer ${token}`) : null;
  return new Hono().get("/metrics", (c) => {
    if (expected) {
      const given = new TextEncoder().encode(c.req.header("authorization") ?? "");
      if (given.length !== expected.length || !timingSafeEqual(given, expected)) {
        throw new GatewayError(
          "unauthorized",
          "/metrics needs Authorization: Bearer <METRICS_TOKEN>",
        );
      }
    }
    return c.text(metrics.render(), 200, {
      "content-type": "text/plain; version=0.0.4; charset=utf-8",
    });
  });
}
