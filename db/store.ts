import type { AuditEntry, DeviceRecord } from "../core/device.ts";
import { GatewayError } from "../core/errors.ts";
import type { BatchJob, BatchStatus } from "../core/batch.ts";
import type { ReadingRow } from "../core/reading.ts";
import type { NewUserRecord, User, UserRecord } from "../core/user.ts";

/** What happened to one row of {@linkcode Store.insertReadings}. */
export type InsertResult =
  /** `seq`: the reading's number among its meter's stored readings (1, 2, 3, … in commit order). */
  | { status: "stored"; seq: number }
  /** `conflict_ts`: the stored reading (epoch ms) that this one collides with. */
  | { status: "duplicate"; conflict_ts: number };

/** A page of results with an opaque cursor for the next one (`null` at the end). */
export interface Page<T> {
  items: T[];
  next_cursor: string | null;
}

/** Filters of {@linkcode Store.listReadings}. */
export interface ReadingQuery {
  /** Only readings of this owner's meters. */
  user_id?: string;
  meter_id?: string;
  /** Inclusive lower bound, epoch ms. */
  from?: number;
  /** Exclusive upper bound, epoch ms. */
  to?: number;
  minted?: boolean;
  order: "asc" | "desc";
  limit: number;
  cursor?: string;
}

/** Totals over a set of readings. */
export interface ReadingStats {
  meter_count: number;
  reading_count: number;
  /** Sum of kWh × 10 000. */
  kwh_e4: number;
  minted_count: number;
  first_ts: number | null;
  last_ts: number | null;
}

/**
 * A user change for {@linkcode Store.updateUser}: the new record from the current one (same id
 * and email), or throw to refuse.
 */
export type UserChange = (current: UserRecord) => UserRecord;

/** A device change for {@linkcode Store.updateDevice}. */
export type DeviceChange = (current: DeviceRecord) => { device: DeviceRecord; audit: AuditEntry };

/** One hour of one meter's readings (kWh exact to 4 decimals in sums). */
export interface HourlyStat {
  /** Start of the hour, epoch ms (UTC). */
  hour: number;
  count: number;
  sum_kwh: number;
  avg_kwh: number;
  min_kwh: number;
  max_kwh: number;
}

/**
 * A new job for {@linkcode Store.createBatchJob}: queued, no attempt yet. `errors` are the
 * readings refused at submission (schema, the caller's right to the meter), by index; `failed`
 * is their number. Runners keep them and run only the other readings.
 */
export type NewBatchJob = Pick<
  BatchJob,
  | "id"
  | "user_id"
  | "idempotency_key"
  | "body_sha256"
  | "total_submitted"
  | "created_at"
  | "failed"
  | "errors"
>;

/** A claimed job: the job (now `running`, leased to the claimer) and all its readings. */
export interface ClaimedBatchJob {
  job: BatchJob;
  /** The submitted readings, by index, as submitted (the job's `errors` name those refused). */
  readings: unknown[];
}

/** Filters of {@linkcode Store.listBatchJobs}. */
export interface BatchJobQuery {
  user_id?: string;
  status?: BatchStatus;
  limit: number;
  cursor?: string;
}

/** Options every store honours. */
export interface StoreOptions {
  /** Rule 3: readings of one meter strictly closer than this collide. */
  dedupeWindowMs: number;
}

/**
 * The persistence port: users, devices (with keys and audit log) and readings.
 * Every adapter passes tests/contracts/store_contract.ts.
 */
/** A connection pool's state, read by `/metrics`. */
export interface PoolStats {
  max: number;
  /** Idle open connections. */
  open: number;
  busy: number;
  /** Connections pipelining as many queries as they take. */
  full: number;
  /** Connections held by transactions (`begin`, `reserve`). */
  reserved: number;
  waiting: number;
}

