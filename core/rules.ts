import type { ErrorCode } from "./errors.ts";
import { CANONICAL_KWH, CANONICAL_TIMESTAMP } from "./reading.ts";

/** Limits of the domain rules (DESIGN.md §3), all configurable. */
export interface RuleLimits {
  kwhMax: number;
  maxAgeMs: number;
  maxFutureMs: number;
  dedupeWindowMs: number;
}

/** A rule violation: stable code plus a human message. */
export interface Violation {
  code: ErrorCode;
  message: string;
}

/**
 * Rule 1: `0 < kwh <= kwhMax`, written in {@linkcode CANONICAL_KWH} form (so the stored value
 * renders as the signed text); returns kWh × 10 000, or the violation.
 */
export function checkKwh(kwh: string | number, limits: RuleLimits): number | Violation {
  const text = typeof kwh === "number" ? JSON.stringify(kwh) : kwh;
  const value = typeof kwh === "number" ? kwh : Number(kwh);
  if (!Number.isFinite(value) || value <= 0 || value > limits.kwhMax) {
    return {
      code: "kwh_out_of_range",
      message: `kwh_amount must be greater than 0 and at most ${limits.kwhMax}, got "${text}"`,
    };
  }
  if (!CANONICAL_KWH.test(text)) {
    return {
      code: "invalid_payload",
      message: `kwh_amount "${text}" is not in canonical form: sign the shortest decimal with at ` +
        `most 4 decimals, no sign, exponent, leading or trailing zeros (e.g. "12.5", "0.0001", ` +
        `"100")`,
    };
  }
  return toE4(text);
}

/** A violation when `text` is not a {@linkcode CANONICAL_TIMESTAMP} (already RFC 3339-checked). */
export function checkTimestampForm(text: string): Violation | null {
  if (CANONICAL_TIMESTAMP.test(text)) return null;
  return {
    code: "invalid_payload",
    message: `reading_timestamp "${text}" is not in canonical form: sign it in UTC with whole ` +
      `seconds as YYYY-MM-DDTHH:MM:SSZ (e.g. "2026-11-29T10:15:00Z"), no offset or fraction`,
  };
}

/** Rule 2: not older than `maxAgeMs`, not more than `maxFutureMs` ahead of `now`. */
export function checkTimestamp(ts: number, now: number, limits: RuleLimits): Violation | null {
  if (ts < now - limits.maxAgeMs) {
    return {
      code: "timestamp_too_old",
      message: `reading_timestamp is older than ${limits.maxAgeMs / 3_600_000} hours`,
    };
  }
  if (ts > now + limits.maxFutureMs) {
    return {
      code: "timestamp_in_future",
      message: `reading_timestamp is more than ${limits.maxFutureMs / 1000} seconds in the future`,
    };
  }
  return null;
}

/** Rule 3: two readings of one meter collide when they lie strictly within the window. */
export function collides(a: number, b: number, windowMs: number): boolean {
  return Math.abs(a - b) < windowMs;
}

/** Canonical decimal text to units of 0.0001 (exact: at most 4 decimals, no float error). */
function toE4(text: string): number {
  const dot = text.indexOf(".");
  if (dot < 0) return Number(text) * 10_000;
  return Number(text.slice(0, dot)) * 10_000 + Number(text.slice(dot + 1).padEnd(4, "0"));
}

/** The time in `sorted` (ascending) closest to `ts` that collides with it; an exact match first. */
export function nearestColliding(
  sorted: number[],
  ts: number,
  windowMs: number,
): number | undefined {
  if (sorted.length === 0) return undefined;
  const p = lowerBound(sorted, ts);
  if (sorted[p] === ts) return ts;
  const below = p > 0 ? sorted[p - 1] : undefined;
  const above = p < sorted.length ? sorted[p] : undefined;
  const hitBelow = below !== undefined && collides(below, ts, windowMs);
  const hitAbove = above !== undefined && collides(above, ts, windowMs);
  if (hitBelow && hitAbove) return ts - below! <= above! - ts ? below : above;
  return hitBelow ? below : hitAbove ? above : undefined;
}

/** Inserts `ts` into ascending `sorted`; in-order arrivals append without searching. */
export function insertSorted(sorted: number[], ts: number): void {
  if (sorted.length === 0 || sorted[sorted.length - 1] < ts) sorted.push(ts);
  else sorted.splice(lowerBound(sorted, ts), 0, ts);
}

function lowerBound(sorted: number[], ts: number): number {
  let lo = 0;
  let hi = sorted.length;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if (sorted[mid] < ts) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}
