// One place that turns a RedisSpec into ioredis clients: the bus and the cache share it.
import { Cluster, Redis, type RedisOptions } from "ioredis";
import type { RedisSpec } from "../core/config.ts";

/** A connection to one Redis server or to a Redis Cluster. */
export type RedisClient = Redis | Cluster;

/** Options of {@linkcode openRedis}. */
export interface OpenRedisOptions {
  /** Shown by `CLIENT LIST`; a cluster's nodes prepend `ioredis-cluster(<role>):`. */
  connectionName?: string;
  /** Waits between reconnection attempts: doubling from `baseMs` up to `maxMs`, forever. */
  reconnect?: { baseMs?: number; maxMs?: number };
  /**
   * Commands issued while disconnected are rejected at once (default), or queued until the
   * connection is back (ioredis' offline queue: unbounded, so only for a client whose commands
   * are bounded by other means).
   */
  offlineQueue?: boolean;
  /** Cluster only: sharded pub/sub (`SSUBSCRIBE`) through one subscriber per master. */
  shardedSubscribers?: boolean;
  /** Single server only: re-issue subscriptions after a reconnect (ioredis' default: true). */
  autoResubscribe?: boolean;
  /** Connect only on `connect()` (default: at once). */
  lazyConnect?: boolean;
}

/** The waits of a reconnection: `baseMs·2^(attempt-1)` capped at `maxMs`, with ±20 % jitter. */
export function reconnectDelay(attempt: number, baseMs: number, maxMs: number): number {
  const wait = Math.min(maxMs, baseMs * 2 ** Math.min(Math.max(attempt - 1, 0), 20));
  return Math.max(1, Math.round(wait * (0.8 + 0.4 * Math.random())));
}

/**
 * Opens an ioredis client for `spec`: a `Redis` for a URL (`rediss://` is TLS, the URL's
 * password and `/<db>` apply), a `Cluster` for seed nodes. No key prefix is set: callers name
 * their keys and channels themselves. Reconnects forever with capped back-off; a failed
 * command is never re-sent by ioredis after a reconnect, so callers see the failure.
 */
export function openRedis(spec: RedisSpec, options: OpenRedisOptions = {}): RedisClient {
  const baseMs = options.reconnect?.baseMs ?? 100;
  const maxMs = options.reconnect?.maxMs ?? 5_000;
  const offlineQueue = options.offlineQueue ?? false;
  const tls = spec.tls
    ? { ca: spec.tls.caPath ? Deno.readTextFileSync(spec.tls.caPath) : undefined }
    : undefined;
  const common: RedisOptions = {
    connectionName: options.connectionName,
    username: spec.username,
    password: spec.password,
    tls,
    enableOfflineQueue: offlineQueue,
    // A command in flight when the connection drops fails instead of being sent again later.
    autoResendUnfulfilledCommands: false,
    maxRetriesPerRequest: offlineQueue ? 20 : 0,
    lazyConnect: options.lazyConnect ?? false,
  };
  if (spec.mode === "single") {
    return new Redis(spec.url, {
      ...common,
      autoResubscribe: options.autoResubscribe ?? true,
      retryStrategy: (attempt) => reconnectDelay(attempt, baseMs, maxMs),
    });
  }
  return new Cluster(spec.nodes, {
    redisOptions: common,
    enableOfflineQueue: offlineQueue,
    shardedSubscribers: options.shardedSubscribers ?? false,
    lazyConnect: options.lazyConnect ?? false,
    clusterRetryStrategy: (attempt) => reconnectDelay(attempt, baseMs, maxMs),
  });
}
