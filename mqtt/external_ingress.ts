import { connect, type IClientOptions, type MqttClient, type Packet } from "mqtt";
import type { Logger } from "../core/logger.ts";
import type { Metrics } from "../core/metrics.ts";
import { isFinal, type MqttIntake } from "./intake.ts";
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
  sendPuback?: () => void;
}

type SendPacket = (packet: Packet, cb?: (error?: Error) => void, ...rest: unknown[]) => void;
/** The one private member we rely on (see the class comment). */
type Internals = { _sendPacket: SendPacket };

const BACKOFF_MIN_MS = 500;
const BACKOFF_MAX_MS = 30_000;

/**
 * Consumes readings from an external broker (Mosquitto, EMQX) over an MQTT 5 persistent
 * session. Intake is pipelined: many readings are in flight at once, and each PUBACK is held
 * until its reading is final, then released in receive order.
 *
 * mqtt.js sends a QoS 1 PUBACK right after `handleMessage` calls back and reads the next packet
 * only after that PUBACK was handed to `_sendPacket`. We call back at once (so the next packet
 * is read) and capture that PUBACK in `_sendPacket` to send it later. `_sendPacket` is private;
 * tests/mqtt_external_test.ts pins this behaviour so an mqtt.js upgrade that breaks it fails CI.
 */
export class ExternalIngress implements AsyncDisposable {
  #o: ExternalIngressOptions;
  #client: MqttClient;
  #queue: Entry[] = [];
  #epoch = 0;
  #capturing: Entry | null = null;
  #paused: (() => void) | null = null;
  #backoff = BACKOFF_MIN_MS;
  #subscribed: Promise<void>;
  #markSubscribed!: () => void;
  #maxInFlight = 0;

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
        entry.sendPuback = () => send(packet, undefined, ...rest);
        cb?.(); // lets mqtt.js read the next packet now
        return;
      }
      send(packet, cb, ...rest);
    };

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
        entry.final = isFinal(ack);
        if (!entry.final) entry.sendPuback = undefined;
        entry.final = true;
        this.#release();
      }, (error) => {
        logger.error("mqtt intake failed", { error, meter_id: meterId });
        entry.final = true;
        entry.sendPuback = undefined;
        this.#release();
      });
      const proceed = () => {
        this.#capturing = entry;
        callback();
        this.#capturing = null;
      };
      // Bounded window: with too many readings in flight, stop reading from the socket.
      if (this.#queue.length >= this.#o.inflightMax) this.#paused = proceed;
      else proceed();
    };

    client.on("connect", (connack) => {
      // Held PUBACKs are small and released in bursts: do not let Nagle delay them.
      (client.stream as { setNoDelay?: (on: boolean) => void }).setNoDelay?.(true);
      this.#backoff = BACKOFF_MIN_MS;
      client.options.reconnectPeriod = BACKOFF_MIN_MS;
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
      this.#epoch++;
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
    while (this.#queue.length > 0 && this.#queue[0].final) {
      const entry = this.#queue.shift()!;
      if (entry.epoch === this.#epoch) entry.sendPuback?.();
    }
    if (this.#paused && this.#queue.length < this.#o.inflightMax) {
      const proceed = this.#paused;
      this.#paused = null;
      proceed();
    }
  }

  #ack(meterId: string, ack: object): void {
    this.#client.publish(acksTopic(meterId), JSON.stringify(ack), { qos: 1 }, (error) => {
      if (error) this.#o.logger.debug("mqtt ack publish failed", { error, meter_id: meterId });
    });
  }

  /** Disconnects; readings not yet acknowledged are redelivered by the broker later. */
  async close(): Promise<void> {
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
