import { z } from "zod";
import { ConfigError } from "./errors.ts";
import { parseDuration } from "./duration.ts";
import { looksRandom } from "./secret_strength.ts";
import { passwordSchema } from "./user.ts";
import { LOG_COMPONENTS, type LogLevel } from "./logger.ts";

const duration = (fallback: string) =>
  z.string().default(fallback).transform((text, ctx) => {
    const ms = parseDuration(text);
    if (ms === undefined) {
      ctx.addIssue({
        code: "custom",
        message: `"${text}" is not a duration like 30s, 15m, 24h, 7d`,
      });
      return z.NEVER;
    }
    return ms;
  });

const int = (fallback: number, min = 1, max = Number.MAX_SAFE_INTEGER) =>
  z.coerce.number().int().min(min).max(max).default(fallback);

const LOG_LEVELS = ["debug", "info", "warn", "error"] as const;

/**
 * Bytes one reading of a batch may take in the body: the largest legal reading (64-character
 * meter and key ids, a 42-character amount, a 40-character timestamp, a 256-character signature,
 * field names and punctuation) is under 600; whitespace between readings gets the rest.
 */
const BATCH_READING_BYTES = 640;

/** Every environment variable the gateway reads, with its default. */
const envSchema = z.object({
  HOST: z.string().min(1).default("0.0.0.0"),
  PORT: int(8080, 0, 65535),
  DENO_KV_PATH: z.string().min(1).default("./data/gateway.kv"),
  ADMIN_EMAIL: z.string().email().default("admin@gridtokenx.local"),
  ADMIN_PASSWORD: passwordSchema.optional(),
  JWT_SECRET: z.string().min(32, "must be at least 32 characters")
    .refine(looksRandom, "must be random: it is mostly a repeated pattern or too few characters")
    .optional(),
  JWT_TTL: duration("1h"),
  DEVICE_KEY_ENCRYPTION_KEY: z.string().regex(/^[0-9a-fA-F]{64}$/, "must be 64 hex characters")
    .refine(
      (hex) => looksRandom(hexBytes(hex)),
      "must be random: its bytes are mostly a repeated pattern (generate one with openssl rand -hex 32)",
    )
    .optional(),
  LOGIN_BACKOFF_AFTER: int(5, 1, 1000),
  LOGIN_BACKOFF_MAX: duration("15m"),
  DEVICE_REGISTER_RATE_LIMIT: int(5),
  LOGIN_RATE_LIMIT: int(20),
  DEVICE_KEY_ROTATION_DAYS: int(90),
  DEVICE_KEY_ROTATION_GRACE: duration("24h"),
  GATEWAY_INSTANCE_ID: z.string().regex(/^[A-Za-z0-9._-]{1,64}$/).optional(),
  LOG_LEVEL: z.enum(LOG_LEVELS).default("info"),
  METRICS_ENABLED: z.enum(["true", "false"]).default("true"),
  SHUTDOWN_TIMEOUT: duration("30s").pipe(z.number().min(1_000, "must be at least 1s")),
  METRICS_TOKEN: z.string().min(16, "must be at least 16 characters").regex(
    /^[\x21-\x7e]+$/,
    "must be printable ASCII without spaces",
  ).optional(),
  // Levels per component over LOG_LEVEL: `mqtt=debug,http=warn`.
  LOG_LEVELS: z.string().default("").transform((text, ctx) => {
    const levels = parseLogLevels(text);
    if (typeof levels === "string") {
      ctx.addIssue({ code: "custom", message: levels });
      return z.NEVER;
    }
    return levels;
  }),
  // kWh are kept as integer ten-thousandths: beyond 1e9 they would not stay exact in a double.
  KWH_MAX: z.coerce.number().positive().max(1e9).default(100),
  READING_MAX_AGE: duration("7d"),
  READING_MAX_FUTURE: duration("5m"),
  DEDUPE_WINDOW: duration("15m"),
  METER_RATE_BURST: int(200),
  METER_RATE_PER_MINUTE: z.coerce.number().positive().default(4),
  // How often the per-meter buckets are reconciled across instances through Redis.
  RATE_SYNC_INTERVAL: duration("250ms").pipe(z.number().min(10, "must be at least 10ms")),
  ACTOR_IDLE_TTL: duration("30m"),
  ACTOR_MAX: int(200_000),
  ACTOR_MAILBOX_MAX: int(256),
  RECENT_READINGS: int(8, 1, 1024),
  WRITER_BATCH_MAX: int(1000, 1, 100_000),
  WRITER_FLUSH_MS: int(5, 0, 10_000),
  WRITER_QUEUE_MAX: int(20_000),
  WRITER_CONCURRENCY: int(1, 1, 64),
  // Batch ingestion (services/batch_runner.ts).
  BATCH_MAX_SIZE: int(1000, 1, 10_000),
  BATCH_SYNC_MAX: int(100, 1, 10_000),
  BATCH_WORKER_CONCURRENCY: int(2, 1, 64),
  BATCH_MAX_OPEN_PER_USER: int(20, 1, 100_000),
  BATCH_LEASE: duration("15s").pipe(z.number().min(300, "must be at least 300ms")),
  BATCH_MAX_ATTEMPTS: int(3, 1, 100),
  BATCH_RETRY_BACKOFF: duration("5s").pipe(z.number().min(10, "must be at least 10ms")),
  BATCH_ATTEMPT_PATIENCE: duration("30s"),
  BATCH_RETENTION: duration("7d").pipe(z.number().min(60_000, "must be at least 1m")),
  HTTP_BODY_LIMIT: int(64 * 1024, 256),
  HTTP_IMPORT_BODY_LIMIT: int(8 * 1024 * 1024, 1024),
  HTTP_BODY_BUDGET: int(64 * 1024 * 1024, 1024),
  HTTP_MAX_CONNECTIONS: int(512, 1, 1_000_000),
  // A small share of the listener: a few hosts holding their share each must not fill it.
  HTTP_MAX_CONNECTIONS_PER_ADDRESS: int(32, 1, 1_000_000),
  // Zero would close every connection before its first request.
  HTTP_HEADER_TIMEOUT: duration("10s").pipe(z.number().min(100, "must be at least 100ms")),
  HTTP_IDLE_TIMEOUT: duration("60s").pipe(z.number().min(100, "must be at least 100ms")),
  HTTP_REQUEST_TIMEOUT: duration("60s").pipe(z.number().min(100, "must be at least 100ms")),
  WS_SEND_BUFFER_MAX: int(1024 * 1024, 1024),
  WS_MAX_CONNECTIONS_PER_USER: int(16, 1, 100_000),
  WS_RESUME_MAX: int(1000, 1, 100_000),
  // 0 turns the check off.
  WS_POSITION_CHECK_INTERVAL: duration("10s"),
  DEVICE_RECHECK_INTERVAL: duration("10s").pipe(z.number().min(100, "must be at least 100ms")),
  // Read cache (cache/read_cache.ts); a TTL of 0 turns that read's caching off.
  CACHE_USER_STATS_TTL: duration("300s").pipe(z.number().max(86_400_000, "must be at most 1d")),
  CACHE_RECENT_READINGS_TTL: duration("60s").pipe(z.number().max(86_400_000, "must be at most 1d")),
  CACHE_HOURLY_STATS_TTL: duration("1h").pipe(z.number().max(86_400_000, "must be at most 1d")),
  CACHE_MAX_ENTRIES: int(10_000, 1, 10_000_000),
  DATABASE_URL: z.string().regex(/^postgres(ql)?:\/\/.+/, "must be a postgres:// URL").optional(),
  DATABASE_POOL_MAX: int(10, 1, 1000),
  MIGRATE_ON_START: z.enum(["true", "false"]).default("true"),
  TIMESCALE_ENABLED: z.enum(["true", "false"]).default("true"),
  TIMESCALE_CHUNK_INTERVAL: duration("1d").pipe(z.number().min(60_000, "must be at least 1m")),
  TIMESCALE_COMPRESS_AFTER: duration("30d").pipe(z.number().min(60_000, "must be at least 1m")),
  READINGS_RETENTION: duration("365d").pipe(z.number().min(60_000, "must be at least 1m")),
  RETENTION_CHECK_INTERVAL: duration("1h"),
  MQTT_ENABLED: z.enum(["true", "false"]).default("true"),
  MQTT_HOST: z.string().min(1).default("127.0.0.1"),
  MQTT_PORT: int(1883, 0, 65535),
  MQTT_TLS_PORT: int(8883, 0, 65535).optional(),
  MQTT_TLS_CERT: z.string().min(1).optional(),
  MQTT_TLS_KEY: z.string().min(1).optional(),
  MQTT_TLS_CA: z.string().min(1).optional(),
  MQTT_URL: z.string().regex(/^(mqtts?|tcp|ssl|wss?):\/\/.+/, "must be an mqtt:// or mqtts:// URL")
    .optional(),
  MQTT_USERNAME: z.string().optional(),
  MQTT_PASSWORD: z.string().optional(),
  MQTT_CLIENT_ID: z.string().regex(/^[A-Za-z0-9._:-]{1,64}$/).optional(),
  MQTT_SHARED_GROUP: z.string().regex(/^[A-Za-z0-9._-]{1,64}$/).optional(),
  MQTT_SESSION_EXPIRY: duration("1d"),
  MQTT_INFLIGHT_MAX: int(5000, 1, 65535),
  MQTT_ACK_CONNECTIONS: int(4, 1, 64),
  MQTT_MAX_PAYLOAD: int(4096, 64, 1024 * 1024),
  MQTT_MAX_CONNECTIONS: int(10_000),
  MQTT_MAX_CONNECTIONS_PER_ADDRESS: int(64),
  MQTT_CONNECT_TIMEOUT: duration("5s"),
  MQTT_SESSIONS_PER_METER: int(4, 1, 1000),
  MQTT_SESSION_QUEUE_MAX: int(1000),
  MQTT_CONNECT_MAX_AGE: duration("60s"),
  MQTT_CONNECT_MAX_SKEW: duration("30s"),
  MQTT_JUNK_LIMIT: int(20),
  MQTT_JUNK_WINDOW: duration("1m"),
  MQTT_JUNK_BACKOFF: duration("5m"),
  // Who tells an external broker about revocations (mqtt/broker_admin.ts).
  MQTT_BROKER_ADMIN: z.enum(["none", "mosquitto-dynsec", "emqx"]).default("none"),
  MQTT_ADMIN_USERNAME: z.string().min(1).optional(),
  MQTT_ADMIN_PASSWORD: z.string().min(1).optional(),
  EMQX_API_URL: z.string().regex(/^https?:\/\/.+/, "must be an http:// or https:// URL").optional(),
  EMQX_API_KEY: z.string().min(1).optional(),
  EMQX_API_SECRET: z.string().min(1).optional(),
  REDIS_URL: z.string().refine(isRedisUrl, "must be a redis:// or rediss:// URL (optional /<db>)")
    .optional(),
  REDIS_CLUSTER_NODES: z.string().transform((text, ctx) => {
    const nodes = parseRedisNodes(text);
    if (nodes === null) {
      ctx.addIssue({ code: "custom", message: "must be a comma-separated list of host:port" });
      return z.NEVER;
    }
    return nodes;
  }).optional(),
  REDIS_USERNAME: z.string().min(1).optional(),
  REDIS_PASSWORD: z.string().min(1).optional(),
  REDIS_TLS: z.enum(["true", "false"]).default("false"),
  REDIS_TLS_CA_PATH: z.string().min(1).optional(),
  // Braces would be a hash tag: every channel of a cluster in one slot, on one node.
  REDIS_PREFIX: z.string().regex(
    /^[A-Za-z0-9._:-]{0,64}$/,
    "must be at most 64 characters of A-Z a-z 0-9 . _ : -",
  ).default("gtx:"),
});

