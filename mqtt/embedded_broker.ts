import { Aedes, type Client, type PublishPacket } from "aedes";
import { Buffer } from "node:buffer";
import { X509Certificate } from "node:crypto";
import { createServer as createNetServer, type Server, type Socket } from "node:net";
import { createServer as createTlsServer, type TLSSocket } from "node:tls";
import type { ActorRegistry } from "../actors/registry.ts";
import type { Clock } from "../core/clock.ts";
import type { Logger } from "../core/logger.ts";
import type { Metrics } from "../core/metrics.ts";
import { METER_ID_PATTERN } from "../core/reading.ts";
import { connectMessage } from "../core/signature.ts";
import { type AckMessage, isFinal, type MqttIntake } from "./intake.ts";
import { acksTopic, readingsTopic } from "./topics.ts";

/** TLS listener settings; `ca` turns on client-certificate (mTLS) authentication. */
export interface BrokerTls {
  port: number;
  cert: string;
  key: string;
  ca?: string;
}

/** Options of {@linkcode EmbeddedBroker}. */
export interface EmbeddedBrokerOptions {
  host: string;
  port: number;
  tls?: BrokerTls;
  registry: ActorRegistry;
  intake: MqttIntake;
  clock: Clock;
  logger: Logger;
  metrics: Metrics;
  /** How fresh the CONNECT password's timestamp must be. */
  connectSkewMs?: number;
}

const CONNECT_SKEW_MS = 5 * 60_000;
const METER = Symbol("meter");
type MeterClient = Client & { [METER]?: string };

/**
 * The embedded MQTT broker (aedes): devices authenticate as their meter, may only publish their
 * readings and read their acks, and get their PUBACK only once the reading's fate is final.
 */
export class EmbeddedBroker implements AsyncDisposable {
  #o: EmbeddedBrokerOptions;
  #aedes: Aedes;
  #servers: Server[] = [];
  #byMeter = new Map<string, Set<MeterClient>>();
  #ports: { mqtt: number; mqtts?: number } = { mqtt: 0 };
  #ca: X509Certificate | undefined;

  private constructor(options: EmbeddedBrokerOptions, aedes: Aedes) {
    this.#o = options;
    this.#aedes = aedes;
    this.#ca = options.tls?.ca ? new X509Certificate(options.tls.ca) : undefined;
  }

  /** Starts the broker and its listeners. */
  static async start(options: EmbeddedBrokerOptions): Promise<EmbeddedBroker> {
    const aedes = await Aedes.createBroker({
      // A frozen client must not stall everyone else's delivery.
      drainTimeout: 10_000,
      connectTimeout: 10_000,
      maxClientsIdLength: 128,
    });
    const broker = new EmbeddedBroker(options, aedes);
    broker.#wire();
    try {
      // Small acks must not wait for Nagle's algorithm (measured: +40 ms per ack without this).
      const handle = (socket: Socket) => {
        socket.setNoDelay(true);
        aedes.handle(socket);
      };
      broker.#ports.mqtt = await broker.#listen(createNetServer(handle), options.port);
      if (options.tls) {
        const tls = createTlsServer({
          cert: options.tls.cert,
          key: options.tls.key,
          ...(options.tls.ca
            ? { ca: options.tls.ca, requestCert: true, rejectUnauthorized: false }
            : {}),
        }, handle);
        broker.#ports.mqtts = await broker.#listen(tls, options.tls.port);
      }
    } catch (error) {
      await broker.close();
      throw error;
    }
    return broker;
  }

