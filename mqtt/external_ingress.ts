import {
  connect,
  type IClientOptions,
  type MqttClient,
  type Packet,
  UniqueMessageIdProvider,
} from "mqtt";
import { Buffer } from "node:buffer";
import { setImmediate } from "node:timers";
import type { Logger } from "../core/logger.ts";
import type { Metrics } from "../core/metrics.ts";
import { isFinal, type MqttIntake } from "./intake.ts";
import { Fifo } from "../core/fifo.ts";
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
  /** The connection it arrived on; PUBACKs never cross to a new connection. */
  epoch: number;
  /** The publish's packet id; `undefined` once there is no PUBACK to send. */
  packetId?: number;
}

interface AckPublish {
  topic: string;
  payload: string;
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
 * written once per burst ({@linkcode PacketBuffer}); their packet ids come from the client's
 * own id allocator, so they never clash with mqtt.js's, and the broker's PUBACKs of our ack
 * publishes are taken from `packetreceive`. Unacknowledged ack publishes are sent again, marked
 * DUP, after a reconnect, as mqtt.js would.
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
  #ids = new UniqueMessageIdProvider();
  #out = new PacketBuffer();
  /** Ack publishes sent and not yet acknowledged by the broker, by packet id. */
  #unacked = new Map<number, AckPublish>();
  /** Ack publishes waiting for the connection or for room in the broker's receive window. */
  #backlog = new Fifo<AckPublish>();
  #receiveMaximum = 65_535;
  /** When the current slice of intake work began; -1 after a yield. */
  #sliceStart = -1;
  #flushScheduled = false;