/** Limits of the embedded broker against hostile or broken clients, from the environment. */
export interface MqttLimits {
  /** Open connections per listener. */
  maxConnections: number;
  /** Connections from one address that have not authenticated yet, per listener. */
  maxConnectionsPerAddress: number;
  /** From accept until CONNECT must have been authenticated. */
  connectTimeoutMs: number;
  /** Sessions (live, or persistent and offline) per meter. */
  sessionsPerMeter: number;
  /** Messages queued per persistent session. */
  sessionQueueMax: number;
  /** How long an offline persistent session is kept. */
  sessionExpiryMs: number;
  /** Oldest CONNECT password timestamp accepted. */
  connectMaxAgeMs: number;
  /** How far in the future a CONNECT password timestamp may be (device clock skew). */
  connectMaxSkewMs: number;
  /** Junk messages within `junkWindowMs` that disconnect a device for `junkBanMs`. */
  junkLimit: number;
  junkWindowMs: number;
  junkBanMs: number;
}

/** TLS towards Redis: the server's certificate is checked against `caPath`, else the system CAs. */
export interface RedisTls {
  caPath?: string;
}

/**
 * Where Redis is: one server by URL (`redis://[user:password@]host[:port][/db]`, `rediss://` for
 * TLS), or a Redis Cluster by its seed nodes (every node shares the credentials and TLS).
 * `username`/`password` are given only when the URL carries none.
 */
