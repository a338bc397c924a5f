// PublishTap against packets from mqtt-packet (the encoder mqtt.js and brokers' test suites use),
// fed through an in-memory socket: framing across chunk boundaries, what is taken and what is
// passed on to mqtt.js, stopping and going on, malformed input, writes and shutdown.
import assert from "node:assert/strict";
import { Buffer } from "node:buffer";
import { once } from "node:events";
import { Duplex } from "node:stream";
import { setImmediate } from "node:timers";
import mqttPacket, { type IPublishPacket, type Packet } from "mqtt-packet";
import { PublishTap, type TappedPublish } from "../mqtt/publish_tap.ts";

function encode(packet: Packet): Buffer {
  return mqttPacket.generate(packet, { protocolVersion: 5 });
}

function publish(
  topic: string,
  payload: Buffer | string,
  qos: 0 | 1 | 2,
  messageId?: number,
  properties?: IPublishPacket["properties"],
): Buffer {
  return encode({
    cmd: "publish",
    topic,
    payload,
    qos,
    messageId,
    dup: false,
    retain: false,
    properties,
  });
}

const CONNACK = encode({
  cmd: "connack",
  sessionPresent: true,
  reasonCode: 0,
  properties: { receiveMaximum: 100, topicAliasMaximum: 10 },
});
const PINGRESP = encode({ cmd: "pingresp" });

// The ops sanitizer is off by default in this Deno (2.9); on, it fails a test that leaves the
// shutdown timer running.
const SANITIZE = { sanitizeOps: true };

/** How many bytes the remaining length of `packet` takes. */
function lengthBytes(packet: Uint8Array): number {
  let n = 1;
  while (packet[n] & 0x80) n++;
  return n;
}

/** Payload bytes that differ from their neighbours, so a misaligned slice shows. */
function payloadOf(size: number): Buffer {
  const payload = Buffer.alloc(size);
  for (let i = 0; i < size; i++) payload[i] = i % 251;
  return payload;
}

/** Lets queued next-ticks run, and with them the streams' flowing and 'end'/'close' events. */
function turn(): Promise<void> {
  return new Promise((resolve) => setImmediate(resolve));
}

/** The socket to the broker: the test pushes what the broker sends and sees what was written. */
class Socket extends Duplex {
  written: Buffer[] = [];
  /** Write callbacks held back while `hold` is on (a full socket). */
  held: (() => void)[] = [];
  hold = false;
  noDelay: boolean[] = [];
  dataEvents = 0;

  constructor(writableHighWaterMark?: number) {
    super({ writableHighWaterMark });
    this.on("data", () => this.dataEvents++);
  }

  setNoDelay(on: boolean): void {
    this.noDelay.push(on);
  }

  override _read(): void {
    // Data arrives when the test pushes it.
  }

  override _write(chunk: Buffer, _encoding: string, callback: (error?: Error | null) => void) {
    this.written.push(chunk);
    if (this.hold) this.held.push(() => callback());
    else callback();
  }
}

interface Seen {
  topic: string;
  payload: Buffer;
  packetId: number;
  qos: 0 | 1;
}

const decoder = new TextDecoder();

