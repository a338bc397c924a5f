import type { ReadingRow, ReadingSource } from "../core/reading.ts";
import type { InsertResult } from "../db/store.ts";

// Field and record separators: validated fields never contain control characters, so a packed
// UTF-8 buffer moves a batch to the worker as one transferable instead of cloning objects.
const FS = "\x1f";
const RS = "\x1e";
const encoder = new TextEncoder();
const decoder = new TextDecoder();

/** Packs rows into one transferable buffer. */
export function encodeRows(rows: ReadingRow[]): ArrayBuffer {
  const parts = new Array<string>(rows.length);
  for (let i = 0; i < rows.length; i++) {
    const r = rows[i];
    parts[i] = r.meter_id + FS + r.ts + FS + r.kwh_e4 + FS + r.user_id + FS +
      (r.wallet_address ?? "") + FS + r.key_id + FS + r.device_signature + FS + r.source + FS +
      r.submitted_at + FS + (r.minted ? "1" : "0");
  }
  return encoder.encode(parts.join(RS)).buffer as ArrayBuffer;
}

/** Unpacks rows made by {@linkcode encodeRows}. */
export function decodeRows(buffer: ArrayBuffer): ReadingRow[] {
  const text = decoder.decode(buffer);
  if (text === "") return [];
  return text.split(RS).map((line) => {
    const f = line.split(FS);
    return {
      meter_id: f[0],
      ts: Number(f[1]),
      kwh_e4: Number(f[2]),
      user_id: f[3],
      wallet_address: f[4] === "" ? null : f[4],
      key_id: f[5],
      device_signature: f[6],
      source: f[7] as ReadingSource,
      submitted_at: Number(f[8]),
      minted: f[9] === "1",
    };
  });
}

/** Packs per-row results: NaN for stored, else the colliding reading's time. */
export function encodeResults(results: InsertResult[]): ArrayBuffer {
  const out = new Float64Array(results.length);
  results.forEach((r, i) => out[i] = r.status === "stored" ? NaN : r.conflict_ts);
  return out.buffer;
}

/** Unpacks results made by {@linkcode encodeResults}. */
export function decodeResults(buffer: ArrayBuffer): InsertResult[] {
  return Array.from(
    new Float64Array(buffer),
    (v): InsertResult =>
      Number.isNaN(v) ? { status: "stored" } : { status: "duplicate", conflict_ts: v },
  );
}
