import type { KeyPolicy, StoredKey } from "./device.ts";
import { keyState, MAX_KEYS } from "./device.ts";
import { open } from "./secret_box.ts";
import { hmacMaterial, type KeyMaterial, parseEd25519PublicKey } from "./signature.ts";

/** A device key ready for verification, as an actor holds it. */
export interface LiveKey {
  key_id: string;
  created_at: number;
  retired_at: number | null;
  /** Set when a rotation shortened this key's grace period. */
  grace_ms?: number;
  /**
   * `null` when the sealed HMAC secret cannot be opened: the gateway runs with another
   * DEVICE_KEY_ENCRYPTION_KEY than the one that sealed it (or the record is damaged).
   */
  material: KeyMaterial | null;
}

/** The associated data binding a sealed secret to its device and key. */
export function secretContext(meterId: string, keyId: string): string {
  return `gridtokenx:${meterId}:${keyId}`;
}

/**
 * Unseals/parses stored keys once, newest first, so the hot path does no key work. Only the
 * newest {@linkcode MAX_KEYS} count (records written before that limit may hold more); weak or
 * malformed Ed25519 keys are left out, so they verify nothing.
 */
export function liveKeys(meterId: string, keys: StoredKey[], kek: Uint8Array): LiveKey[] {
  const newest = [...keys].sort((a, b) => b.created_at - a.created_at).slice(0, MAX_KEYS);
  const out: LiveKey[] = [];
  for (const key of newest) {
    let material: KeyMaterial | null;
    if (key.algorithm === "hmac-sha256" && key.secret_enc) {
      material = unseal(kek, key.secret_enc, secretContext(meterId, key.key_id));
    } else if (key.algorithm === "ed25519" && key.public_key) {
      const publicKey = parseEd25519PublicKey(key.public_key);
      if (!publicKey) continue;
      material = { algorithm: "ed25519", publicKey };
    } else {
      continue;
    }
    out.push({
      key_id: key.key_id,
      created_at: key.created_at,
      retired_at: key.retired_at,
      ...(key.grace_ms === undefined ? {} : { grace_ms: key.grace_ms }),
      material,
    });
  }
  return out;
}

function unseal(kek: Uint8Array, sealed: string, context: string): KeyMaterial | null {
  let secret: Uint8Array;
  try {
    secret = open(kek, sealed, context);
  } catch {
    return null;
  }
  return hmacMaterial(secret);
}

/** Ids of the keys whose sealed secret could not be opened. */
export function unreadableKeys(keys: LiveKey[]): string[] {
  return keys.filter((k) => k.material === null).map((k) => k.key_id);
}

/** Whether a live key may still sign at `now` (see `keyState`). */
export function keyUsable(key: LiveKey, now: number, policy: KeyPolicy): boolean {
  return keyState(key, now, policy) !== "expired";
}
