// The flood test: the real gateway under a hard limit of 1,024 descriptors gets 1,100
// idle connections on each listener (HTTP, then the embedded MQTT broker on top). The process
// survives, `/healthz` answers during and after, a keep-alive client connected before the flood
// keeps being served, and new clients are served once the flood ends.
import { equal, match, ok } from "node:assert/strict";
import { fileURLToPath } from "node:url";
import { embeddedMqttPort, GatewayProcess } from "./_gateway_process.ts";

const NOFILE = 1024;
const FLOOD = 1100;
const FLOOD_SCRIPT = fileURLToPath(new URL("./_flood.ts", import.meta.url));
const encoder = new TextEncoder();
const decoder = new TextDecoder();

/** A flood of idle connections from a child process; `stop()` kills it and all it holds. */
class Flood implements AsyncDisposable {
  #child: Deno.ChildProcess;
  readonly done: Promise<{ opened: number; failed: number }>;

  constructor(port: number, count: number) {
    // The flood needs more descriptors than the gateway has: its own limit, raised in bash.
    const child = new Deno.Command("bash", {
      args: [
        "-c",
        `ulimit -n ${count + 256}; exec "$0" run --allow-net "$1" "$2" "$3"`,
        Deno.execPath(),
        FLOOD_SCRIPT,
        String(port),
        String(count),
      ],
      stdout: "piped",
      stderr: "inherit",
    }).spawn();
    this.#child = child;
    this.done = (async () => {
      const reader = child.stdout.pipeThrough(new TextDecoderStream()).getReader();
      let text = "";
      while (!text.includes("\n")) {
        const r = await reader.read();
        if (r.done) throw new Error(`flood process ended: ${text}`);
        text += r.value;
      }
      reader.releaseLock();
      return JSON.parse(text.slice(0, text.indexOf("\n")));
    })();
  }

  async stop(): Promise<void> {
    try {
      this.#child.kill("SIGKILL");
    } catch { /* exited */ }
    await this.#child.status;
    await this.done.catch(() => {});
    await this.#child.stdout.cancel().catch(() => {});
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.stop();
  }
}

/** A raw keep-alive HTTP/1.1 connection: one request at a time, reads exactly one response. */
class KeepAliveClient {
  #conn: Deno.Conn;
  #buffer = "";
  constructor(conn: Deno.Conn) {
    this.#conn = conn;
  }

  static async open(port: number): Promise<KeepAliveClient> {
    return new KeepAliveClient(await Deno.connect({ hostname: "127.0.0.1", port }));
  }

  async get(path: string): Promise<{ status: number; body: string }> {
    await this.#conn.write(encoder.encode(`GET ${path} HTTP/1.1\r\nHost: flood\r\n\r\n`));
    const buf = new Uint8Array(4096);
    for (;;) {
      const end = this.#buffer.indexOf("\r\n\r\n");
      if (end >= 0) {
        const head = this.#buffer.slice(0, end);
        const length = Number(/content-length:\s*(\d+)/i.exec(head)?.[1] ?? 0);
        if (this.#buffer.length >= end + 4 + length) {
          const body = this.#buffer.slice(end + 4, end + 4 + length);
          this.#buffer = this.#buffer.slice(end + 4 + length);
          return { status: Number(head.split(" ")[1]), body };
        }
      }
      const n = await this.#conn.read(buf);
      if (n === null) throw new Error("the keep-alive connection was closed");
      this.#buffer += decoder.decode(buf.subarray(0, n));
    }
  }

  close(): void {
    this.#conn.close();
  }
}

/** `/healthz` over a new connection from `localAddress`. */
async function freshHealthz(url: string, localAddress: string): Promise<number> {
  const client = Deno.createHttpClient({ localAddress });
  try {
    const res = await fetch(`${url}/healthz`, { client, signal: AbortSignal.timeout(10_000) });
    await res.body?.cancel();
    return res.status;
  } finally {
    client.close();
  }
}

/** An MQTT 3.1.1 CONNECT without credentials; any CONNACK shows the broker accepts clients. */
async function mqttConnack(port: number): Promise<number> {
  const id = encoder.encode("flood-probe");
  const variable = [0, 4, 77, 81, 84, 84, 4, 2, 0, 30, 0, id.length, ...id];
  const conn = await Deno.connect({ hostname: "127.0.0.1", port });
  try {
    await conn.write(new Uint8Array([0x10, variable.length, ...variable]));
    const buf = new Uint8Array(4);
    let timer: ReturnType<typeof setTimeout> | undefined;
    const n = await Promise.race([
      conn.read(buf),
      new Promise<null>((resolve) => timer = setTimeout(() => resolve(null), 10_000)),
    ]);
    clearTimeout(timer);
    if (n === null || buf[0] !== 0x20) throw new Error("no CONNACK");
    return buf[3];
  } finally {
    conn.close();
  }
}

