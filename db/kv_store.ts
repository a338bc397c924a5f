import { decodeCursor, encodeCursor, malformedCursor } from "./_cursor.ts";
import {
  BATCH_STATUSES,
  type BatchFinish,
  type BatchProgress,
  checkClaim,
  checkFinish,
  checkProgress,
  decodeJobCursor,
  encodeJobCursor,
  FINISHED_STATUSES,
  finishedJob,
  newBatchJob,
  retriedJob,
  RETRYABLE_STATUSES,
  zeroCounts,
} from "./_batch_jobs.ts";
import type { BatchItemError, BatchJob, BatchStatus } from "../core/batch.ts";
import type { AuditEntry, DeviceRecord } from "../core/device.ts";
import { GatewayError } from "../core/errors.ts";
import type { ReadingRow } from "../core/reading.ts";
import { insertSorted, nearestColliding } from "../core/rules.ts";
import type { NewUserRecord, User, UserRecord } from "../core/user.ts";
import {
  type BatchJobQuery,
  type ClaimedBatchJob,
  type DeviceChange,
  type HourlyStat,
  type InsertResult,
  type NewBatchJob,
  ownsDevices,
  type Page,
  type ReadingQuery,
  type ReadingStats,
  type Store,
  type StoreOptions,
  type UserChange,
} from "./store.ts";

/*
 * Key layout
 *
 *   ["users", id]                               UserRecord
 *   ["users_by_email", email]                   user id
 *   ["counters", "users"]                       KvU64
 *   ["active_admins", id]                       null: one per enabled admin (the last-admin
 *                                               rule checks one other entry); built from
 *                                               ["users", …] once, marked by
 *                                               ["meta", "active_admins"], for older files
 *   ["devices", meter_id]                       DeviceRecord
 *   ["devices_by_user", user_id, meter_id]      DeviceRecord (denormalised)
 *   ["audit", meter_id, at, id]                 AuditEntry
 *   ["audit_all", at, id]                       AuditEntry
 *   ["readings", meter_id, ts]                  ReadingRow (natural key)
 *   ["readings_by_user", user_id, ts, meter_id] null: points at the row
 *   ["readings_by_time", ts, meter_id]          null: points at the row
 *   ["meter_heads", meter_id]                   MeterHead: written with the meter's first
 *                                               readings and when an owner is added; its
 *                                               min_ts/max_ts are those of that write only
 *                                               (exact ones are read from ["readings", …])
 *   ["meter_seq", meter_id]                     number: the meter's highest seq, set in every
 *                                               commit that stores readings of the meter
 *   ["readings_by_seq", meter_id, seq]          ts: points at the row (readingsAfter); the
 *                                               row itself carries `seq` too
 *   ["reading_writer"]                          null: rewritten by every commit of readings, so
 *                                               checking its versionstamp makes a whole batch's
 *                                               dedupe decisions atomic (see insertReadings)
 *   ["totals", field] / ["totals_by_user", user_id, field]   KvU64 counters
 *   ["readings_by_batch", job_id, meter_id, ts]  null: readings stored by a batch job (the row
 *                                               carries `batch_job_id` too)
 *
 * Batch jobs (every change of a job is one commit that checks the job's versionstamp and keeps
 * its indexes in step):
 *   ["batch_jobs", id]                          KvJob: the job without its errors
 *   ["batch_items", id, n]                      Uint8Array: piece n of the UTF-8 JSON of the
 *                                               job's readings (at most PIECE_BYTES each)
 *   ["batch_errors", id, rev, n]                Uint8Array: piece n of the JSON of its errors,
 *                                               revision `rev` (replaced as a whole; the
 *                                               submission's errors are rev "submitted")
 *   ["batch_idem", user_id, key]                job id: one job per user and Idempotency-Key
 *   ["batch_pending", id]                       created_at: pieces uploaded, job not committed
 *                                               yet (cleared by the commit, or by a purge)
 *   ["batch_live", created_at, id]              LiveEntry of a queued or running job: what a
 *                                               claim scans, oldest first
 *   ["batch_by_time", created_at, id]           null: listings, newest first
 *   ["batch_by_user", user_id, created_at, id]  null
 *   ["batch_by_status", status, created_at, id] null
 *   ["batch_finished", finished_at, id]         null: purging by age
 *   ["batch_counts", status]                    KvU64: jobs per status
 */

/**
 * Per-meter summary. Stored only when its owners change (a write per reading was a quarter of
 * the key writes of a batch); in memory, min_ts and max_ts are exact.
 */
interface MeterHead {
  /** Owners that have readings of this meter (usually one); drives `meter_count`. */
  user_ids: string[];
  min_ts: number;
  max_ts: number;
  /** In memory only: the meter's highest seq (stored under ["meter_seq", …]). */
  seq: number;
}

type TotalField = "count" | "kwh_e4" | "meters" | "minted";
const TOTAL_FIELDS: readonly TotalField[] = ["count", "kwh_e4", "meters", "minted"];

// Deno KV limits of one atomic commit (measured on Deno 2.9.6); a readings commit has one check.
const MAX_MUTATIONS = 1000;
const MAX_KEY_BYTES = 81_920;
const MAX_MUTATION_BYTES = 819_200;
// Reserved for the global totals of a chunk and the writer key.
const GLOBAL_MUTATIONS = TOTAL_FIELDS.length + 1;
const GLOBAL_BYTES = 512;
// Approximate per-mutation overhead counted by KV besides key and value.
const MUTATION_OVERHEAD = 16;
const GET_MANY_MAX = 10;
const HOUR = 3_600_000;
const READ_CONCURRENCY = 64;
// Index entries resolved per round while a filter is applied.
const FILTER_GROUP = 50;
// A filtered listing examines at most max(SCAN_BUDGET_MIN, SCAN_BUDGET_PER_ITEM × limit) entries
// per call, then returns what it found with a cursor at the scan position (a short page).
const SCAN_BUDGET_MIN = 1000;
const SCAN_BUDGET_PER_ITEM = 10;
// A call that loses this many commit races gives up rather than spin.
const MAX_ATTEMPTS = 32;
/** Bumped by every commit of readings: a commit that checks it saw every earlier one. */
const WRITER_KEY: Deno.KvKey = ["reading_writer"];
// Meter heads kept in memory; the least recently written are dropped beyond this.
const HEAD_CACHE_MAX = 100_000;
// Commits that find the file locked by another process are retried for about 5 s.
const LOCK_RETRIES = 60;

/** Deno KV adapter of the {@linkcode Store} port: the embedded default backend. */
export class KvStore implements Store {
  #kv: Deno.Kv;
  #windowMs: number;
  #closed = false;
  /**
   * Versionstamp of {@linkcode WRITER_KEY} as of this handle's last read or commit of it, or
   * `undefined` when unknown. While the stored key still has it, no other handle has written
   * readings since, and `#heads` is exact.
   */
  #writer: string | null | undefined = undefined;
  /** Known meter heads (`null`: the meter has no readings), valid while `#writer` is current. */
  #heads = new Map<string, MeterHead | null>();
  /** Serialises `insertReadings` calls of this handle (they share `#writer` and `#heads`). */
  #inserting: Promise<unknown> = Promise.resolve();

  /** Wraps an open handle; the store owns it from now on and closes it in `close()`. */
  constructor(kv: Deno.Kv, options: StoreOptions) {
    this.#kv = kv;
    this.#windowMs = options.dedupeWindowMs;
  }

  /** Opens the KV database at `path`, or an in-memory one when `path` is undefined. */
  static async open(path: string | undefined, options: StoreOptions): Promise<KvStore> {
    const kv = await Deno.openKv(path ?? ":memory:");
    return new KvStore(kv, options);
  }

  // ---- users -------------------------------------------------------------------------------

