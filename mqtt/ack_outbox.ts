import { UniqueMessageIdProvider } from "mqtt";
import { Fifo } from "../core/fifo.ts";
import type { PacketBuffer } from "./packet_buffer.ts";

/**
 * What became of an ack publish: the broker took it, refused it (a PUBACK reason code of 0x80 or
 * more, e.g. not authorised), or it was dropped from a full backlog without being sent.
 */
export type AckResult = "accepted" | "refused" | "dropped";

/** One ack message for a meter's acks topic. */
export interface AckPublish {
  topic: string;
  payload: string;
  /** Called once with what became of it. */
  done?: (result: AckResult) => void;
}

/** Options of {@linkcode AckOutbox}. */
export interface AckOutboxOptions {
  /** Where encoded packets go; the owner writes it to the socket once per burst. */
  out: PacketBuffer;
  /** Asks the owner to write `out` soon. */
  flushSoon: () => void;
  /** Ack publishes kept while the broker is away or its window is full, at most. */
  backlogMax: number;
  /** Called with each ack dropped because the backlog was full. */
  onDropped: () => void;
  /** Called with the reason code of each ack the broker refused. */
  onRefused?: (reasonCode: number) => void;
}

/**
 * Packet ids shared by mqtt.js and the outbox. mqtt.js clears its allocator whenever it
 * connects; ids of our unacknowledged publishes are claimed again in the same call, so nothing
 * mqtt.js allocates afterwards can take one of them.
 */
export class SharedIdProvider extends UniqueMessageIdProvider {
  #held: () => Iterable<number>;

  constructor(held: () => Iterable<number>) {
    super();
    this.#held = held;
  }

  /** Forgets every id except those still held by the outbox. */
  override clear(): void {
    super.clear();
    for (const id of this.#held()) this.register(id);
  }
}

/**
 * QoS 1 publishes of ack messages, encoded into the owner's {@linkcode PacketBuffer}: at most the
 * broker's receive maximum unacknowledged, a bounded backlog while the broker is away or the
 * window is full, and the unacknowledged ones sent again with their ids, marked DUP, after a
 * reconnect (MQTT 5 §4.4).
 */
export class AckOutbox {
  #o: AckOutboxOptions;
  /** Sent and not yet acknowledged by the broker, by packet id, in sending order. */
  #unacked = new Map<number, AckPublish>();
  #backlog = new Fifo<AckPublish>();
  #window = 0;
  readonly ids: SharedIdProvider;

  constructor(options: AckOutboxOptions) {
    this.#o = options;
    this.ids = new SharedIdProvider(() => this.#unacked.keys());
  }

  /** Acks sent and not yet acknowledged. */
  get unacked(): number {
    return this.#unacked.size;
  }

  /** Acks waiting to be sent. */
  get waiting(): number {
    return this.#backlog.length;
  }

  /** Sends an ack now, or keeps it until there is a connection with room for it. */
  publish(ack: AckPublish): void {
    if (!this.#trySend(ack, false)) this.#keep(ack);
  }

  /**
   * The broker acknowledged packet `id` with `reasonCode`; whether it was one of ours (others are
   * ignored).
   */
  acked(id: number, reasonCode = 0): boolean {
    const ack = this.#unacked.get(id);
    if (ack === undefined) return false;
    this.#unacked.delete(id);
    this.ids.deallocate(id);
    if (reasonCode >= 0x80) this.#o.onRefused?.(reasonCode);
    ack.done?.(reasonCode >= 0x80 ? "refused" : "accepted");
    this.#drain();
    return true;
  }

  /** A connection is up with this receive maximum: resend what was unacknowledged, then more. */
  connected(receiveMaximum: number): void {
    this.#window = Math.max(1, receiveMaximum);
    let resent = 0;
    const over: AckPublish[] = [];
    for (const [id, ack] of this.#unacked) {
      if (resent < this.#window) {
        this.#o.out.publishQos1(ack.topic, ack.payload, id, true);
        resent++;
      } else {
        // The new window is smaller: these go again later, as new publishes.
        this.#unacked.delete(id);
        this.ids.deallocate(id);
        over.push(ack);
      }
    }
    if (over.length > 0) {
      const rest = this.#backlog.drain();
      for (const ack of [...over, ...rest]) this.#backlog.push(ack);
    }
    if (resent > 0) this.#o.flushSoon();
    this.#drain();
  }

  /** The connection is gone: nothing is sent until {@linkcode connected}. */
  disconnected(): void {
    this.#window = 0;
  }

  #drain(): void {
    while (this.#backlog.length > 0 && this.#trySend(this.#backlog.peek()!, true)) {
      this.#backlog.shift();
    }
  }

  /** Encodes `ack` if the window has room; whether it did. */
  #trySend(ack: AckPublish, fromBacklog: boolean): boolean {
    // Keep the order: nothing new overtakes acks already waiting.
    if (!fromBacklog && this.#backlog.length > 0) return false;
    if (this.#unacked.size >= this.#window) return false;
    const id = this.ids.allocate();
    if (id === null) return false;
    try {
      this.#o.out.publishQos1(ack.topic, ack.payload, id, false);
    } catch (error) {
      this.ids.deallocate(id);
      throw error;
    }
    this.#unacked.set(id, ack);
    this.#o.flushSoon();
    return true;
  }

  #keep(ack: AckPublish): void {
    if (this.#backlog.length >= this.#o.backlogMax) {
      // The device learns the outcome again when it resends.
      this.#backlog.shift()!.done?.("dropped");
      this.#o.onDropped();
    }
    this.#backlog.push(ack);
  }
}