export interface Store {
  /**
   * Creates a user (enabled, token generation 0 unless given); throws `GatewayError("conflict")`
   * when the email is taken.
   */
  createUser(user: NewUserRecord): Promise<void>;
  getUser(id: string): Promise<User | null>;
  /** Looks a user up by (lower-cased) email, with the password hash. */
  getUserByEmail(email: string): Promise<UserRecord | null>;
  countUsers(): Promise<number>;
  /**
   * Changes a user atomically: `change` gets the current record (and may run again on a fresher
   * one). Throws `not_found` for an unknown id, and `conflict` when the change would leave no
   * active (enabled) admin while one exists. Returns the stored record.
   */
  updateUser(id: string, change: UserChange): Promise<UserRecord>;
  /**
   * Deletes a user; throws `not_found` for an unknown id, and `conflict` for the last active
   * admin or while the user owns devices that are not revoked (atomically: a device created
   * for the user concurrently makes the delete fail, or is itself refused). Returns the
   * deleted record.
   */
  deleteUser(id: string): Promise<UserRecord>;

  /**
   * Registers a device and writes its audit entry; throws `GatewayError("conflict")` if known.
   * With `ownerMustExist`, throws `not_found` when `device.user_id` names no user (also when
   * the user is deleted concurrently); without it a device may precede its owner (imports).
   */
  createDevice(
    device: DeviceRecord,
    audit: AuditEntry,
    options?: { ownerMustExist?: boolean },
  ): Promise<void>;
  getDevice(meterId: string): Promise<DeviceRecord | null>;
  /**
   * Changes a device atomically (rotation, revocation): `change` gets the current record and
   * returns the new one with its audit entry, or throws to refuse. When another writer changed
   * the device meanwhile, `change` runs again on the fresh record. Throws `not_found` for an
   * unknown meter. Returns the stored record.
   */
  updateDevice(meterId: string, change: DeviceChange): Promise<DeviceRecord>;
  /**
   * Devices whose record changed at or after `since` (epoch ms of `updated_at`), at most
   * 10 000, oldest change first: what an instance cut off from the bus re-checks.
   */
  devicesChangedSince(
    since: number,
  ): Promise<{ meter_id: string; status: "active" | "revoked"; updated_at: number }[]>;
  /** Devices ordered by meter id; optionally only one owner's. */
  listDevices(
    query: { user_id?: string; limit: number; cursor?: string },
  ): Promise<Page<DeviceRecord>>;
  /** Audit entries, oldest first; optionally of one meter. */
  listAudit(query: { meter_id?: string; limit: number }): Promise<AuditEntry[]>;

  /**
   * Inserts readings; one result per row, in order. A row whose meter already has a stored
   * reading at the same instant or strictly within the dedupe window (including earlier rows
   * of the same call) is not stored and reports the colliding reading.
   */
  insertReadings(rows: ReadingRow[]): Promise<InsertResult[]>;
  /**
   * Readings of one meter with `seq > afterSeq`, in `seq` order, at most `limit`, each with its
   * `seq` (WebSocket resume and catch-up). A meter's `seq` is dense and commit-ordered: once a
   * reader sees `seq = k`, every reading with a smaller `seq` is visible too.
   */
  readingsAfter(meterId: string, afterSeq: number, limit: number): Promise<ReadingRow[]>;
  /** Each meter's highest `seq` (0 for a meter without readings). */
  lastSeqs(meterIds: readonly string[]): Promise<Map<string, number>>;
  /** The most recent readings' timestamps of a meter, newest first (actor rehydration). */
  recentReadingTimes(meterId: string, limit: number): Promise<number[]>;
  getReading(meterId: string, ts: number): Promise<ReadingRow | null>;
  listReadings(query: ReadingQuery): Promise<Page<ReadingRow>>;
  /** Totals over one owner's readings, or all when `user_id` is absent. */
  readingStats(query: { user_id?: string }): Promise<ReadingStats>;
  /** Per-hour statistics of one meter over `[from, to)` (rounded out to whole hours). */
  hourlyStats(meterId: string, from: number, to: number): Promise<HourlyStat[]>;