/** A tap on a fresh socket, recording what its handlers get and what it passes on. */
function harness(
  options: { publish?: (packet: TappedPublish) => boolean; ours?: number[] } = {},
) {
  const socket = new Socket();
  const publishes: Seen[] = [];
  const pubacks: number[] = [];
  const reasons: number[] = [];
  const tap = new PublishTap(socket, {
    publish(packet) {
      const { bytes, topicStart, topicEnd, payload } = packet;
      // The payload is documented to be a view inside the packet's bytes.
      assert.equal(payload.buffer, bytes.buffer);
      assert.ok(payload.byteOffset >= bytes.byteOffset + topicEnd);
      assert.ok(payload.byteOffset + payload.length <= bytes.byteOffset + bytes.length);
      publishes.push({
        topic: decoder.decode(bytes.subarray(topicStart, topicEnd)),
        payload: Buffer.from(payload), // a copy: the view is only valid during the call
        packetId: packet.packetId,
        qos: packet.qos,
      });
      return options.publish?.(packet) ?? true;
    },
    puback(id, reasonCode) {
      pubacks.push(id);
      reasons.push(reasonCode);
      return options.ours?.includes(id) ?? false;
    },
  });
  const passed: Buffer[] = [];
  tap.on("data", (chunk: Buffer) => passed.push(chunk));
  const errors: Error[] = [];
  tap.on("error", (error: Error) => errors.push(error));
  let ended = false;
  tap.on("end", () => ended = true);
  // Not events.once(): that rejects on 'error', and the malformed cases expect one.
  const closed = new Promise<void>((resolve) => tap.once("close", () => resolve()));
  return {
    socket,
    tap,
    publishes,
    pubacks,
    reasons,
    errors,
    closed,
    ended: () => ended,
    /** Everything passed on to mqtt.js so far. */
    passed: () => Buffer.concat(passed),
    /** Pushes `chunks` as separate reads of the socket and lets them flow. */
    async feed(...chunks: Uint8Array[]): Promise<void> {
      for (const chunk of chunks) socket.push(Buffer.from(chunk));
      await turn();
    },
    async dispose(): Promise<void> {
      tap.destroy();
      await closed;
    },
  };
}

/** `bytes` cut at each of `offsets`. */
function split(bytes: Buffer, ...offsets: number[]): Buffer[] {
  const chunks: Buffer[] = [];
  let from = 0;
  for (const at of offsets) {
    chunks.push(bytes.subarray(from, at));
    from = at;
  }
  chunks.push(bytes.subarray(from));
  return chunks;
}

function bytewise(bytes: Buffer): Buffer[] {
  return [...bytes].map((byte) => Buffer.of(byte));
}

Deno.test(
  "PublishTap splits the broker's stream into packets at any chunk boundary",
  SANITIZE,
  async (t) => {
    // What the tap must make of each packet: taken by the publish handler, taken by the puback
    // handler (one of ours), or passed on to mqtt.js unchanged.
    const script: { bytes: Buffer; to: "publish" | "puback" | "mqtt.js"; seen?: Seen }[] = [
      { bytes: CONNACK, to: "mqtt.js" },
      {
        bytes: publish("meters/m-1/readings", '{"kwh":"1.5"}', 1, 1, {
          messageExpiryInterval: 60,
          contentType: "application/json",
          subscriptionIdentifier: 300, // a 2-byte variable byte integer inside the properties
          userProperties: { note: "x".repeat(150) }, // properties length needs 2 bytes
        }),
        to: "publish",
        seen: {
          topic: "meters/m-1/readings",
          payload: Buffer.from('{"kwh":"1.5"}'),
          packetId: 1,
          qos: 1,
        },
      },
      {
        bytes: publish("meters/m-2/readings", "", 0),
        to: "publish",
        seen: { topic: "meters/m-2/readings", payload: Buffer.alloc(0), packetId: 0, qos: 0 },
      },
      { bytes: PINGRESP, to: "mqtt.js" },
      { bytes: encode({ cmd: "puback", messageId: 7 }), to: "puback" },
      { bytes: encode({ cmd: "puback", messageId: 8, reasonCode: 0x10 }), to: "mqtt.js" },
      {
        bytes: encode({ cmd: "suback", messageId: 3, granted: [1], properties: {} }),
        to: "mqtt.js",
      },
      { bytes: publish("meters/m-3/readings", "qos 2", 2, 4), to: "mqtt.js" },
      {
        bytes: encode({
          cmd: "publish",
          topic: "meters/mètre-4/readings",
          payload: payloadOf(200),
          qos: 1,
          messageId: 65_535,
          dup: true,
          retain: true,
        }),
        to: "publish",
        seen: {
          topic: "meters/mètre-4/readings",
          payload: payloadOf(200),
          packetId: 65_535,
          qos: 1,
        },
      },
      { bytes: encode({ cmd: "disconnect", reasonCode: 0x8e }), to: "mqtt.js" },
    ];
    const stream = Buffer.concat(script.map((p) => p.bytes));
    const expectedPublishes = script.flatMap((p) => p.seen ? [p.seen] : []);
    const expectedPassed = Buffer.concat(
      script.filter((p) => p.to === "mqtt.js").map((p) => p.bytes),
    );
    const ours = [7];

    async function check(chunks: Buffer[], where: string): Promise<void> {
      const h = harness({ ours });
      await h.feed(...chunks);
      assert.equal(h.socket.dataEvents, chunks.length, `${where}: the chunks arrive as sent`);
      assert.deepEqual(h.publishes, expectedPublishes, where);
      assert.deepEqual(h.pubacks, [7, 8], where);
      assert.deepEqual(h.passed(), expectedPassed, where);
      assert.deepEqual(h.errors, [], where);
      await h.dispose();
    }

    await t.step("in one chunk", () => check([stream], "one chunk"));

    await t.step("split in two at every offset", async () => {
      for (let at = 1; at < stream.length; at++) await check(split(stream, at), `split at ${at}`);
    });

    await t.step("one byte at a time", () => check(bytewise(stream), "bytewise"));

    await t.step(
      "in three chunks, the middle one inside a packet or spanning several",
      async () => {
        for (let at = 1; at + 3 < stream.length; at += 7) {
          await check(split(stream, at, at + 3), `split at ${at}, ${at + 3}`);
          const mirror = stream.length - at;
          if (at < mirror) await check(split(stream, at, mirror), `split at ${at}, ${mirror}`);
        }
      },
    );
  },
);

