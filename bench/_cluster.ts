// Shared set-up of the multi-instance benchmarks (bench:ws, bench:cache): gateway processes of
// `main.ts` on one PostgreSQL schema of their own and one private redis-server, accounts and
// meters provisioned quickly, and the CPU / Redis / PostgreSQL counters read around a window.
import { Buffer } from "node:buffer";
import postgres from "postgres";
import { sign } from "hono/jwt";
import { call, GatewayProcess, login } from "../tests/_gateway_process.ts";
import { cli, type RedisServer, startRedisServer } from "../tests/_redis_cluster.ts";
import { createTestSchema, postgresUrl, type TestSchema } from "../tests/_services.ts";

export const ADMIN = { email: "root@bench.local", password: "Bench-root-pw-7193" };
export const JWT_SECRET = "Kq8vTz3pXw9LmN2rB7yC4dF6hJ1sG5aE0uI-bench";
const KEK = "0f1e2d3c4b5a69788796a5b4c3d2e1f00011223344556677889900aabbccddee";

/** A reading event's or request's wall-clock time in ms with µs resolution, comparable across
 * processes of this machine. */
export function wallMs(): number {
  return performance.timeOrigin + performance.now();
}

/** Two (or more) gateway processes sharing one schema and one Redis. */
export interface Cluster extends AsyncDisposable {
  gateways: GatewayProcess[];
  redis: RedisServer;
  schema: TestSchema;
  /** The application_name of every PostgreSQL connection of the gateways. */
  appName: string;
  adminToken: string;
  /** Stops the gateways (SIGTERM) and starts new ones with `env` on the same schema and Redis. */
  restart(env: Record<string, string>): Promise<void>;
  close(): Promise<void>;
}

/** Starts a private redis-server, a fresh schema and `instances` gateways. */
export async function startCluster(
  instances: number,
  env: Record<string, string>,
): Promise<Cluster> {
  const schema = await createTestSchema(postgresUrl());
  const redis = await startRedisServer();
  const appName = `gwbench_${crypto.randomUUID().slice(0, 8)}`;
  const url = new URL(schema.url);
  url.searchParams.set("application_name", appName);
  let gateways: GatewayProcess[] = [];
  const start = async (extra: Record<string, string>) => {
    const prefix = `bench${crypto.randomUUID().slice(0, 8)}:`;
    gateways = [];
    for (let i = 0; i < instances; i++) {
      gateways.push(
        await GatewayProcess.start({
          DATABASE_URL: url.href,
          JWT_SECRET,
          DEVICE_KEY_ENCRYPTION_KEY: KEK,
          ADMIN_EMAIL: ADMIN.email,
          ADMIN_PASSWORD: ADMIN.password,
          GATEWAY_INSTANCE_ID: `gw-${String.fromCharCode(97 + i)}`,
          REDIS_URL: redis.url,
          REDIS_PREFIX: prefix,
          MQTT_ENABLED: "false",
          LOG_LEVEL: "info",
          // Every client of the benchmark shares one address.
          HTTP_MAX_CONNECTIONS: "100000",
          HTTP_MAX_CONNECTIONS_PER_ADDRESS: "100000",
          DEVICE_REGISTER_RATE_LIMIT: "100000",
          LOGIN_RATE_LIMIT: "100000",
          ...env,
          ...extra,
        }),
      );
    }
  };
  const stop = async () => {
    for (const gw of gateways) await gw.stop("SIGTERM");
  };
  try {
    await start({});
    // The first instance created the admin once it listened; wait for it.
    let adminToken = "";
    for (let attempt = 0; !adminToken; attempt++) {
      try {
        adminToken = await login(gateways[0].url, ADMIN.email, ADMIN.password);
      } catch (error) {
        if (attempt > 50) throw error;
        await new Promise((r) => setTimeout(r, 100));
      }
    }
    const cluster: Cluster = {
      get gateways() {
        return gateways;
      },
      redis,
      schema,
      appName,
      adminToken,
      async restart(extra) {
        await stop();
        await start(extra);
      },
      async close() {
        await stop().catch(() => {});
        await redis.close();
        await schema.drop();
      },
      [Symbol.asyncDispose]() {
        return this.close();
      },
    };
    return cluster;
  } catch (error) {
    await stop().catch(() => {});
    await redis.close();
    await schema.drop();
    throw error;
  }
}