  /** The bound ports (useful when 0 was configured). */
  get ports(): { mqtt: number; mqtts?: number } {
    return { ...this.#ports };
  }

  /** Connected device sessions. */
  get connections(): number {
    let n = 0;
    for (const set of this.#byMeter.values()) n += set.size;
    return n;
  }

  /** Disconnects every session of a meter (after revocation). */
  disconnect(meterId: string): void {
    for (const client of this.#byMeter.get(meterId) ?? []) client.close();
  }

  #listen(server: Server, port: number): Promise<number> {
    return new Promise((resolve, reject) => {
      server.once("error", reject);
      server.listen(port, this.#o.host, () => {
        server.off("error", reject);
        this.#servers.push(server);
        const address = server.address();
        resolve(typeof address === "object" && address ? address.port : port);
      });
    });
  }

  #wire(): void {
    const { registry, intake, clock, logger, metrics } = this.#o;
    const aedes = this.#aedes;
    const skew = this.#o.connectSkewMs ?? CONNECT_SKEW_MS;

    aedes.authenticate = (client: MeterClient, username, password, done) => {
      const refuse = (code: number, why: string) => {
        metrics.inc("mqtt_connection_errors_total", { reason: why });
        const error = Object.assign(new Error(why), { returnCode: code });
        done(error, false);
      };
      const cert = certificateMeter(client, this.#ca, clock.now());
      const meterId = cert ?? username ?? "";
      if (!METER_ID_PATTERN.test(meterId)) return refuse(4, "bad_username");
      let check: Promise<unknown>;
      if (cert !== null) {
        if (username && username !== cert) return refuse(4, "username_not_certificate");
        check = registry.authenticate(meterId, null, null);
      } else {
        const [seconds, signature] = (password ?? Buffer.alloc(0)).toString("utf8").split(".");
        const at = Number(seconds) * 1000;
        if (!/^\d{1,12}$/.test(seconds ?? "") || !signature) return refuse(4, "bad_password");
        if (Math.abs(clock.now() - at) > skew) return refuse(4, "stale_password");
        check = registry.authenticate(meterId, connectMessage(meterId, seconds), signature);
      }
      check.then((verdict) => {
        if (verdict !== null) {
          const v = verdict as { code: string };
          return refuse(v.code === "unavailable" || v.code === "overloaded" ? 3 : 5, v.code);
        }
        client[METER] = meterId;
        done(null, true);
      }, (error) => {
        logger.error("mqtt authentication failed", { error });
        refuse(3, "internal");
      });
    };

    aedes.authorizeSubscribe = (client: MeterClient, sub, done) => {
      // Refused subscriptions get SUBACK 0x80; the session stays up.
      done(null, sub.topic === acksTopic(client[METER] ?? "") ? sub : null);
    };

    aedes.authorizePublish = (client: MeterClient | null, packet: PublishPacket, done) => {
      const meterId = client?.[METER];
      if (!meterId || packet.topic !== readingsTopic(meterId)) {
        metrics.inc("mqtt_connection_errors_total", { reason: "forbidden_topic" });
        return done(new Error(`Publishing to "${packet.topic}" is not allowed`));
      }
      metrics.inc("mqtt_messages_received_total", { topic: "meters/+/readings" });
      intake.handle(meterId, packet.payload as Uint8Array).then((ack) => {
        this.#publishAck(meterId, ack);
        // Not final only when shutting down: no PUBACK, so the device sends it again.
        done(isFinal(ack) ? null : new Error("Gateway shutting down"));
      }, (error) => {
        logger.error("mqtt intake failed", { error, meter_id: meterId });
        done(new Error("Internal error"));
      });
    };

    // Readings are consumed here, never forwarded to other sessions.
    aedes.authorizeForward = (_client, packet) =>
      packet.topic.endsWith("/readings") ? null : packet;

    aedes.on("client", (client: MeterClient) => {
      const meterId = client[METER];
      if (!meterId) return;
      let set = this.#byMeter.get(meterId);
      if (!set) this.#byMeter.set(meterId, set = new Set());
      set.add(client);
    });
    aedes.on("clientDisconnect", (client: MeterClient) => this.#forget(client));
    aedes.on("clientError", (client: MeterClient, error: Error) => {
      metrics.inc("mqtt_connection_errors_total", { reason: "client_error" });
      logger.debug("mqtt client error", { meter_id: client[METER], error });
    });
    aedes.on("connectionError", (_client: Client, error: Error) => {
      metrics.inc("mqtt_connection_errors_total", { reason: "connection_error" });
      logger.debug("mqtt connection error", { error });
    });
  }

  #forget(client: MeterClient): void {
    const meterId = client[METER];
    if (!meterId) return;
    const set = this.#byMeter.get(meterId);
    set?.delete(client);
    if (set?.size === 0) this.#byMeter.delete(meterId);
  }

  #publishAck(meterId: string, ack: AckMessage): void {
    this.#aedes.publish({
      cmd: "publish",
      topic: acksTopic(meterId),
      payload: Buffer.from(JSON.stringify(ack)),
      qos: 1,
      retain: false,
      dup: false,
    }, (error) => {
      if (error) this.#o.logger.warn("mqtt ack publish failed", { meter_id: meterId, error });
    });
  }

  /** Closes every session and listener. */
  async close(): Promise<void> {
    await Promise.all(this.#servers.map((s) =>
      new Promise<void>((resolve) => {
        s.close(() => resolve());
      })
    ));
    this.#servers = [];
    await new Promise<void>((resolve) => this.#aedes.close(() => resolve()));
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }
}

/**
 * The meter id (CN) of a client certificate issued by `ca` and valid at `now`, else `null`.
 * Checked here rather than trusting `socket.authorized`, which Deno's node:tls server does not
 * set for valid client certificates (measured with Deno 2.9.6). Only leaf certificates signed
 * directly by the configured CA are accepted.
 */
function certificateMeter(
  client: Client,
  ca: X509Certificate | undefined,
  now: number,
): string | null {
  const socket = client.conn as unknown as Partial<TLSSocket>;
  if (!ca || typeof socket.getPeerCertificate !== "function") return null;
  const raw = socket.getPeerCertificate(true)?.raw;
  if (!raw) return null;
  try {
    const cert = new X509Certificate(raw);
    const valid = Date.parse(cert.validFrom) <= now && now <= Date.parse(cert.validTo);
    if (!valid || !cert.checkIssued(ca) || !cert.verify(ca.publicKey)) return null;
    const cn = /(?:^|\n)CN=([^\n]+)/.exec(cert.subject)?.[1];
    return cn ?? null;
  } catch {
    return null;
  }
}
