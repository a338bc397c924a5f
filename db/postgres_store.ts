import {
  decodeCursor,
  decodeMsKeyCursor,
  encodeCursor,
  malformedCursor,
  validMs,
} from "./_cursor.ts";
import postgres from "postgres";
import {
  type BatchFinish,
  type BatchProgress,
  checkClaim,
  checkFinish,
  checkProgress,
  decodeJobCursor,
  encodeJobCursor,
  FINISHED_STATUSES,
  newBatchJob,
  zeroCounts,
} from "./_batch_jobs.ts";
import type { BatchItemError, BatchJob, BatchStatus } from "../core/batch.ts";
import type { AuditEntry, DeviceRecord, StoredKey } from "../core/device.ts";
import { GatewayError } from "../core/errors.ts";
import type { Logger } from "../core/logger.ts";
import type { ReadingRow, ReadingSource } from "../core/reading.ts";
import { collides, insertSorted, nearestColliding } from "../core/rules.ts";
import type { NewUserRecord, User, UserRecord } from "../core/user.ts";
import {
  type FailingJob,
  failingTimescaleJobs,
  migrate,
  schemaJobs,
  TIMESCALE_DEFAULTS,
  type TimescaleOptions,
  timescaleSchema,
} from "./migrate.ts";
import { openPinnedPool } from "./postgres_pool.ts";
import {
  type BatchJobQuery,
  type ClaimedBatchJob,
  type DeviceChange,
  type InsertResult,
  type NewBatchJob,
  ownsDevices,
  type Page,
  type PoolStats,
  type ReadingQuery,
  type ReadingStats,
  type Store,
  type StoreOptions,
  type UserChange,
} from "./store.ts";

/*
 * How insertReadings stays exact under concurrency
 *
 * One transaction per batch; in the common case a single statement, the function
 * `gateway_insert_readings_seq` of migration 0006 (in its version of 0008, which also stores
 * the rows' batch jobs; one round trip), which does steps 1 and 2:
 *
 *   1. Lock the batch's meters: one row per meter in `reading_meters`, upserted in meter_id
 *      order with `ON CONFLICT DO UPDATE ... WHERE false`, which row-locks existing meters
 *      without writing them and inserts (hence locks) new ones. Every writer takes these locks
 *      in the same order, so two writers cannot deadlock on them; a writer of an overlapping
 *      meter waits for the other's commit. Row locks live in the tuples, so batch width is
 *      not limited by the shared lock table that advisory locks use (with the defaults,
 *      max_locks_per_transaction 64 x max_connections 100, one transaction taking 20 000
 *      advisory locks failed here with "out of shared memory", and concurrent writers share
 *      that table).
 *   2. With the meters locked, one statement (READ COMMITTED: its snapshot is taken after
 *      the locks are granted, so it sees every earlier writer's commit; inside the function
 *      each statement takes a fresh snapshot) finds each row's
 *      nearest stored reading strictly within the window and inserts the other rows with
 *      `ON CONFLICT DO NOTHING`. That window check inside the INSERT is the database's
 *      enforcement of rule 3; the lock makes it race-free. A BEFORE INSERT trigger would need
 *      the same lock to be race-free and cannot report the colliding reading; measured, the
 *      trigger's probe alone took an unnest insert from ~60k to ~36k rows/s, about the rate
 *      of this whole scheme with locks and conflict reporting.
 *      The function numbers the rows it stores (`seq`, last_seq + 1, ... of the locked meter
 *      row, moved on by the statement that takes the lock and set back for rows that turned out
 *      duplicates): the lock, held to commit, makes each meter's numbers dense and
 *      commit-ordered, so a reader that sees seq = k also sees 1 .. k - 1.
 *   3. Only when the batch itself holds collisions (two rows of a meter strictly within the
 *      window) the stored neighbours are fetched first and the batch is judged in input
 *      order, as the port requires, before the accepted rows go through step 2.
 *
 * Step 1 takes every lock of a transaction, in one global order, before anything else waits,
 * so these transactions should never deadlock; should the server still report a deadlock or
 * serialization failure, the whole transaction runs again.
 */

/** Options of {@linkcode PostgresStore.connect}. */
export interface PostgresStoreOptions extends StoreOptions {
  /** Apply pending migrations before first use (default true). */
  migrate?: boolean;
  /** Connections in the pool (default 10). */
  max?: number;
  logger?: Logger;
  /** TimescaleDB intervals for the migration; `false` keeps plain PostgreSQL. */
  timescale?: TimescaleOptions | false;
}

/** One hour of one meter's readings; kWh as numbers, exact to 4 decimals for sums. */
export interface HourlyStat {
  /** Start of the hour, epoch ms (UTC). */
  hour: number;
  count: number;
  sum_kwh: number;
  avg_kwh: number;
  min_kwh: number;
  max_kwh: number;
}

/** Options of {@linkcode PostgresStore.deleteOlderThan}. */
export interface DeleteOptions {
  /** Told the size of each deleted chunk (progress, metrics). */
  onChunk?: (deleted: number) => void;
  /** Stops between chunks. */
  signal?: AbortSignal;
}

type Sql = postgres.Sql;
type Tx = postgres.TransactionSql;
type Fragment = postgres.Fragment;

const HOUR = 3_600_000;
const SOURCES: readonly ReadingSource[] = ["mqtt", "http", "batch"];
// numeric(12, 4): at most 99 999 999.9999 kWh.
const MAX_KWH_E4 = 999_999_999_999;
// Transactions that lose a deadlock or serialization race are run again this often.
const MAX_ATTEMPTS = 5;
// Driver and server conditions that mean "the database is not reachable right now".
const CONNECTION_CODES = new Set([
  "CONNECTION_CLOSED",
  "CONNECTION_ENDED",
  "CONNECTION_DESTROYED",
  "CONNECT_TIMEOUT",
  "ECONNREFUSED",
  "ECONNRESET",
  "EPIPE",
  "ETIMEDOUT",
  "EHOSTUNREACH",
  "ENETUNREACH",
  "ENOTFOUND",
  "EAI_AGAIN",
  "57014", // query_canceled (statement timeout)
  "57P01", // admin_shutdown
  "57P02", // crash_shutdown
  "57P03", // cannot_connect_now
  "53300", // too_many_connections
]);

/** A reading as selected (a driver row object; `toReading` copies it to a plain one). */
type ReadingRecord = Omit<ReadingRow, "seq" | "batch_job_id"> & {
  seq: number | null;
  batch_job_id: string | null;
};

/** A batch job as selected (`toJob` copies it to a plain one). */
type JobRecord = BatchJob;

// Readings of a batch job per row of batch_job_items (a chunk of ~100-300 KB of JSON).
const JOB_CHUNK = 500;

interface DeviceRow {
  meter_id: string;
  user_id: string;
  status: DeviceRecord["status"];
  created_at: number;
  updated_at: number;
  revoked_at: number | null;
  keys: StoredKey[];
}

interface AuditRow {
  id: string;
  meter_id: string;
  action: AuditEntry["action"];
  actor: string;
  at: number;
  key_id: string | null;
  note: string | null;
}

/** PostgreSQL / TimescaleDB adapter of the {@linkcode Store} port (postgres.js). */
export class PostgresStore implements Store {
  #sql: Sql;
  #windowMs: number;
  /** Schema of the TimescaleDB extension when its aggregate serves hourly stats, else null. */
  #timescale: string | null;
  #schema: string;
  /** Hours this recent are summed from raw readings: late readings may still land in them. */
  #rawStatsSpan: string;
  #closed: Promise<void> | undefined;

