import type { ReadingRow, ReadingSource } from "../core/reading.ts";
import type { InsertResult } from "../db/store.ts";

// Field and record separators: validated fields never contain control characters, so a packed
// UTF-8 buffer moves a batch to the worker as one transferable instead of cloning objects.
const FS = "\x1f";
const RS = "\x1e";
const encoder = new TextEncoder();
const decoder = new TextDecoder();

/** Packs rows into one transferable buffer (a row's `batch_job_id` as an 11th field, if any). */
export function encodeRows(rows: ReadingRow[]): ArrayBuffer {
  const parts = new Array<string>(rows.length);
  for (let i = 0; i < rows.length; i++) {
    const r = rows[i];
    parts[i] = r.meter_id + FS + r.ts + FS + r.kwh_e4 + FS + r.user_id + FS +
      (r.wallet_address ?? "") + FS + r.key_id + FS + r.device_signature + FS + r.source + FS +
      r.submitted_at + FS + (r.minted ? "1" : "0") +
      (r.batch_job_id === undefined ? "" : FS + r.batch_job_id);
  }
  return encoder.encode(parts.join(RS)).buffer as ArrayBuffer;
}

/** Unpacks rows made by {@linkcode encodeRows}. */
export function decodeRows(buffer: ArrayBuffer): ReadingRow[] {
  const text = decoder.decode(buffer);
  if (text === "") return [];
  return text.split(RS).map((line) => {
    const f = line.split(FS);
    const row: ReadingRow = {
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
    if (f.length > 10) row.batch_job_id = f[10];
    return row;
  });
}

/** Packs per-row results, two numbers a row: a stored row's seq, or NaN and the colliding time. */
export function encodeResults(results: InsertResult[]): ArrayBuffer {
  const out = new Float64Array(2 * results.length);
  for (let i = 0; i < results.length; i++) {
    const r = results[i];
    if (r.status === "stored") {
      out[2 * i] = r.seq;
      out[2 * i + 1] = NaN;
    } else {
      out[2 * i] = NaN;
      out[2 * i + 1] = r.conflict_ts;
    }
  }
  return out.buffer;
}

/** Unpacks results made by {@linkcode encodeResults}. */
export function decodeResults(buffer: ArrayBuffer): InsertResult[] {
  const packed = new Float64Array(buffer);
  const out = new Array<InsertResult>(packed.length / 2);
  for (let i = 0; i < out.length; i++) {
    const seq = packed[2 * i];
    out[i] = Number.isNaN(seq)
      ? { status: "duplicate", conflict_ts: packed[2 * i + 1] }
      : { status: "stored", seq };
  }
  return out;
}
