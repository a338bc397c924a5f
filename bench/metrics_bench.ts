// deno task bench:metrics [readings]
// The per-reading instrumentation of the ingest path on the project's registry (core/metrics.ts)
// and on prom-client, side by side in one run: per reading, what services/ingest_metrics.ts does
// (gateway_readings_total{source,outcome} +1, the processing histogram {source}, the signature
// counter {result} and its histogram {kind}), then a scrape of the result. Prints nanoseconds
// of CPU per reading (process CPU time, all threads) and the scrape's milliseconds.
import client from "prom-client";
import { Metrics } from "../core/metrics.ts";

const N = Number(Deno.args[0] ?? 2_000_000);
const SOURCES = ["mqtt", "http", "batch"];
const OUTCOMES = ["accepted", "accepted", "accepted", "duplicate", "bad_signature"];
const PROCESSING = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5];
const VERIFY = [0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.005, 0.01];

/** Process CPU seconds (user + system) from /proc. */
function cpuSeconds(): number {
  const stat = Deno.readTextFileSync("/proc/self/stat");
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return (Number(fields[11]) + Number(fields[12])) / 100;
}

function measure(name: string, run: (i: number) => void, scrape: () => Promise<string> | string) {
  for (let i = 0; i < 50_000; i++) run(i); // warm-up (JIT)
  const c0 = cpuSeconds();
  const t0 = performance.now();
  for (let i = 0; i < N; i++) run(i);
  const wall = performance.now() - t0;
  const cpu = cpuSeconds() - c0;
  return (async () => {
    const s0 = performance.now();
    const text = await scrape();
    const scrapeMs = performance.now() - s0;
    const result = {
      name,
      ns_per_reading_cpu: Math.round((cpu * 1e9) / N),
      ns_per_reading_wall: Math.round((wall * 1e6) / N),
      scrape_ms: Math.round(scrapeMs * 100) / 100,
      bytes: text.length,
    };
    console.log(
      `${name.padEnd(12)} ${String(result.ns_per_reading_cpu).padStart(5)} ns CPU per reading ` +
        `(${result.ns_per_reading_wall} ns wall), scrape ${result.scrape_ms} ms, ${result.bytes} bytes`,
    );
    return result;
  })();
}

const own = new Metrics();
own.counter("gateway_readings_total", "-");
own.histogram("meter_readings_processing_duration_seconds", "-", PROCESSING);
own.counter("device_signature_verifications_total", "-");
own.histogram("device_authentication_duration_seconds", "-", VERIFY);

const registry = new client.Registry();
const readings = new client.Counter({
  name: "gateway_readings_total",
  help: "-",
  labelNames: ["source", "outcome"],
  registers: [registry],
});
const processing = new client.Histogram({
  name: "meter_readings_processing_duration_seconds",
  help: "-",
  labelNames: ["source"],
  buckets: PROCESSING,
  registers: [registry],
});
const verifications = new client.Counter({
  name: "device_signature_verifications_total",
  help: "-",
  labelNames: ["result"],
  registers: [registry],
});
const auth = new client.Histogram({
  name: "device_authentication_duration_seconds",
  help: "-",
  labelNames: ["kind"],
  buckets: VERIFY,
  registers: [registry],
});

console.log(
  `bench:metrics — ${
    N.toLocaleString("en")
  } readings' instrumentation per registry; Deno ${Deno.version.deno}`,
);
const results: { name: string; ns_per_reading_cpu: number }[] = [];
for (let round = 0; round < 2; round++) {
  results.push(
    await measure("core/metrics", (i) => {
      const source = SOURCES[i % 3];
      const outcome = OUTCOMES[i % 5];
      own.inc("gateway_readings_total", { source, outcome });
      own.observe("meter_readings_processing_duration_seconds", { source }, (i % 100) / 1000);
      own.inc("device_signature_verifications_total", {
        result: outcome === "bad_signature" ? "invalid" : "valid",
      });
      own.observe("device_authentication_duration_seconds", { kind: "reading" }, 0.000006);
    }, () => own.render()),
  );
  results.push(
    await measure("prom-client", (i) => {
      const source = SOURCES[i % 3];
      const outcome = OUTCOMES[i % 5];
      readings.inc({ source, outcome });
      processing.observe({ source }, (i % 100) / 1000);
      verifications.inc({ result: outcome === "bad_signature" ? "invalid" : "valid" });
      auth.observe({ kind: "reading" }, 0.000006);
    }, () => registry.metrics()),
  );
}
const best = (name: string) =>
  Math.min(...results.filter((r) => r.name === name).map((r) => r.ns_per_reading_cpu));
console.log(
  `best of 2: core/metrics ${best("core/metrics")} ns, prom-client ${best("prom-client")} ns ` +
    `per reading (prom-client / core ${(best("prom-client") / best("core/metrics")).toFixed(2)})`,
);
