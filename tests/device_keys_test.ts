// Device keys end to end: weak Ed25519 keys, unreadable sealed secrets, no-store responses,
// bad signatures in the security log.
import assert from "node:assert/strict";
import { Buffer } from "node:buffer";
import { generateKeyPairSync, sign } from "node:crypto";
import { connect } from "mqtt";
import { ActorRegistry, type ReadingSink } from "../actors/registry.ts";
import { ManualClock } from "../core/clock.ts";
import type { DeviceRecord } from "../core/device.ts";
import type { Logger } from "../core/logger.ts";
import { SecurityLog } from "../core/security_log.ts";
import { canonicalMessage, connectMessage, ed25519Raw, signHmac } from "../core/signature.ts";
import { KvStore } from "../db/kv_store.ts";
import { deviceRecord, hmacDevice, plainUser, storeDevice } from "./_devices.ts";
import { isoAgo, startTestGateway, type TestGateway } from "./_gateway.ts";
import { memoryLogger } from "./_memory_logger.ts";

const IDENTITY = "01" + "00".repeat(31);
const ZERO = "00".repeat(32);
/** R = the identity, S = 0: verifies for every message under the identity key. */
const FORGED = IDENTITY + "00".repeat(32);
/** Mixed order (a prime-order point plus a torsion part), from the Taming-the-EdDSAs vectors. */
const MIXED = "cdb267ce40c5cd45306fa5d2f29731459387dbf9eb933b7bd5aed9a765b88d4d";

function register(gw: TestGateway, body: Record<string, unknown>) {
  return gw.request("POST", "/api/admin/devices/register", { token: gw.adminToken, body });
}

/** An Ed25519 device to store directly, bypassing registration (as written before the fix). */
function ed25519Device(meterId: string, userId: string, publicKey: string): DeviceRecord {
  const public_key = Buffer.from(publicKey, "hex").toString("base64url");
  return deviceRecord(meterId, userId, { algorithm: "ed25519", public_key });
}

/** The CONNACK return code of an MQTT CONNECT to the embedded broker (0: accepted). */
async function connectCode(
  port: number,
  username: string,
  password: string,
  clientId: string,
): Promise<number> {
  const client = connect({
    host: "127.0.0.1",
    port,
    protocolVersion: 4,
    clientId,
    username,
    password,
    reconnectPeriod: 0,
    connectTimeout: 30_000,
  });
  client.on("error", () => {});
  try {
    return await new Promise<number>((resolve) => {
      client.once("connect", () => resolve(0));
      client.once("error", (error) => resolve((error as { code?: number }).code ?? -1));
      client.once("close", () => resolve(-1));
    });
  } finally {
    await client.endAsync(true);
  }
}

