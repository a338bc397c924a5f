import type { MiddlewareHandler } from "hono";
import { routePath } from "hono/route";
import { type Logger, withLogContext } from "../core/logger.ts";
import type { Principal } from "../core/user.ts";
import { clientAddress } from "./middleware.ts";

/** The header carrying a request's id, in and out. */
export const REQUEST_ID_HEADER = "X-Request-Id";

// What an incoming id may look like (a UUID, a W3C trace id, a load balancer's own): bounded,
// and nothing that could break a log line or a header.
const VALID_ID = /^[A-Za-z0-9._:-]{1,128}$/;
// Polled by load balancers and Prometheus: their lines only at debug.
const QUIET = new Set(["/healthz", "/readyz", "/metrics"]);

/** Options of {@linkcode requestLog}. */
export interface RequestLogOptions {
  logger: Logger;
}

/** Hono variables set by {@linkcode requestLog} (and the error code by the error handler). */
export type RequestLogEnv = { Variables: { requestId: string; errorCode?: string } };

/**
 * Gives every request an id (a valid incoming `X-Request-Id`, else a new UUID), returns it in
 * the response header, adds `request_id` to every log line written on the request's behalf
 * (see `withLogContext`), and writes one access line when it is answered: method, route
 * pattern, status, duration, client address.
 */
/** Characters of a request path the access line keeps. */
const PATH_MAX = 256;

export function requestLog(options: RequestLogOptions): MiddlewareHandler<RequestLogEnv> {
  const { logger } = options;
  return async function requestLog(c, next) {
    const incoming = c.req.header(REQUEST_ID_HEADER);
    const requestId = incoming !== undefined && VALID_ID.test(incoming)
      ? incoming
      : crypto.randomUUID();
    c.set("requestId", requestId);
    await withLogContext({ request_id: requestId }, async () => {
      const started = performance.now();
      try {
        await next();
      } finally {
        const status = c.res.status;
        // A WebSocket upgrade's response must go out as it is (header middleware breaks it).
        if (status !== 101) {
          try {
            c.res.headers.set(REQUEST_ID_HEADER, requestId);
          } catch { /* immutable headers: the id is still in the log */ }
        }
        const last = routePath(c, -1);
        const route = status === 404 && (last === "" || last.endsWith("*")) ? "unmatched" : last;
        const principal = (c.var as { principal?: Principal }).principal;
        const fields = {
          method: c.req.method,
          route,
          // Bounded: anyone can ask for a 40 KB path, and it would be a 40 KB line.
          path: c.req.path.length > PATH_MAX ? `${c.req.path.slice(0, PATH_MAX)}…` : c.req.path,
          status,
          duration_ms: Math.round((performance.now() - started) * 10) / 10,
          address: clientAddress(c),
          ...(principal ? { user_id: principal.user_id } : {}),
          ...(c.var.errorCode ? { error: c.var.errorCode } : {}),
        };
        if (QUIET.has(c.req.path) && status < 500) logger.debug("http request", fields);
        else if (status >= 500) logger.warn("http request", fields);
        else logger.info("http request", fields);
      }
    });
  };
}
