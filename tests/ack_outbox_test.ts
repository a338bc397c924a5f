import assert from "node:assert/strict";
import { Buffer } from "node:buffer";
import mqttPacket from "mqtt-packet";
import { AckOutbox } from "../mqtt/ack_outbox.ts";
import { PacketBuffer } from "../mqtt/packet_buffer.ts";

interface Sent {
  id: number;
  dup: boolean;
  payload: string;
}

/** Everything encoded since the last call, parsed back with mqtt-packet. */
function sent(out: PacketBuffer): Sent[] {
  const parser = mqttPacket.parser({ protocolVersion: 5 });
  const packets: Sent[] = [];
  parser.on("packet", (p) => {
    const pub = p as unknown as { messageId: number; dup: boolean; payload: Buffer };
    packets.push({ id: pub.messageId, dup: pub.dup, payload: pub.payload.toString() });
  });
  parser.parse(Buffer.from(out.take()));
  return packets;
}

function outbox(backlogMax = 100) {
  const out = new PacketBuffer();
  let flushes = 0, dropped = 0;
  const box = new AckOutbox({
    out,
    flushSoon: () => flushes++,
    backlogMax,
    onDropped: () => dropped++,
  });
  const ack = (n: number) => ({ topic: `meters/m-${n}/acks`, payload: `{"n":${n}}` });
  return { out, box, ack, flushes: () => flushes, dropped: () => dropped };
}

Deno.test("AckOutbox keeps QoS 1 acks within the broker's window and across reconnects", async (t) => {
  await t.step("nothing is sent before a connection; then in order, up to the window", () => {
    const { out, box, ack } = outbox();
    for (let n = 0; n < 5; n++) box.publish(ack(n));
    assert.equal(out.length, 0);
    assert.equal(box.waiting, 5);
    box.connected(3);
    const first = sent(out);
    assert.deepEqual(first.map((p) => p.payload), ['{"n":0}', '{"n":1}', '{"n":2}']);
    assert.ok(first.every((p) => !p.dup));
    assert.equal(box.unacked, 3);
    assert.equal(box.waiting, 2);
    box.acked(first[1].id);
    assert.deepEqual(sent(out).map((p) => p.payload), ['{"n":3}'], "one slot, one more");
    box.publish(ack(5));
    assert.equal(sent(out).length, 0, "a new ack does not overtake one waiting");
    box.acked(999); // not ours: ignored
    assert.equal(box.unacked, 3);
  });

  await t.step("a PUBACK while disconnected frees its id and sends nothing (no spin)", () => {
    const { out, box, ack } = outbox();
    box.connected(1);
    box.publish(ack(0));
    box.publish(ack(1));
    const [p0] = sent(out);
    box.disconnected();
    box.acked(p0.id); // e.g. parsed from the closed connection's last bytes
    assert.equal(out.length, 0);
    assert.equal(box.unacked, 0);
    assert.equal(box.waiting, 1);
    box.connected(1);
    assert.deepEqual(sent(out).map((p) => p.payload), ['{"n":1}']);
  });

  await t.step(
    "after a reconnect the unacknowledged go again with their ids, marked DUP, " +
      "within the new window; the rest wait",
    () => {
      const { out, box, ack } = outbox();
      box.connected(4);
      for (let n = 0; n < 4; n++) box.publish(ack(n));
      const before = sent(out);
      box.disconnected();
      box.publish(ack(4));
      box.connected(2);
      const again = sent(out);
      assert.deepEqual(again, before.slice(0, 2).map((p) => ({ ...p, dup: true })));
      assert.equal(box.unacked, 2);
      assert.equal(box.waiting, 3, "two over the smaller window, then the new one");
      for (const p of again) box.acked(p.id);
      assert.deepEqual(sent(out).map((p) => [p.payload, p.dup]), [['{"n":2}', false], [
        '{"n":3}',
        false,
      ]]);
    },
  );

  await t.step("ids held by unacknowledged acks survive mqtt.js clearing the allocator", () => {
    const { out, box, ack } = outbox();
    box.connected(10);
    for (let n = 0; n < 10; n++) box.publish(ack(n));
    const held = new Set(sent(out).map((p) => p.id));
    box.ids.clear(); // what mqtt.js does on every connect
    for (let i = 0; i < 100; i++) {
      const id = box.ids.allocate()!;
      assert.ok(!held.has(id), `id ${id} is still held by an unacknowledged ack`);
    }
  });

  await t.step("the backlog is bounded: the oldest ack goes, and it is counted", () => {
    const { box, ack, dropped } = outbox(3);
    const done: [number, string][] = [];
    for (let n = 0; n < 5; n++) box.publish({ ...ack(n), done: (r) => done.push([n, r]) });
    assert.equal(box.waiting, 3);
    assert.equal(dropped(), 2);
    assert.deepEqual(done, [[0, "dropped"], [1, "dropped"]], "nothing waits for them forever");
  });

  await t.step("done runs when the broker acknowledged that ack, once, and not before", () => {
    const { out, box, ack } = outbox();
    const done: number[] = [];
    box.connected(2);
    for (let n = 0; n < 3; n++) {
      box.publish({
        ...ack(n),
        done: (r) => {
          assert.equal(r, "accepted");
          done.push(n);
        },
      });
    }
    const first = sent(out);
    assert.deepEqual(done, [], "sent is not acknowledged");
    box.acked(first[1].id);
    assert.deepEqual(done, [1]);
    box.disconnected();
    box.connected(2); // the unacknowledged one goes again; still not done
    const again = sent(out);
    assert.deepEqual(done, [1]);
    for (const p of again) box.acked(p.id);
    box.acked(first[1].id); // a stray repeat
    assert.deepEqual(done.toSorted(), [0, 1, 2], "each once");
  });

  await t.step("a PUBACK with a reason code of 0x80 or more is a refusal, and is reported", () => {
    const out = new PacketBuffer();
    const refused: number[] = [];
    const box = new AckOutbox({
      out,
      flushSoon: () => {},
      backlogMax: 10,
      onDropped: () => {},
      onRefused: (code) => refused.push(code),
    });
    const results: string[] = [];
    box.connected(10);
    for (let n = 0; n < 3; n++) {
      box.publish({ topic: `meters/m-${n}/acks`, payload: "{}", done: (r) => results.push(r) });
    }
    const [a, b, c] = sent(out);
    box.acked(a.id, 0x10); // no matching subscribers: a success
    box.acked(b.id, 0x87); // not authorised
    box.acked(c.id); // MQTT 3.1.1 style, no reason code
    assert.deepEqual(results, ["accepted", "refused", "accepted"]);
    assert.deepEqual(refused, [0x87]);
    assert.equal(box.unacked, 0, "a refused ack is not sent again");
  });
});