Deno.test("PublishTap passes on what is not for its handlers", SANITIZE, async (t) => {
  await t.step(
    "before the CONNACK everything goes to mqtt.js, PUBLISH and PUBACK too",
    async () => {
      const early = publish("meters/m-1/readings", "early", 1, 1);
      const earlyAck = encode({ cmd: "puback", messageId: 7 });
      const late = publish("meters/m-1/readings", "late", 1, 2);
      const h = harness({ ours: [7] });
      await h.feed(early, earlyAck);
      assert.equal(h.tap.live, false, "not live before the CONNACK");
      await h.feed(CONNACK, late);
      assert.equal(h.tap.live, true);
      assert.deepEqual(h.publishes.map((p) => p.payload.toString()), ["late"]);
      assert.deepEqual(h.pubacks, [], "the PUBACK handler is not asked before the CONNACK");
      assert.deepEqual(h.passed(), Buffer.concat([early, earlyAck, CONNACK]));
      await h.dispose();
      assert.equal(h.tap.live, false, "not live once destroyed");
    },
  );

  await t.step("a QoS 2 PUBLISH goes to mqtt.js (its flow is not the tap's)", async () => {
    const qos2 = publish("meters/m-1/readings", "two", 2, 9, { contentType: "text/plain" });
    const qos1 = publish("meters/m-1/readings", "one", 1, 10);
    const h = harness();
    await h.feed(CONNACK, qos2, qos1);
    assert.deepEqual(h.publishes.map((p) => [p.qos, p.packetId]), [[1, 10]]);
    assert.deepEqual(h.passed(), Buffer.concat([CONNACK, qos2]));
    await h.dispose();
  });

  await t.step(
    "a PUBACK the handler does not claim goes to mqtt.js; one it claims does not",
    async () => {
      const mine = encode({ cmd: "puback", messageId: 7 });
      const theirs = encode({ cmd: "puback", messageId: 8 });
      const theirsWithReason = encode({
        cmd: "puback",
        messageId: 9,
        reasonCode: 0x10,
        properties: { reasonString: "no matching subscribers" },
      });
      const mineWithReason = encode({ cmd: "puback", messageId: 300, reasonCode: 0x10 });
      const mineRefused = encode({ cmd: "puback", messageId: 301, reasonCode: 0x87 });
      const h = harness({ ours: [7, 300, 301] });
      await h.feed(CONNACK, mine, theirs, theirsWithReason, mineWithReason, mineRefused);
      assert.deepEqual(h.pubacks, [7, 8, 9, 300, 301]);
      assert.deepEqual(h.reasons, [0, 0, 0x10, 0x10, 0x87], "reason codes, 0 when absent");
      assert.deepEqual(h.passed(), Buffer.concat([CONNACK, theirs, theirsWithReason]));
      assert.deepEqual(h.publishes, []);
      await h.dispose();
    },
  );
});

