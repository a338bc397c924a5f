// HTTP client of the running gateway's admin API, shared by the operator commands.
import { env, fatal } from "./_args.ts";

/** Exit code when the gateway answered with an error or could not be reached. */
export const EXIT_FAILURE = 1;

/** The email the gateway gives its first admin when ADMIN_EMAIL is not set (core/config.ts). */
const DEFAULT_ADMIN_EMAIL = "admin@gridtokenx.local";
const DEFAULT_TIMEOUT_MS = 30_000;

/** The hint printed whenever the gateway cannot be reached. */
export const START_HINT =
  "Is the gateway running? Start it with `deno task start`, or point --url / GATEWAY_URL at it.";

/** `parseArgs` options of the connection flags, for commands that log in with --email/--password. */
export const CONNECTION_OPTIONS = {
  url: { type: "string" },
  token: { type: "string" },
  email: { type: "string" },
  password: { type: "string" },
} as const;

/** Usage lines of {@linkcode CONNECTION_OPTIONS}. */
export const CONNECTION_USAGE = `Gateway connection:
  --url URL          Gateway base URL (env GATEWAY_URL; default http://127.0.0.1:$PORT or :8080)
  --token JWT        Bearer token of an admin or operator (env GATEWAY_TOKEN)
  --email EMAIL      Log in as this admin or operator (env ADMIN_EMAIL)
  --password PASS    Password for --email (env ADMIN_PASSWORD; prefer the env var, flags show in ps)`;

/** An error answer of the gateway (`{"error": {"code", "message"}}`). */
export class ApiError extends Error {
  /** The gateway's machine-readable code, or `http_<status>` when the body had none. */
  readonly code: string;
  readonly status: number;
  /** Seconds from the `Retry-After` header, when sent. */
  readonly retryAfter?: number;
  readonly details?: unknown;

  constructor(
    code: string,
    message: string,
    options: { status: number; retryAfter?: number; details?: unknown },
  ) {
    super(message);
    this.name = "ApiError";
    this.code = code;
    this.status = options.status;
    this.retryAfter = options.retryAfter;
    this.details = options.details;
  }
}

/** The gateway did not answer: nothing listening, DNS failure, or a timeout. */
export class GatewayUnreachableError extends Error {
  constructor(message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = "GatewayUnreachableError";
  }
}

/** Where the gateway is and how to authenticate; unset fields fall back to the environment. */
export interface ConnectionSettings {
  url?: string;
  token?: string;
  email?: string;
  password?: string;
}

/**
 * An API path from literal parts and path segments, each segment percent-encoded (so `:`, `/`,
 * `?` or `#` in a meter id stay inside it). Dot-only segments are refused: every URL parser
 * resolves `.` and `..` (also as `%2E`), so no request could carry them.
 */
export function apiPath(strings: TemplateStringsArray, ...segments: string[]): string {
  let path = strings[0];
  segments.forEach((segment, i) => {
    if (/^\.*$/.test(segment)) {
      throw new TypeError(`Path segment "${segment}" cannot be sent in a URL`);
    }
    path += encodeURIComponent(segment) + strings[i + 1];
  });
  return path;
}

/** Options of {@linkcode GatewayClient.request}. */
export interface RequestOptions {
  /** JSON request body. */
  body?: unknown;
  /** Give up after this long (default 30 s). */
  timeoutMs?: number;
}

/** A JSON client of the gateway's REST API with a bearer token. */
export class GatewayClient {
  /** Base URL without a trailing slash. */
  readonly url: string;
  #token: string | undefined;

  constructor(url: string, token?: string) {
    this.url = url;
    this.#token = token;
  }