Deno.test("weak Ed25519 public keys are refused at registration and never verify", async (t) => {
  await using gw = await startTestGateway();
  const owner = await gw.createUser("weak@example.com");

  await t.step(
    "the identity, all-zero, non-canonical and mixed-order keys are refused",
    async () => {
      const nonCanonical = "ee" + "ff".repeat(30) + "7f"; // p + 1, another encoding of 1
      for (const [i, key] of [IDENTITY, ZERO, nonCanonical, MIXED].entries()) {
        const res = await register(gw, {
          meter_id: `weak-${i}`,
          user_id: owner.id,
          algorithm: "ed25519",
          public_key: key,
        });
        assert.equal(res.status, 400, `${key}: ${JSON.stringify(res.body)}`);
        assert.equal(res.body.error.code, "invalid_payload");
        assert.match(res.body.error.message, /weak key/);
      }
      const list = await gw.request("GET", "/api/admin/devices", { token: gw.adminToken });
      assert.equal(list.body.items.length, 0, "nothing was registered");
    },
  );

  await t.step("a sound key registers, and rotating to a weak one is refused", async () => {
    const { publicKey } = generateKeyPairSync("ed25519");
    const res = await register(gw, {
      meter_id: "sound-1",
      user_id: owner.id,
      algorithm: "ed25519",
      public_key: ed25519Raw(publicKey),
    });
    assert.equal(res.status, 201, JSON.stringify(res.body));
    const rotated = await gw.request("POST", "/api/admin/devices/sound-1/rotate", {
      token: gw.adminToken,
      body: { public_key: IDENTITY },
    });
    assert.equal(rotated.status, 400);
    assert.match(rotated.body.error.message, /small order/);
  });

  await t.step("a forged reading against a stored identity key is 401 bad_signature", async () => {
    await storeDevice(gw.gateway.store, ed25519Device("stored-weak", owner.id, IDENTITY));
    for (const kwh of ["1.5", "99"]) {
      const res = await gw.request("POST", "/api/meters/submit-reading", {
        token: owner.token,
        body: {
          meter_id: "stored-weak",
          kwh_amount: kwh,
          reading_timestamp: isoAgo(kwh === "99" ? 3_600_000 : 7_200_000),
          device_signature: FORGED,
        },
      });
      assert.equal(res.status, 401, JSON.stringify(res.body));
      assert.equal(res.body.error.code, "bad_signature");
    }
  });

  await t.step("a forged MQTT CONNECT password for that key is not authorised", async () => {
    const port = gw.gateway.broker!.ports.mqtt;
    const seconds = String(Math.floor(Date.now() / 1000));
    assert.equal(
      await connectCode(port, "stored-weak", `${seconds}.${FORGED}`, "stored-weak"),
      5,
    );
    // The registry refuses it too (the path of every transport).
    const verdict = await gw.gateway.registry.authenticate(
      "stored-weak",
      connectMessage("stored-weak", "stored-weak", seconds),
      FORGED,
    );
    assert.equal(verdict?.kind === "reject" && verdict.code, "bad_signature");
  });

  await t.step("a sound stored key still verifies readings and CONNECT", async () => {
    const { publicKey, privateKey } = generateKeyPairSync("ed25519");
    const raw = Buffer.from(ed25519Raw(publicKey), "base64url").toString("hex");
    await storeDevice(gw.gateway.store, ed25519Device("stored-sound", owner.id, raw));
    const ts = isoAgo(3_600_000);
    const message = canonicalMessage("stored-sound", ts, "2.5");
    const res = await gw.request("POST", "/api/meters/submit-reading", {
      token: owner.token,
      body: {
        meter_id: "stored-sound",
        kwh_amount: "2.5",
        reading_timestamp: ts,
        device_signature: sign(null, Buffer.from(message), privateKey).toString("hex"),
      },
    });
    assert.equal(res.status, 201, JSON.stringify(res.body));
    const seconds = String(Math.floor(Date.now() / 1000));
    const hello = connectMessage("stored-sound", "stored-sound", seconds);
    const sig = sign(null, Buffer.from(hello), privateKey).toString("hex");
    const port = gw.gateway.broker!.ports.mqtt;
    assert.equal(await connectCode(port, "stored-sound", `${seconds}.${sig}`, "stored-sound"), 0);
  });
});

Deno.test("over HTTP, a secret sealed under another KEK is 503 naming the cause", async () => {
  await using gw = await startTestGateway();
  const owner = await gw.createUser("kek@example.com");
  await storeDevice(
    gw.gateway.store,
    hmacDevice("other-kek", owner.id, new Uint8Array(32).fill(9), SECRET),
  );
  const ts = isoAgo(3_600_000);
  const res = await gw.request("POST", "/api/meters/submit-reading", {
    token: owner.token,
    body: {
      meter_id: "other-kek",
      kwh_amount: "1",
      reading_timestamp: ts,
      device_signature: signHmac(SECRET, canonicalMessage("other-kek", ts, "1")),
    },
  });
  assert.equal(res.status, 503, JSON.stringify(res.body));
  assert.equal(res.body.error.code, "unavailable");
  assert.match(res.body.error.message, /cannot be decrypted.*DEVICE_KEY_ENCRYPTION_KEY/);
  assert.ok(Number(res.headers.get("retry-after")) > 0);
});

Deno.test("register, rotate and import responses carry Cache-Control: no-store", async () => {
  await using gw = await startTestGateway();
  const owner = await gw.createUser("cache@example.com");
  const registered = await register(gw, { meter_id: "cache-1", user_id: owner.id });
  assert.equal(registered.status, 201);
  assert.equal(registered.headers.get("cache-control"), "no-store");
  const rotated = await gw.request("POST", "/api/admin/devices/cache-1/rotate", {
    token: gw.adminToken,
  });
  assert.equal(rotated.status, 200);
  assert.equal(rotated.headers.get("cache-control"), "no-store");
  const imported = await gw.request("POST", "/api/admin/devices/import", {
    token: gw.adminToken,
    body: { devices: [{ meter_id: "cache-2", user_id: owner.id }] },
  });
  assert.equal(imported.status, 200);
  assert.match(imported.body.results[0].secret_hex, /^[0-9a-f]{64}$/);
  assert.equal(imported.headers.get("cache-control"), "no-store");
});

