// deno task bench:cache — the shared read cache under a dashboard read mix, on and off.
//
// Two `main.ts` processes on one PostgreSQL schema of their own and one private redis-server
// (MQTT off). 200 users × 5 meters have dashboards that poll, every 5 s each, their stats
// (`GET /api/meters/stats`), each meter's 20 newest readings and each meter's hourly stats of
// the last 24 closed hours, alternating between the instances, while readings arrive at 200/s
// over a fleet of 12,000 meters (each reports once a minute; the 1,000 dashboard meters are part
// of it). The same invocation runs the mix twice: with the cache on (default TTLs), then with
// it off (every TTL 0), on the same data. Measured in each run: the cache's hit rate (from
// `/metrics`), PostgreSQL's load (table scans of the bench schema and commits of the database,
// from pg_stat_*), read latency by kind, and the CPU of each process.
import { parseArgs } from "node:util";
import type { Buffer } from "node:buffer";
import { canonicalMessage, signHmac } from "../core/signature.ts";
import {
  api,
  type BenchUser,
  type Cluster,
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
  postgresCounters,
  postgresPids,
  redisCounters,
  redisPid,
  startCluster,
  wallMs,
} from "./_cluster.ts";

const { values: args } = parseArgs({
  options: {
    users: { type: "string", default: "200" },
    "meters-per-user": { type: "string", default: "5" },
    fleet: { type: "string", default: "12000" },
    "write-rate": { type: "string", default: "200" },
    poll: { type: "string", default: "5" },
    seconds: { type: "string", default: "30" },
    warmup: { type: "string", default: "5" },
    history: { type: "string", default: "24" },
    instances: { type: "string", default: "2" },
    /** Seconds of writes alone measured before the dashboards start, in each run. */
    baseline: { type: "string", default: "10" },
    /** Which run goes first: "on" (default) or "off"; the other follows on the same data. */
    first: { type: "string", default: "on" },
  },
});
const USERS = Number(args.users), PER_USER = Number(args["meters-per-user"]);
const FLEET = Number(args.fleet), WRITE_RATE = Number(args["write-rate"]);
const POLL_MS = Number(args.poll) * 1000, SECONDS = Number(args.seconds);
const WARMUP = Number(args.warmup), HISTORY = Number(args.history);
const INSTANCES = Number(args.instances), BASELINE = Number(args.baseline);
const HOUR = 3_600_000;
const DURATION = "cache_operation_duration_seconds";
const CACHE_TYPES = ["user_stats", "recent_readings", "hourly_stats"] as const;

console.log(
  `bench:cache — ${USERS} dashboards × ${PER_USER} meters polling every ${POLL_MS / 1000} s, ` +
    `${WRITE_RATE} readings/s over ${
      fmt(FLEET)
    } meters, ${INSTANCES} instances; Deno ${Deno.version.deno}, ` +
    `${navigator.hardwareConcurrency} cores, load ${loadAverage()}`,
);

const BASE_ENV = {
  DEDUPE_WINDOW: "1s",
  METER_RATE_BURST: "1000000",
  METER_RATE_PER_MINUTE: "1000000",
};
const CACHE_OFF = {
  CACHE_USER_STATS_TTL: "0",
  CACHE_RECENT_READINGS_TTL: "0",
  CACHE_HOURLY_STATS_TTL: "0",
};

await using cluster = await startCluster(INSTANCES, BASE_ENV);
const setupStart = performance.now();
const users = await createUsers(cluster, USERS + 1, "dash");
const fleetOwner = users.pop()!;
const dashMeters = users.map((_, u) =>
  Array.from({ length: PER_USER }, (_, j) => `dash-${u}-${j}`)
);
const all = dashMeters.flat();
const owners = users.flatMap((u) => Array<string>(PER_USER).fill(u.id));
for (let i = all.length; i < FLEET; i++) {
  all.push(`fleet-${i}`);
  owners.push(fleetOwner.id);
}
const secrets = await importMeters(cluster, all, owners);

function body(meter: string, ts: string, n: number): string {
  const kwh = String(Number((1 + (n % 997) / 100).toFixed(2)));
  return JSON.stringify({
    meter_id: meter,
    kwh_amount: kwh,
    reading_timestamp: ts,
    device_signature: signHmac(secrets.get(meter) as Buffer, canonicalMessage(meter, ts, kwh)),
  });
}

async function submit(gw: number, text: string): Promise<number> {
  const res = await fetch(cluster.gateways[gw].url + "/api/meters/submit-reading", {
    method: "POST",
    headers: {
      "content-type": "application/json",
      authorization: `Bearer ${cluster.adminToken}`,
    },
    body: text,
  });
  await res.body?.cancel();
  return res.status;
}

