import type { Clock } from "../core/clock.ts";
import { liveKeys, unreadableKeys } from "../core/device_keys.ts";
import type { Logger } from "../core/logger.ts";
import type { SecurityLog } from "../core/security_log.ts";
import type { Outcome } from "../core/outcome.ts";
import { type Reading, type ReadingRow, toReading } from "../core/reading.ts";
import type { InsertResult, Store } from "../db/store.ts";
import {
  type ActorSettings,
  type DeviceState,
  duplicateOf,
  MeterActor,
  type Submission,
  type Verdict,
} from "./meter_actor.ts";

/** Where accepted rows go: the writer. `null` means its queue is full. */
export interface ReadingSink {
  submit(row: ReadingRow): Promise<WriteResult> | null;
}

/** The writer's answer for one row: the store's result, or a failure that will not heal. */
export type WriteResult =
  | InsertResult
  /** `transient`: the gateway is stopping; the reading may be sent again later. */
  | { status: "failed"; message: string; transient?: boolean };

/**
 * Told of every token an actor takes from or gives back to its bucket, so that the buckets of
 * several instances can be reconciled (see actors/cluster_rate.ts). Called on the hot path:
 * synchronous, no I/O.
 */
export interface RateShare {
  /** The actor took one token: its reading was accepted. */
  took(actor: MeterActor): void;
  /** The actor got its token back: the reading was not written. */
  returned(actor: MeterActor): void;
}

/** Options of {@linkcode ActorRegistry}. */
export interface RegistryOptions {
  store: Store;
  sink: ReadingSink;
  clock: Clock;
  logger: Logger;
  /** Key-encryption key to unseal HMAC secrets at activation. */
  kek: Uint8Array;
  settings: ActorSettings;
  /** Idle actors older than this are passivated by {@linkcode ActorRegistry.sweep}. */
  idleTtlMs: number;
  /** Live actors at most; the least recently used idle ones make room. */
  maxActors: number;
  /** Messages waiting for an activation, at most, per meter. */
  mailboxMax: number;
  /** Called after a reading is committed (publish to the bus). */
  onCommitted?: (reading: Reading) => void;
  /** Called with every final outcome and the seconds from submission to it, for metrics. */
  onOutcome?: (msg: Submission, outcome: Outcome, seconds: number) => void;
  /**
   * Called after each device signature check (a reading's, or MQTT CONNECT credentials') with
   * its result and the seconds the actor's decision took, for metrics.
   */
  onVerify?: (kind: "reading" | "connect", result: VerifyResult, seconds: number) => void;
  /** Where bad signatures and forbidden submissions are reported (warn, rate-limited). */
  security?: SecurityLog;
  /** Shares token takes with other instances; without it each bucket is this process's alone. */
  rate?: RateShare;
}

/** The result of a signature check, as counted by `device_signature_verifications_total`. */
export type VerifyResult = "valid" | "invalid" | "expired";

/** Counters of the registry's life cycle, read at scrape time. */
export interface RegistryStats {
  activations: number;
  activationFailures: number;
  /** Idle actors dropped by the sweep. */
  passivations: number;
  /** Idle actors dropped to stay under the cap. */
  evictions: number;
  /** Messages refused because their meter's mailbox was full. */
  mailboxOverflows: number;
}

/** Codes after which a signature was checked and did not verify, by result. */
const FAILED_VERIFY: Record<string, VerifyResult> = {
  bad_signature: "invalid",
  key_expired: "expired",
};
/** Verdicts that come after a valid signature. */
const PAST_VERIFY = new Set(["accept", "duplicate", "wait"]);

/** Rejections that come in floods under load (a runaway device, a full writer): debug only. */
const QUIET_REJECTIONS = new Set<string>(["rate_limited", "overloaded"]);

/** Activations loading at once, at most: each holds a store round trip. */
const MAX_ACTIVATIONS = 10_000;

interface Activation {
  /** Work waiting for the actor; called with `null` when activation failed. */
  mailbox: ((actor: MeterActor | null) => void)[];
  /** The device changed while it was loading: load it again before any message runs. */
  stale: boolean;
}

/**
 * The per-meter actor registry: one activation per meter, state loaded before the first message,
 * messages arriving meanwhile wait in a bounded mailbox; idle actors are passivated and the
 * number of live ones is capped with least-recently-used eviction.
 */
