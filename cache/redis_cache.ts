import { createHash } from "node:crypto";
import type { Cluster, Redis } from "ioredis";
import { type Cache, type CacheFill, type CacheKey, type CacheLookup, checkTtl } from "./cache.ts";

/** Options of {@linkcode RedisCache}. */
export interface RedisCacheOptions {
  /** Prepended to every key (e.g. `"gtx:cache:"`); must not contain `{` or `}`. */
  prefix: string;
  /**
   * Lifetime of a group's generation key, refreshed by every invalidation and kept at least as
   * long as the group's longest entry. Expiry only costs misses. Default 1 day.
   */
  generationTtlMs?: number;
}

const DEFAULT_GENERATION_TTL_MS = 86_400_000;

// A group's keys: `<prefix>{<group>}:g` holds its generation (a random token), and
// `<prefix>{<group>}:v:<item>` holds `<generation>|<value>`. The hash tag puts every key of a
// group in one slot, so each script below touches one slot (Redis Cluster).

/** Reads generation and value; creates the generation (the caller's fresh token) if absent. */
const GET = script(`
local g = redis.call('GET', KEYS[1])
if not g then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return {ARGV[1], false}
end
local v = redis.call('GET', KEYS[2])
if v and string.sub(v, 1, #g + 1) == g .. '|' then
  return {g, string.sub(v, #g + 2)}
end
return {g, false}
`);

/** Sets the value only while the generation is unchanged; keeps the generation alive as long. */
const FILL = script(`
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[1] .. '|' .. ARGV[2], 'PX', ARGV[3])
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[3]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
end
return 1
`);

/**
 * Gives each group a new generation: every value filled before no longer matches it, and no
 * fill holding an older generation lands. KEYS are generation keys, ARGV their new tokens, then
 * the generation TTL.
 */
const INVALIDATE = script(`
local ttl = ARGV[#KEYS + 1]
for i, key in ipairs(KEYS) do
  redis.call('SET', key, ARGV[i], 'PX', ttl)
end
return #KEYS
`);

/**
 * The Redis adapter of the {@linkcode Cache} port, shared by every gateway instance: an
 * invalidation made by one is seen by all. Takes a connection that the caller opened and
 * closes; it should fail fast while Redis is down (`enableOfflineQueue: false`,
 * `commandTimeout`), since callers treat a cache error as a miss.
 *
 * Generations are random tokens rather than counters: a generation key that expires or is
 * evicted comes back as a new token, never as one that a pending fill still holds.
 * Outdated values are not deleted (their items are not known); they are never read again and
 * expire with their TTL.
 */
export class RedisCache implements Cache {
  #redis: Redis | Cluster;
  #prefix: string;
  #generationTtlMs: number;

  constructor(redis: Redis | Cluster, options: RedisCacheOptions) {
    if (/[{}]/.test(options.prefix)) {
      throw new TypeError(`The key prefix must not contain braces, got "${options.prefix}"`);
    }
    this.#redis = redis;
    this.#prefix = options.prefix;
    this.#generationTtlMs = options.generationTtlMs ?? DEFAULT_GENERATION_TTL_MS;
    checkTtl(this.#generationTtlMs);
  }

  async get(key: CacheKey): Promise<CacheLookup> {
    const [generation, value] = await this.#run(
      GET,
      [this.#generationKey(key.group), this.#valueKey(key)],
      [newToken(), this.#generationTtlMs],
    ) as [string, string | null];
    return { generation, value: value ?? undefined };
  }

  async fill(key: CacheKey, fill: CacheFill): Promise<boolean> {
    checkTtl(fill.ttlMs);
    const landed = await this.#run(
      FILL,
      [this.#generationKey(key.group), this.#valueKey(key)],
      [fill.generation, fill.value, fill.ttlMs, Math.max(this.#generationTtlMs, fill.ttlMs)],
    );
    return landed === 1;
  }

  async invalidate(groups: readonly string[]): Promise<void> {
    const unique = [...new Set(groups)];
    if (unique.length === 0) return;
    const keys = unique.map((group) => this.#generationKey(group));
    if (!this.#redis.isCluster) {
      // One script for the whole batch: one round trip, and atomic.
      await this.#run(INVALIDATE, keys, [...keys.map(newToken), this.#generationTtlMs]);
      return;
    }
    // A script may only touch one slot: one per group, all sent at once.
    await Promise.all(
      keys.map((key) => this.#run(INVALIDATE, [key], [newToken(), this.#generationTtlMs])),
    );
  }

  #generationKey(group: string): string {
    return `${this.#prefix}{${group}}:g`;
  }

  #valueKey(key: CacheKey): string {
    return `${this.#prefix}{${key.group}}:v:${key.item}`;
  }

  /** EVALSHA, loading the script with EVAL when the server does not have it (yet, or any more). */
  async #run(s: Script, keys: string[], args: (string | number)[]): Promise<unknown> {
    try {
      return await this.#redis.evalsha(s.sha, keys.length, ...keys, ...args);
    } catch (error) {
      if (!String((error as Error)?.message).startsWith("NOSCRIPT")) throw error;
      return await this.#redis.eval(s.lua, keys.length, ...keys, ...args);
    }
  }
}

interface Script {
  lua: string;
  sha: string;
}

function script(lua: string): Script {
  return { lua, sha: createHash("sha1").update(lua).digest("hex") };
}

function newToken(): string {
  return crypto.randomUUID();
}