Deno.test("PublishTap handles 1-, 2-, 3- and 4-byte remaining lengths", SANITIZE, async (t) => {
  const topic = "meters/m-1/readings";
  for (const [size, bytes] of [[0, 1], [200, 2], [20_000, 3], [2_100_000, 4]]) {
    await t.step(`payload of ${size} bytes (remaining length in ${bytes})`, async () => {
      const payload = payloadOf(size);
      const packet = publish(topic, payload, 1, 42, { userProperties: { k: "v" } });
      assert.equal(lengthBytes(packet), bytes, "the size exercises the intended length");
      const header = 1 + bytes + 2 + topic.length + 2 + 1;
      // Cut inside the fixed header, the topic, the packet id, the properties and the payload.
      const cuts = [
        [],
        ...Array.from({ length: header + 2 }, (_, i) => [i + 1]),
        [packet.length - 1],
        [1, 2, 3, packet.length - 1],
      ];
      for (const offsets of cuts) {
        const h = harness();
        await h.feed(CONNACK, ...split(packet, ...offsets), PINGRESP);
        assert.equal(h.publishes.length, 1, `cut at ${offsets}`);
        const [seen] = h.publishes;
        assert.equal(seen.topic, topic);
        assert.equal(seen.packetId, 42);
        assert.ok(seen.payload.equals(payload), `payload intact, cut at ${offsets}`);
        assert.deepEqual(h.passed(), Buffer.concat([CONNACK, PINGRESP]));
        await h.dispose();
      }
    });
  }
});

Deno.test(
  "PublishTap stops handing over publishes when told, until proceed()",
  SANITIZE,
  async (t) => {
    const p = (id: number) => publish("meters/m-1/readings", `reading ${id}`, 1, id);
    const SUBACK = encode({ cmd: "suback", messageId: 99, granted: [1] });

    await t.step(
      "later publishes wait, in order; packets for mqtt.js still go on (a keepalive answer " +
        "never waits behind held readings)",
      async () => {
        const h = harness({ publish: (packet) => packet.packetId !== 2 });
        await h.feed(Buffer.concat([CONNACK, p(1), p(2), PINGRESP, p(3)]));
        assert.deepEqual(h.publishes.map((s) => s.packetId), [1, 2]);
        assert.deepEqual(h.passed(), Buffer.concat([CONNACK, PINGRESP]));

        await h.feed(Buffer.concat([p(4), SUBACK]));
        assert.deepEqual(h.publishes.map((s) => s.packetId), [1, 2], "nothing handed over");
        assert.deepEqual(h.passed(), Buffer.concat([CONNACK, PINGRESP, SUBACK]));
        assert.equal(h.socket.isPaused(), false, "a few held publishes do not stop the socket");

        h.tap.proceed();
        h.tap.proceed(); // a second call while going on changes nothing
        await turn();
        assert.deepEqual(h.publishes.map((s) => s.packetId), [1, 2, 3, 4]);
        assert.deepEqual(
          h.publishes.map((s) => s.payload.toString()),
          [1, 2, 3, 4].map((id) => `reading ${id}`),
          "held publishes keep their payloads",
        );
        await h.dispose();
      },
    );

    await t.step(
      "beyond holdMaxBytes of held publishes, reading from the socket stops",
      async () => {
        const socket = new Socket();
        const ids: number[] = [];
        const tap = new PublishTap(socket, {
          publish: (packet) => {
            ids.push(packet.packetId);
            return packet.packetId !== 1;
          },
          puback: () => false,
        }, { holdMaxBytes: 2 * p(2).length });
        const passed: Buffer[] = [];
        tap.on("data", (chunk: Buffer) => passed.push(chunk));
        const closed = new Promise<void>((resolve) => tap.once("close", () => resolve()));
        socket.push(Buffer.concat([CONNACK, p(1), p(2), p(3)]));
        await turn();
        assert.ok(socket.isPaused(), "two publishes held: the socket waits");
        const later = Buffer.concat([PINGRESP, p(4)]);
        socket.push(later);
        await turn();
        assert.equal(socket.readableLength, later.length, "the new bytes wait in the socket");
        assert.deepEqual(Buffer.concat(passed), CONNACK);
        tap.proceed();
        await turn();
        assert.deepEqual(ids, [1, 2, 3, 4]);
        assert.deepEqual(Buffer.concat(passed), Buffer.concat([CONNACK, PINGRESP]));
        assert.equal(socket.isPaused(), false);
        tap.destroy();
        await closed;
      },
    );

    await t.step("one publish per proceed() when every call says stop", async () => {
      const h = harness({ publish: () => false });
      const ids = [1, 2, 3, 4, 5, 6];
      // Buffered in the tap (first chunk) and in the socket (the following ones) alike.
      await h.feed(Buffer.concat([CONNACK, p(1), p(2), p(3)]), p(4), Buffer.concat([p(5), p(6)]));
      for (let n = 1; n <= ids.length; n++) {
        assert.deepEqual(h.publishes.map((s) => s.packetId), ids.slice(0, n));
        h.tap.proceed();
        await turn();
      }
      assert.deepEqual(
        h.publishes.map((s) => s.payload.toString()),
        ids.map((id) => `reading ${id}`),
      );
      await h.dispose();
    });

    await t.step("a stop on the last packet of a chunk holds the next chunk", async () => {
      const h = harness({ publish: (packet) => packet.packetId !== 1 });
      await h.feed(Buffer.concat([CONNACK, p(1)]));
      await h.feed(p(2));
      assert.deepEqual(h.publishes.map((s) => s.packetId), [1]);
      h.tap.proceed();
      await turn();
      assert.deepEqual(h.publishes.map((s) => s.packetId), [1, 2]);
      await h.dispose();
    });
  },
);

