import type { ErrorCode } from "./errors.ts";
import type { Reading } from "./reading.ts";

/** The final fate of one submitted reading, the same for every transport. */
export type Outcome =
  | { status: "accepted"; reading: Reading }
  | { status: "duplicate"; id: string; message: string }
  | { status: "rejected"; code: ErrorCode; message: string; retryAfter?: number };