/** A decoded API response: benchmarks read fields without declaring every shape. */
// deno-lint-ignore no-explicit-any
type Json = any;

/** A JSON call that must answer 2xx. */
export async function api(
  base: string,
  method: string,
  path: string,
  token: string,
  body?: unknown,
): Promise<Json> {
  const res = await call(base, method, path, { token, body });
  if (res.status < 200 || res.status > 299) {
    throw new Error(`${method} ${path}: ${res.status} ${JSON.stringify(res.body)}`);
  }
  return res.body;
}

/** An account of the benchmark with a token (issued by the benchmark, see below). */
export interface BenchUser {
  id: string;
  email: string;
  token: string;
}

/**
 * `n` accounts of role `user`. One is created through the API; the others are copies of its
 * row (same password hash) inserted straight into the schema, and every token is signed by the
 * benchmark with the gateways' JWT secret: scrypt at production cost takes ~0.5 s per account
 * creation and per login, which would make the set-up of 200 dashboards take minutes.
 */
export async function createUsers(cluster: Cluster, n: number, tag: string): Promise<BenchUser[]> {
  const first = await api(cluster.gateways[0].url, "POST", "/api/admin/users", cluster.adminToken, {
    email: `${tag}-0@bench.local`,
    password: "Prosumer-bench-pw-5",
    role: "user",
  });
  const sql = postgres(cluster.schema.url, { max: 1, onnotice: () => {} });
  try {
    const columns: string[] = (await sql`
      SELECT column_name FROM information_schema.columns
      WHERE table_schema = ${cluster.schema.name} AND table_name = 'users'`)
      .map((r) => r.column_name);
    const rest = columns.filter((c) => c !== "id" && c !== "email");
    const list = rest.map((c) => `"${c}"`).join(", ");
    for (let i = 1; i < n; i++) {
      await sql.unsafe(
        `INSERT INTO users (id, email, ${list}) SELECT $1, $2, ${list} FROM users WHERE id = $3`,
        [crypto.randomUUID(), `${tag}-${i}@bench.local`, first.id],
      );
    }
    const rows = await sql.unsafe(
      `SELECT * FROM users WHERE email LIKE $1 ORDER BY email`,
      [`${tag}-%@bench.local`],
    );
    const now = Math.floor(Date.now() / 1000);
    const users: BenchUser[] = [];
    for (const row of rows) {
      const token = await sign(
        {
          sub: row.id,
          role: row.role,
          email: row.email,
          gen: row.token_generation,
          iat: now - 5,
          exp: now + 3_000,
        },
        JWT_SECRET,
        "HS256",
      );
      users.push({ id: row.id, email: row.email, token });
    }
    // Sorted by email: tag-0, tag-1, tag-10, …; order them by number.
    const num = (u: BenchUser) => Number(u.email.slice(tag.length + 1).split("@")[0]);
    return users.sort((a, b) => num(a) - num(b));
  } finally {
    await sql.end({ timeout: 5 });
  }
}

/** Imports HMAC meters `ids[i]` owned by `owners[i]`; returns their secrets by meter id. */
export async function importMeters(
  cluster: Cluster,
  ids: string[],
  owners: string[],
): Promise<Map<string, Buffer>> {
  const secrets = new Map<string, Buffer>();
  for (let i = 0; i < ids.length; i += 5_000) {
    const devices = ids.slice(i, i + 5_000).map((meter_id, j) => ({
      meter_id,
      user_id: owners[i + j],
      algorithm: "hmac-sha256",
    }));
    const { results } = await api(
      cluster.gateways[0].url,
      "POST",
      "/api/admin/devices/import",
      cluster.adminToken,
      { devices },
    );
    for (const r of results) secrets.set(r.meter_id, Buffer.from(r.secret_hex, "hex"));
  }
  return secrets;
}

// --- counters -------------------------------------------------------------------------------

/** utime + stime of a process in ms (Linux /proc, 100 ticks per second); NaN when gone. */
export function cpuMs(pid: number): number {
  try {
    const stat = Deno.readTextFileSync(`/proc/${pid}/stat`);
    const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    return (Number(fields[11]) + Number(fields[12])) * 10;
  } catch {
    return NaN;
  }
}