  /**
   * Wraps a pool on a migrated schema; the store owns it from now on and ends it in `close()`.
   * `timescale` names the TimescaleDB extension's schema when the schema uses it. Prefer
   * {@linkcode PostgresStore.connect}.
   */
  constructor(
    sql: Sql,
    options: StoreOptions & {
      timescale: string | null;
      /** The schema the pool is pinned to (for TimescaleDB's catalog, which names it). */
      schema?: string;
      refreshStartOffsetMs?: number;
    },
  ) {
    if (!Number.isSafeInteger(options.dedupeWindowMs) || options.dedupeWindowMs < 0) {
      throw new RangeError(
        `dedupeWindowMs must be a non-negative integer, got ${options.dedupeWindowMs}`,
      );
    }
    this.#sql = sql;
    // Timestamps are whole milliseconds, so a 1 ms window catches exactly the exact replays,
    // which collide whatever the window.
    this.#windowMs = Math.max(options.dedupeWindowMs, 1);
    this.#timescale = options.timescale;
    this.#schema = options.schema ?? "public";
    const span = options.refreshStartOffsetMs ?? TIMESCALE_DEFAULTS.refreshStartOffsetMs;
    this.#rawStatsSpan = `${Math.ceil(span / 1000)} seconds`;
  }

  /** Connects to `url` (postgres:// or postgresql://), migrating the schema unless told not to. */
  static async connect(url: string, options: PostgresStoreOptions): Promise<PostgresStore> {
    checkUrl(url);
    const logger = options.logger;
    let sql: Sql, schema: string;
    try {
      ({ sql, schema } = await openPinnedPool(url, { max: options.max ?? 10, logger }));
    } catch (error) {
      throw toGatewayError(error);
    }
    try {
      if (options.migrate ?? true) {
        await migrate(sql, { logger, timescale: options.timescale });
      } else {
        const [row] = await sql<{ ok: boolean }[]>`
          SELECT to_regclass('meter_readings') IS NOT NULL AS ok`;
        if (!row.ok) {
          throw new GatewayError(
            "unavailable",
            "The database has no gateway schema: run `deno task migrate`",
          );
        }
      }
      const timescale = options.timescale === false ? null : await timescaleSchema(sql);
      logger?.info(
        timescale === null ? "storage mode: plain PostgreSQL" : "storage mode: TimescaleDB",
      );
      const wanted = (options.timescale || {}).refreshStartOffsetMs ??
        TIMESCALE_DEFAULTS.refreshStartOffsetMs;
      let span = wanted;
      if (timescale !== null) {
        // The policy may have been set by another configuration (a migration run elsewhere):
        // hours it no longer refreshes must still be summed from raw rows.
        const live = await liveRefreshStartOffsetMs(sql, schema);
        if (live !== null && live < wanted) {
          logger?.warn(
            "the hourly stats refresh policy looks back less than READING_MAX_AGE + 1 day: " +
              "run `deno task migrate` with this configuration",
            { policy_start_offset_ms: live, wanted_ms: wanted },
          );
        }
        span = Math.max(wanted, live ?? 0);
      }
      return new PostgresStore(sql, {
        ...options,
        schema,
        timescale,
        refreshStartOffsetMs: span,
      });
    } catch (error) {
      await sql.end({ timeout: 5 });
      throw toGatewayError(error);
    }
  }

  /** Whether hourly stats come from TimescaleDB's continuous aggregate. */
  get timescale(): boolean {
    return this.#timescale !== null;
  }

  // ---- users -------------------------------------------------------------------------------

  async createUser(user: NewUserRecord): Promise<void> {
    const sql = this.#sql;
    try {
      await sql`
        INSERT INTO users (id, email, role, wallet_address, password_hash, created_at, disabled,
                           token_generation)
        VALUES (${user.id}, ${user.email}, ${user.role}, ${user.wallet_address},
                ${user.password_hash}, ${date(user.created_at)}, ${user.disabled ?? false},
                ${user.token_generation ?? 0})`;
    } catch (error) {
      if (pgCode(error) === "23505") {
        throw new GatewayError(
          "conflict",
          constraintOf(error) === "users_email_key"
            ? `Email "${user.email}" is already registered`
            : `User "${user.id}" already exists`,
          { cause: error },
        );
      }
      throw toGatewayError(error);
    }
  }

  async getUser(id: string): Promise<User | null> {
    const record = await this.#findUser(this.#sql`id = ${id}`);
    if (record === null) return null;
    const { password_hash: _, ...user } = record;
    return user;
  }

  async getUserByEmail(email: string): Promise<UserRecord | null> {
    return await this.#findUser(this.#sql`email = ${email}`);
  }

