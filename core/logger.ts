import { AsyncLocalStorage } from "node:async_hooks";

/** Log severities, lowest first. */
export type LogLevel = "debug" | "info" | "warn" | "error";

/** The severities, lowest first. */
export const LOG_LEVELS: readonly LogLevel[] = ["debug", "info", "warn", "error"];

const RANK: Record<LogLevel, number> = { debug: 10, info: 20, warn: 30, error: 40 };

/**
 * The components that get their own logger (`Logger.child`) and may get their own level
 * (`LOG_LEVELS=mqtt=debug,http=warn`).
 */
export const LOG_COMPONENTS = [
  "http",
  "mqtt",
  "writer",
  "batch",
  "ws",
  "bus",
  "db",
  "actors",
  "security",
  "cache",
  "auth",
] as const;

/** One of {@linkcode LOG_COMPONENTS}. */
export type LogComponent = typeof LOG_COMPONENTS[number];

/** Structured logger: one JSON object per line, secrets redacted. */
export interface Logger {
  debug(msg: string, fields?: Record<string, unknown>): void;
  info(msg: string, fields?: Record<string, unknown>): void;
  warn(msg: string, fields?: Record<string, unknown>): void;
  error(msg: string, fields?: Record<string, unknown>): void;
  /**
   * A logger for `component`: its lines carry `"component"` (and `fields`), and it logs at the
   * component's own level when one is configured, else at the default level.
   */
  child(component: string, fields?: Record<string, unknown>): Logger;
  /** Whether a line at `level` would be written (skip building costly fields otherwise). */
  enabled(level: LogLevel): boolean;
}

/** Options of {@linkcode jsonLogger}. */
export interface JsonLoggerOptions {
  /** Where each line goes; default stdout. */
  sink?: (line: string) => void;
  /** Fields of every line (`instance`). */
  base?: Record<string, unknown>;
  /** Levels per component (`LOG_LEVELS`), over the default level. */
  levels?: Partial<Record<string, LogLevel>>;
}

// Fields of the work in progress (an HTTP request's `request_id`), added to every line logged
// on its behalf, however deep in the call graph.
const context = new AsyncLocalStorage<Record<string, unknown>>();

/**
 * Runs `fn` with `fields` added to every log line written during it (and in the promises and
 * timers it starts); the HTTP middleware uses it for `request_id`.
 */
export function withLogContext<T>(fields: Record<string, unknown>, fn: () => T): T {
  const outer = context.getStore();
  return context.run(outer ? { ...outer, ...fields } : fields, fn);
}

/**
 * A value the redaction layer lets through: only the one-time generated admin password, which
 * the operator has no other way to learn (README, "Quick start").
 */
export class ShownOnce {
  readonly value: string;
  constructor(value: string) {
    this.value = value;
  }
  toJSON(): string {
    return this.value;
  }
}

/** A JSON-lines logger writing to `sink` (stdout by default). */
export function jsonLogger(level: LogLevel, options: JsonLoggerOptions = {}): Logger {
  const sink = options.sink ?? ((line: string) => console.log(line));
  const levels = options.levels ?? {};
  const make = (min: number, component: string | undefined, base: Record<string, unknown>) => {
    const emit = (lvl: LogLevel) => (msg: string, fields?: Record<string, unknown>) => {
      if (RANK[lvl] < min) return;
      const record: Record<string, unknown> = {
        ts: new Date().toISOString(),
        level: lvl,
        msg,
        ...base,
        ...context.getStore(),
        ...fields,
      };
      let line: string;
      try {
        line = JSON.stringify(redact(record));
      } catch (error) {
        // A field that cannot be serialised must not take the caller down, nor lose the line.
        line = JSON.stringify(redact({
          ts: record.ts,
          level: lvl,
          msg,
          ...base,
          log_error: (error as Error).message,
        }));
      }
      sink(line);
    };
    const logger: Logger = {
      debug: emit("debug"),
      info: emit("info"),
      warn: emit("warn"),
      error: emit("error"),
      child(name, fields = {}) {
        const full = component ? `${component}.${name}` : name;
        return make(RANK[levelOf(full, levels) ?? level], full, {
          ...base,
          component: full,
          ...fields,
        });
      },
      enabled: (lvl) => RANK[lvl] >= min,
    };
    return logger;
  };
  return make(RANK[level], undefined, { ...options.base });
}

// The most specific configured level of `component` ("mqtt.acks", then "mqtt").
function levelOf(
  component: string,
  levels: Partial<Record<string, LogLevel>>,
): LogLevel | undefined {
  for (let name = component;;) {
    const found = levels[name];
    if (found) return found;
    const dot = name.lastIndexOf(".");
    if (dot < 0) return undefined;
    name = name.slice(0, dot);
  }
}

