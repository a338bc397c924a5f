// A private Prometheus server for one test: `prometheus` (Debian's package, or PROMETHEUS_BIN)
// with a generated config scraping the given targets, its TSDB in a fresh temp dir, its HTTP API
// on a free loopback port. Also runs `promtool` (PROMTOOL_BIN).
import { binariesAvailable, freePort } from "./_mosquitto.ts";
import type { ServiceStatus } from "./_services.ts";

/**
 * The series a running gateway must have in Prometheus after a little traffic of each kind
 * (tests/prometheus_scrape_test.ts). A histogram is listed by its base name and is present with
 * its `_count` series; a labelled counter appears once it has counted something.
 */
export const EXPECTED_METRICS: readonly string[] = [
  // Readings: the platform plan's names.
  "meter_readings_submitted_total",
  "meter_readings_processing_duration_seconds",
  "device_signature_verifications_total",
  "device_authentication_duration_seconds",
  "device_keys_registered_total",
  "device_keys_revoked_total",
  "gateway_readings_total",
  // Actors and the writer.
  "gateway_actors_live",
  "gateway_actor_activations_total",
  "gateway_actor_passivations_total",
  "gateway_mailbox_overflows_total",
  "gateway_writer_queue",
  "gateway_writer_batches_total",
  "gateway_writer_rows_total",
  "gateway_writer_batch_size",
  "gateway_writer_flush_duration_seconds",
  "gateway_writer_stalled",
  // HTTP.
  "http_request_duration_seconds",
  // Bus and WebSocket hub.
  "gateway_bus_connected",
  "websocket_clients_connected",
  "websocket_connection_attempts_total",
  // MQTT (embedded broker).
  "mqtt_messages_received_total",
  "mqtt_broker_connected",
  "mqtt_sessions",
  // Batches.
  "batch_jobs_submitted_total",
  "batch_jobs_completed_total",
  "batch_jobs",
  "batch_processing_duration_seconds",
  "batch_readings_per_job",
  // Read cache.
  "cache_hits_total",
  "cache_misses_total",
  "cache_operation_duration_seconds",
];

export const PROMETHEUS_BIN = Deno.env.get("PROMETHEUS_BIN") || "prometheus";
export const PROMTOOL_BIN = Deno.env.get("PROMTOOL_BIN") || "promtool";

/** Guards against hangs only: each wait ends on what it waits for. */
const READY_TIMEOUT_MS = 30_000;
const STOP_TIMEOUT_MS = 15_000;
const POLL_MS = 100;
/** How much of Prometheus's log is kept for error messages. */
const LOG_KEEP = 64 * 1024;

/**
 * Whether `prometheus` and `promtool` can run here. With `CI` set a missing binary throws (the
 * run fails); otherwise the reason is returned for the caller to ignore its tests with it.
 */
export function prometheusAvailable(): Promise<ServiceStatus> {
  return binariesAvailable([PROMETHEUS_BIN, PROMTOOL_BIN]);
}

/** Like {@linkcode prometheusAvailable} for `promtool` alone. */
export function promtoolAvailable(): Promise<ServiceStatus> {
  return binariesAvailable([PROMTOOL_BIN]);
}

