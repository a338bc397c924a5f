import type { KeyAlgorithm } from "./signature.ts";

/** A device key as stored: HMAC secrets sealed, Ed25519 keys as raw public bytes. */
export interface StoredKey {
  key_id: string;
  algorithm: KeyAlgorithm;
  /** Ed25519 public key, 32 raw bytes in base64url. */
  public_key?: string;
  /** HMAC secret sealed with AES-256-GCM (see core/secret_box.ts). */
  secret_enc?: string;
  created_at: number;
  /** When a rotation replaced this key; it stays valid for the grace period after. */
  retired_at: number | null;
  /** A grace period shorter than the policy's, set by the rotation that retired it (0: none). */
  grace_ms?: number;
}

/** A registered meter. */
export interface DeviceRecord {
  meter_id: string;
  user_id: string;
  status: "active" | "revoked";
  created_at: number;
  updated_at: number;
  revoked_at: number | null;
  keys: StoredKey[];
}

/** Provisioning, rotation and revocation events, kept in the device audit log. */
export interface AuditEntry {
  id: string;
  meter_id: string;
  action: "registered" | "rotated" | "revoked";
  /** User id of who did it, or `"cli"` for operator commands. */
  actor: string;
  at: number;
  key_id?: string;
  note?: string;
}

/** Rotation policy (DESIGN.md §4). */
export interface KeyPolicy {
  rotationMs: number;
  graceMs: number;
}

/** Where a key stands at `now`. */
export type KeyState = "valid" | "due" | "expired";

/**
 * Rule: retired keys live for the grace period (or the shorter one their rotation gave them);
 * keys past rotation age plus grace are expired.
 */
export function keyState(
  key: Pick<StoredKey, "created_at" | "retired_at" | "grace_ms">,
  now: number,
  policy: KeyPolicy,
): KeyState {
  if (key.retired_at !== null) {
    const grace = Math.min(key.grace_ms ?? policy.graceMs, policy.graceMs);
    if (now >= key.retired_at + grace) return "expired";
  }
  if (now >= key.created_at + policy.rotationMs + policy.graceMs) return "expired";
  if (now >= key.created_at + policy.rotationMs) return "due";
  return "valid";
}

/** Keys a device record keeps, and that verify, at most: the current one and the previous. */
export const MAX_KEYS = 2;

/**
 * The keys after a rotation at `now`: the current one retired (with `graceMs` when shorter than
 * the policy's; dropped at once when it is 0, for a leaked key), then `fresh`. Older keys are
 * dropped; the audit log keeps their history.
 */
export function rotateKeys(
  keys: StoredKey[],
  fresh: StoredKey,
  now: number,
  options: { policy: KeyPolicy; graceMs?: number },
): StoredKey[] {
  const current = keys.filter((k) => k.retired_at === null).at(-1) ?? keys.at(-1);
  const graceMs = options.graceMs;
  if (!current || graceMs === 0 || keyState(current, now, options.policy) === "expired") {
    return [fresh];
  }
  const retired: StoredKey = {
    ...current,
    retired_at: current.retired_at ?? now,
    ...(graceMs !== undefined && graceMs < options.policy.graceMs ? { grace_ms: graceMs } : {}),
  };
  return [retired, fresh];
}

/** A key id: short, unique per device, sortable by creation. */
export function newKeyId(now: number): string {
  const rand = crypto.getRandomValues(new Uint8Array(4));
  return `k${now.toString(36)}${Array.from(rand, (b) => b.toString(16).padStart(2, "0")).join("")}`;
}
