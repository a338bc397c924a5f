// A private Mosquitto for one test: `mosquitto -c deploy/mosquitto.conf -p <free port>` in a
// fresh temp dir (its persistence file lands there), restartable on the same port and dir.
import { fileURLToPath } from "node:url";
import { requireService, type ServiceStatus } from "./_services.ts";

/** deploy/mosquitto.conf; `TEST_MOSQUITTO_CONF` points the tests at a candidate config instead. */
const CONFIG = Deno.env.get("TEST_MOSQUITTO_CONF") ||
  fileURLToPath(new URL("../deploy/mosquitto.conf", import.meta.url));
/** Guards against hangs only: start-up ends when the port accepts a connection. */
const START_TIMEOUT_MS = 10_000;
const STOP_TIMEOUT_MS = 10_000;
/** Pause between connection attempts while Mosquitto starts (bounded by START_TIMEOUT_MS). */
const POLL_MS = 20;
/** How much of Mosquitto's log is kept for error messages. */
const LOG_KEEP = 64 * 1024;

/** A running Mosquitto owned by the test. */
export interface Mosquitto extends AsyncDisposable {
  /** `mqtt://127.0.0.1:<port>` */
  readonly url: string;
  readonly port: number;
  /** Its working directory (`mosquitto.db` lives here). */
  readonly dir: string;
  /** Whether the process is running. */
  readonly running: boolean;
  /** Mosquitto's log so far (the tail), for diagnostics and assertions. */
  log(): string;
  /** SIGTERM (Mosquitto saves its persistence file) and wait for the exit. */
  stop(): Promise<void>;
  /** Stops (if running) and starts again on the same port and directory. */
  restart(): Promise<void>;
  /** Stops and removes the directory. */
  close(): Promise<void>;
}

/**
 * Whether the `mosquitto` binary can run here. With `CI` set a missing binary throws (the run
 * fails); otherwise the reason is returned for the caller to ignore its tests with it.
 */
export function mosquittoAvailable(): Promise<ServiceStatus> {
  return binariesAvailable(["mosquitto"]);
}

/** Like {@linkcode mosquittoAvailable} for any command-line tools (`mosquitto_pub`, `openssl`). */
export function binariesAvailable(names: string[]): Promise<ServiceStatus> {
  return requireService(names.join(", "), async () => {
    for (const name of names) {
      try {
        // Every one of these prints its usage for --help or -h; only a missing binary throws.
        await new Deno.Command(name, {
          args: [name === "openssl" ? "version" : "--help"],
          stdin: "null",
          stdout: "null",
          stderr: "null",
        }).output();
      } catch (error) {
        throw new Error(`${name} cannot run: ${(error as Error).message}`);
      }
    }
  });
}

/** A free TCP port on the loopback interface (never 1883: the system broker holds it). */
export function freePort(): number {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = listener.addr.port;
  listener.close();
  return port;
}

/** Options of {@linkcode startMosquitto}. */
export interface StartMosquittoOptions {
  /** An ACL file's rules that apply too. */
  acl?: string;
  /**
   * More configuration, appended to the production config: called with the broker's fresh
   * directory (for files the lines refer to, such as a plugin's), before the broker starts.
   */
  extraConfig?: (dir: string) => Promise<string>;
}

/**
 * Starts Mosquitto with the production config on a free port in a fresh temp dir; with `acl`,
 * that ACL file's rules apply too, and `extraConfig`'s lines follow.
 */
