// deno task bench:batch — batch ingestion into PostgreSQL, in one run (README "Batch
// ingestion"; the gateway is main.ts as a child process on a schema of its own):
//   1. throughput: 100 batches of 1,000 readings from 8 concurrent clients, rows/s and the
//      gateway's CPU per reading; then raw COPY of exactly the rows they stored, 1,000 rows a
//      statement, into a scratch table with the same indexes (`LIKE meter_readings INCLUDING
//      ALL`), on 1 and on 2 connections: the ratio gateway/COPY;
//   2. latency: single batches of 1,000, one at a time, from the POST to `finished_at`;
//   3. one batch of 10,000;
//   4. single-reading MQTT latency while batches run: a device on a private Mosquitto (the
//      gateway on MQTT_URL) publishes one reading every 50 ms at QoS 1 and times publish → ack on
//      `meters/<id>/acks`, before the batches (idle) and during phase 1 (same run).
// Readings are signed up front (the devices' and head-ends' signing is not what is measured).
import { Buffer } from "node:buffer";
import net from "node:net";
import { once } from "node:events";
import postgres from "postgres";
import { connectAsync, type MqttClient } from "mqtt";
import { canonicalMessage, signHmac } from "../core/signature.ts";
import { readingPayload } from "../mqtt/device_credentials.ts";
import { fatal, parseFlags } from "../cli/_args.ts";
import { api, type GatewayProcess, spawnGateway } from "./_spawn.ts";
import { cpuMs, delay, fmt, loadAverage, machineMs, pct } from "./_cluster.ts";
import { createTestSchema, postgresUrl } from "../tests/_services.ts";
import { startMosquitto } from "../tests/_mosquitto.ts";

const SLOT_MS = 15 * 60_000; // DEDUPE_WINDOW (default): a meter's readings are this far apart
const ADMIN = { email: "bench@gridtokenx.local", password: "bench-password-1" };
/** Guards against hangs only: every wait below ends when the jobs have finished. */
const JOB_TIMEOUT_MS = 600_000;
const FINISHED = new Set(["completed", "failed", "dead"]);

const HELP = `Usage: deno task bench:batch [options]

Batch ingestion into PostgreSQL through the real gateway (main.ts), with raw COPY of the same
rows as the baseline and single-reading MQTT latency while batches run. BATCH_* and WRITER_*
in the environment reach the gateway.

  --batches N       Batches of the throughput phase (default 100)
  --size S          Readings per batch (default 1000)
  --clients C       Concurrent submitting clients (default 8)
  --meters M        Meters the batches use (default 5000)
  --latency-runs R  Single batches timed one at a time (default 20)
  --big B           Readings of the one large batch (default 10000; 0 = skip)
  --idle-seconds T  MQTT latency without batches (default 10)
  --database-url U  PostgreSQL server (default TEST_DATABASE_URL or the local one)`;

// deno-lint-ignore no-explicit-any -- API answers of many shapes
type Json = any;

interface Meter {
  id: string;
  secret: Buffer;
}

function isoSeconds(ms: number): string {
  return new Date(Math.floor(ms / 1000) * 1000).toISOString().replace(".000Z", "Z");
}

function randomHex(): string {
  return Buffer.from(crypto.getRandomValues(new Uint8Array(32))).toString("hex");
}

function log(line: string): void {
  console.log(line);
}

/**
 * Readings g = 0, 1, 2 … of the batches: meter g % M, slot ⌊g / M⌋ (15 minutes apart, back from
 * `base`), so no two readings of a meter collide and every batch spans many meters.
 */
class Readings {
  #next = 0;
  constructor(readonly meters: Meter[], readonly base: number) {}

  /** The next `n` readings, signed, as the JSON text of a batch body. */
  body(n: number): string {
    const M = this.meters.length;
    const out: string[] = new Array(n);
    for (let i = 0; i < n; i++) {
      const g = this.#next++;
      const meter = this.meters[g % M];
      const ts = isoSeconds(this.base - Math.floor(g / M) * SLOT_MS);
      const kwh = String(Number((1 + (g % 997) / 100).toFixed(2)));
      const device_signature = signHmac(meter.secret, canonicalMessage(meter.id, ts, kwh));
      out[i] = JSON.stringify({
        meter_id: meter.id,
        kwh_amount: kwh,
        reading_timestamp: ts,
        device_signature,
      });
    }
    return `{"readings":[${out.join(",")}]}`;
  }

