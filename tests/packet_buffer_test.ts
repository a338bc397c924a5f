import assert from "node:assert/strict";
import { Buffer } from "node:buffer";
import mqttPacket from "mqtt-packet";
import { PacketBuffer } from "../mqtt/packet_buffer.ts";

/** Parses MQTT 5 packets with mqtt-packet, the parser mqtt.js and brokers' test suites use. */
function parse(bytes: Uint8Array): Record<string, unknown>[] {
  const parser = mqttPacket.parser({ protocolVersion: 5 });
  const packets: Record<string, unknown>[] = [];
  const errors: Error[] = [];
  parser.on("packet", (p) => packets.push(p as unknown as Record<string, unknown>));
  parser.on("error", (e: Error) => errors.push(e));
  parser.parse(Buffer.from(bytes));
  assert.deepEqual(errors, []);
  return packets;
}

Deno.test("PacketBuffer encodes MQTT 5 packets that a reference parser reads back", async (t) => {
  await t.step("PUBACK: success, no properties, remaining length 2", () => {
    const out = new PacketBuffer();
    out.puback(1);
    out.puback(65_535);
    const bytes = out.take();
    assert.deepEqual([...bytes], [0x40, 2, 0, 1, 0x40, 2, 0xff, 0xff]);
    const [a, b] = parse(bytes);
    assert.equal(a.cmd, "puback");
    assert.equal(a.messageId, 1);
    assert.equal(b.messageId, 65_535);
    assert.equal(out.length, 0, "take() empties the buffer");
  });

  await t.step("QoS 1 PUBLISH of every remaining-length size, with DUP and UTF-8", () => {
    const out = new PacketBuffer();
    // 1-, 2- and 3-byte remaining lengths, their boundaries, and multi-byte characters.
    const sizes = [0, 1, 100, 110, 111, 112, 127, 16_000, 16_370, 16_371, 16_372, 16_383, 200_000];
    const expected: { topic: string; payload: string; id: number; dup: boolean }[] = [];
    sizes.forEach((size, i) => {
      const topic = i % 3 === 0 ? `meters/mètre-${i}/acks` : `meters/m-${i}/acks`;
      const payload = i % 4 === 0 ? "é".repeat(size >> 1) : "x".repeat(size);
      const id = 1 + i * 4_000;
      const dup = i % 2 === 1;
      out.puback(id); // interleaved, as released
      out.publishQos1(topic, payload, id, dup);
      expected.push({ topic, payload, id, dup });
    });
    const packets = parse(out.take());
    assert.equal(packets.length, sizes.length * 2);
    expected.forEach((e, i) => {
      const ack = packets[i * 2], pub = packets[i * 2 + 1];
      assert.equal(ack.cmd, "puback");
      assert.equal(ack.messageId, e.id);
      assert.equal(pub.cmd, "publish");
      assert.equal(pub.qos, 1);
      assert.equal(pub.dup, e.dup);
      assert.equal(pub.retain, false);
      assert.equal(pub.messageId, e.id);
      assert.equal(pub.topic, e.topic);
      assert.equal((pub.payload as Buffer).toString("utf8"), e.payload);
    });
  });

  await t.step("clear() drops what was appended", () => {
    const out = new PacketBuffer();
    out.publishQos1("meters/a/acks", "{}", 7, false);
    out.clear();
    assert.equal(out.length, 0);
    out.puback(9);
    assert.deepEqual([...out.take()], [0x40, 2, 0, 9]);
  });
});
