// Private Redis servers for one test: a single `redis-server` (restartable on its port, for
// outage tests) and a three-node Redis Cluster, each in a fresh temp dir, torn down by
// `await using`. The shared Redis of the machine is never touched.
import { binariesAvailable, freePort } from "./_mosquitto.ts";
import type { ServiceStatus } from "./_services.ts";

/** Guards against hangs only: start-up ends when the server answers. */
const START_TIMEOUT_MS = 15_000;
const STOP_TIMEOUT_MS = 10_000;
/** Pause between probes while a server starts or the cluster converges (bounded above). */
const POLL_MS = 25;
/** How much of a server's log is kept for error messages. */
const LOG_KEEP = 32 * 1024;

/**
 * Whether `redis-server` and `redis-cli` can run here. With `CI` set a missing binary throws
 * (the run fails); otherwise the reason is returned for the caller to ignore its tests with it.
 */
export function redisBinariesAvailable(): Promise<ServiceStatus> {
  return binariesAvailable(["redis-server", "redis-cli"]);
}

/** One `redis-server` process owned by the test. */
export interface RedisServer extends AsyncDisposable {
  /** `redis://127.0.0.1:<port>` */
  readonly url: string;
  readonly port: number;
  readonly running: boolean;
  /** The server's log so far (the tail). */
  log(): string;
  /** SIGKILL (an abrupt crash: no shutdown, open connections reset) and wait for the exit. */
  kill(): Promise<void>;
  /** SIGTERM and wait for the exit. */
  stop(): Promise<void>;
  /** Starts again on the same port and directory (after `kill` or `stop`). */
  start(): Promise<void>;
  /** Stops the process (if running). */
  close(): Promise<void>;
}

/** Options of {@linkcode startRedisServer}. */
export interface RedisServerOptions {
  /** Default: a free port. */
  port?: number;
  /** Working directory (must exist); default: a fresh temp dir removed by `close`. */
  dir?: string;
  /** Extra `redis-server` arguments, e.g. `["--cluster-enabled", "yes"]`. */
  args?: string[];
}

/** Starts `redis-server` without persistence on a free port. */
export async function startRedisServer(options: RedisServerOptions = {}): Promise<RedisServer> {
  const ownDir = options.dir === undefined;
  const dir = options.dir ?? await Deno.makeTempDir({ prefix: "gw-redis-" });
  const port = options.port ?? freePort();
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
    if (child) return;
    const proc = new Deno.Command("redis-server", {
      args: [
        "--port",
        String(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        dir,
        ...(options.args ?? []),
      ],
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
        child = null;
        exited = null;
        throw new Error(`redis-server exited during start-up:\n${log}`);
      }
      if (await cli(port, ["PING"]).then((out) => out.trim() === "PONG", () => false)) return;
      if (Date.now() > deadline) {
        await halt("SIGKILL");
        throw new Error(`redis-server did not answer within ${START_TIMEOUT_MS} ms:\n${log}`);
      }
      await delay(POLL_MS);
    }
  };

  const halt = async (signal: Deno.Signal) => {
    const proc = child;
    if (!proc || !exited) return;
    try {
      proc.kill(signal);
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
    if (ownDir) await Deno.remove(dir, { recursive: true });
    throw error;
  }
  let closed = false;
  const close = async () => {
    if (closed) return;
    closed = true;
    await halt("SIGTERM");
    if (ownDir) await Deno.remove(dir, { recursive: true }).catch(() => {});
  };
  return {
    url: `redis://127.0.0.1:${port}`,
    port,
    get running() {
      return child !== null;
    },
    log: () => log,
    kill: () => halt("SIGKILL"),
    stop: () => halt("SIGTERM"),
    start,
    close,
    [Symbol.asyncDispose]: close,
  };
}

/** A local Redis Cluster of master nodes without replicas, owned by the test. */
export interface RedisCluster extends AsyncDisposable {
  /** The nodes' `host:port` seeds, as `REDIS_CLUSTER_NODES` takes them. */
  readonly nodes: string[];
  readonly servers: RedisServer[];
  /** Kills every node (SIGKILL). */
  kill(): Promise<void>;
  /** Starts every node again on its port with its `nodes-<port>.conf`; waits for `cluster_state:ok`. */
  start(): Promise<void>;
  /** Stops every node and removes the temp dir. */
  close(): Promise<void>;
}

/**
 * Starts `size` (default 3) `redis-server --cluster-enabled yes` nodes on free ports in one temp
 * dir, joins them with `redis-cli --cluster create … --cluster-yes` and waits until every node
 * reports `cluster_state:ok`.
 */
export async function startRedisCluster(options: { size?: number } = {}): Promise<RedisCluster> {
  const size = options.size ?? 3;
  const dir = await Deno.makeTempDir({ prefix: "gw-redis-cluster-" });
  const servers: RedisServer[] = [];
  const close = async () => {
    await Promise.all(servers.map((server) => server.close()));
    await Deno.remove(dir, { recursive: true }).catch(() => {});
  };
  try {
    // A node also listens on port + 10000 (the cluster bus): both must be free.
    const ports = new Set<number>();
    while (ports.size < size) {
      const port = freePort();
      if (port + 10_000 <= 65_535 && portFree(port + 10_000)) ports.add(port);
    }
    for (const port of ports) {
      servers.push(
        await startRedisServer({
          port,
          dir,
          args: [
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            `${dir}/nodes-${port}.conf`,
            "--cluster-node-timeout",
            "2000",
          ],
        }),
      );
    }
    const nodes = servers.map((server) => `127.0.0.1:${server.port}`);
    const created = await new Deno.Command("redis-cli", {
      args: ["--cluster", "create", ...nodes, "--cluster-yes"],
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
    }).output();
    if (!created.success) {
      const text = new TextDecoder().decode(created.stdout) +
        new TextDecoder().decode(created.stderr);
      throw new Error(`redis-cli --cluster create failed:\n${text}`);
    }
    await waitClusterOk(servers);
    return {
      nodes,
      servers,
      async kill() {
        await Promise.all(servers.map((server) => server.kill()));
      },
      async start() {
        await Promise.all(servers.map((server) => server.start()));
        await waitClusterOk(servers);
      },
      close,
      [Symbol.asyncDispose]: close,
    };
  } catch (error) {
    await close();
    throw error;
  }
}

async function waitClusterOk(servers: RedisServer[]): Promise<void> {
  const deadline = Date.now() + START_TIMEOUT_MS;
  for (const server of servers) {
    for (;;) {
      const info = await cli(server.port, ["CLUSTER", "INFO"]).catch(() => "");
      if (info.includes("cluster_state:ok")) break;
      if (Date.now() > deadline) {
        throw new Error(`node ${server.port} not cluster_state:ok within ${START_TIMEOUT_MS} ms`);
      }
      await delay(POLL_MS);
    }
  }
}

/** Runs `redis-cli -p <port> <args…>` and returns its output; throws when it fails. */
export async function cli(port: number, args: string[]): Promise<string> {
  const out = await new Deno.Command("redis-cli", {
    args: ["-h", "127.0.0.1", "-p", String(port), ...args],
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).output();
  const text = new TextDecoder().decode(out.stdout);
  if (!out.success || text.startsWith("Could not connect")) {
    throw new Error(`redis-cli ${args.join(" ")} failed: ${text}`);
  }
  return text;
}

function portFree(port: number): boolean {
  try {
    Deno.listen({ hostname: "127.0.0.1", port }).close();
    return true;
  } catch {
    return false;
  }
}

function delay(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
