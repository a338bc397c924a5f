import type { Logger } from "../core/logger.ts";
import type { Metrics } from "../core/metrics.ts";
import { AckOutbox, type AckResult } from "./ack_outbox.ts";
import { BrokerConnection } from "./broker_connection.ts";
import { PacketBuffer } from "./packet_buffer.ts";

/** Options of {@linkcode AckPublisher}. */
export interface AckPublisherOptions {
  url: string;
  username?: string;
  password?: string;
  /**
   * Base of the connections' client ids (the ingress's id with `-acks`; connection i is
   * `<clientId>-<i>`): a broker allows one connection per id.
   */
  clientId: string;
  /** Connections to publish on (default 1); a meter's acks always take the same one. */
  connections?: number;
  logger: Logger;
  metrics: Metrics;
}

/** One connection's options. */
type ConnectionOptions = Omit<AckPublisherOptions, "connections">;

/** Ack publishes kept while the broker is away or its receive window is full, at most. */
const ACK_BACKLOG_MAX = 100_000;
/** Refused acks are logged at most this often (each one is counted). */
const REFUSAL_LOG_MS = 10_000;

/**
 * Publishes the outcome of every reading on `meters/{id}/acks` (QoS 1) for the external-broker
 * ingress, on connections apart from the one that consumes the readings.
 *
 * Why connections of their own: Mosquitto reads one packet per connection per turn of its event
 * loop. On one connection the gateway sent two packets per reading (the reading's PUBACK and its
 * ack publish) while each device connection sends a small share of the readings, so when the
 * machine is busy the gateway's connection is read last: measured at 11,111 readings/s on two
 * cores, readings were stored on time while 65,000 ack publishes waited for the broker's window
 * and reached devices 5–7 s late. With the acks on one connection of their own they still got
 * one turn in about twenty-two against twenty busy publishers; four connections (the gateway's
 * default, `MQTT_ACK_CONNECTIONS`) cut the median publish→ack p95 at 11,111/s from 3.2 s to
 * 2.1 s on that machine (docs/BENCHMARKS.md).
 *
 * Every connection must be up: PUBACKs go back in receive order, so acks stuck on one connection
 * hold up intake for all meters (readiness reports MQTT down, and the connection logs its errors
 * with its client id).
 *
 * A meter's acks always go out on the same connection (chosen by a hash of the topic), so they
 * reach the broker in order.
 */
export class AckPublisher implements AsyncDisposable {
  #connections: AckConnection[];
  #closing: Promise<void> | null = null;