  async createUser(input: NewUserRecord): Promise<void> {
    const user: UserRecord = {
      ...input,
      disabled: input.disabled ?? false,
      token_generation: input.token_generation ?? 0,
    };
    const op = this.#kv.atomic()
      .check({ key: ["users", user.id], versionstamp: null })
      .check({ key: ["users_by_email", user.email], versionstamp: null })
      .set(["users", user.id], user)
      .set(["users_by_email", user.email], user.id)
      .sum(["counters", "users"], 1n);
    if (isActiveAdmin(user)) op.set(["active_admins", user.id], null);
    const res = await commit(op);
    if (!res.ok) {
      const emailTaken = (await this.#kv.get(["users_by_email", user.email])).value !== null;
      throw new GatewayError(
        "conflict",
        emailTaken ? `email ${user.email} is already registered` : `user ${user.id} already exists`,
      );
    }
  }

  /** The user without its password hash, or `null`. */
  async getUser(id: string): Promise<User | null> {
    const { value } = await this.#kv.get<UserRecord>(["users", id]);
    if (value === null) return null;
    const { password_hash: _, ...user } = withUserDefaults(value);
    return user;
  }

  async getUserByEmail(email: string): Promise<UserRecord | null> {
    const ref = await this.#kv.get<string>(["users_by_email", email]);
    if (ref.value === null) return null;
    const { value } = await this.#kv.get<UserRecord>(["users", ref.value]);
    return value === null ? null : withUserDefaults(value);
  }

  async updateUser(id: string, change: UserChange): Promise<UserRecord> {
    for (let attempt = 0;; attempt++) {
      const current = await this.#kv.get<UserRecord>(["users", id]);
      if (current.value === null) throw new GatewayError("not_found", `User "${id}" not found`);
      const before = withUserDefaults(current.value);
      const after = change(before);
      if (after.id !== id || after.email !== before.email) {
        throw new TypeError(`A user change must keep id "${id}" and email`);
      }
      const op = this.#kv.atomic().check(current).set(["users", id], after);
      if (isActiveAdmin(after)) op.set(["active_admins", id], null);
      else if (isActiveAdmin(before)) {
        op.delete(["active_admins", id]);
        await this.#checkAnotherAdmin(op, id);
      }
      if ((await commit(op)).ok) return after;
      if (attempt === MAX_ATTEMPTS) {
        throw new GatewayError("unavailable", `User "${id}" is changing too often; retry`);
      }
    }
  }

  async deleteUser(id: string): Promise<UserRecord> {
    for (let attempt = 0;; attempt++) {
      const current = await this.#kv.get<UserRecord>(["users", id]);
      if (current.value === null) throw new GatewayError("not_found", `User "${id}" not found`);
      const user = withUserDefaults(current.value);
      // createDevice rewrites the owner's record in its commit: a device registered after this
      // listing makes the check of `current` below fail, and the retry counts it.
      let active = 0;
      for await (const entry of this.#kv.list<DeviceRecord>({ prefix: ["devices_by_user", id] })) {
        if (entry.value.status !== "revoked") active++;
      }
      if (active > 0) throw ownsDevices(active);
      const op = this.#kv.atomic()
        .check(current)
        .delete(["users", id])
        .delete(["users_by_email", user.email])
        .delete(["active_admins", id])
        // KvU64 sums wrap around: adding 2^64 - 1 subtracts one.
        .sum(["counters", "users"], 0xffff_ffff_ffff_ffffn);
      if (isActiveAdmin(user)) await this.#checkAnotherAdmin(op, id);
      if ((await commit(op)).ok) return user;
      if (attempt === MAX_ATTEMPTS) {
        throw new GatewayError("unavailable", `User "${id}" is changing too often; retry`);
      }
    }
  }

  // Adds a check that one other active admin stays as it is: a concurrent change that removes
  // that one fails this commit, and the retry sees it gone. Throws `conflict` when there is none.
  async #checkAnotherAdmin(op: Deno.AtomicOperation, id: string): Promise<void> {
    await this.#buildAdminIndex();
    for await (const entry of this.#kv.list<null>({ prefix: ["active_admins"] }, { limit: 2 })) {
      if (entry.key[1] === id) continue;
      op.check(entry);
      return;
    }
    throw new GatewayError("conflict", "This would leave no active admin; keep at least one");
  }

  // Files written before the index existed get it once.
  async #buildAdminIndex(): Promise<void> {
    if ((await this.#kv.get(["meta", "active_admins"])).versionstamp !== null) return;
    for await (const entry of this.#kv.list<UserRecord>({ prefix: ["users"] })) {
      if (!isActiveAdmin(withUserDefaults(entry.value))) continue;
      await commit(this.#kv.atomic().check(entry).set(["active_admins", entry.key[1]], null));
    }
    await commit(this.#kv.atomic().set(["meta", "active_admins"], true));
  }

  /** Reads the counter that `createUser` bumps in the same commit. */
  async countUsers(): Promise<number> {
    const { value } = await this.#kv.get<Deno.KvU64>(["counters", "users"]);
    return value === null ? 0 : Number(value.value);
  }

  // ---- devices -----------------------------------------------------------------------------

  async createDevice(
    device: DeviceRecord,
    audit: AuditEntry,
    options: { ownerMustExist?: boolean } = {},
  ): Promise<void> {
    for (let attempt = 0;; attempt++) {
      const owner = await this.#kv.get<UserRecord>(["users", device.user_id]);
      if (owner.value === null && options.ownerMustExist) {
        throw new GatewayError("not_found", `User "${device.user_id}" does not exist`);
      }
      const op = this.#kv.atomic()
        .check({ key: ["devices", device.meter_id], versionstamp: null })
        .check(owner)
        .set(["devices", device.meter_id], device)
        .set(["devices_by_user", device.user_id, device.meter_id], device);
      // Rewriting the owner (unchanged) gives it a new versionstamp, so a deleteUser that
      // listed the devices before this commit fails its check and looks again.
      if (owner.value !== null) op.set(["users", device.user_id], owner.value);
      if ((await commit(setAudit(op, audit))).ok) return;
      if ((await this.#kv.get(["devices", device.meter_id])).versionstamp !== null) {
        throw new GatewayError("conflict", `meter ${device.meter_id} is already registered`);
      }
      if (attempt === MAX_ATTEMPTS) {
        throw new GatewayError(
          "unavailable",
          `User "${device.user_id}" is changing too often; retry`,
        );
      }
    }
  }

  /** The device record, or `null` for an unregistered meter. */
  async getDevice(meterId: string): Promise<DeviceRecord | null> {
    return (await this.#kv.get<DeviceRecord>(["devices", meterId])).value;
  }

  async updateDevice(meterId: string, change: DeviceChange): Promise<DeviceRecord> {
    // Optimistic: when another writer replaced the device between read and commit, the change
    // is computed again from the fresh record, so no update is lost.
    for (;;) {
      const current = await this.#kv.get<DeviceRecord>(["devices", meterId]);
      if (current.value === null) {
        throw new GatewayError("not_found", `Meter "${meterId}" is not registered`);
      }
      const { device, audit } = change(current.value);
      if (device.meter_id !== meterId) {
        throw new TypeError(`A device change must keep meter_id "${meterId}"`);
      }
      const op = this.#kv.atomic()
        .check(current)
        .set(["devices", device.meter_id], device)
        .set(["devices_by_user", device.user_id, device.meter_id], device);
      if (current.value.user_id !== device.user_id) {
        op.delete(["devices_by_user", current.value.user_id, device.meter_id]);
      }
      if ((await commit(setAudit(op, audit))).ok) return device;
    }
  }

  async devicesChangedSince(
    since: number,
  ): Promise<{ meter_id: string; status: "active" | "revoked"; updated_at: number }[]> {
    // Embedded mode runs one instance with the in-process bus, which is never cut off: this
    // scan only serves a Deno KV shared by instances (DENO_KV_URL), and stays small there.
    const changed: { meter_id: string; status: "active" | "revoked"; updated_at: number }[] = [];
    for await (const entry of this.#kv.list<DeviceRecord>({ prefix: ["devices"] })) {
      const d = entry.value;
      if (d.updated_at >= since) {
        changed.push({ meter_id: d.meter_id, status: d.status, updated_at: d.updated_at });
      }
    }
    return changed.sort((x, y) => x.updated_at - y.updated_at).slice(0, 10_000);
  }

  async listDevices(
    query: { user_id?: string; limit: number; cursor?: string },
  ): Promise<Page<DeviceRecord>> {
    const limit = checkLimit(query.limit);
    const prefix: Deno.KvKey = query.user_id === undefined
      ? ["devices"]
      : ["devices_by_user", query.user_id];
    const selector: Deno.KvListSelector = query.cursor === undefined
      ? { prefix }
      : { prefix, start: successor([...prefix, decodeDeviceCursor(query.cursor)]) };
    const items: DeviceRecord[] = [];
    let more = false;
    const iter = this.#kv.list<DeviceRecord>(selector, {
      limit: limit + 1,
      batchSize: batchSizeFor(limit + 1),
    });
    for await (const entry of iter) {
      if (items.length === limit) {
        more = true;
        break;
      }
      items.push(entry.value);
    }
    const last = items.at(-1);
    return {
      items,
      next_cursor: more && last ? encodeCursor([last.meter_id]) : null,
    };
  }

  async listAudit(query: { meter_id?: string; limit: number }): Promise<AuditEntry[]> {
    const limit = checkLimit(query.limit);
    const prefix: Deno.KvKey = query.meter_id === undefined
      ? ["audit_all"]
      : ["audit", query.meter_id];
    const out: AuditEntry[] = [];
    const iter = this.#kv.list<AuditEntry>({ prefix }, { limit, batchSize: batchSizeFor(limit) });
    for await (const entry of iter) out.push(entry.value);
    return out;
  }

  // ---- readings ----------------------------------------------------------------------------

  async insertReadings(rows: ReadingRow[]): Promise<InsertResult[]> {
    for (const row of rows) checkRow(row);
    const run = this.#inserting.then(() => this.#insertSerial(rows));
    this.#inserting = run.catch(() => {});
    return await run;
  }

  async #insertSerial(rows: ReadingRow[]): Promise<InsertResult[]> {
    try {
      return await this.#insert(rows);
    } catch (error) {
      // A commit may or may not have landed: know nothing rather than something wrong.
      this.#forgetWriter();
      throw error;
    }
  }

  #forgetWriter(): void {
    this.#writer = undefined;
    this.#heads.clear();
  }

  async #insert(rows: ReadingRow[]): Promise<InsertResult[]> {
    const results: (InsertResult | undefined)[] = new Array(rows.length);
    const stored = new Uint8Array(rows.length);
    let pending = new Map<string, number[]>();
    for (let i = 0; i < rows.length; i++) {
      const meter = rows[i].meter_id;
      const list = pending.get(meter);
      if (list === undefined) pending.set(meter, [i]);
      else list.push(i);
    }
    for (let attempt = 1; pending.size > 0; attempt++) {
      if (attempt > MAX_ATTEMPTS) {
        throw new GatewayError(
          "unavailable",
          `readings of meter ${[...pending.keys()][0]} kept racing concurrent writers; retry`,
        );
      }
      const plans = await this.#planInserts(rows, pending, results);
      await this.#commitPlans(rows, plans, results, stored);
      // A failed commit means another writer wrote readings: re-decide the unstored rows of
      // every meter with rows that did not land against the fresh state (earlier duplicates
      // may have pointed at rows that never landed).
      pending = new Map();
      for (const plan of plans) {
        if (!plan.failed) continue;
        pending.set(plan.meter, plan.indices.filter((i) => stored[i] === 0));
      }
    }
    return results as InsertResult[];
  }