/** Busy and total CPU time of the whole machine in ms, from /proc/stat. */
export function machineMs(): { busy: number; total: number } {
  const line = Deno.readTextFileSync("/proc/stat").split("\n")[0];
  const v = line.split(/\s+/).slice(1).map(Number);
  const total = v.slice(0, 8).reduce((a, b) => a + b, 0);
  const idle = v[3] + v[4];
  return { busy: (total - idle) * 10, total: total * 10 };
}

/** The 1-minute load average. */
export function loadAverage(): string {
  return Deno.readTextFileSync("/proc/loadavg").split(" ").slice(0, 3).join(" ");
}

/** The process id of the Redis server (from INFO server). */
export async function redisPid(redis: RedisServer): Promise<number> {
  const info = await cli(redis.port, ["INFO", "server"]);
  return Number(/process_id:(\d+)/.exec(info)?.[1]);
}

/** Redis counters: calls per command and commands processed in all. */
export async function redisCounters(redis: RedisServer): Promise<Record<string, number>> {
  const out: Record<string, number> = {};
  // One INFO call, so that both sections describe the same instant.
  const info = await cli(redis.port, ["INFO", "stats", "commandstats"]);
  for (const m of info.matchAll(/^cmdstat_(\S+?):calls=(\d+)/gm)) out[m[1]] = Number(m[2]);
  out.total_commands_processed = Number(/total_commands_processed:(\d+)/.exec(info)?.[1]);
  return out;
}

/** Backend pids of the gateways' PostgreSQL connections (by application_name). */
export async function postgresPids(cluster: Cluster): Promise<number[]> {
  const sql = postgres(postgresUrl(), { max: 1, onnotice: () => {} });
  try {
    const rows =
      await sql`SELECT pid FROM pg_stat_activity WHERE application_name = ${cluster.appName}`;
    return rows.map((r) => Number(r.pid));
  } finally {
    await sql.end({ timeout: 5 });
  }
}

/** Per-table scan counters of the bench schema, and the database's commits. */
export async function postgresCounters(
  cluster: Cluster,
): Promise<
  { scans: number; seq: number; idx: number; commits: number; byTable: Record<string, number> }
> {
  const sql = postgres(postgresUrl(), { max: 1, onnotice: () => {} });
  try {
    const tables = await sql`
      SELECT relname, coalesce(seq_scan, 0)::float8 AS seq, coalesce(idx_scan, 0)::float8 AS idx
      FROM pg_stat_user_tables WHERE schemaname = ${cluster.schema.name}`;
    const [db] = await sql`
      SELECT xact_commit::float8 AS commits FROM pg_stat_database WHERE datname = current_database()`;
    const byTable: Record<string, number> = {};
    let seq = 0, idx = 0;
    for (const t of tables) {
      byTable[t.relname] = t.seq + t.idx;
      seq += t.seq;
      idx += t.idx;
    }
    return { scans: seq + idx, seq, idx, commits: db.commits, byTable };
  } finally {
    await sql.end({ timeout: 5 });
  }
}

/** Sum of a metric's series in a gateway's `/metrics` whose labels contain every `match`. */
export async function metric(
  base: string,
  token: string,
  name: string,
  match: string | string[] = "",
): Promise<number> {
  const res = await fetch(`${base}/metrics`, { headers: { authorization: `Bearer ${token}` } });
  const text = await res.text();
  const parts = typeof match === "string" ? [match] : match;
  let sum = 0;
  for (const line of text.split("\n")) {
    if (
      (line.startsWith(name + " ") || line.startsWith(name + "{")) &&
      parts.every((part) => line.includes(part))
    ) {
      sum += Number(line.split(" ").at(-1));
    }
  }
  return sum;
}

/** The value at quantile `p` of an ascending array. */
export function pct(sorted: number[], p: number): number {
  return sorted.length ? sorted[Math.min(sorted.length - 1, Math.floor(sorted.length * p))] : NaN;
}

/** `n` with a thousands separator. */
export function fmt(n: number, digits = 0): string {
  return n.toLocaleString("en-US", {
    minimumFractionDigits: digits,
    maximumFractionDigits: digits,
  });
}

export function delay(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/** Canonical timestamp (whole seconds, Z) of `ms`. */
export function isoSecond(ms: number): string {
  return new Date(Math.floor(ms / 1000) * 1000).toISOString().replace(".000Z", "Z");
}
