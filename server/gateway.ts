import type { OpenAPIHono } from "@hono/zod-openapi";
import { ActorRegistry, type RateShare } from "../actors/registry.ts";
import type { Bus } from "../bus/bus.ts";
import { LocalBus } from "../bus/local_bus.ts";
import type { GatewayEvent } from "../core/events.ts";
import type { ReadingRow } from "../core/reading.ts";
import { eventOf } from "../ws/hub.ts";
import type { Clock } from "../core/clock.ts";
import type { Config } from "../core/config.ts";
import { componentLoggers, type Logger } from "../core/logger.ts";
import { Metrics } from "../core/metrics.ts";
import { SecurityLog } from "../core/security_log.ts";
import { describeStore, openStore, type StoreSpec } from "../db/open_store.ts";
import { type Prunable, RetentionWorker } from "../services/retention.ts";
import type { Store } from "../db/store.ts";
import { PostgresStore } from "../db/postgres_store.ts";
import { createApp } from "../routes/app.ts";
import { WsHub } from "../ws/hub.ts";
import { WriterClient } from "../workers/writer_client.ts";
import { EmbeddedBroker } from "../mqtt/embedded_broker.ts";
import { AckPublisher } from "../mqtt/ack_publisher.ts";
import { ExternalIngress } from "../mqtt/external_ingress.ts";
import { MqttIntake } from "../mqtt/intake.ts";
import { DeviceService } from "../services/devices.ts";
import { IngestMetrics } from "../services/ingest_metrics.ts";
import { broadcastMetrics, declareGatewayMetrics, writerMetrics } from "./gateway_metrics.ts";
import { TokenService } from "../services/tokens.ts";
import { UserService } from "../services/users.ts";
import { StateCache, UserStateCache } from "../services/user_state.ts";
import { DeviceRecheck } from "../services/device_recheck.ts";
import { openBrokerAdmin } from "../mqtt/broker_admin.ts";
import type { Cache } from "../cache/cache.ts";
import { LruCache } from "../cache/lru_cache.ts";
import { ReadCache } from "../cache/read_cache.ts";
import type { ScryptParams } from "../core/password.ts";
import { BatchRunner } from "../services/batch_runner.ts";

/** Adapters and secrets chosen by the composition root. */
export interface GatewayDeps {
  config: Config;
  storeSpec: StoreSpec;
  bus: Bus;
  clock: Clock;
  logger: Logger;
  jwtSecret: string;
  kek: Uint8Array;
  /** The read cache's backend (Redis when configured); default an in-process LRU. */
  cache?: Cache;
  /** Reconciles the meters' buckets across instances (Redis); absent: each instance alone. */
  rate?: RateShare;
  /** scrypt parameters of new password hashes (tests pass cheap ones); default N=2^17. */
  passwordParams?: ScryptParams;
}

/** A running gateway without its listeners: the app, the registry and what must be closed. */
export interface Gateway extends AsyncDisposable {
  app: OpenAPIHono;
  registry: ActorRegistry;
  store: Store;
  writer: WriterClient;
  hub: WsHub;
  users: UserService;
  devices: DeviceService;
  tokens: TokenService;
  metrics: Metrics;
  /** The embedded MQTT broker, when it runs. */
  broker?: EmbeddedBroker;
  /** The external-broker ingress, when `MQTT_URL` is set. */
  external?: ExternalIngress;
  /** Runs batch jobs (this instance's share of them). */
  batches: BatchRunner;
  close(): Promise<void>;
}

// How often the TimescaleDB policy jobs are checked for failures.
const POLICY_CHECK_MS = 5 * 60_000;