  /** Decides every pending row against the stored readings and earlier rows of the call. */
  async #planInserts(
    rows: ReadingRow[],
    pending: Map<string, number[]>,
    results: (InsertResult | undefined)[],
  ): Promise<MeterPlan[]> {
    if (this.#writer === undefined) {
      // Read before anything it vouches for: a write after this read fails our commits.
      this.#heads.clear();
      this.#writer = (await this.#kv.get(WRITER_KEY)).versionstamp;
    }
    const meters = [...pending.keys()];
    const heads = await this.#getHeads(meters);
    const windowMs = this.#windowMs;
    return await mapPool(meters, READ_CONCURRENCY, async (meter, m) => {
      const indices = pending.get(meter)!;
      const head = heads[m];
      // Every commit checks the writer key, so a write of any other handle after the reads
      // behind this decision fails the commit and we re-plan.
      const near = head === null ? [] : await this.#storedNear(meter, rows, indices, head);
      const accepted: number[] = [];
      const acceptedTs: number[] = [];
      for (const i of indices) {
        const ts = rows[i].ts;
        const hit = nearestColliding(near, ts, windowMs) ??
          nearestColliding(acceptedTs, ts, windowMs);
        if (hit !== undefined) {
          results[i] = { status: "duplicate", conflict_ts: hit };
          continue;
        }
        insertSorted(acceptedTs, ts);
        accepted.push(i);
      }
      return { meter, indices, accepted, head, failed: false };
    });
  }

  /** The heads of `meters`, from memory where known, else read (and remembered). */
  async #getHeads(meters: string[]): Promise<(MeterHead | null)[]> {
    const out: (MeterHead | null)[] = new Array(meters.length);
    const missing: number[] = [];
    for (let m = 0; m < meters.length; m++) {
      const head = this.#heads.get(meters[m]);
      if (head === undefined) missing.push(m);
      else out[m] = head;
    }
    const groups: number[][] = [];
    for (let i = 0; i < missing.length; i += GET_MANY_MAX) {
      groups.push(missing.slice(i, i + GET_MANY_MAX));
    }
    await mapPool(groups, READ_CONCURRENCY, async (group) => {
      const got = await this.#kv.getMany<MeterHead[]>(
        group.map((m) => ["meter_heads", meters[m]]),
      );
      for (let j = 0; j < group.length; j++) out[group[j]] = got[j].value;
    });
    // A stored head's times are those of its last write: the exact ones are the meter's first
    // and last reading keys.
    const known = missing.filter((m) => out[m] !== null);
    await mapPool(known, READ_CONCURRENCY, async (m) => {
      const [[first, last], seq] = await Promise.all([
        Promise.all([false, true].map(async (reverse) => {
          for await (
            const entry of this.#kv.list({ prefix: ["readings", meters[m]] }, {
              limit: 1,
              reverse,
            })
          ) return entry.key[2] as number;
          return undefined;
        })),
        // Absent in files written before seq existed: numbering starts at 1 then.
        this.#kv.get<number>(["meter_seq", meters[m]]),
      ]);
      const head = out[m]!;
      out[m] = {
        user_ids: head.user_ids,
        min_ts: first ?? head.min_ts,
        max_ts: last ?? head.max_ts,
        seq: seq.value ?? 0,
      };
    });
    for (const m of missing) this.#rememberHead(meters[m], out[m]);
    return out;
  }

  #rememberHead(meter: string, head: MeterHead | null): void {
    const heads = this.#heads;
    heads.delete(meter);
    heads.set(meter, head);
    if (heads.size > HEAD_CACHE_MAX) {
      // Drop the least recently remembered tenth in one go.
      let drop = HEAD_CACHE_MAX / 10;
      for (const key of heads.keys()) {
        if (drop-- === 0) break;
        heads.delete(key);
      }
    }
  }

  /** Stored timestamps of `meter` that may collide with the given rows, ascending. */
  async #storedNear(
    meter: string,
    rows: ReadingRow[],
    indices: number[],
    head: MeterHead,
  ): Promise<number[]> {
    const w = Math.max(this.#windowMs, 1);
    // Only rows whose window reaches into [min_ts, max_ts] can hit anything: in-order data
    // (the common case) needs no reads at all.
    const candidates: number[] = [];
    for (const i of indices) {
      const ts = rows[i].ts;
      if (ts - w < head.max_ts && ts + w > head.min_ts) candidates.push(ts);
    }
    if (candidates.length === 0) return [];
    candidates.sort((a, b) => a - b);
    // One range read per cluster of rows whose windows touch; [ts - w, ts + w) is a superset
    // of the colliding instants even for a fractional window, and collides() decides.
    const ranges: [number, number][] = [];
    for (const ts of candidates) {
      const last = ranges.at(-1);
      if (last !== undefined && ts - w <= last[1]) last[1] = ts + w;
      else ranges.push([ts - w, ts + w]);
    }
    const found = await Promise.all(ranges.map(async ([lo, hi]) => {
      const out: number[] = [];
      const iter = this.#kv.list<ReadingRow>({
        start: ["readings", meter, lo],
        end: ["readings", meter, hi],
      }, { batchSize: 500 });
      for await (const entry of iter) out.push(entry.key[2] as number);
      return out;
    }));
    return found.flat();
  }

  /** Writes the accepted rows in chunks that respect KV's per-commit limits. */
  async #commitPlans(
    rows: ReadingRow[],
    plans: MeterPlan[],
    results: (InsertResult | undefined)[],
    stored: Uint8Array,
  ): Promise<void> {
    const chunks = buildChunks(rows, plans);
    for (let c = 0; c < chunks.length; c++) {
      const parts = chunks[c];
      const op = this.#kv.atomic()
        .check({ key: WRITER_KEY, versionstamp: this.#writer! })
        .set(WRITER_KEY, null);
      const global = newTotals();
      const byUser = new Map<string, Totals>();
      for (const part of parts) {
        const meter = part.plan.meter;
        const after = part.headAfter;
        if (part.writesHead) {
          const { user_ids, min_ts, max_ts } = after;
          op.set(["meter_heads", meter], { user_ids, min_ts, max_ts });
        }
        // The same commit as the rows it numbers: seqs are dense and in commit order.
        op.set(["meter_seq", meter], after.seq);
        if (part.newMeter) global.meters++;
        for (const user of part.newUsers) totalsOf(byUser, user).meters++;
        for (let j = 0; j < part.rows.length; j++) {
          const row = rows[part.rows[j]];
          const seq = part.firstSeq + j;
          op.set(["readings", meter, row.ts], { ...row, seq });
          op.set(["readings_by_seq", meter, seq], row.ts);
          op.set(["readings_by_user", row.user_id, row.ts, meter], null);
          op.set(["readings_by_time", row.ts, meter], null);
          if (row.batch_job_id !== undefined) {
            op.set(["readings_by_batch", row.batch_job_id, meter, row.ts], null);
          }
          const totals = totalsOf(byUser, row.user_id);
          totals.count++;
          totals.kwh_e4 += row.kwh_e4;
          global.count++;
          global.kwh_e4 += row.kwh_e4;
          if (row.minted) {
            totals.minted++;
            global.minted++;
          }
        }
      }
      addTotals(op, ["totals"], global);
      for (const [user, totals] of byUser) addTotals(op, ["totals_by_user", user], totals);
      const res = await commit(op);
      if (!res.ok) {
        // Another handle wrote readings: what we know may be stale, and every later chunk
        // would fail the same check. Their meters are planned again from fresh reads.
        this.#forgetWriter();
        for (let d = c; d < chunks.length; d++) {
          for (const part of chunks[d]) part.plan.failed = true;
        }
        return;
      }
      this.#writer = res.versionstamp;
      for (const part of parts) {
        this.#rememberHead(part.plan.meter, part.headAfter);
        for (let j = 0; j < part.rows.length; j++) {
          const i = part.rows[j];
          results[i] = { status: "stored", seq: part.firstSeq + j };
          stored[i] = 1;
        }
      }
    }
  }

  async readingsAfter(meterId: string, afterSeq: number, limit: number): Promise<ReadingRow[]> {
    if (!Number.isSafeInteger(afterSeq) || afterSeq < 0) {
      throw new GatewayError(
        "invalid_payload",
        `afterSeq must be a non-negative integer, got ${afterSeq}`,
      );
    }
    checkLimit(limit);
    const prefix = ["readings_by_seq", meterId];
    const refs: [number, number][] = [];
    const iter = this.#kv.list<number>({ prefix, start: [...prefix, afterSeq + 1] }, {
      limit,
      batchSize: batchSizeFor(limit),
    });
    for await (const entry of iter) refs.push([entry.key[2] as number, entry.value]);
    const groups: [number, number][][] = [];
    for (let i = 0; i < refs.length; i += GET_MANY_MAX) {
      groups.push(refs.slice(i, i + GET_MANY_MAX));
    }
    const found = await mapPool(groups, READ_CONCURRENCY, async (group) => {
      const got = await this.#kv.getMany<ReadingRow[]>(
        group.map(([, ts]) => ["readings", meterId, ts]),
      );
      // Readings are never deleted, so every index entry finds its row.
      return got.map((entry, j) => ({ ...entry.value!, seq: group[j][0] }));
    });
    return found.flat();
  }

  async lastSeqs(meterIds: readonly string[]): Promise<Map<string, number>> {
    const out = new Map<string, number>();
    for (const id of meterIds) out.set(id, 0);
    const ids = [...out.keys()];
    const groups: string[][] = [];
    for (let i = 0; i < ids.length; i += GET_MANY_MAX) groups.push(ids.slice(i, i + GET_MANY_MAX));
    await mapPool(groups, READ_CONCURRENCY, async (group) => {
      const got = await this.#kv.getMany<number[]>(group.map((id) => ["meter_seq", id]));
      for (let j = 0; j < group.length; j++) out.set(group[j], got[j].value ?? 0);
    });
    return out;
  }

  async recentReadingTimes(meterId: string, limit: number): Promise<number[]> {
    if (limit <= 0) return [];
    const out: number[] = [];
    const iter = this.#kv.list<ReadingRow>({ prefix: ["readings", meterId] }, {
      reverse: true,
      limit,
      batchSize: batchSizeFor(limit),
    });
    for await (const entry of iter) out.push(entry.key[2] as number);
    return out;
  }

  /** The reading at its natural key, or `null`. */
  async getReading(meterId: string, ts: number): Promise<ReadingRow | null> {
    return (await this.#kv.get<ReadingRow>(["readings", meterId, ts])).value;
  }

  /**
   * Lists readings in key order. A filtered listing (owner of a meter, or `minted`) examines a
   * bounded number of entries per call: a page may hold fewer than `limit` items, even none,
   * and still carry a `next_cursor` that resumes where the scan stopped.
   */
  async listReadings(query: ReadingQuery): Promise<Page<ReadingRow>> {
    const limit = checkLimit(query.limit);
    const after = query.cursor === undefined ? null : decodeReadingCursor(query.cursor);
    let prefix: Deno.KvKey;
    let keyOf: (ts: number, meter: string) => Deno.KvKey;
    if (query.meter_id !== undefined) {
      prefix = ["readings", query.meter_id];
      keyOf = (ts) => [...prefix, ts];
    } else if (query.user_id !== undefined) {
      prefix = ["readings_by_user", query.user_id];
      keyOf = (ts, meter) => [...prefix, ts, meter];
    } else {
      prefix = ["readings_by_time"];
      keyOf = (ts, meter) => [...prefix, ts, meter];
    }
    const desc = query.order === "desc";
    let start: Deno.KvKey | undefined = query.from === undefined
      ? undefined
      : [...prefix, query.from];
    let end: Deno.KvKey | undefined = query.to === undefined ? undefined : [...prefix, query.to];
    if (after !== null) {
      // Resume strictly past the last returned row, never outside [from, to).
      if (!desc && (query.from === undefined || after.ts >= query.from)) {
        start = successor(keyOf(after.ts, after.meter_id));
      }
      if (desc && (query.to === undefined || after.ts < query.to)) {
        end = keyOf(after.ts, after.meter_id);
      }
    }
    if (start !== undefined && end !== undefined && compareKeys(start, end) >= 0) {
      return { items: [], next_cursor: null };
    }
    const selector: Deno.KvListSelector = start !== undefined && end !== undefined
      ? { start, end }
      : start !== undefined
      ? { prefix, start }
      : end !== undefined
      ? { prefix, end }
      : { prefix };
    const primary = query.meter_id !== undefined;
    const ownerCheck = primary && query.user_id !== undefined;
    const filtered = ownerCheck || query.minted !== undefined;
    // A filter may match rarely or never (admin `?minted=true`): bound the entries one call
    // examines, and let the caller page on from where the scan stopped.
    const budget = Math.max(SCAN_BUDGET_MIN, SCAN_BUDGET_PER_ITEM * limit);
    const iter = this.#kv.list<ReadingRow | null>(selector, {
      reverse: desc,
      // One entry past the budget tells whether anything is left to scan.
      limit: filtered ? budget + 1 : limit + 1,
      batchSize: filtered ? 500 : batchSizeFor(limit + 1),
    });
    const items: ReadingRow[] = [];
    let more = false;
    /** Takes a scanned row; false once the page is full and one more match proves `more`. */
    const take = (row: ReadingRow): boolean => {
      if (ownerCheck && row.user_id !== query.user_id) return true;
      if (query.minted !== undefined && row.minted !== query.minted) return true;
      if (items.length === limit) {
        more = true;
        return false;
      }
      items.push(row);
      return true;
    };
    // The last entry examined, and whether the budget ran out with entries left to scan.
    let scanned: Deno.KvKey | undefined;
    let exhausted = false;
    let examined = 0;
    /** Counts an entry against the budget; false when it is one past the budget. */
    const examine = (key: Deno.KvKey): boolean => {
      if (examined === budget) {
        exhausted = true;
        return false;
      }
      examined++;
      scanned = key;
      return true;
    };
    if (primary) {
      for await (const entry of iter) {
        if (!examine(entry.key) || !take(entry.value!)) break;
      }
    } else if (!filtered) {
      const keys: Deno.KvKey[] = [];
      for await (const entry of iter) keys.push(entry.key);
      more = keys.length > limit;
      items.push(...await this.#fetchIndexed(keys.slice(0, limit)));
    } else {
      // The minted filter needs the rows: fetch them in groups while scanning.
      let keys: Deno.KvKey[] = [];
      const drain = async (): Promise<boolean> => {
        const rows = await this.#fetchIndexed(keys);
        keys = [];
        return rows.every(take);
      };
      let open = true;
      for await (const entry of iter) {
        if (!examine(entry.key)) break;
        keys.push(entry.key);
        if (keys.length === FILTER_GROUP && !(open = await drain())) break;
      }
      if (open && keys.length > 0) await drain();
    }
    let next: [number, string] | null = null;
    const last = items.at(-1);
    if (more && last) {
      next = [last.ts, last.meter_id];
    } else if (exhausted && scanned !== undefined) {
      // Every examined entry past the last item failed the filter: resume after the scan.
      next = primary
        ? [scanned[2] as number, query.meter_id!]
        : [scanned.at(-2) as number, scanned.at(-1) as string];
    }
    return { items, next_cursor: next === null ? null : encodeCursor(next) };
  }

  async readingStats(query: { user_id?: string }): Promise<ReadingStats> {
    const prefix: Deno.KvKey = query.user_id === undefined
      ? ["totals"]
      : ["totals_by_user", query.user_id];
    const index: Deno.KvKey = query.user_id === undefined
      ? ["readings_by_time"]
      : ["readings_by_user", query.user_id];
    const [totals, first, last] = await Promise.all([
      this.#kv.getMany<Deno.KvU64[]>(TOTAL_FIELDS.map((field) => [...prefix, field])),
      this.#edgeTs(index, false),
      this.#edgeTs(index, true),
    ]);
    const [count, kwh, meters, minted] = totals.map((entry) =>
      entry.value === null ? 0 : Number(entry.value.value)
    );
    return {
      meter_count: meters,
      reading_count: count,
      kwh_e4: kwh,
      minted_count: minted,
      first_ts: first,
      last_ts: last,
    };
  }

  /** Hourly statistics from a scan of the meter's readings (embedded fleets are small). */
  async hourlyStats(meterId: string, from: number, to: number): Promise<HourlyStat[]> {
    const start = Math.floor(from / HOUR) * HOUR;
    const end = Math.ceil(to / HOUR) * HOUR;
    const hours = new Map<number, { count: number; sum: number; min: number; max: number }>();
    const range = { start: ["readings", meterId, start], end: ["readings", meterId, end] };
    for await (const entry of this.#kv.list<ReadingRow>(range)) {
      const row = entry.value;
      const hour = Math.floor(row.ts / HOUR) * HOUR;
      const h = hours.get(hour);
      if (!h) hours.set(hour, { count: 1, sum: row.kwh_e4, min: row.kwh_e4, max: row.kwh_e4 });
      else {
        h.count++;
        h.sum += row.kwh_e4;
        h.min = Math.min(h.min, row.kwh_e4);
        h.max = Math.max(h.max, row.kwh_e4);
      }
    }
    return [...hours].map(([hour, h]) => ({
      hour,
      count: h.count,
      sum_kwh: h.sum / 10_000,
      avg_kwh: h.sum / h.count / 10_000,
      min_kwh: h.min / 10_000,
      max_kwh: h.max / 10_000,
    }));
  }

  /** The timestamp of the first (or last) entry of a `[..., ts, meter_id]` index. */
  async #edgeTs(prefix: Deno.KvKey, reverse: boolean): Promise<number | null> {
    for await (const entry of this.#kv.list<null>({ prefix }, { limit: 1, reverse })) {
      return entry.key.at(-2) as number;
    }
    return null;
  }

  /** Resolves `[..., ts, meter_id]` index keys to their rows, in order. */
  async #fetchIndexed(keys: Deno.KvKey[]): Promise<ReadingRow[]> {
    const groups: Deno.KvKey[][] = [];
    for (let i = 0; i < keys.length; i += GET_MANY_MAX) {
      groups.push(
        keys.slice(i, i + GET_MANY_MAX).map((key) => ["readings", key.at(-1)!, key.at(-2)!]),
      );
    }
    const got = await mapPool(groups, READ_CONCURRENCY, (group) => this.#kv.getMany(group));
    const rows: ReadingRow[] = [];
    for (const entry of got.flat()) {
      if (entry.value !== null) rows.push(entry.value as ReadingRow);
    }
    return rows;
  }

  // ---- batch jobs --------------------------------------------------------------------------

  /**
   * The readings are stored as the UTF-8 bytes of their JSON, cut into values of at most
   * {@linkcode PIECE_BYTES}. A small job is one atomic commit; a larger one uploads its pieces
   * first (under a `["batch_pending", id]` marker that a purge clears should the submission
   * die), then commits the job. That commit checks that `["batch_idem", user, key]` is absent
   * and writes it: of two concurrent submissions with one key, one makes the job, the other
   * fails its check, drops its pieces and returns that job.
   */
  async createBatchJob(
    input: NewBatchJob,
    readings: unknown[],
  ): Promise<{ job: BatchJob; created: boolean }> {
    const job = newBatchJob(input, readings);
    const existing = await this.#jobOfKey(job);
    if (existing !== null) return { job: existing, created: false };
    const pieces = splitPieces(encoder.encode(JSON.stringify(readings)));
    // The submission's errors, under a revision of their own like any later one.
    const errorPieces = job.errors.length === 0
      ? []
      : splitPieces(encoder.encode(JSON.stringify(job.errors)));
    const errorsPrefix: Deno.KvKey = ["batch_errors", job.id, SUBMITTED_ERRORS_REV];
    const record: KvJob = {
      ...withoutErrors(job),
      items_pieces: pieces.length,
      errors_rev: errorPieces.length === 0
        ? null
        : { rev: SUBMITTED_ERRORS_REV, pieces: errorPieces.length },
    };
    const inline = pieces.length + errorPieces.length <= PIECES_PER_COMMIT;
    if (!inline) {
      await this.#uploadPieces(["batch_items", job.id], pieces, {
        key: ["batch_pending", job.id],
        value: job.created_at,
      });
      await this.#uploadPieces(errorsPrefix, errorPieces);
    }
    const idemKey: Deno.KvKey | null = job.idempotency_key === null
      ? null
      : ["batch_idem", job.user_id, job.idempotency_key];
    const op = this.#kv.atomic().check({ key: ["batch_jobs", job.id], versionstamp: null });
    if (idemKey !== null) op.check({ key: idemKey, versionstamp: null }).set(idemKey, job.id);
    if (inline) {
      pieces.forEach((piece, n) => op.set(["batch_items", job.id, n], piece));
      errorPieces.forEach((piece, n) => op.set([...errorsPrefix, n], piece));
    } else op.delete(["batch_pending", job.id]);
    writeJob(op, null, record);
    if ((await commit(op)).ok) return { job, created: true };
    // Lost to a submission with the same key (or the id is taken).
    if (!inline) {
      await this.#deletePieces(errorsPrefix, errorPieces.length);
      await this.#deletePieces(["batch_items", job.id], pieces.length, job.id);
    }
    const winner = await this.#jobOfKey(job);
    if (winner !== null) return { job: winner, created: false };
    throw new GatewayError("conflict", `Batch job "${job.id}" already exists`);
  }

  /** The job of `job`'s user and idempotency key, if there is one. */
  async #jobOfKey(job: BatchJob): Promise<BatchJob | null> {
    if (job.idempotency_key === null) return null;
    const ref = await this.#kv.get<string>(["batch_idem", job.user_id, job.idempotency_key]);
    return ref.value === null ? null : await this.getBatchJob(ref.value);
  }

  /** Sets `pieces` under `prefix` in commits within KV's limits; the first also sets `marker`. */
  async #uploadPieces(
    prefix: Deno.KvKey,
    pieces: Uint8Array[],
    marker?: { key: Deno.KvKey; value: number },
  ): Promise<void> {
    for (let i = 0; i < pieces.length; i += PIECES_PER_COMMIT) {
      const op = this.#kv.atomic();
      if (i === 0 && marker !== undefined) op.set(marker.key, marker.value);
      for (let n = i; n < Math.min(pieces.length, i + PIECES_PER_COMMIT); n++) {
        op.set([...prefix, n], pieces[n]);
      }
      await commitOrThrow(op);
    }
  }

  /** Deletes `count` pieces under `prefix` (and the pending marker of `jobId`). */
  async #deletePieces(prefix: Deno.KvKey, count: number, jobId?: string): Promise<void> {
    for (let i = 0; i < count || i === 0; i += MAX_MUTATIONS - 1) {
      const op = this.#kv.atomic();
      if (i === 0 && jobId !== undefined) op.delete(["batch_pending", jobId]);
      for (let n = i; n < Math.min(count, i + MAX_MUTATIONS - 1); n++) op.delete([...prefix, n]);
      await commitOrThrow(op);
    }
  }

  /** Reads and joins `count` pieces; `null` when one is missing (replaced meanwhile). */
  async #readPieces(prefix: Deno.KvKey, count: number): Promise<unknown[] | null> {
    if (count === 0) return [];
    const keys = Array.from({ length: count }, (_, n) => [...prefix, n]);
    const groups: Deno.KvKey[][] = [];
    for (let i = 0; i < keys.length; i += GET_MANY_MAX) {
      groups.push(keys.slice(i, i + GET_MANY_MAX));
    }
    const got = (await mapPool(groups, READ_CONCURRENCY, (g) => this.#kv.getMany<Uint8Array[]>(g)))
      .flat();
    if (got.some((entry) => entry.value === null)) return null;
    return JSON.parse(decoder.decode(joinPieces(got.map((entry) => entry.value!)))) as unknown[];
  }

  /** The job of a stored record, with its errors (`null` when they were replaced meanwhile). */
  async #withErrors(record: KvJob): Promise<BatchJob | null> {
    const { items_pieces: _, errors_rev, ...rest } = record;
    let errors: BatchItemError[] = [];
    if (errors_rev !== null) {
      const read = await this.#readPieces(
        ["batch_errors", record.id, errors_rev.rev],
        errors_rev.pieces,
      );
      if (read === null) return null;
      errors = read as BatchItemError[];
    }
    return { ...rest, errors };
  }

  async getBatchJob(id: string): Promise<BatchJob | null> {
    for (;;) {
      const { value } = await this.#kv.get<KvJob>(["batch_jobs", id]);
      if (value === null) return null;
      const job = await this.#withErrors(value);
      if (job !== null) return job;
    }
  }

  async listBatchJobs(query: BatchJobQuery): Promise<Page<BatchJob>> {
    const limit = checkLimit(query.limit);
    // With both filters: the user's jobs, filtered by status (a user has few jobs).
    const prefix: Deno.KvKey = query.user_id !== undefined
      ? ["batch_by_user", query.user_id]
      : query.status !== undefined
      ? ["batch_by_status", query.status]
      : ["batch_by_time"];
    const filter = query.user_id !== undefined && query.status !== undefined;
    const selector: Deno.KvListSelector = query.cursor === undefined ? { prefix } : (() => {
      const after = decodeJobCursor(query.cursor!);
      return { prefix, end: [...prefix, after.created_at, after.id] };
    })();
    const iter = this.#kv.list<null>(selector, {
      reverse: true,
      limit: filter ? undefined : limit + 1,
      batchSize: filter ? 100 : batchSizeFor(limit + 1),
    });
    const items: BatchJob[] = [];
    let more = false;
    let ids: string[] = [];
    const drain = async (): Promise<boolean> => {
      const jobs = await Promise.all(ids.map((id) => this.getBatchJob(id)));
      ids = [];
      for (const job of jobs) {
        if (job === null || (filter && job.status !== query.status)) continue;
        if (items.length === limit) {
          more = true;
          return false;
        }
        items.push(job);
      }
      return true;
    };
    let open = true;
    for await (const entry of iter) {
      ids.push(entry.key.at(-1) as string);
      if (ids.length === FILTER_GROUP && !(open = await drain())) break;
    }
    if (open && ids.length > 0) await drain();
    return { items, next_cursor: more ? encodeJobCursor(items.at(-1)!) : null };
  }

  async countBatchJobs(): Promise<Record<BatchStatus, number>> {
    const got = await this.#kv.getMany<Deno.KvU64[]>(
      BATCH_STATUSES.map((status) => ["batch_counts", status]),
    );
    const counts = zeroCounts();
    BATCH_STATUSES.forEach((status, i) => {
      counts[status] = got[i].value === null ? 0 : Number(got[i].value!.value);
    });
    return counts;
  }

  /**
   * Scans the live jobs (`["batch_live", created_at, id]`: queued and running, oldest first)
   * for the first claimable one and takes it with a commit that checks the job's versionstamp;
   * a claimer that lost the race to another goes on with the next.
   */
  async claimBatchJob(
    owner: string,
    now: number,
    leaseMs: number,
  ): Promise<ClaimedBatchJob | null> {
    checkClaim(owner, now, leaseMs);
    const iter = this.#kv.list<LiveEntry>({ prefix: ["batch_live"] }, { batchSize: 100 });
    for await (const entry of iter) {
      if (!claimable(entry.value, now)) continue;
      const id = entry.key[2] as string;
      const current = await this.#kv.get<KvJob>(["batch_jobs", id]);
      if (current.value === null || !claimable(current.value, now)) continue;
      const before = current.value;
      const after: KvJob = {
        ...before,
        status: "running",
        lease_owner: owner,
        lease_until: now + leaseMs,
        attempts: before.attempts + 1,
        started_at: before.started_at ?? now,
        updated_at: now,
      };
      const op = this.#kv.atomic().check(current);
      writeJob(op, before, after);
      if (!(await commit(op)).ok) continue;
      // The claim holds the job: its readings and errors are not replaced under us.
      const [job, readings] = await Promise.all([
        this.#withErrors(after),
        this.#readPieces(["batch_items", id], after.items_pieces),
      ]);
      if (job === null || readings === null) {
        throw new GatewayError("internal", `Batch job "${id}" lost part of its stored data`);
      }
      return { job, readings };
    }
    return null;
  }

  async heartbeatBatchJob(
    id: string,
    owner: string,
    leaseUntil: number,
    progress?: BatchProgress,
  ): Promise<boolean> {
    if (progress !== undefined) checkProgress(progress);
    if (!Number.isSafeInteger(leaseUntil)) {
      throw new RangeError(`leaseUntil must be epoch milliseconds, got ${leaseUntil}`);
    }
    return await this.#changeLeased(id, owner, (job) => {
      const after: KvJob = { ...job, lease_until: leaseUntil };
      if (progress !== undefined) {
        after.successful = progress.successful;
        after.failed = progress.failed;
        after.duplicates = progress.duplicates;
      }
      return { after, errors: progress?.errors };
    });
  }

  async finishBatchJob(
    id: string,
    owner: string,
    change: BatchFinish,
    now: number,
  ): Promise<boolean> {
    checkFinish(change, now);
    return await this.#changeLeased(id, owner, (job) => {
      const { errors: _, ...next } = finishedJob({ ...job, errors: [] }, change, now);
      return {
        after: { ...next, items_pieces: job.items_pieces, errors_rev: job.errors_rev },
        errors: change.errors,
      };
    });
  }

  /**
   * Applies `change` to a running job while its lease is `owner`'s (false once it is not),
   * replacing its errors when `change` gives new ones: small errors in the same commit, larger
   * ones uploaded first under a new revision (dropped again should the commit fail).
   */
  async #changeLeased(
    id: string,
    owner: string,
    change: (job: KvJob) => { after: KvJob; errors?: BatchItemError[] },
  ): Promise<boolean> {
    for (let attempt = 0;; attempt++) {
      const current = await this.#kv.get<KvJob>(["batch_jobs", id]);
      const before = current.value;
      if (before === null || before.status !== "running" || before.lease_owner !== owner) {
        return false;
      }
      const { after, errors } = change(before);
      const op = this.#kv.atomic().check(current);
      let uploaded: { rev: string; pieces: number } | null = null;
      if (errors !== undefined) {
        if (errors.length === 0) after.errors_rev = null;
        else {
          const pieces = splitPieces(encoder.encode(JSON.stringify(errors)));
          const rev = crypto.randomUUID();
          const prefix = ["batch_errors", id, rev];
          if (pieces.length <= PIECES_PER_COMMIT) {
            pieces.forEach((piece, n) => op.set([...prefix, n], piece));
          } else {
            await this.#uploadPieces(prefix, pieces);
            uploaded = { rev, pieces: pieces.length };
          }
          after.errors_rev = { rev, pieces: pieces.length };
        }
      }
      writeJob(op, before, after);
      const old = before.errors_rev;
      const replaced = errors !== undefined && old !== null;
      // The old revision goes in the same commit when it is small, else right after it.
      if (replaced && old.pieces <= PIECES_PER_COMMIT) {
        for (let n = 0; n < old.pieces; n++) op.delete(["batch_errors", id, old.rev, n]);
      }
      const ok = (await commit(op)).ok;
      if (!ok) {
        if (uploaded !== null) {
          await this.#deletePieces(["batch_errors", id, uploaded.rev], uploaded.pieces);
        }
        if (attempt === MAX_ATTEMPTS) {
          throw new GatewayError("unavailable", `Batch job "${id}" is changing too often; retry`);
        }
        continue;
      }
      if (replaced && old.pieces > PIECES_PER_COMMIT) {
        await this.#deletePieces(["batch_errors", id, old.rev], old.pieces);
      }
      return true;
    }
  }

  async retryBatchJob(id: string, now: number): Promise<BatchJob> {
    for (let attempt = 0;; attempt++) {
      const current = await this.#kv.get<KvJob>(["batch_jobs", id]);
      const before = current.value;
      if (before === null) throw new GatewayError("not_found", `Batch job "${id}" not found`);
      if (!RETRYABLE_STATUSES.includes(before.status)) {
        throw new GatewayError(
          "conflict",
          `Batch job "${id}" is ${before.status}: only dead or failed jobs can be retried`,
          { details: { status: before.status } },
        );
      }
      const { errors: _, ...next } = retriedJob({ ...before, errors: [] }, now);
      const after: KvJob = { ...next, items_pieces: before.items_pieces, errors_rev: null };
      const op = this.#kv.atomic().check(current);
      writeJob(op, before, after);
      const old = before.errors_rev;
      if (old !== null && old.pieces <= PIECES_PER_COMMIT) {
        for (let n = 0; n < old.pieces; n++) op.delete(["batch_errors", id, old.rev, n]);
      }
      if ((await commit(op)).ok) {
        if (old !== null && old.pieces > PIECES_PER_COMMIT) {
          await this.#deletePieces(["batch_errors", id, old.rev], old.pieces);
        }
        return { ...withoutStorage(after), errors: [] };
      }
      if (attempt === MAX_ATTEMPTS) {
        throw new GatewayError("unavailable", `Batch job "${id}" is changing too often; retry`);
      }
    }
  }

  /**
   * Deletes finished jobs by `["batch_finished", finished_at, id]`, each with its indexes and
   * idempotency key in one commit checked against the job (a job retried meanwhile stays), then
   * its pieces. Also clears submissions that died between uploading and committing.
   */
  async purgeBatchJobs(before: number): Promise<number> {
    if (!Number.isSafeInteger(before)) {
      throw new RangeError(`before must be epoch milliseconds, got ${before}`);
    }
    let purged = 0;
    const iter = this.#kv.list<null>({
      start: ["batch_finished"],
      end: ["batch_finished", before],
    }, { batchSize: 100 });
    for await (const entry of iter) {
      const id = entry.key[2] as string;
      const current = await this.#kv.get<KvJob>(["batch_jobs", id]);
      const job = current.value;
      if (job === null || !FINISHED_STATUSES.includes(job.status)) continue;
      const op = this.#kv.atomic().check(current);
      writeJob(op, job, null);
      if (job.idempotency_key !== null) {
        op.delete(["batch_idem", job.user_id, job.idempotency_key]);
      }
      if (!(await commit(op)).ok) continue;
      purged++;
      await this.#deletePieces(["batch_items", id], job.items_pieces);
      if (job.errors_rev !== null) {
        await this.#deletePieces(["batch_errors", id, job.errors_rev.rev], job.errors_rev.pieces);
      }
    }
    for await (const entry of this.#kv.list<number>({ prefix: ["batch_pending"] })) {
      if (entry.value >= before) continue;
      const id = entry.key[1] as string;
      const errorsPrefix: Deno.KvKey = ["batch_errors", id, SUBMITTED_ERRORS_REV];
      let errorPieces = 0;
      for await (const _ of this.#kv.list({ prefix: errorsPrefix })) errorPieces++;
      if (errorPieces > 0) await this.#deletePieces(errorsPrefix, errorPieces);
      const pieces: Deno.KvKey[] = [];
      for await (const piece of this.#kv.list({ prefix: ["batch_items", id] })) {
        pieces.push(piece.key);
      }
      await this.#deletePieces(["batch_items", id], pieces.length, id);
    }
    return purged;
  }

  async readingsOfBatchJob(id: string): Promise<{ meter_id: string; ts: number }[]> {
    const out: { meter_id: string; ts: number }[] = [];
    const iter = this.#kv.list<null>({ prefix: ["readings_by_batch", id] }, { batchSize: 1000 });
    for await (const entry of iter) {
      out.push({ meter_id: entry.key[2] as string, ts: entry.key[3] as number });
    }
    return out;
  }

  // ---- lifecycle ---------------------------------------------------------------------------

  async ping(): Promise<void> {
    await this.#kv.get(["ping"]);
  }

  /** Closes the KV handle; closing again does nothing. */
  close(): Promise<void> {
    if (!this.#closed) {
      this.#closed = true;
      this.#kv.close();
    }
    return Promise.resolve();
  }
}

