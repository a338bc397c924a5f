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
  /** Its own client id (the ingress's id with `-acks`): a broker allows one connection per id. */
  clientId: string;
  logger: Logger;
  metrics: Metrics;
}

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
 * The connection that publishes the outcome of every reading on `meters/{id}/acks` (QoS 1) for
 * the external-broker ingress, apart from the connection that consumes the readings.
 *
 * Why a second connection: Mosquitto reads one packet per connection per turn of its event loop.
 * On one connection the gateway sends two packets per reading (the reading's PUBACK and its ack
 * publish) while each device connection sends a small share of the readings, so when the
 * machine is busy the gateway's connection is read last: measured at 11,111 readings/s on two
 * cores, readings were stored on time while 65,000 ack publishes waited for the broker's window
 * and reached devices 5–7 s late. On a connection of their own they are read at their own turn.
 *
 * Ack publishes are encoded here ({@linkcode PacketBuffer}), written once per burst, kept within
 * the broker's receive maximum by an {@linkcode AckOutbox}, and sent again after a reconnect; the
 * broker's PUBACKs are taken off the wire by a {@linkcode PublishTap}. Each publish may carry a
 * callback for when the broker has it: the ingress holds a reading's PUBACK until then.
 */
export class AckPublisher implements AsyncDisposable {
  #o: AckPublisherOptions;
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

  /** Connects in the background (retrying with backoff); publishes wait until it is up. */
  constructor(options: AckPublisherOptions) {
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

  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }
}