  /**
   * Stores a job and its readings durably (chunked: a Deno KV value holds at most 64 KiB).
   * With an `idempotency_key`, a job of the same user with the same key is returned instead
   * (`created: false`), whatever its body: the caller compares `body_sha256` (422 on a
   * mismatch). Atomic: two concurrent submissions with one key make one job.
   */
  createBatchJob(
    job: NewBatchJob,
    readings: unknown[],
  ): Promise<{ job: BatchJob; created: boolean }>;
  getBatchJob(id: string): Promise<BatchJob | null>;
  /** Jobs newest first, optionally one user's and/or of one status. */
  listBatchJobs(query: BatchJobQuery): Promise<Page<BatchJob>>;
  /** Jobs by status (queue depth for metrics and `jobs:list`). */
  countBatchJobs(): Promise<Record<BatchStatus, number>>;
  /**
   * Claims the oldest claimable job for `owner` until `now + leaseMs`: a `queued` one whose
   * `run_after` has come, or a `running` one whose lease ran out (its runner died). The claim
   * starts an attempt (`attempts + 1`, `started_at` set once). Two claimers never get one job
   * (PostgreSQL: `FOR UPDATE SKIP LOCKED` in the claiming transaction; Deno KV: an atomic
   * check of the job's versionstamp). `null` when none is claimable.
   */
  claimBatchJob(owner: string, now: number, leaseMs: number): Promise<ClaimedBatchJob | null>;
  /**
   * Extends `owner`'s lease to `leaseUntil` and records progress (counters and errors so far);
   * `false` when the lease is no longer `owner`'s (taken over: stop working on the job).
   */
  heartbeatBatchJob(
    id: string,
    owner: string,
    leaseUntil: number,
    progress?: Pick<BatchJob, "successful" | "failed" | "duplicates" | "errors">,
  ): Promise<boolean>;
  /**
   * Ends `owner`'s attempt: `completed` (or `failed`) with final counts, or back to `queued`
   * with `run_after` and `last_error` after a transient failure, or `dead` when attempts are
   * exhausted. `false` (and nothing changed) when the lease is no longer `owner`'s.
   */
  finishBatchJob(
    id: string,
    owner: string,
    change:
      & Pick<BatchJob, "status">
      & Partial<
        Pick<
          BatchJob,
          | "successful"
          | "failed"
          | "duplicates"
          | "errors"
          | "run_after"
          | "last_error"
          | "finished_at"
        >
      >,
    now: number,
  ): Promise<boolean>;
  /** Requeues a `dead` (or `failed`) job with its attempts reset; `not_found` / `conflict`. */
  retryBatchJob(id: string, now: number): Promise<BatchJob>;
  /** Deletes finished jobs (`completed`, `failed`, `dead`) finished before `before`; returns how many. */
  purgeBatchJobs(before: number): Promise<number>;
  /**
   * The readings this job stored (natural keys `meter_id` + `ts`): a re-run after a crash
   * counts them as its own successes, not as duplicates. Rows carry the job id they were
   * stored by (`ReadingRow.batch_job_id`).
   */
  readingsOfBatchJob(id: string): Promise<{ meter_id: string; ts: number }[]>;

  /** Cheap liveness probe of the backend. */
  ping(): Promise<void>;
  /**
   * The connection pool's state (PostgreSQL; absent for Deno KV): connections by state and the
   * queries waiting for one.
   */
  poolStats?(): PoolStats;
  close(): Promise<void>;
}

/** The `conflict` of deleting a user that still owns `n` devices that are not revoked. */
export function ownsDevices(n: number): GatewayError {
  return new GatewayError(
    "conflict",
    `The user owns ${n} meter${n === 1 ? "" : "s"} that ${n === 1 ? "is" : "are"} not revoked; ` +
      `revoke or re-register ${n === 1 ? "it" : "them"} first`,
    { details: { devices: n } },
  );
}