/** A WebSocket client on `/ws` (through the gateway's own listener) that answers pings. */
async function openWs(
  url: string,
  token: string,
): Promise<{ ping(): Promise<void>; close(): Promise<void> }> {
  const ws = new WebSocket(`${url.replace("http", "ws")}/ws?token=${token}`);
  await new Promise((resolve, reject) => {
    ws.onopen = resolve;
    ws.onerror = () => reject(new Error("WebSocket failed to open"));
  });
  return {
    async ping() {
      const pong = new Promise<string>((resolve, reject) => {
        ws.onmessage = (m) => resolve(String(m.data));
        ws.onclose = () => reject(new Error("WebSocket closed"));
      });
      ws.send(JSON.stringify({ type: "ping" }));
      match(await pong, /"pong"/);
    },
    async close() {
      const closed = new Promise((resolve) => ws.onclose = resolve);
      ws.close();
      await closed;
    },
  };
}

function assertAlive(gw: GatewayProcess, when: string): void {
  ok(!gw.logs().some((e) => e.msg === "stopped"), `gateway stopped ${when}`);
  const fatal = gw.stderr.find((l) => /Too many open files|panicked|Uncaught/.test(l));
  equal(fatal, undefined, `gateway failed ${when}:\n${gw.describe()}`);
}

Deno.test({
  name: "the gateway under a 1,024-descriptor limit survives 1,100 idle connections per listener",
  async fn(t) {
    const dir = await Deno.makeTempDir({ prefix: "gw-flood-" });
    let exited = false;
    await using gw = await GatewayProcess.start({
      DENO_KV_PATH: `${dir}/gateway.kv`,
      ADMIN_PASSWORD: "flood-admin-password",
    }, { nofile: NOFILE });
    gw.status.then(() => exited = true);
    const mqttPort = embeddedMqttPort(gw);
    const keepAlive = await KeepAliveClient.open(gw.port);
    const login = await fetch(`${gw.url}/api/auth/login`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ email: "admin@gridtokenx.local", password: "flood-admin-password" }),
    });
    const { access_token: token } = await login.json();
    const ws = await openWs(gw.url, token);
    const floods: Flood[] = [];
    try {
      await t.step("before: /healthz on a keep-alive connection, a WebSocket answers", async () => {
        equal((await keepAlive.get("/healthz")).status, 200);
        await ws.ping();
      });

      await t.step("1,100 idle connections to the HTTP port", async () => {
        const flood = new Flood(gw.port, FLOOD);
        floods.push(flood);
        const { opened } = await flood.done;
        ok(opened >= 1000, `the flood opened only ${opened} connections`);
        ok(!exited, `gateway exited:\n${gw.describe()}`);
        assertAlive(gw, "under the HTTP flood");
        const during = await keepAlive.get("/healthz");
        equal(during.status, 200);
        match(during.body, /"ok"/);
        await ws.ping();
        equal(await freshHealthz(gw.url, "127.0.0.2"), 200, "a new client during the flood");
        // The flood came from one address: its cap refused the rest.
        const metrics = await (await fetch(`${gw.url}/metrics`)).text();
        const refused = Number(
          /^gateway_http_connections_refused_per_address_total (\d+)$/m.exec(metrics)?.[1],
        );
        ok(refused >= FLOOD - 128, `refused per address: ${refused}`);
      });

      await t.step("plus 1,100 idle connections to the embedded MQTT broker", async () => {
        const flood = new Flood(mqttPort, FLOOD);
        floods.push(flood);
        const { opened } = await flood.done;
        ok(opened >= 1000, `the flood opened only ${opened} connections`);
        ok(!exited, `gateway exited:\n${gw.describe()}`);
        assertAlive(gw, "under both floods");
        equal((await keepAlive.get("/healthz")).status, 200, "the keep-alive client");
        equal(await freshHealthz(gw.url, "127.0.0.3"), 200, "a new HTTP client during the floods");
      });

      await t.step("after the floods: existing and new clients are served", async () => {
        for (const flood of floods.splice(0)) await flood.stop();
        equal((await keepAlive.get("/healthz")).status, 200, "the keep-alive client");
        await ws.ping();
        equal(await freshHealthz(gw.url, "127.0.0.1"), 200, "a new HTTP client");
        equal(typeof await mqttConnack(mqttPort), "number");
        ok(!exited, `gateway exited:\n${gw.describe()}`);
        assertAlive(gw, "after the floods");
      });
    } finally {
      keepAlive.close();
      await ws.close().catch(() => {});
      for (const flood of floods) await flood.stop();
      await gw.stop();
      await Deno.remove(dir, { recursive: true });
    }
  },
});
