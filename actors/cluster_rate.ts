// The per-meter rate limit across instances (DESIGN §3 rule 5, §10). Each instance keeps deciding
// with its own token buckets, synchronously; this class reconciles them through Redis once per
// sync round, never per reading.
//
// Every round (RATE_SYNC_INTERVAL) it sends, for each meter with activity here since the last
// round, the net tokens this instance took, in one round trip: a Lua script subtracts them from
// the meter's shared bucket `<prefix>rate:<meter>` (tokens and time in a hash) and returns the
// shared level, which every instance's bucket is then lowered to (never raised). The shared level
// may go negative: a debt from over-admission that the meter repays before its next token, so
// the excess never accumulates.
//
// Tolerance, with N instances, burst B, refill r and W = 2·interval + round-trip time (an
// instance learns what another took at most one of its own rounds plus one of the other's
// later): over any span t from a full bucket the cluster admits at most
//   B + r·t + (N − 1)·min(B + r·W, what one other instance receives of the meter within W)
// readings. The (N − 1)·B case is a burst reaching every instance at once while the shared
// bucket is full; the excess is a transient: the debt is repaid, and a meter kept at its limit
// settles back at B + r·t (within (N − 1)·(1 + r·W)).
//
// Time: the script takes the instance's injected clock (tests control it; the local buckets use
// the same clock) and only ever moves a bucket's time forward, so clock skew between instances
// cannot mint tokens beyond r·skew once: a clock behind refills nothing until it catches up.
//
// Redis down (or a round failing): the local buckets decide alone — fail open per instance, so
// the tolerance becomes N·(B + r·t). The failure is counted and logged once; the round's tokens
// go back into the next round, so they are charged when Redis is back.
import type { Cluster, Redis } from "ioredis";
import { createHash } from "node:crypto";
import type { Clock } from "../core/clock.ts";
import { keySlot } from "../core/key_slot.ts";
import type { Logger } from "../core/logger.ts";
import type { BucketConfig } from "../core/token_bucket.ts";
import type { MeterActor } from "./meter_actor.ts";
import type { RateShare } from "./registry.ts";

/** Options of {@linkcode ClusterRateLimiter}. */
export interface ClusterRateOptions {
  /** A connected client, owned by the caller (the limiter never opens or closes one). */
  redis: Redis | Cluster;
  /** Prepended to every key, e.g. `"gtx:"`. */
  prefix: string;
  /** The same bucket parameters as the actors'. */
  bucket: BucketConfig;
  clock: Clock;
  logger: Logger;
  /** Milliseconds between sync rounds (RATE_SYNC_INTERVAL); default 250. */
  intervalMs?: number;
  /** Meters per script call at most (a call blocks Redis while it runs); default 500. */
  batchMax?: number;
}

/** Counters of {@linkcode ClusterRateLimiter}, for metrics and tests. */
export interface ClusterRateStats {
  /** Rounds sent to Redis (each one round trip, whatever the number of readings). */
  rounds: number;
  /** Script calls (EVALSHA, plus EVAL after a NOSCRIPT); one per round on one server. */
  calls: number;
  /** Meter buckets reconciled, over all rounds. */
  meters: number;
  /** Rounds that failed or were not sent because Redis was not connected. */
  failures: number;
}

interface Share {
  /** The latest actor of the meter that took a token (a passivated one may be replaced). */
  actor: MeterActor;
  /** Net tokens taken since the last round (negative when more went back). */
  taken: number;
}

/** Rounds a call may stay unanswered before the limiter counts Redis as down. */
const STALL_TICKS = 4;