  /** Connects in the background (retrying with backoff); publishes wait until it is up. */
  constructor(options: AckPublisherOptions) {
    const n = Math.max(1, options.connections ?? 1);
    this.#connections = Array.from(
      { length: n },
      (_, i) => new AckConnection({ ...options, clientId: `${options.clientId}-${i}` }),
    );
  }

  /** Resolves once every connection has been up once. */
  async ready(): Promise<void> {
    await Promise.all(this.#connections.map((c) => c.ready()));
  }

  /** Whether every connection is up. */
  get connected(): boolean {
    return this.#connections.every((c) => c.connected);
  }

  /** Acks sent and not yet acknowledged, and acks waiting to be sent. */
  get pending(): number {
    let n = 0;
    for (const c of this.#connections) n += c.pending;
    return n;
  }

  /** Publishes `payload` on `topic` at QoS 1; `done` learns what became of it. */
  publish(topic: string, payload: string, done?: (result: AckResult) => void): void {
    const connections = this.#connections;
    const i = connections.length === 1 ? 0 : hash(topic) % connections.length;
    connections[i].publish(topic, payload, done);
  }

  /** Writes what is encoded, then disconnects every connection. */
  close(): Promise<void> {
    return this.#closing ??= Promise.all(this.#connections.map((c) => c.close())).then(() => {});
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }
}

/** FNV-1a over the UTF-16 code units: cheap and well spread for topic names. */
function hash(text: string): number {
  let h = 0x811c9dc5;
  for (let i = 0; i < text.length; i++) {
    h ^= text.charCodeAt(i);
    h = Math.imul(h, 0x01000193);
  }
  return h >>> 0;
}

/**
 * One ack connection ({@linkcode BrokerConnection}). Ack publishes are encoded into its buffer,
 * written once per burst, kept within the broker's receive maximum by an {@linkcode AckOutbox},
 * and sent again after a reconnect; the broker's PUBACKs are taken off the wire by its tap.
 * Each publish may carry a callback for when the broker answered it: the ingress holds a
 * reading's PUBACK until then.
 */
class AckConnection {
  #o: ConnectionOptions;
  #conn: BrokerConnection;
  #outbox: AckOutbox;
  #connected: Promise<void>;
  #markConnected!: () => void;
  #closing: Promise<void> | null = null;
  /** Refusals since the last one logged, and when that was. */
  #refused = 0;
  #refusalLoggedAt = -Infinity;

  constructor(options: ConnectionOptions) {
    this.#o = options;
    this.#connected = new Promise((resolve) => this.#markConnected = resolve);
    // The outbox's packet ids are mqtt.js's too, so it exists before the client.
    const out = new PacketBuffer();
    const outbox = this.#outbox = new AckOutbox({
      out,
      flushSoon: () => this.#conn.scheduleFlush(),
      backlogMax: ACK_BACKLOG_MAX,
      onDropped: () =>
        options.metrics.inc("mqtt_connection_errors_total", { reason: "ack_backlog_full" }),
      onRefused: (reasonCode) => this.#onRefused(reasonCode),
    });
    this.#conn = new BrokerConnection({
      url: options.url,
      out,
      client: {
        protocolVersion: 5,
        // Nothing is subscribed on this connection, so a session would hold nothing: what is
        // unacknowledged is kept (and sent again) by the outbox.
        clean: true,
        clientId: options.clientId,
        username: options.username,
        password: options.password,
        messageIdProvider: outbox.ids,
      },
      handlers: {
        // Nothing is subscribed here; a publish would be a broker's mistake, and is ignored.
        publish: () => true,
        puback: (tap, id, reasonCode) => tap === this.#conn.tap && outbox.acked(id, reasonCode),
      },
    });
    this.#install();
    this.#conn.start();
  }

  /** Resolves once the first connection is up. */
  ready(): Promise<void> {
    return this.#connected;
  }

  /** Whether the broker connection is up. */
  get connected(): boolean {
    return this.#conn.connected;
  }

  /** Acks sent and not yet acknowledged, and acks waiting to be sent. */
  get pending(): number {
    return this.#outbox.unacked + this.#outbox.waiting;
  }

  /** Publishes `payload` on `topic` at QoS 1; `done` learns what became of it. */
  publish(topic: string, payload: string, done?: (result: AckResult) => void): void {
    this.#outbox.publish({ topic, payload, done });
  }

  /** Counts a refused ack; logs now and then (a broker that refuses one refuses them all). */
  #onRefused(reasonCode: number): void {
    this.#o.metrics.inc("mqtt_connection_errors_total", { reason: "ack_refused" });
    this.#refused++;
    const now = performance.now();
    if (now - this.#refusalLoggedAt < REFUSAL_LOG_MS) return;
    this.#o.logger.error("the broker refuses ack publishes (check its ACL for meters/+/acks)", {
      client_id: this.#o.clientId,
      reason_code: `0x${reasonCode.toString(16)}`,
      refused: this.#refused,
    });
    this.#refused = 0;
    this.#refusalLoggedAt = now;
  }

  #install(): void {
    const client = this.#conn.client;
    const { logger, metrics } = this.#o;
    client.on("connect", (connack) => {
      this.#outbox.connected(connack.properties?.receiveMaximum ?? 65_535);
      this.#conn.flush();
      this.#markConnected();
      logger.info("mqtt ack connection up", { client_id: this.#o.clientId });
    });
    // Not yet written: stays unacknowledged in the outbox and goes again after a reconnect.
    client.on("close", () => this.#outbox.disconnected());
    client.on("error", (error) => {
      metrics.inc("mqtt_connection_errors_total", { reason: "external_broker" });
      logger.warn("mqtt ack connection error", { error, client_id: this.#o.clientId });
    });
  }

  /** Writes what is encoded, then disconnects (half-close first, as the ingress does). */
  close(): Promise<void> {
    return this.#closing ??= this.#conn.close();
  }
}
