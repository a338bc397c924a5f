// Users and devices written straight to a store, bypassing the API (fixtures for store-level tests).
import type { DeviceRecord, StoredKey } from "../core/device.ts";
import { secretContext } from "../core/device_keys.ts";
import { seal } from "../core/secret_box.ts";
import type { NewUserRecord } from "../core/user.ts";
import type { Store } from "../db/store.ts";

/** A plain user `id` (email `<id>@x`, role "user", a dummy password hash) created at `at`. */
export function plainUser(id: string, at: number): NewUserRecord {
  return {
    id,
    email: `${id}@x`,
    role: "user",
    wallet_address: null,
    created_at: at,
    password_hash: "x",
  };
}

/** An active device with one key "k1" created at `at`; `key` names its algorithm and material. */
export function deviceRecord(
  meterId: string,
  userId: string,
  key: Pick<StoredKey, "algorithm" | "public_key" | "secret_enc">,
  at = Date.now(),
): DeviceRecord {
  return {
    meter_id: meterId,
    user_id: userId,
    status: "active",
    created_at: at,
    updated_at: at,
    revoked_at: null,
    keys: [{ key_id: "k1", ...key, created_at: at, retired_at: null }],
  };
}

/** An active HMAC device whose secret for key "k1" is sealed under `kek`. */
export function hmacDevice(
  meterId: string,
  userId: string,
  kek: Uint8Array,
  secret: Uint8Array,
  at = Date.now(),
): DeviceRecord {
  const secret_enc = seal(kek, secret, secretContext(meterId, "k1"));
  return deviceRecord(meterId, userId, { algorithm: "hmac-sha256", secret_enc }, at);
}

/** Stores `device` with a "registered" audit entry by "test". */
export function storeDevice(store: Store, device: DeviceRecord): Promise<void> {
  return store.createDevice(device, {
    id: crypto.randomUUID(),
    meter_id: device.meter_id,
    action: "registered",
    actor: "test",
    at: device.created_at,
  });
}
