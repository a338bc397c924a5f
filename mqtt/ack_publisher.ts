import { connect, type MqttClient } from "mqtt";
import { Buffer } from "node:buffer";
import type { Duplex } from "node:stream";
import { setImmediate } from "node:timers";
import type { Logger } from "../core/logger.ts";
import type { Metrics } from "../core/metrics.ts";
import { AckOutbox, type AckResult } from "./ack_outbox.ts";
import { PacketBuffer } from "./packet_buffer.ts";
import { PublishTap } from "./publish_tap.ts";

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

type StreamBuilder = (client: MqttClient) => Duplex;
/** The one private member we rely on, as in the ingress (pinned by its tests). */
type Internals = { streamBuilder: StreamBuilder };

/** Ack publishes kept while the broker is away or its receive window is full, at most. */
const ACK_BACKLOG_MAX = 100_000;
/** How long close() waits for the broker to close its side. */
const CLOSE_TIMEOUT_MS = 2_000;
const BACKOFF_MIN_MS = 500;
const BACKOFF_MAX_MS = 30_000;
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
 * One ack connection. Ack publishes are encoded here ({@linkcode PacketBuffer}), written once per
 * burst, kept within the broker's receive maximum by an {@linkcode AckOutbox}, and sent again
 * after a reconnect; the broker's PUBACKs are taken off the wire by a {@linkcode PublishTap}.
 * Each publish may carry a callback for when the broker answered it: the ingress holds a
 * reading's PUBACK until then.
 */
class AckConnection {
  #o: ConnectionOptions;
  #client: MqttClient;
  #tap: PublishTap | null = null;
  #out = new PacketBuffer();
  #outbox: AckOutbox;
  #flushScheduled = false;
  #closed = false;
  #backoff = BACKOFF_MIN_MS;
  #connected: Promise<void>;
  #markConnected!: () => void;
  #closing: Promise<void> | null = null;
  /** Refusals since the last one logged, and when that was. */
  #refused = 0;
  #refusalLoggedAt = -Infinity;

  constructor(options: ConnectionOptions) {
    this.#o = options;
    this.#connected = new Promise((resolve) => this.#markConnected = resolve);
    this.#outbox = new AckOutbox({
      out: this.#out,
      flushSoon: () => this.#scheduleFlush(),
      backlogMax: ACK_BACKLOG_MAX,
      onDropped: () =>
        options.metrics.inc("mqtt_connection_errors_total", { reason: "ack_backlog_full" }),
      onRefused: (reasonCode) => this.#onRefused(reasonCode),
    });
    this.#client = connect(options.url, {
      protocolVersion: 5,
      // Nothing is subscribed on this connection, so a session would hold nothing: what is
      // unacknowledged is kept (and sent again) by the outbox.
      clean: true,
      clientId: options.clientId,
      username: options.username,
      password: options.password,
      reconnectPeriod: BACKOFF_MIN_MS,
      // A refused CONNECT (server busy, quota) is retried like a lost connection.
      reconnectOnConnackError: true,
      connectTimeout: 10_000,
      manualConnect: true,
      log: () => {},
      reschedulePings: false,
      messageIdProvider: this.#outbox.ids,
    });
    this.#install();
    this.#client.connect();
  }

  /** Resolves once the first connection is up. */
  ready(): Promise<void> {
    return this.#connected;
  }

  /** Whether the broker connection is up. */
  get connected(): boolean {
    return this.#client.connected;
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
    const client = this.#client;
    const { logger, metrics } = this.#o;
    const internals = client as unknown as Internals;
    const build = internals.streamBuilder;
    internals.streamBuilder = (c) => {
      const tap: PublishTap = new PublishTap(build(c), {
        // Nothing is subscribed here; a publish would be a broker's mistake, and is ignored.
        publish: () => true,
        puback: (id, reasonCode) => tap === this.#tap && this.#outbox.acked(id, reasonCode),
      });
      this.#tap = tap;
      return tap;
    };
    client.on("connect", (connack) => {
      this.#tap?.setNoDelay(true);
      this.#backoff = BACKOFF_MIN_MS;
      client.options.reconnectPeriod = BACKOFF_MIN_MS;
      this.#outbox.connected(connack.properties?.receiveMaximum ?? 65_535);
      this.#flush();
      this.#markConnected();
      logger.info("mqtt ack connection up", { client_id: this.#o.clientId });
    });
    client.on("close", () => {
      // Not yet written: stays unacknowledged in the outbox and goes again after a reconnect.
      this.#out.clear();
      this.#outbox.disconnected();
      this.#backoff = Math.min(BACKOFF_MAX_MS, this.#backoff * 2);
      client.options.reconnectPeriod = this.#backoff;
    });
    client.on("error", (error) => {
      metrics.inc("mqtt_connection_errors_total", { reason: "external_broker" });
      logger.warn("mqtt ack connection error", { error, client_id: this.#o.clientId });
    });
  }

  #scheduleFlush(): void {
    if (this.#flushScheduled || this.#closed) return;
    this.#flushScheduled = true;
    setImmediate(() => this.#flush());
  }

  #flush(): void {
    this.#flushScheduled = false;
    if (this.#out.length === 0) return;
    const tap = this.#tap;
    if (!tap?.live) return this.#out.clear();
    tap.write(Buffer.from(this.#out.take().buffer));
  }

  /** Writes what is encoded, then disconnects (half-close first, as the ingress does). */
  close(): Promise<void> {
    return this.#closing ??= this.#close();
  }

  async #close(): Promise<void> {
    this.#flush();
    this.#closed = true;
    if (this.#tap?.live) await this.#tap.shutdown(CLOSE_TIMEOUT_MS);
    await this.#client.endAsync(true);
  }
}