/** Output of one `promtool` run. */
export interface PromtoolResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs `promtool args...`, with `stdin` piped in when given. */
export async function promtool(args: string[], stdin?: string): Promise<PromtoolResult> {
  const child = new Deno.Command(PROMTOOL_BIN, {
    args,
    stdin: stdin === undefined ? "null" : "piped",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  if (stdin !== undefined) {
    const writer = child.stdin.getWriter();
    await writer.write(new TextEncoder().encode(stdin));
    await writer.close();
  }
  const out = await child.output();
  const decoder = new TextDecoder();
  return { code: out.code, stdout: decoder.decode(out.stdout), stderr: decoder.decode(out.stderr) };
}

/** `promtool check metrics` exits 3 when the text parses but has lint problems (naming). */
export const PROMTOOL_LINT_EXIT = 3;

/** Options of {@linkcode startPrometheus}. */
export interface PrometheusOptions {
  /** `host:port` of each target of the `gateway` job. */
  targets: string[];
  /** Scrape (and rule evaluation) interval in seconds; 1 by default. */
  intervalSeconds?: number;
  /** Rule files to load (absolute paths). */
  ruleFiles?: string[];
  /** When set, scrapes with `authorization: credentials_file` holding this bearer token. */
  bearerToken?: string;
}

/** One target of `/api/v1/targets`. */
export interface PrometheusTarget {
  scrapeUrl: string;
  health: "up" | "down" | "unknown";
  lastError: string;
  labels: Record<string, string>;
}

/** One sample of an instant vector of `/api/v1/query`. */
export interface PrometheusSample {
  metric: Record<string, string>;
  value: [number, string];
}

/** A running Prometheus owned by the test. */
export interface Prometheus extends AsyncDisposable {
  /** `http://127.0.0.1:<port>` */
  readonly url: string;
  readonly dir: string;
  /** The generated configuration. */
  readonly config: string;
  /** Prometheus's log so far (the tail), for diagnostics. */
  log(): string;
  /** The active targets. */
  targets(): Promise<PrometheusTarget[]>;
  /** An instant query; throws unless the API answers `success` with a vector. */
  query(promql: string): Promise<PrometheusSample[]>;
  /** Waits until every target has been scraped successfully. */
  waitForTargetsUp(timeoutMs?: number): Promise<PrometheusTarget[]>;
  /** Polls `check` until it returns a value other than `undefined`; returns that value. */
  waitFor<T>(what: string, check: () => Promise<T | undefined>, timeoutMs?: number): Promise<T>;
  /** SIGTERM, wait for the exit, remove the directory. */
  close(): Promise<void>;
}

/** Starts Prometheus and waits for `/-/ready`. */
export async function startPrometheus(options: PrometheusOptions): Promise<Prometheus> {
  const dir = await Deno.makeTempDir({ prefix: "gw-prometheus-" });
  const port = freePort();
  const url = `http://127.0.0.1:${port}`;
  const interval = `${options.intervalSeconds ?? 1}s`;
  const lines = [
    "global:",
    `  scrape_interval: ${interval}`,
    `  scrape_timeout: ${interval}`,
    `  evaluation_interval: ${interval}`,
  ];
  if (options.ruleFiles?.length) {
    lines.push("rule_files:", ...options.ruleFiles.map((f) => `  - ${JSON.stringify(f)}`));
  }
  lines.push(
    "scrape_configs:",
    "  - job_name: gateway",
    "    metrics_path: /metrics",
    "    static_configs:",
    `      - targets: ${JSON.stringify(options.targets)}`,
  );
  if (options.bearerToken !== undefined) {
    const tokenFile = `${dir}/token`;
    await Deno.writeTextFile(tokenFile, options.bearerToken);
    lines.push(
      "    authorization:",
      "      type: Bearer",
      `      credentials_file: ${JSON.stringify(tokenFile)}`,
    );
  }
  const config = lines.join("\n") + "\n";
  const configFile = `${dir}/prometheus.yml`;
  await Deno.writeTextFile(configFile, config);

  const child = new Deno.Command(PROMETHEUS_BIN, {
    args: [
      `--config.file=${configFile}`,
      `--storage.tsdb.path=${dir}/data`,
      `--web.listen-address=127.0.0.1:${port}`,
      "--log.level=warn",
    ],
    cwd: dir,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  let logText = "";
  const decoder = new TextDecoder();
  const pump = async (stream: ReadableStream<Uint8Array>) => {
    for await (const chunk of stream) {
      logText = (logText + decoder.decode(chunk, { stream: true })).slice(-LOG_KEEP);
    }
  };
  const output = Promise.all([pump(child.stdout), pump(child.stderr)]);
  let exited = false;
  const status = child.status.then((s) => {
    exited = true;
    return s;
  });

  let closed = false;
  const close = async () => {
    if (closed) return;
    closed = true;
    if (!exited) {
      try {
        child.kill("SIGTERM");
      } catch { /* exited meanwhile */ }
    }
    let timer: ReturnType<typeof setTimeout> | undefined;
    const guard = new Promise<"timeout">((resolve) => {
      timer = setTimeout(() => resolve("timeout"), STOP_TIMEOUT_MS);
    });
    if (await Promise.race([status, guard]) === "timeout") {
      try {
        child.kill("SIGKILL");
      } catch { /* exited meanwhile */ }
    }
    clearTimeout(timer);
    await status;
    await output;
    await Deno.remove(dir, { recursive: true });
  };

  const api = async (path: string): Promise<unknown> => {
    const res = await fetch(url + path);
    const body = await res.json();
    if (body?.status !== "success") {
      throw new Error(`Prometheus ${path}: ${res.status} ${JSON.stringify(body).slice(0, 500)}`);
    }
    return body.data;
  };

  const waitFor = async <T>(
    what: string,
    check: () => Promise<T | undefined>,
    timeoutMs = READY_TIMEOUT_MS,
  ): Promise<T> => {
    const deadline = Date.now() + timeoutMs;
    let last: unknown;
    for (;;) {
      if (exited) throw new Error(`prometheus exited while waiting for ${what}:\n${logText}`);
      try {
        const value = await check();
        if (value !== undefined) return value;
      } catch (error) {
        last = error; // Not listening yet, or not answering: try again.
      }
      if (Date.now() >= deadline) {
        throw new Error(
          `no ${what} within ${timeoutMs} ms (last error: ${last}); prometheus log:\n${logText}`,
        );
      }
      await new Promise((resolve) => setTimeout(resolve, POLL_MS));
    }
  };

  const prometheus: Prometheus = {
    url,
    dir,
    config,
    log: () => logText,
    async targets() {
      const data = await api("/api/v1/targets?state=active") as {
        activeTargets: PrometheusTarget[];
      };
      return data.activeTargets;
    },
    async query(promql) {
      const data = await api(`/api/v1/query?query=${encodeURIComponent(promql)}`) as {
        resultType: string;
        result: PrometheusSample[];
      };
      if (data.resultType !== "vector") {
        throw new Error(`${promql}: a ${data.resultType}, not a vector`);
      }
      return data.result;
    },
    waitForTargetsUp(timeoutMs = READY_TIMEOUT_MS) {
      return waitFor("every target up", async () => {
        const seen = await prometheus.targets();
        if (seen.length === options.targets.length && seen.every((t) => t.health === "up")) {
          return seen;
        }
        // Reported as the last error when the wait runs out.
        throw new Error(`targets: ${JSON.stringify(seen)}`);
      }, timeoutMs);
    },
    waitFor,
    close,
    [Symbol.asyncDispose]: close,
  };

  try {
    await waitFor("ready Prometheus", async () => {
      const res = await fetch(`${url}/-/ready`);
      await res.body?.cancel();
      return res.ok ? true : undefined;
    });
  } catch (error) {
    await close();
    throw error;
  }
  return prometheus;
}
