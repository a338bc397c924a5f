// What both store adapters share of batch jobs: the new job, checks of the port's inputs, the
// change a finish makes, and listing cursors.
import { decodeMsKeyCursor, encodeCursor, validMs } from "./_cursor.ts";
import type { BatchItemError, BatchJob, BatchStatus } from "../core/batch.ts";
import type { NewBatchJob, Store } from "./store.ts";

/** Every status, in the order `countBatchJobs` reports them. */
export const BATCH_STATUSES: readonly BatchStatus[] = [
  "queued",
  "running",
  "completed",
  "failed",
  "dead",
];

/** Statuses of jobs that no runner works on any more (purged by age). */
export const FINISHED_STATUSES: readonly BatchStatus[] = ["completed", "failed", "dead"];

/** Statuses `retryBatchJob` requeues. */
export const RETRYABLE_STATUSES: readonly BatchStatus[] = ["dead", "failed"];

/** What {@linkcode Store.finishBatchJob} is given. */
export type BatchFinish = Parameters<Store["finishBatchJob"]>[2];

/** What {@linkcode Store.heartbeatBatchJob} may record. */
export type BatchProgress = NonNullable<Parameters<Store["heartbeatBatchJob"]>[3]>;

/** The stored form of a new job: queued, claimable from its creation, no attempt yet. */
export function newBatchJob(input: NewBatchJob, readings: unknown[]): BatchJob {
  if (typeof input.id !== "string" || input.id === "" || input.id.includes("\0")) {
    throw new TypeError(`A batch job id must be a non-empty string, got ${String(input.id)}`);
  }
  if (input.idempotency_key !== null && input.idempotency_key.includes("\0")) {
    throw new TypeError("An idempotency key must not contain NUL characters");
  }
  checkMs(input.created_at, "created_at");
  if (!Array.isArray(readings) || input.total_submitted !== readings.length) {
    throw new RangeError(
      `total_submitted (${input.total_submitted}) must be the number of readings ` +
        `(${Array.isArray(readings) ? readings.length : "not an array"})`,
    );
  }
  const errors = checkSubmissionErrors(input);
  return {
    id: input.id,
    user_id: input.user_id,
    status: "queued",
    idempotency_key: input.idempotency_key,
    body_sha256: input.body_sha256,
    total_submitted: input.total_submitted,
    successful: 0,
    failed: input.failed,
    duplicates: 0,
    attempts: 0,
    errors,
    last_error: null,
    created_at: input.created_at,
    started_at: null,
    finished_at: null,
    updated_at: input.created_at,
    run_after: input.created_at,
    lease_owner: null,
    lease_until: null,
  };
}

/**
 * The submission's errors in index order; throws unless they are `failed` errors of distinct
 * indices within the job (each one a reading refused at submission, none a duplicate).
 */
function checkSubmissionErrors(input: NewBatchJob): BatchItemError[] {
  if (!Array.isArray(input.errors)) throw new TypeError("errors must be an array");
  if (!Number.isSafeInteger(input.failed) || input.failed !== input.errors.length) {
    throw new RangeError(
      `failed (${input.failed}) must be the number of errors (${input.errors.length})`,
    );
  }
  const errors = [...input.errors].sort((a, b) => a.index - b.index);
  errors.forEach((e, i) => {
    if (!Number.isSafeInteger(e.index) || e.index < 0 || e.index >= input.total_submitted) {
      throw new RangeError(`An error's index must be a reading's index, got ${e.index}`);
    }
    if (i > 0 && errors[i - 1].index === e.index) {
      throw new RangeError(`Two errors of reading ${e.index}`);
    }
    if (e.code === "duplicate") {
      throw new TypeError("A submission error cannot be a duplicate (runners find those)");
    }
  });
  return errors;
}

/** Throws `TypeError` for a lease request that cannot be right. */
export function checkClaim(owner: string, now: number, leaseMs: number): void {
  if (typeof owner !== "string" || owner === "") {
    throw new TypeError("A lease owner must be a non-empty string");
  }
  checkMs(now, "now");
  if (!Number.isSafeInteger(leaseMs) || leaseMs <= 0) {
    throw new RangeError(`leaseMs must be a positive integer, got ${leaseMs}`);
  }
}

/** Throws for progress counters that are not counts. */
export function checkProgress(progress: Partial<BatchProgress>): void {
  for (const name of ["successful", "failed", "duplicates"] as const) {
    const n = progress[name];
    if (n !== undefined && (!Number.isSafeInteger(n) || n < 0)) {
      throw new RangeError(`${name} must be a non-negative integer, got ${n}`);
    }
  }
  if (progress.errors !== undefined && !Array.isArray(progress.errors)) {
    throw new TypeError("errors must be an array");
  }
}

/**
 * The job after `owner`'s attempt ends with `change` at `now`: the lease is released, a
 * finished job (completed, failed, dead) gets `finished_at` (given, or `now`), a requeued one
 * `run_after` (given, or `now`); counters, errors and `last_error` change where given.
 */
export function finishedJob(job: BatchJob, change: BatchFinish, now: number): BatchJob {
  checkFinish(change, now);
  const finished = FINISHED_STATUSES.includes(change.status);
  return {
    ...job,
    status: change.status,
    successful: change.successful ?? job.successful,
    failed: change.failed ?? job.failed,
    duplicates: change.duplicates ?? job.duplicates,
    errors: change.errors ?? job.errors,
    last_error: change.last_error !== undefined ? change.last_error : job.last_error,
    run_after: change.status === "queued" ? change.run_after ?? now : job.run_after,
    finished_at: finished ? change.finished_at ?? now : null,
    updated_at: now,
    lease_owner: null,
    lease_until: null,
  };
}

/** Throws `TypeError`/`RangeError` for a finish that is not one. */
export function checkFinish(change: BatchFinish, now: number): void {
  if (change.status !== "queued" && !FINISHED_STATUSES.includes(change.status)) {
    throw new TypeError(
      `An attempt ends queued, completed, failed or dead, not "${change.status}"`,
    );
  }
  checkMs(now, "now");
  if (change.run_after !== undefined) checkMs(change.run_after, "run_after");
  if (change.finished_at !== undefined && change.finished_at !== null) {
    checkMs(change.finished_at, "finished_at");
  }
  checkProgress(change);
}

/** The job requeued by an operator at `now`: attempts, counters and errors start afresh. */
export function retriedJob(job: BatchJob, now: number): BatchJob {
  return {
    ...job,
    status: "queued",
    attempts: 0,
    successful: 0,
    failed: 0,
    duplicates: 0,
    errors: [],
    run_after: now,
    finished_at: null,
    updated_at: now,
    lease_owner: null,
    lease_until: null,
  };
}

/** Zero for every status. */
export function zeroCounts(): Record<BatchStatus, number> {
  return { queued: 0, running: 0, completed: 0, failed: 0, dead: 0 };
}

/** The cursor after `job` in newest-first order. */
export function encodeJobCursor(job: BatchJob): string {
  return encodeCursor([job.created_at, job.id]);
}

/** The position a job cursor names: strictly older than `(created_at, id)`. */
export function decodeJobCursor(cursor: string): { created_at: number; id: string } {
  const [created_at, id] = decodeMsKeyCursor(cursor);
  return { created_at, id };
}

function checkMs(ms: number, name: string): void {
  if (!validMs(ms)) throw new RangeError(`${name} must be epoch milliseconds, got ${ms}`);
}
