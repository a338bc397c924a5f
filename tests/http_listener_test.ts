// The HTTP listener: keep-alive, WebSocket upgrades, the client address, connection caps,
// header and idle timeouts, and an accept loop that survives running out of descriptors.
import { equal, match, ok } from "node:assert/strict";
import { fileURLToPath } from "node:url";
import { silentLogger } from "../core/logger.ts";
import { HttpListener, type HttpListenerOptions } from "../server/http_listener.ts";

const encoder = new TextEncoder();
const decoder = new TextDecoder();

function start(options: Partial<HttpListenerOptions> = {}): HttpListener {
  return HttpListener.start({
    hostname: "127.0.0.1",
    port: 0,
    handler: (req, info) => {
      const path = new URL(req.url).pathname;
      if (path === "/ws-denied") return new Response("no", { status: 401 });
      // Reads the whole body first, through a reader as routes/body.ts does.
      if (path === "/upload") return drain(req).then((n) => new Response(`got ${n}`));
      if (path === "/ws") {
        const { socket, response } = Deno.upgradeWebSocket(req);
        socket.onmessage = (m) => socket.send(`echo ${m.data}`);
        return response;
      }
      return new Response(`hello ${info.remoteAddr.hostname}`);
    },
    maxConnections: 100,
    maxConnectionsPerAddress: 100,
    headerTimeoutMs: 30_000,
    idleTimeoutMs: 30_000,
    requestTimeoutMs: 30_000,
    logger: silentLogger,
    clock: { now: () => Date.now() },
    ...options,
  });
}

/** Reads a request's body to its end; its length. */
async function drain(req: Request): Promise<number> {
  let n = 0;
  const reader = req.body!.getReader();
  for (;;) {
    const { done, value } = await reader.read();
    if (done) return n;
    n += value.length;
  }
}

/** Reads until the peer closes; the text read. */
async function readToEnd(conn: Deno.Conn): Promise<string> {
  let text = "";
  const buf = new Uint8Array(4096);
  for (;;) {
    const n = await conn.read(buf).catch(() => null);
    if (n === null) return text;
    text += decoder.decode(buf.subarray(0, n));
  }
}

/** One raw HTTP/1.1 request on an open connection; the response head and body. */
async function rawRequest(conn: Deno.Conn, path: string): Promise<string> {
  await conn.write(encoder.encode(`GET ${path} HTTP/1.1\r\nHost: t\r\n\r\n`));
  let text = "";
  const buf = new Uint8Array(4096);
  while (!/\r\n\r\n[\s\S]*hello/.test(text)) {
    const n = await conn.read(buf);
    if (n === null) throw new Error(`closed after ${JSON.stringify(text)}`);
    text += decoder.decode(buf.subarray(0, n));
  }
  return text;
}

Deno.test("HttpListener serves keep-alive requests and WebSocket upgrades with the client address", async (t) => {
  await using listener = start();
  const url = `http://127.0.0.1:${listener.addr.port}`;

  await t.step("several requests on one connection, each told the client address", async () => {
    const conn = await Deno.connect({ hostname: "127.0.0.1", port: listener.addr.port });
    for (let i = 0; i < 3; i++) {
      match(await rawRequest(conn, "/x"), /200 OK[\s\S]*hello 127\.0\.0\.1/);
    }
    equal(listener.connections, 1);
    conn.close();
  });

  await t.step("fetch sees the address it binds", async () => {
    const client = Deno.createHttpClient({ localAddress: "127.0.0.2" });
    const res = await fetch(`${url}/`, { client });
    equal(await res.text(), "hello 127.0.0.2");
    client.close();
  });

  await t.step("a WebSocket upgrade works and outlives its HTTP request", async () => {
    const ws = new WebSocket(`ws://127.0.0.1:${listener.addr.port}/ws`);
    await new Promise((resolve, reject) => {
      ws.onopen = resolve;
      ws.onerror = reject;
    });
    for (const word of ["a", "b"]) {
      const reply = new Promise((resolve) => ws.onmessage = (m) => resolve(m.data));
      ws.send(word);
      equal(await reply, `echo ${word}`);
    }
    const closed = new Promise((resolve) => ws.onclose = resolve);
    ws.close();
    await closed;
  });
});