export type RedisSpec =
  | { mode: "single"; url: string; username?: string; password?: string; tls?: RedisTls }
  | {
    mode: "cluster";
    nodes: { host: string; port: number }[];
    username?: string;
    password?: string;
    tls?: RedisTls;
  };

/** Redis for the bus (and later the cache); absent means in-process adapters. */
export interface RedisConfig {
  spec: RedisSpec;
  /** Prepended to every channel (and key): `gtx:` by default. */
  prefix: string;
}

/** Validated configuration of one gateway process. */
export interface Config {
  host: string;
  port: number;
  kvPath: string;
  adminEmail: string;
  adminPassword?: string;
  /** Bearer token `/metrics` requires; absent: open to whoever reaches the port. */
  metricsToken?: string;
  /**
   * The hot-path instrumentation (histograms, per-code counters, signature and HTTP timings).
   * Off (benchmarks only), `/metrics` keeps the scrape-time figures and `gateway_readings_total`.
   */
  metricsEnabled: boolean;
  /** SIGTERM/SIGINT: longest wait for intake to stop and the writer to flush before exit 1. */
  shutdownTimeoutMs: number;
  jwtSecret?: string;
  jwtTtlMs: number;
  /** 32-byte key-encryption key from hex, when given. */
  kek?: Uint8Array;
  registerRateLimit: number;
  loginRateLimit: number;
  /** Per-account login back-off: `free` failed attempts, then waits doubling up to `maxMs`. */
  loginBackoff: { free: number; maxMs: number };
  keyRotationMs: number;
  keyGraceMs: number;
  instanceId: string;
  logLevel: typeof LOG_LEVELS[number];
  /** Levels of components over `logLevel` (`LOG_LEVELS`). */
  logLevels: Partial<Record<string, LogLevel>>;
  rules: { kwhMax: number; maxAgeMs: number; maxFutureMs: number; dedupeWindowMs: number };
  bucket: { burst: number; refillPerMs: number };
  /** Milliseconds between rounds that reconcile the buckets across instances (with Redis). */
  rateSyncMs: number;
  actors: { idleTtlMs: number; max: number; mailboxMax: number; recent: number };
  writer: { batchMax: number; flushMs: number; queueMax: number; concurrency: number };
  /** Read cache TTLs (0: that read is not cached) and the in-process LRU's size. */
  cache: {
    userStatsTtlMs: number;
    recentReadingsTtlMs: number;
    hourlyStatsTtlMs: number;
    maxEntries: number;
  };
  /** PostgreSQL/TimescaleDB; absent means the embedded Deno KV store. */
  database?: {
    url: string;
    poolMax: number;
    migrateOnStart: boolean;
    timescale: boolean;
    chunkIntervalMs: number;
    compressAfterMs: number;
  };
  retention: { keepMs: number; checkEveryMs: number };
  mqtt: {
    enabled: boolean;
    host: string;
    port: number;
    tls?: { port: number; certPath: string; keyPath: string; caPath?: string };
    /** External broker; when set, no embedded broker runs. */
    url?: string;
    username?: string;
    password?: string;
    clientId: string;
    sharedGroup?: string;
    sessionExpirySeconds: number;
    inflightMax: number;
    /** Connections that publish acks (external broker). */
    ackConnections: number;
    maxPayload: number;
    /** Embedded broker: limits against hostile clients. */
    limits: MqttLimits;
  };
  httpBodyLimit: number;
  importBodyLimit: number;
  /** Batch ingestion: limits, the runner's lease and retries (services/batch_runner.ts). */
  batch: {
    /** Readings per batch at most. */
    maxSize: number;
    /** Batches up to this size may be submitted with `?mode=sync`. */
    syncMax: number;
    /** Queued and running jobs one account may have. */
    maxOpenPerUser: number;
    /** Jobs one instance runs at once. */
    concurrency: number;
    leaseMs: number;
    maxAttempts: number;
    /** The first wait after a transient failure, doubled per attempt (with jitter). */
    retryBackoffMs: number;
    /** How long an attempt waits for a store answering `unavailable` before it ends. */
    patienceMs: number;
    /** Finished jobs are purged this long after they finished. */
    retentionMs: number;
    /** The batch route's body limit: room for `maxSize` readings of the largest legal size. */
    bodyLimit: number;
  };
  /** The HTTP listener's limits (see server/http_listener.ts). */
  http: {
    /** Bytes of request bodies being read at once, over all requests. */
    bodyBudget: number;
    maxConnections: number;
    maxConnectionsPerAddress: number;
    headerTimeoutMs: number;
    idleTimeoutMs: number;
    requestTimeoutMs: number;
  };
  wsSendBufferMax: number;
  /** WebSocket connections one account may hold at once. */
  wsMaxPerUser: number;
  /** Readings a resume replays per meter at most; a larger gap gets `resync_required`. */
  wsResumeMax: number;
  /** How often the hub compares followed meters' store positions with what it sent (0: never). */
  wsPositionCheckMs: number;
  /** While the bus is down, how often live actors re-check their devices in the store. */
  deviceRecheckMs: number;
  /** Who disconnects revoked devices at an external broker (MQTT_BROKER_ADMIN). */
  brokerAdmin: BrokerAdminConfig;
  /** REDIS_URL or REDIS_CLUSTER_NODES; absent means the in-process bus. */
  redis?: RedisConfig;
}

