// The external ingress's view of the broker connection: a stream between the socket and mqtt.js
// that takes the packets of the per-reading path (QoS 0/1 PUBLISH in, PUBACK of our own ack
// publishes) off the wire itself and hands everything else to mqtt.js unchanged.
//
// Why: through mqtt.js every reading cost a parser object, BufferList copies, debug calls and a
// chain of next-ticks, about a third of the gateway's allocations under load (measured with the
// sampling heap profiler), and a QoS 1 PUBACK had to be captured inside a private method to be
// held until the reading was committed. Here a PUBLISH is a slice of the socket's chunk, its
// packet id is known at once, and publishes simply wait while the ingress's window is full.
import { Buffer } from "node:buffer";
import { Duplex } from "node:stream";
import { Fifo } from "../core/fifo.ts";

/** A QoS 0 or 1 PUBLISH taken off the wire. */
export interface TappedPublish {
  /** The bytes of the packet; `topicStart`…`topicEnd` and `payload` lie inside them. */
  bytes: Uint8Array;
  topicStart: number;
  topicEnd: number;
  qos: 0 | 1;
  /** 0 for QoS 0. */
  packetId: number;
  /** A view of the socket's chunk: valid until the handler returns. */
  payload: Uint8Array;
}

/** What the tap does with the packets it takes. */
export interface TapHandlers {
  /** A QoS 0/1 PUBLISH. Returning false holds later ones until {@linkcode PublishTap.proceed}. */
  publish(packet: TappedPublish): boolean;
  /**
   * A PUBACK with its reason code (0 when absent; 0x80 and above: refused); returns whether it
   * acknowledged one of the owner's publishes (else mqtt.js gets it).
   */
  puback(packetId: number, reasonCode: number): boolean;
}

const CONNACK = 2;
const PUBLISH = 3;
const PUBACK = 4;
/**
 * Bytes of publishes held while stopped before reading from the socket stops too. A broker that
 * honours the ingress's Receive Maximum sends no more QoS 1 publishes once its window is full, so
 * this is reached by QoS 0 floods, a broker that ignores the limit, or a full window of very large
 * publishes while the ingress yields to the event loop for a moment.
 */
const HOLD_MAX_BYTES = 8 * 1024 * 1024;

/** Where a packet lies in a received chunk. */
interface Slice {
  b: Buffer;
  start: number;
  body: number;
  end: number;
}

/**
 * Splits the broker's byte stream into MQTT packets (MQTT 5: PUBLISH carries properties).
 * Until the CONNACK has gone by, every packet goes to mqtt.js. Writes pass straight through,
 * in order, so the owner's packets and mqtt.js's never interleave inside a packet.
 *
 * While stopped, publishes are held in order and everything else still goes on: a keepalive
 * answer stuck behind held readings would make mqtt.js drop a healthy connection, and the broker
 * would deliver every reading in flight again.
 */
export class PublishTap extends Duplex {
  #inner: Duplex;
  #handlers: TapHandlers;
  /** Received bytes not yet handled, from `#pos`. */
  #buf: Buffer | null = null;
  #pos = 0;
  /** Size of the packet that begins at `#pos` but is not complete yet; 0 when not known. */
  #need = 0;
  /** Chunks of that packet received since, joined once it is complete (not on every chunk). */
  #parts: Buffer[] = [];
  #partsLength = 0;
  #stopped = false;
  /** Publishes that arrived while stopped, in order. */
  #held = new Fifo<Slice>();
  #heldBytes = 0;
  #holdMax: number;
  #connacked = false;
  #discarding = false;
  /** The broker ended its side; the end is passed on once the packets before it are handled. */
  #ended = false;