Deno.test("HttpListener caps connections per address and per listener", async (t) => {
  await using listener = start({ maxConnections: 6, maxConnectionsPerAddress: 3 });
  const port = listener.addr.port;
  const held: Deno.Conn[] = [];
  try {
    await t.step("the fourth connection from one address gets 503 and is closed", async () => {
      for (let i = 0; i < 3; i++) held.push(await Deno.connect({ hostname: "127.0.0.1", port }));
      // Accepted and counted before the next one is refused.
      for (const conn of held) match(await rawRequest(conn, "/"), /200 OK/);
      const extra = await Deno.connect({ hostname: "127.0.0.1", port });
      await extra.write(encoder.encode("GET / HTTP/1.1\r\nHost: t\r\n\r\n")).catch(() => {});
      const answer = await readToEnd(extra);
      match(answer, /^HTTP\/1\.1 503 [\s\S]*Retry-After: 1[\s\S]*"overloaded"/);
      extra.close();
      equal(listener.stats.refused.max_per_address, 1);
    });

    await t.step("another address is still served, up to the listener's cap", async () => {
      const client = Deno.createHttpClient({ localAddress: "127.0.0.2" });
      equal(await (await fetch(`http://127.0.0.1:${port}/`, { client })).text(), "hello 127.0.0.2");
      client.close();
      for (const host of ["127.0.0.3", "127.0.0.4", "127.0.0.5"]) {
        // Raw connections cannot bind a local address; fetch clients keep theirs open.
        const c = Deno.createHttpClient({ localAddress: host });
        const res = await fetch(`http://127.0.0.1:${port}/`, { client: c });
        await res.text();
        held.push({ close: () => c.close() } as Deno.Conn);
      }
      equal(listener.connections, 6);
      const full = Deno.createHttpClient({ localAddress: "127.0.0.6" });
      // The 503 or, should the close overtake it, a reset.
      const refused = await fetch(`http://127.0.0.1:${port}/`, { client: full }).then(
        (r) => r.text().then(() => r.status === 503),
        () => true,
      );
      full.close();
      ok(refused, "a connection over the listener's cap was served");
      ok(listener.stats.refused.max_connections >= 1);
    });
  } finally {
    for (const conn of held) conn.close();
  }
});

Deno.test("HttpListener closes a request whose body never arrives or whose answer is never read", async (t) => {
  await using listener = start({ requestTimeoutMs: 400, headerTimeoutMs: 30_000 });
  const port = listener.addr.port;

  await t.step(
    "a head announcing a body that never comes is closed after the timeout",
    async () => {
      const conn = await Deno.connect({ hostname: "127.0.0.1", port });
      await conn.write(encoder.encode(
        "POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n{",
      ));
      await readToEnd(conn); // ends when the listener closes it
      conn.close();
      equal(listener.stats.timedOut.request, 1);
    },
  );

  await t.step("a chunked body that stalls is closed the same way", async () => {
    const conn = await Deno.connect({ hostname: "127.0.0.1", port });
    await conn.write(encoder.encode(
      "POST /upload HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n1\r\n{\r\n",
    ));
    await readToEnd(conn);
    conn.close();
    equal(listener.stats.timedOut.request, 2);
    equal(listener.connections, 0);
  });

  await t.step("a request answered in time is not cut", async () => {
    const conn = await Deno.connect({ hostname: "127.0.0.1", port });
    await conn.write(encoder.encode(
      "POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc",
    ));
    match(await readToEnd(conn), /got 3/);
    conn.close();
    equal(listener.stats.timedOut.request, 2);
  });
});

const RESET_BURST = `
import socket, struct, sys
port = int(sys.argv[1])
socks = []
for _ in range(100):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.connect(("127.0.0.1", port))
    socks.append(s)
for s in socks:
    s.close()
`;

Deno.test("HttpListener keeps accepting at once after connections reset before their accept", async () => {
  await using listener = start({ acceptBackoffMs: 2_000, acceptBackoffMaxMs: 2_000 });
  const port = listener.addr.port;
  // Connections reset (SO_LINGER 0) before the listener accepts them fail their accept with
  // ENOTCONN or ECONNABORTED. Deno cannot send a reset, so python3 does.
  const burst = await new Deno.Command("python3", {
    args: ["-c", RESET_BURST, String(port)],
    stdout: "null",
    stderr: "inherit",
  }).output();
  equal(burst.code, 0);
  ok(listener.stats.acceptErrors > 0 || listener.stats.accepted > 0);
  // Were every such error taken for descriptor exhaustion, this would wait out 2 s pauses.
  const started = performance.now();
  const res = await fetch(`http://127.0.0.1:${port}/`, {
    headers: { connection: "close" },
    signal: AbortSignal.timeout(10_000),
  });
  equal(await res.text(), "hello 127.0.0.1");
  ok(performance.now() - started < 1_500, `answered after ${performance.now() - started} ms`);
});

