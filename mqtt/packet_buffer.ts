// The few MQTT 5 packets the external ingress sends per reading, encoded straight into one
// growing buffer that is written to the socket once per burst.
//
// Why not mqtt.js: it writes every packet through a stream in five or six pieces and keeps a
// store entry and a timer per QoS 1 publish. Under load a writer batch releases hundreds of
// PUBACKs and ack publishes at once; one write for all of them costs a fraction of that.

const encoder = new TextEncoder();

/** MQTT 5 PUBACK and QoS 1 PUBLISH packets, appended back to back. */
export class PacketBuffer {
  #buf = new Uint8Array(16 * 1024);
  #len = 0;

  /** Bytes waiting to be written. */
  get length(): number {
    return this.#len;
  }

  /** PUBACK with reason "success" and no properties: remaining length 2 (MQTT 5 §3.4.2.1). */
  puback(packetId: number): void {
    this.#ensure(4);
    const b = this.#buf;
    b[this.#len] = 0x40;
    b[this.#len + 1] = 2;
    b[this.#len + 2] = packetId >> 8;
    b[this.#len + 3] = packetId & 0xff;
    this.#len += 4;
  }

  /** QoS 1 PUBLISH, no properties; `dup` marks a resend (MQTT 5 §3.3.1.1). */
  publishQos1(topic: string, payload: string, packetId: number, dup: boolean): void {
    // Worst case UTF-8 is 3 bytes per UTF-16 unit; the header is at most 5 bytes.
    const room = 5 + 2 + topic.length * 3 + 2 + 1 + payload.length * 3;
    this.#ensure(room);
    const b = this.#buf;
    // Body first, at the largest header offset; the header then goes right before it.
    const body = this.#len + 5;
    const topicLen = encoder.encodeInto(topic, b.subarray(body + 2)).written;
    if (topicLen > 0xffff) throw new RangeError("MQTT topic longer than 65535 bytes");
    b[body] = topicLen >> 8;
    b[body + 1] = topicLen & 0xff;
    let at = body + 2 + topicLen;
    b[at++] = packetId >> 8;
    b[at++] = packetId & 0xff;
    b[at++] = 0; // property length
    at += encoder.encodeInto(payload, b.subarray(at)).written;
    const remaining = at - body;
    const lenBytes = remaining < 128 ? 1 : remaining < 16_384 ? 2 : remaining < 2_097_152 ? 3 : 4;
    let h = body - 1 - lenBytes;
    const start = h;
    b[h++] = 0x32 | (dup ? 0x08 : 0);
    let n = remaining;
    do {
      let byte = n % 128;
      n = Math.floor(n / 128);
      if (n > 0) byte |= 0x80;
      b[h++] = byte;
    } while (n > 0);
    // Close the gap left by a header shorter than the 5 bytes reserved.
    if (start > this.#len) b.copyWithin(this.#len, start, at);
    this.#len += at - start;
  }

  /** The bytes appended so far (a copy), and an empty buffer. */
  take(): Uint8Array {
    const out = this.#buf.slice(0, this.#len);
    this.#len = 0;
    return out;
  }

  /** Drops everything appended. */
  clear(): void {
    this.#len = 0;
  }

  #ensure(n: number): void {
    if (this.#len + n <= this.#buf.length) return;
    const bigger = new Uint8Array(Math.max(this.#buf.length * 2, this.#len + n));
    bigger.set(this.#buf.subarray(0, this.#len));
    this.#buf = bigger;
  }
}