  /** Wraps `inner`; `holdMaxBytes` bounds the publishes held while stopped (default 8 MiB). */
  constructor(inner: Duplex, handlers: TapHandlers, options: { holdMaxBytes?: number } = {}) {
    super();
    this.#inner = inner;
    this.#handlers = handlers;
    this.#holdMax = options.holdMaxBytes ?? HOLD_MAX_BYTES;
    inner.on("data", (chunk: Buffer) => this.#onData(chunk));
    inner.on("end", () => {
      this.#ended = true;
      this.#endIfDrained();
    });
    inner.on("error", (error) => this.destroy(error));
    inner.on("close", () => this.destroy());
  }

  /** Whether the broker accepted the connection and it is still open for writing. */
  get live(): boolean {
    return this.#connacked && !this.destroyed && this.writable;
  }

  /** Goes on handing over publishes after a handler returned false. */
  proceed(): void {
    if (!this.#stopped) return;
    this.#stopped = false;
    while (!this.#stopped && this.#held.length > 0 && !this.#discarding) {
      const { b, start, body, end } = this.#held.shift()!;
      this.#heldBytes -= end - start;
      this.#packet(b, start, body, end);
    }
    this.#pump();
  }

  /** Disables Nagle on a TCP or TLS socket (held PUBACKs go out in small bursts). */
  setNoDelay(noDelay = true): void {
    (this.#inner as { setNoDelay?: (on: boolean) => void }).setNoDelay?.(noDelay);
  }

  /**
   * Stops handling packets and half-closes after what was written; resolves once the broker
   * closed its side (read to its FIN: closing with unread input would reset the connection and
   * could drop what the broker had not read yet) or after `timeoutMs`.
   */
  async shutdown(timeoutMs: number): Promise<void> {
    this.#discarding = true;
    this.#buf = null;
    this.#parts = [];
    this.#forgetHeld();
    if (this.destroyed) return;
    let timer: ReturnType<typeof setTimeout> | undefined;
    await Promise.race([
      new Promise<void>((resolve) => {
        this.once("close", () => resolve());
        this.#inner.resume();
        this.end();
        // mqtt.js may still write (a keepalive PINGREQ): a write after end() would be an error
        // that destroys the tap and resets the socket, dropping the PUBACKs just written.
        this.write = dropWrite;
      }),
      new Promise<void>((resolve) => timer = setTimeout(resolve, timeoutMs)),
    ]);
    clearTimeout(timer);
  }

  override _read(): void {
    // Packets for mqtt.js are pushed as they arrive; there are few of them.
  }

  override _write(chunk: Buffer, _encoding: string, callback: (error?: Error) => void): void {
    if (this.#inner.write(chunk)) callback();
    else this.#inner.once("drain", () => callback());
  }

  override _final(callback: (error?: Error) => void): void {
    this.#inner.end();
    callback();
  }

  override _destroy(error: Error | null, callback: (error?: Error | null) => void): void {
    this.#buf = null;
    this.#parts = [];
    this.#forgetHeld();
    this.#inner.destroy();
    callback(error);
  }

  #onData(chunk: Buffer): void {
    if (this.#discarding || this.destroyed) return;
    if (this.#buf === null) {
      this.#buf = chunk;
      this.#pos = 0;
    } else {
      this.#parts.push(chunk);
      this.#partsLength += chunk.length;
      if (this.#buf.length - this.#pos + this.#partsLength < this.#need) return;
      // The rest of a packet that began in an earlier chunk.
      this.#buf = Buffer.concat([this.#buf.subarray(this.#pos), ...this.#parts]);
      this.#pos = 0;
      this.#parts = [];
      this.#partsLength = 0;
    }
    this.#need = 0;
    this.#pump();
  }

  #pump(): void {
    while (!this.#full() && !this.destroyed && !this.#discarding && this.#buf !== null) {
      const b = this.#buf;
      const start = this.#pos;
      // Fixed header: type and flags, then the remaining length (1–4 bytes, 7 bits each).
      let length = 0;
      let at = start + 1;
      let complete = false;
      for (let shift = 1; at < b.length && at < start + 5; at++, shift *= 128) {
        length += (b[at] & 0x7f) * shift;
        if (b[at] < 0x80) {
          complete = true;
          at++;
          break;
        }
      }
      if (!complete) {
        if (at >= start + 5) return this.#malformed("remaining length longer than 4 bytes");
        break; // the header continues in the next chunk
      }
      const end = at + length;
      if (end > b.length) {
        this.#need = end - start; // the packet continues in later chunks
        break;
      }
      this.#pos = end;
      if (end === b.length) this.#buf = null;
      if (this.#stopped && this.#isTapped(b[start])) {
        this.#held.push({ b, start, body: at, end });
        this.#heldBytes += end - start;
      } else {
        this.#packet(b, start, at, end);
      }
    }
    if (this.#full()) return void this.#inner.pause();
    if (this.destroyed) return;
    this.#inner.resume();
    this.#endIfDrained();
  }

  #forgetHeld(): void {
    this.#held = new Fifo<Slice>();
    this.#heldBytes = 0;
  }

  /** Whether reading from the socket waits: stopped with too much held already. */
  #full(): boolean {
    return this.#stopped && this.#heldBytes >= this.#holdMax;
  }

  /** Whether a packet with this first byte goes to the publish handler. */
  #isTapped(first: number): boolean {
    return this.#connacked && first >> 4 === PUBLISH && ((first >> 1) & 3) < 2;
  }

  #endIfDrained(): void {
    if (
      !this.#ended || this.#stopped || this.#held.length > 0 ||
      this.readableEnded || this.destroyed
    ) return;
    this.#ended = false;
    this.push(null);
  }

  #packet(b: Buffer, start: number, body: number, end: number): void {
    const type = b[start] >> 4;
    const qos = (b[start] >> 1) & 3;
    if (this.#isTapped(b[start])) {
      if (end - body < 2) return this.#malformed("PUBLISH without a topic");
      const topicStart = body + 2;
      const topicEnd = topicStart + ((b[body] << 8) | b[body + 1]);
      let at = topicEnd;
      let packetId = 0;
      if (qos === 1) {
        packetId = (b[at] << 8) | b[at + 1];
        at += 2;
      }
      // Properties (MQTT 5): a variable byte integer length, then skipped.
      let propLength = 0;
      for (let i = 0, shift = 1;; i++, shift *= 128) {
        if (at >= end || i === 4) return this.#malformed("PUBLISH properties");
        const byte = b[at++];
        propLength += (byte & 0x7f) * shift;
        if (byte < 0x80) break;
      }
      at += propLength;
      if (at > end || (qos === 1 && packetId === 0)) return this.#malformed("PUBLISH header");
      const go = this.#handlers.publish({
        bytes: b,
        topicStart,
        topicEnd,
        qos: qos as 0 | 1,
        packetId,
        payload: b.subarray(at, end),
      });
      if (!go) this.#stopped = true;
      return;
    }
    if (this.#connacked && type === PUBACK && end - body >= 2) {
      const reasonCode = end - body >= 3 ? b[body + 2] : 0;
      if (this.#handlers.puback((b[body] << 8) | b[body + 1], reasonCode)) return;
    }
    if (type === CONNACK) this.#connacked = true;
    this.push(b.subarray(start, end));
  }

  #malformed(what: string): void {
    // A code makes mqtt.js report it as a client error (it drops errors without one).
    const error = Object.assign(new Error(`Malformed MQTT packet from the broker: ${what}`), {
      code: "MQTT_MALFORMED_PACKET",
    });
    this.destroy(error);
  }
}

function dropWrite(
  _chunk: unknown,
  encoding?: BufferEncoding | ((error?: Error | null) => void),
  callback?: (error?: Error | null) => void,
): boolean {
  const done = typeof encoding === "function" ? encoding : callback;
  if (done) queueMicrotask(() => done());
  return true;
}
