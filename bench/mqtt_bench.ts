// deno task bench:mqtt — MQTT ingestion through an external Mosquitto, in one process tree and
// one run:
//   (a) a null subscriber (MQTT 5 persistent session on meters/+/readings that only PUBACKs)
//       under the publisher load: the rate this broker and this machine can move at all;
//   (e) the echo floor: the gateway's own MQTT path (ExternalIngress, its ack connections) with
//       an intake that answers every reading at once: what the issue's acks cost before the
//       gateway verifies or stores anything;
//   (b) the real gateway (main.ts as a child process, MQTT_URL → this Mosquitto) ingesting the
//       same load, signed with the secrets its bulk import issued, PUBACKs after commit.
// Each side gets a closed-loop phase (N readings as fast as the publishers' windows allow) and
// an open-loop phase at a fixed rate, whose latency is measured from each reading's *scheduled*
// send time (queueing cannot hide). Publisher connections run in a Worker (this same module), so
// they do not share a thread with the null subscriber or the bench's bookkeeping.
import { Buffer } from "node:buffer";
import { fileURLToPath } from "node:url";
import { connectAsync, type MqttClient } from "mqtt";
import { readingPayload } from "../mqtt/device_credentials.ts";
import { AckPublisher } from "../mqtt/ack_publisher.ts";
import { ExternalIngress } from "../mqtt/external_ingress.ts";
import type { AckMessage } from "../mqtt/intake.ts";
import { silentLogger } from "../core/logger.ts";
import { Metrics } from "../core/metrics.ts";
import { fatal, parseFlags } from "../cli/_args.ts";
import { api, freePort, type GatewayProcess, spawnGateway } from "./_spawn.ts";
import { createTestSchema } from "../tests/_services.ts";

const SLOT_MS = 15 * 60_000;
/** Slots (15-minute steps back from now) one meter may use: 7 days minus a margin. */
const MAX_SLOTS = 640;
const ADMIN = { email: "bench@gridtokenx.local", password: "bench-password-1" };
const GATEWAY_CLIENT_ID = "bench-gateway-1";
const NULL_CLIENT_ID = "bench-null-subscriber";
const ECHO_CLIENT_ID = "bench-echo";
/** Guards against hangs only: every wait below ends on an event or a counter. */
const PHASE_TIMEOUT_MS = 300_000;
/** How long a phase waits for the sampled acks after its readings are stored. */
const ACK_TIMEOUT_MS = 30_000;
/** The per-packet savings the gateway's ingress uses, for the publishers and the null subscriber. */
const LEAN_CLIENT = { log: () => {}, reschedulePings: false } as const;

// ------------------------------------------------------------------------------------------
// Messages between the bench (main thread) and its publisher worker.

interface InitMsg {
  type: "init";
  url: string;
  meters: string[];
  /** HMAC secrets (hex), one per meter. */
  secrets: string[];
  connections: number;
  /** QoS 1 publishes in flight per connection in closed-loop runs. */
  window: number;
  /** Every n-th meter subscribes to its acks (latency sample); 0 = none. */
  sampleEvery: number;
  /** Slot 0's timestamp (epoch ms, whole seconds); slot k is `baseTs - k * 15 min`. */
  baseTs: number;
}
/** Publishes readings g = first … first+count-1: meter g % M, slot ⌊g / M⌋. */
interface RunMsg {
  type: "run";
  first: number;
  count: number;
  /** Readings per second (open loop), or `null` for closed loop. */
  rate: number | null;
}
interface CollectMsg {
  type: "collect";
  timeoutMs: number;
}
type ToWorker = InitMsg | RunMsg | CollectMsg | { type: "close" };

interface AckTally {
  accepted: number;
  duplicate: number;
  rejected: Record<string, number>;
}
type FromWorker =
  | { type: "ready" }
  | { type: "started"; t0: number }
  | { type: "published"; t0: number; tEnd: number; sent: number; pubacks: number; errors: number }
  | {
    type: "collected";
    latencies: number[];
    expected: number;
    tally: AckTally;
    /** When the last sampled ack of the run arrived (epoch ms; 0: none). */
    lastAt: number;
  }
  | { type: "closed" }
  | { type: "error"; message: string };

/** Disposals of what the bench started and has not stopped yet, for an interrupted run. */
const exitHooks = new Set<() => Promise<void>>();

/** Registers `resource` for an interrupted run; disposing it (once) unregisters it. */
function tracked<T extends AsyncDisposable>(resource: T): T {
  const dispose = resource[Symbol.asyncDispose].bind(resource);
  let done: Promise<void> | undefined;
  const once = () => done ??= Promise.resolve(dispose());
  exitHooks.add(once);
  return Object.assign(resource, {
    [Symbol.asyncDispose]: () => {
      exitHooks.delete(once);
      return once();
    },
  });
}

/**
 * Turns Nagle's algorithm off on a client's socket, as the bench's devices should not add
 * their own TCP stalls to the gateway's figures: over node:net, mqtt.js leaves it on, and a
 * small write behind an unacknowledged one (a PUBACK, then the next PUBLISH) waits for the
 * peer's delayed ACK, up to 40 ms on Linux.
 */
function noDelay(client: MqttClient): void {
  (client.stream as unknown as { setNoDelay?: (on: boolean) => void }).setNoDelay?.(true);
}

/** `performance.now()` as epoch milliseconds, comparable across the bench's threads. */
function epochNow(): number {
  return performance.timeOrigin + performance.now();
}

/** 32 random bytes in hex: a device secret, or a key the gateway needs. */
function randomHex(): string {
  return Buffer.from(crypto.getRandomValues(new Uint8Array(32))).toString("hex");
}

function isoSeconds(ms: number): string {
  return new Date(ms).toISOString().replace(".000Z", "Z");
}

// ------------------------------------------------------------------------------------------
// The publisher worker.

