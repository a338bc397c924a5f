// WebSocket endpoint: real clients against the in-process gateway (see tests/_gateway.ts).
import assert from "node:assert/strict";
import { sign } from "hono/jwt";
import type { Reading } from "../core/reading.ts";
import {
  isoAgo,
  JWT_SECRET,
  passwordFor,
  signedReading,
  startTestGateway,
  type TestGateway,
} from "./_gateway.ts";
import { within as withinDefault } from "./_mosquitto.ts";
import { deviceRecord, storeDevice } from "./_devices.ts";

/** Upper bound for any single awaited event; a guard against hangs, not a synchronisation. */
const EVENT_TIMEOUT_MS = 10_000;

/** `promise`, or a rejection naming `what` after {@linkcode EVENT_TIMEOUT_MS}. */
const within = <T>(promise: Promise<T>, what: string) =>
  withinDefault(promise, what, EVENT_TIMEOUT_MS);

/** Polls `condition` (server-side state without an event to await) until it holds. */
async function waitFor(condition: () => boolean, what: string): Promise<void> {
  const deadline = Date.now() + EVENT_TIMEOUT_MS;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error(`${what}: not within ${EVENT_TIMEOUT_MS} ms`);
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

/** Every message the server may send. */
interface ServerMessage {
  type: string;
  code?: string;
  message?: string;
  meters?: string[];
  account?: boolean;
  all?: boolean;
  data?: Reading;
  position?: string;
  positions?: Record<string, string>;
}

/** A WebSocket client that queues every server message so none is missed between awaits. */
class WsClient implements AsyncDisposable {
  readonly ws: WebSocket;
  readonly closed: Promise<CloseEvent>;
  #queue: ServerMessage[] = [];
  #waiter?: { resolve: (m: ServerMessage) => void; reject: (e: Error) => void };
  #closeEvent?: CloseEvent;
  #opened = false;

  private constructor(ws: WebSocket) {
    this.ws = ws;
    ws.addEventListener("open", () => this.#opened = true);
    ws.addEventListener("message", (event) => {
      let msg: ServerMessage;
      if (typeof event.data !== "string") {
        msg = { type: "__binary__" };
      } else {
        try {
          msg = JSON.parse(event.data);
        } catch {
          msg = { type: "__not_json__", message: event.data };
        }
      }
      const waiter = this.#waiter;
      this.#waiter = undefined;
      if (waiter) waiter.resolve(msg);
      else this.#queue.push(msg);
    });
    this.closed = new Promise((resolve) => {
      ws.addEventListener("close", (event) => {
        this.#closeEvent = event;
        const waiter = this.#waiter;
        this.#waiter = undefined;
        waiter?.reject(new Error(`WebSocket closed (${event.code} ${event.reason})`));
        resolve(event);
      }, { once: true });
    });
  }

  /** Connects with `?token=` and waits for the open event. */
  static async connect(gw: TestGateway, token: string): Promise<WsClient> {
    const ws = new WebSocket(`${wsUrl(gw)}/ws?token=${encodeURIComponent(token)}`);
    const client = new WsClient(ws);
    const opened = new Promise<boolean>((resolve) => {
      ws.addEventListener("open", () => resolve(true), { once: true });
      client.closed.then(() => resolve(false));
    });
    if (!await opened) {
      const event = await client.closed;
      throw new Error(`WebSocket did not open (close ${event.code})`);
    }
    return client;
  }

  get wasOpened(): boolean {
    return this.#opened;
  }

  get isClosed(): boolean {
    return this.#closeEvent !== undefined;
  }

  /** The next server message, in order. */
  next(timeoutMs = EVENT_TIMEOUT_MS): Promise<ServerMessage> {
    const queued = this.#queue.shift();
    if (queued) return Promise.resolve(queued);
    if (this.#closeEvent) {
      return Promise.reject(new Error(`WebSocket already closed (${this.#closeEvent.code})`));
    }
    assert.equal(this.#waiter, undefined, "only one next() at a time");
    return new Promise<ServerMessage>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#waiter = undefined;
        reject(new Error(`no WebSocket message within ${timeoutMs} ms`));
      }, timeoutMs);
      this.#waiter = {
        resolve: (m) => {
          clearTimeout(timer);
          resolve(m);
        },
        reject: (e) => {
          clearTimeout(timer);
          reject(e);
        },
      };
    });
  }

  /** Sends a JSON value (or raw text / bytes). */
  send(value: unknown): void {
    if (typeof value === "string" || value instanceof Uint8Array) this.ws.send(value);
    else this.ws.send(JSON.stringify(value));
  }

  /** Sends and returns the next message. */
  request(value: unknown): Promise<ServerMessage> {
    this.send(value);
    return this.next().then((reply) => {
      // Resume positions are asserted where they matter (tests/ws_hub_test.ts, and below).
      if (reply.type === "subscribed") {
        this.positions = reply.positions;
        delete reply.positions;
      }
      return reply;
    });
  }

  /** The `positions` of the last `subscribed` reply. */
  positions?: Record<string, string>;

  /** Proves nothing else is queued: a ping's reply must be the very next message. */
  async assertOnlyPong(context: string): Promise<void> {
    const reply = await this.request({ type: "ping" });
    assert.deepEqual(
      reply,
      { type: "pong" },
      `${context}: expected pong, got ${JSON.stringify(reply)}`,
    );
  }

  async close(): Promise<void> {
    if (!this.#closeEvent && this.ws.readyState !== WebSocket.CLOSING) this.ws.close();
    await this.closed;
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }
}

