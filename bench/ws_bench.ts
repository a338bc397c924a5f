// deno task bench:ws — WebSocket fan-out across two gateway instances.
//
// Two `main.ts` processes share one PostgreSQL schema and one private redis-server (MQTT off).
// 1,000 WebSocket clients, in client processes of their own (`--worker`), are spread over both
// instances; each follows 3 of its account's meters, and every meter has followers on both
// instances. This process is the load generator: an open loop of signed HTTP submissions split
// over both instances (a meter always goes to the same one), at a fixed rate. Measured: latency
// from the submission to each client's receipt (two bounds, see below), delivery completeness
// per client, the CPU of every process per delivered message, and Redis commands per reading.
import { parseArgs } from "node:util";
import { canonicalMessage, signHmac } from "../core/signature.ts";
import {
  cpuMs,
  createUsers,
  delay,
  fmt,
  importMeters,
  isoSecond,
  loadAverage,
  machineMs,
  metric,
  pct,
  postgresPids,
  redisCounters,
  redisPid,
  startCluster,
  wallMs,
} from "./_cluster.ts";

const { values: args } = parseArgs({
  options: {
    rate: { type: "string", default: "2000" },
    seconds: { type: "string", default: "25" },
    warmup: { type: "string", default: "5" },
    /** Seconds of submissions at the rate before any client connects (ingest cost alone). */
    "ingest-only": { type: "string", default: "8" },
    clients: { type: "string", default: "1000" },
    meters: { type: "string", default: "500" },
    users: { type: "string", default: "10" },
    follow: { type: "string", default: "3" },
    "client-procs": { type: "string", default: "2" },
    /** Concurrent submissions at most (keep-alive connections of the load generator). */
    workers: { type: "string", default: "128" },
    // Internal: run as a client process on the job file.
    worker: { type: "boolean", default: false },
    job: { type: "string" },
  },
});

// --- client process ---------------------------------------------------------------------------

interface ClientJob {
  url: string;
  token: string;
  meters: string[];
}

interface ClientResult {
  /** Reading ids received, in arrival order, and the wall-clock ms of each arrival. */
  ids: string[];
  times: number[];
  /** Other messages by type (resync_required, error, …). */
  other: Record<string, number>;
  closed: string | null;
}

async function runClients(jobPath: string): Promise<void> {
  const jobs: ClientJob[] = JSON.parse(await Deno.readTextFile(jobPath));
  const results: ClientResult[] = [];
  let lastMessage = wallMs();
  const open = async (job: ClientJob, result: ClientResult) => {
    const ws = new WebSocket(`${job.url.replace(/^http/, "ws")}/ws?token=${job.token}`);
    let subscribed: () => void;
    let failed: (e: Error) => void;
    const ready = new Promise<void>((resolve, reject) => {
      subscribed = resolve;
      failed = reject;
    });
    ws.onmessage = (event) => {
      const t = wallMs();
      lastMessage = t;
      const m = JSON.parse(event.data as string);
      if (m.type === "meter.reading.accepted") {
        result.ids.push(m.data.id);
        result.times.push(t);
      } else if (m.type === "subscribed") {
        subscribed();
      } else {
        result.other[m.type] = (result.other[m.type] ?? 0) + 1;
        if (m.type === "error") failed(new Error(JSON.stringify(m)));
      }
    };
    ws.onclose = (e) => {
      result.closed = `${e.code} ${e.reason}`;
      failed(new Error(`closed ${e.code} ${e.reason}`));
    };
    await new Promise<void>((resolve, reject) => {
      ws.onopen = () => resolve();
      ws.onerror = () => reject(new Error("websocket error before open"));
    });
    ws.send(JSON.stringify({ type: "subscribe", meters: job.meters }));
    await ready;
    return ws;
  };
  const sockets: WebSocket[] = [];
  for (let i = 0; i < jobs.length; i += 50) {
    const batch = jobs.slice(i, i + 50).map((job) => {
      const result: ClientResult = { ids: [], times: [], other: {}, closed: null };
      results.push(result);
      return open(job, result);
    });
    sockets.push(...await Promise.all(batch));
  }
  const out = new TextEncoder();
  await Deno.stdout.write(out.encode("ready\n"));
  // "stop" on stdin: wait until nothing arrived for 1.5 s, then write the results.
  const lines = Deno.stdin.readable.pipeThrough(new TextDecoderStream()).getReader();
  let input = "";
  while (!input.includes("stop")) {
    const { value, done } = await lines.read();
    if (done) break;
    input += value;
  }
  const deadline = wallMs() + 60_000;
  while (wallMs() - lastMessage < 1_500 && wallMs() < deadline) await delay(100);
  await Deno.writeTextFile(`${jobPath}.out`, JSON.stringify(results));
  await Deno.stdout.write(out.encode("done\n"));
  for (const ws of sockets) ws.close();
}