  private constructor(options: ExternalIngressOptions) {
    this.#o = options;
    this.#subscribed = new Promise((resolve) => this.#markSubscribed = resolve);
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
      // We subscribe ourselves when the broker has no session for us.
      resubscribe: false,
      // Hooks must be in place before the first packet: queued session messages arrive at once.
      manualConnect: true,
      // mqtt.js logs every packet through `debug`; even disabled, that cost shows under load.
      log: () => {},
      // Rescheduling the keepalive timer on every packet sent costs a timer per ack; a ping
      // every keepalive period regardless is just as good at finding a dead connection.
      reschedulePings: false,
      // Shared with our ack publishes: an id is never used twice at once.
      messageIdProvider: this.#ids,
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
        this.#acked(packet.messageId);
      }
    });

    client.handleMessage = (packet, callback) => {
      if (packet.cmd !== "publish") return callback();
      metrics.inc("mqtt_messages_received_total", { topic: "meters/+/readings" });
      const meterId = meterOfReadingsTopic(packet.topic);
      const payload = packet.payload as Uint8Array;
      if (meterId === null) {
        logger.warn("mqtt message on an unexpected topic", { topic: packet.topic });
        return callback();
      }
      if (packet.qos !== 1) {
        // QoS 0 has no ack to hold; QoS 2 is rare for meters and is simply held in series.
        const done = this.#o.intake.handle(meterId, payload).then((ack) => this.#ack(meterId, ack));
        return packet.qos === 2 ? void done.then(() => callback(), callback) : callback();
      }
      const entry: Entry = { final: false, epoch: this.#epoch };
      this.#queue.push(entry);
      this.#maxInFlight = Math.max(this.#maxInFlight, this.#queue.length);
      this.#o.intake.handle(meterId, payload).then((ack) => {
        this.#ack(meterId, ack);
        // A non-final ack only happens at shutdown: no PUBACK, the broker redelivers.
        if (!isFinal(ack)) entry.packetId = undefined;
        entry.final = true;
        this.#release();
      }, (error) => {
        logger.error("mqtt intake failed", { error, meter_id: meterId });
        entry.final = true;
        entry.packetId = undefined;
        this.#release();
      });
      const proceed = () => {
        this.#capturing = entry;
        callback();
        this.#capturing = null;
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
      this.#receiveMaximum = connack.properties?.receiveMaximum ?? 65_535;
      this.#resendAcks();
      logger.info("mqtt connected to external broker", {
        url: redact(this.#o.url),
        session_present: connack.sessionPresent,
      });
      if (connack.sessionPresent) return this.#markSubscribed();
      const base = "meters/+/readings";
      const topic = this.#o.sharedGroup ? `$share/${this.#o.sharedGroup}/${base}` : base;
      client.subscribe(topic, { qos: 1 }, (error) => {
        if (error) return logger.error("mqtt subscribe failed", { error, topic });
        this.#markSubscribed();
      });
    });
    client.on("close", () => {
      // PUBACKs of this connection can no longer be sent; the broker redelivers those readings.
      // Ack publishes not yet written stay in #unacked and go again after the reconnect.
      this.#epoch++;
      this.#out.clear();
      this.#backoff = Math.min(BACKOFF_MAX_MS, this.#backoff * 2);
      client.options.reconnectPeriod = this.#backoff;
    });
    client.on("error", (error) => {
      metrics.inc("mqtt_connection_errors_total", { reason: "external_broker" });
      logger.warn("mqtt broker error", { error, url: redact(this.#o.url) });
    });
  }

  /** Sends PUBACKs of final readings from the head of the queue, in receive order. */
  #release(): void {
    while (this.#queue.length > 0 && this.#queue.peek()!.final) {
      const entry = this.#queue.shift()!;
      if (entry.epoch === this.#epoch && entry.packetId !== undefined) {
        this.#out.puback(entry.packetId);
        this.#scheduleFlush();
      }
    }
    if (this.#paused && this.#queue.length < this.#o.inflightMax) {
      const proceed = this.#paused;
      this.#paused = null;
      this.#inSlice(proceed);
    }
  }

  #ack(meterId: string, ack: object): void {
    this.#publishAck({ topic: acksTopic(meterId), payload: JSON.stringify(ack) });
  }

  #publishAck(ack: AckPublish): void {
    if (!this.#client.connected || this.#unacked.size >= this.#receiveMaximum) {
      if (this.#backlog.length >= ACK_BACKLOG_MAX) {
        this.#o.metrics.inc("mqtt_connection_errors_total", { reason: "ack_backlog_full" });
        this.#backlog.shift(); // the device learns the outcome again when it resends
      }
      this.#backlog.push(ack);
      return;
    }
    const id = this.#ids.allocate();
    if (id === null) return void this.#backlog.push(ack);
    this.#unacked.set(id, ack);
    this.#out.publishQos1(ack.topic, ack.payload, id, false);
    this.#scheduleFlush();
  }

  /** The broker acknowledged one of our ack publishes. */
  #acked(id: number): void {
    if (!this.#unacked.delete(id)) return;
    this.#ids.deallocate(id);
    while (this.#backlog.length > 0 && this.#unacked.size < this.#receiveMaximum) {
      this.#publishAck(this.#backlog.shift()!);
    }
  }

  /** After a (re)connect: unacknowledged ack publishes again (DUP), then the backlog. */
  #resendAcks(): void {
    const retry: AckPublish[] = [];
    for (const [id, ack] of this.#unacked) {
      // mqtt.js cleared its allocator on connect: claim our ids again.
      if (this.#ids.register(id)) {
        this.#out.publishQos1(ack.topic, ack.payload, id, true);
      } else {
        this.#unacked.delete(id);
        retry.push(ack);
      }
    }
    const waiting = [...retry, ...this.#backlog.drain()];
    for (const ack of waiting) this.#publishAck(ack);
    this.#scheduleFlush();
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
    if (this.#flushScheduled) return;
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

  /** Disconnects; readings not yet acknowledged are redelivered by the broker later. */
  async close(): Promise<void> {
    this.#flush();
    this.#epoch++;
    await this.#client.endAsync(true);
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }
}

function redact(url: string): string {
  return url.replace(/\/\/[^@/]*@/, "//***@");
}
