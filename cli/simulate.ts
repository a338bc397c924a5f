// `deno task simulate`: a fleet of meters publishing signed readings over MQTT, as firmware does.
import { Buffer } from "node:buffer";
import { connectAsync, type IClientOptions, type MqttClient } from "mqtt";
import { parseDuration } from "../core/duration.ts";
import { METER_ID_PATTERN } from "../core/reading.ts";
import { connectCredentials, readingPayload } from "../mqtt/device_credentials.ts";
import { env, fatal, parseFlags } from "./_args.ts";
import { ApiError, EXIT_FAILURE, GatewayClient, reportFailure, resolveUrl } from "./_client.ts";

const USAGE = `Usage: deno task simulate [options]

Simulates a fleet of smart meters publishing signed readings (QoS 1 by default) to
meters/<id>/readings and listening for the gateway's answers on meters/<id>/acks. Signs like
firmware: decimal-string kwh_amount, whole-second RFC 3339 UTC timestamps, HMAC-SHA256.

Each meter's readings are --interval apart, on a grid aligned to the interval (like a meter
reading at :00, :15, :30, :45), and within READING_MAX_AGE: with --count they end at the
current slot (oldest first, as a meter flushing its buffer); with --duration they walk back
from it. A rerun with the same meters within READING_MAX_AGE is therefore answered
"duplicate" for slots already sent: use another --prefix for a fresh fleet.

Meters and keys:
  --secrets FILE       CSV of meter_id,secret_hex (the output of device:import fits); meters
                       are taken from it, in order
  --provision          Register the meters that FILE lacks through the gateway's bulk import
                       (admin: --token/GATEWAY_TOKEN, or ADMIN_EMAIL and ADMIN_PASSWORD) and
                       append their secrets to FILE (created with mode 0600)
  --prefix P           Meter ids of provisioned meters: P0, P1, … (default sim-)
  --user-id ID         Owner of provisioned meters (default: the admin logging in)
  --url URL            Gateway base URL for --provision (env GATEWAY_URL; default
                       http://127.0.0.1:$PORT or :8080)
  --token JWT          Admin or operator bearer token (env GATEWAY_TOKEN)

Load:
  --meters N           Meters (default 100)
  --count C            Readings in total (default 4 per meter)
  --duration D         Publish for this long instead (30s, 5m, …)
  --interval D         Spacing of one meter's reading timestamps (default 15m); at least the
                       gateway's DEDUPE_WINDOW (read from the environment, default 15m)
  --rate R             Readings per second overall (default: as fast as acks allow)
  --inflight W         Unacknowledged publishes per connection (default 10 embedded,
                       1000 external)
  --qos 0|1            QoS of the readings (default 1)

Broker:
  --mode M             embedded (default; every meter connects as itself, CONNECT signed with
                       its key) or external (--connections shared connections; the default
                       when MQTT_URL is set)
  --broker URL         Default MQTT_URL in external mode, else mqtt://127.0.0.1:$MQTT_PORT
                       (1883)
  --connections K      Connections to spread the meters over, external mode (default 8);
                       embedded mode always uses one per meter
  --username U         External broker username
  --password P         External broker password (prefer env MQTT_PASSWORD: flags show in ps)

Output:
  --ack-timeout D      How long to wait for outstanding PUBACKs and acks at the end (default 10s)
  --json               Print the summary as JSON
  -h, --help           Show this help

Progress goes to stderr every second; the summary to stdout. Exits 0 when every reading was
answered accepted or duplicate, 1 when any was rejected, unanswered or failed to publish.`;

/** Oldest reading sent at least this long before READING_MAX_AGE would reject it. */
const AGE_MARGIN_MS = 10 * 60_000;
const IMPORT_CHUNK = 1000;
const MAX_RATE_LIMIT_WAITS = 10;
const SUBSCRIBE_CHUNK = 500;
// Below the embedded broker's default MQTT_MAX_CONNECTIONS_PER_ADDRESS (64 connecting at once).
const CONNECT_CONCURRENCY = 32;
const CSV_HEADER = ["meter_id", "key_id", "algorithm", "secret_hex", "error_code", "error_message"];

interface Meter {
  id: string;
  secret: Buffer;
  /** Readings this meter sends (in duration mode: the slots that fit in READING_MAX_AGE). */
  budget: number;
  /** Readings sent so far. */
  sent: number;
}