if (args.worker) {
  await runClients(args.job!);
  Deno.exit(0);
}

// --- coordinator and load generator -------------------------------------------------------------

const RATE = Number(args.rate), SECONDS = Number(args.seconds), WARMUP = Number(args.warmup);
const INGEST_ONLY = Number(args["ingest-only"]);
const CLIENTS = Number(args.clients), METERS = Number(args.meters), USERS = Number(args.users);
const FOLLOW = Number(args.follow), PROCS = Number(args["client-procs"]);
const WORKERS = Number(args.workers);
const PER_USER_CLIENTS = Math.ceil(CLIENTS / USERS);

console.log(
  `bench:ws — ${CLIENTS} WebSocket clients over 2 instances, ${METERS} meters of ${USERS} ` +
    `accounts, ${FOLLOW} meters per client, ${RATE} readings/s for ${SECONDS} s (+${WARMUP} s ` +
    `warm-up); Deno ${Deno.version.deno}, ${navigator.hardwareConcurrency} cores, load ${loadAverage()}`,
);

await using cluster = await startCluster(2, {
  DEDUPE_WINDOW: "1s",
  METER_RATE_BURST: "1000000",
  METER_RATE_PER_MINUTE: "1000000",
  // 1,000 clients of 10 accounts: 100 connections per account (50 per instance).
  WS_MAX_CONNECTIONS_PER_USER: "1000",
});
const [gwA, gwB] = cluster.gateways;
const gateways = [gwA, gwB];
const admin = cluster.adminToken;

// Accounts, meters (meter m belongs to account m % USERS), and the clients' selections.
const users = await createUsers(cluster, USERS, "ws");
const meterIds = Array.from({ length: METERS }, (_, i) => `ws-${i}`);
const secrets = await importMeters(cluster, meterIds, meterIds.map((_, i) => users[i % USERS].id));
const metersOf = users.map((_, u) => meterIds.filter((_, i) => i % USERS === u));

interface PlannedClient extends ClientJob {
  instance: number;
}
const planned: PlannedClient[] = [];
for (let c = 0; c < CLIENTS; c++) {
  const u = c % USERS, k = Math.floor(c / USERS);
  const own = metersOf[u];
  const meters = Array.from({ length: FOLLOW }, (_, j) => own[(k * FOLLOW + j) % own.length]);
  const instance = k % 2;
  planned.push({ url: gateways[instance].url, token: users[u].token, meters, instance });
}
const followers = new Map<string, [number, number]>();
for (const c of planned) {
  for (const m of c.meters) {
    const f = followers.get(m) ?? [0, 0];
    f[c.instance]++;
    followers.set(m, f);
  }
}
const bothSides = [...followers.values()].filter(([a, b]) => a > 0 && b > 0).length;
const perMeter = [...followers.values()].map(([a, b]) => a + b);
console.log(
  `  ${PER_USER_CLIENTS} clients per account; followers per meter ${Math.min(...perMeter)}–${
    Math.max(...perMeter)
  }, ${bothSides} of ${followers.size} meters followed on both instances`,
);

// Pre-signed readings: reading i is meter i % METERS, its slot i / METERS is 2 s after the
// previous one (DEDUPE_WINDOW 1 s), the newest a minute ago; meter m goes to instance m % 2.
const TOTAL = RATE * (INGEST_ONLY + WARMUP + SECONDS);
const slots = Math.ceil(TOTAL / METERS);
const base = Math.floor(Date.now() / 1000) * 1000 - 60_000 - slots * 2_000;
const bodies: string[] = new Array(TOTAL);
for (let i = 0; i < TOTAL; i++) {
  const meter = meterIds[i % METERS];
  const ts = isoSecond(base + Math.floor(i / METERS) * 2_000);
  const kwh = String(Number((1 + (i % 997) / 100).toFixed(2))); // canonical: no "1.50"
  bodies[i] = JSON.stringify({
    meter_id: meter,
    kwh_amount: kwh,
    reading_timestamp: ts,
    device_signature: signHmac(secrets.get(meter)!, canonicalMessage(meter, ts, kwh)),
  });
}
const sentAt = new Float64Array(TOTAL), ackAt = new Float64Array(TOTAL);
const status = new Uint16Array(TOTAL);
const readingId: string[] = new Array(TOTAL);
let firstError = "";
let lag = 0; // how late the generator sent, at worst (ms behind schedule)