Deno.test("PublishTap destroys itself on a malformed packet", SANITIZE, async (t) => {
  const before = publish("meters/m-1/readings", "before", 1, 1);
  const after = publish("meters/m-1/readings", "after", 1, 3);

  /** A QoS 1 PUBLISH of `topic` with packet id 0 (mqtt-packet will not encode one). */
  function packetIdZero(): Buffer {
    const topic = "meters/m-1/readings";
    const packet = publish(topic, "zero", 1, 1);
    const id = 1 + lengthBytes(packet) + 2 + topic.length;
    assert.deepEqual([...packet.subarray(id, id + 2)], [0, 1], "patching the packet id");
    packet[id + 1] = 0;
    return packet;
  }

  /** A QoS 1 PUBLISH whose properties length runs past its end. */
  function propertiesPastEnd(): Buffer {
    const packet = publish("t", "abc", 1, 2);
    assert.deepEqual([...packet], [0x32, 9, 0, 1, 0x74, 0, 2, 0, 0x61, 0x62, 0x63]);
    packet[7] = 4; // 4 bytes of properties, 3 bytes left
    return packet;
  }

  const cases: [string, Buffer][] = [
    ["a remaining length of 5 bytes", Buffer.of(0x30, 0xff, 0xff, 0xff, 0xff, 0x7f)],
    ["a QoS 1 PUBLISH with packet id 0", packetIdZero()],
    ["a properties length running past the packet", propertiesPastEnd()],
    ["a PUBLISH too short for its topic length", Buffer.of(0x30, 1, 0)],
    ["a QoS 0 PUBLISH without a properties length", Buffer.of(0x30, 3, 0, 1, 0x74)],
    // 0 in five bytes: a reader that accepted a fifth byte would take the packet.
    ["a properties length of 5 bytes", Buffer.of(0x30, 8, 0, 1, 0x74, 0x80, 0x80, 0x80, 0x80, 0)],
  ];
  for (const [name, bad] of cases) {
    for (const bytewiseFeed of [false, true]) {
      await t.step(`${name}${bytewiseFeed ? ", one byte at a time" : ""}`, async () => {
        const h = harness();
        const stream = Buffer.concat([CONNACK, before, bad, after]);
        await h.feed(...(bytewiseFeed ? bytewise(stream) : [stream]));
        await h.closed;
        assert.equal(h.errors.length, 1);
        assert.match(h.errors[0].message, /^Malformed MQTT packet/);
        assert.deepEqual(h.publishes.map((s) => s.packetId), [1], "only the one before");
        assert.deepEqual(h.passed(), CONNACK, "the bad packet is not passed on either");
        assert.ok(h.socket.destroyed, "the connection is dropped");
      });
    }
  }

  await t.step("a remaining length of 5 bytes is malformed before the CONNACK too", async () => {
    const h = harness();
    await h.feed(Buffer.of(0x20, 0x80, 0x80), Buffer.of(0x80, 0x80, 0x01));
    await h.closed;
    assert.match(h.errors[0]?.message ?? "", /^Malformed MQTT packet/);
    assert.deepEqual(h.passed(), Buffer.alloc(0));
  });
});

