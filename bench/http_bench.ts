// deno task bench:http — signed single submissions over HTTP against the embedded store.
// Phase 1 offers a fixed rate (open loop, latency measured from the scheduled send time so a
// stalled server cannot hide its queueing); phase 2 finds the saturation rate with N clients.
import { parseArgs } from "node:util";
import { Buffer } from "node:buffer";
import { canonicalMessage, signHmac } from "../core/signature.ts";
import { api as gatewayApi, spawnGateway } from "./_spawn.ts";

const { values: args } = parseArgs({
  options: {
    rate: { type: "string", default: "1000" },
    seconds: { type: "string", default: "10" },
    clients: { type: "string", default: "64" },
    meters: { type: "string", default: "2000" },
  },
});
const RATE = Number(args.rate), SECONDS = Number(args.seconds);
const CLIENTS = Number(args.clients), METERS = Number(args.meters);
const ADMIN = { email: "bench@gridtokenx.local", password: "bench-password-1" };

await using gw = await spawnGateway({
  ADMIN_EMAIL: ADMIN.email,
  ADMIN_PASSWORD: ADMIN.password,
  METER_RATE_BURST: "100000",
  DEVICE_REGISTER_RATE_LIMIT: "100000",
  // All load comes from one address, with as many connections as the open loop needs.
  HTTP_MAX_CONNECTIONS: "100000",
  HTTP_MAX_CONNECTIONS_PER_ADDRESS: "100000",
  LOG_LEVEL: "info",
});

const api = (path: string, body?: unknown, token?: string) => gatewayApi(gw, path, body, token);

const { access_token: token } = await api("/api/auth/login", ADMIN);
const user = await api("/api/admin/users", {
  email: "prosumer@bench.local",
  password: "solar-bench-9w4k2",
  role: "user",
}, token);
const secrets = new Map<string, Buffer>();
for (let i = 0; i < METERS; i += 1000) {
  const devices = Array.from(
    { length: Math.min(1000, METERS - i) },
    (_, j) => ({ meter_id: `bench-${i + j}`, user_id: user.id, algorithm: "hmac-sha256" }),
  );
  const { results } = await api("/api/admin/devices/import", { devices }, token);
  for (const r of results) secrets.set(r.meter_id, Buffer.from(r.secret_hex, "hex"));
}

// Pre-signed bodies: meter i, slot k → 15 minutes apart, newest first, all within 7 days.
const meterIds = [...secrets.keys()];
const base = Math.floor(Date.now() / 60_000) * 60_000;
let cursor = 0;
function nextBody(): string {
  const meter = meterIds[cursor % meterIds.length];
  const slot = Math.floor(cursor / meterIds.length);
  cursor++;
  const ts = new Date(base - slot * 15 * 60_000).toISOString().replace(".000Z", "Z");
  const kwh = String(Number((1 + (cursor % 997) / 100).toFixed(2))); // canonical: no "1.50"
  const device_signature = signHmac(secrets.get(meter)!, canonicalMessage(meter, ts, kwh));
  return JSON.stringify({
    meter_id: meter,
    kwh_amount: kwh,
    reading_timestamp: ts,
    device_signature,
  });
}

async function submit(body: string): Promise<number> {
  const res = await fetch(gw.url + "/api/meters/submit-reading", {
    method: "POST",
    headers: { "content-type": "application/json", authorization: `Bearer ${token}` },
    body,
  });
  await res.body?.cancel();
  return res.status;
}

function pct(sorted: number[], p: number): number {
  return sorted.length ? sorted[Math.min(sorted.length - 1, Math.floor(sorted.length * p))] : NaN;
}

interface Result {
  sent: number;
  ok: number;
  other: Record<number, number>;
  seconds: number;
  latencies: number[];
}

