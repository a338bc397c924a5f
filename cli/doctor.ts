// `deno task doctor`: reads the configuration exactly as the gateway does, then checks every
// backend it names (store, Redis, MQTT broker or the embedded broker's ports) and prints one
// line per check. Exit 0 when nothing failed, 1 when a check failed, 2 for a bad configuration.
import postgres from "postgres";
import { connect as mqttConnect } from "mqtt";
import { openRedis } from "../bus/redis_client.ts";
import { type Config, loadConfig } from "../core/config.ts";
import { ConfigError } from "../core/errors.ts";
import { redactText } from "../core/logger.ts";
import { readMigrations, timescaleAvailability } from "../db/migrate.ts";
import { openPinnedPool } from "../db/postgres_pool.ts";
import { EXIT_USAGE, parseFlags } from "./_args.ts";

const USAGE = `Usage: deno task doctor [--json] [--timeout <seconds>]

Loads the configuration from the environment exactly as the gateway does (the same variables,
the same validation), then checks each configured backend:

  store     PostgreSQL (DATABASE_URL): connects, server version, TimescaleDB, migrations
            applied and pending; or the Deno KV file (DENO_KV_PATH): its directory writable
  redis     REDIS_URL / REDIS_CLUSTER_NODES: PING, server version, cluster state
  mqtt      MQTT_URL: connects with MQTT_USERNAME / MQTT_PASSWORD; or the embedded broker's
            MQTT_PORT (and MQTT_TLS_PORT) free on MQTT_HOST
  http      HOST:PORT free (a warning only: a running gateway holds it)

Each line reads OK, WARN or FAIL with what was found; secrets and URL passwords are never printed.
Exit status: 0 when no check failed, 1 when one did, 2 when the configuration is invalid.

Options:
  --json                One JSON object on stdout instead of lines
  --timeout <seconds>   Per backend (default 5)
  -h, --help            Show this help`;

/** The verdict of one check. */
export type CheckStatus = "OK" | "WARN" | "FAIL";

/** One line of the report. */
export interface CheckResult {
  check: string;
  status: CheckStatus;
  detail: string;
}

/** Runs every check `config` calls for. */
export async function runChecks(
  config: Config,
  options: { timeoutMs: number },
): Promise<CheckResult[]> {
  const results: CheckResult[] = [];
  const add = (check: string, status: CheckStatus, detail: string) =>
    results.push({ check, status, detail: redactText(detail) });
  if (config.database) await checkPostgres(config, options.timeoutMs, add);
  else await checkKv(config.kvPath, add);
  await checkRedis(config, options.timeoutMs, add);
  await checkMqtt(config, options.timeoutMs, add);
  checkPort("http", config.host, config.port, "WARN", add);
  return results;
}

type Add = (check: string, status: CheckStatus, detail: string) => void;

/** `url` without its password (and with any other secret parameter masked). */
export function safeUrl(url: string): string {
  try {
    const parsed = new URL(url);
    if (parsed.password !== "") parsed.password = "***";
    for (const key of [...parsed.searchParams.keys()]) {
      if (/pass|secret|token|key/i.test(key)) parsed.searchParams.set(key, "***");
    }
    return redactText(parsed.href.replaceAll("%2A%2A%2A", "***"));
  } catch {
    return "<malformed URL>";
  }
}

function messageOf(error: unknown): string {
  const e = error as { message?: string; code?: string; errors?: { message?: string }[] };
  // An AggregateError (several addresses tried) carries its reasons inside.
  const inner = e?.errors?.map((x) => x.message).filter(Boolean).join("; ");
  return redactText(e?.message || inner || String(e?.code ?? error));
}

async function withTimeout<T>(what: string, ms: number, work: Promise<T>): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  try {
    return await Promise.race([
      work,
      new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(new Error(`${what}: no answer within ${ms} ms`)), ms);
      }),
    ]);
  } finally {
    clearTimeout(timer);
  }
}

