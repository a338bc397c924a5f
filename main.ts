// Composition root: read config, pick adapters, serve, shut down cleanly.
import { openBus } from "./bus/open_bus.ts";
import { openRedis, type RedisClient } from "./bus/redis_client.ts";
import { ClusterRateLimiter } from "./actors/cluster_rate.ts";
import type { Cache } from "./cache/cache.ts";
import { RedisCache } from "./cache/redis_cache.ts";
import { systemClock } from "./core/clock.ts";
import { loadConfig } from "./core/config.ts";
import { ConfigError } from "./core/errors.ts";
import { jsonLogger } from "./core/logger.ts";
import { loadOrCreateSecrets, secretsPath } from "./db/secrets_file.ts";
import { describeStore, storeSpecOf } from "./db/open_store.ts";
import { createGateway } from "./server/gateway.ts";
import { HttpListener } from "./server/http_listener.ts";

async function main(): Promise<void> {
  let config;
  try {
    config = loadConfig(Deno.env.toObject(), {
      hostname: Deno.hostname().replace(/[^A-Za-z0-9._-]/g, "-").slice(0, 64),
    });
  } catch (error) {
    if (!(error instanceof ConfigError)) throw error;
    console.error(error.message);
    Deno.exit(2);
  }
  const logger = jsonLogger(config.logLevel, {
    base: { instance: config.instanceId },
    levels: config.logLevels,
  });

  // Embedded mode generates its secrets once; with a database they come from the environment.
  const embedded = config.database
    ? undefined
    : await loadOrCreateSecrets(secretsPath(config.kvPath));
  const jwtSecret = config.jwtSecret ?? embedded!.jwtSecret;
  const kek = config.kek ?? embedded!.kek;

  const storeSpec = storeSpecOf(config);
  // With Redis: the bus, the shared read cache and the cluster-wide rate limit; without it the
  // in-process bus and cache, and each instance's own buckets.
  const bus = await openBus(config, logger.child("bus"));
  let redis: RedisClient | undefined;
  let cache: Cache | undefined;
  let rate: ClusterRateLimiter | undefined;
  if (config.redis) {
    redis = openRedis(config.redis.spec, { connectionName: `gtx-cmd-${config.instanceId}` });
    // Outages are reported by the bus; commands of the cache and the limiter fail fast meanwhile.
    const cacheLog = logger.child("cache");
    redis.on("error", (error) => cacheLog.debug("redis command connection", { error }));
    cache = new RedisCache(redis, { prefix: `${config.redis.prefix}cache:` });
    rate = new ClusterRateLimiter({
      redis,
      prefix: config.redis.prefix,
      bucket: config.bucket,
      clock: systemClock,
      logger: logger.child("actors"),
      intervalMs: config.rateSyncMs,
    });
  }
  const closeRedis = async () => {
    await rate?.close();
    await bus.close();
    redis?.disconnect();
  };
  let gateway;
  try {
    gateway = await createGateway({
      config,
      storeSpec,
      bus,
      clock: systemClock,
      logger,
      jwtSecret,
      kek,
      cache,
      rate,
    });
    rate?.start();
  } catch (error) {
    await closeRedis();
    logger.error("gateway failed to start", { error });
    console.error(`Gateway failed to start: ${(error as Error).message}`);
    Deno.exit(1);
  }
  const mqtt = config.mqtt.url
    ? `external:${config.mqtt.url.replace(/\/\/[^@/]*@/, "//***@")}`
    : gateway.broker
    ? `embedded:mqtt://${config.mqtt.host}:${gateway.broker.ports.mqtt}` +
      (gateway.broker.ports.mqtts
        ? ` mqtts://${config.mqtt.host}:${gateway.broker.ports.mqtts}`
        : "")
    : "off";

  let server: HttpListener;
  try {
    server = HttpListener.start({
      hostname: config.host,
      port: config.port,
      handler: gateway.app.fetch,
      maxConnections: config.http.maxConnections,
      maxConnectionsPerAddress: config.http.maxConnectionsPerAddress,
      headerTimeoutMs: config.http.headerTimeoutMs,
      idleTimeoutMs: config.http.idleTimeoutMs,
      requestTimeoutMs: config.http.requestTimeoutMs,
      logger: logger.child("http"),
      clock: systemClock,
      metrics: gateway.metrics,
    });
  } catch (error) {
    console.error(
      `Gateway failed to start: HTTP ${config.host}:${config.port}: ${(error as Error).message}`,
    );
    await gateway.close();
    await closeRedis();
    Deno.exit(1);
  }
  // Only once everything listens: a start that fails must not have shown a password nobody keeps.
  await gateway.users.bootstrapAdmin(config.adminEmail, config.adminPassword, logger.child("auth"));
  logger.info("gateway listening", {
    url: `http://${server.addr.hostname}:${server.addr.port}`,
    store: describeStore(storeSpec),
    bus: config.redis ? `redis:${config.redis.spec.mode}` : "in-process",
    mqtt,
  });

  let stopping = false;
  const stop = async (signal: string) => {
    if (stopping) return;
    stopping = true;
    logger.info("shutting down", { signal, deadline_ms: config.shutdownTimeoutMs });
    // Past the deadline the process exits anyway (and says so): an orchestrator's SIGKILL would
    // come next, without the log line.
    const deadline = setTimeout(() => {
      logger.error("shutdown deadline passed; exiting with work unfinished", {
        deadline_ms: config.shutdownTimeoutMs,
      });
      Deno.exit(1);
    }, config.shutdownTimeoutMs);
    await server.close();
    await gateway.close();
    await closeRedis();
    clearTimeout(deadline);
    logger.info("stopped");
    Deno.exit(0);
  };
  Deno.addSignalListener("SIGINT", () => stop("SIGINT"));
  Deno.addSignalListener("SIGTERM", () => stop("SIGTERM"));
}

if (import.meta.main) await main();