/** MQTT_BROKER_ADMIN and its companions; see mqtt/broker_admin.ts. */
export type BrokerAdminConfig =
  | { kind: "none" }
  /** A dynsec admin at MQTT_URL's broker; `clientId` is unique per instance. */
  | { kind: "mosquitto-dynsec"; url: string; username: string; password: string; clientId: string }
  | { kind: "emqx"; apiUrl: string; apiKey: string; apiSecret: string };

// What the storage settings are derived from: the gateway and `deno task migrate` read these
// through the same code (storageOf), so both set the database up alike.
const storageSchema = envSchema.pick({
  DATABASE_URL: true,
  DATABASE_POOL_MAX: true,
  MIGRATE_ON_START: true,
  TIMESCALE_ENABLED: true,
  TIMESCALE_CHUNK_INTERVAL: true,
  TIMESCALE_COMPRESS_AFTER: true,
  READINGS_RETENTION: true,
  RETENTION_CHECK_INTERVAL: true,
  READING_MAX_AGE: true,
});

/** The part of {@linkcode Config} that decides how the database is set up. */
export interface StorageConfig {
  database?: Config["database"];
  retention: Config["retention"];
  /** READING_MAX_AGE: the oldest reading the rules accept, so the latest a stat can change. */
  readingMaxAgeMs: number;
}

