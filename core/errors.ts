/** Stable machine-readable error codes shared by HTTP, MQTT acks and WebSocket messages. */
export type ErrorCode =
  | "invalid_payload"
  | "payload_too_large"
  | "kwh_out_of_range"
  | "timestamp_too_old"
  | "timestamp_in_future"
  | "duplicate"
  | "unknown_meter"
  | "device_revoked"
  | "bad_signature"
  | "key_expired"
  | "rate_limited"
  | "forbidden"
  | "unauthorized"
  | "not_found"
  | "conflict"
  /** An `Idempotency-Key` used again with a different request body. */
  | "idempotency_mismatch"
  | "overloaded"
  | "unavailable"
  | "internal";

/** Options of a {@linkcode GatewayError}. */
export interface GatewayErrorOptions {
  /** Extra machine-readable facts, e.g. the stored id of a duplicate. */
  details?: Record<string, unknown>;
  /** Seconds after which a retry may succeed (rate limits, overload). */
  retryAfter?: number;
  cause?: unknown;
}

/** An error with a stable code; the HTTP layer maps codes to statuses in one place. */
export class GatewayError extends Error {
  readonly code: ErrorCode;
  readonly details?: Record<string, unknown>;
  readonly retryAfter?: number;

  constructor(code: ErrorCode, message: string, options: GatewayErrorOptions = {}) {
    super(message, { cause: options.cause });
    this.name = "GatewayError";
    this.code = code;
    this.details = options.details;
    this.retryAfter = options.retryAfter;
  }
}

/** Raised when the environment holds a bad configuration; names every offending variable. */
export class ConfigError extends Error {
  readonly variables: string[];

  constructor(message: string, variables: string[]) {
    super(message);
    this.name = "ConfigError";
    this.variables = variables;
  }
}