  get used(): number {
    return this.#next;
  }
}

/** POSTs a batch body; returns the job id and the time from send to the 202, ms. */
async function submit(gw: GatewayProcess, token: string, body: string) {
  const t0 = performance.now();
  const sentAt = Date.now();
  const res = await fetch(`${gw.url}/api/meters/submit-readings-batch`, {
    method: "POST",
    headers: { "content-type": "application/json", authorization: `Bearer ${token}` },
    body,
  });
  const text = await res.text();
  if (res.status !== 202) throw new Error(`batch submission: ${res.status} ${text.slice(0, 500)}`);
  return { id: JSON.parse(text).job_id as string, sentAt, ms: performance.now() - t0 };
}

/** Polls the caller's job listing until every job of `ids` has finished; returns them by id. */
async function awaitJobs(
  gw: GatewayProcess,
  token: string,
  ids: Set<string>,
  pollMs: number,
): Promise<Map<string, Json>> {
  const deadline = Date.now() + JOB_TIMEOUT_MS;
  for (;;) {
    const done = new Map<string, Json>();
    if (ids.size === 1) {
      const [id] = ids;
      const job = await api(gw, `/api/meters/batches/${id}`, undefined, token);
      if (FINISHED.has(job.status)) done.set(id, job);
    } else {
      const page = await api(gw, "/api/meters/batches?limit=1000", undefined, token);
      for (const job of page.items) {
        if (ids.has(job.job_id) && FINISHED.has(job.status)) done.set(job.job_id, job);
      }
    }
    if (done.size === ids.size) return done;
    if (Date.now() > deadline) throw new Error(`${ids.size - done.size} jobs did not finish`);
    await delay(pollMs);
  }
}

/** Every job completed with all its readings stored; throws otherwise. */
function checkJobs(jobs: Map<string, Json>, size: number): void {
  for (const job of jobs.values()) {
    if (job.status !== "completed" || job.successful !== size) {
      throw new Error(`job ${job.job_id}: ${JSON.stringify(job)}`);
    }
  }
}

/** The CPU of the gateway and of the machine around a phase. */
class CpuWindow {
  #gw0: number;
  #m0: { busy: number; total: number };
  constructor(readonly pid: number) {
    this.#gw0 = cpuMs(pid);
    this.#m0 = machineMs();
  }
  /** Gateway CPU ms, and the machine's busy share (0–1) since the start. */
  read(): { gatewayMs: number; machineBusy: number } {
    const m = machineMs();
    return {
      gatewayMs: cpuMs(this.pid) - this.#gw0,
      machineBusy: (m.busy - this.#m0.busy) / Math.max(1, m.total - this.#m0.total),
    };
  }
}

// ---- the MQTT device -------------------------------------------------------------------------

/** A device publishing one reading every `everyMs` (QoS 1) and timing each to its ack. */
class Device implements AsyncDisposable {
  #client: MqttClient;
  #meters: Meter[];
  #base: number;
  #n = 0;
  #sent = new Map<string, { at: number; phase: string }>();
  #timer: ReturnType<typeof setInterval> | undefined;
  phase = "idle";
  readonly latencies = new Map<string, number[]>();
  readonly problems = new Map<string, number>();