/** Reads and validates only the storage variables (for operator tasks that need no secrets). */
export function loadStorageConfig(env: Record<string, string | undefined>): StorageConfig {
  return storageOf(parseEnv(storageSchema, env));
}

function storageOf(e: z.output<typeof storageSchema>): StorageConfig {
  // A reading older than the retention would be stored, dropped at the next retention run, and
  // then accepted again as new.
  if (e.READING_MAX_AGE >= e.READINGS_RETENTION) {
    throw new ConfigError(
      "Invalid configuration:\n  READING_MAX_AGE: must be shorter than READINGS_RETENTION",
      ["READING_MAX_AGE", "READINGS_RETENTION"],
    );
  }
  return {
    database: e.DATABASE_URL
      ? {
        url: e.DATABASE_URL,
        poolMax: e.DATABASE_POOL_MAX,
        migrateOnStart: e.MIGRATE_ON_START === "true",
        timescale: e.TIMESCALE_ENABLED === "true",
        chunkIntervalMs: e.TIMESCALE_CHUNK_INTERVAL,
        compressAfterMs: e.TIMESCALE_COMPRESS_AFTER,
      }
      : undefined,
    retention: { keepMs: e.READINGS_RETENTION, checkEveryMs: e.RETENTION_CHECK_INTERVAL },
    readingMaxAgeMs: e.READING_MAX_AGE,
  };
}

function parseEnv<T extends z.ZodObject<z.ZodRawShape>>(
  schema: T,
  env: Record<string, string | undefined>,
): z.infer<T> {
  const cleaned = Object.fromEntries(
    Object.keys(schema.shape).map((k) => [k, env[k] === "" ? undefined : env[k]]),
  );
  const parsed = schema.safeParse(cleaned);
  if (!parsed.success) {
    const lines = parsed.error.issues.map((i) => `  ${String(i.path[0])}: ${i.message}`);
    const names = [...new Set(parsed.error.issues.map((i) => String(i.path[0])))];
    throw new ConfigError(`Invalid configuration:\n${lines.join("\n")}`, names);
  }
  return parsed.data;
}