interface Connection {
  client: MqttClient;
  meters: Meter[];
  /** Round-robin position over `meters`. */
  cursor: number;
  inFlight: number;
}

interface Options {
  meters: number;
  count: number | null;
  durationMs: number | null;
  intervalMs: number;
  rate: number | null;
  inflight: number;
  qos: 0 | 1;
  mode: "embedded" | "external";
  broker: string;
  connections: number;
  username?: string;
  password?: string;
  ackTimeoutMs: number;
  json: boolean;
  secretsPath?: string;
  provision: boolean;
  prefix: string;
  userId?: string;
  url?: string;
  token?: string;
}

function parseOptions(args: string[]): Options {
  const flags = parseFlags(args, {
    usage: USAGE,
    options: {
      meters: { type: "string", default: "100" },
      count: { type: "string" },
      duration: { type: "string" },
      interval: { type: "string", default: "15m" },
      rate: { type: "string" },
      inflight: { type: "string" },
      qos: { type: "string", default: "1" },
      mode: { type: "string" },
      broker: { type: "string" },
      connections: { type: "string" },
      username: { type: "string" },
      password: { type: "string" },
      "ack-timeout": { type: "string", default: "10s" },
      json: { type: "boolean", default: false },
      secrets: { type: "string" },
      provision: { type: "boolean", default: false },
      prefix: { type: "string", default: "sim-" },
      "user-id": { type: "string" },
      url: { type: "string" },
      token: { type: "string" },
    },
  });
  const positiveInt = (text: string, flag: string): number => {
    const n = Number(text);
    if (!Number.isInteger(n) || n < 1) fatal(`--${flag} "${text}" must be a whole number ≥ 1`);
    return n;
  };
  const duration = (text: string, flag: string): number => {
    const ms = parseDuration(text);
    if (ms === undefined || ms <= 0) fatal(`--${flag} "${text}" is not a duration like 30s, 15m`);
    return ms;
  };
  const meters = positiveInt(flags.meters, "meters");
  if (flags.count !== undefined && flags.duration !== undefined) {
    fatal("Pass --count or --duration, not both");
  }
  const durationMs = flags.duration === undefined ? null : duration(flags.duration, "duration");
  const count = durationMs !== null
    ? null
    : flags.count === undefined
    ? meters * 4
    : positiveInt(flags.count, "count");
  const intervalMs = duration(flags.interval, "interval");
  if (intervalMs % 1000 !== 0) fatal("--interval must be whole seconds (timestamps are)");
  const rate = flags.rate === undefined ? null : Number(flags.rate);
  if (rate !== null && !(rate > 0)) fatal(`--rate "${flags.rate}" must be a positive number`);
  if (flags.qos !== "0" && flags.qos !== "1") fatal(`--qos "${flags.qos}" must be 0 or 1`);
  const mode = flags.mode ?? (env("MQTT_URL") ? "external" : "embedded");
  if (mode !== "embedded" && mode !== "external") {
    fatal(`--mode "${mode}" must be embedded or external`);
  }
  let connections = meters;
  if (flags.connections !== undefined) {
    connections = positiveInt(flags.connections, "connections");
    if (mode === "embedded" && connections !== meters) {
      fatal(
        "--connections is for external mode: on the embedded broker every meter connects as " +
          "itself (its CONNECT is signed with its own key), one connection per meter",
      );
    }
  } else if (mode === "external") {
    connections = 8;
  }
  connections = Math.min(connections, meters);
  if (mode === "embedded" && (flags.username !== undefined || flags.password !== undefined)) {
    fatal("--username/--password are for external mode; meters sign their own CONNECT");
  }
  const broker = flags.broker ??
    (mode === "external" && env("MQTT_URL")
      ? env("MQTT_URL")!
      : `mqtt://127.0.0.1:${env("MQTT_PORT") ?? "1883"}`);
  if (!/^(mqtts?|tcp|ssl|wss?):\/\/.+/.test(broker)) {
    fatal(`--broker "${broker}" must be an mqtt:// or mqtts:// URL`);
  }
  if (!flags.secrets) {
    fatal(
      flags.provision
        ? "--provision needs --secrets FILE: the gateway shows each secret only once"
        : "Pass --secrets FILE (meters and their secrets), with --provision to register them",
    );
  }
  if (!METER_ID_PATTERN.test(`${flags.prefix}0`) || `${flags.prefix}${meters}`.length > 64) {
    fatal(`--prefix "${flags.prefix}" does not make valid meter ids (A-Z a-z 0-9 . _ : -)`);
  }
  return {
    meters,
    count,
    durationMs,
    intervalMs,
    rate,
    inflight: flags.inflight === undefined
      ? (mode === "embedded" ? 10 : 1000)
      : positiveInt(flags.inflight, "inflight"),
    qos: flags.qos === "0" ? 0 : 1,
    mode,
    broker,
    connections,
    username: flags.username ?? (mode === "external" ? env("MQTT_USERNAME") : undefined),
    password: flags.password ?? (mode === "external" ? env("MQTT_PASSWORD") : undefined),
    ackTimeoutMs: duration(flags["ack-timeout"], "ack-timeout"),
    json: flags.json,
    secretsPath: flags.secrets,
    provision: flags.provision,
    prefix: flags.prefix,
    userId: flags["user-id"],
    url: flags.url,
    token: flags.token,
  };
}