/** Open loop: one request every 1/rate s, measured from its scheduled time. */
async function fixedRate(rate: number, seconds: number): Promise<Result> {
  const total = rate * seconds;
  const bodies = Array.from({ length: total }, nextBody);
  const latencies: number[] = [];
  const other: Record<number, number> = {};
  let ok = 0;
  const start = performance.now();
  const inflight = new Set<Promise<void>>();
  for (let i = 0; i < total; i++) {
    const due = start + (i * 1000) / rate;
    const wait = due - performance.now();
    if (wait > 1) await new Promise((r) => setTimeout(r, wait));
    const p = submit(bodies[i]).then((status) => {
      latencies.push(performance.now() - due);
      if (status === 201) ok++;
      else other[status] = (other[status] ?? 0) + 1;
    });
    inflight.add(p);
    p.finally(() => inflight.delete(p));
  }
  await Promise.all(inflight);
  return { sent: total, ok, other, seconds: (performance.now() - start) / 1000, latencies };
}

/** Closed loop: `clients` workers submitting back to back. */
async function saturate(clients: number, seconds: number): Promise<Result> {
  const latencies: number[] = [];
  const other: Record<number, number> = {};
  let ok = 0, sent = 0;
  const start = performance.now();
  const end = start + seconds * 1000;
  await Promise.all(Array.from({ length: clients }, async () => {
    while (performance.now() < end) {
      const body = nextBody();
      const t = performance.now();
      const status = await submit(body);
      sent++;
      latencies.push(performance.now() - t);
      if (status === 201) ok++;
      else other[status] = (other[status] ?? 0) + 1;
    }
  }));
  return { sent, ok, other, seconds: (performance.now() - start) / 1000, latencies };
}

/** CPU time the gateway process has used, in µs (Linux /proc; NaN elsewhere). */
function gatewayCpuUs(): number {
  try {
    // Through cat: Deno reads /proc/<pid> only with --allow-all.
    const { stdout } = new Deno.Command("cat", { args: [`/proc/${gw.child.pid}/stat`] })
      .outputSync();
    const fields = new TextDecoder().decode(stdout).split(") ")[1].split(" ");
    // utime and stime (fields 14 and 15) in clock ticks, 100 per second on Linux.
    return (Number(fields[11]) + Number(fields[12])) * 10_000;
  } catch {
    return NaN;
  }
}

function report(name: string, r: Result, cpuUs: number): void {
  const sorted = r.latencies.sort((a, b) => a - b);
  console.log(
    `${name}: ${r.sent} sent, ${r.ok} stored (201), other ${JSON.stringify(r.other)}, ` +
      `${(r.ok / r.seconds).toFixed(0)} readings/s; latency ms p50 ${
        pct(sorted, 0.5).toFixed(1)
      } ` +
      `p95 ${pct(sorted, 0.95).toFixed(1)} p99 ${pct(sorted, 0.99).toFixed(1)} max ${
        sorted.at(-1)?.toFixed(1)
      }; gateway CPU ${(cpuUs / r.sent).toFixed(0)} µs/request`,
  );
}

async function writerFigures(): Promise<string> {
  const text: string = await api("/metrics");
  const get = (name: string) => Number(new RegExp(`^${name} (\\S+)$`, "m").exec(text)?.[1]);
  const batches = get("gateway_writer_batches_total"), rows = get("gateway_writer_rows_total");
  return `writer: ${rows} rows in ${batches} batches (mean ${(rows / batches).toFixed(1)}, max ${
    get("gateway_writer_batch_max")
  })`;
}

console.log(
  `bench:http — ${METERS} meters, Deno ${Deno.version.deno}, ${navigator.hardwareConcurrency} cores`,
);
// Warm-up, not counted: JIT and actor activation at 200/s, then the connection pool the target
// rate needs (measured: starting cold at 1,000/s, the first 1.5 s ran at p95 ~250 ms while
// fetch opened connections, and 15-35 ms after).
await fixedRate(200, 2);
await fixedRate(RATE, 2);
const before = await writerFigures();
let cpu = gatewayCpuUs();
const fixed = await fixedRate(RATE, SECONDS);
report(`fixed ${RATE}/s for ${SECONDS}s`, fixed, gatewayCpuUs() - cpu);
console.log(`  ${await writerFigures()} (after warm-up: ${before})`);
cpu = gatewayCpuUs();
const saturation = await saturate(CLIENTS, SECONDS);
report(`saturation, ${CLIENTS} clients for ${SECONDS}s`, saturation, gatewayCpuUs() - cpu);
console.log(`  ${await writerFigures()}`);