/** Reads and validates the configuration; throws one ConfigError naming every bad variable. */
export function loadConfig(
  env: Record<string, string | undefined>,
  options: { hostname?: string } = {},
): Config {
  const e = parseEnv(envSchema, env);
  const storage = storageOf(e);
  const tlsHalf = (e.MQTT_TLS_CERT === undefined) !== (e.MQTT_TLS_KEY === undefined);
  if (tlsHalf) {
    throw new ConfigError(
      "Invalid configuration:\n  MQTT_TLS_CERT, MQTT_TLS_KEY: set both or neither",
      ["MQTT_TLS_CERT", "MQTT_TLS_KEY"],
    );
  }
  // A budget smaller than one allowed body would answer every such upload 503.
  if (e.HTTP_BODY_BUDGET < Math.max(e.HTTP_BODY_LIMIT, e.HTTP_IMPORT_BODY_LIMIT)) {
    throw new ConfigError(
      "Invalid configuration:\n  HTTP_BODY_BUDGET: must be at least HTTP_BODY_LIMIT and " +
        "HTTP_IMPORT_BODY_LIMIT",
      ["HTTP_BODY_BUDGET"],
    );
  }
  // Several instances share one database: they must share these secrets, so none is generated.
  if (e.DATABASE_URL) {
    const missing = (["JWT_SECRET", "DEVICE_KEY_ENCRYPTION_KEY"] as const).filter((k) => !e[k]);
    if (missing.length > 0) {
      throw new ConfigError(
        `Invalid configuration:\n${
          missing.map((k) => `  ${k}: required when DATABASE_URL is set`).join("\n")
        }`,
        [...missing],
      );
    }
  }
  // Sized for BATCH_MAX_SIZE readings (never below the general limit, never above the budget).
  const batchBodyLimit = Math.min(
    e.HTTP_BODY_BUDGET,
    Math.max(e.HTTP_BODY_LIMIT, e.BATCH_MAX_SIZE * BATCH_READING_BYTES),
  );
  const redis = redisOf(e);
  const instanceId = e.GATEWAY_INSTANCE_ID ?? options.hostname ??
    `gw-${crypto.randomUUID().slice(0, 8)}`;
  return {
    host: e.HOST,
    port: e.PORT,
    kvPath: e.DENO_KV_PATH,
    adminEmail: e.ADMIN_EMAIL.toLowerCase(),
    adminPassword: e.ADMIN_PASSWORD,
    metricsToken: e.METRICS_TOKEN,
    shutdownTimeoutMs: e.SHUTDOWN_TIMEOUT,
    metricsEnabled: e.METRICS_ENABLED === "true",
    jwtSecret: e.JWT_SECRET,
    jwtTtlMs: e.JWT_TTL,
    kek: e.DEVICE_KEY_ENCRYPTION_KEY ? hexBytes(e.DEVICE_KEY_ENCRYPTION_KEY) : undefined,
    registerRateLimit: e.DEVICE_REGISTER_RATE_LIMIT,
    loginRateLimit: e.LOGIN_RATE_LIMIT,
    loginBackoff: { free: e.LOGIN_BACKOFF_AFTER, maxMs: e.LOGIN_BACKOFF_MAX },
    keyRotationMs: e.DEVICE_KEY_ROTATION_DAYS * 86_400_000,
    keyGraceMs: e.DEVICE_KEY_ROTATION_GRACE,
    instanceId,
    logLevel: e.LOG_LEVEL,
    logLevels: e.LOG_LEVELS,
    rules: {
      kwhMax: e.KWH_MAX,
      maxAgeMs: e.READING_MAX_AGE,
      maxFutureMs: e.READING_MAX_FUTURE,
      dedupeWindowMs: e.DEDUPE_WINDOW,
    },
    bucket: { burst: e.METER_RATE_BURST, refillPerMs: e.METER_RATE_PER_MINUTE / 60_000 },
    rateSyncMs: e.RATE_SYNC_INTERVAL,
    actors: {
      idleTtlMs: e.ACTOR_IDLE_TTL,
      max: e.ACTOR_MAX,
      mailboxMax: e.ACTOR_MAILBOX_MAX,
      recent: e.RECENT_READINGS,
    },
    writer: {
      batchMax: e.WRITER_BATCH_MAX,
      flushMs: e.WRITER_FLUSH_MS,
      queueMax: e.WRITER_QUEUE_MAX,
      concurrency: e.WRITER_CONCURRENCY,
    },
    cache: {
      userStatsTtlMs: e.CACHE_USER_STATS_TTL,
      recentReadingsTtlMs: e.CACHE_RECENT_READINGS_TTL,
      hourlyStatsTtlMs: e.CACHE_HOURLY_STATS_TTL,
      maxEntries: e.CACHE_MAX_ENTRIES,
    },
    database: storage.database,
    retention: storage.retention,
    mqtt: {
      enabled: e.MQTT_ENABLED === "true",
      host: e.MQTT_HOST,
      port: e.MQTT_PORT,
      tls: e.MQTT_TLS_CERT && e.MQTT_TLS_KEY
        ? {
          port: e.MQTT_TLS_PORT ?? 8883,
          certPath: e.MQTT_TLS_CERT,
          keyPath: e.MQTT_TLS_KEY,
          caPath: e.MQTT_TLS_CA,
        }
        : undefined,
      url: e.MQTT_URL,
      username: e.MQTT_USERNAME,
      password: e.MQTT_PASSWORD,
      // Stable across restarts, so the broker keeps this instance's persistent session.
      clientId: e.MQTT_CLIENT_ID ?? `gridtokenx-gateway-${instanceId}`,
      sharedGroup: e.MQTT_SHARED_GROUP,
      sessionExpirySeconds: Math.floor(e.MQTT_SESSION_EXPIRY / 1000),
      inflightMax: e.MQTT_INFLIGHT_MAX,
      ackConnections: e.MQTT_ACK_CONNECTIONS,
      maxPayload: e.MQTT_MAX_PAYLOAD,
      limits: {
        maxConnections: e.MQTT_MAX_CONNECTIONS,
        maxConnectionsPerAddress: e.MQTT_MAX_CONNECTIONS_PER_ADDRESS,
        connectTimeoutMs: e.MQTT_CONNECT_TIMEOUT,
        sessionsPerMeter: e.MQTT_SESSIONS_PER_METER,
        sessionQueueMax: e.MQTT_SESSION_QUEUE_MAX,
        sessionExpiryMs: e.MQTT_SESSION_EXPIRY,
        connectMaxAgeMs: e.MQTT_CONNECT_MAX_AGE,
        connectMaxSkewMs: e.MQTT_CONNECT_MAX_SKEW,
        junkLimit: e.MQTT_JUNK_LIMIT,
        junkWindowMs: e.MQTT_JUNK_WINDOW,
        junkBanMs: e.MQTT_JUNK_BACKOFF,
      },
    },
    httpBodyLimit: e.HTTP_BODY_LIMIT,
    importBodyLimit: e.HTTP_IMPORT_BODY_LIMIT,
    batch: {
      maxSize: e.BATCH_MAX_SIZE,
      maxOpenPerUser: e.BATCH_MAX_OPEN_PER_USER,
      syncMax: Math.min(e.BATCH_SYNC_MAX, e.BATCH_MAX_SIZE),
      concurrency: e.BATCH_WORKER_CONCURRENCY,
      leaseMs: e.BATCH_LEASE,
      maxAttempts: e.BATCH_MAX_ATTEMPTS,
      retryBackoffMs: e.BATCH_RETRY_BACKOFF,
      patienceMs: e.BATCH_ATTEMPT_PATIENCE,
      retentionMs: e.BATCH_RETENTION,
      bodyLimit: batchBodyLimit,
    },
    http: {
      bodyBudget: e.HTTP_BODY_BUDGET,
      maxConnections: e.HTTP_MAX_CONNECTIONS,
      maxConnectionsPerAddress: e.HTTP_MAX_CONNECTIONS_PER_ADDRESS,
      headerTimeoutMs: e.HTTP_HEADER_TIMEOUT,
      idleTimeoutMs: e.HTTP_IDLE_TIMEOUT,
      requestTimeoutMs: e.HTTP_REQUEST_TIMEOUT,
    },
    wsSendBufferMax: e.WS_SEND_BUFFER_MAX,
    wsMaxPerUser: e.WS_MAX_CONNECTIONS_PER_USER,
    wsResumeMax: e.WS_RESUME_MAX,
    wsPositionCheckMs: e.WS_POSITION_CHECK_INTERVAL,
    deviceRecheckMs: e.DEVICE_RECHECK_INTERVAL,
    brokerAdmin: brokerAdminOf(e, e.MQTT_CLIENT_ID ?? `gridtokenx-gateway-${instanceId}`),
    redis,
  };
}