async function submit(i: number): Promise<void> {
  const gw = gateways[(i % METERS) % 2];
  sentAt[i] = wallMs();
  try {
    const res = await fetch(gw.url + "/api/meters/submit-reading", {
      method: "POST",
      headers: { "content-type": "application/json", authorization: `Bearer ${admin}` },
      body: bodies[i],
    });
    const text = await res.text();
    ackAt[i] = wallMs();
    status[i] = res.status;
    if (res.status === 201) readingId[i] = JSON.parse(text).id;
  } catch (error) {
    ackAt[i] = wallMs();
    status[i] = 599;
    if (!firstError) firstError = String(error);
  }
}

/**
 * Readings [from, to) at RATE through WORKERS concurrent requests (at most; each worker keeps one
 * keep-alive connection busy): reading i is due at start + i / RATE and is sent when due, or as
 * soon as a worker is free when the gateways fall behind. Latency is measured from the actual
 * send, so a generator that falls behind shows up as a lower achieved rate, not as latency.
 */
async function offer(from: number, to: number, at?: Map<number, () => void>): Promise<void> {
  const start = performance.now();
  let next = from;
  await Promise.all(Array.from({ length: WORKERS }, async () => {
    while (next < to) {
      const i = next++;
      at?.get(i)?.();
      const due = start + ((i - from) * 1000) / RATE;
      const wait = due - performance.now();
      if (wait > 1) await delay(wait);
      else lag = Math.max(lag, -wait);
      await submit(i);
    }
  }));
}

interface Snapshot {
  wall: number;
  cpu: Record<string, number>;
  machine: { busy: number; total: number };
  redis: Record<string, number>;
  writerRows: number;
  writerBatches: number;
}

let pids: Record<string, number[]> = {};
async function snapshot(): Promise<Snapshot> {
  const cpu: Record<string, number> = {};
  for (const [name, list] of Object.entries(pids)) {
    cpu[name] = list.reduce((sum, pid) => sum + (cpuMs(pid) || 0), 0);
  }
  const wall = wallMs(), machine = machineMs();
  const [redis, ...writer] = await Promise.all([
    redisCounters(cluster.redis),
    ...gateways.flatMap((gw) => [
      metric(gw.url, admin, "gateway_writer_rows_total"),
      metric(gw.url, admin, "gateway_writer_batches_total"),
    ]),
  ]);
  const writerRows = writer[0] + writer[2], writerBatches = writer[1] + writer[3];
  return { wall, cpu, machine, redis, writerRows, writerBatches };
}

function cpuTable(
  a: Snapshot,
  b: Snapshot,
  perUnit: number,
  unit: string,
  readings?: number,
): void {
  const seconds = (b.wall - a.wall) / 1000;
  const busy = (b.machine.busy - a.machine.busy) / 1000;
  const total = (b.machine.total - a.machine.total) / 1000;
  console.log(
    `  machine: ${(busy / seconds).toFixed(2)} of ${(total / seconds).toFixed(2)} cores busy ` +
      `over ${seconds.toFixed(1)} s`,
  );
  let ours = 0;
  for (const name of Object.keys(b.cpu)) {
    const ms = b.cpu[name] - a.cpu[name];
    ours += ms;
    console.log(
      `  ${name.padEnd(18)} ${(ms / 1000 / seconds).toFixed(2)} cores${
        perUnit > 0 ? `, ${(ms * 1000 / perUnit).toFixed(1)} µs per ${unit}` : ""
      }${readings ? `, ${(ms * 1000 / readings).toFixed(0)} µs per committed reading` : ""}`,
    );
  }
  console.log(
    `  ${"other processes".padEnd(18)} ${((busy - ours / 1000) / seconds).toFixed(2)} cores`,
  );
}

const redisPidValue = await redisPid(cluster.redis);
pids = {
  "gateway A": [gwA.child.pid],
  "gateway B": [gwB.child.pid],
  "load generator": [Deno.pid],
  redis: [redisPidValue],
  postgres: await postgresPids(cluster),
};