Deno.test("PublishTap writes through and follows its socket", SANITIZE, async (t) => {
  await t.step("writes reach the socket unchanged and in order", async () => {
    const h = harness();
    const chunks = [Buffer.of(0x40, 2, 0, 1), encode({ cmd: "pingreq" }), Buffer.from("x")];
    for (const chunk of chunks) h.tap.write(chunk);
    await turn();
    assert.deepEqual(h.socket.written, chunks);
    await h.dispose();
  });

  await t.step("a full socket holds later writes back, still in order", async () => {
    const socket = new Socket(1);
    socket.hold = true;
    const tap = new PublishTap(socket, { publish: () => true, puback: () => false });
    const chunks = Array.from({ length: 5 }, (_, i) => Buffer.of(0x40, 2, 0, i + 1));
    for (const chunk of chunks) tap.write(chunk);
    await turn();
    assert.deepEqual(socket.written, chunks.slice(0, 1), "the rest waits for 'drain'");
    assert.ok(tap.writableLength > 0, "the tap holds them");
    while (socket.held.length > 0) {
      socket.held.shift()!();
      await turn();
    }
    assert.deepEqual(socket.written, chunks);
    assert.equal(tap.writableLength, 0);
    tap.destroy();
    await once(tap, "close");
  });

  await t.step("end() half-closes the socket", async () => {
    const h = harness();
    await h.feed(CONNACK);
    assert.equal(h.tap.live, true);
    h.tap.end(Buffer.of(0xe0, 0));
    await once(h.socket, "finish");
    assert.deepEqual(h.socket.written, [Buffer.of(0xe0, 0)], "the last write goes before");
    assert.equal(h.tap.live, false, "not live once ended");
    assert.equal(h.socket.destroyed, false, "the socket can still be read");
    await h.dispose();
  });

  await t.step("the end of the socket's input ends the tap's", async () => {
    const h = harness();
    await h.feed(CONNACK);
    h.socket.push(null);
    await turn();
    assert.ok(h.ended());
    assert.deepEqual(h.passed(), CONNACK);
    await h.dispose();
  });

  await t.step("a destroyed socket closes the tap", async () => {
    const h = harness();
    h.socket.destroy();
    await h.closed;
    assert.ok(h.tap.destroyed);
    assert.deepEqual(h.errors, []);
  });

  await t.step("a socket error is the tap's error", async () => {
    const h = harness();
    const error = new Error("ECONNRESET");
    h.socket.destroy(error);
    await h.closed;
    assert.deepEqual(h.errors, [error]);
  });

  await t.step("destroying the tap destroys the socket", async () => {
    const h = harness();
    await h.dispose();
    assert.ok(h.socket.destroyed);
  });

  await t.step("setNoDelay() reaches the socket", async () => {
    const h = harness();
    h.tap.setNoDelay();
    h.tap.setNoDelay(false);
    assert.deepEqual(h.socket.noDelay, [true, false]);
    await h.dispose();
  });
});

