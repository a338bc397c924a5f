// Request bodies: callers are authenticated before a byte of their body is read, a
// Content-Length over the limit is refused at once, the bytes of bodies in flight are bounded
// (503 overloaded beyond HTTP_BODY_BUDGET), and anonymous uploads leave the memory flat.
import { equal, match, ok } from "node:assert/strict";
import { startTestGateway } from "./_gateway.ts";
import { GatewayProcess } from "./_gateway_process.ts";
import { silentLogger } from "../core/logger.ts";
import { HttpListener } from "../server/http_listener.ts";

const encoder = new TextEncoder();
const decoder = new TextDecoder();
/** How long an answer to headers alone may take; the body is never sent, so only a server that
 * answers without reading it can meet this. */
const ANSWER_TIMEOUT_MS = 10_000;

/** Opens a connection and sends a request head; the body, if any, is the caller's to send. */
async function sendHead(
  url: string,
  path: string,
  headers: Record<string, string>,
): Promise<Deno.Conn> {
  const { hostname, port } = new URL(url);
  const conn = await Deno.connect({ hostname, port: Number(port) });
  const lines = Object.entries(headers).map(([k, v]) => `${k}: ${v}\r\n`).join("");
  await conn.write(encoder.encode(`POST ${path} HTTP/1.1\r\nHost: t\r\n${lines}\r\n`));
  return conn;
}

/** Reads a response head and as much of its body as arrived with it; fails after the timeout. */
async function readAnswer(conn: Deno.Conn): Promise<{ status: number; text: string }> {
  let text = "";
  const buf = new Uint8Array(8192);
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<"timeout">((resolve) => {
    timer = setTimeout(() => resolve("timeout"), ANSWER_TIMEOUT_MS);
  });
  try {
    while (!/\r\n\r\n[\s\S]*\}/.test(text)) {
      const n = await Promise.race([conn.read(buf), timeout]);
      if (n === "timeout") throw new Error(`no answer in ${ANSWER_TIMEOUT_MS} ms: ${text}`);
      if (n === null) break;
      text += decoder.decode(buf.subarray(0, n));
    }
  } finally {
    clearTimeout(timer);
  }
  return { status: Number(text.split(" ")[1]), text };
}