async function checkPostgres(config: Config, timeoutMs: number, add: Add): Promise<void> {
  const database = config.database!;
  const where = safeUrl(database.url);
  let pool: { sql: postgres.Sql; schema: string };
  try {
    pool = await withTimeout(
      "PostgreSQL",
      timeoutMs + 1_000,
      openPinnedPool(database.url, { max: 1, connectTimeout: Math.ceil(timeoutMs / 1000) }),
    );
  } catch (error) {
    add("store", "FAIL", `PostgreSQL at ${where} (DATABASE_URL) unreachable: ${messageOf(error)}`);
    return;
  }
  const { sql, schema } = pool;
  try {
    const [{ version }] = await sql<{ version: string }[]>`
      SELECT current_setting('server_version') AS version`;
    add("store", "OK", `PostgreSQL ${version} at ${where}, schema "${schema}"`);

    const timescale = await timescaleAvailability(sql);
    const wanted = database.timescale !== false;
    if (timescale === "created") {
      const [{ v }] = await sql<{ v: string }[]>`
        SELECT extversion AS v FROM pg_extension WHERE extname = 'timescaledb'`;
      add(
        "store.timescaledb",
        "OK",
        wanted
          ? `TimescaleDB ${v} installed`
          : `TimescaleDB ${v} installed, not used (TIMESCALE_ENABLED=false)`,
      );
    } else if (timescale === "available") {
      add("store.timescaledb", "OK", "TimescaleDB available, not yet created (migrations do)");
    } else if (timescale === "not_preloaded") {
      add(
        "store.timescaledb",
        wanted ? "WARN" : "OK",
        "TimescaleDB installed but not in shared_preload_libraries: plain PostgreSQL is used",
      );
    } else {
      add("store.timescaledb", "OK", "TimescaleDB not installed: plain PostgreSQL");
    }

    const files = (await readMigrations()).map((m) => m.name);
    const [{ present }] = await sql<{ present: boolean }[]>`
      SELECT to_regclass(format('%I.schema_migrations', current_schema())) IS NOT NULL
        AS present`;
    const applied = present
      ? (await sql<{ name: string }[]>`SELECT name FROM schema_migrations ORDER BY name`)
        .map((r) => r.name)
      : [];
    const pending = files.filter((f) => !applied.includes(f));
    const unknown = applied.filter((a) => !files.includes(a));
    const counts = `${applied.length} applied, ${pending.length} pending`;
    if (pending.length === 0) {
      add("store.migrations", "OK", `${counts} (latest ${applied.at(-1) ?? "none"})`);
    } else if (database.migrateOnStart) {
      add(
        "store.migrations",
        "WARN",
        `${counts} (${pending.join(", ")}): applied at start (MIGRATE_ON_START=true)`,
      );
    } else {
      add(
        "store.migrations",
        "FAIL",
        `${counts} (${pending.join(", ")}) and MIGRATE_ON_START=false: run deno task migrate`,
      );
    }
    if (unknown.length > 0) {
      add(
        "store.migrations",
        "WARN",
        `applied but not in db/migrations/ (a newer release?): ${unknown.join(", ")}`,
      );
    }
  } catch (error) {
    add("store", "FAIL", `PostgreSQL at ${where}: ${messageOf(error)}`);
  } finally {
    await sql.end({ timeout: 1 });
  }
}

async function checkKv(path: string, add: Add): Promise<void> {
  // The KV file itself is not opened: a running gateway holds it.
  const dir = path.includes("/") ? path.slice(0, path.lastIndexOf("/")) || "/" : ".";
  let existing = dir;
  for (;;) {
    try {
      if ((await Deno.stat(existing)).isDirectory) break;
      add("store", "FAIL", `Deno KV: "${existing}" (DENO_KV_PATH) is not a directory`);
      return;
    } catch (error) {
      if (!(error instanceof Deno.errors.NotFound)) {
        add("store", "FAIL", `Deno KV: "${existing}": ${messageOf(error)}`);
        return;
      }
      const up = existing.includes("/") ? existing.slice(0, existing.lastIndexOf("/")) : ".";
      existing = up === "" ? "/" : up === existing ? "." : up;
    }
  }
  const probe = `${existing}/.gateway-doctor-${crypto.randomUUID().slice(0, 8)}`;
  try {
    await Deno.writeTextFile(probe, "", { createNew: true });
    await Deno.remove(probe);
  } catch (error) {
    add("store", "FAIL", `Deno KV: "${existing}" (DENO_KV_PATH) not writable: ${messageOf(error)}`);
    return;
  }
  let state = `"${path}" will be created`;
  try {
    const info = await Deno.stat(path);
    state = `"${path}" exists (${info.size} bytes)`;
    const file = await Deno.open(path, { read: true, write: true });
    file.close();
  } catch (error) {
    if (!(error instanceof Deno.errors.NotFound)) {
      add("store", "FAIL", `Deno KV: "${path}" not writable: ${messageOf(error)}`);
      return;
    }
  }
  add("store", "OK", `Deno KV ${state}; "${existing}" writable`);
}

