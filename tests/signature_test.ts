import assert from "node:assert/strict";
import { generateKeyPairSync, sign } from "node:crypto";
import { Buffer } from "node:buffer";
import {
  canonicalMessage,
  decodeSignature,
  ed25519Raw,
  hmacMaterial,
  parseEd25519PublicKey,
  signHmac,
  verifyWith,
} from "../core/signature.ts";
import { open, seal } from "../core/secret_box.ts";

const SECRET = Buffer.from(
  "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f",
  "hex",
);
const VECTOR = "9396d1b1e4fbc88d8cdcba4b9fcf3ff17d6e5f33bc5a003d893823c5ccfc6ceb";

Deno.test("canonicalMessage() and HMAC-SHA256 reproduce the published test vector", async (t) => {
  const message = canonicalMessage("meter-1", "2026-11-29T10:15:00Z", "12.5");
  await t.step("the message has four lines and no trailing newline", () => {
    assert.equal(
      message,
      "GRIDTOKENX_METER_READING\nmeter_id: meter-1\ntimestamp: 2026-11-29T10:15:00Z\nkwh_amount: 12.5",
    );
  });
  await t.step("the signature matches the vector", () => {
    assert.equal(signHmac(SECRET, message), VECTOR);
  });
  await t.step("hex, upper-case hex and base64url encodings all verify", () => {
    const material = hmacMaterial(SECRET);
    assert.equal(verifyWith(material, message, VECTOR), true);
    assert.equal(verifyWith(material, message, VECTOR.toUpperCase()), true);
    const b64 = Buffer.from(VECTOR, "hex").toString("base64url");
    assert.equal(verifyWith(material, message, b64), true);
    assert.equal(verifyWith(material, message, b64 + "="), true);
  });
  await t.step("any change to a signed value fails verification", () => {
    const material = hmacMaterial(SECRET);
    const other = canonicalMessage("meter-1", "2026-11-29T10:15:00Z", "12.50");
    assert.equal(verifyWith(material, other, VECTOR), false);
    assert.equal(verifyWith(material, message, VECTOR.slice(0, 62) + "00"), false);
  });
  await t.step("malformed signatures are refused before comparison", () => {
    assert.equal(decodeSignature("zz", "hmac-sha256"), null);
    assert.equal(decodeSignature(VECTOR + "00", "hmac-sha256"), null);
    assert.equal(decodeSignature("not base64!", "hmac-sha256"), null);
  });
});

Deno.test("Ed25519 signatures verify with a raw, base64url or PEM public key", () => {
  const { publicKey, privateKey } = generateKeyPairSync("ed25519");
  const message = canonicalMessage("meter-9", "2026-11-29T10:15:00Z", "3.25");
  const sig = sign(null, Buffer.from(message), privateKey);
  const raw = ed25519Raw(publicKey);
  const forms = [
    raw,
    Buffer.from(raw, "base64url").toString("hex"),
    publicKey.export({ format: "pem", type: "spki" }).toString(),
  ];
  for (const form of forms) {
    const parsed = parseEd25519PublicKey(form);
    assert.ok(parsed, `parses ${form.slice(0, 20)}`);
    const material = { algorithm: "ed25519" as const, publicKey: parsed };
    assert.equal(verifyWith(material, message, sig.toString("base64url")), true);
    assert.equal(verifyWith(material, message, sig.toString("hex")), true);
    assert.equal(verifyWith(material, message + "x", sig.toString("hex")), false);
  }
  assert.equal(parseEd25519PublicKey("abcd"), null);
});

Deno.test("seal() and open() round-trip and reject another context or key", () => {
  const kek = new Uint8Array(32).fill(1);
  const sealed = seal(kek, SECRET, "gridtokenx:meter-1:k1");
  assert.notEqual(sealed.includes(SECRET.toString("hex")), true);
  assert.deepEqual(open(kek, sealed, "gridtokenx:meter-1:k1"), SECRET);
  assert.throws(() => open(kek, sealed, "gridtokenx:meter-2:k1"));
  assert.throws(() => open(new Uint8Array(32).fill(2), sealed, "gridtokenx:meter-1:k1"));
});

Deno.test("the README's further test vectors hold: base64url, a JSON number, Ed25519", () => {
  const message = canonicalMessage("meter-1", "2026-11-29T10:15:00Z", "12.5");
  assert.equal(
    Buffer.from(signHmac(SECRET, message), "hex").toString("base64url"),
    "k5bRseT7yI2M3LpLn88_8X1uXzO8WgA9iTgjxcz8bOs",
  );
  assert.equal(
    signHmac(SECRET, canonicalMessage("meter-1", "2026-11-29T10:30:00Z", JSON.stringify(7))),
    "340b561b110b5c2d89dc1e75507fa3ebb3c34794cd9063ec6fbef2d274e96baa",
  );
  // Ed25519 private key seed = the HMAC secret above; signatures are deterministic.
  const publicKey = parseEd25519PublicKey(
    "03a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b8",
  )!;
  const sig = "58553a602fea1646ba742408af8df664f1a2c4c70f483cdcf607a94b736ea164" +
    "81fa183c243609f13cbf210db3390c7c567625ce239159f5f85c44d81c73b80b";
  assert.equal(verifyWith({ algorithm: "ed25519", publicKey }, message, sig), true);
});