// ---- secrets file ------------------------------------------------------------------------

/** RFC 4180 records (quoted fields may hold commas, doubled quotes and newlines). */
function parseCsv(text: string): string[][] {
  const records: string[][] = [];
  let fields: string[] = [];
  let field = "";
  let quoted = false;
  for (let i = text.charCodeAt(0) === 0xfeff ? 1 : 0; i < text.length; i++) {
    const ch = text[i];
    if (quoted) {
      if (ch === '"' && text[i + 1] === '"') {
        field += '"';
        i++;
      } else if (ch === '"') quoted = false;
      else field += ch;
    } else if (ch === '"') quoted = true;
    else if (ch === ",") {
      fields.push(field);
      field = "";
    } else if (ch === "\n" || ch === "\r") {
      if (ch === "\r" && text[i + 1] === "\n") i++;
      fields.push(field);
      records.push(fields);
      fields = [];
      field = "";
    } else field += ch;
  }
  if (field !== "" || fields.length > 0) records.push([...fields, field]);
  return records.filter((r) => r.length > 1 || r[0] !== "");
}

/** Meter id → HMAC secret (hex) from a secrets CSV; exits 2 when it is unusable. */
async function readSecrets(path: string): Promise<Map<string, string> | null> {
  let text: string;
  try {
    text = await Deno.readTextFile(path);
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return null;
    fatal(`Cannot read --secrets "${path}": ${(error as Error).message}`);
  }
  const [header, ...rows] = parseCsv(text);
  const idCol = header?.indexOf("meter_id") ?? -1;
  const secretCol = header?.indexOf("secret_hex") ?? -1;
  if (idCol < 0 || secretCol < 0) {
    fatal(`--secrets "${path}" needs a header with meter_id and secret_hex`);
  }
  const out = new Map<string, string>();
  for (const row of rows) {
    const id = row[idCol] ?? "", secret = row[secretCol] ?? "";
    if (secret === "") continue; // a failed import row, or an ed25519 meter
    if (!METER_ID_PATTERN.test(id) || !/^[0-9a-fA-F]{64}$/.test(secret)) {
      fatal(`--secrets "${path}": bad row for meter "${id}"`);
    }
    out.set(id, secret);
  }
  return out;
}