function publisherWorker(): void {
  const scope = globalThis as unknown as {
    postMessage(message: FromWorker): void;
    onmessage: ((event: MessageEvent<ToWorker>) => void) | null;
  };
  const post = (message: FromWorker) => scope.postMessage(message);
  let init: InitMsg;
  let clients: MqttClient[] = [];
  let topicIndex = new Map<string, number>();
  let secrets: Buffer[] = [];
  /** Send time (performance.now(), or the scheduled time in open loop) per sampled reading g. */
  let sentAt = new Map<number, number>();
  let latencies: number[] = [];
  let tally: AckTally = { accepted: 0, duplicate: 0, rejected: {} };
  let expected = 0;
  let received = 0;
  let lastAt = 0;
  let onAck: (() => void) | null = null;

  const sampled = (m: number) => init.sampleEvery > 0 && m % init.sampleEvery === 0;

  async function start(msg: InitMsg): Promise<void> {
    init = msg;
    secrets = msg.secrets.map((hex) => Buffer.from(hex, "hex"));
    topicIndex = new Map(msg.meters.map((id, m) => [`meters/${id}/acks`, m]));
    const tag = crypto.randomUUID().slice(0, 8);
    clients = await Promise.all(
      Array.from({ length: msg.connections }, (_, c) =>
        connectAsync(msg.url, {
          ...LEAN_CLIENT,
          protocolVersion: 4,
          clientId: `bench-pub-${tag}-${c}`,
          clean: true,
          reconnectPeriod: 0,
          connectTimeout: 30_000,
        })),
    );
    for (const client of clients) {
      noDelay(client);
      client.on("message", acked);
    }
    // Sampled meters subscribe to their acks on the connection they publish on.
    const topics: string[][] = clients.map(() => []);
    msg.meters.forEach((id, m) => {
      if (sampled(m)) topics[m % msg.connections].push(`meters/${id}/acks`);
    });
    await Promise.all(clients.map(async (client, c) => {
      for (let i = 0; i < topics[c].length; i += 500) {
        await client.subscribeAsync(topics[c].slice(i, i + 500), { qos: 1 });
      }
    }));
    post({ type: "ready" });
  }

  function acked(topic: string, payload: Uint8Array): void {
    const now = performance.now();
    const m = topicIndex.get(topic);
    if (m === undefined) return;
    let ack: { reading_timestamp?: string; status?: string; code?: string };
    try {
      ack = JSON.parse(new TextDecoder().decode(payload));
    } catch {
      return;
    }
    const slot = Math.round((init.baseTs - Date.parse(ack.reading_timestamp ?? "")) / SLOT_MS);
    const g = slot * init.meters.length + m;
    const sent = sentAt.get(g);
    if (sent === undefined) return; // not of this run
    sentAt.delete(g);
    received++;
    lastAt = performance.timeOrigin + now;
    if (ack.status === "accepted") {
      tally.accepted++;
      latencies.push(now - sent);
    } else if (ack.status === "duplicate") {
      tally.duplicate++;
    } else {
      const code = ack.code ?? "unknown";
      tally.rejected[code] = (tally.rejected[code] ?? 0) + 1;
    }
    if (received >= expected) onAck?.();
  }

  function run(msg: RunMsg): void {
    const M = init.meters.length, K = clients.length;
    // Signed up front: the devices' signing is not what is measured.
    const payloads: string[] = new Array(msg.count);
    for (let i = 0; i < msg.count; i++) {
      const g = msg.first + i, m = g % M, slot = Math.floor(g / M);
      const kwh = String(Number((1 + (g % 997) / 100).toFixed(2))); // canonical: no "1.50"
      payloads[i] = readingPayload(
        init.meters[m],
        secrets[m],
        isoSeconds(init.baseTs - slot * SLOT_MS),
        kwh,
      );
    }
    const topics = init.meters.map((id) => `meters/${id}/readings`);
    sentAt = new Map();
    latencies = [];
    tally = { accepted: 0, duplicate: 0, rejected: {} };
    received = 0;
    lastAt = 0;
    expected = 0;
    for (let i = 0; i < msg.count; i++) if (sampled((msg.first + i) % M)) expected++;

    let pubacks = 0, errors = 0, sent = 0;
    const t0 = performance.now();
    post({ type: "started", t0: performance.timeOrigin + t0 });
    const finished = () =>
      post({
        type: "published",
        t0: performance.timeOrigin + t0,
        tEnd: epochNow(),
        sent,
        pubacks,
        errors,
      });
    const publish = (i: number, at: number, then?: () => void) => {
      const g = msg.first + i, m = g % M;
      if (sampled(m)) sentAt.set(g, at);
      sent++;
      clients[m % K].publish(topics[m], payloads[i], { qos: 1 }, (error) => {
        if (error) errors++;
        else pubacks++;
        then?.();
        if (pubacks + errors === msg.count) finished();
      });
    };

    if (msg.rate === null) {
      // Closed loop: each connection keeps `window` publishes in flight.
      for (let c = 0; c < K; c++) {
        const mine: number[] = [];
        for (let i = 0; i < msg.count; i++) if (((msg.first + i) % M) % K === c) mine.push(i);
        let next = 0, inFlight = 0;
        const pump = () => {
          while (next < mine.length && inFlight < init.window) {
            inFlight++;
            publish(mine[next++], performance.now(), () => {
              inFlight--;
              pump();
            });
          }
        };
        pump();
      }
      return;
    }
    // Open loop: reading i is due at t0 + i / rate, whatever happened to the earlier ones.
    const rate = msg.rate;
    let next = 0;
    const tick = () => {
      const due = Math.min(msg.count, Math.floor((performance.now() - t0) * rate / 1000) + 1);
      while (next < due) {
        publish(next, t0 + (next * 1000) / rate);
        next++;
      }
      if (next < msg.count) setTimeout(tick, 1);
    };
    tick();
  }

  function collect(msg: CollectMsg): void {
    const reply = () => {
      onAck = null;
      clearTimeout(timer);
      post({ type: "collected", latencies, expected, tally, lastAt });
    };
    const timer = setTimeout(reply, msg.timeoutMs);
    if (received >= expected) reply();
    else onAck = reply;
  }

  scope.onmessage = (event) => {
    const msg = event.data;
    const fail = (error: unknown) =>
      post({ type: "error", message: String((error as Error)?.stack ?? error) });
    try {
      if (msg.type === "init") start(msg).catch(fail);
      else if (msg.type === "run") run(msg);
      else if (msg.type === "collect") collect(msg);
      else {
        Promise.all(clients.map((c) => c.endAsync(true))).then(
          () => post({ type: "closed" }),
          fail,
        );
      }
    } catch (error) {
      fail(error);
    }
  };
}

// ------------------------------------------------------------------------------------------
// The bench.

/** The publisher worker, driven by request/response messages. */
class Publishers implements AsyncDisposable {
  #worker = new Worker(import.meta.url, { type: "module", name: "bench-publishers" });
  #waiters: { type: FromWorker["type"]; resolve: (m: FromWorker) => void }[] = [];
  #failure: Error | null = null;
  #onStarted: ((t0: number) => void) | null = null;

  constructor() {
    this.#worker.onmessage = (event: MessageEvent<FromWorker>) => {
      const msg = event.data;
      if (msg.type === "error") {
        this.#failure = new Error(`publisher worker: ${msg.message}`);
        for (const w of this.#waiters.splice(0)) w.resolve(msg);
        return;
      }
      if (msg.type === "started") this.#onStarted?.(msg.t0);
      const i = this.#waiters.findIndex((w) => w.type === msg.type);
      if (i >= 0) this.#waiters.splice(i, 1)[0].resolve(msg);
    };
    this.#worker.onerror = (event) => {
      event.preventDefault();
      this.#failure = new Error(`publisher worker crashed: ${event.message}`);
      for (const w of this.#waiters.splice(0)) w.resolve({ type: "error", message: event.message });
    };
  }