// History: one reading per dashboard meter in each of the last HISTORY closed hours.
{
  const hourNow = Math.floor(Date.now() / HOUR) * HOUR;
  const jobs: string[] = [];
  for (let h = 1; h <= HISTORY; h++) {
    for (const m of all.slice(0, USERS * PER_USER)) {
      jobs.push(body(m, isoSecond(hourNow - h * HOUR + 17 * 60_000), h));
    }
  }
  let next = 0, failed = 0;
  await Promise.all(Array.from({ length: 32 }, async (_, w) => {
    while (next < jobs.length) {
      const i = next++;
      if (await submit((i + w) % INSTANCES, jobs[i]) !== 201) failed++;
    }
  }));
  console.log(
    `set-up: ${USERS + 1} accounts, ${fmt(FLEET)} meters, ${fmt(jobs.length)} history readings ` +
      `(${failed} refused) in ${((performance.now() - setupStart) / 1000).toFixed(1)} s`,
  );
}

// --- load -------------------------------------------------------------------------------------

/** Live writes: reading n goes to meter all[n % FLEET] (shuffled order), stamped now. */
const order = [...all];
for (let i = order.length - 1; i > 0; i--) {
  const j = Math.floor(Math.random() * (i + 1));
  [order[i], order[j]] = [order[j], order[i]];
}
let written = 0;

type Kind = "stats" | "recent" | "hourly";
interface Sample {
  at: number;
  kind: Kind;
  ms: number;
  status: number;
}

class Load {
  samples: Sample[] = [];
  writeStatus: Record<number, number> = {};
  #stop = false;
  #tasks: Promise<void>[] = [];

  writes(): void {
    this.#tasks.push((async () => {
      const start = performance.now();
      const inflight = new Set<Promise<void>>();
      for (let k = 0; !this.#stop; k++) {
        const due = start + (k * 1000) / WRITE_RATE;
        const wait = due - performance.now();
        if (wait > 1) await delay(wait);
        const n = written++;
        const p = submit(n % INSTANCES, body(order[n % FLEET], isoSecond(Date.now()), n)).then(
          (s) => {
            this.writeStatus[s] = (this.writeStatus[s] ?? 0) + 1;
          },
          () => {
            this.writeStatus[599] = (this.writeStatus[599] ?? 0) + 1;
          },
        );
        inflight.add(p);
        p.finally(() => inflight.delete(p));
      }
      await Promise.all(inflight);
    })());
  }

  dashboards(): void {
    const start = performance.now();
    users.forEach((user, u) => {
      this.#tasks.push((async () => {
        for (let k = 0; !this.#stop; k++) {
          const due = start + (u / USERS) * POLL_MS + k * POLL_MS;
          const wait = due - performance.now();
          if (wait > 1) await delay(wait);
          if (this.#stop) break;
          await this.#poll(user, dashMeters[u], (u + k) % INSTANCES);
        }
      })());
    });
  }

  async #poll(user: BenchUser, meters: string[], gw: number): Promise<void> {
    const base = cluster.gateways[gw].url;
    const end = Math.floor(Date.now() / HOUR) * HOUR;
    const range = `start=${new Date(end - 24 * HOUR).toISOString()}&end=${
      new Date(end).toISOString()
    }`;
    const get = async (kind: Kind, path: string) => {
      const t = performance.now();
      let status = 599;
      try {
        const res = await fetch(base + path, {
          headers: { authorization: `Bearer ${user.token}` },
        });
        await res.arrayBuffer();
        status = res.status;
      } catch { /* counted as 599 */ }
      this.samples.push({ at: wallMs(), kind, ms: performance.now() - t, status });
    };
    await Promise.all([
      get("stats", "/api/meters/stats"),
      ...meters.map((m) => get("recent", `/api/meters/readings?meter_id=${m}&limit=20`)),
      ...meters.map((m) => get("hourly", `/api/meters/${m}/stats/hourly?${range}`)),
    ]);
  }

  async stop(): Promise<void> {
    this.#stop = true;
    await Promise.all(this.#tasks);
  }
}

interface Snapshot {
  wall: number;
  cpu: Record<string, number>;
  machine: { busy: number; total: number };
  pg: Awaited<ReturnType<typeof postgresCounters>>;
  redis: Record<string, number>;
  hits: Record<string, number>;
  misses: Record<string, number>;
  errors: number;
  /** Cache `get` operations: count, total seconds, and how many took at most 50 ms. */
  gets: { count: number; sum: number; fast: number };
}