/** MQTT_BROKER_ADMIN with its companions; a missing one is a ConfigError naming it. */
function brokerAdminOf(e: z.output<typeof envSchema>, mqttClientId: string): BrokerAdminConfig {
  const required = (names: (keyof typeof e)[], why: string) => {
    const missing = names.filter((k) => e[k] === undefined);
    if (missing.length > 0) {
      throw new ConfigError(
        `Invalid configuration:\n${missing.map((k) => `  ${k}: ${why}`).join("\n")}`,
        missing,
      );
    }
  };
  switch (e.MQTT_BROKER_ADMIN) {
    case "none":
      return { kind: "none" };
    case "mosquitto-dynsec":
      required(
        ["MQTT_URL", "MQTT_ADMIN_USERNAME", "MQTT_ADMIN_PASSWORD"],
        "required when MQTT_BROKER_ADMIN is mosquitto-dynsec",
      );
      return {
        kind: "mosquitto-dynsec",
        url: e.MQTT_URL!,
        username: e.MQTT_ADMIN_USERNAME!,
        password: e.MQTT_ADMIN_PASSWORD!,
        clientId: `${mqttClientId}-admin`,
      };
    case "emqx":
      required(
        ["EMQX_API_URL", "EMQX_API_KEY", "EMQX_API_SECRET"],
        "required when MQTT_BROKER_ADMIN is emqx",
      );
      return {
        kind: "emqx",
        apiUrl: e.EMQX_API_URL!,
        apiKey: e.EMQX_API_KEY!,
        apiSecret: e.EMQX_API_SECRET!,
      };
  }
}

/**
 * REDIS_URL (one server) and REDIS_CLUSTER_NODES (a cluster) exclude each other. REDIS_USERNAME
 * and REDIS_PASSWORD serve the cluster, or a REDIS_URL without credentials of its own; TLS is
 * the `rediss://` scheme for a URL and REDIS_TLS=true for a cluster; REDIS_TLS_CA_PATH needs TLS.
 */
