import { connect, type IClientOptions, type MqttClient } from "mqtt";
import { Buffer } from "node:buffer";
import type { Duplex } from "node:stream";
import { setImmediate } from "node:timers";
import { PacketBuffer } from "./packet_buffer.ts";
import { PublishTap, type TappedPublish } from "./publish_tap.ts";

/** What the owner does with the packets a connection's tap takes. */
export interface ConnectionHandlers {
  /** A QoS 0/1 PUBLISH; returning false holds later ones until `tap.proceed()`. */
  publish(tap: PublishTap, packet: TappedPublish): boolean;
  /** A PUBACK; returns whether it acknowledged one of the owner's publishes. */
  puback(tap: PublishTap, packetId: number, reasonCode: number): boolean;
}

/** Options of {@linkcode BrokerConnection}. */
export interface BrokerConnectionOptions {
  url: string;
  /** mqtt.js options besides the ones every gateway connection shares (below). */
  client: IClientOptions;
  handlers: ConnectionHandlers;
  /** Where the owner encodes its packets (default: a new one). */
  out?: PacketBuffer;
  /** Called at every flush: the event loop had a turn. */
  onFlush?: () => void;
}

type StreamBuilder = (client: MqttClient) => Duplex;
/** The one private member we rely on (pinned by tests/mqtt_external_test.ts). */
type Internals = { streamBuilder: StreamBuilder };

/** How long close() waits for the broker to close its side. */
const CLOSE_TIMEOUT_MS = 2_000;
const BACKOFF_MIN_MS = 500;
const BACKOFF_MAX_MS = 30_000;

/**
 * An mqtt.js client whose every connection is wrapped in a {@linkcode PublishTap} (through
 * mqtt.js's private `streamBuilder`), with what the gateway's broker connections share: mqtt.js
 * connects, pings and reconnects (backoff 0.5 s doubling to 30 s, reset on connect; a refused
 * CONNECT is retried too), Nagle is off, and the packets the owner encodes into `out` are
 * written to the current connection once per burst.
 *
 * The client is created with `manualConnect`: the owner attaches its listeners, then calls
 * {@linkcode start} (a session's queued messages arrive right after the CONNACK).
 */
export class BrokerConnection {
  readonly client: MqttClient;
  readonly out: PacketBuffer;
  #tap: PublishTap | null = null;
  #backoff = BACKOFF_MIN_MS;
  #flushScheduled = false;
  #closed = false;
  #onFlush?: () => void;

  constructor(options: BrokerConnectionOptions) {
    this.out = options.out ?? new PacketBuffer();
    this.#onFlush = options.onFlush;
    const client = this.client = connect(options.url, {
      reconnectPeriod: BACKOFF_MIN_MS,
      reconnectOnConnackError: true,
      connectTimeout: 10_000,
      manualConnect: true,
      // mqtt.js logs every packet through `debug`; even disabled, that cost shows under load.
      log: () => {},
      // Rescheduling the keepalive timer on every packet sent costs a timer per packet; a ping
      // every keepalive period regardless is just as good at finding a dead connection.
      reschedulePings: false,
      ...options.client,
    });
    const internals = client as unknown as Internals;
    const build = internals.streamBuilder;
    const { handlers } = options;
    internals.streamBuilder = (c) => {
      const tap: PublishTap = new PublishTap(build(c), {
        publish: (packet) => handlers.publish(tap, packet),
        puback: (id, reasonCode) => handlers.puback(tap, id, reasonCode),
      });
      this.#tap = tap;
      return tap;
    };
    client.on("connect", () => {
      // The owner's packets are small and written in bursts: do not let Nagle delay them.
      this.#tap?.setNoDelay(true);
      this.#backoff = BACKOFF_MIN_MS;
      client.options.reconnectPeriod = BACKOFF_MIN_MS;
    });
    client.on("close", () => {
      // What was not written is gone with the connection; the owner decides what goes again.
      this.out.clear();
      this.#backoff = Math.min(BACKOFF_MAX_MS, this.#backoff * 2);
      client.options.reconnectPeriod = this.#backoff;
    });
  }

  /** Connects, retrying in the background. */
  start(): void {
    this.client.connect();
  }

  /** The current connection's tap, once mqtt.js opened one. */
  get tap(): PublishTap | null {
    return this.#tap;
  }

  /** Whether the broker connection is up. */
  get connected(): boolean {
    return this.client.connected;
  }

  /** Writes `out` soon: one write per burst (a writer batch releases hundreds of packets). */
  scheduleFlush(): void {
    if (this.#flushScheduled || this.#closed) return;
    this.#flushScheduled = true;
    setImmediate(() => this.flush());
  }

  /** Writes `out` to the current connection now (dropped if it is not live). */
  flush(): void {
    this.#flushScheduled = false;
    this.#onFlush?.();
    if (this.out.length === 0) return;
    const tap = this.#tap;
    if (!tap?.live) return this.out.clear();
    tap.write(Buffer.from(this.out.take().buffer));
  }

  /**
   * Writes what is encoded, then disconnects. The socket is half-closed after it and read to its
   * end, since closing with unread input resets the connection, and a reset lets the broker drop
   * what it had not read yet (measured: a reading acknowledged just before close() came back).
   */
  async close(): Promise<void> {
    this.flush();
    this.#closed = true;
    if (this.#tap?.live) await this.#tap.shutdown(CLOSE_TIMEOUT_MS);
    await this.client.endAsync(true);
  }
}
