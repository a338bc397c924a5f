import { connect, type IClientOptions, type MqttClient, type Packet } from "mqtt";
import { Buffer } from "node:buffer";
import { setImmediate } from "node:timers";
import type { Logger } from "../core/logger.ts";
import type { Metrics } from "../core/metrics.ts";
import { Fifo } from "../core/fifo.ts";
import { AckOutbox } from "./ack_outbox.ts";
import { type AckMessage, isFinal, type MqttIntake } from "./intake.ts";
import { PacketBuffer } from "./packet_buffer.ts";
import { acksTopic, meterOfReadingsTopic } from "./topics.ts";

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
  intake: MqttIntake;
  logger: Logger;
  metrics: Metrics;
}

interface Entry {
  final: boolean;
  /** Its PUBACK was captured (or there is none to capture); until then it is not released. */
  captured: boolean;
  /** Whether a PUBACK goes out once final: not for readings that may be tried again. */
  puback: boolean;
  /** The connection it arrived on; PUBACKs never cross to a new connection. */
  epoch: number;
  /** The publish's packet id, once captured. */
  packetId?: number;
}

type SendPacket = (packet: Packet, cb?: (error?: Error) => void, ...rest: unknown[]) => void;
/** The one private member we rely on (see the class comment). */
type Internals = { _sendPacket: SendPacket };

/**
 * Longest stretch, in ms, spent handing buffered publishes to the intake before yielding.
 * mqtt.js handles a socket read's packets in one chain of next-ticks: under load a single chain
 * ran for hundreds of milliseconds (measured), starving timers and the writer's results, so
 * commits and their PUBACKs waited behind intake.
 */
const SLICE_MS = 4;
/** Ack publishes kept while the broker is away or its receive window is full, at most. */
const ACK_BACKLOG_MAX = 100_000;
/** How long close() waits for the broker to close its side. */
const CLOSE_TIMEOUT_MS = 2_000;
const BACKOFF_MIN_MS = 500;
const BACKOFF_MAX_MS = 30_000;

/**
 * Consumes readings from an external broker (Mosquitto, EMQX) over an MQTT 5 persistent
 * session. Intake is pipelined: many readings are in flight at once, and each PUBACK is held
 * until its reading is final, then released in receive order.
 *
 * mqtt.js sends a QoS 1 PUBACK right after `handleMessage` calls back and reads the next packet
 * only after that PUBACK was handed to `_sendPacket`. We call back at once (so the next packet
 * is read) and capture that PUBACK in `_sendPacket`, to send it ourselves later. `_sendPacket`
 * is private; tests/mqtt_external_test.ts pins this behaviour so an mqtt.js upgrade that breaks
 * it fails CI.
 *
 * The packets sent per reading (its PUBACK and its QoS 1 ack publish) are encoded here and
 * written once per burst ({@linkcode PacketBuffer}); ack publishes go through an
 * {@linkcode AckOutbox} whose packet ids are shared with mqtt.js, and the broker's PUBACKs of
 * them are taken from `packetreceive`.
 *
 * A connection that closes takes its PUBACKs with it: entries are stamped with the connection
 * they arrived on, packets mqtt.js still parses from a closed connection are not taken, and
 * its held callbacks are never resumed. The broker redelivers all of those readings.
 */
export class ExternalIngress implements AsyncDisposable {
  #o: ExternalIngressOptions;
  #client: MqttClient;
  #queue = new Fifo<Entry>();
  #epoch = 0;
  #capturing: Entry | null = null;
  #paused: (() => void) | null = null;
  #backoff = BACKOFF_MIN_MS;
  #subscribed: Promise<void>;
  #markSubscribed!: () => void;
  #maxInFlight = 0;
  #closed = false;
  #out = new PacketBuffer();
  #outbox: AckOutbox;
  /** When the current slice of intake work began; -1 after a yield. */
  #sliceStart = -1;
  #flushScheduled = false;