/** One child logger per component of {@linkcode LOG_COMPONENTS}. */
export function componentLoggers(root: Logger): Record<LogComponent, Logger> {
  return Object.fromEntries(LOG_COMPONENTS.map((name) => [name, root.child(name)])) as Record<
    LogComponent,
    Logger
  >;
}

/** A logger that drops everything; for tests. */
export const silentLogger: Logger = jsonLogger("error", { sink: () => {} });

// ---------------------------------------------------------------------------------------------
// Redaction: whatever a caller passes, no secret reaches a log line.

/** What replaces a secret value. */
export const REDACTED = "[redacted]";

// Words of a field name that mark its value secret (`access_token`, `jwtSecret`, `Set-Cookie`).
const SECRET_WORDS = new Set([
  "password",
  "passwd",
  "pwd",
  "passphrase",
  "secret",
  "secrets",
  "token",
  "tokens",
  "authorization",
  "auth",
  "cookie",
  "signature",
  "kek",
  "jwt",
  "credential",
  "credentials",
]);
// Pairs of words that together mark a secret (`api_key`, `privateKey`, `x-api-key`).
const SECRET_JOINED = ["apikey", "privatekey", "secretkey", "accesskey", "encryptionkey"];
const nameCache = new Map<string, boolean>();

/** Whether a field named `key` holds a secret (by its words, any case or separator). */
export function isSecretKey(key: string): boolean {
  let secret = nameCache.get(key);
  if (secret !== undefined) return secret;
  const words = key.replace(/([a-z0-9])([A-Z])/g, "$1_$2").toLowerCase().split(/[^a-z0-9]+/);
  const joined = words.join("");
  secret = words.some((w) => SECRET_WORDS.has(w)) || SECRET_JOINED.some((j) => joined.includes(j));
  if (nameCache.size < 10_000) nameCache.set(key, secret);
  return secret;
}

// `scheme://user:password@host` (and `scheme://token@host`): the credentials go.
const URL_CREDENTIALS = /([a-z][a-z0-9+.-]*:\/\/)[^\s/?#"']+@/gi;
// `password=…`, `token: …`, `"api_key":"…"` inside free text (query strings, error messages).
const KEY_VALUE =
  /((?:[a-z0-9]+[_-])*(?:password|passwd|pwd|secret|token|api[_-]?key|private[_-]?key|signature|kek|jwt|authorization|cookie|sig)(?:[_-][a-z0-9]+)*)(["']?\s*[=:]\s*["']?)(?:Bearer\s+|Basic\s+)?[^\s&"',;)}\]]+/gi;
// `Bearer <token>` / `Basic <credentials>` anywhere.
const AUTH_SCHEME = /\b(Bearer|Basic)\s+[A-Za-z0-9._~+/=-]+/g;
// A JWT (three base64url parts, the first a JSON header `{"…`).
const JWT = /\beyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}/g;
const MAYBE_SECRET = /:\/\/|[=:]|Bearer|Basic|eyJ/i;

/** `text` with credentials in URLs, `key=value` secrets, bearer tokens and JWTs masked. */
export function redactText(text: string): string {
  if (!MAYBE_SECRET.test(text)) return text;
  return text
    .replace(URL_CREDENTIALS, (_, scheme: string) => `${scheme}***@`)
    .replace(KEY_VALUE, (_, key: string, sep: string) => `${key}${sep}***`)
    .replace(AUTH_SCHEME, (_, scheme: string) => `${scheme} ***`)
    .replace(JWT, "***");
}

/**
 * A copy of `value` safe to log: values of secret-named fields replaced, secrets inside strings
 * masked (recursively, in arrays, nested objects and errors, their messages and causes).
 */
export function redact(value: unknown, depth = 0): unknown {
  if (typeof value === "string") return redactText(value);
  if (value === null || typeof value !== "object") {
    return typeof value === "bigint" ? value.toString() : value;
  }
  if (value instanceof ShownOnce) return value.value;
  if (depth >= 8) return "[too deep]";
  if (value instanceof Error) return errorFields(value, depth);
  if (value instanceof Date) return value;
  if (value instanceof Uint8Array) return `[${value.byteLength} bytes]`;
  if (Array.isArray(value)) return value.slice(0, 100).map((v) => redact(v, depth + 1));
  if (value instanceof Map) return redact(Object.fromEntries(value), depth);
  if (value instanceof Set) return redact([...value], depth);
  const out: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(value)) {
    out[k] = isSecretKey(k) && v !== undefined && v !== null && !(v instanceof ShownOnce)
      ? REDACTED
      : redact(v, depth + 1);
  }
  return out;
}

function errorFields(error: Error, depth: number): Record<string, unknown> {
  const fields: Record<string, unknown> = {
    name: error.name,
    message: redactText(String(error.message)),
  };
  const code = (error as { code?: unknown }).code;
  if (typeof code === "string" || typeof code === "number") fields.code = code;
  if (error.cause !== undefined) fields.cause = redact(error.cause, depth + 1);
  return fields;
}
