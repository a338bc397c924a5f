import type { Context } from "hono";
import { HTTPException } from "hono/http-exception";
import type { ContentfulStatusCode } from "hono/utils/http-status";
import { type ErrorCode, GatewayError } from "../core/errors.ts";
import type { Logger } from "../core/logger.ts";
import type { RequestLogEnv } from "./request_log.ts";

/** The one place error codes become HTTP statuses. */
const STATUS: Record<ErrorCode, ContentfulStatusCode> = {
  invalid_payload: 400,
  payload_too_large: 413,
  kwh_out_of_range: 422,
  timestamp_too_old: 422,
  timestamp_in_future: 422,
  duplicate: 409,
  unknown_meter: 422,
  device_revoked: 403,
  bad_signature: 401,
  key_expired: 401,
  rate_limited: 429,
  forbidden: 403,
  unauthorized: 401,
  not_found: 404,
  conflict: 409,
  idempotency_mismatch: 422,
  overloaded: 503,
  unavailable: 503,
  internal: 500,
};

const HTTP_CODES: Record<number, ErrorCode> = {
  400: "invalid_payload",
  401: "unauthorized",
  403: "forbidden",
  404: "not_found",
  413: "payload_too_large",
};

/** The HTTP status of an error code. */
export function statusOf(code: ErrorCode): ContentfulStatusCode {
  return STATUS[code];
}

/** `app.onError`: every failure becomes `{"error": {code, message, details?}}`. */
export function errorHandler(logger: Logger) {
  return function onError(error: Error, c: Context): Response {
    let gw: GatewayError;
    if (error instanceof GatewayError) {
      gw = error;
    } else if (error instanceof HTTPException) {
      const code = HTTP_CODES[error.status] ?? "invalid_payload";
      gw = new GatewayError(code, error.message || "Bad request");
    } else {
      logger.error("unhandled error", { error, path: c.req.path });
      gw = new GatewayError("internal", "Internal error");
    }
    // For the access log line (routes/request_log.ts).
    (c as Context<RequestLogEnv>).set("errorCode", gw.code);
    if (gw.retryAfter !== undefined) c.header("Retry-After", String(gw.retryAfter));
    const body = {
      error: { code: gw.code, message: gw.message, ...(gw.details ? { details: gw.details } : {}) },
    };
    return c.json(body, statusOf(gw.code));
  };
}