function wsUrl(gw: TestGateway): string {
  return gw.url.replace(/^http:/, "ws:");
}

/** Timestamps 16 minutes apart (beyond the 15-minute dedupe window), all within the last 7 days. */
let tsSeq = 0;
function nextTimestamp(): string {
  return isoAgo(60_000 + tsSeq++ * 16 * 60_000);
}

interface Meter {
  id: string;
  secret: string;
}

async function submit(gw: TestGateway, token: string, meter: Meter): Promise<Reading> {
  const res = await gw.request("POST", "/api/meters/submit-reading", {
    token,
    body: signedReading(meter.id, meter.secret, nextTimestamp(), "2.25"),
  });
  assert.equal(res.status, 201, JSON.stringify(res.body));
  return res.body as Reading;
}

/** Awaits the next message and asserts it is the accepted event of `reading`. */
async function expectReading(client: WsClient, reading: Reading, context: string): Promise<void> {
  const msg = await client.next();
  assert.equal(msg.type, "meter.reading.accepted", `${context}: ${JSON.stringify(msg)}`);
  assert.equal(msg.data?.id, reading.id, context);
  assert.deepEqual(msg.data, reading, `${context}: the event carries the stored reading`);
}

Deno.test("the WebSocket endpoint streams committed readings only to authorised subscribers", async (t) => {
  await using gw = await startTestGateway();
  const alice = await gw.createUser("alice@ws.test");
  const bob = await gw.createUser("bob@ws.test");
  const operator = await gw.createUser("operator@ws.test", "operator");
  const meter = async (id: string, userId: string): Promise<Meter> => ({
    id,
    secret: (await gw.registerMeter(id, userId)).secret_hex,
  });
  const a1 = await meter("alice-1", alice.id);
  const a2 = await meter("alice-2", alice.id);
  const b1 = await meter("bob-1", bob.id);

  await t.step(
    "a user subscribed to an own meter receives the reading the 201 returned",
    async () => {
      await using client = await WsClient.connect(gw, alice.token);
      assert.deepEqual(await client.request({ type: "subscribe", meters: [a1.id] }), {
        type: "subscribed",
        meters: [a1.id],
        meter_count: 1,
        account: false,
        all: false,
      });
      assert.deepEqual(client.positions, { "alice-1": "alice-1@0" }, "no reading yet");
      const stored = await submit(gw, alice.token, a1);
      await expectReading(client, stored, "own meter");
      // Another own meter that is not subscribed is not delivered.
      await submit(gw, alice.token, a2);
      await client.assertOnlyPong("unsubscribed own meter");
    },
  );

  await t.step("a reading event is sent only once the reading is stored", async () => {
    await using client = await WsClient.connect(gw, alice.token);
    assert.equal((await client.request({ type: "subscribe", meters: [a1.id] })).type, "subscribed");
    const timestamp = nextTimestamp();
    // The event may overtake the HTTP answer: check the store the moment it arrives.
    const answer = gw.request("POST", "/api/meters/submit-reading", {
      token: alice.token,
      body: signedReading(a1.id, a1.secret, timestamp, "3.5"),
    });
    const event = await client.next();
    assert.equal(event.type, "meter.reading.accepted", JSON.stringify(event));
    const row = await gw.gateway.store.getReading(a1.id, Date.parse(timestamp));
    assert.ok(row, "the reading is in the store when its event arrives");
    const res = await answer;
    assert.equal(res.status, 201, JSON.stringify(res.body));
    assert.equal(event.data?.id, res.body.id);
    assert.equal(event.data?.kwh_amount, 3.5);
  });

  await t.step("an account subscription receives the readings of every own meter", async () => {
    await using client = await WsClient.connect(gw, alice.token);
    await using observer = await WsClient.connect(gw, gw.adminToken);
    assert.equal((await observer.request({ type: "subscribe", all: true })).type, "subscribed");
    assert.deepEqual(await client.request({ type: "subscribe", account: true }), {
      type: "subscribed",
      meters: [],
      meter_count: 0,
      account: true,
      all: false,
    });
    const r1 = await submit(gw, alice.token, a1);
    await expectReading(client, r1, "account, first meter");
    const r2 = await submit(gw, alice.token, a2);
    await expectReading(client, r2, "account, second meter");
    // Bob's reading is not part of Alice's account.
    const rb = await submit(gw, bob.token, b1);
    await expectReading(observer, r1, "observer");
    await expectReading(observer, r2, "observer");
    await expectReading(observer, rb, "observer"); // the hub has handled Bob's reading
    await client.assertOnlyPong("another account's reading");
  });

  await t.step("an admin subscribed to all receives every user's readings", async () => {
    await using admin = await WsClient.connect(gw, gw.adminToken);
    assert.deepEqual(await admin.request({ type: "subscribe", all: true }), {
      type: "subscribed",
      meters: [],
      meter_count: 0,
      account: false,
      all: true,
    });
    const ra = await submit(gw, alice.token, a1);
    await expectReading(admin, ra, "all: alice");
    const rb = await submit(gw, bob.token, b1);
    await expectReading(admin, rb, "all: bob");
    const rAdmin = await submit(gw, gw.adminToken, a2); // an admin may submit for any meter
    await expectReading(admin, rAdmin, "all: admin-submitted");
  });

  await t.step(
    "a user subscribing to another user's meter is refused and receives nothing of it",
    async () => {
      await using client = await WsClient.connect(gw, alice.token);
      await using observer = await WsClient.connect(gw, gw.adminToken);
      assert.equal((await observer.request({ type: "subscribe", all: true })).type, "subscribed");

      const refused = await client.request({ type: "subscribe", meters: [b1.id] });
      assert.equal(refused.type, "error", JSON.stringify(refused));
      assert.equal(refused.code, "forbidden");
      assert.equal(typeof refused.message, "string");
      // A list mixing an own and a foreign meter is refused as a whole.
      const mixed = await client.request({ type: "subscribe", meters: [a1.id, b1.id] });
      assert.equal(mixed.code, "forbidden", JSON.stringify(mixed));
      // An unregistered meter cannot be claimed either.
      const unknown = await client.request({ type: "subscribe", meters: ["nobody-meter"] });
      assert.equal(unknown.code, "forbidden", JSON.stringify(unknown));

      const rb = await submit(gw, bob.token, b1);
      const ra = await submit(gw, alice.token, a1);
      await expectReading(observer, rb, "observer sees bob's reading");
      await expectReading(observer, ra, "observer sees alice's reading");
      // Both readings went through the hub; the next message to Alice must be her pong.
      await client.assertOnlyPong("foreign meter after refusal");
      assert.deepEqual(await client.request({ type: "unsubscribe", meters: [] }), {
        type: "subscribed",
        meters: [],
        meter_count: 0,
        account: false,
        all: false,
      });
    },
  );

  await t.step("only admins may subscribe to all meters", async () => {
    for (const [who, token] of [["user", alice.token], ["operator", operator.token]] as const) {
      await using client = await WsClient.connect(gw, token);
      const refused = await client.request({ type: "subscribe", all: true });
      assert.equal(refused.type, "error", `${who}: ${JSON.stringify(refused)}`);
      assert.equal(refused.code, "forbidden", who);
      const state = await client.request({ type: "subscribe", meters: [] });
      assert.equal(state.all, false, `${who} must not be subscribed to all`);
    }
  });

  await t.step("garbage messages get invalid_payload and the connection stays usable", async () => {
    await using client = await WsClient.connect(gw, alice.token);
    const garbage: unknown[] = [
      "not json",
      "{",
      "null",
      "42",
      '"ping"',
      "[]",
      { type: "dance" },
      { type: "ping", extra: true },
      { type: "subscribe", meters: [a1.id], everything: true },
      { type: "subscribe", meters: a1.id },
      { type: "subscribe", meters: ["bad meter id!"] },
      { type: "subscribe", account: "yes" },
      { meters: [a1.id] },
      new TextEncoder().encode('{"type":"ping"}'), // binary frame
    ];
    for (const message of garbage) {
      const label = message instanceof Uint8Array
        ? "binary frame"
        : (typeof message === "string" ? message : JSON.stringify(message)).slice(0, 60);
      const reply = await client.request(message);
      assert.equal(reply.type, "error", `${label}: ${JSON.stringify(reply)}`);
      assert.equal(reply.code, "invalid_payload", label);
      assert.equal(typeof reply.message, "string", label);
      assert.equal(client.isClosed, false, `${label} must not close the connection`);
    }
    await client.assertOnlyPong("after garbage");
    assert.deepEqual(await client.request({ type: "subscribe", meters: [a1.id] }), {
      type: "subscribed",
      meters: [a1.id],
      meter_count: 1,
      account: false,
      all: false,
    });
    const stored = await submit(gw, alice.token, a1);
    await expectReading(client, stored, "after garbage");
  });

  await t.step("a message over 64 KiB closes the connection with 1009", async () => {
    const sizeBefore = gw.gateway.hub.size;
    const client = await WsClient.connect(gw, alice.token);
    client.send(JSON.stringify({ type: "ping", pad: "x".repeat(70 * 1024) }));
    const event = await within(client.closed, "the oversized message's close");
    assert.equal(event.code, 1009);
    assert.equal(event.reason, "Message too big: at most 64 KiB");
    await waitFor(() => gw.gateway.hub.size === sizeBefore, "the closed client left the hub");
  });

  await t.step("an upgrade without a valid token is refused with 401", async () => {
    const sizeBefore = gw.gateway.hub.size;
    const now = Math.floor(Date.now() / 1000);
    const otherSecret = await sign(
      { sub: alice.id, role: "user", iat: now, exp: now + 3600 },
      "another-secret-another-secret-0123456789",
      "HS256",
    );
    const [header, payload] = alice.token.split(".");
    const cases: [string, string][] = [
      ["no token", "/ws"],
      ["empty token", "/ws?token="],
      ["garbage token", "/ws?token=not-a-jwt"],
      ["forged signature", `/ws?token=${header}.${payload}.${"A".repeat(43)}`],
      ["token signed with another secret", `/ws?token=${otherSecret}`],
    ];
    for (const [label, path] of cases) {
      const res = await fetch(gw.url + path, {
        headers: {
          upgrade: "websocket",
          connection: "Upgrade",
          "sec-websocket-key": btoa("0123456789abcdef"),
          "sec-websocket-version": "13",
        },
      });
      const body = await res.json();
      assert.equal(res.status, 401, `${label}: ${JSON.stringify(body)}`);
      assert.equal(body.error?.code, "unauthorized", label);

      const ws = new WebSocket(wsUrl(gw) + path);
      let opened = false;
      let errored = false;
      ws.onopen = () => opened = true;
      ws.onerror = (e) => {
        e.preventDefault(); // the failure is the expected outcome
        errored = true;
      };
      const closed = await new Promise<CloseEvent>((resolve) => ws.onclose = resolve);
      assert.equal(opened, false, `${label}: the WebSocket must never open`);
      assert.equal(errored, true, `${label}: the WebSocket must report an error`);
      assert.notEqual(closed.code, 1000, label);
    }
    assert.equal(gw.gateway.hub.size, sizeBefore, "no hub client was attached");

    // A valid token without an upgrade is a plain bad request, not a WebSocket.
    const plain = await gw.request("GET", `/ws?token=${encodeURIComponent(alice.token)}`);
    assert.equal(plain.status, 400, JSON.stringify(plain.body));
    assert.equal(plain.body.error.code, "invalid_payload");
  });

  await t.step("unsubscribing stops delivery", async () => {
    await using client = await WsClient.connect(gw, alice.token);
    await using observer = await WsClient.connect(gw, gw.adminToken);
    assert.equal((await observer.request({ type: "subscribe", all: true })).type, "subscribed");
    assert.deepEqual(
      await client.request({ type: "subscribe", meters: [a1.id, a2.id], account: true }),
      { type: "subscribed", meters: [a1.id, a2.id], meter_count: 2, account: true, all: false },
    );
    const first = await submit(gw, alice.token, a1);
    await expectReading(client, first, "before unsubscribe");
    await expectReading(observer, first, "observer");

    // Dropping the meters alone still leaves the account subscription.
    assert.deepEqual(await client.request({ type: "unsubscribe", meters: [a1.id, a2.id] }), {
      type: "subscribed",
      meters: [],
      meter_count: 0,
      account: true,
      all: false,
    });
    const second = await submit(gw, alice.token, a1);
    await expectReading(client, second, "account still subscribed");
    await expectReading(observer, second, "observer");

    assert.deepEqual(await client.request({ type: "unsubscribe", account: true }), {
      type: "subscribed",
      meters: [],
      meter_count: 0,
      account: false,
      all: false,
    });
    const third = await submit(gw, alice.token, a1);
    const fourth = await submit(gw, alice.token, a2);
    await expectReading(observer, third, "observer");
    await expectReading(observer, fourth, "observer");
    await client.assertOnlyPong("after unsubscribe");
  });
});

