// `main.ts` as a child process, for tests that need the real process (restarts, kill -9).
import assert from "node:assert/strict";
import { fileURLToPath } from "node:url";

const ROOT = fileURLToPath(new URL("..", import.meta.url));
/** Guards against hangs only; every wait ends on an event (a log line, an exit). */
const STARTUP_TIMEOUT_MS = 60_000;
const EXIT_TIMEOUT_MS = 30_000;

/** One JSON log line of the gateway. */
export type LogEntry = Record<string, unknown> & { msg?: string; level?: string };

/** Environment the child inherits from us: only what Deno itself needs. */
export function baseEnv(): Record<string, string> {
  const env: Record<string, string> = {};
  for (const name of ["PATH", "HOME", "DENO_DIR", "XDG_CACHE_HOME", "LANG", "TMPDIR"]) {
    const value = Deno.env.get(name);
    if (value !== undefined) env[name] = value;
  }
  return env;
}

export function freePort(): number {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = listener.addr.port;
  listener.close();
  return port;
}

/** Options of {@linkcode GatewayProcess}. */
export interface GatewayProcessOptions {
  /** Soft and hard limit of open descriptors of the process (`prlimit --nofile`). */
  nofile?: number;
}

/** `main.ts` running as a child process, with its output collected line by line. */
export class GatewayProcess implements AsyncDisposable {
  readonly child: Deno.ChildProcess;
  readonly port: number;
  readonly url: string;
  readonly stdout: string[] = [];
  readonly stderr: string[] = [];
  readonly status: Promise<Deno.CommandStatus>;
  #output: Promise<void>;
  #done = false;
  #changed = Promise.withResolvers<void>();

  constructor(env: Record<string, string>, options: GatewayProcessOptions = {}) {
    this.port = Number(env.PORT);
    this.url = `http://127.0.0.1:${this.port}`;
    const deno = [Deno.execPath(), "run", "--allow-all", "main.ts"];
    // prlimit (util-linux) sets both limits of the child before it starts.
    const argv = options.nofile === undefined
      ? deno
      : ["prlimit", `--nofile=${options.nofile}:${options.nofile}`, "--", ...deno];
    this.child = new Deno.Command(argv[0], {
      args: argv.slice(1),
      cwd: ROOT,
      env: { ...baseEnv(), ...env },
      clearEnv: true,
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    this.status = this.child.status;
    this.#output = Promise.all([
      this.#pump(this.child.stdout, this.stdout),
      this.#pump(this.child.stderr, this.stderr),
    ]).then(() => {
      this.#done = true;
      this.#notify();
    });
  }

  /** Starts the gateway and waits for its "gateway listening" log line. */
  static async start(
    env: Record<string, string>,
    options: GatewayProcessOptions = {},
  ): Promise<GatewayProcess> {
    const gw = new GatewayProcess({
      PORT: String(freePort()),
      HOST: "127.0.0.1",
      MQTT_PORT: "0",
      ...env,
    }, options);
    try {
      await gw.waitForLog((e) => e.msg === "gateway listening");
    } catch (error) {
      await gw.stop();
      throw error;
    }
    return gw;
  }