  /** Sends a request and returns the parsed JSON body; throws ApiError or GatewayUnreachableError. */
  async request<T>(method: string, path: string, options: RequestOptions = {}): Promise<T> {
    const headers: Record<string, string> = { accept: "application/json" };
    if (this.#token) headers.authorization = `Bearer ${this.#token}`;
    let body: string | undefined;
    if (options.body !== undefined) {
      headers["content-type"] = "application/json";
      body = JSON.stringify(options.body);
    }
    const timeoutMs = options.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    let res: Response;
    let text: string;
    try {
      res = await fetch(this.url + path, {
        method,
        headers,
        body,
        signal: AbortSignal.timeout(timeoutMs),
      });
      text = await res.text();
    } catch (error) {
      throw unreachable(this.url, error, timeoutMs);
    }
    const parsed = parseJson(text);
    if (!res.ok) throw apiError(res, parsed, text);
    if (parsed === undefined) {
      throw new ApiError("bad_response", `${method} ${path} answered ${res.status} without JSON`, {
        status: res.status,
      });
    }
    return parsed as T;
  }

  /** Logs in with email and password and keeps the access token for later requests. */
  async login(email: string, password: string): Promise<void> {
    try {
      const res = await this.request<{ access_token: string }>("POST", "/api/auth/login", {
        body: { email, password },
      });
      this.#token = res.access_token;
    } catch (error) {
      if (!(error instanceof ApiError)) throw error;
      throw new ApiError(error.code, `Login as "${email}" failed: ${error.message}`, error);
    }
  }
}

/** The gateway's base URL from `--url`, GATEWAY_URL, or PORT on localhost; exits 2 when malformed. */
export function resolveUrl(flag?: string): string {
  const text = flag ?? env("GATEWAY_URL") ?? `http://127.0.0.1:${env("PORT") ?? "8080"}`;
  let url: URL;
  try {
    url = new URL(text);
  } catch {
    fatal(`Gateway URL "${text}" is not a URL (expected e.g. http://127.0.0.1:8080)`);
  }
  if (url.protocol !== "http:" && url.protocol !== "https:") {
    fatal(`Gateway URL "${text}" must start with http:// or https://`);
  }
  return url.href.replace(/\/+$/, "");
}

/**
 * Builds a logged-in client: `--token`/GATEWAY_TOKEN, else a login with `--email`/`--password`
 * (or ADMIN_EMAIL/ADMIN_PASSWORD). Exits 2 when no credentials are given at all.
 */
export async function connect(settings: ConnectionSettings): Promise<GatewayClient> {
  const url = resolveUrl(settings.url);
  const token = settings.token ?? env("GATEWAY_TOKEN");
  if (token !== undefined) return new GatewayClient(url, token);
  const password = settings.password ?? env("ADMIN_PASSWORD");
  const email = settings.email ?? env("ADMIN_EMAIL");
  if (password === undefined) {
    fatal(
      email === undefined
        ? "Not logged in: pass --token (or set GATEWAY_TOKEN), or an admin's or operator's email and password " +
          "(flags, see --help, or ADMIN_EMAIL and ADMIN_PASSWORD)"
        : `No password to log in as "${email}": set ADMIN_PASSWORD or pass it (see --help)`,
    );
  }
  const client = new GatewayClient(url);
  await client.login(email ?? DEFAULT_ADMIN_EMAIL, password);
  return client;
}

/**
 * Connects and runs `body`; an API error prints `error: <code>: <message>`, an unreachable gateway
 * prints a hint to start it, and both exit 1.
 */
export async function withGateway(
  settings: ConnectionSettings,
  body: (client: GatewayClient) => Promise<void>,
): Promise<void> {
  try {
    await body(await connect(settings));
  } catch (error) {
    reportFailure(error);
    Deno.exit(EXIT_FAILURE);
  }
}

/** Prints an ApiError or GatewayUnreachableError for the operator; rethrows anything else. */
export function reportFailure(error: unknown): void {
  if (error instanceof ApiError) {
    console.error(`error: ${error.code}: ${error.message}`);
    const issues = issuesOf(error.details);
    for (const issue of issues.slice(1)) console.error(`  also: ${issue}`);
  } else if (error instanceof GatewayUnreachableError) {
    console.error(`error: ${error.message}\n${START_HINT}`);
  } else {
    throw error;
  }
}

function unreachable(url: string, error: unknown, timeoutMs: number): GatewayUnreachableError {
  if (error instanceof DOMException && error.name === "TimeoutError") {
    return new GatewayUnreachableError(
      `The gateway at ${url} did not answer within ${timeoutMs / 1000} s`,
      { cause: error },
    );
  }
  if (!(error instanceof TypeError)) throw error;
  // Deno says "fetch failed" and hides the reason in a long cause chain; the last clause is the
  // part an operator can act on ("Connection refused (os error 111)").
  const detail = error.cause instanceof Error ? error.cause.message : error.message;
  const reason = detail.split(": ").at(-1) ?? detail;
  return new GatewayUnreachableError(`Cannot reach the gateway at ${url}: ${reason}`, {
    cause: error,
  });
}

function apiError(res: Response, parsed: unknown, text: string): ApiError {
  const header = res.headers.get("retry-after");
  const retry = header === null ? NaN : Number(header);
  const options = {
    status: res.status,
    retryAfter: Number.isFinite(retry) && retry >= 0 ? retry : undefined,
  };
  const error = (parsed as { error?: { code?: unknown; message?: unknown; details?: unknown } })
    ?.error;
  if (error && typeof error.code === "string" && typeof error.message === "string") {
    return new ApiError(error.code, error.message, { ...options, details: error.details });
  }
  const snippet = text.trim().slice(0, 200) || res.statusText;
  return new ApiError(`http_${res.status}`, snippet, options);
}

function parseJson(text: string): unknown {
  try {
    return JSON.parse(text);
  } catch {
    return undefined;
  }
}

/** Validation issues beyond the first (the first is already in the message). */
function issuesOf(details: unknown): string[] {
  const issues = (details as { issues?: { path?: string; message?: string }[] })?.issues;
  if (!Array.isArray(issues)) return [];
  return issues.map((i) => (i.path ? `${i.path}: ` : "") + (i.message ?? ""));
}

// The API's shapes, from the service that produces them.
export type { DeviceView, IssuedKey } from "../services/devices.ts";

/** The warning printed next to every HMAC secret. */
export const SECRET_WARNING =
  "warning: The secret is shown only once. Store it on the meter now: " +
  "the gateway keeps it encrypted and cannot show it again (if it is lost, run device:rotate).";