// ---- slow client --------------------------------------------------------------------------

/** A WebSocket handshake done by hand on a raw TCP connection that afterwards never reads. */
async function rawHandshake(
  gw: TestGateway,
  token: string,
): Promise<{ conn: Deno.TcpConn; readFrame: () => Promise<string> }> {
  const port = Number(new URL(gw.url).port);
  const conn = await Deno.connect({ hostname: "127.0.0.1", port });
  const key = btoa(String.fromCharCode(...crypto.getRandomValues(new Uint8Array(16))));
  const request = [
    `GET /ws?token=${encodeURIComponent(token)} HTTP/1.1`,
    `Host: 127.0.0.1:${port}`,
    "Upgrade: websocket",
    "Connection: Upgrade",
    `Sec-WebSocket-Key: ${key}`,
    "Sec-WebSocket-Version: 13",
    "",
    "",
  ].join("\r\n");
  await writeAll(conn, new TextEncoder().encode(request));

  let buffer = new Uint8Array(0);
  const fill = async (): Promise<void> => {
    const chunk = new Uint8Array(4096);
    const n = await conn.read(chunk);
    if (n === null) throw new Error("connection closed during handshake");
    const joined = new Uint8Array(buffer.length + n);
    joined.set(buffer);
    joined.set(chunk.subarray(0, n), buffer.length);
    buffer = joined;
  };
  let headerEnd: number;
  while ((headerEnd = new TextDecoder().decode(buffer).indexOf("\r\n\r\n")) < 0) await fill();
  const head = new TextDecoder().decode(buffer.subarray(0, headerEnd));
  buffer = buffer.subarray(headerEnd + 4);
  assert.match(head, /^HTTP\/1\.1 101 /, head);
  const digest = await crypto.subtle.digest(
    "SHA-1",
    new TextEncoder().encode(key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"),
  );
  const accept = btoa(String.fromCharCode(...new Uint8Array(digest)));
  assert.match(head, new RegExp(`\r\nsec-websocket-accept: ${escapeRegExp(accept)}\r?$`, "im"));

  /** Reads exactly one unmasked server text frame (used only before the client goes silent). */
  const readFrame = async (): Promise<string> => {
    while (buffer.length < 2) await fill();
    let length = buffer[1] & 0x7f;
    let offset = 2;
    if (length === 126) {
      while (buffer.length < 4) await fill();
      length = (buffer[2] << 8) | buffer[3];
      offset = 4;
    }
    assert.ok(length < 65536, "small control replies only");
    while (buffer.length < offset + length) await fill();
    assert.equal(buffer[0], 0x81, "a final text frame");
    const text = new TextDecoder().decode(buffer.subarray(offset, offset + length));
    buffer = buffer.subarray(offset + length);
    return text;
  };
  return { conn, readFrame };
}

/** A masked client text frame. */
function clientTextFrame(text: string): Uint8Array {
  const payload = new TextEncoder().encode(text);
  assert.ok(payload.length < 126);
  const mask = crypto.getRandomValues(new Uint8Array(4));
  const frame = new Uint8Array(2 + 4 + payload.length);
  frame[0] = 0x81;
  frame[1] = 0x80 | payload.length;
  frame.set(mask, 2);
  for (let i = 0; i < payload.length; i++) frame[6 + i] = payload[i] ^ mask[i % 4];
  return frame;
}

async function writeAll(conn: Deno.Conn, bytes: Uint8Array): Promise<void> {
  let written = 0;
  while (written < bytes.length) written += await conn.write(bytes.subarray(written));
}

function escapeRegExp(text: string): string {
  return text.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
}

Deno.test("a WebSocket client that stops reading is disconnected once its send buffer passes the bound", async () => {
  await using gw = await startTestGateway({ env: { WS_SEND_BUFFER_MAX: "1024" } });
  const hub = gw.gateway.hub;

  // A well-behaved client that reads everything must survive the same stream.
  await using healthy = await WsClient.connect(gw, gw.adminToken);
  assert.equal((await healthy.request({ type: "subscribe", all: true })).all, true);

  const { conn, readFrame } = await rawHandshake(gw, gw.adminToken);
  try {
    await writeAll(conn, clientTextFrame(JSON.stringify({ type: "subscribe", all: true })));
    const reply = JSON.parse(await readFrame());
    assert.deepEqual(reply, {
      type: "subscribed",
      meters: [],
      meter_count: 0,
      account: false,
      all: true,
      positions: {},
    });
    // From here on the raw client never reads again.
    const sizeBefore = hub.size;
    assert.equal(sizeBefore, 2);
    assert.equal(hub.dropped, 0);

    const event = {
      type: "meter.reading.accepted" as const,
      position: "slow-meter@1",
      data: {
        id: "00000000-0000-8000-8000-000000000000",
        meter_id: "slow-meter",
        user_id: "someone",
        wallet_address: null,
        kwh_amount: 1,
        reading_timestamp: new Date().toISOString(),
        key_id: "k",
        device_signature: "f".repeat(32 * 1024), // a large payload fills kernel buffers fast
        source: "http" as const,
        submitted_at: new Date().toISOString(),
        minted: false,
      },
    };
    // Each round waits for the healthy client to receive the event, so its buffer drains.
    // Kernel socket buffers hold a few MiB at most: 2000 rounds of 32 KiB is far beyond that.
    let rounds = 0;
    while (hub.dropped === 0 && rounds < 2000) {
      await gw.bus.publish([event]);
      rounds++;
      const msg = await healthy.next();
      assert.equal(msg.type, "meter.reading.accepted");
      assert.equal(msg.data?.device_signature.length, 32 * 1024);
    }
    assert.ok(hub.dropped >= 1, `the silent client was not dropped after ${rounds} events`);
    assert.equal(hub.dropped, 1, "only the silent client is dropped");
    assert.equal(hub.size, sizeBefore - 1, "the dropped client left the hub");
    assert.ok(rounds > 1, "the first event fits in an empty buffer");

    // The healthy client is still attached and served.
    assert.equal(healthy.isClosed, false);
    await gw.bus.publish([event]);
    assert.equal((await healthy.next()).type, "meter.reading.accepted");
    await healthy.assertOnlyPong("healthy client after the drop");
    assert.equal(hub.size, sizeBefore - 1);
  } finally {
    conn.close();
  }
});

/**
 * `n` meters `<prefix>-1` … of `userId`, written straight to the store (the API's registration
 * limit would take minutes): their owners are not cached yet, so checking them reads the store.
 */
async function ownMeters(gw: TestGateway, userId: string, prefix: string, n: number) {
  const ids = Array.from({ length: n }, (_, i) => `${prefix}-${i + 1}`);
  for (const id of ids) {
    await storeDevice(gw.gateway.store, deviceRecord(id, userId, { algorithm: "hmac-sha256" }));
  }
  return ids;
}

Deno.test("a WebSocket client with more than 16 messages pending is closed with 1008", async () => {
  await using gw = await startTestGateway();
  const user = await gw.createUser("flood@ws.test");
  const meters = await ownMeters(gw, user.id, "flood", 1000);
  await using flooder = await WsClient.connect(gw, user.token);
  // The first message makes the server look the owners of 1 000 meters up in the store, one
  // after the other, so all 17 arrive long before it is handled: the 17th finds 16 pending and
  // is refused.
  // (Exactly 17: frames that arrive after the server's close frame make Deno drop the
  // connection without completing the close handshake, and the client would not see the code.)
  const message = { type: "subscribe", meters };
  for (let i = 0; i < 17; i++) flooder.send(message);
  const event = await Promise.race([
    flooder.closed,
    new Promise<never>((_, reject) => {
      const timer = setTimeout(() => reject(new Error("not closed in time")), EVENT_TIMEOUT_MS);
      flooder.closed.finally(() => clearTimeout(timer));
    }),
  ]);
  assert.equal(event.code, 1008);
  assert.equal(event.reason, "Too many pending messages");

  // The server is healthy and serves the next client.
  await using next = await WsClient.connect(gw, user.token);
  assert.deepEqual(await next.request({ type: "subscribe", meters: ["flood-1"] }), {
    type: "subscribed",
    meters: ["flood-1"],
    meter_count: 1,
    account: false,
    all: false,
  });
  assert.equal((await gw.request("GET", "/healthz")).status, 200);
});

Deno.test("20 WebSocket messages sent back to back get the close code 1008 with its reason", async () => {
  await using gw = await startTestGateway();
  const user = await gw.createUser("burst20@ws.test");
  const meters = await ownMeters(gw, user.id, "burst20", 1000);
  await using flooder = await WsClient.connect(gw, user.token);
  const message = { type: "subscribe", meters };
  for (let i = 0; i < 20; i++) flooder.send(message);
  const event = await within(flooder.closed, "the flooder's close");
  assert.equal(event.code, 1008, `closed with ${event.code} "${event.reason}"`);
  assert.equal(event.reason, "Too many pending messages");
});

Deno.test("a WebSocket is closed with 4001 when its access token expires", async () => {
  await using gw = await startTestGateway();
  const user = await gw.createUser("expiry@ws.test");
  // The same token issued as if 1 h minus 3 s ago: it expires 3 s from now (tokens are issued
  // and checked on the wall clock).
  const claims = JSON.parse(atob(user.token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/")));
  const now = Math.floor(Date.now() / 1000);
  const token = await sign(
    { ...claims, iat: now - 3_600 + 3, exp: now + 3 },
    JWT_SECRET,
    "HS256",
  );
  await using client = await WsClient.connect(gw, token);
  await client.assertOnlyPong("before expiry");
  const event = await within(client.closed, "the close at expiry");
  assert.equal(event.code, 4001);
  assert.equal(event.reason, "Access token expired");
  await waitFor(() => gw.gateway.hub.size === 0, "the expired client left the hub");
  // The long-lived token of the same user is still served.
  await using other = await WsClient.connect(gw, user.token);
  await other.assertOnlyPong("a valid token");
});

Deno.test("a WebSocket is closed with 4001 when its user is disabled, demoted, deleted or logs out", async (t) => {
  await using gw = await startTestGateway();
  const patch = (id: string, body: unknown) =>
    gw.request("PATCH", `/api/admin/users/${id}`, { token: gw.adminToken, body });

  const cases: [string, string, (id: string, token: string) => Promise<unknown>][] = [
    ["disabled", "Account rights changed; log in again", (id) => patch(id, { disabled: true })],
    ["demoted", "Account rights changed; log in again", (id) => patch(id, { role: "user" })],
    [
      "deleted",
      "Account deleted",
      (id) => gw.request("DELETE", `/api/admin/users/${id}`, { token: gw.adminToken }),
    ],
    [
      "logged out",
      "Logged out",
      (_id, token) => gw.request("POST", "/api/auth/logout", { token }),
    ],
    [
      "password changed",
      "Password changed; log in again",
      (id, token) =>
        gw.request("POST", "/api/auth/password", {
          token,
          body: { current_password: passwordFor(id), new_password: "a-new-ws-password-1" },
        }),
    ],
  ];
  for (const [what, reason, act] of cases) {
    await t.step(`${what}: closed with 4001 "${reason}"`, async () => {
      const email = `${what.replace(" ", "-")}@ws.test`;
      const user = await gw.createUser(email, what === "demoted" ? "operator" : "user");
      await using client = await WsClient.connect(gw, user.token);
      await using bystander = await WsClient.connect(gw, gw.adminToken);
      await client.assertOnlyPong("before");
      // The password case needs the current password: the harness gives passwordFor(email).
      const res = await act(what === "password changed" ? email : user.id, user.token) as {
        status: number;
      };
      assert.ok(res.status < 300, `${what}: ${res.status}`);
      const event = await within(client.closed, `${what}: the close`);
      assert.equal(event.code, 4001);
      assert.equal(event.reason, reason);
      await bystander.assertOnlyPong("another user's socket stays open");
    });
  }

  await t.step("a late event does not close a socket opened with a newer token", async () => {
    const user = await gw.createUser("late@ws.test");
    await gw.request("POST", "/api/auth/logout", { token: user.token });
    const fresh = await gw.login("late@ws.test", passwordFor("late@ws.test"));
    await using client = await WsClient.connect(gw, fresh);
    // The logout's event again, as if delivered late by another instance's bus.
    await gw.bus.publish([{
      type: "user.changed",
      data: { user_id: user.id, change: "logout", token_generation: 1 },
    }]);
    await client.assertOnlyPong("after the late event");
  });

  await t.step("an upgrade with an ended token is refused", async () => {
    const user = await gw.createUser("ended@ws.test");
    await gw.request("POST", "/api/auth/logout", { token: user.token });
    await assert.rejects(WsClient.connect(gw, user.token), /did not open/);
  });
});

Deno.test("one account may hold at most WS_MAX_CONNECTIONS_PER_USER WebSockets", async () => {
  await using gw = await startTestGateway({ env: { WS_MAX_CONNECTIONS_PER_USER: "2" } });
  const user = await gw.createUser("many@ws.test");
  await using first = await WsClient.connect(gw, user.token);
  await using second = await WsClient.connect(gw, user.token);
  const res = await fetch(`${gw.url}/ws?token=${user.token}`, {
    headers: {
      upgrade: "websocket",
      connection: "Upgrade",
      "sec-websocket-key": btoa("0123456789abcdef"),
      "sec-websocket-version": "13",
    },
  });
  const body = await res.json();
  assert.equal(res.status, 429, JSON.stringify(body));
  assert.equal(body.error.code, "rate_limited");
  await first.close();
  await waitFor(() => gw.gateway.hub.canAttach(user.id), "the closed socket freed its place");
  await using third = await WsClient.connect(gw, user.token);
  await third.assertOnlyPong("a place freed by a close");
  await second.assertOnlyPong("the second socket");
});

Deno.test("parallel upgrades of one account cannot pass the connection cap", async () => {
  await using gw = await startTestGateway({ env: { WS_MAX_CONNECTIONS_PER_USER: "4" } });
  const user = await gw.createUser("parallel@ws.test");
  const attempt = async () => {
    try {
      return await WsClient.connect(gw, user.token);
    } catch {
      return null; // refused (429 before the upgrade)
    }
  };
  const results = await Promise.all(Array.from({ length: 40 }, attempt));
  const open = results.filter((c): c is WsClient => c !== null);
  assert.ok(open.length <= 4, `${open.length} sockets opened, the cap is 4`);
  assert.ok(open.length >= 1, "at least one socket opened");
  for (const client of open) await client.assertOnlyPong("an admitted socket");
  for (const client of open) await client.close();
  await waitFor(
    () => gw.gateway.hub.size === 0 && gw.gateway.hub.reservedCount === 0,
    "every slot was given back",
  );
  // No reservation leaked: the full cap can be opened again.
  const again = [];
  for (let i = 0; i < 4; i++) again.push(await WsClient.connect(gw, user.token));
  for (const client of again) await client.close();
});

Deno.test("a WebSocket holds at most 1 000 meter subscriptions; replies list only the request's", async () => {
  await using gw = await startTestGateway();
  await using client = await WsClient.connect(gw, gw.adminToken);
  const ids = (from: number, n: number) => Array.from({ length: n }, (_, i) => `cap-${from + i}`);
  const first = await client.request({ type: "subscribe", meters: ids(0, 1000) });
  assert.equal(first.type, "subscribed", JSON.stringify(first).slice(0, 200));
  assert.equal((first as { meter_count?: number }).meter_count, 1000);
  const over = await client.request({ type: "subscribe", meters: ids(1000, 1) });
  assert.equal(over.type, "error");
  assert.equal(over.code, "invalid_payload");
  assert.match(over.message ?? "", /At most 1000 meters per connection/);
  // Meters already subscribed are not counted twice; the reply names this request's only.
  const again = await client.request({ type: "subscribe", meters: ids(0, 2) });
  assert.deepEqual(again, {
    type: "subscribed",
    meters: ["cap-0", "cap-1"],
    meter_count: 1000,
    account: false,
    all: false,
  });
  const dropped = await client.request({ type: "unsubscribe", meters: ids(0, 10) });
  assert.deepEqual(dropped.meters, []);
  assert.equal((dropped as { meter_count?: number }).meter_count, 990);
  const added = await client.request({ type: "subscribe", meters: ids(1000, 10) });
  assert.deepEqual(added.meters, ids(1000, 10));
  assert.equal((added as { meter_count?: number }).meter_count, 1000);
  await client.assertOnlyPong("after the refused subscription");
});
