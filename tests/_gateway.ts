// Test harness: a real gateway (Deno KV on a temp file, writer worker, HTTP on an ephemeral port).
import { LocalBus } from "../bus/local_bus.ts";
import type { Clock } from "../core/clock.ts";
import { loadConfig } from "../core/config.ts";
import { type Logger, silentLogger } from "../core/logger.ts";
import { canonicalMessage, signHmac } from "../core/signature.ts";
import { createGateway, type Gateway } from "../server/gateway.ts";
import { storeSpecOf } from "../db/open_store.ts";
import { createTestSchema } from "./_services.ts";
import { Buffer } from "node:buffer";

export const ADMIN = { email: "admin@test.local", password: "admin-password-1" };

/** The password {@linkcode TestGateway.createUser} gives `email` (one that does not contain it). */
export function passwordFor(email: string): string {
  // FNV-1a of the email, in digits: distinct per account, and never containing its letters.
  let hash = 0x811c9dc5;
  for (const unit of email) hash = Math.imul(hash ^ unit.charCodeAt(0), 0x01000193) >>> 0;
  return `Harness-pw-${hash}-Zq`;
}

/** A gateway under test with helpers to drive it over real HTTP. */
export interface TestGateway extends AsyncDisposable {
  url: string;
  gateway: Gateway;
  bus: LocalBus;
  dir: string;
  kvPath: string;
  adminToken: string;
  /** Logs in and returns the access token. */
  login(email: string, password: string): Promise<string>;
  /** Creates a user (as admin) and returns its id and token. */
  createUser(email: string, role?: string): Promise<{ id: string; token: string }>;
  /** Registers an HMAC meter for a user; returns the secret. */
  registerMeter(meterId: string, userId: string): Promise<{ key_id: string; secret_hex: string }>;
  /** JSON request against the gateway. */
  request(
    method: string,
    path: string,
    options?: { token?: string; body?: unknown; raw?: BodyInit; headers?: Record<string, string> },
    // deno-lint-ignore no-explicit-any -- JSON bodies of many shapes; tests assert on them
  ): Promise<{ status: number; body: any; headers: Headers }>;
  close(): Promise<void>;
}

/** Options of {@linkcode startTestGateway}. */
export interface TestGatewayOptions {
  clock?: Clock;
  env?: Record<string, string>;
  /** Reuse a data directory (restart tests). */
  dir?: string;
  /** Where the gateway logs (silent by default). */
  logger?: Logger;
}

const KEK = new Uint8Array(32).fill(7);
/** The JWT secret of every test gateway (tests forge tokens with it). */
export const JWT_SECRET = "test-jwt-secret-test-jwt-secret-0123456789";

/**
 * Which store the end-to-end tests run on: Deno KV by default, PostgreSQL (a fresh schema per
 * gateway, or per data directory for restart tests) with `GATEWAY_TEST_STORE=postgres`.
 */
const ON_POSTGRES = Deno.env.get("GATEWAY_TEST_STORE") === "postgres";

/** A PostgreSQL schema for one test gateway; one per data directory so restarts find it. */
async function postgresFor(
  dir: string,
  reused: boolean,
): Promise<{ url: string; drop(): Promise<void> }> {
  const marker = `${dir}/pg_schema_url`;
  if (reused) {
    try {
      return { url: await Deno.readTextFile(marker), drop: () => Promise.resolve() };
    } catch { /* first start in this directory */ }
  }
  const schema = await createTestSchema();
  await Deno.writeTextFile(marker, schema.url);
  // A directory the test owns may be restarted on: its schema lives as long as the process.
  if (reused) {
    addEventListener("unload", () => {
      // Best effort; stale schemas of crashed runs are harmless (random names).
      schema.drop().catch(() => {});
    });
    return { url: schema.url, drop: () => Promise.resolve() };
  }
  return schema;
}

