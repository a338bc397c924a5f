import type { ErrorCode } from "./errors.ts";
import { mayUseMeter, notYourMeter } from "./ownership.ts";
import { METER_ID_PATTERN, readingSubmissionSchema } from "./reading.ts";
import type { Principal } from "./user.ts";

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

/** Who owns a meter (`null`: unknown meter), as {@linkcode checkBatchReadings} asks. */
export type OwnerLookup = (meterId: string) => Promise<string | null>;

/** Options of {@linkcode checkBatchReadings}. */
export interface CheckBatchOptions {
  /** Owner lookups in flight at most; default 16. */
  concurrency?: number;
}

/**
 * The checks of a batch that need no actor, done at submission: each reading's schema, then the
 * caller's right to its meter (admins may use every meter; another user's meter and an unknown
 * one give the same `forbidden`). The refused readings, by index in ascending order; each meter
 * is looked up once. Signatures, duplicates and rules are left to the runner.
 */
export async function checkBatchReadings(
  readings: readonly unknown[],
  caller: Principal,
  ownerOf: OwnerLookup,
  options: CheckBatchOptions = {},
): Promise<BatchItemError[]> {
  const errors: BatchItemError[] = [];
  const byMeter = new Map<string, number[]>();
  readings.forEach((raw, index) => {
    const parsed = readingSubmissionSchema.safeParse(raw);
    if (parsed.success) {
      const indices = byMeter.get(parsed.data.meter_id);
      if (indices) indices.push(index);
      else byMeter.set(parsed.data.meter_id, [index]);
      return;
    }
    const issue = parsed.error.issues[0];
    const path = issue.path.join(".");
    errors.push({
      index,
      meter_id: meterIdOf(raw),
      code: "invalid_payload",
      // Stored as JSON (jsonb refuses U+0000): key names quoted by a message lose their controls.
      message: storableMessage(`${path ? `${path}: ` : ""}${issue.message}`),
    });
  });
  if (caller.role !== "admin") {
    const meters = [...byMeter.keys()];
    let next = 0;
    const worker = async () => {
      while (next < meters.length) {
        const meterId = meters[next++];
        if (mayUseMeter(caller, (await ownerOf(meterId)) ?? undefined)) continue;
        for (const index of byMeter.get(meterId)!) {
          errors.push({
            index,
            meter_id: meterId,
            code: "forbidden",
            message: notYourMeter(meterId),
          });
        }
      }
    };
    const n = Math.max(1, Math.min(options.concurrency ?? 16, meters.length));
    await Promise.all(Array.from({ length: n }, worker));
  }
  return errors.sort((a, b) => a.index - b.index);
}

// deno-lint-ignore no-control-regex -- the point is to find them
const CONTROLS = /[\u0000-\u001f\u007f]/g;
/** Longest stored error message: a message quoting a 200 KB key name is cut, not kept. */
const MESSAGE_MAX = 256;

/**
 * An error message as the job stores it (JSON, also in PostgreSQL's jsonb): cut to
 * {@linkcode MESSAGE_MAX} characters, controls and unpaired surrogates (quoted key names)
 * replaced by U+FFFD, which jsonb refuses otherwise.
 */
export function storableMessage(text: string): string {
  const cut = text.length > MESSAGE_MAX ? `${text.slice(0, MESSAGE_MAX - 1)}…` : text;
  return cut.replace(CONTROLS, "\uFFFD").toWellFormed();
}

/** The meter id of a reading that failed its schema, when it has a well-formed one. */
function meterIdOf(raw: unknown): string | null {
  const id = (raw as { meter_id?: unknown } | null)?.meter_id;
  return typeof id === "string" && METER_ID_PATTERN.test(id) ? id : null;
}
