import { z } from "zod";
import { sha256Into } from "./sha256.ts";

/**
 * Meter identifiers: 1–64 characters of `[A-Za-z0-9._:-]`, not only dots (`.` and `..` are
 * path segments no URL can carry to `/api/admin/devices/{meter_id}/...`).
 */
export const METER_ID_PATTERN = /^(?!\.+$)[A-Za-z0-9._:-]{1,64}$/;
/** RFC 3339 date-time with an offset (`Z` or `±hh:mm`). */
export const RFC3339 =
  /^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})$/;
const DECIMAL = /^[+-]?(\d{1,20}(\.\d{0,20})?|\.\d{1,20})$/;

/**
 * The one form of `reading_timestamp` a reading is stored with: UTC, whole seconds,
 * `YYYY-MM-DDTHH:MM:SSZ`. The API renders stored readings the same way, so the signed message
 * can be rebuilt from what is stored.
 */
export const CANONICAL_TIMESTAMP = /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$/;
/**
 * The one form of `kwh_amount`: the shortest decimal of the value, as `JSON.stringify` writes a
 * number (no sign, exponent, leading zeros or trailing fraction zeros), at most 4 decimals.
 */
export const CANONICAL_KWH = /^(0|[1-9]\d{0,14})(\.\d{0,3}[1-9])?$/;

/** Where a reading entered the gateway. */
export type ReadingSource = "mqtt" | "http" | "batch";

/** A meter id: {@linkcode METER_ID_PATTERN}. */
export const meterIdSchema = z.string().regex(
  METER_ID_PATTERN,
  "meter_id must be 1-64 characters of A-Z a-z 0-9 . _ : -, and not only dots",
);

/** A key id: 1–64 characters of `[A-Za-z0-9._:-]`. */
export const keyIdSchema = z.string().regex(/^[A-Za-z0-9._:-]{1,64}$/, "key_id is malformed");

/** `reading_timestamp`: an {@linkcode RFC3339} date-time naming a real day and time. */
export const rfc3339Schema = z.string().max(40).regex(
  RFC3339,
  "reading_timestamp must be an RFC 3339 date-time",
).refine(isRealDateTime, "reading_timestamp names a day or time that does not exist");

/** Whether an RFC 3339 string names a real calendar day and time (Date.parse rolls 02-30 over). */
export function isRealDateTime(text: string): boolean {
  // Runs on every reading: digits are read by position (RFC3339 has already fixed the shape).
  const n = (at: number, len: number) => {
    let v = 0;
    for (let i = at; i < at + len; i++) {
      const c = text.charCodeAt(i) - 48;
      if (c < 0 || c > 9) return NaN;
      v = v * 10 + c;
    }
    return v;
  };
  const y = n(0, 4), mo = n(5, 2), d = n(8, 2), h = n(11, 2), mi = n(14, 2), s = n(17, 2);
  if (text[4] !== "-" || text[7] !== "-" || text[13] !== ":" || text[16] !== ":") return false;
  if (!(mo >= 1 && mo <= 12 && d >= 1 && h <= 23 && mi <= 59 && s <= 59)) return false;
  const leap = (y % 4 === 0 && y % 100 !== 0) || y % 400 === 0;
  const days = mo === 2 ? (leap ? 29 : 28) : DAYS_IN_MONTH[mo - 1];
  return d <= days && !Number.isNaN(Date.parse(text));
}

const DAYS_IN_MONTH = [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];

/** A decimal as a string, or a JSON number (kept in its `JSON.stringify` form for signing). */
export const kwhSchema = z.union([
  z.string().max(42).regex(DECIMAL, "kwh_amount must be a decimal number"),
  z.number().finite(),
]);

/** The signed fields every transport carries (meter id comes from the body or the topic). */
export const signedFieldsSchema = z.strictObject({
  kwh_amount: kwhSchema,
  reading_timestamp: rfc3339Schema,
  key_id: keyIdSchema.optional(),
  device_signature: z.string().min(1).max(256),
});

/** A reading as submitted over HTTP. */
export const readingSubmissionSchema = signedFieldsSchema.extend({ meter_id: meterIdSchema });

/** The signed fields of a reading, as parsed by {@linkcode signedFieldsSchema}. */
export type SignedFields = z.infer<typeof signedFieldsSchema>;
/** A reading submitted over HTTP, as parsed by {@linkcode readingSubmissionSchema}. */
export type ReadingSubmission = z.infer<typeof readingSubmissionSchema>;

/** A reading as stored: time in epoch ms, energy in units of 0.0001 kWh. */
export interface ReadingRow {
  /** The meter that signed the reading. */
  meter_id: string;
  /** Epoch milliseconds of `reading_timestamp`. */
  ts: number;
  /** kWh × 10 000 (4 decimals kept). */
  kwh_e4: number;
  /** The meter's owner when the reading was accepted. */
  user_id: string;
  /** The owner's wallet when the reading was accepted, if any. */
  wallet_address: string | null;
  /** The key that verified the signature. */
  key_id: string;
  /** The signature as the meter sent it. */
  device_signature: string;
  /** Where the reading entered the gateway. */
  source: ReadingSource;
  /** Epoch milliseconds when the gateway accepted it. */
  submitted_at: number;
  /** Whether the reading has been minted into energy tokens. */
  minted: boolean;
  /** The reading's number among its meter's stored readings, once stored (see `Store`). */
  seq?: number;
  /** The batch job that stored it (`source = "batch"`); absent otherwise. */
  batch_job_id?: string;
}

