import type { KeyPolicy, StoredKey } from "./device.ts";
import { keyState } from "./device.ts";
import { open } from "./secret_box.ts";
import { hmacMaterial, type KeyMaterial, parseEd25519PublicKey } from "./signature.ts";

/** A device key ready for verification, as an actor holds it. */
export interface LiveKey {
  key_id: string;
  created_at: number;
  retired_at: number | null;
  material: KeyMaterial;
}

/** The associated data binding a sealed secret to its device and key. */
export function secretContext(meterId: string, keyId: string): string {
  return `gridtokenx:${meterId}:${keyId}`;
}

/** Unseals/parses stored keys once, newest first, so the hot path does no key work. */
export function liveKeys(meterId: string, keys: StoredKey[], kek: Uint8Array): LiveKey[] {
  const out: LiveKey[] = [];
  for (const key of keys) {
    let material: KeyMaterial | null = null;
    if (key.algorithm === "hmac-sha256" && key.secret_enc) {
      material = hmacMaterial(open(kek, key.secret_enc, secretContext(meterId, key.key_id)));
    } else if (key.algorithm === "ed25519" && key.public_key) {
      const publicKey = parseEd25519PublicKey(key.public_key);
      if (publicKey) material = { algorithm: "ed25519", publicKey };
    }
    if (material) {
      out.push({
        key_id: key.key_id,
        created_at: key.created_at,
        retired_at: key.retired_at,
        material,
      });
    }
  }
  return out.sort((a, b) => b.created_at - a.created_at);
}

/** Whether a live key may still sign at `now` (see `keyState`). */
export function keyUsable(key: LiveKey, now: number, policy: KeyPolicy): boolean {
  return keyState(key, now, policy) !== "expired";
}