/** Starts a full gateway on an ephemeral port. */
export async function startTestGateway(options: TestGatewayOptions = {}): Promise<TestGateway> {
  const dir = options.dir ?? await Deno.makeTempDir({ prefix: "gw-test-" });
  const kvPath = `${dir}/gateway.kv`;
  const pg = ON_POSTGRES ? await postgresFor(dir, options.dir !== undefined) : undefined;
  const config = loadConfig({
    ...(pg
      ? {
        DATABASE_URL: pg.url,
        JWT_SECRET,
        DEVICE_KEY_ENCRYPTION_KEY:
          "0f1e2d3c4b5a69788796a5b4c3d2e1f00011223344556677889900aabbccddee",
        DATABASE_POOL_MAX: "4",
      }
      : {}),
    ADMIN_EMAIL: ADMIN.email,
    ADMIN_PASSWORD: ADMIN.password,
    DENO_KV_PATH: kvPath,
    WRITER_FLUSH_MS: "2",
    MQTT_PORT: "0",
    DEVICE_REGISTER_RATE_LIMIT: "100000",
    LOGIN_RATE_LIMIT: "100000",
    ...options.env,
  });
  const bus = new LocalBus();
  const clock = options.clock ?? { now: () => Date.now() };
  const gateway = await createGateway({
    config,
    storeSpec: storeSpecOf(config),
    bus,
    clock,
    logger: options.logger ?? silentLogger,
    jwtSecret: JWT_SECRET,
    kek: KEK,
    // The cost of the old default: production's N=2^17 would make every test login take ~0.5 s.
    passwordParams: { N: 2 ** 14, r: 8, p: 1 },
  });
  await gateway.users.bootstrapAdmin(config.adminEmail, config.adminPassword, silentLogger);
  const abort = new AbortController();
  const server = Deno.serve(
    { hostname: "127.0.0.1", port: 0, signal: abort.signal, onListen: () => {} },
    gateway.app.fetch,
  );
  const url = `http://127.0.0.1:${server.addr.port}`;

  const request: TestGateway["request"] = async (method, path, opts = {}) => {
    const headers: Record<string, string> = { ...opts.headers };
    if (opts.token) headers.authorization = `Bearer ${opts.token}`;
    let body: BodyInit | undefined = opts.raw;
    if (opts.body !== undefined) {
      headers["content-type"] ??= "application/json";
      body = JSON.stringify(opts.body);
    }
    const res = await fetch(url + path, { method, headers, body });
    const text = await res.text();
    let parsed: unknown = text;
    try {
      parsed = JSON.parse(text);
    } catch { /* not JSON */ }
    return { status: res.status, body: parsed, headers: res.headers };
  };

  const login = async (email: string, password: string) => {
    const res = await request("POST", "/api/auth/login", { body: { email, password } });
    if (res.status !== 200) throw new Error(`login failed: ${JSON.stringify(res.body)}`);
    return res.body.access_token as string;
  };
  const adminToken = await login(ADMIN.email, ADMIN.password);

  let closed = false;
  const close = async () => {
    if (closed) return;
    closed = true;
    abort.abort();
    await server.finished;
    await gateway.close();
    await bus.close();
    await pg?.drop();
    if (!options.dir) await Deno.remove(dir, { recursive: true });
  };

  return {
    url,
    gateway,
    bus,
    dir,
    kvPath,
    adminToken,
    login,
    request,
    async createUser(email, role = "user") {
      const password = passwordFor(email);
      const res = await request("POST", "/api/admin/users", {
        token: adminToken,
        body: { email, password, role },
      });
      if (res.status !== 201) throw new Error(`createUser: ${JSON.stringify(res.body)}`);
      return { id: res.body.id, token: await login(email, password) };
    },
    async registerMeter(meterId, userId) {
      const res = await request("POST", "/api/admin/devices/register", {
        token: adminToken,
        body: { meter_id: meterId, user_id: userId, algorithm: "hmac-sha256" },
      });
      if (res.status !== 201) throw new Error(`registerMeter: ${JSON.stringify(res.body)}`);
      return res.body;
    },
    close,
    [Symbol.asyncDispose]: close,
  };
}

/** Builds a signed HTTP submission body with an HMAC secret (hex). */
export function signedReading(
  meterId: string,
  secretHex: string,
  timestamp: string,
  kwh: string | number = "1.5",
  extra: Record<string, unknown> = {},
): Record<string, unknown> {
  const kwhText = typeof kwh === "string" ? kwh : JSON.stringify(kwh);
  return {
    meter_id: meterId,
    kwh_amount: kwh,
    reading_timestamp: timestamp,
    device_signature: signHmac(
      Buffer.from(secretHex, "hex"),
      canonicalMessage(meterId, timestamp, kwhText),
    ),
    ...extra,
  };
}

/** An RFC 3339 timestamp `offsetMs` from now, whole seconds. */
export function isoAgo(offsetMs: number, now = Date.now()): string {
  return new Date(Math.floor((now - offsetMs) / 1000) * 1000).toISOString().replace(".000Z", "Z");
}
