import { randomBytes } from "node:crypto";
import type { Bus } from "../bus/bus.ts";
import type { Clock } from "../core/clock.ts";
import {
  type AuditEntry,
  type DeviceRecord,
  type KeyPolicy,
  keyState,
  newKeyId,
  rotateKeys,
  type StoredKey,
} from "../core/device.ts";
import { secretContext } from "../core/device_keys.ts";
import { GatewayError } from "../core/errors.ts";
import { type Logger, silentLogger } from "../core/logger.ts";
import { seal } from "../core/secret_box.ts";
import { ed25519Raw, type KeyAlgorithm, vetEd25519PublicKey } from "../core/signature.ts";
import type { Page, Store } from "../db/store.ts";
import type { BrokerAdmin } from "../mqtt/broker_admin.ts";

/** A registration request. */
export interface RegisterInput {
  /** The meter to register; must not be registered yet. */
  meter_id: string;
  /** The owner; must exist. */
  user_id: string;
  /** How the meter signs its readings. */
  algorithm: KeyAlgorithm;
  /** The meter's Ed25519 public key; omitted for HMAC, whose secret the gateway generates. */
  public_key?: string;
}

/** A rotation request. */
export interface RotateInput {
  /** The meter's new Ed25519 public key; omitted for HMAC, whose secret the gateway generates. */
  public_key?: string;
  /**
   * How long the previous key stays valid, in seconds, at most the configured grace period
   * (the default). 0 ends it at once: for a leaked key.
   */
  grace_seconds?: number;
}

/** A newly issued key; the HMAC secret is shown only here. */
export interface IssuedKey {
  /** The meter the key belongs to. */
  meter_id: string;
  /** The id readings name in `key_id`. */
  key_id: string;
  /** How the meter signs with it. */
  algorithm: KeyAlgorithm;
  /** The HMAC secret as hex; absent for Ed25519 keys. */
  secret_hex?: string;
}

/** A device as the API shows it: key states, never secrets. */
export interface DeviceView {
  /** The meter's id. */
  meter_id: string;
  /** The owner's id. */
  user_id: string;
  /** A revoked meter's readings are rejected. */
  status: "active" | "revoked";
  /** RFC 3339 registration time. */
  created_at: string;
  /** RFC 3339 revocation time, or `null`. */
  revoked_at: string | null;
  /** Whether a current key is due for rotation or already expired. */
  rotation_due: boolean;
  /** Every key still kept, oldest first, with its state now. */
  keys: {
    key_id: string;
    algorithm: KeyAlgorithm;
    created_at: string;
    retired_at: string | null;
    state: "valid" | "due" | "expired";
    public_key?: string;
  }[];
}

/** Options of {@linkcode DeviceService}. */
export interface DeviceServiceOptions {
  /** Where devices, keys and the audit log are kept. */
  store: Store;
  /** Told about every committed change, so every instance drops its cached device. */
  bus: Bus;
  /** The time of audit entries and key states. */
  clock: Clock;
  /** Key-encryption key that seals HMAC secrets at rest. */
  kek: Uint8Array;
  /** When keys are due for rotation and when retired keys expire. */
  policy: KeyPolicy;
  /** Receives failures that do not fail the request (a lost bus notification); default: none. */
  logger?: Logger;
  /**
   * An external broker's admin: told after a committed revocation (it disconnects the device
   * and refuses it) and after a registration (it lets the meter in). Not owned; default: none.
   */
  brokerAdmin?: BrokerAdmin;
}

/** Device provisioning, rotation and revocation, with the audit log and bus notifications. */
export class DeviceService {
  #store: Store;
  #bus: Bus;
  #clock: Clock;
  #kek: Uint8Array;
  #policy: KeyPolicy;
  #logger: Logger;
  #brokerAdmin?: BrokerAdmin;
  /** Keys issued (registrations and rotations) and devices revoked by this instance. */
  readonly stats = { keysRegistered: 0, keysRevoked: 0 };