/** The decision for one meter's pending rows, and its head as the commits advance it. */
interface MeterPlan {
  meter: string;
  /** Pending rows of this meter, in input order. */
  indices: number[];
  /** Rows to store, in input order. */
  accepted: number[];
  head: MeterHead | null;
  /** A commit of this meter lost a race or was skipped after one: it is re-planned. */
  failed: boolean;
}

/** One meter's share of one atomic commit. */
interface ChunkPart {
  plan: MeterPlan;
  rows: number[];
  /** The seq of `rows[0]`; the others follow one by one. */
  firstSeq: number;
  headAfter: MeterHead;
  /** A new meter or a new owner: the head is stored in this part's commit. */
  writesHead: boolean;
  newMeter: boolean;
  newUsers: string[];
}

interface Totals {
  count: number;
  kwh_e4: number;
  meters: number;
  minted: number;
}

function newTotals(): Totals {
  return { count: 0, kwh_e4: 0, meters: 0, minted: 0 };
}

function totalsOf(map: Map<string, Totals>, user: string): Totals {
  let totals = map.get(user);
  if (totals === undefined) {
    totals = newTotals();
    map.set(user, totals);
  }
  return totals;
}

function addTotals(op: Deno.AtomicOperation, prefix: Deno.KvKey, totals: Totals): void {
  for (const field of TOTAL_FIELDS) {
    if (totals[field] > 0) op.sum([...prefix, field], BigInt(totals[field]));
  }
}

