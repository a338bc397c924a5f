import { setImmediate } from "node:timers";
import type { Logger } from "../core/logger.ts";
import type { Metrics } from "../core/metrics.ts";
import { Fifo } from "../core/fifo.ts";
import type { AckPublisher } from "./ack_publisher.ts";
import { BrokerConnection } from "./broker_connection.ts";
import { type AckMessage, isFinal, type MqttIntake } from "./intake.ts";
import type { PublishTap, TappedPublish } from "./publish_tap.ts";
import { acksTopic, meterOfReadingsTopic, meterOfReadingsTopicBytes } from "./topics.ts";

/** Options of {@linkcode ExternalIngress}. */
export interface ExternalIngressOptions {
  url: string;
  username?: string;
  password?: string;
  /** Stable per instance: the broker keeps this session's queue across restarts. */
  clientId: string;
  /** Subscribe through `$share/<group>/…` so cluster members split the load. */
  sharedGroup?: string;
  sessionExpirySeconds: number;
  /** Readings received and not yet final, at most; beyond it intake pauses. */
  inflightMax: number;
  /**
   * How long close() lets the readings in flight finish, in ms (default 3,000): those that do
   * are acknowledged, the rest are delivered again after a restart.
   */
  drainMs?: number;
  /** Keepalive interval in seconds (default 60). */
  keepalive?: number;
  intake: Pick<MqttIntake, "handle">;
  /** Where outcomes are published; the ingress owns it from now on and closes it. */
  acks: AckPublisher;
  logger: Logger;
  metrics: Metrics;
}

interface Entry {
  final: boolean;
  /** Its ack publish is not yet answered by the broker: the PUBACK waits for it. */
  ackHeld: boolean;
  /** Whether a PUBACK goes out once final: not for readings that may be tried again. */
  puback: boolean;
  /** The connection it arrived on; PUBACKs never cross to a new connection. */
  tap: PublishTap;
  /** The publish's packet id. */
  packetId: number;
}

/**
 * Longest stretch, in ms, spent handing buffered publishes to the intake before yielding.
 * mqtt.js handles a socket read's packets in one chain of next-ticks: under load a single chain
 * ran for hundreds of milliseconds (measured), starving timers and the writer's results, so
 * commits and their PUBACKs waited behind intake.
 */
const SLICE_MS = 4;
const DRAIN_MS = 3_000;

/**
 * Consumes readings from an external broker (Mosquitto, EMQX) over an MQTT 5 persistent
 * session. Intake is pipelined: many readings are in flight at once, and each PUBACK is held
 * until its reading is final, then released in receive order.
 *
 * mqtt.js connects, subscribes, keeps the connection alive and reconnects; the per-reading
 * packets bypass it. Each connection's stream is wrapped in a {@linkcode PublishTap} (see
 * {@linkcode BrokerConnection}), which takes QoS 0/1 PUBLISH packets off the wire and passes
 * everything else on. While the window of readings in flight is full, publishes wait in
 * the tap (a broker that honours our Receive Maximum sends no more) and everything else, such as
 * keepalive answers, still reaches mqtt.js. tests/mqtt_external_test.ts pins this behaviour so
 * an mqtt.js upgrade that breaks it fails CI.
 *
 * PUBACKs are encoded here and written once per burst. Outcomes go out
 * on a connection of their own ({@linkcode AckPublisher}), and a reading's PUBACK waits until the
 * broker has its ack publish: a reading that the broker will not deliver again always has its
 * outcome on the way to the device, and a slow ack path slows intake instead of piling up acks.
 *
 * A connection that closes takes its PUBACKs with it: entries are stamped with the connection
 * they arrived on, and nothing is taken from a closed connection's tap. The broker redelivers
 * all of those readings.
 */
export class ExternalIngress implements AsyncDisposable {
  #o: ExternalIngressOptions;
  #conn: BrokerConnection;
  #queue = new Fifo<Entry>();
  /** A tap stopped because the window is full. */
  #paused: PublishTap | null = null;
  #subscribed: Promise<void>;
  #markSubscribed!: () => void;
  #maxInFlight = 0;
  #closed = false;
  /** Set by close(): nothing new is taken; resolved once nothing is in flight. */
  #drain: PromiseWithResolvers<void> | null = null;
  #closing: Promise<void> | null = null;
  /** When the current slice of intake work began; -1 after a yield. */
  #sliceStart = -1;