// Idle: what the processes cost with nothing to do (rate sync, timers, the bus).
{
  pids.postgres = await postgresPids(cluster);
  const a = await snapshot();
  await delay(3_000);
  const b = await snapshot();
  console.log(`\nidle, 3 s:`);
  cpuTable(a, b, 0, "");
}

// Phase 0: ingestion alone (no client yet) — also warms actors, JIT and connection pools.
let cursor = 0;
{
  const n = RATE * INGEST_ONLY;
  const warm = Math.min(n, RATE * 2);
  await offer(0, warm);
  pids.postgres = await postgresPids(cluster); // the pools' connections exist by now
  const a = await snapshot();
  await offer(warm, n);
  const b = await snapshot();
  cursor = n;
  const ok = status.subarray(warm, n).filter((s) => s === 201).length;
  const seconds = (b.wall - a.wall) / 1000;
  console.log(
    `\ningestion alone, ${fmt(n - warm)} readings in ${seconds.toFixed(1)} s ` +
      `(${fmt(ok / seconds)} committed/s; generator at worst ${lag.toFixed(0)} ms late):`,
  );
  cpuTable(a, b, ok, "reading");
  const publishes = (b.redis.publish ?? 0) - (a.redis.publish ?? 0);
  console.log(
    `  Redis: ${(publishes / ok).toFixed(2)} PUBLISH and ${
      ((b.redis.total_commands_processed - a.redis.total_commands_processed) / ok).toFixed(2)
    } commands per committed reading; writer batches mean ${
      ((b.writerRows - a.writerRows) / (b.writerBatches - a.writerBatches)).toFixed(1)
    } rows`,
  );
}

// Client processes.
const dir = await Deno.makeTempDir({ prefix: "gw-wsbench-" });
const procs: {
  child: Deno.ChildProcess;
  job: string;
  clients: number[];
  lines: ReadableStreamDefaultReader<string>;
}[] = [];
const connectStart = performance.now();
for (let p = 0; p < PROCS; p++) {
  const clients = planned.map((_, c) => c).filter((c) => c % PROCS === p);
  const job = `${dir}/clients-${p}.json`;
  await Deno.writeTextFile(job, JSON.stringify(clients.map((c) => planned[c])));
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", "--allow-all", new URL(import.meta.url).pathname, "--worker", "--job", job],
    stdin: "piped",
    stdout: "piped",
    stderr: "inherit",
  }).spawn();
  const lines = child.stdout.pipeThrough(new TextDecoderStream()).getReader();
  procs.push({ child, job, clients, lines });
}
const waitFor = async (word: string) => {
  for (const p of procs) {
    let text = "";
    while (!text.includes(word)) {
      const { value, done } = await p.lines.read();
      if (done) throw new Error(`client process exited before "${word}"`);
      text += value;
    }
  }
};
await waitFor("ready");
console.log(
  `\n${CLIENTS} clients connected and subscribed in ${
    ((performance.now() - connectStart) / 1000).toFixed(1)
  } s, in ${PROCS} client processes`,
);
pids["clients"] = procs.map((p) => p.child.pid);

// Phases 1 and 2: warm-up with the clients, then the measured window, as one open loop.
const measuredFrom = cursor + RATE * WARMUP;
let before: Snapshot | undefined;
let beforeDone: Promise<void> | undefined;
lag = 0;
await offer(
  cursor,
  TOTAL,
  new Map([[measuredFrom, () => {
    beforeDone = snapshot().then((s) => {
      before = s;
    });
  }]]),
);
const after = await snapshot();
await beforeDone;
const encoder = new TextEncoder();
for (const p of procs) {
  const w = p.child.stdin.getWriter();
  await w.write(encoder.encode("stop\n"));
  w.releaseLock();
}
await waitFor("done");

// --- results --------------------------------------------------------------------------------

const index = new Map<string, number>();
for (let i = cursor; i < TOTAL; i++) if (status[i] === 201) index.set(readingId[i], i);
const committedBy = new Map<string, number[]>(); // meter → committed reading indices (with clients)
for (let i = cursor; i < TOTAL; i++) {
  if (status[i] !== 201) continue;
  const m = meterIds[i % METERS];
  const list = committedBy.get(m) ?? [];
  list.push(i);
  committedBy.set(m, list);
}
const statuses: Record<number, number> = {};
for (let i = cursor; i < TOTAL; i++) statuses[status[i]] = (statuses[status[i]] ?? 0) + 1;