/** Packs the accepted rows into commits within KV's limits on checks, mutations and bytes. */
function buildChunks(rows: ReadingRow[], plans: MeterPlan[]): ChunkPart[][] {
  const chunks: ChunkPart[][] = [];
  let parts: ChunkPart[] = [];
  /** Per-user total fields (bit masks of TOTAL_FIELDS) already summed in the chunk. */
  let users = new Map<string, number>();
  let mutations = GLOBAL_MUTATIONS;
  let keyBytes = GLOBAL_BYTES;
  let bytes = GLOBAL_BYTES;
  const flush = () => {
    if (parts.length > 0) chunks.push(parts);
    parts = [];
    users = new Map();
    mutations = GLOBAL_MUTATIONS;
    keyBytes = GLOBAL_BYTES;
    bytes = GLOBAL_BYTES;
  };
  // Owners together: a commit then touches few pages of the per-owner index and totals.
  const ordered = plans.filter((plan) => plan.accepted.length > 0).map((plan) => ({
    plan,
    user: rows[plan.accepted[0]].user_id,
  })).sort((a, b) =>
    a.user < b.user ? -1 : a.user > b.user ? 1 : a.plan.meter < b.plan.meter ? -1 : 1
  );
  for (const { plan } of ordered) {
    const meterBytes = keyPartBytes(plan.meter);
    const headKeyBytes = 13 + meterBytes;
    const seqKeyBytes = 11 + meterBytes;
    // The head before the part being built; each part carries the head after it.
    let head = plan.head;
    let part: ChunkPart | null = null;
    for (const i of plan.accepted) {
      const row = rows[i];
      const userBytes = keyPartBytes(row.user_id);
      // A row of a batch job has one more index entry.
      const batchKeyBytes = row.batch_job_id === undefined
        ? 0
        : 20 + keyPartBytes(row.batch_job_id) + meterBytes + 9;
      const rowKeyBytes = (10 + meterBytes + 9) + (18 + userBytes + 9 + meterBytes) +
        (18 + 9 + meterBytes) + (17 + meterBytes + 9) + batchKeyBytes;
      // The row carries its seq (SEQ_BYTES), and the seq index points at its ts.
      const rowBytes = rowKeyBytes + rowValueBytes(row) + SEQ_BYTES +
        3 * (MUTATION_OVERHEAD + 1) + (MUTATION_OVERHEAD + SEQ_BYTES) +
        (row.batch_job_id === undefined ? 0 : MUTATION_OVERHEAD + 1);
      const cost = () => {
        const newPart = part === null;
        const headUsers = newPart ? (head?.user_ids ?? []) : part!.headAfter.user_ids;
        // The per-user sums this row adds (addTotals skips zero fields).
        const fields = FIELD_COUNT | (row.kwh_e4 > 0 ? FIELD_KWH : 0) |
          (headUsers.includes(row.user_id) ? 0 : FIELD_METERS) | (row.minted ? FIELD_MINTED : 0);
        const had = users.get(row.user_id) ?? 0;
        const sums = popCount(fields & ~had);
        let m = row.batch_job_id === undefined ? 4 : 5;
        let k = rowKeyBytes;
        let b = rowBytes;
        if (newPart) {
          // The meter's ["meter_seq", …], once per part.
          m += 1;
          k += seqKeyBytes;
          b += seqKeyBytes + SEQ_BYTES + MUTATION_OVERHEAD;
        }
        // The head is stored once per part, by the first row that brings a new owner (or the
        // meter's first rows).
        const writesHead = !headUsers.includes(row.user_id) && !(part?.writesHead ?? false);
        if (writesHead) {
          m += 1;
          k += headKeyBytes;
          b += headKeyBytes + 80 + MUTATION_OVERHEAD +
            headUsers.reduce((n, u) => n + stringValueBytes(u), 0);
        }
        if (!headUsers.includes(row.user_id)) b += stringValueBytes(row.user_id);
        m += sums;
        k += sums * (16 + userBytes + 8);
        b += sums * (16 + userBytes + 8 + 9 + MUTATION_OVERHEAD);
        return { m, k, b, newPart, writesHead, fields: fields | had };
      };
      let c = cost();
      const fits = () =>
        mutations + c.m <= MAX_MUTATIONS && keyBytes + c.k <= MAX_KEY_BYTES &&
        bytes + c.b <= MAX_MUTATION_BYTES;
      if (!fits()) {
        if (part !== null) head = part.headAfter;
        flush();
        part = null;
        c = cost();
        if (!fits()) throw new RangeError(`reading of meter ${row.meter_id} is too large`);
      }
      mutations += c.m;
      keyBytes += c.k;
      bytes += c.b;
      users.set(row.user_id, c.fields);
      if (part === null) {
        part = {
          plan,
          rows: [],
          headAfter: head === null
            ? { user_ids: [], min_ts: row.ts, max_ts: row.ts, seq: 0 }
            : { ...head, user_ids: [...head.user_ids] },
          firstSeq: (head?.seq ?? 0) + 1,
          writesHead: false,
          newMeter: head === null,
          newUsers: [],
        };
        parts.push(part);
      }
      part.rows.push(i);
      if (c.writesHead) part.writesHead = true;
      const after = part.headAfter;
      after.seq++;
      if (row.ts < after.min_ts) after.min_ts = row.ts;
      if (row.ts > after.max_ts) after.max_ts = row.ts;
      if (!after.user_ids.includes(row.user_id)) {
        after.user_ids.push(row.user_id);
        part.newUsers.push(row.user_id);
      }
    }
  }
  flush();
  return chunks;
}