Deno.test("PublishTap.shutdown()", SANITIZE, async (t) => {
  const p = (id: number) => publish("meters/m-1/readings", `reading ${id}`, 1, id);
  // Long enough never to be what ends a step that expects the peer to close first.
  const LONG_MS = 2_000;

  await t.step("resolves once the broker closes its side, reading to its FIN", async () => {
    const h = harness({ publish: (packet) => packet.packetId !== 1 });
    await h.feed(Buffer.concat([CONNACK, p(1), p(2)]), p(3)); // stopped: p(2), p(3) held
    assert.deepEqual(h.publishes.map((s) => s.packetId), [1]);
    h.tap.write(Buffer.of(0x40, 2, 0, 1));
    // The broker closes after it read our FIN.
    h.socket.once("finish", () => {
      h.socket.push(p(4));
      h.socket.push(null);
    });
    await h.tap.shutdown(LONG_MS);
    assert.ok(h.tap.destroyed, "resolved by the close, not the timeout");
    assert.deepEqual(h.publishes.map((s) => s.packetId), [1], "nothing taken after shutdown");
    assert.deepEqual(h.passed(), CONNACK);
    assert.deepEqual(h.socket.written, [Buffer.of(0x40, 2, 0, 1)], "written before the FIN");
    assert.ok(h.socket.writableFinished);
    assert.deepEqual(h.errors, []);
  });

  await t.step("resolves after the timeout when the broker never closes", async () => {
    const h = harness();
    await h.feed(CONNACK);
    const start = performance.now();
    await h.tap.shutdown(30);
    assert.ok(performance.now() - start >= 25, "waited for the timeout");
    assert.equal(h.tap.destroyed, false, "left open: the caller goes on to close it");
    assert.ok(h.socket.writableEnded, "half-closed");
    await h.feed(p(1), PINGRESP);
    assert.deepEqual(h.publishes, [], "nothing taken after shutdown");
    assert.deepEqual(h.passed(), CONNACK, "nor passed on");
    await h.dispose();
  });

  await t.step(
    "a write after it started (mqtt.js's keepalive) is dropped, not an error",
    async () => {
      const h = harness();
      await h.feed(CONNACK);
      h.tap.write(Buffer.of(0x40, 2, 0, 1)); // a PUBACK burst just before
      const done = h.tap.shutdown(LONG_MS);
      let called = false;
      h.tap.write(Buffer.of(0xc0, 0), () => called = true); // PINGREQ
      h.socket.push(null); // the broker closes after our FIN
      await done;
      assert.deepEqual(h.errors, [], "no write-after-end error");
      assert.ok(called, "the writer is told it is done");
      assert.deepEqual(
        h.socket.written,
        [Buffer.of(0x40, 2, 0, 1)],
        "the PUBACK went, the ping not",
      );
    },
  );

  await t.step("started by a handler, takes nothing more from the same chunk", async () => {
    let shutdown: Promise<void> | undefined;
    const h = harness({
      publish: (packet) => {
        if (packet.packetId === 1) shutdown = h.tap.shutdown(LONG_MS);
        return true;
      },
    });
    h.socket.once("finish", () => h.socket.push(null));
    await h.feed(Buffer.concat([CONNACK, p(1), p(2), PINGRESP, p(3)]));
    assert.ok(shutdown);
    await shutdown;
    assert.ok(h.tap.destroyed);
    assert.deepEqual(h.publishes.map((s) => s.packetId), [1]);
    assert.deepEqual(h.passed(), CONNACK);
  });

  await t.step("on a destroyed tap, resolves at once", async () => {
    const h = harness();
    await h.dispose();
    const first = await Promise.race([
      h.tap.shutdown(LONG_MS).then(() => "shutdown"),
      turn().then(() => "turn"),
    ]);
    assert.equal(first, "shutdown", "no wait for a close that already happened");
  });
});

Deno.test({
  ...SANITIZE,
  // A paused stream whose buffer is empty still emits 'end' after EOF: the tap must not end its
  // own input before the packets it holds while stopped (a DISCONNECT with its reason among them).
  name: "PublishTap passes packets held while stopped on before the end of the stream",
  fn: async () => {
    const h = harness({ publish: (packet) => packet.packetId !== 1 });
    const disconnect = encode({ cmd: "disconnect", reasonCode: 0x8e });
    const last = Buffer.concat([
      CONNACK,
      publish("meters/m-1/readings", "one", 1, 1),
      publish("meters/m-1/readings", "two", 1, 2),
      disconnect,
    ]);
    // The broker's last packets and its FIN arrive together.
    h.socket.push(last);
    h.socket.push(null);
    await turn();
    assert.equal(h.ended(), false, "the input has not ended: two packets are held");
    h.tap.proceed();
    await turn();
    assert.deepEqual(h.errors, []);
    assert.deepEqual(h.publishes.map((s) => s.packetId), [1, 2]);
    assert.deepEqual(h.passed(), Buffer.concat([CONNACK, disconnect]));
    assert.ok(h.ended());
    await h.dispose();
  },
});
