// A private redis-server for one test, on a free port, that can be killed and started again on
// the same port (the machine's shared Redis is never stopped).
import { freePort } from "./_gateway_process.ts";
import { requireService, type ServiceStatus } from "./_services.ts";

/** Guards against hangs only: start-up ends when the server answers PING. */
const START_TIMEOUT_MS = 10_000;

/** A running redis-server owned by the test. */
export interface RedisServer extends AsyncDisposable {
  readonly port: number;
  /** `redis://127.0.0.1:<port>` */
  readonly url: string;
  /** SIGKILL, and wait for the exit: an outage with no goodbye to clients. */
  kill(): Promise<void>;
  /** Starts it again on the same port (empty: it keeps nothing on disk). */
  start(): Promise<void>;
  close(): Promise<void>;
}

/** Whether `redis-server` can run here (a missing binary fails the run when `CI` is set). */
export function redisServerAvailable(): Promise<ServiceStatus> {
  return requireService("redis-server", async () => {
    await new Deno.Command("redis-server", { args: ["--version"], stdout: "null", stderr: "null" })
      .output();
  });
}

/** Starts `redis-server --port <free>` with no persistence. */
export async function startRedisServer(): Promise<RedisServer> {
  const port = freePort();
  let child: Deno.ChildProcess | null = null;
  const spawn = async () => {
    child = new Deno.Command("redis-server", {
      args: ["--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
      stdin: "null",
      stdout: "null",
      stderr: "null",
    }).spawn();
    const deadline = Date.now() + START_TIMEOUT_MS;
    for (;;) {
      try {
        const conn = await Deno.connect({ hostname: "127.0.0.1", port });
        try {
          await conn.write(new TextEncoder().encode("PING\r\n"));
          const buf = new Uint8Array(16);
          const n = await conn.read(buf);
          if (n && new TextDecoder().decode(buf.subarray(0, n)).startsWith("+PONG")) return;
        } finally {
          conn.close();
        }
      } catch { /* not listening yet */ }
      if (Date.now() > deadline) throw new Error(`redis-server on ${port} did not start`);
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
  };
  const kill = async () => {
    const running = child;
    child = null;
    if (!running) return;
    try {
      running.kill("SIGKILL");
    } catch { /* exited already */ }
    await running.status;
  };
  await spawn();
  return {
    port,
    url: `redis://127.0.0.1:${port}`,
    kill,
    start: spawn,
    close: kill,
    [Symbol.asyncDispose]: kill,
  };
}