  #notify(): void {
    const changed = this.#changed;
    this.#changed = Promise.withResolvers<void>();
    changed.resolve();
  }

  async #pump(stream: ReadableStream<Uint8Array>, lines: string[]): Promise<void> {
    const decoder = new TextDecoder();
    let rest = "";
    for await (const chunk of stream) {
      rest += decoder.decode(chunk, { stream: true });
      let newline: number;
      while ((newline = rest.indexOf("\n")) >= 0) {
        lines.push(rest.slice(0, newline));
        rest = rest.slice(newline + 1);
      }
      this.#notify();
    }
    rest += decoder.decode();
    if (rest) lines.push(rest);
  }

  /** Every stdout line that is a JSON object. */
  logs(): LogEntry[] {
    const entries: LogEntry[] = [];
    for (const line of this.stdout) {
      try {
        const value = JSON.parse(line);
        if (value && typeof value === "object" && !Array.isArray(value)) entries.push(value);
      } catch { /* not a log line */ }
    }
    return entries;
  }

  /** Waits for a JSON log line matching `predicate`; fails when the process ends first. */
  async waitForLog(
    predicate: (entry: LogEntry) => boolean,
    timeoutMs = STARTUP_TIMEOUT_MS,
  ): Promise<LogEntry> {
    let timer: ReturnType<typeof setTimeout> | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new Error(`no such log line in ${timeoutMs} ms`)), timeoutMs);
    });
    try {
      for (;;) {
        const found = this.logs().find(predicate);
        if (found) return found;
        if (this.#done) {
          throw new Error(
            `gateway exited before the expected log line:\n${this.describe()}`,
          );
        }
        await Promise.race([this.#changed.promise, timeout]);
      }
    } catch (error) {
      if (error instanceof Error && error.message.startsWith("no such log line")) {
        throw new Error(`${error.message}:\n${this.describe()}`);
      }
      throw error;
    } finally {
      clearTimeout(timer);
    }
  }

  describe(): string {
    return `stdout:\n${this.stdout.join("\n")}\nstderr:\n${this.stderr.join("\n")}`;
  }

  /** Sends `signal` (unless it has exited) and waits for the exit and the end of its output. */
  async stop(signal: Deno.Signal = "SIGKILL"): Promise<Deno.CommandStatus> {
    if (!this.#done) {
      try {
        this.child.kill(signal);
      } catch (error) {
        // Already exited between the check and the kill.
        if (!(error instanceof TypeError)) throw error;
      }
    }
    return await this.waitForExit();
  }

  /** Waits for the exit (bounded: kills after the guard) and the end of its output. */
  async waitForExit(timeoutMs = EXIT_TIMEOUT_MS): Promise<Deno.CommandStatus> {
    let timer: ReturnType<typeof setTimeout> | undefined;
    let timedOut = false;
    const guard = new Promise<void>((resolve) => {
      timer = setTimeout(() => {
        timedOut = true;
        resolve();
      }, timeoutMs);
    });
    await Promise.race([this.status, guard]);
    clearTimeout(timer);
    if (timedOut) {
      try {
        this.child.kill("SIGKILL");
      } catch { /* exited meanwhile */ }
    }
    const status = await this.status;
    await this.#output;
    if (timedOut) {
      throw new Error(`gateway did not exit within ${timeoutMs} ms:\n${this.describe()}`);
    }
    return status;
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.stop();
  }
}

/** The embedded broker's port, from the log field `"mqtt": "embedded:mqtt://127.0.0.1:<port>"`. */
export function embeddedMqttPort(gw: GatewayProcess): number {
  const entry = gw.logs().find((e) => e.msg === "gateway listening");
  const match = /^embedded:mqtt:\/\/[^:]+:(\d+)/.exec(String(entry?.mqtt));
  if (!match) throw new Error(`no embedded broker port in the log:\n${gw.describe()}`);
  return Number(match[1]);
}

/** A JSON request against a child gateway; the body is always consumed (text if not JSON). */
export async function call(
  base: string,
  method: string,
  path: string,
  options: { token?: string; body?: unknown } = {},
  // deno-lint-ignore no-explicit-any
): Promise<{ status: number; body: any }> {
  const headers: Record<string, string> = {};
  if (options.token) headers.authorization = `Bearer ${options.token}`;
  if (options.body !== undefined) headers["content-type"] = "application/json";
  const res = await fetch(base + path, {
    method,
    headers,
    body: options.body === undefined ? undefined : JSON.stringify(options.body),
  });
  const text = await res.text();
  let body: unknown = text;
  try {
    body = JSON.parse(text);
  } catch { /* not JSON */ }
  return { status: res.status, body };
}

/** Logs in against a child gateway and returns the access token. */
export async function login(base: string, email: string, password: string): Promise<string> {
  const res = await call(base, "POST", "/api/auth/login", { body: { email, password } });
  assert.equal(res.status, 200, `login of ${email}: ${JSON.stringify(res.body)}`);
  assert.equal(typeof res.body.access_token, "string");
  return res.body.access_token;
}
