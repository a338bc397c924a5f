import { Aedes, type Client, type PublishPacket } from "aedes";
import { Buffer } from "node:buffer";
import { X509Certificate } from "node:crypto";
import { createServer as createNetServer, type Server, type Socket } from "node:net";
import { createServer as createTlsServer, type TLSSocket } from "node:tls";
import type { ActorRegistry } from "../actors/registry.ts";
import type { Clock } from "../core/clock.ts";
import type { MqttLimits } from "../core/config.ts";
import type { ErrorCode } from "../core/errors.ts";
import type { Logger } from "../core/logger.ts";
import type { Metrics } from "../core/metrics.ts";
import { METER_ID_PATTERN } from "../core/reading.ts";
import type { SecurityLog } from "../core/security_log.ts";
import { connectMessage } from "../core/signature.ts";
import { type BoundedPersistence, boundedPersistence } from "./bounded_persistence.ts";
import { clientIdBelongsTo } from "./client_id.ts";
import { ConnectStamps } from "./connect_stamps.ts";
import { type AckMessage, isFinal, type MqttIntake } from "./intake.ts";
import { JunkGuard } from "./junk_guard.ts";
import { type GuardRefusal, ListenerGuard } from "./listener_guard.ts";
import { SessionTable } from "./session_table.ts";
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
  /** Where refused connections and junk are reported (rate-limited warn lines). */
  securityLog: SecurityLog;
  /** Limits against hostile clients; each defaults to {@linkcode DEFAULT_BROKER_LIMITS}. */
  limits?: Partial<BrokerLimits>;
}

/** Limits of the embedded broker against hostile or broken clients. */
export interface BrokerLimits extends MqttLimits {
  /** Period of the check that each listener still accepts; 0 turns it off. */
  acceptProbeMs: number;
}

/** Defaults of {@linkcode BrokerLimits}. */
export const DEFAULT_BROKER_LIMITS: BrokerLimits = {
  maxConnections: 10_000,
  maxConnectionsPerAddress: 64,
  connectTimeoutMs: 5_000,
  sessionsPerMeter: 4,
  sessionQueueMax: 1_000,
  sessionExpiryMs: 86_400_000,
  connectMaxAgeMs: 60_000,
  connectMaxSkewMs: 30_000,
  junkLimit: 20,
  junkWindowMs: 60_000,
  junkBanMs: 5 * 60_000,
  acceptProbeMs: 2_000,
};

/** Rejections that count as junk: a device sending them repeatedly is broken or hostile. */
const JUNK_CODES = new Set<ErrorCode>(["invalid_payload", "payload_too_large", "bad_signature"]);
/** How long the PUBACK of junk is held once a device is past half its junk limit. */
const JUNK_THROTTLE_MS = 1_000;

/** aedes' own errors that are not the device's junk (no `code` either, unlike socket errors). */
const NOT_JUNK = new Set([
  "keep alive timeout",
  "Client queue limit reached",
  "connect did not arrive in time",
]);

const METER = Symbol("meter");
const RAW = Symbol("raw-connect");
const COUNTED = Symbol("junk-counted");
type MeterClient = Client & {
  [METER]?: string;
  /** Its last error was counted as junk already (a forbidden publish). */
  [COUNTED]?: boolean;
  /** The CONNECT's own client id and clean flag (aedes replaces an empty id with its own). */
  [RAW]?: { clientId: string; clean: boolean };
};

/**
 * The embedded MQTT broker (aedes): devices authenticate as their meter, may only publish their
 * readings and read their acks, and get their PUBACK only once the reading's fate is final.
 */
export class EmbeddedBroker implements AsyncDisposable {
  #o: EmbeddedBrokerOptions;
  #limits: BrokerLimits;
  #aedes: Aedes;
  #store: BoundedPersistence;
  #guards: ListenerGuard[] = [];
  #byMeter = new Map<string, Set<MeterClient>>();
  #ports: { mqtt: number; mqtts?: number } = { mqtt: 0 };
  #ca: X509Certificate | undefined;
  #sessions: SessionTable;
  #stamps: ConnectStamps;
  #junk: JunkGuard;
  #timers = new Set<ReturnType<typeof setTimeout>>();
  #sweeper: ReturnType<typeof setInterval>;

