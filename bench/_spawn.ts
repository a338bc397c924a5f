// Starts the real gateway (main.ts) as a child process for benchmarks.
import { fileURLToPath } from "node:url";

/** A gateway child process. */
export interface GatewayProcess extends AsyncDisposable {
  url: string;
  dir: string;
  child: Deno.ChildProcess;
}

/** A free TCP port on 127.0.0.1. */
export function freePort(): number {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (listener.addr as Deno.NetAddr).port;
  listener.close();
  return port;
}

function denoArgs(): string[] {
  return (Deno.env.get("BENCH_GATEWAY_DENO_ARGS") ?? "").split(" ").filter(Boolean);
}

/** Runs main.ts with `env` on a temp data dir; resolves once it logs "gateway listening". */
export async function spawnGateway(env: Record<string, string>): Promise<GatewayProcess> {
  const dir = await Deno.makeTempDir({ prefix: "gw-bench-" });
  const port = freePort();
  const root = fileURLToPath(new URL("../", import.meta.url));
  const child = new Deno.Command(Deno.execPath(), {
    // BENCH_GATEWAY_DENO_ARGS, e.g. "--inspect=127.0.0.1:9229", to profile the gateway under load.
    args: ["run", "--allow-all", ...denoArgs(), "main.ts"],
    cwd: root,
    env: {
      PORT: String(port),
      HOST: "127.0.0.1",
      DENO_KV_PATH: `${dir}/gateway.kv`,
      MQTT_PORT: "0",
      ...env,
    },
    stdout: "piped",
    stderr: "inherit",
  }).spawn();
  const lines = child.stdout.pipeThrough(new TextDecoderStream()).getReader();
  let buffered = "";
  // Below info (LOG_LEVEL=warn|error) the gateway does not say that it listens: ask /healthz.
  const quiet = env.LOG_LEVEL === "warn" || env.LOG_LEVEL === "error";
  let exited = false;
  child.status.then(() => exited = true);
  if (quiet) {
    const drain = (async () => {
      for (let r = await lines.read(); !r.done; r = await lines.read()) buffered += r.value;
    })();
    for (;;) {
      if (exited) {
        await drain;
        throw new Error(`gateway exited before listening:\n${buffered}`);
      }
      const up = await fetch(`http://127.0.0.1:${port}/healthz`).then(
        (r) => (r.body?.cancel(), r.ok),
        () => false,
      );
      // The first admin is created once everything listens: wait for it too.
      const ready = up &&
        (!env.ADMIN_EMAIL || await fetch(`http://127.0.0.1:${port}/api/auth/login`, {
          method: "POST",
          headers: { "content-type": "application/json" },
          body: JSON.stringify({ email: env.ADMIN_EMAIL, password: env.ADMIN_PASSWORD }),
        }).then((r) => (r.body?.cancel(), r.ok), () => false));
      if (ready) break;
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
    const close = async () => {
      try {
        child.kill("SIGTERM");
      } catch { /* already gone */ }
      await child.status;
      await drain;
      await Deno.remove(dir, { recursive: true });
    };
    return { url: `http://127.0.0.1:${port}`, dir, child, [Symbol.asyncDispose]: close };
  }
  while (!buffered.includes('"gateway listening"')) {
    const { value, done } = await lines.read();
    if (done) throw new Error(`gateway exited before listening:\n${buffered}`);
    buffered += value;
  }
  // Keep draining stdout so the child never blocks on a full pipe; BENCH_GATEWAY_LOG=<file>
  // keeps it (e.g. with BENCH_GATEWAY_DENO_ARGS=--v8-flags=--trace-gc).
  const logPath = Deno.env.get("BENCH_GATEWAY_LOG");
  const log = logPath
    ? await Deno.open(logPath, { write: true, create: true, append: true })
    : null;
  (async () => {
    const encoder = new TextEncoder();
    if (log) await log.write(encoder.encode(buffered));
    for (let r = await lines.read(); !r.done; r = await lines.read()) {
      if (log) await log.write(encoder.encode(r.value));
    }
    log?.close();
  })();
  const close = async () => {
    try {
      child.kill("SIGTERM");
    } catch { /* already gone */ }
    await child.status;
    await Deno.remove(dir, { recursive: true });
  };
  return { url: `http://127.0.0.1:${port}`, dir, child, [Symbol.asyncDispose]: close };
}

/** A decoded API response: benchmarks read fields without declaring every shape. */
// deno-lint-ignore no-explicit-any
type Json = any;

/** A JSON call to the gateway's API (GET without a body, POST with one); throws unless 2xx. */
export async function api(
  gw: GatewayProcess,
  path: string,
  body?: unknown,
  token?: string,
): Promise<Json> {
  const res = await fetch(gw.url + path, {
    method: body === undefined ? "GET" : "POST",
    headers: {
      "content-type": "application/json",
      ...(token ? { authorization: `Bearer ${token}` } : {}),
    },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await res.text();
  if (!res.ok) throw new Error(`${path}: ${res.status} ${text}`);
  return text.startsWith("{") ? JSON.parse(text) : text;
}
