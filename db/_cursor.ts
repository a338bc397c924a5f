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