// KEYS[i]: the shared bucket of meter i. ARGV: now (ms), burst, refill per ms, then the tokens
// taken per meter. Returns the levels as strings (a Lua number would be truncated to an integer).
const SCRIPT = `
local now = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local rate = tonumber(ARGV[3])
local levels = {}
for i, key in ipairs(KEYS) do
  local state = redis.call("HMGET", key, "tokens", "at")
  local tokens = tonumber(state[1]) or burst
  local at = tonumber(state[2]) or now
  if now > at then
    tokens = math.min(burst, tokens + (now - at) * rate)
    at = now
  end
  tokens = math.min(burst, tokens - tonumber(ARGV[3 + i]))
  redis.call("HSET", key, "tokens", tostring(tokens), "at", string.format("%d", at))
  -- A missing bucket is a full one: it may go once it would have refilled.
  redis.call("PEXPIRE", key, math.ceil((burst - tokens) / rate) + 1000)
  levels[i] = tostring(tokens)
end
return levels
`;
const SCRIPT_SHA = createHash("sha1").update(SCRIPT).digest("hex");

/**
 * Keeps one meter's rate limit across gateway instances within a stated tolerance (see the top
 * of this file), with one Redis round trip per sync round and nothing on the actors' hot path but
 * a counter.
 */
export class ClusterRateLimiter implements RateShare, AsyncDisposable {
  readonly stats: ClusterRateStats = { rounds: 0, calls: 0, meters: 0, failures: 0 };
  #o: ClusterRateOptions;
  #intervalMs: number;
  #batchMax: number;
  #keyPrefix: string;
  #round = new Map<string, Share>();
  #timer: ReturnType<typeof setInterval> | undefined;
  #inFlight: Promise<void> | null = null;
  #ticksInFlight = 0;
  #down = false;
  #failedSince = 0;

  constructor(options: ClusterRateOptions) {
    const intervalMs = options.intervalMs ?? 250;
    const batchMax = options.batchMax ?? 500;
    if (!(intervalMs > 0)) throw new RangeError(`Sync interval must be positive: "${intervalMs}"`);
    if (!(batchMax >= 1)) throw new RangeError(`batchMax must be at least 1: "${batchMax}"`);
    if (!(options.bucket.refillPerMs > 0)) {
      throw new RangeError(`Refill must be positive: "${options.bucket.refillPerMs}"`);
    }
    this.#o = options;
    this.#intervalMs = intervalMs;
    this.#batchMax = batchMax;
    // ioredis prepends a client's keyPrefix itself; the slot is that of the whole key.
    this.#keyPrefix = (options.redis.options as { keyPrefix?: string }).keyPrefix ?? "";
  }

  /** Whether the last round failed (the local buckets decide alone). */
  get degraded(): boolean {
    return this.#down;
  }

  /** Meters with tokens not yet reported. */
  get pending(): number {
    return this.#round.size;
  }

  took(actor: MeterActor): void {
    this.#add(actor, 1);
  }

  returned(actor: MeterActor): void {
    this.#add(actor, -1);
  }