/** A reading as the API shows it. */
export interface Reading {
  /** Derived from the natural key: see {@linkcode readingId}. */
  id: string;
  /** The meter that signed the reading. */
  meter_id: string;
  /** The meter's owner when the reading was accepted. */
  user_id: string;
  /** The owner's wallet when the reading was accepted, if any. */
  wallet_address: string | null;
  /** Energy in kWh, 4 decimals kept; its `JSON.stringify` form is the signed text. */
  kwh_amount: number;
  /** When the meter took the reading: the signed text, `YYYY-MM-DDTHH:MM:SSZ`. */
  reading_timestamp: string;
  /** The key that verified the signature. */
  key_id: string;
  /** The signature as the meter sent it. */
  device_signature: string;
  /** Where the reading entered the gateway. */
  source: ReadingSource;
  /** When the gateway accepted it, RFC 3339 in UTC. */
  submitted_at: string;
  /** Whether the reading has been minted into energy tokens. */
  minted: boolean;
}

const ID_DIGEST = new Uint8Array(32);
const HEX = Array.from({ length: 256 }, (_, i) => i.toString(16).padStart(2, "0"));

/** The reading's id: derived from its natural key, so every replay and every instance agrees on it. */
export function readingId(meterId: string, ts: number): string {
  const h = sha256Into(`${meterId}\n${ts}`, ID_DIGEST);
  h[6] = (h[6] & 0x0f) | 0x80; // UUID version 8 (custom)
  h[8] = (h[8] & 0x3f) | 0x80; // RFC 4122 variant
  let x = "";
  for (let i = 0; i < 16; i++) x += HEX[h[i]];
  return `${x.slice(0, 8)}-${x.slice(8, 12)}-${x.slice(12, 16)}-${x.slice(16, 20)}-${x.slice(20)}`;
}

/** Converts a stored row to its API form. */
export function toReading(row: ReadingRow): Reading {
  return {
    id: readingId(row.meter_id, row.ts),
    meter_id: row.meter_id,
    user_id: row.user_id,
    wallet_address: row.wallet_address,
    kwh_amount: row.kwh_e4 / 10_000,
    reading_timestamp: readingTimestamp(row.ts),
    key_id: row.key_id,
    device_signature: row.device_signature,
    source: row.source,
    submitted_at: isoUtc(row.submitted_at),
    minted: row.minted,
  };
}

/**
 * A reading time as stored readings are shown: {@linkcode CANONICAL_TIMESTAMP}, the form it was
 * signed in. (Readings stored before that rule may carry milliseconds; they keep them.)
 */
export function readingTimestamp(ms: number): string {
  const iso = isoUtc(ms);
  return ms % 1000 === 0 ? `${iso.slice(0, -5)}Z` : iso;
}

/** `new Date(ms).toISOString()`, without a Date: it runs twice per stored reading. */
export function isoUtc(ms: number): string {
  if (!(ms >= 0 && ms < MS_YEAR_10000)) return new Date(ms).toISOString();
  const days = Math.floor(ms / 86_400_000);
  let rest = ms - days * 86_400_000;
  // Civil date from days since 1970-01-01 (H. Hinnant, "chrono-Compatible Low-Level Date Algorithms").
  const z = days + 719_468;
  const era = Math.floor(z / 146_097);
  const doe = z - era * 146_097;
  const yoe = Math.floor(
    (doe - Math.floor(doe / 1460) + Math.floor(doe / 36_524) - Math.floor(doe / 146_096)) / 365,
  );
  const doy = doe - (365 * yoe + Math.floor(yoe / 4) - Math.floor(yoe / 100));
  const mp = Math.floor((5 * doy + 2) / 153);
  const d = doy - Math.floor((153 * mp + 2) / 5) + 1;
  const m = mp < 10 ? mp + 3 : mp - 9;
  const y = yoe + era * 400 + (m <= 2 ? 1 : 0);
  const h = Math.floor(rest / 3_600_000);
  rest -= h * 3_600_000;
  const mi = Math.floor(rest / 60_000);
  rest -= mi * 60_000;
  const sec = Math.floor(rest / 1000);
  const milli = rest - sec * 1000;
  return `${y}-${TWO[m]}-${TWO[d]}T${TWO[h]}:${TWO[mi]}:${TWO[sec]}.${THREE[milli]}Z`;
}

const MS_YEAR_10000 = 253_402_300_800_000;
const TWO = Array.from({ length: 100 }, (_, i) => String(i).padStart(2, "0"));
const THREE = Array.from({ length: 1000 }, (_, i) => String(i).padStart(3, "0"));

/** The exact text of `kwh_amount` that was signed. */
export function kwhText(kwh: string | number): string {
  return typeof kwh === "string" ? kwh : JSON.stringify(kwh);
}