  /** Makes the service; it owns none of the things it is given. */
  constructor(options: DeviceServiceOptions) {
    this.#store = options.store;
    this.#bus = options.bus;
    this.#clock = options.clock;
    this.#kek = options.kek;
    this.#policy = options.policy;
    this.#logger = options.logger ?? silentLogger;
    this.#brokerAdmin = options.brokerAdmin;
  }

  /** Registers a meter to a user with its first key. */
  async register(input: RegisterInput, actor: string): Promise<IssuedKey> {
    const owner = await this.#store.getUser(input.user_id);
    if (!owner) throw new GatewayError("not_found", `User "${input.user_id}" does not exist`);
    const now = this.#clock.now();
    const { key, issued } = this.#newKey(input.meter_id, input.algorithm, input.public_key, now);
    const device: DeviceRecord = {
      meter_id: input.meter_id,
      user_id: input.user_id,
      status: "active",
      created_at: now,
      updated_at: now,
      revoked_at: null,
      keys: [key],
    };
    // The owner checked above must still exist when the device is stored (a concurrent delete).
    await this.#store.createDevice(device, this.#audit(device, "registered", actor, key.key_id), {
      ownerMustExist: true,
    });
    this.stats.keysRegistered++;
    await this.#announce(input.meter_id, "registered", input.user_id);
    await this.#tellBroker("reinstate", input.meter_id);
    return issued;
  }

  /**
   * Issues a new key. The previous one stays valid for the grace period (or `grace_seconds`, 0
   * for none); any older key is dropped, so at most two keys ever verify.
   */
  async rotate(meterId: string, input: RotateInput, actor: string): Promise<IssuedKey> {
    const graceMs = input.grace_seconds === undefined ? undefined : input.grace_seconds * 1000;
    if (graceMs !== undefined && !(Number.isInteger(graceMs) && graceMs >= 0)) {
      throw new GatewayError("invalid_payload", "grace_seconds must be a whole number >= 0");
    }
    if (graceMs !== undefined && graceMs > this.#policy.graceMs) {
      throw new GatewayError(
        "invalid_payload",
        `grace_seconds may not exceed the configured grace period ` +
          `(DEVICE_KEY_ROTATION_GRACE, ${this.#policy.graceMs / 1000} s)`,
      );
    }
    let issued: IssuedKey | undefined;
    const rotated = await this.#store.updateDevice(meterId, (device) => {
      if (device.status === "revoked") {
        throw new GatewayError("device_revoked", `Meter "${meterId}" is revoked`);
      }
      const now = this.#clock.now();
      const algorithm = device.keys.at(-1)?.algorithm ?? "hmac-sha256";
      const fresh = this.#newKey(meterId, algorithm, input.public_key, now);
      issued = fresh.issued;
      const keys = rotateKeys(device.keys, fresh.key, now, { policy: this.#policy, graceMs });
      const updated = { ...device, keys, updated_at: now };
      const audit = this.#audit(updated, "rotated", actor, fresh.key.key_id);
      if (graceMs !== undefined) {
        audit.note = graceMs === 0
          ? "previous key ended at once (grace 0)"
          : `previous key valid for ${graceMs / 1000} s`;
      }
      return { device: updated, audit };
    });
    this.stats.keysRegistered++;
    await this.#announce(meterId, "rotated", rotated.user_id);
    return issued!;
  }

  /** Revokes a meter: every later reading is rejected, on every instance. */
  async revoke(meterId: string, actor: string, note?: string): Promise<DeviceView> {
    const updated = await this.#store.updateDevice(meterId, (device) => {
      const now = this.#clock.now();
      const revoked: DeviceRecord = {
        ...device,
        status: "revoked",
        revoked_at: device.revoked_at ?? now,
        updated_at: now,
      };
      return { device: revoked, audit: { ...this.#audit(revoked, "revoked", actor), note } };
    });
    this.stats.keysRevoked++;
    await this.#announce(meterId, "revoked", updated.user_id);
    await this.#tellBroker("revoke", meterId);
    return this.view(updated);
  }

  /** Lists devices, optionally one owner's. */
  async list(
    query: { user_id?: string; limit: number; cursor?: string },
  ): Promise<Page<DeviceView>> {
    const page = await this.#store.listDevices(query);
    return { items: page.items.map((d) => this.view(d)), next_cursor: page.next_cursor };
  }

  /** The API view of a device. */
  view(device: DeviceRecord): DeviceView {
    const now = this.#clock.now();
    const keys = device.keys.map((k) => ({
      key_id: k.key_id,
      algorithm: k.algorithm,
      created_at: iso(k.created_at),
      retired_at: k.retired_at === null ? null : iso(k.retired_at),
      state: keyState(k, now, this.#policy),
      ...(k.public_key ? { public_key: k.public_key } : {}),
    }));
    const current = keys.filter((k) => k.retired_at === null);
    return {
      meter_id: device.meter_id,
      user_id: device.user_id,
      status: device.status,
      created_at: iso(device.created_at),
      revoked_at: device.revoked_at === null ? null : iso(device.revoked_at),
      rotation_due: current.some((k) => k.state !== "valid"),
      keys,
    };
  }

  /**
   * Tells every instance about a committed change. The change stands either way, and a new
   * secret is shown only in this response, so a failed publish is logged, never thrown.
   */
  async #announce(
    meterId: string,
    change: "registered" | "rotated" | "revoked",
    userId: string,
  ): Promise<void> {
    try {
      await this.#bus.publish([{
        type: "device.changed",
        data: { meter_id: meterId, change, user_id: userId },
      }]);
    } catch (error) {
      this.#logger.error("device change committed but not published to the bus", {
        error,
        meter_id: meterId,
        change,
      });
    }
  }

  /**
   * Passes a committed change on to the external broker. The change stands either way (actors
   * refuse a revoked device's readings whatever the broker does), so a failure is logged, never
   * thrown. Waits for the broker's answer, bounded by the admin's command timeout.
   */
  async #tellBroker(action: "revoke" | "reinstate", meterId: string): Promise<void> {
    if (!this.#brokerAdmin) return;
    try {
      await this.#brokerAdmin[action](meterId);
    } catch (error) {
      this.#logger.error(
        action === "revoke"
          ? "device revoked but the external broker did not disconnect it"
          : "device registered but the external broker did not reinstate it",
        { error, meter_id: meterId },
      );
    }
  }

  #newKey(
    meterId: string,
    algorithm: KeyAlgorithm,
    publicKey: string | undefined,
    now: number,
  ): { key: StoredKey; issued: IssuedKey } {
    const key_id = newKeyId(now);
    if (algorithm === "ed25519") {
      if (publicKey === undefined) {
        throw new GatewayError(
          "invalid_payload",
          "ed25519 needs public_key: 32 raw bytes as hex or base64url, or a PEM public key",
        );
      }
      // Small-order and non-canonical keys let a fixed signature verify for every message.
      const vetted = vetEd25519PublicKey(publicKey);
      if ("problem" in vetted) throw new GatewayError("invalid_payload", vetted.problem);
      const raw = ed25519Raw(vetted.key);
      return {
        key: { key_id, algorithm, public_key: raw, created_at: now, retired_at: null },
        issued: { meter_id: meterId, key_id, algorithm },
      };
    }
    if (publicKey !== undefined) {
      throw new GatewayError(
        "invalid_payload",
        "hmac-sha256 keys are generated by the gateway; omit public_key",
      );
    }
    const secret = randomBytes(32);
    const secret_enc = seal(this.#kek, secret, secretContext(meterId, key_id));
    return {
      key: { key_id, algorithm, secret_enc, created_at: now, retired_at: null },
      issued: { meter_id: meterId, key_id, algorithm, secret_hex: secret.toString("hex") },
    };
  }

  #audit(
    device: DeviceRecord,
    action: AuditEntry["action"],
    actor: string,
    keyId?: string,
  ): AuditEntry {
    return {
      id: crypto.randomUUID(),
      meter_id: device.meter_id,
      action,
      actor,
      at: this.#clock.now(),
      ...(keyId ? { key_id: keyId } : {}),
    };
  }
}

function iso(ms: number): string {
  return new Date(ms).toISOString();
}
