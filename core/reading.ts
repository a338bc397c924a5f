import { createHash } from "node:crypto";
import { z } from "zod";

/** Meter identifiers: 1–64 characters of `[A-Za-z0-9._:-]`. */
export const METER_ID_PATTERN = /^[A-Za-z0-9._:-]{1,64}$/;
/** RFC 3339 date-time with an offset (`Z` or `±hh:mm`). */
export const RFC3339 =
  /^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})$/;
const DECIMAL = /^[+-]?(\d{1,20}(\.\d{0,20})?|\.\d{1,20})$/;

/** Where a reading entered the gateway. */
export type ReadingSource = "mqtt" | "http" | "batch";

/** A meter id: {@linkcode METER_ID_PATTERN}. */
export const meterIdSchema = z.string().regex(
  METER_ID_PATTERN,
  "meter_id must be 1-64 characters of A-Z a-z 0-9 . _ : -",
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
  const m = /^(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})/.exec(text);
  if (!m) return false;
  const [y, mo, d, h, mi, s] = m.slice(1).map(Number);
  const days = new Date(Date.UTC(y, mo, 0)).getUTCDate(); // day 0 of next month = last day
  return mo >= 1 && mo <= 12 && d >= 1 && d <= days && h <= 23 && mi <= 59 && s <= 59 &&
    !Number.isNaN(Date.parse(text));
}

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
  /** Energy in kWh, 4 decimals kept. */
  kwh_amount: number;
  /** When the meter took the reading, RFC 3339 in UTC. */
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

/** The reading's id: derived from its natural key, so every replay and every instance agrees on it. */
export function readingId(meterId: string, ts: number): string {
  const h = createHash("sha256").update(`${meterId}\n${ts}`).digest();
  h[6] = (h[6] & 0x0f) | 0x80; // UUID version 8 (custom)
  h[8] = (h[8] & 0x3f) | 0x80; // RFC 4122 variant
  const x = h.toString("hex", 0, 16);
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
    reading_timestamp: new Date(row.ts).toISOString(),
    key_id: row.key_id,
    device_signature: row.device_signature,
    source: row.source,
    submitted_at: new Date(row.submitted_at).toISOString(),
    minted: row.minted,
  };
}

/** The exact text of `kwh_amount` that was signed. */
export function kwhText(kwh: string | number): string {
  return typeof kwh === "string" ? kwh : JSON.stringify(kwh);
}