const NOW = Date.parse("2026-11-29T12:00:00Z");
const SECRET = Buffer.alloc(32, 5);

/** A registry over a fresh in-memory store whose meter "m1" has its secret sealed under `sealKek`. */
async function registryWith(sealKek: Uint8Array, logger: Logger, security?: SecurityLog) {
  const store = await KvStore.open(undefined, { dedupeWindowMs: 15 * 60_000 });
  await store.createUser(plainUser("u1", NOW));
  await storeDevice(store, hmacDevice("m1", "u1", sealKek, SECRET, NOW));
  const sink: ReadingSink = {
    submit: (row) => store.insertReadings([row]).then((r) => r[0]),
  };
  const registry = new ActorRegistry({
    store,
    sink,
    clock: new ManualClock(NOW),
    logger,
    kek: new Uint8Array(32).fill(1),
    settings: {
      rules: {
        kwhMax: 100,
        maxAgeMs: 7 * 86_400_000,
        maxFutureMs: 300_000,
        dedupeWindowMs: 900_000,
      },
      bucket: { burst: 100, refillPerMs: 1 / 60_000 },
      keys: { rotationMs: 90 * 86_400_000, graceMs: 86_400_000 },
      recent: 4,
    },
    idleTtlMs: 60_000,
    maxActors: 100,
    mailboxMax: 100,
    security,
  });
  return { store, registry };
}

function reading(minutesAgo: number, signature?: string) {
  const ts = new Date(NOW - minutesAgo * 60_000).toISOString().replace(".000Z", "Z");
  return {
    meter_id: "m1",
    kwh_amount: "1.25",
    reading_timestamp: ts,
    device_signature: signature ?? signHmac(SECRET, canonicalMessage("m1", ts, "1.25")),
    source: "mqtt" as const,
  };
}

Deno.test("a sealed key the gateway cannot decrypt is reported as that, once", async (t) => {
  const logger = memoryLogger();
  const { store, registry } = await registryWith(new Uint8Array(32).fill(2), logger);
  try {
    await t.step(
      "readings are answered unavailable, naming DEVICE_KEY_ENCRYPTION_KEY",
      async () => {
        for (const minutes of [60, 30]) {
          const outcome = await registry.submit(reading(minutes));
          assert.equal(outcome.status, "rejected");
          if (outcome.status !== "rejected") return;
          assert.equal(outcome.code, "unavailable");
          assert.match(outcome.message, /device key of meter "m1" cannot be decrypted/);
          assert.match(outcome.message, /DEVICE_KEY_ENCRYPTION_KEY/);
          assert.ok(outcome.retryAfter! > 0);
        }
        const verdict = await registry.authenticate("m1", "x", "00".repeat(32));
        assert.equal(verdict?.kind === "reject" && verdict.code, "unavailable");
      },
    );
    await t.step("the error is logged once with the meter id, not per reading", () => {
      const errors = logger.entries.filter((l) => l.level === "error");
      assert.equal(errors.length, 1, JSON.stringify(errors));
      assert.match(errors[0].msg, /cannot be decrypted.*DEVICE_KEY_ENCRYPTION_KEY/);
      assert.deepEqual(errors[0].fields, { meter_id: "m1", key_ids: ["k1"] });
      assert.equal(registry.size, 1, "the actor stays active: no reload per reading");
    });
  } finally {
    await store.close();
  }
});

Deno.test("bad signatures are logged as security events, without the signature", async () => {
  const logger = memoryLogger();
  const security = new SecurityLog({ logger, clock: new ManualClock(NOW) });
  const kek = new Uint8Array(32).fill(1);
  const { store, registry } = await registryWith(kek, logger, security);
  try {
    const forged = "ab".repeat(32);
    const outcome = await registry.submit({ ...reading(60, forged), address: "192.0.2.7" });
    assert.equal(outcome.status === "rejected" && outcome.code, "bad_signature");
    assert.equal((await registry.submit(reading(30))).status, "accepted");
    const warns = logger.entries.filter((l) => l.level === "warn");
    assert.equal(warns.length, 1, JSON.stringify(logger.entries));
    assert.equal(warns[0].msg, "security: bad_signature");
    assert.deepEqual(warns[0].fields, {
      event: "bad_signature",
      address: "192.0.2.7",
      meter_id: "m1",
      source: "mqtt",
    });
    assert.doesNotMatch(JSON.stringify(logger.entries), new RegExp(forged));
  } finally {
    await store.close();
  }
});