export class ActorRegistry {
  #o: RegistryOptions;
  /** Live actors in least-recently-used order (a Map iterates in insertion order). */
  #actors = new Map<string, MeterActor>();
  #activating = new Map<string, Activation>();
  readonly stats: RegistryStats = {
    activations: 0,
    activationFailures: 0,
    passivations: 0,
    evictions: 0,
    mailboxOverflows: 0,
  };

  constructor(options: RegistryOptions) {
    this.#o = options;
  }

  /** Number of live actors. */
  get size(): number {
    return this.#actors.size;
  }

  /** Hands a submission to its meter's actor and resolves with its final outcome. */
  submit(msg: Submission): Promise<Outcome> {
    const onOutcome = this.#o.onOutcome;
    // Rejections at info, the rest at debug: nothing to do when neither is logged.
    const log = this.#o.logger.enabled("info");
    if (!onOutcome && !log) return this.#route(msg);
    // One continuation for metrics and the log line: a second promise per reading showed up as
    // garbage-collector time under load.
    const started = onOutcome ? performance.now() : 0;
    return this.#route(msg).then((outcome) => {
      onOutcome?.(msg, outcome, (performance.now() - started) / 1000);
      if (log) this.#logOutcome(msg, outcome);
      return outcome;
    });
  }

  // One line per final outcome with the platform's fields; never the signature.
  #logOutcome(msg: Submission, outcome: Outcome): void {
    const logger = this.#o.logger;
    const quiet = outcome.status !== "rejected" || QUIET_REJECTIONS.has(outcome.code);
    if (quiet && !logger.enabled("debug")) return;
    const fields = {
      meter_id: msg.meter_id,
      user_id: outcome.status === "accepted" ? outcome.reading.user_id : msg.caller?.user_id,
      kwh_amount: outcome.status === "accepted" ? outcome.reading.kwh_amount : msg.kwh_amount,
      reading_timestamp: msg.reading_timestamp,
      source: msg.source,
      ...(msg.batch_job_id === undefined ? {} : { batch_job_id: msg.batch_job_id }),
      ...(msg.address === undefined ? {} : { address: msg.address }),
    };
    if (outcome.status === "accepted") {
      logger.debug("reading accepted", { ...fields, reading_id: outcome.reading.id });
    } else if (outcome.status === "duplicate") {
      logger.debug("reading duplicate", { ...fields, reading_id: outcome.id, error: "duplicate" });
    } else if (quiet) {
      logger.debug("reading rejected", { ...fields, error: outcome.code, reason: outcome.message });
    } else {
      logger.info("reading rejected", { ...fields, error: outcome.code, reason: outcome.message });
    }
  }

  #route(msg: Submission): Promise<Outcome> {
    const actor = this.#actors.get(msg.meter_id);
    if (actor) return this.#turn(actor, msg);
    return this.#withActor(msg.meter_id, (a) => this.#turn(a, msg), (why) => ({
      status: "rejected",
      code: why,
      message: why === "overloaded"
        ? `Meter "${msg.meter_id}" has too many readings waiting; retry shortly`
        : "The store is unavailable; retry shortly",
      retryAfter: 1,
    }));
  }

  /** Checks a device's connection credentials (MQTT CONNECT) with its actor's keys. */
  authenticate(
    meterId: string,
    message: string | null,
    signature: string | null,
  ): Promise<Verdict | null> {
    const check = (actor: MeterActor) => {
      actor.lastActive = this.#o.clock.now();
      const started = performance.now();
      const verdict = actor.checkCredentials(
        message,
        signature,
        actor.lastActive,
        this.#o.settings.keys,
      );
      // Without a message and signature a client certificate proved the identity: no check.
      if (message !== null && signature !== null) this.#verified("connect", verdict, started);
      return verdict;
    };
    const actor = this.#actors.get(meterId);
    if (actor) return Promise.resolve(check(actor));
    return this.#withActor(meterId, check, (why) => ({
      kind: "reject",
      code: why,
      message: why === "overloaded" ? "Too many requests waiting" : "The store is unavailable",
    }));
  }

  /** Runs `fn` with the meter's actor once it is active (activating it if needed). */
  #withActor<T>(
    meterId: string,
    fn: (actor: MeterActor) => T | Promise<T>,
    refuse: (why: "overloaded" | "unavailable") => T,
  ): Promise<T> {
    let activation = this.#activating.get(meterId);
    const fresh = activation === undefined;
    if (fresh && this.#activating.size >= MAX_ACTIVATIONS) {
      return Promise.resolve(refuse("overloaded"));
    }
    if (!activation) {
      activation = { mailbox: [], stale: false };
      this.#activating.set(meterId, activation);
    }
    if (activation.mailbox.length >= this.#o.mailboxMax) {
      this.stats.mailboxOverflows++;
      return Promise.resolve(refuse("overloaded"));
    }
    const result = new Promise<T>((resolve) =>
      activation.mailbox.push((actor) => resolve(actor ? fn(actor) : refuse("unavailable")))
    );
    if (fresh) {
      this.#activate(meterId, activation).catch((error) =>
        this.#o.logger.error("actor activation crashed", { meter_id: meterId, error })
      );
    }
    return result;
  }

  /** Reloads a meter's device (registered, rotated, revoked): later messages see the change. */
  invalidate(meterId: string): void {
    const loading = this.#activating.get(meterId);
    if (loading) {
      loading.stale = true;
      return;
    }
    const actor = this.#actors.get(meterId);
    if (!actor) return;
    // Keep the actor (its window and bucket) but queue new messages until the device reloads.
    this.#actors.delete(meterId);
    const activation: Activation = { mailbox: [], stale: false };
    this.#activating.set(meterId, activation);
    this.#activate(meterId, activation, actor).catch((error) =>
      this.#o.logger.error("actor reload crashed", { meter_id: meterId, error })
    );
  }

  /**
   * The `n` live meters that stored the most readings since their activation: the per-meter view
   * that a metric label must not carry (one series per meter would explode at fleet size).
   */
  topMeters(n: number): { meter_id: string; stored: number; last_active: number }[] {
    const top: MeterActor[] = [];
    for (const actor of this.#actors.values()) {
      if (actor.stored === 0) continue;
      if (top.length === n && top[n - 1].stored >= actor.stored) continue;
      let i = top.length < n ? top.length : n - 1;
      top[i] = actor;
      while (i > 0 && top[i - 1].stored < top[i].stored) {
        [top[i - 1], top[i]] = [top[i], top[i - 1]];
        i--;
      }
    }
    return top.map((a) => ({ meter_id: a.meterId, stored: a.stored, last_active: a.lastActive }));
  }

  /** Passivates actors idle for longer than the TTL; returns how many were dropped. */
  sweep(): number {
    const cutoff = this.#o.clock.now() - this.#o.idleTtlMs;
    let dropped = 0;
    for (const [id, actor] of this.#actors) {
      if (actor.lastActive > cutoff) break; // LRU order: the rest are younger
      if (actor.inFlight > 0) continue;
      this.#actors.delete(id);
      dropped++;
    }
    this.stats.passivations += dropped;
    return dropped;
  }

  async #activate(meterId: string, activation: Activation, previous?: MeterActor): Promise<void> {
    let actor: MeterActor;
    try {
      let device: DeviceState | null;
      let recent: number[] = [];
      // A change announced while anything was loading makes the whole load start over.
      do {
        activation.stale = false;
        device = await this.#loadDevice(meterId);
        if (device && !previous) {
          recent = await this.#o.store.recentReadingTimes(meterId, this.#o.settings.recent);
        }
      } while (activation.stale);
      if (previous) {
        previous.device = device;
        actor = previous;
      } else {
        actor = new MeterActor(meterId, device, recent.reverse(), this.#o.clock.now());
      }
    } catch (error) {
      this.#activating.delete(meterId);
      this.stats.activationFailures++;
      this.#o.logger.error("actor activation failed", { meter_id: meterId, error });
      for (const run of activation.mailbox) run(null);
      return;
    }
    this.#activating.delete(meterId);
    if (!previous) this.stats.activations++;
    // Unknown meters are answered from the activation, then forgotten: anyone can name
    // arbitrary meter ids, and they must not push real meters out of the registry.
    if (actor.device !== null) {
      this.#actors.set(meterId, actor);
      this.#evict();
    }
    for (const run of activation.mailbox) {
      try {
        run(actor);
      } catch (error) {
        this.#o.logger.error("actor turn failed", { meter_id: meterId, error });
      }
    }
  }

  /** Reports a decision that involved a signature check (earlier refusals did not check one). */
  #verified(kind: "reading" | "connect", verdict: Verdict | null, started: number): void {
    const onVerify = this.#o.onVerify;
    if (!onVerify) return;
    const result = verdict === null
      ? "valid"
      : verdict.kind === "reject"
      ? FAILED_VERIFY[verdict.code] ?? (verdict.code === "rate_limited" ? "valid" : undefined)
      : PAST_VERIFY.has(verdict.kind)
      ? "valid"
      : undefined;
    if (result) onVerify(kind, result, (performance.now() - started) / 1000);
  }

  async #loadDevice(meterId: string): Promise<DeviceState | null> {
    const device = await this.#o.store.getDevice(meterId);
    if (!device) return null;
    const owner = await this.#o.store.getUser(device.user_id);
    const keys = liveKeys(meterId, device.keys, this.#o.kek);
    const unreadable = unreadableKeys(keys);
    if (unreadable.length > 0) {
      // Once per activation; its readings are answered "unavailable" with the same reason.
      this.#o.logger.error(
        "device key cannot be decrypted: check DEVICE_KEY_ENCRYPTION_KEY (it must be the key " +
          "that sealed the device secrets)",
        { meter_id: meterId, key_ids: unreadable },
      );
    }
    return {
      user_id: device.user_id,
      wallet_address: owner?.wallet_address ?? null,
      revoked: device.status === "revoked",
      keys,
    };
  }

  #evict(): void {
    if (this.#actors.size <= this.#o.maxActors) return;
    for (const [id, actor] of this.#actors) {
      if (actor.inFlight > 0) continue;
      this.#actors.delete(id);
      this.stats.evictions++;
      if (this.#actors.size <= this.#o.maxActors) return;
    }
  }

  /** One turn: the synchronous decision, then (for accepted rows) the wait for the commit. */
  #turn(actor: MeterActor, msg: Submission): Promise<Outcome> {
    const now = this.#o.clock.now();
    actor.lastActive = now;
    // Move to the most-recently-used end; an unknown meter's actor is not in the map and must
    // not get in (anyone can name arbitrary meter ids).
    if (this.#actors.delete(actor.meterId)) this.#actors.set(actor.meterId, actor);

    const settings = this.#o.settings;
    const started = this.#o.onVerify ? performance.now() : 0;
    const verdict = actor.decide(msg, now, settings);
    if (this.#o.onVerify) this.#verified("reading", verdict, started);
    if (verdict.kind === "reject") {
      if (verdict.code === "bad_signature" || verdict.code === "forbidden") {
        // Never the signature itself: it is what an attacker would want confirmed.
        this.#o.security?.warn(verdict.code, msg.address ?? `meter:${msg.meter_id}`, {
          meter_id: msg.meter_id,
          source: msg.source,
          ...(msg.caller ? { user_id: msg.caller.user_id } : {}),
          ...(msg.key_id === undefined ? {} : { key_id: msg.key_id }),
        });
      }
      return Promise.resolve({
        status: "rejected",
        code: verdict.code,
        message: verdict.message,
        retryAfter: verdict.retryAfter,
      });
    }
    if (verdict.kind === "duplicate") return Promise.resolve(verdict.outcome);
    if (verdict.kind === "wait") return verdict.until.then(() => this.#turn(actor, msg));
    const row = verdict.row;
    const rate = this.#o.rate;
    rate?.took(actor);
    const pending = this.#o.sink.submit(row);
    if (pending === null) {
      actor.settle(row.ts, "failed", settings);
      rate?.returned(actor);
      return Promise.resolve({
        status: "rejected",
        code: "overloaded",
        message: "The gateway is saturated; retry shortly",
        retryAfter: 1,
      });
    }
    const outcome = pending.then((result): Outcome => {
      if (result.status === "failed") {
        actor.settle(row.ts, "failed", settings);
        rate?.returned(actor);
        return result.transient
          ? { status: "rejected", code: "unavailable", message: result.message, retryAfter: 1 }
          : { status: "rejected", code: "internal", message: result.message };
      }
      actor.settle(row.ts, result, settings);
      if (result.status === "stored") actor.stored++;
      if (result.status === "duplicate") {
        return duplicateOf(row.meter_id, result.conflict_ts, row.ts);
      }
      const reading = toReading(row);
      this.#o.onCommitted?.(reading);
      return { status: "accepted", reading };
    });
    actor.track(row.ts, outcome);
    return outcome;
  }
}
