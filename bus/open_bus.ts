import type { Config } from "../core/config.ts";
import type { Logger } from "../core/logger.ts";
import type { Bus } from "./bus.ts";
import { LocalBus } from "./local_bus.ts";
import { RedisBus, type RedisBusOptions } from "./redis_bus.ts";

/** Options of {@linkcode openBus}. */
export interface OpenBusOptions {
  /**
   * How long to wait for Redis at start-up. The bus is returned either way: until Redis
   * answers, events reach this instance's subscribers only and publishes reject. Default 5 s.
   */
  connectTimeoutMs?: number;
  /** Passed on to {@linkcode RedisBus}. */
  redis?: Omit<RedisBusOptions, "prefix" | "logger">;
}

/**
 * The bus the configuration asks for: {@linkcode LocalBus} without Redis, else a
 * {@linkcode RedisBus} on REDIS_URL or REDIS_CLUSTER_NODES with REDIS_PREFIX. Waits (bounded)
 * for the first connection, so that a healthy start publishes from its first event.
 */
export async function openBus(
  config: Pick<Config, "redis">,
  logger: Logger,
  options: OpenBusOptions = {},
): Promise<Bus> {
  if (!config.redis) {
    return new LocalBus({ onError: (error) => logger.error("bus handler failed", { error }) });
  }
  const bus = new RedisBus(config.redis.spec, {
    ...options.redis,
    prefix: config.redis.prefix,
    logger,
  });
  const connected = await whenConnected(bus, options.connectTimeoutMs ?? 5_000);
  if (!connected) {
    logger.warn("bus: Redis not reachable yet; events stay on this instance until it is", {
      mode: config.redis.spec.mode,
    });
  }
  return bus;
}

/** Resolves `true` once `bus.connected` is true, `false` when `timeoutMs` passed first. */
export function whenConnected(bus: Bus, timeoutMs: number): Promise<boolean> {
  if (bus.connected) return Promise.resolve(true);
  return new Promise((resolve) => {
    const timer = setTimeout(() => {
      remove();
      resolve(bus.connected);
    }, timeoutMs);
    const remove = bus.onConnectionChange((connected) => {
      if (!connected) return;
      clearTimeout(timer);
      remove();
      resolve(true);
    });
  });
}