Deno.test("request bodies are read only from authenticated callers, within limits and a budget", async (t) => {
  await using gw = await startTestGateway({
    env: { HTTP_BODY_LIMIT: "65536", HTTP_IMPORT_BODY_LIMIT: "100000", HTTP_BODY_BUDGET: "100000" },
  });
  const user = await gw.createUser("bodies@limits.test");
  const json = { "content-type": "application/json" };

  await t.step("an anonymous 8 MB import gets 401 from its headers alone", async () => {
    const conn = await sendHead(gw.url, "/api/admin/devices/import", {
      ...json,
      "content-length": "8000000",
    });
    const answer = await readAnswer(conn);
    conn.close();
    equal(answer.status, 401, answer.text);
    match(answer.text, /"unauthorized"/);
  });

  await t.step("a bad token is refused the same way", async () => {
    const conn = await sendHead(gw.url, "/api/meters/submit-reading", {
      ...json,
      authorization: "Bearer not-a-token",
      "content-length": "60000",
    });
    const answer = await readAnswer(conn);
    conn.close();
    equal(answer.status, 401, answer.text);
  });

  await t.step("an admin's Content-Length over the import limit gets 413 at once", async () => {
    const conn = await sendHead(gw.url, "/api/admin/devices/import", {
      ...json,
      authorization: `Bearer ${gw.adminToken}`,
      "content-length": "100001",
    });
    const answer = await readAnswer(conn);
    conn.close();
    equal(answer.status, 413, answer.text);
    match(answer.text, /"payload_too_large"/);
  });

  await t.step("a user who may not import gets only the small limit there", async () => {
    const conn = await sendHead(gw.url, "/api/admin/devices/import", {
      ...json,
      authorization: `Bearer ${user.token}`,
      "content-length": "70000",
    });
    const answer = await readAnswer(conn);
    conn.close();
    equal(answer.status, 413, answer.text);
  });

  await t.step("bodies in flight beyond HTTP_BODY_BUDGET get 503 with Retry-After", async () => {
    // Two uploads of 60,000 bytes each hold 120,000 > 100,000 bytes: the second waits its turn.
    const first = await sendHead(gw.url, "/api/meters/submit-reading", {
      ...json,
      authorization: `Bearer ${user.token}`,
      "content-length": "60000",
    });
    await first.write(encoder.encode("{"));
    const second = await sendHead(gw.url, "/api/meters/submit-reading", {
      ...json,
      authorization: `Bearer ${user.token}`,
      "content-length": "60000",
    });
    const refused = await readAnswer(second);
    second.close();
    equal(refused.status, 503, refused.text);
    match(refused.text, /retry-after: 1/i);
    match(refused.text, /"overloaded"/);
    // The first upload completes (as bad JSON) and returns its share of the budget.
    await first.write(encoder.encode(" ".repeat(59_999)));
    const done = await readAnswer(first);
    first.close();
    equal(done.status, 400, done.text);
    const res = await gw.request("POST", "/api/meters/submit-reading", {
      token: user.token,
      raw: "x".repeat(60_000),
      headers: json,
    });
    equal(res.status, 400, JSON.stringify(res.body));
  });

  await t.step("a malformed chunked body is 400 invalid_payload, not 500", async () => {
    // Through the gateway's own listener: it hands the HTTP stack's body error to the app.
    await using listener = HttpListener.start({
      hostname: "127.0.0.1",
      port: 0,
      handler: gw.gateway.app.fetch,
      maxConnections: 10,
      maxConnectionsPerAddress: 10,
      headerTimeoutMs: 10_000,
      idleTimeoutMs: 10_000,
      requestTimeoutMs: 10_000,
      logger: silentLogger,
      clock: { now: () => Date.now() },
    });
    const url = `http://127.0.0.1:${listener.addr.port}`;
    const conn = await sendHead(url, "/api/meters/submit-reading", {
      ...json,
      authorization: `Bearer ${user.token}`,
      "transfer-encoding": "chunked",
    });
    await conn.write(encoder.encode("zz\r\nabc\r\n0\r\n\r\n"));
    const answer = await readAnswer(conn);
    conn.close();
    equal(answer.status, 400, answer.text);
    match(answer.text, /"invalid_payload"/);
  });

  await t.step("a chunked body over the limit is cut off while it streams", async () => {
    let sent = 0;
    const chunk = encoder.encode(" ".repeat(16 * 1024));
    const body = new ReadableStream<Uint8Array>({
      pull(controller) {
        // Far more than the limit; the server stops reading long before the end.
        if (sent++ < 1000) controller.enqueue(chunk);
        else controller.close();
      },
    });
    const res = await fetch(`${gw.url}/api/meters/submit-reading`, {
      method: "POST",
      headers: { ...json, authorization: `Bearer ${user.token}` },
      body,
    });
    const answer = await res.json();
    equal(res.status, 413, JSON.stringify(answer));
    ok(sent < 1000, `the whole body was read (${sent} chunks)`);
  });
});

/** Resident memory of a process in bytes (Linux). */
async function rss(pid: number): Promise<number> {
  // Through cat: Deno reads /proc/<pid> only with --allow-all.
  const { stdout } = await new Deno.Command("cat", { args: [`/proc/${pid}/status`] }).output();
  const status = new TextDecoder().decode(stdout);
  return Number(/VmRSS:\s+(\d+) kB/.exec(status)![1]) * 1024;
}

Deno.test("anonymous 8 MB uploads leave the gateway's memory flat", async () => {
  const dir = await Deno.makeTempDir({ prefix: "gw-bodies-" });
  await using gw = await GatewayProcess.start({
    DENO_KV_PATH: `${dir}/gateway.kv`,
    ADMIN_PASSWORD: "bodies-admin-password",
  });
  try {
    const before = await rss(gw.child.pid);
    const upload = new Uint8Array(8_000_000).fill(0x20);
    const statuses = await Promise.all(Array.from({ length: 30 }, async () => {
      try {
        const res = await fetch(`${gw.url}/api/admin/devices/import`, {
          method: "POST",
          headers: { "content-type": "application/json" },
          body: upload,
        });
        await res.body?.cancel();
        return res.status;
      } catch {
        return 0; // the server answered and closed before the whole body was sent
      }
    }));
    const after = await rss(gw.child.pid);
    ok(statuses.every((s) => s === 401 || s === 0), `statuses: ${statuses}`);
    const grown = (after - before) / 2 ** 20;
    // Reading them would hold 30 x 8 MB and copies: hundreds of MB.
    ok(grown < 100, `RSS grew by ${grown.toFixed(0)} MB`);
  } finally {
    await gw.stop();
    await Deno.remove(dir, { recursive: true });
  }
});