export async function startMosquitto(options: StartMosquittoOptions = {}): Promise<Mosquitto> {
  const dir = await Deno.makeTempDir({ prefix: "gw-mosquitto-" });
  // Started as root, Mosquitto drops to its own user: it must be able to write its database.
  await Deno.chmod(dir, 0o777);
  let config = CONFIG;
  if (options.acl !== undefined || options.extraConfig !== undefined) {
    let text = await Deno.readTextFile(CONFIG);
    if (options.acl !== undefined) {
      const acl = `${dir}/acl`;
      await Deno.writeTextFile(acl, options.acl);
      await Deno.chmod(acl, 0o644);
      text += `\nacl_file ${acl}\n`;
    }
    if (options.extraConfig !== undefined) {
      try {
        text += `\n${await options.extraConfig(dir)}\n`;
      } catch (error) {
        await Deno.remove(dir, { recursive: true });
        throw error;
      }
    }
    config = `${dir}/mosquitto.conf`;
    await Deno.writeTextFile(config, text);
  }
  const port = freePort();
  let child: Deno.ChildProcess | null = null;
  let exited: Promise<Deno.CommandStatus> | null = null;
  let logging: Promise<void> = Promise.resolve();
  let log = "";

  const pump = async (stream: ReadableStream<Uint8Array>) => {
    const decoder = new TextDecoder();
    for await (const chunk of stream) {
      log = (log + decoder.decode(chunk, { stream: true })).slice(-LOG_KEEP);
    }
  };

  const start = async () => {
    const proc = new Deno.Command("mosquitto", {
      args: ["-c", config, "-p", String(port)],
      cwd: dir,
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    child = proc;
    exited = proc.status;
    logging = Promise.all([pump(proc.stdout), pump(proc.stderr)]).then(() => {});
    let done = false;
    exited.then(() => done = true);
    const deadline = Date.now() + START_TIMEOUT_MS;
    for (;;) {
      if (done) {
        await logging;
        throw new Error(`mosquitto exited during start-up:\n${log}`);
      }
      try {
        const conn = await Deno.connect({ hostname: "127.0.0.1", port });
        conn.close();
        return;
      } catch {
        if (Date.now() > deadline) {
          await stop();
          throw new Error(`mosquitto did not accept connections within ${START_TIMEOUT_MS} ms`);
        }
        await new Promise((resolve) => setTimeout(resolve, POLL_MS));
      }
    }
  };

  const stop = async () => {
    const proc = child;
    if (!proc || !exited) return;
    try {
      proc.kill("SIGTERM");
    } catch { /* already gone */ }
    let timer: ReturnType<typeof setTimeout> | undefined;
    const status = await Promise.race([
      exited,
      new Promise<null>((resolve) => timer = setTimeout(() => resolve(null), STOP_TIMEOUT_MS)),
    ]);
    clearTimeout(timer);
    if (status === null) {
      proc.kill("SIGKILL");
      await exited;
    }
    await logging;
    child = null;
    exited = null;
  };

  try {
    await start();
  } catch (error) {
    await Deno.remove(dir, { recursive: true });
    throw error;
  }

  let closed = false;
  const close = async () => {
    if (closed) return;
    closed = true;
    await stop();
    await Deno.remove(dir, { recursive: true });
  };
  return {
    url: `mqtt://127.0.0.1:${port}`,
    port,
    dir,
    get running() {
      return child !== null;
    },
    log: () => log,
    stop,
    async restart() {
      await stop();
      await start();
    },
    close,
    [Symbol.asyncDispose]: close,
  };
}

// --- MQTT client helpers shared by the MQTT tests ------------------------------------------

/** Upper bound for one awaited MQTT event; a guard against hangs, not a synchronisation. */
export const EVENT_TIMEOUT_MS = 15_000;

/** One message a client received. */
export interface Received {
  topic: string;
  payload: Uint8Array;
  text: string;
  /** The DUP flag (a broker redelivery). */
  dup: boolean;
}

/** The subset of an mqtt.js client an {@linkcode Inbox} listens on. */
interface MessageSource {
  on(
    event: "message",
    listener: (topic: string, payload: Uint8Array, packet: { dup?: boolean }) => void,
  ): unknown;
}

/** Queues every message a client receives so that none is missed between awaits. */
export class Inbox {
  #queue: Received[] = [];
  #waiters: ((m: Received) => void)[] = [];
  /** Every message so far, in order. */
  readonly all: Received[] = [];

  constructor(client: MessageSource, filter: (topic: string) => boolean = () => true) {
    const decoder = new TextDecoder();
    client.on("message", (topic, payload, packet) => {
      if (!filter(topic)) return;
      const m = { topic, payload, text: decoder.decode(payload), dup: packet?.dup === true };
      this.all.push(m);
      const waiter = this.#waiters.shift();
      if (waiter) waiter(m);
      else this.#queue.push(m);
    });
  }

  /** Messages received and not yet taken with `next()`. */
  get pending(): number {
    return this.#queue.length;
  }

  /** The next message, in order of arrival. */
  next(timeoutMs = EVENT_TIMEOUT_MS): Promise<Received> {
    const queued = this.#queue.shift();
    if (queued) return Promise.resolve(queued);
    return new Promise((resolve, reject) => {
      const waiter = (m: Received) => {
        clearTimeout(timer);
        resolve(m);
      };
      const timer = setTimeout(() => {
        this.#waiters.splice(this.#waiters.indexOf(waiter), 1);
        reject(new Error(`no MQTT message within ${timeoutMs} ms`));
      }, timeoutMs);
      this.#waiters.push(waiter);
    });
  }

  /** The next message's payload as JSON. */
  async nextJson<T = Record<string, unknown>>(timeoutMs = EVENT_TIMEOUT_MS): Promise<T> {
    return JSON.parse((await this.next(timeoutMs)).text) as T;
  }
}

/**
 * Polls `condition` until it holds; for states that emit no event (a reconnect flag). Bounded:
 * throws after `timeoutMs`.
 */
export async function pollUntil(
  condition: () => boolean | Promise<boolean>,
  what: string,
  timeoutMs = EVENT_TIMEOUT_MS,
): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!await condition()) {
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting: ${what}`);
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
  }
}

/** Runs `promise` with a deadline (a guard against hangs). */
export async function within<T>(
  promise: Promise<T>,
  what: string,
  timeoutMs = EVENT_TIMEOUT_MS,
): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  try {
    return await Promise.race([
      promise,
      new Promise<never>((_, reject) => {
        timer = setTimeout(
          () => reject(new Error(`timed out after ${timeoutMs} ms: ${what}`)),
          timeoutMs,
        );
      }),
    ]);
  } finally {
    clearTimeout(timer);
  }
}