// Upper bound of a serialized seq (a number) or of the `seq` member a row gains.
const SEQ_BYTES = 16;
const FIELD_COUNT = 1;
const FIELD_KWH = 2;
const FIELD_METERS = 4;
const FIELD_MINTED = 8;

function popCount(mask: number): number {
  let n = 0;
  for (let m = mask; m !== 0; m &= m - 1) n++;
  return n;
}

/** Encoded size of a string key part: tag, UTF-8 bytes (NUL escaped), terminator. */
function keyPartBytes(s: string): number {
  let n = 2;
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    if (c === 0) n += 2;
    else if (c < 0x80) n += 1;
    else if (c < 0x800) n += 2;
    else n += 3;
  }
  return n;
}

/** Upper bound of a string's serialized size (two-byte strings are the worst case). */
function stringValueBytes(s: string | null): number {
  return s === null ? 1 : 2 * s.length + 6;
}

/** Upper bound of a row's serialized size (measured: ~310 bytes for a typical row). */
function rowValueBytes(row: ReadingRow): number {
  return 160 + stringValueBytes(row.meter_id) + stringValueBytes(row.user_id) +
    stringValueBytes(row.wallet_address) + stringValueBytes(row.key_id) +
    stringValueBytes(row.device_signature) + stringValueBytes(row.source) +
    (row.batch_job_id === undefined ? 0 : 16 + stringValueBytes(row.batch_job_id));
}