async function checkRedis(config: Config, timeoutMs: number, add: Add): Promise<void> {
  if (!config.redis) {
    add("redis", "OK", "not configured: in-process bus and cache");
    return;
  }
  const spec = config.redis.spec;
  const where = spec.mode === "single"
    ? `${safeUrl(spec.url)} (REDIS_URL)`
    : `cluster ${spec.nodes.map((n) => `${n.host}:${n.port}`).join(",")} (REDIS_CLUSTER_NODES)`;
  const redis = openRedis(spec, {
    connectionName: `gtx-doctor-${config.instanceId}`,
    lazyConnect: true,
    reconnect: { baseMs: 200, maxMs: 1_000 },
  });
  const errors: string[] = [];
  redis.on("error", (error: Error) => errors.push(messageOf(error)));
  try {
    await withTimeout("Redis", timeoutMs, redis.connect());
    const pong = await withTimeout("Redis PING", timeoutMs, redis.ping());
    const info = await withTimeout("Redis INFO", timeoutMs, redis.info("server"));
    const version = /redis_version:(\S+)/.exec(info)?.[1] ?? "unknown";
    if (spec.mode === "cluster") {
      const text = String(await redis.call("CLUSTER", "INFO"));
      const state = /cluster_state:(\S+)/.exec(text)?.[1] ?? "unknown";
      const known = /cluster_known_nodes:(\d+)/.exec(text)?.[1] ?? "?";
      const slots = /cluster_slots_ok:(\d+)/.exec(text)?.[1] ?? "?";
      add(
        "redis",
        state === "ok" ? "OK" : "FAIL",
        `Redis ${version} ${where}: ${pong}, cluster_state ${state}, ${known} nodes, ` +
          `${slots}/16384 slots ok`,
      );
    } else {
      add("redis", "OK", `Redis ${version} at ${where}: ${pong}`);
    }
  } catch (error) {
    const why = errors[0] ?? messageOf(error);
    add("redis", "FAIL", `Redis at ${where} unreachable: ${why}`);
  } finally {
    redis.disconnect();
  }
}

async function checkMqtt(config: Config, timeoutMs: number, add: Add): Promise<void> {
  const mqtt = config.mqtt;
  if (!mqtt.enabled) {
    add("mqtt", "OK", "disabled (MQTT_ENABLED=false): HTTP only");
    return;
  }
  if (!mqtt.url) {
    checkPort("mqtt", mqtt.host, mqtt.port, "FAIL", add, "MQTT_PORT");
    if (mqtt.tls) {
      checkPort("mqtt.tls", mqtt.host, mqtt.tls.port, "FAIL", add, "MQTT_TLS_PORT");
      for (
        const [name, path] of [
          ["MQTT_TLS_CERT", mqtt.tls.certPath],
          ["MQTT_TLS_KEY", mqtt.tls.keyPath],
          ["MQTT_TLS_CA", mqtt.tls.caPath],
        ] as const
      ) {
        if (path === undefined) continue;
        try {
          await Deno.readTextFile(path);
        } catch (error) {
          add("mqtt.tls", "FAIL", `${name} "${path}" not readable: ${messageOf(error)}`);
        }
      }
    }
    return;
  }
  const where = `${safeUrl(mqtt.url)} (MQTT_URL)`;
  const clientId = `${mqtt.clientId}-doctor`.slice(0, 64);
  const client = mqttConnect(mqtt.url, {
    username: mqtt.username,
    password: mqtt.password,
    clientId,
    protocolVersion: 5,
    clean: true,
    reconnectPeriod: 0,
    connectTimeout: timeoutMs,
  });
  try {
    await withTimeout(
      "MQTT",
      timeoutMs + 1_000,
      new Promise<void>((resolve, reject) => {
        client.once("connect", () => resolve());
        client.once("error", reject);
        client.once("close", () => reject(new Error("connection closed before CONNACK")));
      }),
    );
    const user = mqtt.username ?? decodeURIComponent(new URL(mqtt.url).username);
    const who = user ? ` as "${user}"` : " without credentials";
    add("mqtt", "OK", `broker ${where} accepted the connection${who} (MQTT 5)`);
  } catch (error) {
    const code = (error as { code?: number }).code;
    add(
      "mqtt",
      "FAIL",
      `broker ${where}: ${messageOf(error)}${
        code === 134 || code === 135 || code === 4 || code === 5
          ? " (check MQTT_USERNAME / MQTT_PASSWORD)"
          : ""
      }`,
    );
  } finally {
    await new Promise<void>((resolve) => client.end(true, {}, () => resolve()));
  }
}