function redisOf(e: z.output<typeof envSchema>): RedisConfig | undefined {
  const fail = (variables: string[], message: string): never => {
    throw new ConfigError(
      `Invalid configuration:\n  ${variables.join(", ")}: ${message}`,
      variables,
    );
  };
  if (e.REDIS_URL !== undefined && e.REDIS_CLUSTER_NODES !== undefined) {
    fail(["REDIS_URL", "REDIS_CLUSTER_NODES"], "set one or the other (a server or a cluster)");
  }
  if (e.REDIS_URL === undefined && e.REDIS_CLUSTER_NODES === undefined) {
    const stray = ["REDIS_USERNAME", "REDIS_PASSWORD", "REDIS_TLS_CA_PATH"]
      .filter((k) => e[k as "REDIS_PASSWORD"] !== undefined);
    if (e.REDIS_TLS === "true") stray.push("REDIS_TLS");
    if (stray.length > 0) fail(stray, "set only with REDIS_URL or REDIS_CLUSTER_NODES");
    return undefined;
  }
  // Only what is set: a spec without undefined fields reads (and compares) cleanly.
  const credentials: { username?: string; password?: string } = {};
  if (e.REDIS_USERNAME !== undefined) credentials.username = e.REDIS_USERNAME;
  if (e.REDIS_PASSWORD !== undefined) credentials.password = e.REDIS_PASSWORD;
  let spec: RedisSpec;
  if (e.REDIS_URL !== undefined) {
    const url = new URL(e.REDIS_URL);
    if (
      (url.username !== "" || url.password !== "") && (credentials.username || credentials.password)
    ) {
      fail(
        ["REDIS_USERNAME", "REDIS_PASSWORD"].filter((k) => e[k as "REDIS_PASSWORD"] !== undefined),
        "REDIS_URL carries credentials already",
      );
    }
    const tls = url.protocol === "rediss:";
    if (e.REDIS_TLS === "true" && !tls) fail(["REDIS_TLS"], "use a rediss:// REDIS_URL for TLS");
    if (e.REDIS_TLS_CA_PATH !== undefined && !tls) {
      fail(["REDIS_TLS_CA_PATH"], "needs a rediss:// REDIS_URL");
    }
    spec = {
      mode: "single",
      url: e.REDIS_URL,
      ...credentials,
      ...(tls ? { tls: tlsOf(e.REDIS_TLS_CA_PATH) } : {}),
    };
  } else {
    const tls = e.REDIS_TLS === "true";
    if (e.REDIS_TLS_CA_PATH !== undefined && !tls) {
      fail(["REDIS_TLS_CA_PATH"], "needs REDIS_TLS=true");
    }
    spec = {
      mode: "cluster",
      nodes: e.REDIS_CLUSTER_NODES!,
      ...credentials,
      ...(tls ? { tls: tlsOf(e.REDIS_TLS_CA_PATH) } : {}),
    };
  }
  return { spec, prefix: e.REDIS_PREFIX };
}

function tlsOf(caPath: string | undefined): RedisTls {
  return caPath === undefined ? {} : { caPath };
}

function isRedisUrl(text: string): boolean {
  if (!/^rediss?:\/\/\S+$/.test(text)) return false;
  try {
    const url = new URL(text);
    return url.hostname !== "" && /^(\/(0|[1-9]\d{0,4})?)?$/.test(url.pathname) &&
      url.search === "";
  } catch {
    return false;
  }
}

/** `host:port,host:port` (IPv6 in brackets) → nodes; `null` when any entry is malformed. */
export function parseRedisNodes(text: string): { host: string; port: number }[] | null {
  const nodes: { host: string; port: number }[] = [];
  for (const entry of text.split(",")) {
    const match = /^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})$/.exec(entry.trim());
    if (!match) return null;
    const port = Number(match[2]);
    if (port < 1 || port > 65535) return null;
    nodes.push({ host: match[1].replace(/^\[|\]$/g, ""), port });
  }
  return nodes.length > 0 ? nodes : null;
}

/** Decodes hex into bytes. */
export function hexBytes(hex: string): Uint8Array {
  const out = new Uint8Array(hex.length / 2);
  for (let i = 0; i < out.length; i++) out[i] = parseInt(hex.slice(i * 2, i * 2 + 2), 16);
  return out;
}

/**
 * `component=level` pairs separated by commas (`mqtt=debug,http=warn`), components from
 * LOG_COMPONENTS (a sub-component such as `mqtt.acks` also works); a message when it is not.
 */
export function parseLogLevels(text: string): Partial<Record<string, LogLevel>> | string {
  const levels: Partial<Record<string, LogLevel>> = {};
  for (const part of text.split(",").map((p) => p.trim()).filter((p) => p !== "")) {
    const match = /^([a-z][a-z0-9_-]*(?:\.[a-z0-9_-]+)*)\s*=\s*([a-z]+)$/i.exec(part);
    if (!match) return `"${part}" is not component=level (like mqtt=debug,http=warn)`;
    const component = match[1].toLowerCase();
    const level = match[2].toLowerCase();
    if (!(LOG_COMPONENTS as readonly string[]).includes(component.split(".")[0])) {
      return `"${match[1]}" is not a component; one of ${LOG_COMPONENTS.join(", ")}`;
    }
    if (!(LOG_LEVELS as readonly string[]).includes(level)) {
      return `"${match[2]}" is not a level; one of ${LOG_LEVELS.join(", ")}`;
    }
    levels[component] = level as LogLevel;
  }
  return levels;
}