Deno.test("HttpListener closes connections without a request head, and idle keep-alives", async (t) => {
  await using listener = start({ headerTimeoutMs: 300, idleTimeoutMs: 300 });
  const port = listener.addr.port;

  await t.step("a silent connection is closed after the header timeout", async () => {
    const conn = await Deno.connect({ hostname: "127.0.0.1", port });
    equal(await readToEnd(conn), "");
    conn.close();
    equal(listener.stats.timedOut.header, 1);
  });

  await t.step("a half-sent request head is closed after the header timeout", async () => {
    const conn = await Deno.connect({ hostname: "127.0.0.1", port });
    await conn.write(encoder.encode("GET / HTTP/1.1\r\nHost: t\r\n"));
    equal(await readToEnd(conn), "");
    conn.close();
    equal(listener.stats.timedOut.header, 2);
  });

  await t.step("a refused WebSocket upgrade leaves a connection that still times out", async () => {
    const conn = await Deno.connect({ hostname: "127.0.0.1", port });
    await conn.write(encoder.encode(
      "GET /ws-denied HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    ));
    const answer = await readToEnd(conn);
    match(answer, /^HTTP\/1\.1 401/);
    conn.close();
    equal(listener.stats.timedOut.idle, 1);
  });

  await t.step("a keep-alive connection is closed after the idle timeout", async () => {
    const conn = await Deno.connect({ hostname: "127.0.0.1", port });
    match(await rawRequest(conn, "/"), /200 OK/);
    equal(await readToEnd(conn), "");
    conn.close();
    equal(listener.stats.timedOut.idle, 2);
    equal(listener.connections, 0);
  });
});

const CHILD = `
import { HttpListener } from ${
  JSON.stringify(new URL("../server/http_listener.ts", import.meta.url).href)
};
import { jsonLogger } from ${JSON.stringify(new URL("../core/logger.ts", import.meta.url).href)};
const listener = HttpListener.start({
  hostname: "127.0.0.1", port: 0, handler: () => new Response("alive"),
  maxConnections: 100000, maxConnectionsPerAddress: 100000,
  headerTimeoutMs: 60000, idleTimeoutMs: 60000, requestTimeoutMs: 60000,
  logger: jsonLogger("info"), clock: { now: () => Date.now() },
  acceptBackoffMs: 10, acceptBackoffMaxMs: 50,
});
console.log(JSON.stringify({ port: listener.addr.port }));
await new Promise(() => {});
`;

Deno.test("HttpListener survives running out of descriptors and serves again afterwards", async () => {
  const dir = await Deno.makeTempDir();
  const script = `${dir}/child.ts`;
  await Deno.writeTextFile(script, CHILD);
  const root = fileURLToPath(new URL("..", import.meta.url));
  const child = new Deno.Command("bash", {
    args: ["-c", `ulimit -n 128; exec "${Deno.execPath()}" run -A "${script}"`],
    cwd: root,
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const out: string[] = [];
  const lines = child.stdout.pipeThrough(new TextDecoderStream()).getReader();
  const stderr = new Response(child.stderr).text();
  const held: Deno.Conn[] = [];
  try {
    let buffered = "";
    while (!buffered.includes("\n")) {
      const r = await lines.read();
      if (r.done) throw new Error(`child exited: ${await stderr}`);
      buffered += r.value;
    }
    const port = JSON.parse(buffered.slice(0, buffered.indexOf("\n"))).port;
    out.push(buffered);
    const emfile = Promise.withResolvers<void>();
    const reading = (async () => {
      for (let r = await lines.read(); !r.done; r = await lines.read()) {
        out.push(r.value);
        if (out.join("").includes("accept_failed")) emfile.resolve();
      }
      emfile.reject(new Error(`child exited: ${out.join("")}`));
    })();
    // More connections than the child has descriptors: the kernel queues them in the backlog.
    for (let i = 0; i < 200; i++) held.push(await Deno.connect({ hostname: "127.0.0.1", port }));
    // The child reports EMFILE (logged, not fatal).
    let timer: ReturnType<typeof setTimeout> | undefined;
    await Promise.race([
      emfile.promise,
      new Promise((_, reject) => {
        timer = setTimeout(() => reject(new Error("no accept_failed line in 30 s")), 30_000);
      }),
    ]).finally(() => clearTimeout(timer));
    match(out.join(""), /security: accept_failed.*EMFILE/);
    for (const conn of held.splice(0)) conn.close();
    // Once descriptors are free again, new clients are served (the child works through its
    // backlog first: retried, with no event to wait for).
    let body = "";
    for (let i = 0; i < 100 && body !== "alive"; i++) {
      body = await fetch(`http://127.0.0.1:${port}/`).then((r) => r.text(), () => "");
      if (body !== "alive") await new Promise((r) => setTimeout(r, 100));
    }
    equal(body, "alive", `no answer after the flood: ${await Promise.race([stderr, ""])}`);
    child.kill("SIGKILL");
    await child.status;
    await reading;
    await stderr;
  } finally {
    for (const conn of held) conn.close();
    try {
      child.kill("SIGKILL");
    } catch { /* exited */ }
    await child.status;
    await Deno.remove(dir, { recursive: true });
  }
});