function checkPort(
  check: string,
  host: string,
  port: number,
  busy: CheckStatus,
  add: Add,
  variable = "PORT",
): void {
  if (port === 0) {
    add(check, "OK", `${variable}=0: an ephemeral port is picked at start`);
    return;
  }
  try {
    const listener = Deno.listen({ hostname: host, port });
    listener.close();
    add(check, "OK", `${host}:${port} (${variable}) is free`);
  } catch (error) {
    const inUse = error instanceof Deno.errors.AddrInUse;
    add(
      check,
      busy,
      inUse
        ? `${host}:${port} (${variable}) is already in use (by a running gateway, or another ` +
          "process: start would fail)"
        : `${host}:${port} (${variable}) cannot be bound: ${messageOf(error)}`,
    );
  }
}

async function main(args: string[]): Promise<void> {
  const flags = parseFlags(args, {
    usage: USAGE,
    options: { json: { type: "boolean", default: false }, timeout: { type: "string" } },
  });
  const seconds = flags.timeout === undefined ? 5 : Number(flags.timeout);
  if (!Number.isFinite(seconds) || seconds <= 0 || seconds > 120) {
    console.error(`error: --timeout must be a number of seconds (0 < s <= 120)\n\n${USAGE}`);
    Deno.exit(EXIT_USAGE);
  }
  let config: Config;
  try {
    config = loadConfig(Deno.env.toObject(), {
      hostname: Deno.hostname().replace(/[^A-Za-z0-9._-]/g, "-").slice(0, 64),
    });
  } catch (error) {
    if (!(error instanceof ConfigError)) throw error;
    const message = redactText(error.message);
    if (flags.json) {
      console.log(JSON.stringify({
        ok: false,
        checks: [{ check: "config", status: "FAIL", detail: message }],
        variables: error.variables,
      }));
    } else {
      console.log(
        `FAIL  ${"config".padEnd(18)} ${message.replaceAll("\n", "\n" + " ".repeat(25))}`,
      );
    }
    Deno.exit(EXIT_USAGE);
  }
  const results = [
    {
      check: "config",
      status: "OK" as CheckStatus,
      detail: `valid; instance "${config.instanceId}", store ${
        config.database ? safeUrl(config.database.url) : `deno-kv:${config.kvPath}`
      }, bus ${config.redis ? `redis:${config.redis.spec.mode}` : "in-process"}, mqtt ${
        !config.mqtt.enabled ? "off" : config.mqtt.url ? safeUrl(config.mqtt.url) : "embedded"
      }`,
    },
    ...await runChecks(config, { timeoutMs: seconds * 1000 }),
  ];
  const failed = results.some((r) => r.status === "FAIL");
  if (flags.json) {
    console.log(JSON.stringify({ ok: !failed, checks: results }, null, 2));
  } else {
    for (const r of results) console.log(`${r.status.padEnd(5)} ${r.check.padEnd(18)} ${r.detail}`);
    const counts = (s: CheckStatus) => results.filter((r) => r.status === s).length;
    console.log(
      `\n${failed ? "FAILED" : "ready"}: ${counts("OK")} ok, ${counts("WARN")} warnings, ` +
        `${counts("FAIL")} failed`,
    );
  }
  Deno.exit(failed ? 1 : 0);
}

if (import.meta.main) await main(Deno.args);