// ---- batch jobs --------------------------------------------------------------------------------

/** A job as stored: its errors live in pieces of their own (they may exceed a value's 64 KiB). */
type KvJob = Omit<BatchJob, "errors"> & {
  /** Pieces of the readings under ["batch_items", id]. */
  items_pieces: number;
  /** The errors' revision and pieces under ["batch_errors", id, rev]; `null`: none. */
  errors_rev: { rev: string; pieces: number } | null;
};

/** What a claim judges a live job by (kept in step with the job). */
type LiveEntry = Pick<BatchJob, "status" | "run_after" | "lease_until">;

// A value holds at most 64 KiB; a commit at most 800 KiB of mutations: ten pieces leave room.
const PIECE_BYTES = 65_536;
/** The revision of the errors a job is created with (later ones are random UUIDs). */
const SUBMITTED_ERRORS_REV = "submitted";
const PIECES_PER_COMMIT = 10;
const encoder = new TextEncoder();
const decoder = new TextDecoder();

function isLive(job: KvJob | null): job is KvJob {
  return job !== null && (job.status === "queued" || job.status === "running");
}

function claimable(job: LiveEntry, now: number): boolean {
  return (job.status === "queued" && job.run_after <= now) ||
    (job.status === "running" && job.lease_until !== null && job.lease_until < now);
}