async function snapshot(pids: Record<string, number[]>): Promise<Snapshot> {
  const cpu: Record<string, number> = {};
  for (const [name, list] of Object.entries(pids)) {
    cpu[name] = list.reduce((sum, pid) => sum + (cpuMs(pid) || 0), 0);
  }
  const wall = wallMs(), machine = machineMs();
  const [pg, redis] = await Promise.all([postgresCounters(cluster), redisCounters(cluster.redis)]);
  const hits: Record<string, number> = {}, misses: Record<string, number> = {};
  let errors = 0;
  const gets = { count: 0, sum: 0, fast: 0 };
  for (const gw of cluster.gateways) {
    const token = cluster.adminToken;
    for (const type of CACHE_TYPES) {
      const label = `cache_type="${type}"`;
      hits[type] = (hits[type] ?? 0) + await metric(gw.url, token, "cache_hits_total", label);
      misses[type] = (misses[type] ?? 0) + await metric(gw.url, token, "cache_misses_total", label);
    }
    errors += await metric(gw.url, token, "cache_errors_total");
    const op = 'operation="get"';
    gets.count += await metric(gw.url, token, `${DURATION}_count`, op);
    gets.sum += await metric(gw.url, token, `${DURATION}_sum`, op);
    gets.fast += await metric(gw.url, token, `${DURATION}_bucket`, [op, 'le="0.05"']);
  }
  return { wall, cpu, machine, pg, redis, hits, misses, errors, gets };
}

async function pidsOf(c: Cluster): Promise<Record<string, number[]>> {
  const pids: Record<string, number[]> = {};
  c.gateways.forEach((gw, i) => pids[`gateway ${String.fromCharCode(65 + i)}`] = [gw.child.pid]);
  pids["load generator"] = [Deno.pid];
  pids["redis"] = [await redisPid(c.redis)];
  pids["postgres"] = await postgresPids(c);
  return pids;
}

interface RunResult {
  name: string;
  seconds: number;
  reads: number;
  readsOk: number;
  writes: number;
  latency: Record<string, number[]>;
  hitRate: Record<string, number>;
  hitsTotal: number;
  missesTotal: number;
  errors: number;
  getMeanMs: number;
  getSlow: number;
  scansPerS: number;
  commitsPerS: number;
  byTable: Record<string, number>;
  cpu: Record<string, number>;
  machineCores: number;
  redisPerS: number;
}

function delta(a: Snapshot, b: Snapshot, name: string, samples: Sample[]): RunResult {
  const seconds = (b.wall - a.wall) / 1000;
  const inWindow = samples.filter((s) => s.at >= a.wall && s.at <= b.wall);
  const latency: Record<string, number[]> = { all: [] };
  for (const s of inWindow) {
    (latency[s.kind] ??= []).push(s.ms);
    latency.all.push(s.ms);
  }
  for (const v of Object.values(latency)) v.sort((x, y) => x - y);
  const hitRate: Record<string, number> = {};
  let hitsTotal = 0, missesTotal = 0;
  for (const type of CACHE_TYPES) {
    const h = b.hits[type] - a.hits[type], m = b.misses[type] - a.misses[type];
    hitRate[type] = h / (h + m);
    hitsTotal += h;
    missesTotal += m;
  }
  const cpu: Record<string, number> = {};
  for (const k of Object.keys(b.cpu)) cpu[k] = (b.cpu[k] - a.cpu[k]) / 1000 / seconds;
  const byTable: Record<string, number> = {};
  for (const [t, v] of Object.entries(b.pg.byTable)) {
    const d = (v - (a.pg.byTable[t] ?? 0)) / seconds;
    if (d > 0) byTable[t] = d;
  }
  return {
    name,
    seconds,
    reads: inWindow.length,
    readsOk: inWindow.filter((s) => s.status === 200).length,
    writes: 0,
    latency,
    hitRate,
    hitsTotal,
    missesTotal,
    errors: b.errors - a.errors,
    getMeanMs: (b.gets.sum - a.gets.sum) * 1000 / (b.gets.count - a.gets.count),
    getSlow: 1 - (b.gets.fast - a.gets.fast) / (b.gets.count - a.gets.count),
    scansPerS: (b.pg.scans - a.pg.scans) / seconds,
    commitsPerS: (b.pg.commits - a.pg.commits) / seconds,
    byTable,
    cpu,
    machineCores: (b.machine.busy - a.machine.busy) / 1000 / seconds,
    redisPerS: (b.redis.total_commands_processed - a.redis.total_commands_processed) / seconds,
  };
}

interface Run {
  baseline: RunResult;
  result: RunResult;
}

/**
 * One run on freshly started gateways (both runs start equally cold: actors, user states,
 * connection pools): writes alone (warm-up, then BASELINE s measured: the database load of the
 * writes, which the reads come on top of), then writes and dashboards (warm-up, then the window).
 */
