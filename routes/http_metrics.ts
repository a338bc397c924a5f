// Request durations by route pattern and status: the route is the pattern that answered
// (`/api/meters/:meter_id/readings`), never the path, so labels stay bounded whatever is asked.
import type { MiddlewareHandler } from "hono";
import { routePath } from "hono/route";
import type { Metrics } from "../core/metrics.ts";

/** Seconds: API latency objectives sit at 0.3 s (the p95 alert). */
const BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1, 2.5, 5, 10];

/** Declares `http_request_duration_seconds` and returns the middleware that observes it. */
export function httpMetrics(metrics: Metrics): MiddlewareHandler {
  metrics.histogram(
    "http_request_duration_seconds",
    "HTTP requests by method, route pattern and status, from arrival to response",
    BUCKETS,
  );
  return async function httpMetrics(c, next) {
    const started = performance.now();
    try {
      await next();
    } finally {
      const pattern = routePath(c);
      // 404s (and the catch-all middleware patterns) are one series, not one per path asked.
      const route = c.res.status === 404 || pattern === "" || pattern.endsWith("*")
        ? "unmatched"
        : pattern;
      metrics.observe("http_request_duration_seconds", {
        method: METHODS.has(c.req.method) ? c.req.method : "OTHER",
        route,
        status: String(c.res.status),
      }, (performance.now() - started) / 1000);
    }
  };
}

const METHODS = new Set(["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]);