const fromSent: number[] = [], fromAck: number[] = [];
// 201 → client, split by path: the committing instance's own clients (in-process bus) and the
// other instance's (through Redis).
const ackLocal: number[] = [], ackRemote: number[] = [];
let expected = 0, duplicates = 0, missing = 0, unexpected = 0, delivered = 0;
let incomplete = 0;
const other: Record<string, number> = {};
const closed: string[] = [];
for (const p of procs) {
  const results: ClientResult[] = JSON.parse(await Deno.readTextFile(`${p.job}.out`));
  results.forEach((r, j) => {
    const client = planned[p.clients[j]];
    for (const [type, n] of Object.entries(r.other)) other[type] = (other[type] ?? 0) + n;
    if (r.closed && !r.closed.startsWith("1005")) closed.push(r.closed);
    const want = new Set<number>();
    for (const m of client.meters) for (const i of committedBy.get(m) ?? []) want.add(i);
    const seen = new Set<number>();
    r.ids.forEach((id, k) => {
      const i = index.get(id);
      if (i === undefined || !want.has(i)) {
        unexpected++;
        return;
      }
      if (seen.has(i)) {
        duplicates++;
        return;
      }
      seen.add(i);
      if (i >= measuredFrom) {
        delivered++;
        fromSent.push(r.times[k] - sentAt[i]);
        fromAck.push(r.times[k] - ackAt[i]);
        ((i % METERS) % 2 === client.instance ? ackLocal : ackRemote).push(r.times[k] - ackAt[i]);
      }
    });
    expected += want.size;
    const lost = want.size - seen.size;
    missing += lost;
    if (lost > 0) incomplete++;
  });
}
fromSent.sort((a, b) => a - b);
fromAck.sort((a, b) => a - b);
ackLocal.sort((a, b) => a - b);
ackRemote.sort((a, b) => a - b);

const committed = [...status.subarray(measuredFrom)].filter((s) => s === 201).length;
const seconds = (after.wall - before!.wall) / 1000;
console.log(
  `\nmeasured window: ${fmt(TOTAL - measuredFrom)} readings (${fmt(RATE)}/s asked) sent in ${
    seconds.toFixed(1)
  } s, ` +
    `${fmt(committed / seconds)} committed/s (generator at worst ${lag.toFixed(0)} ms late); ` +
    `statuses over warm-up and window ${JSON.stringify(statuses)}${
      firstError ? `; first failure: ${firstError}` : ""
    }`,
);
const line = (name: string, v: number[]) =>
  `  ${name}: p50 ${pct(v, 0.5).toFixed(1)} ms, p95 ${pct(v, 0.95).toFixed(1)} ms, p99 ${
    pct(v, 0.99).toFixed(1)
  } ms, max ${v.at(-1)?.toFixed(1)} ms`;
console.log(`latency over ${fmt(delivered)} deliveries of the window's readings:`);
console.log(line("submit sent → client received (upper bound)", fromSent));
console.log(line("201 received → client received (lower bound, may be < 0)", fromAck));
console.log(line("  of which clients on the committing instance", ackLocal));
console.log(line("  of which clients on the other instance (via Redis)", ackRemote));
console.log(
  `completeness (warm-up and window): ${fmt(expected - missing)} of ${fmt(expected)} ` +
    `expected deliveries (${((expected - missing) / expected * 100).toFixed(3)} %), ` +
    `${incomplete} clients incomplete, duplicates ${duplicates}, unexpected ${unexpected}; ` +
    `other messages ${JSON.stringify(other)}; abnormal closes ${closed.length}`,
);
console.log(`CPU per delivered message (${fmt(delivered)} deliveries of the window's readings):`);
cpuTable(before!, after, delivered, "delivery", committed);
const publishes = (after.redis.publish ?? 0) - (before!.redis.publish ?? 0);
const commands = after.redis.total_commands_processed - before!.redis.total_commands_processed;
const redisDelta: Record<string, number> = {};
for (const [k, v] of Object.entries(after.redis)) {
  const d = v - (before!.redis[k] ?? 0);
  if (d > 0 && k !== "total_commands_processed") redisDelta[k] = d;
}
console.log(
  `Redis: ${(publishes / committed).toFixed(2)} PUBLISH per committed reading, ` +
    `${(commands / committed).toFixed(2)} commands in all (${JSON.stringify(redisDelta)}); ` +
    `writer batches mean ${
      ((after.writerRows - before!.writerRows) / (after.writerBatches - before!.writerBatches))
        .toFixed(1)
    } rows`,
);
for (const p of procs) await p.child.status;
await Deno.remove(dir, { recursive: true });
