import type { ErrorCode } from "./errors.ts";

/** Where a batch job is in its life. */
export type BatchStatus = "queued" | "running" | "completed" | "failed" | "dead";

/** One reading of a batch that was not stored, by its index in the submission. */
export interface BatchItemError {
  index: number;
  meter_id: string | null;
  code: ErrorCode;
  message: string;
}

/** What one attempt found for one reading (recorded with the job's progress). */
export type BatchItemOutcome =
  | { index: number; status: "stored" }
  | { index: number; status: "duplicate"; meter_id: string }
  | {
    index: number;
    status: "rejected";
    meter_id: string | null;
    code: ErrorCode;
    message: string;
  };

/** A durable batch job (its readings are kept apart, in chunks). */
export interface BatchJob {
  id: string;
  /** The submitter; only they (and admins) may see the job. */
  user_id: string;
  status: BatchStatus;
  /** `Idempotency-Key` of the submission, with the SHA-256 of its body (hex). */
  idempotency_key: string | null;
  body_sha256: string;
  total_submitted: number;
  successful: number;
  failed: number;
  duplicates: number;
  /** Attempts started so far (a claim starts one). */
  attempts: number;
  errors: BatchItemError[];
  /** Why the last attempt failed transiently (store down, writer saturated), if it did. */
  last_error: string | null;
  created_at: number;
  started_at: number | null;
  finished_at: number | null;
  updated_at: number;
  /** Earliest time a runner may claim it (backoff after a transient failure). */
  run_after: number;
  /** The runner holding it and until when; a lease that ran out may be taken over. */
  lease_owner: string | null;
  lease_until: number | null;
}