  #add(actor: MeterActor, tokens: number): void {
    const share = this.#round.get(actor.meterId);
    if (share) {
      share.taken += tokens;
      share.actor = actor;
    } else {
      this.#round.set(actor.meterId, { actor, taken: tokens });
    }
  }

  /** Starts the sync rounds. */
  start(): void {
    this.#timer ??= setInterval(() => this.#tick(), this.#intervalMs);
  }

  /** Stops the rounds and waits for the one in flight; unreported tokens are dropped. */
  async close(): Promise<void> {
    clearInterval(this.#timer);
    this.#timer = undefined;
    await this.#inFlight;
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }

  #tick(): void {
    if (this.#inFlight && ++this.#ticksInFlight === STALL_TICKS) {
      this.#failed(new Error(`A rate sync round is unanswered after ${STALL_TICKS} intervals`));
    }
    void this.sync();
  }

  /**
   * Runs one round now (the timer calls it; tests call it directly). While a round is in flight
   * no other starts: this returns the running one. Never rejects.
   */
  sync(): Promise<void> {
    if (this.#inFlight) return this.#inFlight;
    if (this.#round.size === 0) return Promise.resolve();
    const status = this.#o.redis.status;
    // An offline client would queue the call (or fail it): the buckets decide alone meanwhile.
    if (status !== "ready" && status !== "wait") {
      this.#failed(new Error(`Redis connection is "${status}"`));
      return Promise.resolve();
    }
    this.#ticksInFlight = 0;
    const round = this.#round;
    this.#round = new Map();
    this.#inFlight = this.#send(round).finally(() => this.#inFlight = null);
    return this.#inFlight;
  }

  async #send(round: Map<string, Share>): Promise<void> {
    const now = this.#o.clock.now();
    const groups = this.#groups(round);
    this.stats.rounds++;
    const replies = await Promise.allSettled(groups.map((ids) => this.#call(ids, round, now)));
    let error: unknown = null;
    for (let g = 0; g < groups.length; g++) {
      const reply = replies[g];
      const ids = groups[g];
      if (reply.status === "rejected" || !Array.isArray(reply.value)) {
        error ??= reply.status === "rejected" ? reply.reason : new Error("Unexpected script reply");
        for (const id of ids) this.#restore(id, round.get(id)!);
        continue;
      }
      this.stats.meters += ids.length;
      for (let i = 0; i < ids.length; i++) {
        const level = Number(reply.value[i]);
        if (!Number.isFinite(level)) continue;
        const share = round.get(ids[i])!;
        // Taken here while the round was in flight: not in the shared level yet.
        const since = this.#round.get(ids[i]);
        const actor = since?.actor ?? share.actor;
        actor.lowerBucket(level - (since?.taken ?? 0), now, this.#o.bucket);
      }
    }
    if (error !== null) {
      this.#failed(error);
    } else if (this.#down) {
      this.#down = false;
      this.#o.logger.info("rate sync recovered: buckets are shared across instances again", {
        rounds_failed: this.stats.failures - this.#failedSince,
      });
    }
  }

  /** Puts a failed round's tokens back, to be charged by the next one. */
  #restore(meterId: string, share: Share): void {
    const since = this.#round.get(meterId);
    if (since) since.taken += share.taken;
    else this.#round.set(meterId, share);
  }

  #failed(error: unknown): void {
    this.stats.failures++;
    if (this.#down) return;
    this.#down = true;
    this.#failedSince = this.stats.failures - 1;
    this.#o.logger.warn(
      "rate sync failed: each instance's buckets decide alone until Redis is back",
      { error },
    );
  }

  /** Meter ids per script call: one slot per call on a cluster, at most `batchMax` each. */
  #groups(round: Map<string, Share>): string[][] {
    const groups: string[][] = [];
    if (!this.#o.redis.isCluster) {
      const ids = [...round.keys()];
      for (let i = 0; i < ids.length; i += this.#batchMax) {
        groups.push(ids.slice(i, i + this.#batchMax));
      }
      return groups;
    }
    const bySlot = new Map<number, string[]>();
    for (const id of round.keys()) {
      const slot = keySlot(this.#keyPrefix + this.#key(id));
      let group = bySlot.get(slot);
      if (!group || group.length === this.#batchMax) {
        if (group) groups.push(group);
        bySlot.set(slot, group = []);
      }
      group.push(id);
    }
    groups.push(...bySlot.values());
    return groups;
  }

  #key(meterId: string): string {
    return `${this.#o.prefix}rate:${meterId}`;
  }

  async #call(ids: string[], round: Map<string, Share>, now: number): Promise<unknown> {
    const redis = this.#o.redis;
    const { burst, refillPerMs } = this.#o.bucket;
    const args: (string | number)[] = ids.map((id) => this.#key(id));
    args.push(now, burst, String(refillPerMs));
    for (const id of ids) args.push(round.get(id)!.taken);
    this.stats.calls++;
    try {
      return await redis.evalsha(SCRIPT_SHA, ids.length, ...args);
    } catch (error) {
      if (!(error instanceof Error && error.message.startsWith("NOSCRIPT"))) throw error;
      // First use on this server (or after a restart): EVAL also caches the script.
      this.stats.calls++;
      return await redis.eval(SCRIPT, ids.length, ...args);
    }
  }
}