  private constructor(options: ExternalIngressOptions) {
    this.#o = options;
    this.#subscribed = new Promise((resolve) => this.#markSubscribed = resolve);
    this.#outbox = new AckOutbox({
      out: this.#out,
      flushSoon: () => this.#scheduleFlush(),
      backlogMax: ACK_BACKLOG_MAX,
      onDropped: () =>
        options.metrics.inc("mqtt_connection_errors_total", { reason: "ack_backlog_full" }),
    });
    const clientOptions: IClientOptions = {
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
      reconnectPeriod: BACKOFF_MIN_MS,
      connectTimeout: 10_000,
      // We subscribe ourselves on every connect.
      resubscribe: false,
      // Hooks must be in place before the first packet: queued session messages arrive at once.
      manualConnect: true,
      // mqtt.js logs every packet through `debug`; even disabled, that cost shows under load.
      log: () => {},
      // Rescheduling the keepalive timer on every packet sent costs a timer per ack; a ping
      // every keepalive period regardless is just as good at finding a dead connection.
      reschedulePings: false,
      // Shared with our ack publishes: an id is never used twice at once.
      messageIdProvider: this.#outbox.ids,
    };
    this.#client = connect(options.url, clientOptions);
    this.#install();
    this.#client.connect();
  }

  /** Connects (retrying in the background) and starts consuming. */
  static start(options: ExternalIngressOptions): Promise<ExternalIngress> {
    return Promise.resolve(new ExternalIngress(options));
  }

  /** Resolves once the readings subscription is in place. */
  ready(): Promise<void> {
    return this.#subscribed;
  }

  /** Whether the broker connection is up. */
  get connected(): boolean {
    return this.#client.connected;
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
    const client = this.#client;
    const { logger, metrics } = this.#o;
    const internals = client as unknown as Internals;
    const send = internals._sendPacket.bind(client);
    internals._sendPacket = (packet, cb, ...rest) => {
      const entry = this.#capturing;
      if (entry && packet.cmd === "puback") {
        this.#capturing = null;
        entry.packetId = packet.messageId;
        cb?.(); // lets mqtt.js read the next packet now
        return;
      }
      send(packet, cb, ...rest);
    };
    client.on("packetreceive", (packet) => {
      if (packet.cmd === "puback" && packet.messageId !== undefined) {
        this.#outbox.acked(packet.messageId);
      }
    });

    client.handleMessage = (packet, callback) => {
      if (packet.cmd !== "publish") return callback();
      // mqtt.js goes on parsing what a closed connection had buffered: leave those packets (the
      // broker redelivers them) and stop that connection's pump here.
      if (this.#closed || !client.connected) return;
      metrics.inc("mqtt_messages_received_total", { topic: "meters/+/readings" });
      const meterId = meterOfReadingsTopic(packet.topic);
      const payload = packet.payload as Uint8Array;
      if (meterId === null) {
        logger.warn("mqtt message on an unexpected topic", { topic: packet.topic });
      }
      if (packet.qos !== 1) {
        if (meterId === null) return callback(); // acknowledged and dropped
        // QoS 0 has no ack to hold; QoS 2 is rare for meters and is simply held in series.
        const done = this.#o.intake.handle(meterId, payload).then(
          (ack) => this.#ack(meterId, ack),
          (error) => logger.error("mqtt intake failed", { error, meter_id: meterId }),
        );
        return packet.qos === 2 ? void done.then(() => callback()) : callback();
      }
      const entry: Entry = { final: false, captured: false, puback: true, epoch: this.#epoch };
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
        this.#o.intake.handle(meterId, payload).then((ack) => {
          this.#ack(meterId, ack);
          // A non-final ack only happens at shutdown: no PUBACK, the broker redelivers.
          finish(isFinal(ack));
        }, (error) => {
          logger.error("mqtt intake failed", { error, meter_id: meterId });
          finish(false);
        });
      }
      const proceed = () => {
        // That connection closed while this waited: its pump stops here.
        if (entry.epoch !== this.#epoch || this.#closed) return;
        this.#capturing = entry;
        callback();
        this.#capturing = null;
        entry.captured = true;
        this.#release();
      };
      // Bounded window: with too many readings in flight, stop reading from the socket.
      if (this.#queue.length >= this.#o.inflightMax) this.#paused = proceed;
      else this.#inSlice(proceed);
    };

    client.on("connect", (connack) => {
      // Held PUBACKs are small and released in bursts: do not let Nagle delay them.
      (client.stream as { setNoDelay?: (on: boolean) => void }).setNoDelay?.(true);
      this.#backoff = BACKOFF_MIN_MS;
      client.options.reconnectPeriod = BACKOFF_MIN_MS;
      this.#outbox.connected(connack.properties?.receiveMaximum ?? 65_535);
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
      // Ack publishes not yet written stay unacknowledged in the outbox and go again later.
      this.#epoch++;
      this.#paused = null;
      this.#out.clear();
      this.#outbox.disconnected();
      this.#release(); // entries of the old connection no longer wait for their capture
      this.#backoff = Math.min(BACKOFF_MAX_MS, this.#backoff * 2);
      client.options.reconnectPeriod = this.#backoff;
    });
    client.on("error", (error) => {
      metrics.inc("mqtt_connection_errors_total", { reason: "external_broker" });
      logger.warn("mqtt broker error", { error, url: redact(this.#o.url) });
    });
  }

  /**
   * Sends PUBACKs of final readings from the head of the queue, in receive order. An entry of
   * the current connection also waits for its PUBACK to be captured; one of a closed
   * connection only for its outcome.
   */
  #release(): void {
    while (this.#queue.length > 0) {
      const head = this.#queue.peek()!;
      const current = head.epoch === this.#epoch;
      if (!head.final || (current && !head.captured)) break;
      this.#queue.shift();
      if (current && head.puback && head.packetId !== undefined && this.#client.connected) {
        this.#out.puback(head.packetId);
        this.#scheduleFlush();
      }
    }
    if (this.#paused && this.#queue.length < this.#o.inflightMax) {
      const proceed = this.#paused;
      this.#paused = null;
      this.#inSlice(proceed);
    }
  }

  #ack(meterId: string, ack: AckMessage): void {
    this.#outbox.publish({ topic: acksTopic(meterId), payload: JSON.stringify(ack) });
  }

  /** Runs `next` now, or after the event loop had its turn when this slice is used up. */
  #inSlice(next: () => void): void {
    const now = performance.now();
    if (this.#sliceStart < 0) this.#sliceStart = now;
    if (now - this.#sliceStart < SLICE_MS) return next();
    this.#sliceStart = -1;
    setImmediate(next);
  }

  #scheduleFlush(): void {
    // One write per burst: a writer batch releases hundreds of readings in one turn.
    if (this.#flushScheduled || this.#closed) return;
    this.#flushScheduled = true;
    setImmediate(() => this.#flush());
  }

  #flush(): void {
    this.#flushScheduled = false;
    this.#sliceStart = -1; // the event loop had a turn
    if (this.#out.length === 0) return;
    const stream = this.#client.stream;
    if (!this.#client.connected || !stream?.writable) return this.#out.clear();
    stream.write(Buffer.from(this.#out.take().buffer));
  }

  /**
   * Disconnects; readings not yet acknowledged are redelivered by the broker later. The PUBACKs
   * and acks already released reach the broker first: the socket is half-closed after them and
   * read to its end, since closing with unread input resets the connection, and a reset lets
   * the broker drop what it had not read yet (measured: a reading acknowledged just before
   * close() came back).
   */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#flush();
    this.#closed = true;
    this.#paused = null;
    this.#epoch++;
    const stream = this.#client.stream as
      | (NodeJS.ReadWriteStream & { destroyed?: boolean; unpipe(): void })
      | undefined;
    if (this.#client.connected && stream && !stream.destroyed) {
      let timer: ReturnType<typeof setTimeout> | undefined;
      await Promise.race([
        new Promise<void>((resolve) => {
          stream.once("close", () => resolve());
          stream.unpipe(); // mqtt.js no longer reads it
          stream.on("data", () => {}); // read to the broker's FIN, discarding
          stream.resume();
          stream.end();
        }),
        new Promise<void>((resolve) => timer = setTimeout(resolve, CLOSE_TIMEOUT_MS)),
      ]);
      clearTimeout(timer);
    }
    await this.#client.endAsync(true);
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }
}

function redact(url: string): string {
  return url.replace(/\/\/[^@/]*@/, "//***@");
}