function csvLine(fields: string[]): string {
  return fields.map((v) => /[",\r\n]/.test(v) ? `"${v.replaceAll('"', '""')}"` : v).join(",") +
    "\n";
}

/** Appends issued keys to the secrets file (creating it with mode 0600 and a header). */
async function appendSecrets(
  path: string,
  issued: { meter_id: string; key_id: string; secret_hex: string }[],
): Promise<void> {
  if (issued.length === 0) return;
  const file = await Deno.open(path, { append: true, create: true, mode: 0o600 });
  try {
    const empty = (await file.stat()).size === 0;
    let text = empty ? csvLine(CSV_HEADER) : "";
    for (const k of issued) {
      text += csvLine([k.meter_id, k.key_id, "hmac-sha256", k.secret_hex, "", ""]);
    }
    const bytes = new TextEncoder().encode(text);
    let written = 0;
    while (written < bytes.length) written += await file.write(bytes.subarray(written));
    // The secrets exist nowhere else.
    await file.syncData();
  } finally {
    file.close();
  }
}

// ---- provisioning ------------------------------------------------------------------------

/** One entry of the bulk import's answer. */
interface ImportResult {
  meter_id: string;
  key_id?: string;
  secret_hex?: string;
  error?: { code: string; message: string };
}

/** Logs in as admin: --token/GATEWAY_TOKEN, else ADMIN_EMAIL/ADMIN_PASSWORD. */
async function adminLogin(o: Options): Promise<{ client: GatewayClient; userId: string }> {
  const url = resolveUrl(o.url);
  let token = o.token ?? env("GATEWAY_TOKEN");
  if (token === undefined) {
    const password = env("ADMIN_PASSWORD");
    if (password === undefined) {
      fatal("--provision needs admin credentials: --token, GATEWAY_TOKEN, or ADMIN_PASSWORD");
    }
    const email = env("ADMIN_EMAIL") ?? "admin@gridtokenx.local";
    const res = await new GatewayClient(url).request<{ access_token: string }>(
      "POST",
      "/api/auth/login",
      { body: { email, password } },
    );
    token = res.access_token;
  }
  let sub: unknown;
  try {
    sub = JSON.parse(atob(token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/"))).sub;
  } catch { /* not a JWT we can read */ }
  const userId = o.userId ?? (typeof sub === "string" ? sub : undefined);
  if (userId === undefined) fatal("Cannot tell the admin's user id from the token: pass --user-id");
  return { client: new GatewayClient(url, token), userId };
}

/** Registers `ids` in chunks, appending each chunk's secrets to the file before the next. */
async function provision(o: Options, ids: string[]): Promise<Map<string, string>> {
  const { client, userId } = await adminLogin(o);
  const out = new Map<string, string>();
  for (let i = 0; i < ids.length; i += IMPORT_CHUNK) {
    const devices = ids.slice(i, i + IMPORT_CHUNK).map((meter_id) => ({
      meter_id,
      user_id: userId,
      algorithm: "hmac-sha256",
    }));
    let results: ImportResult[];
    for (let attempt = 1;; attempt++) {
      try {
        ({ results } = await client.request<{ results: ImportResult[] }>(
          "POST",
          "/api/admin/devices/import",
          {
            body: { devices },
            timeoutMs: 300_000,
          },
        ));
        break;
      } catch (error) {
        if (
          !(error instanceof ApiError) || error.code !== "rate_limited" ||
          attempt >= MAX_RATE_LIMIT_WAITS
        ) throw error;
        const seconds = error.retryAfter ?? 60;
        progressNote(`rate limited (DEVICE_REGISTER_RATE_LIMIT); retrying in ${seconds} s`);
        await new Promise((resolve) => setTimeout(resolve, seconds * 1000));
      }
    }
    const issued = results.filter((r) => r.secret_hex && r.key_id) as {
      meter_id: string;
      key_id: string;
      secret_hex: string;
    }[];
    await appendSecrets(o.secretsPath!, issued);
    for (const k of issued) out.set(k.meter_id, k.secret_hex);
    const failed = results.filter((r) => !r.secret_hex);
    if (failed.length > 0) {
      const [first] = failed;
      const hint = first.error?.code === "conflict"
        ? ` (registered earlier, its secret is not in ${o.secretsPath}: use another --prefix)`
        : "";
      throw new ApiError(
        first.error?.code ?? "bad_response",
        `${failed.length} meters were not registered, e.g. "${first.meter_id}": ${
          first.error?.message ?? "no secret returned"
        }${hint}`,
        { status: 200 },
      );
    }
    progressNote(`provisioned ${i + devices.length}/${ids.length} meters`);
  }
  if (ids.length > 0) {
    console.error(
      `The secrets of ${ids.length} new meters were appended to ${o.secretsPath} (mode 0600); ` +
        "the gateway shows them only once.",
    );
  }
  return out;
}

/** The fleet's meters and secrets: from the file, provisioning what it lacks. */
async function loadFleet(o: Options): Promise<{ id: string; secret: Buffer }[]> {
  const known = await readSecrets(o.secretsPath!) ?? new Map<string, string>();
  const ids = [...known.keys()].slice(0, o.meters);
  if (ids.length < o.meters) {
    if (!o.provision) {
      fatal(
        `--secrets "${o.secretsPath}" holds ${known.size} meters, ${o.meters} wanted: ` +
          "pass --provision to register the rest, or lower --meters",
      );
    }
    const fresh: string[] = [];
    for (let i = 0; ids.length + fresh.length < o.meters; i++) {
      const id = `${o.prefix}${i}`;
      if (!known.has(id)) fresh.push(id);
    }
    const issued = await provision(o, fresh);
    for (const [id, secret] of issued) known.set(id, secret);
    ids.push(...fresh);
  }
  return ids.map((id) => ({ id, secret: Buffer.from(known.get(id)!, "hex") }));
}

// ---- the run -----------------------------------------------------------------------------

function progressNote(text: string): void {
  console.error(text);
}

function pct(sorted: Float64Array, p: number): number {
  return sorted.length ? sorted[Math.min(sorted.length - 1, Math.floor(sorted.length * p))] : NaN;
}

function isoSeconds(ms: number): string {
  return new Date(ms).toISOString().replace(".000Z", "Z");
}

/** Paces publishes at `rate`/s overall: reading i may go at start + i / rate. */
class Pacer {
  #rate: number;
  #start = performance.now();
  #issued = 0;
  #waiting: (() => void)[] = [];
  #timer: ReturnType<typeof setTimeout> | undefined;

  constructor(rate: number) {
    this.#rate = rate;
  }

  take(): boolean {
    const due = Math.floor((performance.now() - this.#start) * this.#rate / 1000) + 1;
    if (this.#issued >= due) return false;
    this.#issued++;
    return true;
  }

  /** Calls `wake` once a permit may be available. */
  wait(wake: () => void): void {
    this.#waiting.push(wake);
    if (this.#timer !== undefined) return;
    const at = this.#start + (this.#issued * 1000) / this.#rate;
    this.#timer = setTimeout(() => {
      this.#timer = undefined;
      const waiting = this.#waiting.splice(0);
      for (const w of waiting) w();
    }, Math.max(0, at - performance.now()));
  }

  stop(): void {
    clearTimeout(this.#timer);
    this.#waiting = [];
  }
}

interface Tally {
  sent: number;
  pubacked: number;
  publishErrors: number;
  accepted: number;
  duplicate: number;
  rejected: Record<string, number>;
  connectionErrors: number;
  reconnects: number;
}

/** How many readings each meter sends and which slot (intervals back from now) comes next. */
interface Plan {
  budgetOf: (m: number) => number;
  slotOf: (meter: Meter) => number;
}

/** Checks the timestamps the run needs against DEDUPE_WINDOW and READING_MAX_AGE (exits 2). */
function plan(o: Options): Plan {
  const maxAgeMs = parseDuration(env("READING_MAX_AGE") ?? "7d") ?? 7 * 86_400_000;
  const dedupeMs = parseDuration(env("DEDUPE_WINDOW") ?? "15m") ?? 15 * 60_000;
  if (o.intervalMs < dedupeMs) {
    fatal(
      `--interval ${o.intervalMs / 1000}s is shorter than DEDUPE_WINDOW (${dedupeMs / 1000}s): ` +
        "the gateway would answer a meter's readings closer than that with duplicate. " +
        "Raise --interval, or run gateway and simulator with a smaller DEDUPE_WINDOW",
    );
  }
  if (o.count !== null) {
    const base = Math.floor(o.count / o.meters), extra = o.count % o.meters;
    const most = base + (extra > 0 ? 1 : 0);
    if ((most - 1) * o.intervalMs > maxAgeMs - AGE_MARGIN_MS) {
      fatal(
        `${most} readings per meter, ${o.intervalMs / 1000}s apart, reach further back than ` +
          `READING_MAX_AGE (${maxAgeMs / 3_600_000} h): raise --meters or lower --count`,
      );
    }
    // Oldest first, ending at the current slot.
    return {
      budgetOf: (m) => base + (m < extra ? 1 : 0),
      slotOf: (meter) => meter.budget - 1 - meter.sent,
    };
  }
  const reach = maxAgeMs - o.durationMs! - AGE_MARGIN_MS;
  if (reach < 0) fatal("--duration must be shorter than READING_MAX_AGE");
  const slots = Math.floor(reach / o.intervalMs) + 1;
  // Newest first, walking back.
  return { budgetOf: () => slots, slotOf: (meter) => meter.sent };
}

async function run(o: Options): Promise<number> {
  const { budgetOf, slotOf } = plan(o);
  const fleet = await loadFleet(o);
  // Slot 0 is the current grid point; slots further back are older.
  const grid = Math.floor(Date.now() / o.intervalMs) * o.intervalMs;

  const t: Tally = {
    sent: 0,
    pubacked: 0,
    publishErrors: 0,
    accepted: 0,
    duplicate: 0,
    rejected: {},
    connectionErrors: 0,
    reconnects: 0,
  };
  let started = 0, lastPubackAt = 0, lastAckAt = 0;
  /** `meter|epoch ms` → publish time, until its ack arrives. */
  const awaitingAck = new Map<string, number>();
  const latencies: number[] = [];
  const connections: Connection[] = [];
  const decoder = new TextDecoder();

  const onAck = (topic: string, payload: Uint8Array) => {
    const meterId = topic.slice(7, -5); // meters/<id>/acks
    let ack: { reading_timestamp?: string | null; status?: string; code?: string };
    try {
      ack = JSON.parse(decoder.decode(payload));
    } catch {
      return;
    }
    const key = `${meterId}|${Date.parse(ack.reading_timestamp ?? "")}`;
    const sentAt = awaitingAck.get(key);
    if (sentAt === undefined) return; // not one of this run's readings
    awaitingAck.delete(key);
    lastAckAt = performance.now();
    if (ack.status === "accepted") {
      t.accepted++;
      latencies.push(performance.now() - sentAt);
    } else if (ack.status === "duplicate") {
      t.duplicate++;
    } else {
      const code = ack.code ?? "unknown";
      t.rejected[code] = (t.rejected[code] ?? 0) + 1;
    }
  };

  // ---- connect
  const groups: { id: string; secret: Buffer }[][] = Array.from(
    { length: o.connections },
    () => [],
  );
  fleet.forEach((meter, m) => groups[m % o.connections].push(meter));
  const tag = crypto.randomUUID().slice(0, 8);
  const failures: string[] = [];
  let nextGroup = 0;
  const connectOne = async (c: number) => {
    const group = groups[c];
    const embedded = o.mode === "embedded";
    const options: IClientOptions = {
      protocolVersion: 4,
      clean: true,
      // The embedded broker binds client ids to the meter: `<meter_id>/<suffix>`.
      clientId: embedded ? `${group[0].id}/sim-${tag}` : `gridtokenx-sim-${tag}-${c}`,
      connectTimeout: 15_000,
      reconnectPeriod: 1_000,
      ...(embedded
        ? connectCredentials(group[0].id, group[0].secret, {
          clientId: `${group[0].id}/sim-${tag}`,
        })
        : { username: o.username, password: o.password }),
    };
    let client: MqttClient;
    try {
      client = await connectAsync(o.broker, options);
    } catch (error) {
      failures.push(`${embedded ? group[0].id : `connection ${c}`}: ${(error as Error).message}`);
      return;
    }
    const conn: Connection = { client, meters: [], cursor: 0, inFlight: 0 };
    conn.meters = group.map((g, i) => ({ ...g, budget: budgetOf(c + i * o.connections), sent: 0 }));
    // Firmware should send its small packets at once: with Nagle on (the node:net default that
    // mqtt.js keeps), a PUBLISH behind an unacknowledged PUBACK waits for the delayed ACK.
    noDelay(client);
    client.on("connect", () => noDelay(client));
    client.on("message", onAck);
    client.on("error", () => t.connectionErrors++);
    client.on("reconnect", () => {
      t.reconnects++;
      // The CONNECT signature must be fresh (MQTT_CONNECT_MAX_AGE) and newer than the last one.
      if (embedded) {
        Object.assign(
          client.options,
          connectCredentials(group[0].id, group[0].secret, { clientId: client.options.clientId! }),
        );
      }
    });
    const topics = conn.meters.map((m) => `meters/${m.id}/acks`);
    for (let i = 0; i < topics.length; i += SUBSCRIBE_CHUNK) {
      await client.subscribeAsync(topics.slice(i, i + SUBSCRIBE_CHUNK), { qos: 1 });
    }
    connections.push(conn);
  };
  await Promise.all(
    Array.from({ length: Math.min(CONNECT_CONCURRENCY, o.connections) }, async () => {
      while (nextGroup < groups.length) await connectOne(nextGroup++);
    }),
  );
  const closeAll = () =>
    Promise.all(connections.map((c) => c.client.endAsync(true).catch(() => {})));
  if (failures.length > 0) {
    await closeAll();
    console.error(
      `error: ${failures.length} of ${o.connections} connections to ${o.broker} failed, e.g.\n  ` +
        failures.slice(0, 5).join("\n  "),
    );
    return EXIT_FAILURE;
  }

  // ---- publish
  const pacer = o.rate === null ? null : new Pacer(o.rate);
  started = lastPubackAt = lastAckAt = performance.now();
  const deadline = o.durationMs === null ? Infinity : started + o.durationMs;
  let stopping = false;
  const allSent = Promise.withResolvers<void>();
  let outstanding = 0;
  /** Readings not yet published. */
  let remaining = connections.reduce(
    (n, c) => n + c.meters.reduce((k, m) => k + m.budget, 0),
    0,
  );

  const pump = (conn: Connection) => {
    while (!stopping && conn.inFlight < o.inflight) {
      if (performance.now() >= deadline) return stop();
      const meter = nextMeter(conn);
      if (meter === null) break;
      if (pacer && !pacer.take()) {
        pacer.wait(() => pump(conn));
        return;
      }
      publish(conn, meter);
    }
    if (remaining === 0) allSent.resolve();
  };
  const nextMeter = (conn: Connection): Meter | null => {
    for (let i = 0; i < conn.meters.length; i++) {
      const meter = conn.meters[conn.cursor];
      conn.cursor = (conn.cursor + 1) % conn.meters.length;
      if (meter.sent < meter.budget) return meter;
    }
    return null;
  };
  const publish = (conn: Connection, meter: Meter) => {
    const ts = grid - slotOf(meter) * o.intervalMs;
    meter.sent++;
    remaining--;
    // Canonical form (no trailing zeros): the gateway refuses "1.230".
    const kwh = String(Number((0.1 + Math.random() * 2.4).toFixed(3)));
    const payload = readingPayload(meter.id, meter.secret, isoSeconds(ts), kwh);
    awaitingAck.set(`${meter.id}|${ts}`, performance.now());
    t.sent++;
    conn.inFlight++;
    outstanding++;
    conn.client.publish(`meters/${meter.id}/readings`, payload, { qos: o.qos }, (error) => {
      conn.inFlight--;
      outstanding--;
      if (error) t.publishErrors++;
      else t.pubacked++;
      lastPubackAt = performance.now();
      pump(conn);
    });
  };
  const stop = () => {
    stopping = true;
    pacer?.stop();
    allSent.resolve();
  };
  const onSigint = () => (stopping ? Deno.exit(130) : stop());
  Deno.addSignalListener("SIGINT", onSigint);
  const timer = o.durationMs === null ? undefined : setTimeout(stop, o.durationMs);

  // ---- progress
  const tty = Deno.stderr.isTerminal();
  let last = { at: started, sent: 0, acked: 0 };
  const line = () => {
    const at = performance.now();
    const acked = t.accepted + t.duplicate + rejectedCount(t);
    const dt = (at - last.at) / 1000;
    const text = `[${((at - started) / 1000).toFixed(0)}s] sent ${fmt(t.sent)} · ` +
      `${o.qos === 1 ? "PUBACKed" : "written"} ${fmt(t.pubacked)} · accepted ${
        fmt(t.accepted)
      } · ` +
      `duplicate ${fmt(t.duplicate)} · rejected ${fmt(rejectedCount(t))} · in flight ${
        fmt(outstanding)
      } · ${fmt((t.sent - last.sent) / dt)} sent/s, ${fmt((acked - last.acked) / dt)} acks/s`;
    last = { at, sent: t.sent, acked };
    Deno.stderr.writeSync(new TextEncoder().encode(tty ? `\r\x1b[2K${text}` : `${text}\n`));
  };
  const ticker = setInterval(line, 1000);

  for (const conn of connections) pump(conn);
  await allSent.promise;
  clearTimeout(timer);
  // Wait (bounded) for PUBACKs and then for the acks of what was published.
  const waitUntil = async (done: () => boolean) => {
    const end = performance.now() + o.ackTimeoutMs;
    while (!done() && performance.now() < end) await new Promise((r) => setTimeout(r, 20));
  };
  await waitUntil(() => outstanding === 0);
  await waitUntil(() => awaitingAck.size === 0);
  clearInterval(ticker);
  line();
  if (tty) Deno.stderr.writeSync(new TextEncoder().encode("\n"));
  Deno.removeSignalListener("SIGINT", onSigint);
  pacer?.stop();
  await closeAll();

  // ---- summary
  const sorted = Float64Array.from(latencies).sort();
  // Until the last PUBACK (QoS 1) or write (QoS 0), and until the last ack.
  const seconds = Math.max(1e-3, (lastPubackAt - started) / 1000);
  const ackSeconds = Math.max(1e-3, (lastAckAt - started) / 1000);
  const summary = {
    mode: o.mode,
    broker: o.broker.replace(/\/\/[^@/]*@/, "//***@"),
    meters: fleet.length,
    connections: connections.length,
    qos: o.qos,
    interval_s: o.intervalMs / 1000,
    sent: t.sent,
    pubacked: o.qos === 1 ? t.pubacked : undefined,
    publish_errors: t.publishErrors,
    acks: { accepted: t.accepted, duplicate: t.duplicate, rejected: t.rejected },
    unanswered: awaitingAck.size,
    seconds: round(seconds, 2),
    send_rate: round(t.sent / seconds, 0),
    accepted_rate: round(t.accepted / ackSeconds, 0),
    latency_ms: {
      p50: round(pct(sorted, 0.5), 1),
      p95: round(pct(sorted, 0.95), 1),
      p99: round(pct(sorted, 0.99), 1),
      max: round(sorted.at(-1) ?? NaN, 1),
    },
    connection_errors: t.connectionErrors,
    reconnects: t.reconnects,
  };
  if (o.json) {
    console.log(JSON.stringify(summary, null, 2));
  } else {
    const l = summary.latency_ms;
    console.log(
      [
        `${fmt(t.sent)} readings from ${fmt(fleet.length)} meters over ${connections.length} ` +
        `connection(s) (${o.mode}, ${summary.broker}, QoS ${o.qos}), ` +
        `${o.qos === 1 ? "PUBACKed" : "written"} within ${seconds.toFixed(2)} s: ` +
        `${fmt(summary.send_rate)}/s; accepted ${fmt(summary.accepted_rate)}/s`,
        `acks: ${fmt(t.accepted)} accepted, ${fmt(t.duplicate)} duplicate, ` +
        `${fmt(rejectedCount(t))} rejected${
          rejectedCount(t) ? ` ${JSON.stringify(t.rejected)}` : ""
        }, ${fmt(awaitingAck.size)} unanswered` +
        (o.qos === 1 ? `; ${fmt(t.pubacked)} PUBACKed` : "") +
        (t.publishErrors ? `, ${fmt(t.publishErrors)} publish errors` : ""),
        t.accepted === 0
          ? "publish→accepted ack: no reading was accepted"
          : `publish→accepted ack: p50 ${l.p50} ms, p95 ${l.p95} ms, p99 ${l.p99} ms, ` +
            `max ${l.max} ms`,
        ...(t.reconnects || t.connectionErrors
          ? [`connections: ${t.connectionErrors} errors, ${t.reconnects} reconnects`]
          : []),
      ].join("\n"),
    );
  }
  const ok = rejectedCount(t) === 0 && awaitingAck.size === 0 && t.publishErrors === 0;
  return ok ? 0 : EXIT_FAILURE;
}

function noDelay(client: MqttClient): void {
  (client.stream as unknown as { setNoDelay?: (on: boolean) => void }).setNoDelay?.(true);
}

function rejectedCount(t: Tally): number {
  return Object.values(t.rejected).reduce((a, b) => a + b, 0);
}

function fmt(n: number): string {
  return Number.isFinite(n) ? Math.round(n).toLocaleString("en-US") : "-";
}

function round(n: number, digits: number): number {
  const f = 10 ** digits;
  return Math.round(n * f) / f;
}

if (import.meta.main) {
  const options = parseOptions(Deno.args);
  let code: number;
  try {
    code = await run(options);
  } catch (error) {
    reportFailure(error);
    code = EXIT_FAILURE;
  }
  Deno.exit(code);
}