/** Adds to `op` the change of a job from `before` to `after` (`null`: absent) with its indexes. */
function writeJob(op: Deno.AtomicOperation, before: KvJob | null, after: KvJob | null): void {
  const job = (after ?? before)!;
  const { id, created_at } = job;
  if (after === null) {
    op.delete(["batch_jobs", id]);
    op.delete(["batch_by_time", created_at, id]);
    op.delete(["batch_by_user", job.user_id, created_at, id]);
  } else {
    op.set(["batch_jobs", id], after);
    if (before === null) {
      op.set(["batch_by_time", created_at, id], null);
      op.set(["batch_by_user", job.user_id, created_at, id], null);
    }
  }
  if (before?.status !== after?.status) {
    if (before !== null) {
      op.delete(["batch_by_status", before.status, created_at, id]);
      op.sum(["batch_counts", before.status], 0xffff_ffff_ffff_ffffn);
    }
    if (after !== null) {
      op.set(["batch_by_status", after.status, created_at, id], null);
      op.sum(["batch_counts", after.status], 1n);
    }
  }
  if (isLive(after)) {
    const live: LiveEntry = {
      status: after.status,
      run_after: after.run_after,
      lease_until: after.lease_until,
    };
    op.set(["batch_live", created_at, id], live);
  } else if (isLive(before)) {
    op.delete(["batch_live", created_at, id]);
  }
  const was = before?.finished_at ?? null;
  const is = after !== null && FINISHED_STATUSES.includes(after.status) ? after.finished_at : null;
  if (was !== null && was !== is) op.delete(["batch_finished", was, id]);
  if (is !== null) op.set(["batch_finished", is, id], null);
}

function withoutErrors(job: BatchJob): Omit<BatchJob, "errors"> {
  const { errors: _, ...rest } = job;
  return rest;
}

function withoutStorage(job: KvJob): Omit<BatchJob, "errors"> {
  const { items_pieces: _i, errors_rev: _e, ...rest } = job;
  return rest;
}

/** `bytes` cut into values KV can hold. */
function splitPieces(bytes: Uint8Array): Uint8Array[] {
  const pieces: Uint8Array[] = [];
  for (let i = 0; i < bytes.length; i += PIECE_BYTES) {
    pieces.push(bytes.slice(i, i + PIECE_BYTES));
  }
  return pieces;
}

function joinPieces(pieces: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(pieces.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const piece of pieces) {
    out.set(piece, at);
    at += piece.length;
  }
  return out;
}

/** Commits an operation without checks (it cannot fail but for the backend). */
async function commitOrThrow(op: Deno.AtomicOperation): Promise<void> {
  const res = await commit(op);
  if (!res.ok) throw new GatewayError("unavailable", "A KV commit without checks failed; retry");
}

/** Runs `fn` over `items` with at most `width` in flight; results in input order. */
async function mapPool<T, R>(
  items: T[],
  width: number,
  fn: (item: T, index: number) => Promise<R>,
): Promise<R[]> {
  const out = new Array<R>(items.length);
  let next = 0;
  const worker = async () => {
    while (next < items.length) {
      const i = next++;
      out[i] = await fn(items[i], i);
    }
  };
  await Promise.all(Array.from({ length: Math.min(width, items.length) }, worker));
  return out;
}

/** Commits `op`, retrying while another process holds the SQLite file's write lock. */
function isActiveAdmin(user: UserRecord): boolean {
  return user.role === "admin" && !user.disabled;
}

// Records written before accounts could be disabled lack the new fields.
function withUserDefaults(user: UserRecord): UserRecord {
  return {
    ...user,
    disabled: user.disabled ?? false,
    token_generation: user.token_generation ?? 0,
  };
}

async function commit(
  op: Deno.AtomicOperation,
): Promise<Deno.KvCommitResult | Deno.KvCommitError> {
  for (let attempt = 0;; attempt++) {
    try {
      return await op.commit();
    } catch (error) {
      if (!(error instanceof Error) || !error.message.includes("database is locked")) throw error;
      if (attempt === LOCK_RETRIES) {
        throw new GatewayError("unavailable", "the KV database is locked by another process", {
          cause: error,
        });
      }
      // A failed BEGIN left nothing behind, so the same operation can simply be sent again.
      const ms = Math.min(2 ** attempt, 100) * (0.5 + Math.random());
      await new Promise((resolve) => setTimeout(resolve, ms));
    }
  }
}

function setAudit(op: Deno.AtomicOperation, audit: AuditEntry): Deno.AtomicOperation {
  return op
    .set(["audit", audit.meter_id, audit.at, audit.id], audit)
    .set(["audit_all", audit.at, audit.id], audit);
}

function checkRow(row: ReadingRow): void {
  if (row.batch_job_id !== undefined && typeof row.batch_job_id !== "string") {
    throw new GatewayError("invalid_payload", "reading batch_job_id must be a string");
  }
  if (!Number.isSafeInteger(row.ts)) {
    throw new GatewayError("invalid_payload", `reading ts must be an integer, got ${row.ts}`);
  }
  if (!Number.isSafeInteger(row.kwh_e4) || row.kwh_e4 < 0) {
    throw new GatewayError(
      "invalid_payload",
      `reading kwh_e4 must be a non-negative integer, got ${row.kwh_e4}`,
    );
  }
}

function checkLimit(limit: number): number {
  if (!Number.isSafeInteger(limit) || limit < 1) {
    throw new GatewayError("invalid_payload", `limit must be a positive integer, got ${limit}`);
  }
  return limit;
}

function batchSizeFor(n: number): number {
  return Math.min(Math.max(n, 1), 1000);
}

/** The smallest key greater than `key` (keys of one index have a fixed length). */
function successor(key: Deno.KvKey): Deno.KvKey {
  return [...key, new Uint8Array()];
}

// KV orders part types as bytes < string < number < bigint < boolean.
function typeRank(part: Deno.KvKeyPart): number {
  if (part instanceof Uint8Array) return 0;
  switch (typeof part) {
    case "string":
      return 1;
    case "number":
      return 2;
    case "bigint":
      return 3;
    default:
      return 4;
  }
}

/** Compares two keys in KV order (strings by UTF-16 code units, which suffices for ids). */
function compareKeys(a: Deno.KvKey, b: Deno.KvKey): number {
  for (let i = 0; i < Math.min(a.length, b.length); i++) {
    const x = a[i];
    const y = b[i];
    const rank = typeRank(x) - typeRank(y);
    if (rank !== 0) return rank;
    if (x instanceof Uint8Array && y instanceof Uint8Array) {
      for (let j = 0; j < Math.min(x.length, y.length); j++) {
        if (x[j] !== y[j]) return x[j] - y[j];
      }
      if (x.length !== y.length) return x.length - y.length;
    } else if (x !== y) {
      return (x as string | number) < (y as string | number) ? -1 : 1;
    }
  }
  return a.length - b.length;
}

function decodeReadingCursor(cursor: string): { ts: number; meter_id: string } {
  const parts = decodeCursor(cursor);
  if (
    !Array.isArray(parts) || parts.length !== 2 || !Number.isSafeInteger(parts[0]) ||
    typeof parts[1] !== "string"
  ) {
    throw malformedCursor();
  }
  return { ts: parts[0], meter_id: parts[1] };
}

function decodeDeviceCursor(cursor: string): string {
  const parts = decodeCursor(cursor);
  if (!Array.isArray(parts) || parts.length !== 1 || typeof parts[0] !== "string") {
    throw malformedCursor();
  }
  return parts[0];
}