  private constructor(
    options: EmbeddedBrokerOptions,
    limits: BrokerLimits,
    aedes: Aedes,
    store: BoundedPersistence,
  ) {
    this.#o = options;
    this.#limits = limits;
    this.#aedes = aedes;
    this.#store = store;
    this.#ca = options.tls?.ca ? new X509Certificate(options.tls.ca) : undefined;
    this.#sessions = new SessionTable({
      perMeter: limits.sessionsPerMeter,
      expiryMs: limits.sessionExpiryMs,
      forget: (clientId) => {
        store.forget(clientId).catch((error) =>
          options.logger.warn("mqtt session cleanup failed", { error })
        );
      },
    });
    this.#stamps = new ConnectStamps({
      maxAgeMs: limits.connectMaxAgeMs,
      maxSkewMs: limits.connectMaxSkewMs,
    });
    this.#junk = new JunkGuard({
      limit: limits.junkLimit,
      windowMs: limits.junkWindowMs,
      banMs: limits.junkBanMs,
    });
    const sweepEvery = Math.max(1_000, Math.min(60_000, limits.sessionExpiryMs / 2));
    this.#sweeper = setInterval(() => this.#sessions.sweep(options.clock.now()), sweepEvery);
  }

  /** Starts the broker and its listeners. */
  static async start(options: EmbeddedBrokerOptions): Promise<EmbeddedBroker> {
    const limits = { ...DEFAULT_BROKER_LIMITS, ...options.limits };
    const store = boundedPersistence({
      queueMax: limits.sessionQueueMax,
      onDrop: () => options.metrics.inc("mqtt_connection_errors_total", { reason: "queue_full" }),
    });
    const aedes = await Aedes.createBroker({
      persistence: store.persistence,
      // A frozen client must not stall everyone else's delivery.
      drainTimeout: 10_000,
      // The listener guard closes connections that do not authenticate in time; aedes' own timer
      // (until the CONNECT packet is complete) is set to the same.
      connectTimeout: limits.connectTimeoutMs,
      maxClientsIdLength: 128,
    });
    const broker = new EmbeddedBroker(options, limits, aedes, store);
    broker.#wire();
    const fds = await descriptorLimit();
    if (fds !== null && fds < limits.maxConnections) {
      // Still safe (accepting pauses and resumes), but connections beyond it are refused.
      options.logger.warn("MQTT_MAX_CONNECTIONS is above the process's descriptor limit", {
        max_connections: limits.maxConnections,
        descriptor_limit: fds,
        hint: "raise the limit (ulimit -n, LimitNOFILE=) or lower MQTT_MAX_CONNECTIONS",
      });
    }
    try {
      // Small acks must not wait for Nagle's algorithm (measured: +40 ms per ack without this).
      const handle = (socket: Socket) => {
        socket.setNoDelay(true);
        aedes.handle(socket);
      };
      broker.#ports.mqtt = await broker.#listen("mqtt", options.port, {
        create: () => createNetServer(),
        accept: handle,
      });
      const tls = options.tls;
      if (tls) {
        broker.#ports.mqtts = await broker.#listen("mqtts", tls.port, {
          create: () =>
            createTlsServer({
              cert: tls.cert,
              key: tls.key,
              ...(tls.ca ? { ca: tls.ca, requestCert: true, rejectUnauthorized: false } : {}),
            }, handle),
        });
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

  #listen(
    name: "mqtt" | "mqtts",
    port: number,
    server: { create: () => Server; accept?: (socket: Socket) => void },
  ): Promise<number> {
    const { metrics, securityLog, logger } = this.#o;
    const limits = this.#limits;
    const guard = new ListenerGuard({
      ...server,
      host: this.#o.host,
      port,
      maxConnections: limits.maxConnections,
      maxPendingPerAddress: limits.maxConnectionsPerAddress,
      connectTimeoutMs: limits.connectTimeoutMs,
      probeMs: limits.acceptProbeMs,
      onRefused: (reason: GuardRefusal, address) => {
        metrics.inc("mqtt_connection_errors_total", { reason });
        securityLog.warn("connection_refused", address, { listener: name, reason });
      },
      onStall: ({ restarted, error }) => {
        metrics.inc("mqtt_connection_errors_total", { reason: "accept_stalled" });
        // Not rate-limited per client: once per stall, and stalls are seconds apart.
        logger.warn(
          restarted
            ? "mqtt listener stopped accepting (descriptors exhausted?); listening again"
            : "mqtt listener stopped accepting and could not listen again; retrying",
          { listener: name, ...(error ? { error } : {}) },
        );
      },
      onProbeError: (code) => {
        metrics.inc("mqtt_connection_errors_total", { reason: "accept_probe_failed" });
        securityLog.warn("accept_failed", name, { listener: name, code });
      },
    });
    this.#guards.push(guard);
    return guard.listen();
  }

  #wire(): void {
    const { registry, intake, clock, logger, metrics, securityLog } = this.#o;
    const aedes = this.#aedes;

    aedes.preConnect = (client: MeterClient, packet, done) => {
      client[RAW] = { clientId: packet.clientId ?? "", clean: packet.clean !== false };
      done(null, true);
    };

    aedes.authenticate = (client: MeterClient, username, password, done) => {
      const address = remoteAddress(client);
      const clientId = client[RAW]?.clientId ?? "";
      const clean = client[RAW]?.clean ?? true;
      let meterId = "";
      // Logged without the password, and with the ids cut to a sane length.
      const refuse = (code: number, why: string) => {
        metrics.inc("mqtt_connection_errors_total", { reason: why });
        securityLog.warn("mqtt_connect_refused", address, {
          reason: why,
          meter_id: (meterId || username || "").slice(0, 64),
          client_id: clientId.slice(0, 128),
        });
        const error = Object.assign(new Error(why), { returnCode: code });
        done(error, false);
      };
      const now = clock.now();
      const cert = certificateMeter(client, this.#ca, now);
      meterId = cert ?? username ?? "";
      if (!METER_ID_PATTERN.test(meterId)) return refuse(4, "bad_username");
      if (this.#junk.bannedFor(meterId, now) > 0) return refuse(3, "junk_backoff");
      if (!clientIdBelongsTo(clientId, meterId)) return refuse(2, "client_id_rejected");
      let check: Promise<unknown>;
      let seconds: number | undefined;
      if (cert !== null) {
        if (username && username !== cert) return refuse(4, "username_not_certificate");
        check = registry.authenticate(meterId, null, null);
      } else {
        const [text, signature] = (password ?? Buffer.alloc(0)).toString("utf8").split(".");
        if (!/^\d{1,12}$/.test(text ?? "") || !signature) return refuse(4, "bad_password");
        seconds = Number(text);
        const fresh = this.#stamps.check(meterId, clientId, seconds, now);
        if (fresh !== "ok") return refuse(4, `${fresh}_password`);
        check = registry.authenticate(
          meterId,
          connectMessage(meterId, clientId, text),
          signature,
        );
      }
      check.then((verdict) => {
        if (verdict !== null) {
          const v = verdict as { code: string };
          return refuse(v.code === "unavailable" || v.code === "overloaded" ? 3 : 5, v.code);
        }
        const at = clock.now();
        if (seconds !== undefined) {
          // Checked again now that the signature is known good: two CONNECTs may race.
          const fresh = this.#stamps.commit(meterId, clientId, seconds, at);
          if (fresh !== "ok") return refuse(4, `${fresh}_password`);
        }
        const conn = client.conn as unknown as Socket;
        // Closed meanwhile (e.g. past the CONNECT deadline): reserve nothing, its close is gone.
        if (client.closed || conn.destroyed) {
          return done(Object.assign(new Error("Connection closed"), { returnCode: 3 }), false);
        }
        if (this.#sessions.open(meterId, clientId, clean, at) === "full") {
          return refuse(2, "sessions_full");
        }
        conn.once("close", () => this.#sessions.closed(meterId, clientId, clock.now()));
        for (const guard of this.#guards) guard.authenticated(conn);
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
        if (client && meterId) {
          // The error below closes the connection and comes back as a clientError.
          client[COUNTED] = true;
          this.#countJunk(client, meterId, "forbidden_topic");
        }
        return done(new Error(`Publishing to "${packet.topic}" is not allowed`));
      }
      metrics.inc("mqtt_messages_received_total", { topic: "meters/+/readings" });
      intake.handle(meterId, packet.payload as Uint8Array).then((ack) => {
        this.#publishAck(meterId, ack);
        // Not final only when shutting down: no PUBACK, so the device sends it again.
        if (!isFinal(ack)) return done(new Error("Gateway shutting down"));
        const junk = ack.status === "rejected" && JUNK_CODES.has(ack.code!)
          ? this.#countJunk(client!, meterId, ack.code!)
          : "ok";
        if (junk !== "throttle") return done(null);
        const timer = setTimeout(() => {
          this.#timers.delete(timer);
          done(null);
        }, JUNK_THROTTLE_MS);
        this.#timers.add(timer);
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
      // Malformed packets (parser errors carry no `code`) from a device count as junk.
      const junk = client[METER] && !client[COUNTED] && !(error as { code?: string }).code &&
        !NOT_JUNK.has(error.message);
      if (junk) this.#countJunk(client, client[METER]!, "malformed_packet");
    });
    aedes.on("connectionError", (_client: Client, error: Error) => {
      metrics.inc("mqtt_connection_errors_total", { reason: "connection_error" });
      logger.debug("mqtt connection error", { error });
    });
  }

  /** Counts junk from a device; past the limit it is disconnected and refused for a while. */
  #countJunk(client: MeterClient, meterId: string, why: string): "ok" | "throttle" | "disconnect" {
    const verdict = this.#junk.record(meterId, this.#o.clock.now());
    if (verdict === "disconnect") {
      const address = remoteAddress(client);
      this.#o.metrics.inc("mqtt_connection_errors_total", { reason: "junk_disconnect" });
      this.#o.securityLog.warn("mqtt_junk", address, {
        meter_id: meterId,
        reason: why,
        refused_for_ms: this.#limits.junkBanMs,
      });
      // After this publish's PUBACK and ack have been written.
      setImmediate(() => client.close());
    }
    return verdict;
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
    clearInterval(this.#sweeper);
    for (const t of this.#timers) clearTimeout(t);
    this.#timers.clear();
    await Promise.all(this.#guards.map((g) => g.close()));
    this.#guards = [];
    await new Promise<void>((resolve) => this.#aedes.close(() => resolve()));
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }
}

/** The soft limit on open files (Linux), or `null` when unknown. */
async function descriptorLimit(): Promise<number | null> {
  try {
    const limits = await Deno.readTextFile("/proc/self/limits");
    const match = /^Max open files\s+(\d+)/m.exec(limits);
    return match ? Number(match[1]) : null;
  } catch {
    return null;
  }
}

/** The client's address, for logs. */
function remoteAddress(client: Client): string {
  return (client.conn as unknown as Partial<Socket> | undefined)?.remoteAddress ?? "unknown";
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