  async #findUser(cond: Fragment): Promise<UserRecord | null> {
    const sql = this.#sql;
    const [row] = await guard(sql<UserRecord[]>`
      SELECT ${userColumns(sql)} FROM users WHERE ${cond}`);
    return row === undefined ? null : toUser(row);
  }

  async updateUser(id: string, change: UserChange): Promise<UserRecord> {
    return await guard(this.#sql.begin(async (tx) => {
      // One user change at a time: the last-admin rule reads other rows than the one it changes.
      await tx`SELECT pg_advisory_xact_lock(${USERS_LOCK})`;
      const [row] = await tx<UserRecord[]>`
        SELECT ${userColumns(tx)} FROM users WHERE id = ${id} FOR UPDATE`;
      if (row === undefined) throw new GatewayError("not_found", `User "${id}" not found`);
      const before = toUser(row);
      const after = change(before);
      if (after.id !== id || after.email !== before.email) {
        throw new TypeError(`A user change must keep id "${id}" and email`);
      }
      if (isActiveAdmin(before) && !isActiveAdmin(after)) await checkAnotherAdmin(tx, id);
      await tx`
        UPDATE users SET
          role = ${after.role}, wallet_address = ${after.wallet_address},
          password_hash = ${after.password_hash}, disabled = ${after.disabled},
          token_generation = ${after.token_generation}
        WHERE id = ${id}`;
      return after;
    }));
  }

  async deleteUser(id: string): Promise<UserRecord> {
    return await guard(this.#sql.begin(async (tx) => {
      await tx`SELECT pg_advisory_xact_lock(${USERS_LOCK})`;
      const [row] = await tx<UserRecord[]>`
        SELECT ${userColumns(tx)} FROM users WHERE id = ${id} FOR UPDATE`;
      if (row === undefined) throw new GatewayError("not_found", `User "${id}" not found`);
      const user = toUser(row);
      if (isActiveAdmin(user)) await checkAnotherAdmin(tx, id);
      // The row lock above waits for any createDevice holding this user's row (FOR KEY SHARE),
      // so a device registered concurrently is counted here, or refused there.
      const [{ n }] = await tx<{ n: number }[]>`
        SELECT count(*)::int AS n FROM devices WHERE user_id = ${id} AND status <> 'revoked'`;
      if (n > 0) throw ownsDevices(n);
      await tx`DELETE FROM users WHERE id = ${id}`;
      return user;
    }));
  }

  async countUsers(): Promise<number> {
    const [row] = await guard(this.#sql<{ n: number }[]>`SELECT count(*)::float8 AS n FROM users`);
    return row.n;
  }

  // ---- devices -----------------------------------------------------------------------------

  async createDevice(
    device: DeviceRecord,
    audit: AuditEntry,
    options: { ownerMustExist?: boolean } = {},
  ): Promise<void> {
    await guard(this.#sql.begin(async (tx) => {
      // Holds the owner's row against a concurrent deleteUser until this commits.
      const owner = await tx`SELECT 1 FROM users WHERE id = ${device.user_id} FOR KEY SHARE`;
      if (owner.length === 0 && options.ownerMustExist) {
        throw new GatewayError("not_found", `User "${device.user_id}" does not exist`);
      }
      const inserted = await tx`
        INSERT INTO devices (meter_id, user_id, status, created_at, updated_at, revoked_at, keys)
        VALUES (${device.meter_id}, ${device.user_id}, ${device.status},
                ${date(device.created_at)}, ${date(device.updated_at)},
                ${nullableDate(device.revoked_at)}, ${tx.json(jsonKeys(device.keys))})
        ON CONFLICT (meter_id) DO NOTHING
        RETURNING meter_id`;
      if (inserted.length === 0) {
        throw new GatewayError("conflict", `Meter "${device.meter_id}" is already registered`);
      }
      await insertAudit(tx, audit);
    }));
  }

  async getDevice(meterId: string): Promise<DeviceRecord | null> {
    const sql = this.#sql;
    const [row] = await guard(sql<DeviceRow[]>`
      SELECT ${deviceColumns(sql)} FROM devices WHERE meter_id = ${meterId}`);
    return row === undefined ? null : toDevice(row);
  }

  async devicesChangedSince(
    since: number,
  ): Promise<{ meter_id: string; status: "active" | "revoked"; updated_at: number }[]> {
    const rows = await guard(this.#sql<{ meter_id: string; status: string; updated_at: Date }[]>`
      SELECT meter_id, status, updated_at FROM devices
      WHERE updated_at >= ${new Date(since)}
      ORDER BY updated_at, meter_id
      LIMIT 10000`);
    return rows.map((r) => ({
      meter_id: r.meter_id,
      status: r.status as "active" | "revoked",
      updated_at: r.updated_at.getTime(),
    }));
  }

  async updateDevice(meterId: string, change: DeviceChange): Promise<DeviceRecord> {
    // The row lock makes concurrent changes queue up, so `change` sees the latest record and
    // runs once; the contract's "runs again on the fresh record" never has to happen.
    return await guard(this.#sql.begin(async (tx) => {
      const [row] = await tx<DeviceRow[]>`
        SELECT ${deviceColumns(tx)} FROM devices WHERE meter_id = ${meterId} FOR UPDATE`;
      if (row === undefined) {
        throw new GatewayError("not_found", `Meter "${meterId}" is not registered`);
      }
      const { device, audit } = change(toDevice(row));
      if (device.meter_id !== meterId) {
        throw new TypeError(`A device change must keep meter_id "${meterId}"`);
      }
      await tx`
        UPDATE devices SET
          user_id = ${device.user_id}, status = ${device.status},
          created_at = ${date(device.created_at)}, updated_at = ${date(device.updated_at)},
          revoked_at = ${nullableDate(device.revoked_at)}, keys = ${tx.json(jsonKeys(device.keys))}
        WHERE meter_id = ${meterId}`;
      await insertAudit(tx, audit);
      return device;
    }));
  }

  async listDevices(
    query: { user_id?: string; limit: number; cursor?: string },
  ): Promise<Page<DeviceRecord>> {
    const sql = this.#sql;
    const limit = checkLimit(query.limit);
    const conds: Fragment[] = [];
    if (query.user_id !== undefined) conds.push(sql`user_id = ${query.user_id}`);
    if (query.cursor !== undefined) {
      conds.push(sql`meter_id > ${decodeDeviceCursor(query.cursor)}`);
    }
    const rows = await guard(sql<DeviceRow[]>`
      SELECT ${deviceColumns(sql)} FROM devices ${where(sql, conds)}
      ORDER BY meter_id LIMIT ${limit + 1}`);
    const items = rows.slice(0, limit).map(toDevice);
    return {
      items,
      next_cursor: rows.length > limit ? encodeCursor([items.at(-1)!.meter_id]) : null,
    };
  }

  async listAudit(query: { meter_id?: string; limit: number }): Promise<AuditEntry[]> {
    const sql = this.#sql;
    const limit = checkLimit(query.limit);
    const conds = query.meter_id === undefined ? [] : [sql`meter_id = ${query.meter_id}`];
    const rows = await guard(sql<AuditRow[]>`
      SELECT id, meter_id, action, actor, ${ms(sql, "at")}, key_id, note
      FROM device_audit ${where(sql, conds)}
      ORDER BY at, id LIMIT ${limit}`);
    return rows.map(toAudit);
  }

  // ---- readings ----------------------------------------------------------------------------

  async insertReadings(rows: ReadingRow[]): Promise<InsertResult[]> {
    for (const row of rows) checkRow(row);
    if (rows.length === 0) return [];
    const meters = [...new Set(rows.map((r) => r.meter_id))].sort();
    const all = rows.map((_, i) => i);
    const judgeFirst = hasBatchCollisions(rows, this.#windowMs);
    for (let attempt = 1;; attempt++) {
      try {
        // The common case: one statement, its own transaction, one round trip.
        if (!judgeFirst) return await this.#insertNew(this.#sql, rows, all, meters);
        return await this.#sql.begin(async (tx) => {
          // Plans of the judging query depend on the batch size (see migration 0003).
          await Promise.all([
            tx`SELECT set_config('plan_cache_mode', 'force_custom_plan', true),
                      set_config('jit', 'off', true)`.execute(),
            lockMeters(tx, meters),
          ]);
          return await this.#judgeThenInsert(tx, rows);
        });
      } catch (error) {
        const code = pgCode(error);
        if ((code === "40P01" || code === "40001") && attempt < MAX_ATTEMPTS) {
          await new Promise((resolve) => setTimeout(resolve, Math.random() * 10 * attempt));
          continue;
        }
        throw toGatewayError(error);
      }
    }
  }

  /**
   * Locks the meters (`sortedMeters`, those of `rows[indices]`) and inserts `rows[indices]`
   * except those with a stored reading strictly within the window, numbering them, in one
   * call (`gateway_insert_readings_seq`, migrations 0006 and 0008); returns one result per input row
   * (entries of rows outside `indices` are left empty).
   */
  async #insertNew(
    sql: Sql | Tx,
    rows: ReadingRow[],
    indices: number[],
    sortedMeters: string[],
  ): Promise<InsertResult[]> {
    const n = indices.length;
    const meter = new Array<string>(n);
    const ts = new Array<number>(n);
    const kwh = new Array<number>(n);
    const user = new Array<string>(n);
    const wallet = new Array<string | null>(n);
    const key = new Array<string>(n);
    const signature = new Array<string>(n);
    const source = new Array<string>(n);
    const submitted = new Array<number>(n);
    const minted = new Array<boolean>(n);
    // Sent as NULL (every row of no job) unless a row has one: the common case stays as cheap.
    let batch: (string | null)[] | null = null;
    for (let j = 0; j < n; j++) {
      const r = rows[indices[j]];
      meter[j] = r.meter_id;
      ts[j] = r.ts;
      kwh[j] = r.kwh_e4;
      user[j] = r.user_id;
      wallet[j] = r.wallet_address;
      key[j] = r.key_id;
      signature[j] = r.device_signature;
      source[j] = r.source;
      submitted[j] = r.submitted_at;
      minted[j] = r.minted;
      if (r.batch_job_id !== undefined) {
        batch ??= new Array<string | null>(n).fill(null);
        batch[j] = r.batch_job_id;
      }
    }
    const answers = await sql<{ ord: number; conflict_ts: number | null; seq: number | null }[]>`
      SELECT ord, conflict_ts, seq::float8 AS seq FROM gateway_insert_readings_seq(
        ${sql.array(sortedMeters, 25)}::text[],
        ${sql.array(meter, 25)}::text[], ${sql.array(ts, 20)}::int8[],
        ${sql.array(kwh, 20)}::int8[], ${sql.array(user, 25)}::text[],
        ${sql.array(wallet, 25)}::text[], ${sql.array(key, 25)}::text[],
        ${sql.array(signature, 25)}::text[], ${sql.array(source, 25)}::text[],
        ${sql.array(submitted, 20)}::int8[], ${sql.array(minted, 16)}::bool[],
        ${`${this.#windowMs} milliseconds`}::interval,
        ${batch === null ? null : sql.array(batch, 25)}::text[])`;
    // The function answers every row exactly once (or raises).
    const results = new Array<InsertResult>(rows.length);
    for (const a of answers) {
      results[indices[a.ord - 1]] = a.seq !== null
        ? { status: "stored", seq: a.seq }
        : { status: "duplicate", conflict_ts: a.conflict_ts! };
    }
    return results;
  }

  /** The slow path: a batch that collides with itself is judged row by row, in input order. */
  async #judgeThenInsert(tx: Tx, rows: ReadingRow[]): Promise<InsertResult[]> {
    // The batch's overall time bounds, constants the planner prunes chunks by (migration 0005).
    let lo = Infinity, hi = -Infinity;
    for (const r of rows) {
      if (r.ts < lo) lo = r.ts;
      if (r.ts > hi) hi = r.ts;
    }
    const window = `${this.#windowMs} milliseconds`;
    const near = await tx<{ ord: number; conflict_ts: number }[]>`
      SELECT i.ord::int4 AS ord, ${ms(tx, "h.hit", "conflict_ts")}
      FROM (
        SELECT u.ord, u.meter_id, timestamptz 'epoch' + u.ts_ms * interval '1 millisecond' AS ts
        FROM unnest(${tx.array(rows.map((r) => r.meter_id), 25)}::text[],
                    ${tx.array(rows.map((r) => r.ts), 20)}::int8[])
          WITH ORDINALITY AS u(meter_id, ts_ms, ord)
      ) i CROSS JOIN LATERAL gateway_nearest_reading(i.meter_id, i.ts, ${window}::interval,
        ${date(lo - this.#windowMs)}::timestamptz, ${date(hi + this.#windowMs)}::timestamptz) h`;
    const stored = new Map<number, number>();
    for (const c of near) stored.set(c.ord - 1, c.conflict_ts);
    const results = new Array<InsertResult>(rows.length);
    const accepted: number[] = [];
    const acceptedTs = new Map<string, number[]>();
    for (let i = 0; i < rows.length; i++) {
      const { meter_id, ts } = rows[i];
      let times = acceptedTs.get(meter_id);
      if (times === undefined) acceptedTs.set(meter_id, times = []);
      const hit = stored.get(i) ?? nearestColliding(times, ts, this.#windowMs);
      if (hit !== undefined) {
        results[i] = { status: "duplicate", conflict_ts: hit };
        continue;
      }
      insertSorted(times, ts);
      accepted.push(i);
    }
    if (accepted.length > 0) {
      const meters = [...new Set(accepted.map((i) => rows[i].meter_id))].sort();
      const inserted = await this.#insertNew(tx, rows, accepted, meters);
      for (const i of accepted) results[i] = inserted[i];
    }
    return results;
  }

  async readingsAfter(meterId: string, afterSeq: number, limit: number): Promise<ReadingRow[]> {
    if (!Number.isSafeInteger(afterSeq) || afterSeq < 0) {
      throw new GatewayError(
        "invalid_payload",
        `afterSeq must be a non-negative integer, got ${afterSeq}`,
      );
    }
    const sql = this.#sql;
    // meter_readings_seq_idx (migration 0006); rows of older releases (seq NULL) are not in it.
    const rows = await guard(sql<ReadingRecord[]>`
      SELECT ${readingColumns(sql)} FROM meter_readings
      WHERE meter_id = ${meterId} AND seq > ${afterSeq}
      ORDER BY seq LIMIT ${checkLimit(limit)}`);
    return rows.map(toReading);
  }

  async lastSeqs(meterIds: readonly string[]): Promise<Map<string, number>> {
    const out = new Map<string, number>();
    for (const id of meterIds) out.set(id, 0);
    if (out.size === 0) return out;
    const sql = this.#sql;
    const rows = await guard(sql<{ meter_id: string; last_seq: number }[]>`
      SELECT meter_id, last_seq::float8 AS last_seq FROM reading_meters
      WHERE meter_id = ANY(${sql.array([...out.keys()], 25)}::text[])`);
    for (const r of rows) out.set(r.meter_id, r.last_seq);
    return out;
  }

  async recentReadingTimes(meterId: string, limit: number): Promise<number[]> {
    if (limit <= 0) return [];
    const sql = this.#sql;
    const rows = await guard(sql<{ ts: number }[]>`
      SELECT ${ms(sql, "reading_timestamp", "ts")} FROM meter_readings
      WHERE meter_id = ${meterId}
      ORDER BY reading_timestamp DESC LIMIT ${Math.floor(limit)}`);
    return rows.map((r) => r.ts);
  }

  async getReading(meterId: string, ts: number): Promise<ReadingRow | null> {
    if (!validMs(ts)) return null;
    const sql = this.#sql;
    const [row] = await guard(sql<ReadingRecord[]>`
      SELECT ${readingColumns(sql)} FROM meter_readings
      WHERE meter_id = ${meterId} AND reading_timestamp = ${date(ts)}`);
    return row === undefined ? null : toReading(row);
  }

  async listReadings(query: ReadingQuery): Promise<Page<ReadingRow>> {
    const sql = this.#sql;
    const limit = checkLimit(query.limit);
    const desc = query.order === "desc";
    const conds: Fragment[] = [];
    if (query.meter_id !== undefined) conds.push(sql`meter_id = ${query.meter_id}`);
    if (query.user_id !== undefined) conds.push(sql`user_id = ${query.user_id}`);
    if (query.from !== undefined) {
      conds.push(sql`reading_timestamp >= ${date(checkMs(query.from, "from"))}`);
    }
    if (query.to !== undefined) {
      conds.push(sql`reading_timestamp < ${date(checkMs(query.to, "to"))}`);
    }
    if (query.minted !== undefined) conds.push(sql`minted = ${query.minted}`);
    if (query.cursor !== undefined) {
      // Keyset: strictly past the last row of the previous page in (time, meter) order.
      const after = decodeReadingCursor(query.cursor);
      const key = sql`(${date(after.ts)}::timestamptz, ${after.meter_id}::text)`;
      conds.push(
        desc
          ? sql`(reading_timestamp, meter_id) < ${key}`
          : sql`(reading_timestamp, meter_id) > ${key}`,
      );
    }
    const order = desc
      ? sql`ORDER BY reading_timestamp DESC, meter_id DESC`
      : sql`ORDER BY reading_timestamp, meter_id`;
    const rows = await guard(sql<ReadingRecord[]>`
      SELECT ${readingColumns(sql)} FROM meter_readings ${where(sql, conds)}
      ${order} LIMIT ${limit + 1}`);
    const items = rows.slice(0, limit).map(toReading);
    const last = items.at(-1);
    return {
      items,
      next_cursor: rows.length > limit && last ? encodeCursor([last.ts, last.meter_id]) : null,
    };
  }

  async readingStats(query: { user_id?: string }): Promise<ReadingStats> {
    const sql = this.#sql;
    const conds = query.user_id === undefined ? [] : [sql`user_id = ${query.user_id}`];
    const [row] = await guard(sql<ReadingStats[]>`
      SELECT count(DISTINCT meter_id)::float8 AS meter_count,
             count(*)::float8 AS reading_count,
             (coalesce(sum(kwh_amount), 0) * 10000)::float8 AS kwh_e4,
             (count(*) FILTER (WHERE minted))::float8 AS minted_count,
             ${ms(sql, "min(reading_timestamp)", "first_ts")},
             ${ms(sql, "max(reading_timestamp)", "last_ts")}
      FROM meter_readings ${where(sql, conds)}`);
    return {
      meter_count: row.meter_count,
      reading_count: row.reading_count,
      kwh_e4: row.kwh_e4,
      minted_count: row.minted_count,
      first_ts: row.first_ts,
      last_ts: row.last_ts,
    };
  }

  /**
   * Per-hour totals of one meter's readings for every UTC hour that overlaps `[from, to)`
   * (epoch ms), oldest first; hours without readings are left out. A committed reading counts
   * at once in every mode. On plain PostgreSQL every hour is summed from the primary key
   * index. With TimescaleDB, hours older than the refresh policy's start offset (past
   * READING_MAX_AGE, so no accepted reading can still land in them) come from the continuous
   * aggregate `meter_hourly_stats`; more recent hours, which a late reading may have changed
   * since the last refresh, are summed from the raw readings like on plain PostgreSQL.
   */
  async hourlyStats(meterId: string, from: number, to: number): Promise<HourlyStat[]> {
    const start = Math.floor(checkMs(from, "from") / HOUR) * HOUR;
    const end = Math.ceil(checkMs(to, "to") / HOUR) * HOUR;
    if (start >= end) return [];
    const sql = this.#sql;
    const raw = (lo: Fragment, hi: Fragment) =>
      sql`
        SELECT date_trunc('hour', reading_timestamp, 'UTC') AS bucket,
               count(*)::int4 AS count, sum(kwh_amount)::float8 AS sum_kwh,
               avg(kwh_amount)::float8 AS avg_kwh, min(kwh_amount)::float8 AS min_kwh,
               max(kwh_amount)::float8 AS max_kwh
        FROM meter_readings
        -- Scalar bounds: both ends of the primary key's range for this meter, and what
        -- TimescaleDB excludes chunks by (row comparisons did neither, see migration 0005).
        WHERE meter_id = ${meterId} AND reading_timestamp >= ${lo} AND reading_timestamp < ${hi}
        GROUP BY 1`;
    const lo = sql`${date(start)}::timestamptz`;
    const hi = sql`${date(end)}::timestamptz`;
    let rows: HourlyStat[];
    if (this.#timescale === null) {
      rows = await guard(sql<HourlyStat[]>`
        SELECT ${ms(sql, "bucket", "hour")}, count, sum_kwh, avg_kwh, min_kwh, max_kwh
        FROM (${raw(lo, hi)}) r ORDER BY bucket`);
    } else {
      // The split is taken by the server's clock, the one that stamps the policy's runs; a
      // stable expression, so TimescaleDB still excludes chunks when the query starts.
      const split = sql`greatest(${lo},
        least(${hi}, date_trunc('hour', now() - ${this.#rawStatsSpan}::interval, 'UTC')))`;
      rows = await guard(sql<HourlyStat[]>`
        SELECT ${ms(sql, "bucket", "hour")}, count, sum_kwh, avg_kwh, min_kwh, max_kwh FROM (
          SELECT bucket, reading_count::int4 AS count, sum_kwh::float8 AS sum_kwh,
                 avg_kwh::float8 AS avg_kwh, min_kwh::float8 AS min_kwh,
                 max_kwh::float8 AS max_kwh
          FROM meter_hourly_stats
          WHERE meter_id = ${meterId} AND bucket >= ${lo} AND bucket < ${split}
          UNION ALL
          ${raw(split, hi)}
        ) s ORDER BY bucket`);
    }
    return rows.map((r) => ({
      hour: r.hour,
      count: r.count,
      sum_kwh: r.sum_kwh,
      avg_kwh: r.avg_kwh,
      min_kwh: r.min_kwh,
      max_kwh: r.max_kwh,
    }));
  }

  /**
   * Materialises `meter_hourly_stats` over `[from, to)` now instead of at the next policy run
   * (TimescaleDB only; a no-op on plain PostgreSQL, where stats are always current).
   */
  async refreshHourlyStats(from: number, to: number): Promise<void> {
    if (this.#timescale === null) return;
    const start = Math.floor(checkMs(from, "from") / HOUR) * HOUR;
    const end = Math.ceil(checkMs(to, "to") / HOUR) * HOUR;
    const sql = this.#sql;
    await guard(sql`
      CALL ${sql(this.#timescale)}.refresh_continuous_aggregate('meter_hourly_stats',
        ${date(start)}::timestamptz, ${date(end)}::timestamptz)`);
  }

  /**
   * Deletes readings older than `cutoffMs`, oldest first, at most `chunk` rows per statement
   * (each its own short transaction, so the retention worker never holds long locks or bloats
   * one transaction). Returns how many rows were deleted.
   */
  async deleteOlderThan(
    cutoffMs: number,
    chunk: number,
    options: DeleteOptions = {},
  ): Promise<number> {
    const cutoff = date(checkMs(cutoffMs, "cutoffMs"));
    if (!Number.isSafeInteger(chunk) || chunk < 1) {
      throw new RangeError(`chunk must be a positive integer, got ${chunk}`);
    }
    const sql = this.#sql;
    let total = 0;
    for (;;) {
      options.signal?.throwIfAborted();
      const result = await guard(sql`
        DELETE FROM meter_readings m
        USING (
          SELECT meter_id, reading_timestamp FROM meter_readings
          WHERE reading_timestamp < ${cutoff}
          ORDER BY reading_timestamp, meter_id
          LIMIT ${chunk}
        ) old
        WHERE m.meter_id = old.meter_id AND m.reading_timestamp = old.reading_timestamp`);
      const deleted = result.count;
      total += deleted;
      if (deleted > 0) options.onChunk?.(deleted);
      if (deleted < chunk) return total;
    }
  }

  // ---- batch jobs --------------------------------------------------------------------------

  /**
   * One transaction: the job with its submission errors (`INSERT ... ON CONFLICT DO NOTHING`: a
   * concurrent insert with the same user and key waits for the other transaction and then does
   * nothing) and its readings in chunks of {@linkcode JOB_CHUNK} (`batch_job_items`). When
   * nothing was inserted, the job of that key is read and returned.
   */
  async createBatchJob(
    input: NewBatchJob,
    readings: unknown[],
  ): Promise<{ job: BatchJob; created: boolean }> {
    const job = newBatchJob(input, readings);
    const chunks: string[] = [];
    for (let i = 0; i < readings.length; i += JOB_CHUNK) {
      chunks.push(JSON.stringify(readings.slice(i, i + JOB_CHUNK)));
    }
    return await guard(this.#sql.begin(async (tx) => {
      const inserted = await tx`
        INSERT INTO batch_jobs (id, user_id, status, idempotency_key, body_sha256,
          total_submitted, failed, errors, created_at, updated_at, run_after)
        VALUES (${job.id}, ${job.user_id}, 'queued', ${job.idempotency_key}, ${job.body_sha256},
          ${job.total_submitted}, ${job.failed}, ${tx.json(jsonValue(job.errors))},
          ${date(job.created_at)}, ${date(job.created_at)}, ${date(job.created_at)})
        ON CONFLICT DO NOTHING
        RETURNING id`;
      if (inserted.length === 0) {
        const found = job.idempotency_key === null ? [] : await tx<JobRecord[]>`
          SELECT ${jobColumns(tx)} FROM batch_jobs
          WHERE user_id = ${job.user_id} AND idempotency_key = ${job.idempotency_key}`;
        if (found.length === 0) {
          throw new GatewayError("conflict", `Batch job "${job.id}" already exists`);
        }
        return { job: toJob(found[0]), created: false };
      }
      if (chunks.length > 0) {
        await tx`
          INSERT INTO batch_job_items (job_id, chunk_no, items)
          SELECT ${job.id}, c.no - 1, c.items::json
          FROM unnest(${tx.array(chunks, 25)}::text[]) WITH ORDINALITY AS c(items, no)`;
      }
      return { job, created: true };
    }));
  }

  async getBatchJob(id: string): Promise<BatchJob | null> {
    const sql = this.#sql;
    const [row] = await guard(sql<JobRecord[]>`
      SELECT ${jobColumns(sql)} FROM batch_jobs WHERE id = ${id}`);
    return row === undefined ? null : toJob(row);
  }

  async listBatchJobs(query: BatchJobQuery): Promise<Page<BatchJob>> {
    const sql = this.#sql;
    const limit = checkLimit(query.limit);
    const conds: Fragment[] = [];
    if (query.user_id !== undefined) conds.push(sql`user_id = ${query.user_id}`);
    if (query.status !== undefined) conds.push(sql`status = ${query.status}`);
    if (query.cursor !== undefined) {
      const after = decodeJobCursor(query.cursor);
      conds.push(
        sql`(created_at, id) < (${date(after.created_at)}::timestamptz, ${after.id}::text)`,
      );
    }
    const rows = await guard(sql<JobRecord[]>`
      SELECT ${jobColumns(sql)} FROM batch_jobs ${where(sql, conds)}
      ORDER BY created_at DESC, id DESC LIMIT ${limit + 1}`);
    const items = rows.slice(0, limit).map(toJob);
    return {
      items,
      next_cursor: rows.length > limit ? encodeJobCursor(items.at(-1)!) : null,
    };
  }

  async countBatchJobs(): Promise<Record<BatchStatus, number>> {
    const rows = await guard(this.#sql<{ status: BatchStatus; n: number }[]>`
      SELECT status, count(*)::float8 AS n FROM batch_jobs GROUP BY status`);
    const counts = zeroCounts();
    for (const r of rows) counts[r.status] = r.n;
    return counts;
  }

  /**
   * One transaction: the oldest claimable job, row-locked (`FOR UPDATE SKIP LOCKED`: a job
   * another claimer is taking is passed over, and one it took no longer qualifies when its
   * row is re-checked after the lock), leased, then its readings.
   */
  async claimBatchJob(
    owner: string,
    now: number,
    leaseMs: number,
  ): Promise<ClaimedBatchJob | null> {
    checkClaim(owner, now, leaseMs);
    const at = date(now);
    return await guard(this.#sql.begin(async (tx) => {
      // batch_jobs_claim_idx: the status condition matches its predicate.
      const [candidate] = await tx<{ id: string }[]>`
        SELECT id FROM batch_jobs
        WHERE status IN ('queued', 'running')
          AND ((status = 'queued' AND run_after <= ${at})
            OR (status = 'running' AND lease_until < ${at}))
        ORDER BY created_at, id
        LIMIT 1
        FOR UPDATE SKIP LOCKED`;
      if (candidate === undefined) return null;
      const [row] = await tx<JobRecord[]>`
        UPDATE batch_jobs SET
          status = 'running', lease_owner = ${owner}, lease_until = ${date(now + leaseMs)},
          attempts = attempts + 1, started_at = coalesce(started_at, ${at}), updated_at = ${at}
        WHERE id = ${candidate.id}
        RETURNING ${jobColumns(tx)}`;
      const chunks = await tx<{ items: string }[]>`
        SELECT items::text AS items FROM batch_job_items
        WHERE job_id = ${candidate.id} ORDER BY chunk_no`;
      const readings: unknown[] = [];
      for (const c of chunks) {
        for (const item of JSON.parse(c.items) as unknown[]) readings.push(item);
      }
      return { job: toJob(row), readings };
    }));
  }

  async heartbeatBatchJob(
    id: string,
    owner: string,
    leaseUntil: number,
    progress?: BatchProgress,
  ): Promise<boolean> {
    const sql = this.#sql;
    if (progress !== undefined) checkProgress(progress);
    const until = date(checkMs(leaseUntil, "leaseUntil"));
    const result = progress === undefined
      ? await guard(sql`
        UPDATE batch_jobs SET lease_until = ${until}
        WHERE id = ${id} AND status = 'running' AND lease_owner = ${owner}`)
      : await guard(sql`
        UPDATE batch_jobs SET lease_until = ${until}, successful = ${progress.successful},
          failed = ${progress.failed}, duplicates = ${progress.duplicates},
          errors = ${sql.json(jsonValue(progress.errors))}
        WHERE id = ${id} AND status = 'running' AND lease_owner = ${owner}`);
    return result.count === 1;
  }

  async finishBatchJob(
    id: string,
    owner: string,
    change: BatchFinish,
    now: number,
  ): Promise<boolean> {
    checkFinish(change, now);
    const sql = this.#sql;
    const at = date(now);
    const finished = FINISHED_STATUSES.includes(change.status);
    const set: Fragment[] = [
      sql`status = ${change.status}`,
      sql`lease_owner = NULL`,
      sql`lease_until = NULL`,
      sql`updated_at = ${at}`,
      sql`finished_at = ${finished ? date(change.finished_at ?? now) : null}`,
    ];
    if (change.status === "queued") set.push(sql`run_after = ${date(change.run_after ?? now)}`);
    if (change.successful !== undefined) set.push(sql`successful = ${change.successful}`);
    if (change.failed !== undefined) set.push(sql`failed = ${change.failed}`);
    if (change.duplicates !== undefined) set.push(sql`duplicates = ${change.duplicates}`);
    if (change.errors !== undefined) {
      set.push(sql`errors = ${sql.json(jsonValue(change.errors))}`);
    }
    if (change.last_error !== undefined) set.push(sql`last_error = ${change.last_error}`);
    const assignments = set.slice(1).reduce((acc, s) => sql`${acc}, ${s}`, set[0]);
    const result = await guard(sql`
      UPDATE batch_jobs SET ${assignments}
      WHERE id = ${id} AND status = 'running' AND lease_owner = ${owner}`);
    return result.count === 1;
  }

  async retryBatchJob(id: string, now: number): Promise<BatchJob> {
    const sql = this.#sql;
    const at = date(checkMs(now, "now"));
    const [row] = await guard(sql<JobRecord[]>`
      UPDATE batch_jobs SET
        status = 'queued', attempts = 0, successful = 0, failed = 0, duplicates = 0,
        errors = '[]', run_after = ${at}, finished_at = NULL, updated_at = ${at},
        lease_owner = NULL, lease_until = NULL
      WHERE id = ${id} AND status IN ('dead', 'failed')
      RETURNING ${jobColumns(sql)}`);
    if (row !== undefined) return toJob(row);
    const job = await this.getBatchJob(id);
    if (job === null) throw new GatewayError("not_found", `Batch job "${id}" not found`);
    throw new GatewayError(
      "conflict",
      `Batch job "${id}" is ${job.status}: only dead or failed jobs can be retried`,
      { details: { status: job.status } },
    );
  }

  async purgeBatchJobs(before: number): Promise<number> {
    // Their readings go with them (ON DELETE CASCADE).
    const result = await guard(this.#sql`
      DELETE FROM batch_jobs
      WHERE status IN ('completed', 'failed', 'dead')
        AND finished_at < ${date(checkMs(before, "before"))}`);
    return result.count;
  }

  async readingsOfBatchJob(id: string): Promise<{ meter_id: string; ts: number }[]> {
    const sql = this.#sql;
    // meter_readings_batch_idx (migration 0008).
    const rows = await guard(sql<{ meter_id: string; ts: number }[]>`
      SELECT meter_id, ${ms(sql, "reading_timestamp", "ts")} FROM meter_readings
      WHERE batch_job_id = ${id}
      ORDER BY meter_id, reading_timestamp`);
    return rows.map((r) => ({ meter_id: r.meter_id, ts: r.ts }));
  }

  // ---- lifecycle ---------------------------------------------------------------------------

  /** The schema's TimescaleDB policy jobs whose last run failed (none on plain PostgreSQL). */
  async failingPolicyJobs(): Promise<FailingJob[]> {
    if (this.#timescale === null) return [];
    return await guard(failingTimescaleJobs(this.#sql, this.#schema));
  }

  async ping(): Promise<void> {
    await guard(this.#sql`SELECT 1`);
  }

  /** Ends the pool, letting running queries finish for up to 5 s. */
  poolStats(): PoolStats {
    return this.#sql.stats();
  }

  close(): Promise<void> {
    this.#closed ??= this.#sql.end({ timeout: 5 });
    return this.#closed;
  }
}

// ---- SQL pieces ------------------------------------------------------------------------------

/** `expr` (a timestamptz) as epoch milliseconds, a JS number (null stays null). */
function ms(sql: postgres.ISql, expr: string, as = expr): Fragment {
  // Only ever called with literal SQL of this file, never with input.
  return sql`${sql.unsafe(`(extract(epoch FROM ${expr}) * 1000)::float8 AS ${as}`)}`;
}

function readingColumns(sql: postgres.ISql): Fragment {
  return sql`meter_id, ${ms(sql, "reading_timestamp", "ts")},
    (kwh_amount * 10000)::float8 AS kwh_e4, user_id, wallet_address, key_id, device_signature,
    source, ${ms(sql, "submitted_at")}, minted, seq::float8 AS seq, batch_job_id`;
}

function jobColumns(sql: postgres.ISql): Fragment {
  return sql`id, user_id, status, idempotency_key, body_sha256, total_submitted, successful,
    failed, duplicates, attempts, errors, last_error, ${ms(sql, "created_at")},
    ${ms(sql, "started_at")}, ${ms(sql, "finished_at")}, ${ms(sql, "updated_at")},
    ${ms(sql, "run_after")}, lease_owner, ${ms(sql, "lease_until")}`;
}

function deviceColumns(sql: postgres.ISql): Fragment {
  return sql`meter_id, user_id, status, ${ms(sql, "created_at")}, ${ms(sql, "updated_at")},
    ${ms(sql, "revoked_at")}, keys`;
}

/**
 * Row-locks (creating where new) the meters' `reading_meters` rows, in the given order
 * (`gateway_lock_meters`, migration 0003). The statement is sent at once: postgres.js queries
 * are lazy, and a statement pipelined behind this one must reach the server after it.
 */
function lockMeters(tx: Tx, sortedMeters: string[]): Promise<unknown> {
  return tx`SELECT gateway_lock_meters(${tx.array(sortedMeters, 25)}::text[])`.execute();
}

function where(sql: postgres.ISql, conds: Fragment[]): Fragment {
  if (conds.length === 0) return sql``;
  return conds.slice(1).reduce((acc, cond) => sql`${acc} AND ${cond}`, sql`WHERE ${conds[0]}`);
}

async function insertAudit(tx: Tx, audit: AuditEntry): Promise<void> {
  await tx`
    INSERT INTO device_audit (id, meter_id, action, actor, at, key_id, note)
    VALUES (${audit.id}, ${audit.meter_id}, ${audit.action}, ${audit.actor}, ${date(audit.at)},
            ${audit.key_id ?? null}, ${audit.note ?? null})`;
}

// ---- row mapping -----------------------------------------------------------------------------

function toReading(row: ReadingRecord): ReadingRow {
  const reading: ReadingRow = {
    meter_id: row.meter_id,
    ts: row.ts,
    kwh_e4: row.kwh_e4,
    user_id: row.user_id,
    wallet_address: row.wallet_address,
    key_id: row.key_id,
    device_signature: row.device_signature,
    source: row.source,
    submitted_at: row.submitted_at,
    minted: row.minted,
  };
  // Rows stored by releases before migration 0006 have none.
  if (row.seq !== null) reading.seq = row.seq;
  if (row.batch_job_id !== null) reading.batch_job_id = row.batch_job_id;
  return reading;
}

function toJob(row: JobRecord): BatchJob {
  return {
    id: row.id,
    user_id: row.user_id,
    status: row.status,
    idempotency_key: row.idempotency_key,
    body_sha256: row.body_sha256,
    total_submitted: row.total_submitted,
    successful: row.successful,
    failed: row.failed,
    duplicates: row.duplicates,
    attempts: row.attempts,
    errors: row.errors as BatchItemError[],
    last_error: row.last_error,
    created_at: row.created_at,
    started_at: row.started_at,
    finished_at: row.finished_at,
    updated_at: row.updated_at,
    run_after: row.run_after,
    lease_owner: row.lease_owner,
    lease_until: row.lease_until,
  };
}

/** A value as JSON: `undefined` members are dropped, as JSON has no such value. */
function jsonValue(value: unknown): postgres.JSONValue {
  return JSON.parse(JSON.stringify(value));
}

function toDevice(row: DeviceRow): DeviceRecord {
  return {
    meter_id: row.meter_id,
    user_id: row.user_id,
    status: row.status,
    created_at: row.created_at,
    updated_at: row.updated_at,
    revoked_at: row.revoked_at,
    keys: row.keys,
  };
}

function toAudit(row: AuditRow): AuditEntry {
  const entry: AuditEntry = {
    id: row.id,
    meter_id: row.meter_id,
    action: row.action,
    actor: row.actor,
    at: row.at,
  };
  if (row.key_id !== null) entry.key_id = row.key_id;
  if (row.note !== null) entry.note = row.note;
  return entry;
}

/** Keys as JSON: `undefined` members are dropped, as JSON has no such value. */
function jsonKeys(keys: StoredKey[]): postgres.JSONValue {
  return JSON.parse(JSON.stringify(keys));
}

function date(ms: number): Date {
  return new Date(ms);
}

function nullableDate(ms: number | null): Date | null {
  return ms === null ? null : new Date(ms);
}

// ---- validation --------------------------------------------------------------------------------

function checkMs(ms: number, name: string): number {
  if (!validMs(ms)) {
    throw new GatewayError("invalid_payload", `${name} must be epoch milliseconds, got ${ms}`);
  }
  return ms;
}

function checkRow(row: ReadingRow): void {
  const bad = (message: string) => new GatewayError("invalid_payload", message);
  if (!validMs(row.ts)) throw bad(`Reading ts must be an integer, got ${row.ts}`);
  if (!validMs(row.submitted_at)) {
    throw bad(`Reading submitted_at must be an integer, got ${row.submitted_at}`);
  }
  if (!Number.isSafeInteger(row.kwh_e4) || row.kwh_e4 < 0 || row.kwh_e4 > MAX_KWH_E4) {
    throw bad(`Reading kwh_e4 must be an integer from 0 to ${MAX_KWH_E4}, got ${row.kwh_e4}`);
  }
  if (!SOURCES.includes(row.source)) {
    throw bad(`Reading source must be one of ${SOURCES.join(", ")}, got "${row.source}"`);
  }
  for (
    const [name, value] of [
      ["meter_id", row.meter_id],
      ["user_id", row.user_id],
      ["key_id", row.key_id],
      ["device_signature", row.device_signature],
      ["wallet_address", row.wallet_address ?? ""],
      ["batch_job_id", row.batch_job_id ?? ""],
    ] as const
  ) {
    // PostgreSQL text cannot hold NUL; refuse it here rather than fail the whole batch there.
    if (typeof value !== "string" || value.includes("\0")) {
      throw bad(`Reading ${name} must be a string without NUL characters`);
    }
  }
  if (typeof row.minted !== "boolean") throw bad("Reading minted must be a boolean");
}

function checkLimit(limit: number): number {
  if (!Number.isSafeInteger(limit) || limit < 1) {
    throw new GatewayError("invalid_payload", `limit must be a positive integer, got ${limit}`);
  }
  return limit;
}

function checkUrl(url: string): void {
  let parsed: URL;
  try {
    parsed = new URL(url);
  } catch {
    throw new TypeError("The database URL is not a URL");
  }
  if (parsed.protocol !== "postgres:" && parsed.protocol !== "postgresql:") {
    throw new TypeError(
      `The database URL must start with postgres:// or postgresql://, got "${parsed.protocol}"`,
    );
  }
}

// ---- dedupe window -----------------------------------------------------------------------------

/** Whether two rows of one meter in `rows` lie strictly within the window of each other. */
function hasBatchCollisions(rows: ReadingRow[], windowMs: number): boolean {
  const byMeter = new Map<string, number[]>();
  for (const row of rows) {
    const times = byMeter.get(row.meter_id);
    if (times === undefined) byMeter.set(row.meter_id, [row.ts]);
    else times.push(row.ts);
  }
  for (const times of byMeter.values()) {
    if (times.length < 2) continue;
    times.sort((a, b) => a - b);
    for (let i = 1; i < times.length; i++) {
      if (collides(times[i - 1], times[i], windowMs)) return true;
    }
  }
  return false;
}

// ---- errors ------------------------------------------------------------------------------------

// Key of the transaction advisory lock that serialises user changes (an arbitrary constant).
const USERS_LOCK = 0x75736572; // "user"

function userColumns(sql: postgres.ISql): Fragment {
  return sql`id, email, role, wallet_address, password_hash, ${ms(sql, "created_at")}, disabled,
    token_generation`;
}

function toUser(row: UserRecord): UserRecord {
  return {
    id: row.id,
    email: row.email,
    role: row.role,
    wallet_address: row.wallet_address,
    created_at: row.created_at,
    password_hash: row.password_hash,
    disabled: row.disabled,
    token_generation: row.token_generation,
  };
}

function isActiveAdmin(user: UserRecord): boolean {
  return user.role === "admin" && !user.disabled;
}

async function checkAnotherAdmin(tx: postgres.TransactionSql, id: string): Promise<void> {
  const others = await tx`
    SELECT 1 FROM users WHERE role = 'admin' AND NOT disabled AND id <> ${id} LIMIT 1`;
  if (others.length === 0) {
    throw new GatewayError("conflict", "This would leave no active admin; keep at least one");
  }
}

function pgCode(error: unknown): string | undefined {
  const code = (error as { code?: unknown } | null)?.code;
  return typeof code === "string" ? code : undefined;
}

function constraintOf(error: unknown): string | undefined {
  return (error as { constraint_name?: string }).constraint_name;
}

/** Connection trouble becomes `GatewayError("unavailable")` (callers retry); the rest as is. */
function toGatewayError(error: unknown): unknown {
  if (error instanceof GatewayError) return error;
  const code = pgCode(error);
  const connection =
    (code !== undefined && (CONNECTION_CODES.has(code) || code.startsWith("08"))) ||
    error instanceof Deno.errors.ConnectionRefused || error instanceof Deno.errors.ConnectionReset;
  if (!connection) return error;
  return new GatewayError(
    "unavailable",
    `PostgreSQL is unavailable: ${(error as Error).message}`,
    { cause: error, retryAfter: 1 },
  );
}

async function guard<T>(promise: Promise<T>): Promise<T> {
  try {
    return await promise;
  } catch (error) {
    throw toGatewayError(error);
  }
}

/** The start offset of the schema's live refresh policy, in ms (null: none, or not an interval). */
async function liveRefreshStartOffsetMs(sql: Sql, schema: string): Promise<number | null> {
  const refresh = (await schemaJobs(sql, schema))
    .find((j) => j.proc_name === "policy_refresh_continuous_aggregate");
  const offset = refresh?.config.start_offset;
  if (typeof offset !== "string") return null;
  const [row] = await sql<{ ms: number }[]>`
    SELECT (extract(epoch FROM ${offset}::interval) * 1000)::float8 AS ms`.catch(() => []);
  return row?.ms ?? null;
}

// ---- cursors -----------------------------------------------------------------------------------

function decodeReadingCursor(cursor: string): { ts: number; meter_id: string } {
  const [ts, meter_id] = decodeMsKeyCursor(cursor);
  return { ts, meter_id };
}

function decodeDeviceCursor(cursor: string): string {
  const parts = decodeCursor(cursor);
  if (
    !Array.isArray(parts) || parts.length !== 1 || typeof parts[0] !== "string" ||
    parts[0].includes("\0")
  ) {
    throw malformedCursor();
  }
  return parts[0];
}