  #request<T extends FromWorker["type"]>(
    message: ToWorker,
    answer: T,
  ): Promise<Extract<FromWorker, { type: T }>> {
    if (this.#failure) return Promise.reject(this.#failure);
    const reply = new Promise<FromWorker>((resolve) =>
      this.#waiters.push({ type: answer, resolve })
    );
    this.#worker.postMessage(message);
    return withTimeout(reply, PHASE_TIMEOUT_MS, `waiting for "${answer}"`).then((msg) => {
      if (msg.type === "error") throw this.#failure ?? new Error(msg.message);
      return msg as Extract<FromWorker, { type: T }>;
    });
  }

  init(msg: Omit<InitMsg, "type">): Promise<unknown> {
    return this.#request({ type: "init", ...msg }, "ready");
  }

  /** Starts a run; `published` resolves once every publish has its PUBACK (from the broker). */
  run(
    first: number,
    count: number,
    rate: number | null,
  ): { started: Promise<number>; published: Promise<Extract<FromWorker, { type: "published" }>> } {
    const started = new Promise<number>((resolve) => this.#onStarted = resolve);
    return { started, published: this.#request({ type: "run", first, count, rate }, "published") };
  }

  collect(timeoutMs: number) {
    return this.#request({ type: "collect", timeoutMs }, "collected");
  }

  async close(): Promise<void> {
    if (!this.#failure) await this.#request({ type: "close" }, "closed").catch(() => {});
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
    this.#worker.terminate();
  }
}

function withTimeout<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  return Promise.race([
    promise,
    new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms ${what}`)), ms);
    }),
  ]).finally(() => clearTimeout(timer));
}

/** Mosquitto with the production config (deploy/mosquitto.conf) on a free port, in a temp dir. */
async function startMosquitto(): Promise<
  { url: string; version: string; pid: number; log: () => string } & AsyncDisposable
> {
  const config = fileURLToPath(new URL("../deploy/mosquitto.conf", import.meta.url));
  const dir = await Deno.makeTempDir({ prefix: "gw-bench-mosquitto-" });
  // Started as root, Mosquitto drops to its own user, which must write its persistence file.
  await Deno.chmod(dir, 0o777);
  const port = freePort();
  const child = new Deno.Command("mosquitto", {
    args: ["-c", config, "-p", String(port)],
    cwd: dir,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  let log = "";
  const pump = async (stream: ReadableStream<Uint8Array>) => {
    for await (const text of stream.pipeThrough(new TextDecoderStream())) {
      log = (log + text).slice(-256 * 1024);
    }
  };
  const pumping = Promise.all([pump(child.stdout), pump(child.stderr)]);
  let exited = false;
  child.status.then(() => exited = true);
  const close = async () => {
    try {
      child.kill("SIGTERM");
    } catch { /* already gone */ }
    await child.status;
    await pumping;
    await Deno.remove(dir, { recursive: true });
  };
  const deadline = Date.now() + 10_000;
  for (;;) {
    try {
      (await Deno.connect({ hostname: "127.0.0.1", port })).close();
      break;
    } catch (error) {
      if (exited || Date.now() > deadline) {
        await close();
        throw new Error(`mosquitto did not start: ${(error as Error).message}\n${log}`);
      }
      await new Promise((r) => setTimeout(r, 20));
    }
  }
  const help = await new Deno.Command("mosquitto", {
    args: ["-h"],
    stdout: "piped",
    stderr: "piped",
  })
    .output();
  const version = /mosquitto version (\S+)/.exec(new TextDecoder().decode(help.stdout))?.[1] ?? "?";
  return {
    url: `mqtt://127.0.0.1:${port}`,
    version,
    pid: child.pid,
    log: () => log,
    [Symbol.asyncDispose]: close,
  };
}

/** CPU seconds used so far by each thread of a process, by thread name. */
function cpuByThread(pid: number): Map<string, number> {
  const out = new Map<string, number>();
  const ticks = 100; // USER_HZ
  try {
    for (const task of Deno.readDirSync(`/proc/${pid}/task`)) {
      const stat = Deno.readTextFileSync(`/proc/${pid}/task/${task.name}/stat`);
      const name = threadLabel(stat.slice(stat.indexOf("(") + 1, stat.lastIndexOf(")")));
      const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
      const seconds = (Number(fields[11]) + Number(fields[12])) / ticks;
      out.set(name, (out.get(name) ?? 0) + seconds);
    }
  } catch { /* gone, or no /proc */ }
  return out;
}

/** Deno's thread names, as the bench prints them (see THREAD_LEGEND). */
function threadLabel(name: string): string {
  if (name === "deno") return "main";
  if (/^sw-\d+$/.test(name)) return "kv-sqlite";
  if (/^worker-\d+$/.test(name)) return "worker";
  if (name.startsWith("V8 ")) return "v8-helpers";
  if (name.startsWith("tokio-")) return "tokio-io";
  return name;
}

const THREAD_LEGEND = "threads: main = JS main thread; worker = Web Worker (the gateway's " +
  "batching writer, the bench's publishers); kv-sqlite = Deno KV's SQLite threads; " +
  "v8-helpers = GC/compiler; tokio-io = Deno's I/O runtime";

/** Machine-wide CPU seconds so far: busy (all processes) and waiting for I/O. */
function cpuOfMachine(): { busy: number; iowait: number } {
  try {
    const [user, nice, system, _idle, iowait, irq, softirq, steal] = Deno.readTextFileSync(
      "/proc/stat",
    ).split("\n")[0].trim().split(/\s+/).slice(1).map(Number);
    return { busy: (user + nice + system + irq + softirq + steal) / 100, iowait: iowait / 100 };
  } catch {
    return { busy: NaN, iowait: NaN };
  }
}

/**
 * CPU use between two calls, in cores: each of the bench's processes (busiest threads named),
 * everything else running on the machine (other processes compete for the same cores), and
 * time spent waiting for I/O.
 */
class CpuMeter {
  #pids: Record<string, () => number[]>;
  #start = new Map<string, Map<string, number>>();
  #machine = { busy: 0, iowait: 0 };
  #t = 0;

  /**
   * Processes by display name; several pids of one name are summed. A function is asked for
   * the pids at the start and at the end of each measurement (processes come and go).
   */
  constructor(pids: Record<string, number | number[] | (() => number[])>) {
    this.#pids = {};
    for (const [name, pid] of Object.entries(pids)) this.add(name, pid);
  }

  /** Adds processes under `name` (from the next `begin()` on). */
  add(name: string, pids: number | number[] | (() => number[])): void {
    this.#pids[name] = typeof pids === "function"
      ? pids
      : Array.isArray(pids)
      ? () => pids
      : () => [pids];
  }

  /** CPU seconds by "pid thread": a process that started since begin() counts from zero. */
  #threads(name: string): Map<string, number> {
    const out = new Map<string, number>();
    for (const pid of this.#pids[name]()) {
      for (const [t, s] of cpuByThread(pid)) {
        out.set(`${pid} ${t}`, (out.get(`${pid} ${t}`) ?? 0) + s);
      }
    }
    return out;
  }

  begin(): void {
    this.#t = performance.now();
    this.#machine = cpuOfMachine();
    for (const name of Object.keys(this.#pids)) this.#start.set(name, this.#threads(name));
  }

  /** e.g. `gateway 1.42 (main 0.98, worker 0.31, …) · mosquitto 0.35 · bench 0.40 · …` */
  end(): { text: string; cores: Record<string, number> } {
    if (Number.isNaN(cpuOfMachine().busy)) {
      return { text: "CPU: n/a (reading /proc needs --allow-all)", cores: {} };
    }
    const seconds = (performance.now() - this.#t) / 1000;
    const parts: string[] = [];
    const cores: Record<string, number> = {};
    let ours = 0;
    for (const name of Object.keys(this.#pids)) {
      const before = this.#start.get(name) ?? new Map<string, number>();
      const byThread = new Map<string, number>();
      for (const [key, s] of this.#threads(name)) {
        const t = key.slice(key.indexOf(" ") + 1);
        byThread.set(t, (byThread.get(t) ?? 0) + (s - (before.get(key) ?? 0)) / seconds);
      }
      const threads = [...byThread]
        .filter(([, c]) => c >= 0.01)
        .sort((a, b) => b[1] - a[1]);
      const total = threads.reduce((sum, [, c]) => sum + c, 0);
      cores[name] = round2(total);
      ours += total;
      const detail = threads.length > 1
        ? ` (${threads.slice(0, 4).map(([t, c]) => `${t} ${c.toFixed(2)}`).join(", ")})`
        : "";
      parts.push(`${name} ${total.toFixed(2)}${detail}`);
    }
    const machine = cpuOfMachine();
    const others = (machine.busy - this.#machine.busy) / seconds - ours;
    const iowait = (machine.iowait - this.#machine.iowait) / seconds;
    cores.other_processes = round2(Math.max(0, others));
    cores.iowait = round2(iowait);
    parts.push(`other processes ${Math.max(0, others).toFixed(2)}`, `iowait ${iowait.toFixed(2)}`);
    return { text: `CPU cores: ${parts.join(" · ")}`, cores };
  }
}

/**
 * Every PostgreSQL server process on this machine (the bench's database is local; nothing
 * else uses it while it runs).
 */
function postgresProcesses(): number[] {
  const pids: number[] = [];
  try {
    for (const entry of Deno.readDirSync("/proc")) {
      if (!/^\d+$/.test(entry.name)) continue;
      try {
        if (Deno.readTextFileSync(`/proc/${entry.name}/comm`).startsWith("postgres")) {
          pids.push(Number(entry.name));
        }
      } catch { /* gone */ }
    }
  } catch { /* no /proc */ }
  return pids;
}

function round2(x: number): number {
  return Math.round(x * 100) / 100;
}

function pct(sorted: number[], p: number): number {
  return sorted.length ? sorted[Math.min(sorted.length - 1, Math.floor(sorted.length * p))] : NaN;
}

interface Latency {
  n: number;
  p50: number;
  p95: number;
  p99: number;
  max: number;
}

function latency(values: number[]): Latency {
  const sorted = Float64Array.from(values).sort();
  const list = Array.from(sorted);
  return {
    n: list.length,
    p50: round2(pct(list, 0.5)),
    p95: round2(pct(list, 0.95)),
    p99: round2(pct(list, 0.99)),
    max: round2(list.at(-1) ?? NaN),
  };
}

function fmtLatency(l: Latency): string {
  return `p50 ${l.p50.toFixed(1)} ms, p95 ${l.p95.toFixed(1)} ms, p99 ${l.p99.toFixed(1)} ms, ` +
    `max ${l.max.toFixed(1)} ms (n=${l.n.toLocaleString("en-US")})`;
}

function fmt(n: number): string {
  return Math.round(n).toLocaleString("en-US");
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

interface GatewayFigures {
  /** `gateway_readings_total{source="mqtt"}` by outcome. */
  outcomes: Record<string, number>;
  rows: number;
  batches: number;
  batchMax: number;
  /** Readings accepted by actors and not yet committed. */
  queue: number;
  lastBatchMs: number;
  lastRoundTripMs: number;
}

async function gatewayFigures(gw: GatewayProcess): Promise<GatewayFigures> {
  const text: string = await api(gw, "/metrics");
  const outcomes: Record<string, number> = {};
  for (const m of text.matchAll(/^gateway_readings_total\{([^}]*)\} (\S+)$/gm)) {
    const labels = Object.fromEntries(
      [...m[1].matchAll(/(\w+)="([^"]*)"/g)].map((l) => [l[1], l[2]]),
    );
    if (labels.source === "mqtt") outcomes[labels.outcome] = Number(m[2]);
  }
  const get = (name: string) => Number(new RegExp(`^${name} (\\S+)$`, "m").exec(text)?.[1] ?? 0);
  return {
    outcomes,
    rows: get("gateway_writer_rows_total"),
    batches: get("gateway_writer_batches_total"),
    batchMax: get("gateway_writer_batch_max"),
    queue: get("gateway_writer_queue"),
    lastBatchMs: get("gateway_writer_last_batch_ms"),
    lastRoundTripMs: get("gateway_writer_last_round_trip_ms"),
  };
}

/** What the /metrics polls saw while a phase ran. */
interface Samples {
  /** Mean and largest writer queue (accepted, not yet committed). */
  queueMean: number;
  queueMax: number;
  /** Mean duration of the batch last committed, over the polls (a sample of batches). */
  batchMsMean: number;
  /** Mean round trip (handed to the worker → results back) of the batch last committed. */
  roundTripMsMean: number;
}

/**
 * Polls /metrics until `accepted` reaches `target`; the epoch time it was seen and what the
 * polls saw of the writer.
 */
async function waitAccepted(
  gw: GatewayProcess,
  target: number,
): Promise<{ at: number; samples: Samples }> {
  const deadline = performance.now() + PHASE_TIMEOUT_MS;
  let last: GatewayFigures | undefined;
  const queue: number[] = [], batchMs: number[] = [], roundTripMs: number[] = [];
  while (performance.now() < deadline) {
    last = await gatewayFigures(gw);
    queue.push(last.queue);
    batchMs.push(last.lastBatchMs);
    roundTripMs.push(last.lastRoundTripMs);
    if ((last.outcomes.accepted ?? 0) >= target) {
      const mean = (xs: number[]) => xs.reduce((a, b) => a + b, 0) / Math.max(1, xs.length);
      return {
        at: epochNow(),
        samples: {
          queueMean: Math.round(mean(queue)),
          queueMax: Math.max(...queue),
          batchMsMean: round2(mean(batchMs)),
          roundTripMsMean: round2(mean(roundTripMs)),
        },
      };
    }
    const failed = Object.entries(last.outcomes).filter(([k]) => k !== "accepted");
    if (failed.length > 0) {
      throw new Error(`the gateway did not accept every reading: ${JSON.stringify(last.outcomes)}`);
    }
    await sleep(25);
  }
  throw new Error(`timed out waiting for ${target} accepted readings: ${JSON.stringify(last)}`);
}

function writerDelta(a: GatewayFigures, b: GatewayFigures, s: Samples): string {
  const rows = b.rows - a.rows, batches = b.batches - a.batches;
  return `writer: ${fmt(rows)} rows in ${fmt(batches)} batches (mean ${
    (rows / Math.max(1, batches)).toFixed(1)
  }, largest so far ${fmt(b.batchMax)}); a batch took ${s.batchMsMean.toFixed(0)} ms on ` +
    `average in the store, ${s.roundTripMsMean.toFixed(0)} ms from hand-over to results; ` +
    `writer queue mean ${fmt(s.queueMean)}, max ${fmt(s.queueMax)}`;
}

async function main(): Promise<void> {
  const flags = parseFlags(Deno.args, {
    usage: `Usage: deno task bench:mqtt [options]

Starts its own Mosquitto (deploy/mosquitto.conf, free port, temp dir), measures (a) a null
subscriber, (e) the echo floor (the gateway's MQTT path answering every reading at once) and (b)
the real gateway (main.ts, MQTT_URL) under the same signed QoS 1 load, and prints the rates, the
ratios b/a and b/e and publish→ack latency at a fixed offered rate.
WRITER_*, MQTT_INFLIGHT_MAX and MQTT_ACK_CONNECTIONS in the environment reach the gateway.

Options:
  --readings N      Readings of the closed-loop phases (default 200000)
  --meters M        Meters (default 2000); each gets N/M readings 15 minutes apart
  --connections K   Publisher connections (default 20)
  --window W        QoS 1 publishes in flight per connection, closed loop (default 1000)
  --rate R          Offered readings/s of the fixed-rate phases (default 11111)
  --seconds S       Duration of the fixed-rate phases (default 10)
  --sample S        Every S-th meter subscribes to its acks for latency (default 10)
  --database-url U  Run the gateway on PostgreSQL (a fresh schema on U, dropped at the end)
                    instead of Deno KV
  --observability M on: the gateway with metrics and logging at production defaults; off:
                    with them off; both (default): on, off, off, on, each on a fresh store,
                    and the ratio of the means; or a comma list such as off,on
  --json            Also print the figures as one JSON object
  -h, --help        Show this help`,
    options: {
      readings: { type: "string", default: "200000" },
      meters: { type: "string", default: "2000" },
      connections: { type: "string", default: "20" },
      window: { type: "string", default: "1000" },
      rate: { type: "string", default: "11111" },
      seconds: { type: "string", default: "10" },
      sample: { type: "string", default: "10" },
      "database-url": { type: "string" },
      observability: { type: "string", default: "both" },
      json: { type: "boolean", default: false },
    },
  });
  const int = (text: string, flag: string, min = 1) => {
    const n = Number(text);
    if (!Number.isInteger(n) || n < min) fatal(`--${flag} must be an integer ≥ ${min}`);
    return n;
  };
  const N = int(flags.readings, "readings");
  const M = int(flags.meters, "meters");
  const K = Math.min(int(flags.connections, "connections"), M);
  const W = int(flags.window, "window");
  const RATE = int(flags.rate, "rate");
  const SECONDS = Number(flags.seconds);
  if (!(SECONDS > 0)) fatal("--seconds must be a positive number");
  const SAMPLE = int(flags.sample, "sample", 0);
  const FIXED = Math.round(RATE * SECONDS);
  const warmup = M; // one reading per meter: actors activated before anything is timed
  const slotsNeeded = Math.ceil((warmup + N + FIXED) / M);
  if (slotsNeeded > MAX_SLOTS) {
    fatal(
      `${fmt(warmup + N + FIXED)} readings over ${M} meters need ${slotsNeeded} 15-minute slots ` +
        `per meter, more than the ${MAX_SLOTS} that fit in 7 days: raise --meters`,
    );
  }
  const log = (line: string) => console.log(line);
  const baseTs = Math.floor(Date.now() / 60_000) * 60_000 - 60_000;
  const meters = Array.from({ length: M }, (_, m) => `bench-${m}`);

  await using mosquitto = tracked(await startMosquitto());
  /** Connects the publishers to this broker; every `sampleEvery`-th meter subscribes to its acks. */
  const initPublishers = (pubs: Publishers, secrets: string[], sampleEvery: number) =>
    pubs.init({
      url: mosquitto.url,
      meters,
      secrets,
      connections: K,
      window: W,
      sampleEvery,
      baseTs,
    });
  log(
    `bench:mqtt — Mosquitto ${mosquitto.version} (deploy/mosquitto.conf) at ${mosquitto.url}; ` +
      `${fmt(M)} meters over ${K} publisher connections × ${fmt(W)} in flight; ` +
      `Deno ${Deno.version.deno}, ${navigator.hardwareConcurrency} cores`,
  );
  const load = () => {
    try {
      return Deno.readTextFileSync("/proc/loadavg").split(" ").slice(0, 3).join(" ");
    } catch {
      return "n/a (reading /proc needs --allow-all)";
    }
  };
  log(`load average before the run: ${load()}; ${THREAD_LEGEND}`);
  const result: Record<string, unknown> = {
    readings: N,
    meters: M,
    connections: K,
    window: W,
    offered_rate: RATE,
    seconds: SECONDS,
  };

  // ---- (a) null subscriber --------------------------------------------------------------
  {
    const sub = await connectAsync(mosquitto.url, {
      ...LEAN_CLIENT,
      protocolVersion: 5,
      clean: false,
      clientId: NULL_CLIENT_ID,
      properties: { sessionExpiryInterval: 600, receiveMaximum: 65_535 },
      reconnectPeriod: 0,
    });
    const topicIndex = new Map(meters.map((id, m) => [`meters/${id}/readings`, m]));
    let received = 0, target = Infinity, tLast = 0;
    let reached = Promise.withResolvers<void>();
    // Fixed-rate phase: the k-th arrival of meter m is run index k*M + m (per-topic order).
    let arrivals: Float64Array | null = null;
    let perMeter = new Int32Array(M);
    sub.on("message", (topic) => {
      const now = epochNow();
      received++;
      if (arrivals) {
        const m = topicIndex.get(topic)!;
        const i = perMeter[m]++ * M + m;
        if (i < arrivals.length) arrivals[i] = now;
      }
      if (received >= target) {
        tLast = now;
        reached.resolve();
      }
    });
    // Ends the null subscriber whatever happens (its session is removed on a normal end).
    await using _sub = tracked({ [Symbol.asyncDispose]: () => sub.endAsync(true) });
    await sub.subscribeAsync("meters/+/readings", { qos: 1 });
    await using pubs = tracked(new Publishers());
    await initPublishers(pubs, meters.map(randomHex), 0);
    const cpu = new CpuMeter({ mosquitto: mosquitto.pid, bench: Deno.pid });

    // a1: closed loop
    received = 0;
    target = N;
    cpu.begin();
    const a1 = pubs.run(0, N, null);
    const t0 = await a1.started;
    const pub = await a1.published;
    await withTimeout(reached.promise, PHASE_TIMEOUT_MS, "for the null subscriber");
    const aCpu = cpu.end();
    const nullRate = N / ((tLast - t0) / 1000);
    const pubRate = pub.pubacks / ((pub.tEnd - pub.t0) / 1000);
    log(
      `(a) null subscriber, closed loop: ${fmt(N)} readings received in ${
        ((tLast - t0) / 1000).toFixed(2)
      } s → ${fmt(nullRate)} readings/s (publishers got PUBACKs at ${fmt(pubRate)}/s)`,
    );
    log(`    ${aCpu.text}`);
    result.null_subscriber = {
      rate: Math.round(nullRate),
      publish_rate: Math.round(pubRate),
      cpu: aCpu.cores,
    };

    // a2: open loop at the fixed rate; latency publish → arrival at the subscriber
    received = 0;
    target = FIXED;
    reached = Promise.withResolvers<void>();
    perMeter = new Int32Array(M);
    arrivals = new Float64Array(FIXED);
    cpu.begin();
    const a2 = pubs.run(0, FIXED, RATE);
    const t2 = await a2.started;
    await a2.published;
    await withTimeout(reached.promise, PHASE_TIMEOUT_MS, "for the null subscriber");
    const a2Cpu = cpu.end();
    const lat = latency(Array.from(arrivals, (at, i) => at - (t2 + (i * 1000) / RATE)));
    log(
      `    fixed ${fmt(RATE)}/s for ${SECONDS} s: publish→arrival ${
        fmtLatency(lat)
      }; ${a2Cpu.text}`,
    );
    (result.null_subscriber as Record<string, unknown>).fixed_rate = {
      latency_ms: lat,
      cpu: a2Cpu.cores,
    };
    arrivals = null;
    // No session left behind to queue phase (b)'s readings.
    await sub.unsubscribeAsync("meters/+/readings");
    await sub.endAsync(false, { properties: { sessionExpiryInterval: 0 } });
  }

  // ---- (e) echo floor --------------------------------------------------------------------
  // Every reading taken off the broker, an accepted ack published for it at QoS 1 and its PUBACK
  // sent once the broker has the ack: the minimum the issue asks of any gateway, through the
  // gateway's own MQTT code, with no verification and no store.
  {
    const metrics = new Metrics();
    metrics.counter("mqtt_messages_received_total", "-");
    metrics.counter("mqtt_connection_errors_total", "-");
    let handled = 0;
    const intake = {
      handle(_meterId: string, payload: Uint8Array): Promise<AckMessage> {
        handled++;
        const { reading_timestamp } = JSON.parse(new TextDecoder().decode(payload));
        return Promise.resolve({ reading_timestamp, status: "accepted", id: "echo" });
      },
    };
    const echo = await ExternalIngress.start({
      url: mosquitto.url,
      clientId: ECHO_CLIENT_ID,
      // No session left behind to queue phase (b)'s readings.
      sessionExpirySeconds: 0,
      inflightMax: 5000,
      intake,
      acks: new AckPublisher({
        url: mosquitto.url,
        clientId: `${ECHO_CLIENT_ID}-acks`,
        connections: Number(Deno.env.get("MQTT_ACK_CONNECTIONS") ?? 4),
        logger: silentLogger,
        metrics,
      }),
      logger: silentLogger,
      metrics,
    });
    await using _echo = tracked({ [Symbol.asyncDispose]: () => echo.close() });
    await withTimeout(echo.ready(), PHASE_TIMEOUT_MS, "for the echo's subscription");
    await using pubs = tracked(new Publishers());
    await initPublishers(pubs, meters.map(randomHex), SAMPLE);
    const cpu = new CpuMeter({ mosquitto: mosquitto.pid, bench: Deno.pid });
    cpu.begin();
    const e1 = pubs.run(0, N, null);
    const t0 = await e1.started;
    await e1.published;
    const e1Acks = await pubs.collect(PHASE_TIMEOUT_MS);
    const eCpu = cpu.end();
    const echoRate = N / ((e1Acks.lastAt - t0) / 1000);
    log(
      `(e) echo floor (the gateway's MQTT path, acks after the broker has them, nothing else): ` +
        `${fmt(N)} readings answered in ${((e1Acks.lastAt - t0) / 1000).toFixed(2)} s → ${
          fmt(echoRate)
        } readings/s`,
    );
    log(`    ${eCpu.text}`);
    checkAcks("echo, closed loop", e1Acks);
    cpu.begin();
    const e2 = pubs.run(0, FIXED, RATE);
    await e2.started;
    await e2.published;
    const e2Acks = await pubs.collect(PHASE_TIMEOUT_MS);
    const e2Cpu = cpu.end();
    const e2Lat = latency(e2Acks.latencies);
    log(
      `    fixed ${fmt(RATE)}/s for ${SECONDS} s: publish→ack ${fmtLatency(e2Lat)}; ${e2Cpu.text}`,
    );
    checkAcks("echo, fixed rate", e2Acks);
    if (handled < N + FIXED) log(`    warning: the echo handled ${handled} of ${N + FIXED}`);
    result.echo = {
      rate: Math.round(echoRate),
      cpu: eCpu.cores,
      fixed_rate: { latency_ms: e2Lat, cpu: e2Cpu.cores },
    };
  }

  // ---- (b) the gateway ------------------------------------------------------------------
  // Run once per observability mode, each on a fresh store and its own MQTT client id: "on" is
  // the production defaults (metrics, LOG_LEVEL=info), "off" the instrumentation and logging
  // off (METRICS_ENABLED=false, LOG_LEVEL=error), side by side in one run.
  const gatewayPhase = async (mode: "on" | "off", clientId: string) => {
    // The store is the bench's choice, never an inherited DATABASE_URL.
    const store: Record<string, string> = { DATABASE_URL: "" };
    let storeName = "Deno KV";
    const schema = flags["database-url"] ? await createTestSchema(flags["database-url"]) : null;
    await using _schema = tracked({
      [Symbol.asyncDispose]: () => schema?.drop() ?? Promise.resolve(),
    });
    if (schema) {
      Object.assign(store, {
        DATABASE_URL: schema.url,
        JWT_SECRET: randomHex(),
        DEVICE_KEY_ENCRYPTION_KEY: randomHex(),
      });
      storeName = `PostgreSQL (schema ${schema.name}, dropped at the end)`;
    }
    result.store = flags["database-url"] ? "postgres" : "kv";
    const out: Record<string, unknown> = {};
    await using gw = tracked(
      await spawnGateway({
        ...store,
        MQTT_URL: mosquitto.url,
        MQTT_CLIENT_ID: clientId,
        ADMIN_EMAIL: ADMIN.email,
        ADMIN_PASSWORD: ADMIN.password,
        METER_RATE_BURST: "1000000",
        DEVICE_REGISTER_RATE_LIMIT: "100000",
        // Production defaults, or the instrumentation and logging off (the overhead's baseline).
        LOG_LEVEL: mode === "on" ? "info" : "error",
        METRICS_ENABLED: mode === "on" ? "true" : "false",
      }),
    );
    await waitForIngress(mosquitto.url);

    const { access_token: token } = await api(gw, "/api/auth/login", ADMIN);
    const user = await api(gw, "/api/admin/users", {
      email: "prosumer@bench.local",
      password: "solar-bench-9w4k2",
      role: "user",
    }, token);
    const tProvision = performance.now();
    const secrets = new Map<string, string>();
    for (let i = 0; i < M; i += 1000) {
      const devices = meters.slice(i, i + 1000).map((meter_id) => ({
        meter_id,
        user_id: user.id,
        algorithm: "hmac-sha256",
      }));
      const { results } = await api(gw, "/api/admin/devices/import", { devices }, token);
      for (const r of results) {
        if (!r.secret_hex) throw new Error(`import of ${r.meter_id}: ${JSON.stringify(r.error)}`);
        secrets.set(r.meter_id, r.secret_hex);
      }
    }
    log(
      `(b) gateway (main.ts, MQTT_URL, client id ${clientId}, ${storeName}, metrics and ` +
        `logging ${mode === "on" ? "at production defaults" : "off"}): ${fmt(M)} meters ` +
        `provisioned via bulk import in ${((performance.now() - tProvision) / 1000).toFixed(1)} s`,
    );

    await using pubs = tracked(new Publishers());
    await initPublishers(pubs, meters.map((id) => secrets.get(id)!), SAMPLE);
    const cpu = new CpuMeter({
      gateway: gw.child.pid,
      mosquitto: mosquitto.pid,
      bench: Deno.pid,
    });

    // Warm-up: one reading per meter activates every actor (device load, rehydration).
    let accepted = 0;
    {
      const w = pubs.run(0, warmup, null);
      const t0 = await w.started;
      await w.published;
      const { at: t1 } = await waitAccepted(gw, accepted += warmup);
      await pubs.collect(5_000);
      log(
        `    warm-up: ${fmt(warmup)} readings (one per meter) in ${
          ((t1 - t0) / 1000).toFixed(2)
        } s`,
      );
    }
    // The database server's work: every PostgreSQL process (backends come and go with the
    // pools' load; the WAL writer and checkpointer work for every writer too).
    if (flags["database-url"]) cpu.add("postgres", postgresProcesses);

    // b1: closed loop
    const before = await gatewayFigures(gw);
    cpu.begin();
    const b1 = pubs.run(warmup, N, null);
    const t0 = await b1.started;
    const pub = await b1.published;
    const { at: t1Stored, samples: b1Samples } = await waitAccepted(gw, accepted += N);
    // Ingested means stored and answered: the phase ends when the devices have their acks too
    // (an ack path that lags behind the store would otherwise do its work after the clock stops).
    const b1Acks = await pubs.collect(ACK_TIMEOUT_MS);
    const bCpu = cpu.end();
    const after = await gatewayFigures(gw);
    const t1 = Math.max(t1Stored, b1Acks.lastAt);
    const gwRate = N / ((t1 - t0) / 1000);
    const b1Lat = latency(b1Acks.latencies);
    log(
      `    closed loop: ${fmt(N)} readings stored in ${
        ((t1Stored - t0) / 1000).toFixed(2)
      } s, acks in after ${((t1 - t0) / 1000).toFixed(2)} s → ` +
        `${fmt(gwRate)} readings/s (Mosquitto PUBACKed the publishers at ${
          fmt(pub.pubacks / ((pub.tEnd - pub.t0) / 1000))
        }/s)`,
    );
    log(`    publish→ack under saturation (queueing included): ${fmtLatency(b1Lat)}`);
    log(`    ${writerDelta(before, after, b1Samples)}`);
    log(`    ${bCpu.text}`);
    checkAcks("closed loop", b1Acks);
    Object.assign(out, {
      rate: Math.round(gwRate),
      latency_ms: b1Lat,
      writer: {
        rows: after.rows - before.rows,
        batches: after.batches - before.batches,
        mean: round2((after.rows - before.rows) / Math.max(1, after.batches - before.batches)),
        max: after.batchMax,
        batch_ms_mean: b1Samples.batchMsMean,
        queue_mean: b1Samples.queueMean,
      },
      cpu: bCpu.cores,
      us_per_reading: Math.round((bCpu.cores.gateway ?? NaN) * 1e6 / gwRate),
    });

    // b2: open loop at the fixed rate
    const before2 = await gatewayFigures(gw);
    cpu.begin();
    const b2 = pubs.run(warmup + N, FIXED, RATE);
    const t2 = await b2.started;
    const pub2 = await b2.published;
    const { at: t3, samples: b2Samples } = await waitAccepted(gw, accepted += FIXED);
    const b2Acks = await pubs.collect(ACK_TIMEOUT_MS);
    const b2Cpu = cpu.end();
    const after2 = await gatewayFigures(gw);
    const b2Lat = latency(b2Acks.latencies);
    log(
      `    fixed ${fmt(RATE)}/s for ${SECONDS} s: offered ${
        fmt(pub2.sent / ((pub2.tEnd - pub2.t0) / 1000))
      }/s, all ${fmt(FIXED)} stored after ${((t3 - t2) / 1000).toFixed(2)} s (${
        fmt(FIXED / ((t3 - t2) / 1000))
      }/s), acks in after ${((Math.max(t3, b2Acks.lastAt) - t2) / 1000).toFixed(2)} s`,
    );
    log(`    publish→ack (from the scheduled send time): ${fmtLatency(b2Lat)}`);
    log(`    ${writerDelta(before2, after2, b2Samples)}`);
    log(`    ${b2Cpu.text}`);
    checkAcks("fixed rate", b2Acks);
    const fixedRate = FIXED / ((t3 - t2) / 1000);
    out.fixed_rate = {
      stored_rate: Math.round(FIXED / ((t3 - t2) / 1000)),
      latency_ms: b2Lat,
      writer: {
        rows: after2.rows - before2.rows,
        batches: after2.batches - before2.batches,
        mean: round2((after2.rows - before2.rows) / Math.max(1, after2.batches - before2.batches)),
        max: after2.batchMax,
        batch_ms_mean: b2Samples.batchMsMean,
        queue_mean: b2Samples.queueMean,
      },
      cpu: b2Cpu.cores,
      us_per_reading: Math.round((b2Cpu.cores.gateway ?? NaN) * 1e6 / fixedRate),
    };
    return { out, gwRate, b2Lat };
  };
  // "both" alternates on, off, off, on: each mode once early and once late, so neither gains
  // from the order (a warmer machine, a fuller store); a comma list gives any order.
  const modes = (flags.observability === "both" ? "on,off,off,on" : flags.observability)
    .split(",").map((m) => m.trim());
  if (modes.some((m) => m !== "on" && m !== "off")) {
    fatal("--observability: on, off, both or a list");
  }
  type Phase = Awaited<ReturnType<typeof gatewayPhase>>;
  const byMode = new Map<string, Phase[]>();
  for (const [k, mode] of (modes as ("on" | "off")[]).entries()) {
    const clientId = `${GATEWAY_CLIENT_ID}-${mode}-${k}`;
    byMode.set(mode, [...byMode.get(mode) ?? [], await gatewayPhase(mode, clientId)]);
    // The gateway's persistent session would keep queueing readings for it: end it.
    try {
      const cleaner = await connectAsync(mosquitto.url, { clientId, clean: true });
      await cleaner.endAsync();
    } catch (error) {
      log(`    could not end the session of ${clientId}: ${(error as Error).message}`);
    }
  }
  /** The runs of a mode, as one: rates and CPU per reading averaged. */
  const merged = (mode: string) => {
    const phases = byMode.get(mode)!;
    const mean = (f: (p: Phase) => number) => phases.reduce((a, p) => a + f(p), 0) / phases.length;
    const out = phases[0].out as {
      rate: number;
      us_per_reading: number;
      fixed_rate: { us_per_reading: number };
    };
    return {
      ...phases[0],
      gwRate: mean((p) => p.gwRate),
      out: {
        ...out,
        runs: phases.length,
        rate: Math.round(mean((p) => (p.out as typeof out).rate)),
        us_per_reading: Math.round(mean((p) => (p.out as typeof out).us_per_reading)),
        fixed_rate: {
          ...out.fixed_rate,
          us_per_reading: Math.round(mean((p) => (p.out as typeof out).fixed_rate.us_per_reading)),
        },
      },
    };
  };
  const runs = new Map([...byMode.keys()].map((mode) => [mode, merged(mode)]));
  const main = runs.get(modes[0])!;
  result.gateway = main.out;
  const gwRate = main.gwRate;
  const b2Lat = main.b2Lat;
  if (runs.has("on") && runs.has("off")) {
    const on = runs.get("on")!.out as {
      rate: number;
      us_per_reading: number;
      fixed_rate: { us_per_reading: number };
    };
    const off = runs.get("off")!.out as typeof on;
    result.gateway_observability_off = off;
    result.observability = {
      rate_ratio: round2(on.rate / off.rate),
      us_per_reading_ratio: round2(on.us_per_reading / off.us_per_reading),
      fixed_rate_us_per_reading_ratio: round2(
        on.fixed_rate.us_per_reading / off.fixed_rate.us_per_reading,
      ),
    };
    log(
      `observability: metrics and logging on vs off: closed loop ${fmt(on.rate)} vs ${
        fmt(off.rate)
      } readings/s (ratio ${
        (on.rate / off.rate).toFixed(3)
      }), gateway CPU ${on.us_per_reading} vs ${off.us_per_reading} µs/reading (ratio ${
        (on.us_per_reading / off.us_per_reading).toFixed(3)
      }); at the fixed rate ${on.fixed_rate.us_per_reading} vs ${off.fixed_rate.us_per_reading} µs/reading`,
    );
  }

  const nullRate = (result.null_subscriber as { rate: number }).rate;
  const ratio = gwRate / nullRate;
  const echoRate = (result.echo as { rate: number }).rate;
  result.ratio = round2(ratio);
  result.ratio_to_echo = round2(gwRate / echoRate);
  log(
    `summary: null subscriber ${fmt(nullRate)}/s, echo floor ${fmt(echoRate)}/s (e/a ${
      (echoRate / nullRate).toFixed(2)
    }), gateway ${fmt(gwRate)}/s, ratio b/a ${ratio.toFixed(2)}, b/e ${
      (gwRate / echoRate).toFixed(2)
    }; publish→ack at ${fmt(RATE)}/s p50 ${b2Lat.p50.toFixed(1)} / p95 ${
      b2Lat.p95.toFixed(1)
    } / p99 ${b2Lat.p99.toFixed(1)} ms`,
  );
  log(`load average after the run: ${load()}`);
  if (/dropped/i.test(mosquitto.log())) {
    log("warning: Mosquitto logged dropped messages:\n" + mosquitto.log());
  }
  if (flags.json) console.log(JSON.stringify(result));
}

/** Every sampled reading of a run got an `accepted` ack. */
function checkAcks(phase: string, acks: Extract<FromWorker, { type: "collected" }>): void {
  const { tally, expected } = acks;
  if (tally.accepted !== expected || tally.duplicate > 0 || Object.keys(tally.rejected).length) {
    console.log(
      `    warning (${phase}): of ${expected} sampled readings, acks: ${JSON.stringify(tally)}`,
    );
  }
}

/**
 * Waits until the gateway consumes readings: an unparsable probe on an unregistered meter's
 * topic is answered with a `rejected` ack once the gateway's subscription is in place.
 */
async function waitForIngress(url: string): Promise<void> {
  const probe = await connectAsync(url, { protocolVersion: 4, clientId: "bench-probe" });
  try {
    const answered = new Promise<void>((resolve) => probe.on("message", () => resolve()));
    await probe.subscribeAsync("meters/bench-probe/acks", { qos: 1 });
    const deadline = performance.now() + 30_000;
    let done = false;
    answered.then(() => done = true);
    while (!done) {
      if (performance.now() > deadline) throw new Error("the gateway never consumed a probe");
      await probe.publishAsync("meters/bench-probe/readings", "probe", { qos: 1 });
      await Promise.race([answered, sleep(200)]);
    }
  } finally {
    await probe.endAsync();
  }
}

if (typeof (globalThis as { WorkerGlobalScope?: unknown }).WorkerGlobalScope !== "undefined") {
  publisherWorker();
} else if (import.meta.main) {
  // Ctrl-C (or SIGTERM) stops what the bench started before exiting.
  const interrupted = async () => {
    for (const dispose of [...exitHooks].reverse()) await dispose().catch(() => {});
    Deno.exit(130);
  };
  Deno.addSignalListener("SIGINT", interrupted);
  Deno.addSignalListener("SIGTERM", interrupted);
  try {
    await main();
  } finally {
    Deno.removeSignalListener("SIGINT", interrupted);
    Deno.removeSignalListener("SIGTERM", interrupted);
  }
}