  private constructor(client: MqttClient, meters: Meter[], base: number) {
    this.#client = client;
    this.#meters = meters;
    this.#base = base;
    client.on("message", (topic, payload) => this.#acked(topic, payload));
  }

  static async connect(url: string, meters: Meter[], base: number): Promise<Device> {
    const client = await connectAsync(url, {
      protocolVersion: 4,
      clientId: `bench-device-${crypto.randomUUID().slice(0, 8)}`,
      clean: true,
      reconnectPeriod: 0,
    });
    // Nagle off, as in bench:mqtt: the device should not add its own TCP stalls.
    (client.stream as unknown as { setNoDelay?: (on: boolean) => void }).setNoDelay?.(true);
    await client.subscribeAsync(meters.map((m) => `meters/${m.id}/acks`), { qos: 1 });
    return new Device(client, meters, base);
  }

  start(everyMs: number): void {
    this.#timer = setInterval(() => this.#publish(), everyMs);
  }

  stop(): void {
    clearInterval(this.#timer);
  }

  /** Waits until every reading sent has its ack (bounded). */
  async drain(timeoutMs = 30_000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (this.#sent.size > 0 && Date.now() < deadline) await delay(20);
    for (const { phase } of this.#sent.values()) this.#problem(phase, "no ack");
    this.#sent.clear();
  }

  #publish(): void {
    const D = this.#meters.length;
    const n = this.#n++;
    const meter = this.#meters[n % D];
    const ts = isoSeconds(this.#base - Math.floor(n / D) * SLOT_MS);
    const kwh = String(Number((1 + (n % 97) / 100).toFixed(2)));
    this.#sent.set(`${meter.id}@${ts}`, { at: performance.now(), phase: this.phase });
    this.#client.publishAsync(
      `meters/${meter.id}/readings`,
      readingPayload(meter.id, meter.secret, ts, kwh),
      { qos: 1 },
    ).catch(() => this.#problem(this.phase, "publish failed"));
  }

  #acked(topic: string, payload: Uint8Array): void {
    const now = performance.now();
    const meterId = topic.split("/")[1];
    let ack: { reading_timestamp?: string; status?: string; code?: string };
    try {
      ack = JSON.parse(new TextDecoder().decode(payload));
    } catch {
      return;
    }
    const key = `${meterId}@${ack.reading_timestamp}`;
    const sent = this.#sent.get(key);
    if (sent === undefined) return;
    this.#sent.delete(key);
    if (ack.status !== "accepted") {
      this.#problem(sent.phase, ack.code ?? ack.status ?? "?");
      return;
    }
    const list = this.latencies.get(sent.phase) ?? [];
    list.push(now - sent.at);
    this.latencies.set(sent.phase, list);
  }

  #problem(phase: string, what: string): void {
    const key = `${phase}: ${what}`;
    this.problems.set(key, (this.problems.get(key) ?? 0) + 1);
  }

  async [Symbol.asyncDispose](): Promise<void> {
    this.stop();
    await this.#client.endAsync();
  }
}

/** Waits until the gateway consumes from the broker (its ack arrives for a probe). */
async function waitForIngress(url: string): Promise<void> {
  const probe = await connectAsync(url, { protocolVersion: 4, clientId: "bench-probe" });
  try {
    let done = false;
    probe.on("message", () => done = true);
    await probe.subscribeAsync("meters/bench-probe/acks", { qos: 1 });
    const deadline = Date.now() + 30_000;
    while (!done) {
      if (Date.now() > deadline) throw new Error("the gateway never consumed a probe");
      await probe.publishAsync("meters/bench-probe/readings", "probe", { qos: 1 });
      await delay(200);
    }
  } finally {
    await probe.endAsync();
  }
}

// ---- COPY baseline -----------------------------------------------------------------------------

/** A TCP connection with Nagle off (see bench/db_bench.ts: a COPY's CopyDone would wait ~40 ms). */
function noDelaySocket(url: string): () => Promise<net.Socket> {
  const parsed = new URL(url);
  const port = parsed.port === "" ? 5432 : Number(parsed.port);
  return async () => {
    const socket = net.connect(port, parsed.hostname);
    socket.setNoDelay(true);
    await once(socket, "connect");
    return socket;
  };
}

/**
 * The stored rows of `jobIds` in COPY text format, cut into statements of `size` rows (every
 * column as its text output; the values hold no tab, newline or backslash).
 */
async function storedRows(
  sql: postgres.Sql,
  columns: string[],
  jobIds: string[],
  size: number,
): Promise<string[]> {
  const fields = columns.map((c) => `coalesce(${c}::text, '\\N')`).join(", ");
  const rows = await sql.unsafe<{ line: string }[]>(
    `SELECT concat_ws(E'\\t', ${fields}) AS line FROM meter_readings
      WHERE batch_job_id = ANY($1::text[]) ORDER BY batch_job_id, meter_id`,
    [jobIds],
  );
  const out: string[] = [];
  for (let i = 0; i < rows.length; i += size) {
    out.push(rows.slice(i, i + size).map((r) => r.line).join("\n") + "\n");
  }
  return out;
}

/** COPYs `chunks` into a fresh scratch table on `connections` connections; rows/s. */
async function copyPhase(
  sql: postgres.Sql,
  columns: string[],
  chunks: string[],
  connections: number,
): Promise<{ rows: number; ms: number; load: string }> {
  await sql`DROP TABLE IF EXISTS scratch`;
  await sql`CREATE TABLE scratch (LIKE meter_readings INCLUDING ALL)`;
  let next = 0;
  const t0 = performance.now();
  await Promise.all(Array.from({ length: connections }, async () => {
    while (next < chunks.length) {
      const text = chunks[next++];
      const stream = await sql.unsafe(`COPY scratch (${columns.join(", ")}) FROM STDIN`)
        .writable();
      await new Promise<void>((resolve, reject) => {
        stream.on("error", reject);
        stream.on("finish", resolve);
        stream.write(text);
        stream.end();
      });
    }
  }));
  const ms = performance.now() - t0;
  const [{ n }] = await sql<{ n: number }[]>`SELECT count(*)::float8 AS n FROM scratch`;
  await sql`DROP TABLE scratch`;
  return { rows: n, ms, load: loadAverage() };
}

// ---- the run -----------------------------------------------------------------------------------

function summary(xs: number[]): string {
  const s = [...xs].sort((a, b) => a - b);
  return `p50 ${fmt(pct(s, 0.5), 1)} / p95 ${fmt(pct(s, 0.95), 1)} / p99 ${
    fmt(pct(s, 0.99), 1)
  } / max ${fmt(s.at(-1) ?? NaN, 1)} ms (n=${s.length})`;
}

async function main(): Promise<void> {
  const flags: Record<string, string | undefined> = parseFlags(Deno.args, {
    usage: HELP,
    options: Object.fromEntries(
      [
        "batches",
        "size",
        "clients",
        "meters",
        "latency-runs",
        "big",
        "idle-seconds",
        "database-url",
      ]
        .map((name) => [name, { type: "string" }]),
    ) as Record<string, { type: "string" }>,
  });
  const num = (name: string, fallback: number) => {
    const v = flags[name] === undefined ? fallback : Number(flags[name]);
    if (!Number.isSafeInteger(v) || v < 0) fatal(`--${name} must be a non-negative integer`);
    return v;
  };
  const BATCHES = num("batches", 100);
  const SIZE = num("size", 1000);
  const CLIENTS = num("clients", 8);
  const M = num("meters", 5000);
  const RUNS = num("latency-runs", 20);
  const BIG = num("big", 10_000);
  const IDLE_S = num("idle-seconds", 10);
  const DEVICE_METERS = 20;
  const warm = 4;
  const total = (warm + BATCHES + RUNS) * SIZE + BIG;
  if (Math.ceil(total / M) * SLOT_MS > 6.5 * 86_400_000) {
    fatal(`${fmt(total)} readings over ${M} meters do not fit in READING_MAX_AGE: add --meters`);
  }

  const schema = await createTestSchema(flags["database-url"] || postgresUrl());
  await using _schema = { [Symbol.asyncDispose]: () => schema.drop() };
  await using mosquitto = await startMosquitto();
  await using gw = await spawnGateway({
    DATABASE_URL: schema.url,
    JWT_SECRET: randomHex(),
    DEVICE_KEY_ENCRYPTION_KEY: randomHex(),
    ADMIN_EMAIL: ADMIN.email,
    ADMIN_PASSWORD: ADMIN.password,
    MQTT_URL: mosquitto.url,
    MQTT_CLIENT_ID: "bench-batch-gateway",
    // A meter's whole backlog arrives at once here: no bucket may refuse it.
    METER_RATE_BURST: "1000000",
    METER_RATE_PER_MINUTE: "1000000",
    BATCH_MAX_SIZE: String(Math.max(SIZE, BIG, 1000)),
    DEVICE_REGISTER_RATE_LIMIT: "100000",
    LOGIN_RATE_LIMIT: "100000",
    LOG_LEVEL: "info",
  });
  const pid = gw.child.pid;
  await waitForIngress(mosquitto.url);

  const { access_token: admin } = await api(gw, "/api/auth/login", ADMIN);
  const user = await api(gw, "/api/admin/users", {
    email: "head-end@bench.local",
    password: "Meter-backlog-pw-7x2q",
    role: "user",
  }, admin);
  const { access_token: token } = await api(gw, "/api/auth/login", {
    email: "head-end@bench.local",
    password: "Meter-backlog-pw-7x2q",
  });
  const ids = [
    ...Array.from({ length: M }, (_, i) => `bm-${i}`),
    ...Array.from({ length: DEVICE_METERS }, (_, i) => `dev-${i}`),
  ];
  const secrets = new Map<string, Buffer>();
  const tProvision = performance.now();
  for (let i = 0; i < ids.length; i += 1000) {
    const devices = ids.slice(i, i + 1000).map((meter_id) => ({
      meter_id,
      user_id: user.id,
      algorithm: "hmac-sha256",
    }));
    const { results } = await api(gw, "/api/admin/devices/import", { devices }, admin);
    for (const r of results) secrets.set(r.meter_id, Buffer.from(r.secret_hex, "hex"));
  }
  const meterOf = (id: string): Meter => ({ id, secret: secrets.get(id)! });
  const now = Date.now();
  const readings = new Readings(ids.slice(0, M).map(meterOf), now - 60_000);
  log(
    `gateway main.ts (pid ${pid}) on PostgreSQL schema ${schema.name} (dropped at the end), ` +
      `Mosquitto ${mosquitto.url}; ${fmt(ids.length)} meters provisioned in ${
        ((performance.now() - tProvision) / 1000).toFixed(1)
      } s; BATCH_WORKER_CONCURRENCY=${Deno.env.get("BATCH_WORKER_CONCURRENCY") ?? "2 (default)"}`,
  );
  log(`load average before: ${loadAverage()}`);

  await using device = await Device.connect(
    mosquitto.url,
    ids.slice(M).map(meterOf),
    now - 30_000,
  );

  // Warm-up (JIT, connections, actors of the first meters), not counted.
  {
    const jobs = new Set<string>();
    for (let i = 0; i < warm; i++) jobs.add((await submit(gw, token, readings.body(SIZE))).id);
    checkJobs(await awaitJobs(gw, token, jobs, 100), SIZE);
  }

  // 4a. MQTT alone.
  device.phase = "idle";
  device.start(50);
  const idleLoad0 = loadAverage();
  await delay(IDLE_S * 1000);
  const idleLoad = loadAverage();

  // 1. Throughput, with the device still publishing.
  const bodies = Array.from({ length: BATCHES }, () => readings.body(SIZE));
  device.phase = "batches";
  const load0 = loadAverage();
  const cpu = new CpuWindow(pid);
  const t0 = Date.now();
  const submitMs: number[] = [];
  const jobIds: string[] = [];
  let next = 0;
  await Promise.all(Array.from({ length: CLIENTS }, async () => {
    while (next < bodies.length) {
      const body = bodies[next++];
      const r = await submit(gw, token, body);
      submitMs.push(r.ms);
      jobIds.push(r.id);
    }
  }));
  const tSubmitted = Date.now();
  const jobs = await awaitJobs(gw, token, new Set(jobIds), 200);
  const used = cpu.read();
  device.phase = "after";
  const load1 = loadAverage();
  checkJobs(jobs, SIZE);
  const tEnd = Math.max(...[...jobs.values()].map((j) => Date.parse(j.finished_at)));
  const stored = BATCHES * SIZE;
  const elapsed = (tEnd - t0) / 1000;
  const rate = stored / elapsed;
  device.stop();
  await device.drain();

  log("");
  log(
    `1. ${BATCHES} batches of ${fmt(SIZE)} from ${CLIENTS} clients: ${fmt(stored)} rows in ${
      elapsed.toFixed(2)
    } s → ${fmt(rate)} rows/s; gateway CPU ${fmt((used.gatewayMs * 1000) / stored)} µs/reading ` +
      `(${fmt(used.gatewayMs)} ms), machine ${(used.machineBusy * 100).toFixed(0)}% busy; ` +
      `all submitted after ${((tSubmitted - t0) / 1000).toFixed(2)} s; 202 ${summary(submitMs)}; ` +
      `load ${load0} → ${load1}`,
  );

  // 1b. COPY of exactly those rows.
  // (postgres.js takes `socket` but does not declare it: passed as a variable, as db_bench does.)
  const poolOptions = { max: 2, onnotice: () => {}, socket: noDelaySocket(schema.url) };
  const sql = postgres(schema.url, poolOptions);
  let copy1, copy2;
  try {
    const columns = (await sql<{ c: string }[]>`
      SELECT column_name AS c FROM information_schema.columns
      WHERE table_schema = ${schema.name} AND table_name = 'meter_readings'
      ORDER BY ordinal_position`).map((r) => r.c);
    const chunks = await storedRows(sql, columns, jobIds, SIZE);
    await sql`CHECKPOINT`.catch(() => {});
    copy1 = await copyPhase(sql, columns, chunks, 1);
    await sql`CHECKPOINT`.catch(() => {});
    copy2 = await copyPhase(sql, columns, chunks, 2);
  } finally {
    await sql.end({ timeout: 5 });
  }
  const c1 = copy1.rows / (copy1.ms / 1000), c2 = copy2.rows / (copy2.ms / 1000);
  log(
    `   raw COPY of the same ${fmt(copy1.rows)} rows into scratch (LIKE meter_readings INCLUDING ` +
      `ALL), ${fmt(SIZE)} rows a COPY: 1 connection ${fmt(c1)} rows/s (load ${copy1.load}), ` +
      `2 connections ${fmt(c2)} rows/s (load ${copy2.load}); ratio gateway/COPY ${
        (rate / c1).toFixed(2)
      } (1 conn), ${(rate / c2).toFixed(2)} (2 conns); goal ≥ 0.5`,
  );

  // 2. One batch at a time: submission → completed.
  const latencies: number[] = [];
  const cpu2 = new CpuWindow(pid);
  const load2 = loadAverage();
  for (let i = 0; i < RUNS; i++) {
    const body = readings.body(SIZE);
    const r = await submit(gw, token, body);
    const job = (await awaitJobs(gw, token, new Set([r.id]), 5)).get(r.id)!;
    checkJobs(new Map([[r.id, job]]), SIZE);
    latencies.push(Date.parse(job.finished_at) - r.sentAt);
  }
  const used2 = cpu2.read();
  log(
    `2. single batches of ${fmt(SIZE)}, one at a time, POST → finished_at: ${
      summary(latencies)
    }; gateway CPU ${
      fmt((used2.gatewayMs * 1000) / (RUNS * SIZE))
    } µs/reading; load ${load2} → ${loadAverage()} (target p95 < 500 ms)`,
  );

  // 3. One batch of BIG.
  if (BIG > 0) {
    const body = readings.body(BIG);
    const load3 = loadAverage();
    const cpu3 = new CpuWindow(pid);
    const r = await submit(gw, token, body);
    const job = (await awaitJobs(gw, token, new Set([r.id]), 20)).get(r.id)!;
    checkJobs(new Map([[r.id, job]]), BIG);
    const used3 = cpu3.read();
    const ms = Date.parse(job.finished_at) - r.sentAt;
    log(
      `3. one batch of ${fmt(BIG)} (${fmt(body.length / 1e6, 1)} MB): 202 after ${
        fmt(r.ms, 0)
      } ms, completed after ${fmt(ms)} ms → ${fmt(BIG / (ms / 1000))} rows/s; gateway CPU ${
        fmt((used3.gatewayMs * 1000) / BIG)
      } µs/reading; load ${load3} → ${loadAverage()}`,
    );
  }

  // 4. The device's latencies.
  log(
    `4. MQTT, one reading every 50 ms at QoS 1, publish → ack: without batches (${IDLE_S} s, load ` +
      `${idleLoad0} → ${idleLoad}) ${summary(device.latencies.get("idle") ?? [])}; ` +
      `while phase 1 ran ${summary(device.latencies.get("batches") ?? [])}` +
      (device.problems.size
        ? `; problems ${JSON.stringify(Object.fromEntries(device.problems))}`
        : ""),
  );
  log(`readings submitted in all: ${fmt(readings.used)} batch + device ones`);
}

if (import.meta.main) {
  await main();
}