/** Opens the store and the writer, wires actors, bus, services and routes. */
export async function createGateway(deps: GatewayDeps): Promise<Gateway> {
  const { config, bus, clock } = deps;
  // One logger per component: its lines say which, LOG_LEVELS sets its level.
  const log = componentLoggers(deps.logger);
  const storeOptions = { dedupeWindowMs: config.rules.dedupeWindowMs };
  const store = await openStore(deps.storeSpec, storeOptions, log.db);
  const timescale = (store as { timescale?: boolean }).timescale;
  log.db.info("store ready", {
    store: describeStore(deps.storeSpec),
    ...(timescale === undefined ? {} : { mode: timescale ? "timescaledb" : "postgresql" }),
  });
  // Set once the bus side is wired (below); a batch cannot commit before intake starts.
  let onCommitted: (rows: ReadingRow[]) => Promise<void> | void = () => {};
  // The writer's own connections, one per batch in flight (two per lane): migrations were
  // applied above, once.
  const { concurrency, ...writerOptions } = config.writer;
  const spec = deps.storeSpec;
  const writerSpec: StoreSpec = spec.kind === "postgres"
    ? { ...spec, migrate: false, max: 2 * concurrency }
    : spec;
  const metrics = new Metrics();
  const observe = config.metricsEnabled;
  const ingest = new IngestMetrics(metrics, observe);
  const onBatch = observe ? writerMetrics(metrics) : undefined;
  let writer: WriterClient;
  try {
    writer = await WriterClient.start({
      spec: writerSpec,
      storeOptions,
      ...writerOptions,
      // Deno KV writes one batch at a time; PostgreSQL one per lane, meters split between lanes.
      lanes: spec.kind === "postgres" ? concurrency : 1,
      maxInFlight: 2,
      // One bus message per topic per committed batch, never one round trip per reading.
      onCommitted: (rows) => onCommitted(rows),
      onBatch,
      logger: log.writer,
      onStall: (message) =>
        message === null
          ? log.writer.info("writer recovered")
          : log.writer.error("writer stalled; batch kept for retry", { reason: message }),
    });
  } catch (error) {
    await store.close();
    throw error;
  }

  const reads = new ReadCache({
    cache: deps.cache ?? new LruCache({ maxEntries: config.cache.maxEntries, clock }),
    store,
    metrics,
    clock,
    ttl: {
      userStatsMs: config.cache.userStatsTtlMs,
      recentReadingsMs: config.cache.recentReadingsTtlMs,
      hourlyStatsMs: config.cache.hourlyStatsTtlMs,
    },
  });
  const security = new SecurityLog({ logger: log.security, clock });
  const registry = new ActorRegistry({
    store,
    sink: writer,
    security,
    clock,
    logger: log.actors,
    kek: deps.kek,
    settings: {
      rules: config.rules,
      bucket: config.bucket,
      keys: { rotationMs: config.keyRotationMs, graceMs: config.keyGraceMs },
      recent: config.actors.recent,
    },
    idleTtlMs: config.actors.idleTtlMs,
    maxActors: config.actors.max,
    mailboxMax: config.actors.mailboxMax,
    rate: deps.rate,
    onOutcome: (msg, outcome, seconds) => ingest.outcome(msg, outcome, seconds),
    onVerify: observe
      ? (kind, result, seconds) => ingest.verified(kind, result, seconds)
      : undefined,
  });
  const hub = new WsHub({
    bus,
    store,
    logger: log.ws,
    sendBufferMax: config.wsSendBufferMax,
    maxPerUser: config.wsMaxPerUser,
    resumeMax: config.wsResumeMax,
    positionCheckMs: config.wsPositionCheckMs,
    onBroadcast: observe ? broadcastMetrics(metrics) : undefined,
  });
  const userState = new UserStateCache({ load: (id) => store.getUser(id), clock });
  // Read on every per-meter read and subscribe; changed only by (re-)registration.
  const owners = new StateCache<string>({
    load: async (meterId) => (await store.getDevice(meterId))?.user_id ?? null,
    clock,
  });
  let broker: EmbeddedBroker | undefined;
  let external: ExternalIngress | undefined;
  const control = bus.subscribe("control", (event) => {
    if (event.type === "device.changed") {
      registry.invalidate(event.data.meter_id);
      owners.invalidate(event.data.meter_id);
      if (event.data.change === "revoked") broker?.disconnect(event.data.meter_id);
    }
    if (event.type === "user.changed") userState.invalidate(event.data.user_id);
    hub.handleControl(event); // closes WebSockets whose tokens ended, re-checks ownership
  });
  const recheck = new DeviceRecheck({
    bus,
    store,
    clock,
    logger: log.bus,
    intervalMs: config.deviceRecheckMs,
    onChanged: (meterId, status) => {
      registry.invalidate(meterId);
      owners.invalidate(meterId);
      if (status === "revoked") broker?.disconnect(meterId);
    },
  });
  let publishFailures = 0;
  onCommitted = (rows: ReadingRow[]): Promise<void> => {
    // Coalesced per batch: one invalidation per key, one round trip on Redis; never throws.
    const invalidated = reads.invalidateCommitted(rows);
    const events: GatewayEvent[] = rows.map(eventOf);
    bus.publish(events).then(
      () => {
        if (publishFailures > 0) {
          log.bus.info("bus publishing again", { batches_failed: publishFailures });
          publishFailures = 0;
        }
      },
      (error) => {
        // Local clients already got the events; other instances catch up from the store.
        if (publishFailures++ === 0) log.bus.warn("bus publish failed", { error });
      },
    );
    // The writer acknowledges the batch once stale cache entries are gone (read-your-writes).
    return invalidated;
  };
  const cleanups: (() => Promise<void> | void)[] = [
    () => store.close(),
    () => writer.close(), // writes everything already accepted
    () => control.unsubscribe(),
    () => recheck.close(),
    () => hub.close(),
  ];
  const unwind = async () => {
    for (const cleanup of cleanups.splice(0).reverse()) await cleanup();
  };

  const users = new UserService({
    store,
    clock,
    bus,
    state: userState,
    logger: log.auth,
    passwordParams: deps.passwordParams,
    loginBackoff: config.loginBackoff,
  });
  const tokens = new TokenService({
    secret: deps.jwtSecret,
    ttlMs: config.jwtTtlMs,
    clock,
    state: userState,
    security,
  });
  // An external broker with an admin API disconnects and refuses revoked devices.
  const brokerAdmin = openBrokerAdmin(config, log.mqtt);
  if (brokerAdmin) cleanups.push(() => brokerAdmin.close());
  const devices = new DeviceService({
    store,
    bus,
    clock,
    kek: deps.kek,
    policy: { rotationMs: config.keyRotationMs, graceMs: config.keyGraceMs },
    logger: log.auth,
    brokerAdmin,
  });
  metrics.counter("mqtt_messages_received_total", "MQTT publishes received, by topic pattern");
  metrics.counter("mqtt_connection_errors_total", "Refused or failed MQTT connections, by reason");
  const intake = new MqttIntake({
    counters: ingest,
    registry,
    capacity: writer,
    maxPayload: config.mqtt.maxPayload,
  });
  cleanups.push(() => intake.close());
  try {
    if (config.mqtt.enabled && config.mqtt.url) {
      const { url, username, password, clientId, ackConnections } = config.mqtt;
      external = await ExternalIngress.start({
        ...config.mqtt,
        url,
        intake,
        acks: new AckPublisher({
          url,
          username,
          password,
          clientId: `${clientId}-acks`,
          connections: ackConnections,
          logger: log.mqtt,
          metrics,
        }),
        logger: log.mqtt,
        metrics,
      });
      cleanups.push(() => external!.close());
      // Until the subscription exists, a fresh broker session would drop published readings:
      // do not report the gateway as listening before it (bounded; it keeps trying after).
      let timer: ReturnType<typeof setTimeout> | undefined;
      const subscribed = await Promise.race([
        external.ready().then(() => true),
        new Promise<false>((resolve) => timer = setTimeout(() => resolve(false), 10_000)),
      ]);
      clearTimeout(timer);
      if (!subscribed) log.mqtt.warn("external MQTT broker not reachable yet; retrying", {});
    } else if (config.mqtt.enabled) {
      broker = await EmbeddedBroker.start({
        host: config.mqtt.host,
        port: config.mqtt.port,
        tls: config.mqtt.tls && {
          port: config.mqtt.tls.port,
          cert: await Deno.readTextFile(config.mqtt.tls.certPath),
          key: await Deno.readTextFile(config.mqtt.tls.keyPath),
          ca: config.mqtt.tls.caPath && await Deno.readTextFile(config.mqtt.tls.caPath),
        },
        registry,
        intake,
        clock,
        logger: log.mqtt,
        metrics,
        securityLog: security,
        limits: config.mqtt.limits,
      }).catch((error) => {
        throw (error as { code?: string }).code === "EADDRINUSE"
          ? new Error(
            `MQTT_PORT ${config.mqtt.port} (or MQTT_TLS_PORT) is already in use: set MQTT_PORT to a free port, or MQTT_ENABLED=false`,
            { cause: error },
          )
          : error;
      });
      cleanups.push(() => broker!.close());
    }
  } catch (error) {
    await unwind();
    throw error;
  }
  // Batch jobs go through the registry and the writer like single readings: started once both
  // exist, closed (its readings in flight settled, unfinished jobs requeued) before the writer.
  const batches = new BatchRunner({
    store,
    registry,
    writer,
    writerQueueMax: config.writer.queueMax,
    bus,
    clock,
    logger: log.batch,
    metrics,
    instanceId: config.instanceId,
    concurrency: config.batch.concurrency,
    leaseMs: config.batch.leaseMs,
    maxAttempts: config.batch.maxAttempts,
    retryBackoffMs: config.batch.retryBackoffMs,
    patienceMs: config.batch.patienceMs,
    retentionMs: config.batch.retentionMs,
  });
  cleanups.push(() => batches.close());
  metrics.gauge(
    "mqtt_sessions",
    "Connected device sessions (embedded broker)",
    () => broker?.connections ?? 0,
  );
  if (config.mqtt.enabled) {
    metrics.gauge(
      "mqtt_broker_connected",
      "1 while the gateway's MQTT broker is up: the embedded one listening, or the link to MQTT_URL",
      () => (external ? external.connected : broker !== undefined) ? 1 : 0,
    );
  }
  declareGatewayMetrics(metrics, {
    registry,
    writer,
    hub,
    bus,
    store,
    devices,
    redis: !(bus instanceof LocalBus),
  });

  const app = createApp({
    store,
    cache: reads,
    owners,
    registry,
    users,
    devices,
    tokens,
    hub,
    clock,
    logger: log.http,
    bodyLimit: config.httpBodyLimit,
    importBodyLimit: config.importBodyLimit,
    bodyBudget: config.http.bodyBudget,
    registerPerMinute: config.registerRateLimit,
    loginPerMinute: config.loginRateLimit,
    writerStalled: () => writer.stalled,
    mqttConnected: () => external === undefined || external.connected,
    policyJobs: () => policyJobs,
    // LocalBus never disconnects: only a network bus is worth reporting.
    busConnected: () => bus instanceof LocalBus ? undefined : bus.connected,
    metrics,
    metricsToken: config.metricsToken,
    httpMetrics: observe,
    counters: ingest,
    // Batch readings count as submitted when their job is stored; those refused at submission
    // (schema, rights) are validation errors then.
    runner: {
      submitted: (job) => {
        ingest.submitted("batch", job.total_submitted);
        for (const e of job.errors) ingest.rejected("batch", e.code);
        batches.submitted(job);
      },
      awaitFinished: (job, ms) => batches.awaitFinished(job, ms),
      wake: () => batches.wake(),
    },
    batch: config.batch,
    // Answered well within the request timeout (HTTP_REQUEST_TIMEOUT closes the connection).
    syncWaitMs: Math.max(1_000, Math.min(30_000, config.http.requestTimeoutMs - 5_000)),
  });

  // TimescaleDB runs its policies in the background: a failing refresh leaves hourly stats of
  // older hours stale, a failing retention lets the disk fill. Nobody would notice: say so.
  let policyJobs: "ok" | "failing" | undefined;
  if (store instanceof PostgresStore && store.timescale) {
    const checkJobs = async () => {
      try {
        const failing = await store.failingPolicyJobs();
        policyJobs = failing.length === 0 ? "ok" : "failing";
        for (const job of failing) {
          log.db.warn("TimescaleDB policy job keeps failing", { ...job });
        }
      } catch (error) {
        log.db.debug("TimescaleDB job check failed", { error });
      }
    };
    await checkJobs();
    const jobTimer = setInterval(checkJobs, POLICY_CHECK_MS);
    cleanups.push(() => clearInterval(jobTimer));
  }

  const sweepEvery = Math.max(1_000, Math.min(60_000, config.actors.idleTtlMs / 2));
  const sweeper = setInterval(() => registry.sweep(), sweepEvery);
  cleanups.push(() => clearInterval(sweeper));
  // Plain PostgreSQL has no retention policy of its own (TimescaleDB drops chunks itself).
  if (timescale === false && "deleteOlderThan" in store) {
    const retention = new RetentionWorker({
      store: store as unknown as Prunable,
      clock,
      logger: log.db,
      keepMs: config.retention.keepMs,
      everyMs: config.retention.checkEveryMs,
    });
    cleanups.push(() => retention.close());
  }

  // Stop intake first (broker, ingress), then write what was accepted, then close the store.
  let closed: Promise<void> | undefined;
  const close = () => closed ??= unwind();
  return {
    app,
    registry,
    store,
    writer,
    hub,
    users,
    devices,
    tokens,
    metrics,
    broker,
    external,
    batches,
    close,
    [Symbol.asyncDispose]: close,
  };
}