  private constructor(options: ExternalIngressOptions) {
    this.#o = options;
    this.#subscribed = new Promise((resolve) => this.#markSubscribed = resolve);
    this.#conn = new BrokerConnection({
      url: options.url,
      client: {
        protocolVersion: 5,
        clean: false,
        clientId: options.clientId,
        username: options.username,
        password: options.password,
        // Without an expiry the broker drops the session (and its queue) on disconnect.
        properties: {
          sessionExpiryInterval: options.sessionExpirySeconds,
          receiveMaximum: Math.min(65_535, options.inflightMax),
        },
        keepalive: options.keepalive ?? 60,
        // We subscribe ourselves on every connect.
        resubscribe: false,
      },
      handlers: {
        publish: (tap, packet) => this.#onPublish(tap, packet),
        // Only the ack connections publish: any PUBACK here is mqtt.js's own business.
        puback: () => false,
      },
      onFlush: () => this.#sliceStart = -1,
    });
    // Hooks must be in place before the first packet: queued session messages arrive at once.
    this.#install();
    this.#conn.start();
  }

  /** Connects (retrying in the background) and starts consuming. */
  static start(options: ExternalIngressOptions): Promise<ExternalIngress> {
    return Promise.resolve(new ExternalIngress(options));
  }

  /** Resolves once the readings subscription and every ack connection are in place. */
  async ready(): Promise<void> {
    await Promise.all([this.#subscribed, this.#o.acks.ready()]);
  }

  /** Whether the readings connection and every ack connection are up. */
  get connected(): boolean {
    return this.#conn.connected && this.#o.acks.connected;
  }

  /** Readings received and not yet final. */
  get inFlight(): number {
    return this.#queue.length;
  }

  /** Most readings ever in flight at once (pipelining depth, for tests and benchmarks). */
  get maxInFlight(): number {
    return this.#maxInFlight;
  }

  #install(): void {
    const client = this.#conn.client;
    const { logger, metrics } = this.#o;

    // Only what the tap passes on gets here: QoS 2 (which a QoS 1 subscription never receives)
    // and anything a broker sends before its CONNACK. Held in series, acknowledged when final.
    client.handleMessage = (packet, callback) => {
      if (packet.cmd !== "publish") return callback();
      // Closing: not taken, and not acknowledged either; the broker delivers it again.
      if (this.#closed || this.#drain) return;
      const topic = packet.topic;
      const meterId = meterOfReadingsTopic(topic);
      this.#received(meterId, topic);
      if (meterId === null) return callback();
      this.#o.intake.handle(meterId, packet.payload as Uint8Array).then((ack) => {
        this.#ack(meterId, ack);
        // Not final (shutting down): no acknowledgement, the broker delivers it again.
        if (isFinal(ack) && !this.#closed) callback();
      }, (error) => logger.error("mqtt intake failed", { error, meter_id: meterId }));
    };

    client.on("connect", (connack) => {
      this.#conn.flush(); // PUBACKs released before mqtt.js saw the CONNACK
      logger.info("mqtt connected to external broker", {
        url: redact(this.#o.url),
        session_present: connack.sessionPresent,
      });
      // Every time, even with a session present: a subscription that was lost or refused
      // before its SUBACK would otherwise never be made again.
      const base = "meters/+/readings";
      const topic = this.#o.sharedGroup ? `$share/${this.#o.sharedGroup}/${base}` : base;
      client.subscribe(topic, { qos: 1 }, (error) => {
        if (error) return logger.error("mqtt subscribe failed", { error, topic });
        this.#markSubscribed();
      });
    });
    client.on("close", () => {
      // PUBACKs of this connection can no longer be sent; the broker redelivers those readings.
      this.#paused = null;
      this.#release(); // final entries of the old connection leave without a PUBACK
    });
    client.on("error", (error) => {
      metrics.inc("mqtt_connection_errors_total", { reason: "external_broker" });
      logger.warn("mqtt broker error", { error, url: redact(this.#o.url) });
    });
  }

  /** A QoS 0/1 publish from `tap`; returns whether the tap may go on reading now. */
  #onPublish(tap: PublishTap, packet: TappedPublish): boolean {
    // Nothing is taken from a connection that is no longer the current one, or once close()
    // began: the broker delivers it again.
    if (this.#closed || this.#drain || tap !== this.#conn.tap) return false;
    const { intake, logger } = this.#o;
    const { bytes, topicStart, topicEnd } = packet;
    const meterId = meterOfReadingsTopicBytes(bytes, topicStart, topicEnd);
    this.#received(meterId, meterId === null ? topicText(bytes, topicStart, topicEnd) : "");
    if (packet.qos === 0) {
      if (meterId !== null) {
        intake.handle(meterId, packet.payload).then(
          (ack) => this.#ack(meterId, ack),
          (error) => logger.error("mqtt intake failed", { error, meter_id: meterId }),
        );
      }
      return this.#goOn(tap);
    }
    const entry: Entry = {
      final: false,
      ackHeld: false,
      puback: true,
      tap,
      packetId: packet.packetId,
    };
    this.#queue.push(entry);
    this.#maxInFlight = Math.max(this.#maxInFlight, this.#queue.length);
    const finish = (puback: boolean) => {
      entry.puback = puback;
      entry.final = true;
      this.#release();
    };
    if (meterId === null) {
      finish(true); // acknowledged (in order) so the broker drops it
    } else {
      intake.handle(meterId, packet.payload).then((ack) => {
        this.#ack(meterId, ack, entry);
        // A non-final ack only happens at shutdown: no PUBACK, the broker redelivers.
        finish(isFinal(ack));
      }, (error) => {
        logger.error("mqtt intake failed", { error, meter_id: meterId });
        finish(false);
      });
    }
    // Bounded window: with too many readings in flight, stop reading from the socket.
    if (this.#queue.length >= this.#o.inflightMax) {
      this.#paused = tap;
      return false;
    }
    return this.#goOn(tap);
  }

  /** Counts a received publish; logs one on an unexpected topic. */
  #received(meterId: string | null, topic: string): void {
    this.#o.metrics.inc("mqtt_messages_received_total", { topic: "meters/+/readings" });
    if (meterId === null) this.#o.logger.warn("mqtt message on an unexpected topic", { topic });
  }

  /**
   * Whether the tap may go on now; when this slice of intake work is used up, it goes on after
   * the event loop had its turn (timers, the writer's results, PUBACK writes).
   */
  #goOn(tap: PublishTap): boolean {
    const now = performance.now();
    if (this.#sliceStart < 0) this.#sliceStart = now;
    if (now - this.#sliceStart < SLICE_MS) return true;
    this.#sliceStart = -1;
    setImmediate(() => {
      if (this.#paused !== tap) tap.proceed();
    });
    return false;
  }

  /**
   * Sends PUBACKs of final readings from the head of the queue, in receive order (those of a
   * closed connection are dropped: the broker redelivers their readings).
   */
  #release(): void {
    while (this.#queue.length > 0) {
      const head = this.#queue.peek()!;
      if (!head.final) break;
      // A closed connection's tap is no longer live; after close() nothing is flushed.
      const current = head.tap === this.#conn.tap && head.tap.live && !this.#closed;
      // Its PUBACK waits for the broker to have the ack; one that cannot be sent does not.
      if (head.ackHeld && current) break;
      this.#queue.shift();
      if (head.puback && current) {
        this.#conn.out.puback(head.packetId);
        this.#conn.scheduleFlush();
      }
    }
    if (this.#drain && this.#queue.length === 0) this.#drain.resolve();
    const paused = this.#paused;
    if (paused && !this.#drain && this.#queue.length < this.#o.inflightMax) {
      this.#paused = null;
      if (paused === this.#conn.tap && this.#goOn(paused)) paused.proceed();
    }
  }

  /**
   * Publishes an outcome. With the final outcome of `entry`, its PUBACK waits until the broker
   * took the ack, or refused it (counted and logged by the publisher: the reading is final
   * regardless, and redelivering it would be refused the same way). An ack dropped unsent (the
   * backlog overflowed while the broker was away) leaves the reading unacknowledged, so the
   * broker delivers it again and its outcome is sent again.
   */
  #ack(meterId: string, ack: AckMessage, entry?: Entry): void {
    const topic = acksTopic(meterId);
    if (entry === undefined || !isFinal(ack)) {
      return this.#o.acks.publish(topic, JSON.stringify(ack));
    }
    entry.ackHeld = true;
    this.#o.acks.publish(topic, JSON.stringify(ack), (result) => {
      entry.ackHeld = false;
      if (result === "dropped") entry.puback = false;
      this.#release();
    });
  }

  /**
   * Stops taking readings, lets those in flight finish for up to `drainMs` (their PUBACKs go
   * out, so a restart does not bring them back as duplicates), then disconnects after the
   * PUBACKs already released; readings not yet acknowledged are redelivered by the broker later.
   */
  close(): Promise<void> {
    return this.#closing ??= this.#close();
  }

  async #close(): Promise<void> {
    const drain = this.#drain = Promise.withResolvers<void>();
    // Only a live connection can still carry PUBACKs.
    if (this.#queue.length === 0 || !this.#conn.tap?.live) drain.resolve();
    const timer = setTimeout(() => drain.resolve(), this.#o.drainMs ?? DRAIN_MS);
    await drain.promise;
    clearTimeout(timer);
    this.#closed = true;
    this.#paused = null;
    try {
      await this.#conn.close();
    } finally {
      await this.#o.acks.close();
    }
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }
}

const decoder = new TextDecoder();

function topicText(bytes: Uint8Array, start: number, end: number): string {
  return decoder.decode(bytes.subarray(start, end));
}

function redact(url: string): string {
  return url.replace(/\/\/[^@/]*@/, "//***@");
}