async function run(name: string, env: Record<string, string>): Promise<Run> {
  await cluster.restart(env);
  const load = new Load();
  const writesBefore = written;
  load.writes();
  await delay(WARMUP * 1000);
  // Backends of the gateways' pools exist once they have served a while.
  const pids = await pidsOf(cluster);
  const a0 = await snapshot(pids);
  await delay(BASELINE * 1000);
  const a1 = await snapshot(pids);
  load.dashboards();
  await delay(WARMUP * 1000);
  const b0 = await snapshot({ ...pids, postgres: await postgresPids(cluster) });
  await delay(SECONDS * 1000);
  const b1 = await snapshot({ ...pids, postgres: await postgresPids(cluster) });
  await load.stop();
  const result = delta(b0, b1, name, load.samples);
  result.writes = written - writesBefore;
  console.log(
    `  ${name}: ${fmt(result.reads)} reads in the window (${result.reads - result.readsOk} not ` +
      `200), writes over the run ${JSON.stringify(load.writeStatus)}`,
  );
  return { baseline: delta(a0, a1, `${name}, writes only`, []), result };
}

let runOn: Run, runOff: Run;
if (args.first === "off") {
  runOff = await run("cache off", { ...BASE_ENV, ...CACHE_OFF });
  runOn = await run("cache on", BASE_ENV);
} else {
  runOn = await run("cache on", BASE_ENV);
  runOff = await run("cache off", { ...BASE_ENV, ...CACHE_OFF });
}
const on = runOn.result, off = runOff.result;

// --- report -------------------------------------------------------------------------------------

const pctOf = (x: number) => isNaN(x) ? "—" : `${(x * 100).toFixed(1)} %`;
console.log(
  `\nwindow: ${SECONDS} s after ${WARMUP} s of warm-up; load ${loadAverage()} at the end`,
);
console.log(
  `reads/s: on ${(on.reads / on.seconds).toFixed(0)}, off ${(off.reads / off.seconds).toFixed(0)}`,
);
console.log("hit rate (cache_hits_total / (hits + misses), both instances):");
for (const type of CACHE_TYPES) {
  console.log(
    `  ${type.padEnd(16)} on ${pctOf(on.hitRate[type])}, off ${pctOf(off.hitRate[type])}`,
  );
}
console.log(
  `  all              on ${pctOf(on.hitsTotal / (on.hitsTotal + on.missesTotal))} ` +
    `(${fmt(on.hitsTotal)} hits, ${fmt(on.missesTotal)} misses, ${on.errors} cache errors)`,
);
console.log(
  `  cache get (Redis round trip seen by the gateway): mean ${on.getMeanMs.toFixed(1)} ms, ` +
    `${pctOf(on.getSlow)} over 50 ms`,
);
console.log("PostgreSQL (bench schema: seq_scan + idx_scan per s; database: xact_commit per s):");
for (const r of [runOn.baseline, on, runOff.baseline, off]) {
  console.log(
    `  ${r.name.padEnd(22)} ${r.scansPerS.toFixed(0)} table scans/s, ${r.commitsPerS.toFixed(0)} ` +
      `commits/s; by table ${
        JSON.stringify(
          Object.fromEntries(Object.entries(r.byTable).map(([k, v]) => [k, Math.round(v)])),
        )
      }`,
  );
}
const readScans = (r: Run) => r.result.scansPerS - r.baseline.scansPerS;
console.log(
  `  reads' share (window minus the run's writes only): on ${readScans(runOn).toFixed(0)}/s, off ${
    readScans(runOff).toFixed(0)
  }/s: ${
    (100 * (1 - readScans(runOn) / readScans(runOff))).toFixed(0)
  } % less with the cache; all ` +
    `scans ${(100 * (1 - on.scansPerS / off.scansPerS)).toFixed(0)} % less, commits ${
      (100 * (1 - on.commitsPerS / off.commitsPerS)).toFixed(0)
    } % less`,
);
console.log("read latency, ms (p50 / p95 / p99):");
for (const kind of ["stats", "recent", "hourly", "all"]) {
  const f = (v: number[] = []) =>
    `${pct(v, 0.5).toFixed(1)} / ${pct(v, 0.95).toFixed(1)} / ${pct(v, 0.99).toFixed(1)}`;
  console.log(`  ${kind.padEnd(8)} on ${f(on.latency[kind])}   off ${f(off.latency[kind])}`);
}
console.log("CPU, cores (on / off):");
for (const name of Object.keys(on.cpu)) {
  console.log(`  ${name.padEnd(16)} ${on.cpu[name].toFixed(2)} / ${off.cpu[name].toFixed(2)}`);
}
console.log(
  `  ${"machine".padEnd(16)} ${on.machineCores.toFixed(2)} / ${off.machineCores.toFixed(2)}` +
    `; Redis commands/s ${on.redisPerS.toFixed(0)} / ${off.redisPerS.toFixed(0)}`,
);
await api(cluster.gateways[0].url, "GET", "/healthz", cluster.adminToken);
