// Opaque page cursors shared by the store adapters: base64url of a small JSON array.
import { GatewayError } from "../core/errors.ts";

/** The error of a cursor that was not made by {@linkcode encodeCursor}. */
export function malformedCursor(): GatewayError {
  return new GatewayError("invalid_payload", "The cursor is malformed");
}

/** Encodes a cursor's parts as base64url JSON. */
export function encodeCursor(parts: unknown[]): string {
  const bytes = new TextEncoder().encode(JSON.stringify(parts));
  return btoa(String.fromCharCode(...bytes)).replaceAll("+", "-").replaceAll("/", "_")
    .replace(/=+$/, "");
}

/** Decodes a cursor; throws `invalid_payload` for anything malformed. */
export function decodeCursor(cursor: string): unknown {
  try {
    if (!/^[A-Za-z0-9_-]+$/.test(cursor)) throw new Error("not base64url");
    const binary = atob(cursor.replaceAll("-", "+").replaceAll("_", "/"));
    const bytes = Uint8Array.from(binary, (c) => c.charCodeAt(0));
    return JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(bytes));
  } catch {
    throw malformedCursor();
  }
}

/** Latest instant the stores take: 9999-12-31T23:59:59.999Z (as query dates are bounded). */
const MAX_MS = 253_402_300_799_999;

/**
 * Whether `ms` is epoch milliseconds from 1970 to the end of year 9999: what every store holds
 * (PostgreSQL's timestamptz refuses much of what a `Date` can hold).
 */
export function validMs(ms: unknown): ms is number {
  return typeof ms === "number" && Number.isSafeInteger(ms) && ms >= 0 && ms <= MAX_MS;
}

/** Decodes a `[epoch ms, key]` cursor; throws `invalid_payload` for anything else. */
export function decodeMsKeyCursor(cursor: string): [number, string] {
  const parts = decodeCursor(cursor);
  if (
    !Array.isArray(parts) || parts.length !== 2 || !validMs(parts[0]) ||
    typeof parts[1] !== "string" || parts[1].includes("\0")
  ) {
    throw malformedCursor();
  }
  return [parts[0], parts[1]];
}
