// Strict Ed25519: RFC 8032 vectors, the "Taming the many EdDSAs" edge cases, weak keys.
import assert from "node:assert/strict";
import { Buffer } from "node:buffer";
import {
  createPrivateKey,
  createPublicKey,
  generateKeyPairSync,
  type KeyObject,
  sign,
  verify,
} from "node:crypto";
import {
  ed25519KeyProblem,
  isCanonicalPoint,
  isCanonicalScalar,
  isSmallOrderPoint,
  verifyEd25519Strict,
} from "../core/ed25519_strict.ts";
import {
  ed25519Raw,
  parseEd25519PublicKey,
  verifyWith,
  vetEd25519PublicKey,
} from "../core/signature.ts";

const hex = (text: string) => Uint8Array.from(Buffer.from(text, "hex"));
const L = (1n << 252n) + 27742317777372353535851937790883648493n;

/** A KeyObject for any 32 bytes, bypassing our parser (as a key stored before the fix would be). */
function rawKey(raw: Uint8Array): KeyObject {
  return createPublicKey({
    key: { kty: "OKP", crv: "Ed25519", x: Buffer.from(raw).toString("base64url") },
    format: "jwk",
  });
}

function strict(publicKey: string, message: string, signature: string): boolean {
  const raw = hex(publicKey);
  return verifyEd25519Strict(rawKey(raw), raw, hex(message), hex(signature));
}

function scalarBytes(n: bigint): Uint8Array {
  const out = new Uint8Array(32);
  for (let i = 0; i < 32; i++) {
    out[i] = Number(n & 0xffn);
    n >>= 8n;
  }
  return out;
}

function scalarOf(bytes: Uint8Array): bigint {
  let n = 0n;
  for (let i = 31; i >= 0; i--) n = (n << 8n) | BigInt(bytes[i]);
  return n;
}

// RFC 8032 §7.1: secret key (seed), public key, message, signature.
const RFC8032 = [
  {
    name: "TEST 1 (empty message)",
    seed: "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
    publicKey: "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
    message: "",
    signature: "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155" +
      "5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b",
  },
  {
    name: "TEST 2 (one byte)",
    seed: "4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
    publicKey: "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
    message: "72",
    signature: "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da" +
      "085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00",
  },
  {
    name: "TEST 3 (two bytes)",
    seed: "c5aa8df43f9f837bedb7442f31dcb7b166d38535076f094b85ce3a2e0b4458f7",
    publicKey: "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025",
    message: "af82",
    signature: "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac" +
      "18ff9b538d16f290ae67f760984dc6594a7c15e9716ed28dc027beceea1ec40a",
  },
  {
    name: 'TEST SHA(abc) (the message is SHA-512 of "abc")',
    seed: "833fe62409237b9d62ec77587520911e9a759cec1d19755b7da901b96dca3d42",
    publicKey: "ec172b93ad5e563bf4932c70e1245034c35467ef2efd4d64ebf819683467e2bf",
    message: "ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a" +
      "2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f",
    signature: "dc2a4459e7369633a52b1bf277839a00201009a3efbf3ecb69bea2186c26b589" +
      "09351fc9ac90b3ecfdfbc7c66431e0303dca179c138ac17ad9bef1177331a704",
  },
];

Deno.test("RFC 8032 §7.1 Ed25519 vectors sign and verify strictly", async (t) => {
  for (const v of RFC8032) {
    await t.step(v.name, () => {
      const privateKey = createPrivateKey({
        key: Buffer.from("302e020100300506032b657004220420" + v.seed, "hex"),
        format: "der",
        type: "pkcs8",
      });
      const publicKey = createPublicKey(privateKey);
      assert.equal(Buffer.from(ed25519Raw(publicKey), "base64url").toString("hex"), v.publicKey);
      assert.equal(sign(null, hex(v.message), privateKey).toString("hex"), v.signature);
      assert.equal(strict(v.publicKey, v.message, v.signature), true);
      assert.equal(ed25519KeyProblem(hex(v.publicKey)), null, "a key that may be registered");
      // One flipped bit of the message, R or S fails.
      const bad = hex(v.signature);
      bad[40] ^= 1;
      assert.equal(strict(v.publicKey, v.message, Buffer.from(bad).toString("hex")), false);
      assert.equal(strict(v.publicKey, v.message + "00", v.signature), false);
    });
  }
});

// "Taming the many EdDSAs" (Chalkias, Garillot, Nikolaenko 2020), ed25519-speccheck cases 0-9.
const TAMING = [
  {
    why: "S = 0, small-order A and R",
    message: "8c93255d71dcab10e8f379c26200f3c7bd5f09d9bc3068d3ef4edeb4853022b6",
    publicKey: "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa",
    signature: "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a" +
      "0000000000000000000000000000000000000000000000000000000000000000",
    strict: false,
  },
  {
    why: "small-order A, mixed-order R",
    message: "9bd9f44f4dcc75bd531b56b2cd280b0bb38fc1cd6d1230e14861d861de092e79",
    publicKey: "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa",
    signature: "f7badec5b8abeaf699583992219b7b223f1df3fbbea919844e3f7c554a43dd43" +
      "a5bb704786be79fc476f91d3f3f89b03984d8068dcf1bb7dfc6637b45450ac04",
    strict: false,
  },
  {
    why: "mixed-order A, small-order R",
    message: "aebf3f2601a0c8c5d39cc7d8911642f740b78168218da8471772b35f9d35b9ab",
    publicKey: "f7badec5b8abeaf699583992219b7b223f1df3fbbea919844e3f7c554a43dd43",
    signature: "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa" +
      "8c4bd45aecaca5b24fb97bc10ac27ac8751a7dfe1baff8b953ec9f5833ca260e",
    strict: false,
  },
  {
    why: "mixed-order A and R, both equations hold",
    message: "9bd9f44f4dcc75bd531b56b2cd280b0bb38fc1cd6d1230e14861d861de092e79",
    publicKey: "cdb267ce40c5cd45306fa5d2f29731459387dbf9eb933b7bd5aed9a765b88d4d",
    signature: "9046a64750444938de19f227bb80485e92b83fdb4b6506c160484c016cc1852f" +
      "87909e14428a7a1d62e9f22f3d3ad7802db02eb2e688b6c52fcd6648a98bd009",
    strict: true,
  },
  {
    why: "mixed-order A and R, only the cofactored equation holds",
    message: "e47d62c63f830dc7a6851a0b1f33ae4bb2f507fb6cffec4011eaccd55b53f56c",
    publicKey: "cdb267ce40c5cd45306fa5d2f29731459387dbf9eb933b7bd5aed9a765b88d4d",
    signature: "160a1cb0dc9c0258cd0a7d23e94d8fa878bcb1925f2c64246b2dee1796bed512" +
      "5ec6bc982a269b723e0668e540911a9a6a58921d6925e434ab10aa7940551a09",
    strict: false,
  },
  {
    why: "mixed-order A, prime-order R, cofactored equation only with 8h unreduced",
    message: "e47d62c63f830dc7a6851a0b1f33ae4bb2f507fb6cffec4011eaccd55b53f56c",
    publicKey: "cdb267ce40c5cd45306fa5d2f29731459387dbf9eb933b7bd5aed9a765b88d4d",
    signature: "21122a84e0b5fca4052f5b1235c80a537878b38f3142356b2c2384ebad4668b7" +
      "e40bc836dac0f71076f9abe3a53f9c03c1ceeeddb658d0030494ace586687405",
    strict: false,
  },
  {
    why: "S > L",
    message: "85e241a07d148b41e47d62c63f830dc7a6851a0b1f33ae4bb2f507fb6cffec40",
    publicKey: "442aad9f089ad9e14647b1ef9099a1ff4798d78589e66f28eca69c11f582a623",
    signature: "e96f66be976d82e60150baecff9906684aebb1ef181f67a7189ac78ea23b6c0e" +
      "547f7690a0e2ddcd04d87dbc3490dc19b3b3052f7ff0538cb68afb369ba3a514",
    strict: false,
  },
  {
    why: "S >> L",
    message: "85e241a07d148b41e47d62c63f830dc7a6851a0b1f33ae4bb2f507fb6cffec40",
    publicKey: "442aad9f089ad9e14647b1ef9099a1ff4798d78589e66f28eca69c11f582a623",
    signature: "8ce5b96c8f26d0ab6c47958c9e68b937104cd36e13c33566acd2fe8d38aa1942" +
      "7e71f98a473474f2f13f06f97c20d58cc3f54b8bd0d272f42b695dd7e89a8c22",
    strict: false,
  },
  {
    why: "non-canonical R (y = p), small order",
    message: "fdaebc429f4a735932a160da1301080c13280eea8bc280d1b392c6b9e6ba3a5a",
    publicKey: "f7badec5b8abeaf699583992219b7b223f1df3fbbea919844e3f7c554a43dd43",
    signature: "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f" +
      "454d370c8d9fc323a41450f8d513eafeb5b0697390c1e505a0d4ddc71f566607",
    strict: false,
  },
  {
    why: "non-canonical R (y = p), hashed unreduced",
    message: "84b698d39be126ff55fe45079e6c8bf64a0d7db6994560b4e96b7021eb39c1a1",
    publicKey: "f7badec5b8abeaf699583992219b7b223f1df3fbbea919844e3f7c554a43dd43",
    signature: "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f" +
      "084d5b99c2a9463d9c8bd5026916996984eeec87ddf1d3be329006ace1b37b09",
    strict: false,
  },
];

Deno.test("the Taming-the-many-EdDSAs edge cases are decided strictly", async (t) => {
  for (const [i, v] of TAMING.entries()) {
    await t.step(`case ${i}: ${v.why}`, () => {
      assert.equal(strict(v.publicKey, v.message, v.signature), v.strict);
    });
  }
  await t.step("cases 0-2 are what the plain library accepts and we must not", () => {
    for (const v of TAMING.slice(0, 3)) {
      const raw = hex(v.publicKey);
      assert.equal(verify(null, hex(v.message), rawKey(raw), hex(v.signature)), true);
    }
  });
  await t.step("mixed-order keys (cases 2, 3, 8) are refused at registration", () => {
    for (const v of [TAMING[2], TAMING[3], TAMING[8]]) {
      assert.match(ed25519KeyProblem(hex(v.publicKey)) ?? "", /small-order component/);
    }
    assert.equal(ed25519KeyProblem(hex(TAMING[6].publicKey)), null);
  });
});

/** Every small-order point encoding: libsodium's list, each with and without the sign bit. */
const SMALL_ORDER = [
  "0000000000000000000000000000000000000000000000000000000000000000",
  "0100000000000000000000000000000000000000000000000000000000000000",
  "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
  "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
  "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
  "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
  "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
].flatMap((h) => {
  const signed = hex(h);
  signed[31] |= 0x80;
  return [h, Buffer.from(signed).toString("hex")];
});

Deno.test("weak public keys: small order and non-canonical encodings are refused", async (t) => {
  const identity = "01" + "00".repeat(31);
  const forged = identity + "00".repeat(32); // R = identity, S = 0

  await t.step("the identity key with a fixed signature is a forgery for any message", () => {
    const key = rawKey(hex(identity));
    for (const message of ["hello", "GRIDTOKENX_METER_READING\nmeter_id: m"]) {
      // The library alone accepts it; verifyWith must not.
      assert.equal(verify(null, Buffer.from(message), key, hex(forged)), true);
      assert.equal(verifyWith({ algorithm: "ed25519", publicKey: key }, message, forged), false);
    }
  });

  await t.step("every small-order encoding is refused as A, at parse and registration", () => {
    for (const point of SMALL_ORDER) {
      assert.equal(isSmallOrderPoint(hex(point)), true, point);
      assert.equal(parseEd25519PublicKey(point), null, point);
      const vetted = vetEd25519PublicKey(point);
      assert.ok("problem" in vetted && /weak key/.test(vetted.problem), point);
    }
  });

  await t.step("every small-order encoding is refused as R", () => {
    const { publicKey } = generateKeyPairSync("ed25519");
    for (const point of SMALL_ORDER) {
      const sig = point + "00".repeat(32);
      assert.equal(verifyWith({ algorithm: "ed25519", publicKey }, "m", sig), false, point);
    }
  });

  await t.step("non-canonical encodings (y >= p) are refused as A and R", () => {
    const { publicKey } = generateKeyPairSync("ed25519");
    for (let low = 0xed; low <= 0xff; low++) {
      for (const top of [0x7f, 0xff]) {
        const point = new Uint8Array(32).fill(0xff);
        point[0] = low;
        point[31] = top;
        assert.equal(isCanonicalPoint(point), false);
        const text = Buffer.from(point).toString("hex");
        assert.equal(parseEd25519PublicKey(text), null, text);
        assert.ok("problem" in vetEd25519PublicKey(text), text);
        const sig = text + "00".repeat(32);
        assert.equal(verifyWith({ algorithm: "ed25519", publicKey }, "m", sig), false, text);
      }
    }
    const below = new Uint8Array(32).fill(0xff);
    below[0] = 0xec;
    below[31] = 0x7f;
    assert.equal(isCanonicalPoint(below), true, "p - 1 is canonical (but of small order)");
  });

  await t.step("S + L and S = L of a valid signature are refused", () => {
    const { publicKey, privateKey } = generateKeyPairSync("ed25519");
    const message = "GRIDTOKENX_METER_READING";
    const sig = sign(null, Buffer.from(message), privateKey);
    const material = { algorithm: "ed25519" as const, publicKey };
    assert.equal(verifyWith(material, message, sig.toString("hex")), true);
    const s = scalarOf(sig.subarray(32));
    for (const bad of [s + L, L]) {
      const forged = Buffer.concat([sig.subarray(0, 32), scalarBytes(bad)]);
      assert.equal(isCanonicalScalar(forged, 32), false);
      assert.equal(verifyWith(material, message, forged.toString("hex")), false);
    }
    assert.equal(isCanonicalScalar(scalarBytes(L - 1n)), true);
  });

  await t.step("a point that is not on the curve is refused", () => {
    const off = "02" + "00".repeat(31);
    assert.match(ed25519KeyProblem(hex(off)) ?? "", /not a point/);
    assert.equal(parseEd25519PublicKey(off), null);
  });

  await t.step("generated keys are accepted, in every accepted form", () => {
    for (let i = 0; i < 20; i++) {
      const { publicKey } = generateKeyPairSync("ed25519");
      const raw = ed25519Raw(publicKey);
      assert.equal(ed25519KeyProblem(Buffer.from(raw, "base64url")), null);
      const pem = publicKey.export({ format: "pem", type: "spki" }).toString();
      assert.ok("key" in vetEd25519PublicKey(pem));
      assert.ok("key" in vetEd25519PublicKey(raw));
      const b64 = Buffer.from(raw, "base64url").toString("base64");
      assert.ok("key" in vetEd25519PublicKey(b64), b64);
      assert.ok("key" in vetEd25519PublicKey(Buffer.from(raw, "base64url").toString("hex")));
    }
  });

  await t.step("an encoding with junk, spaces or non-zero spare bits is refused", () => {
    const { publicKey } = generateKeyPairSync("ed25519");
    const raw = ed25519Raw(publicKey); // 43 characters of base64url
    const junk = [
      `${raw.slice(0, 20)}!!!$$$${raw.slice(20)}`,
      `${raw.slice(0, 20)} ${raw.slice(20)}`,
      `${raw.slice(0, 20)}\n${raw.slice(20)}`,
      ` ${raw}`,
      `${raw}==`,
      // The last character's 2 spare bits set: decodes to the same bytes, but is not canonical.
      raw.slice(0, 42) + "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"[
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_".indexOf(raw[42]) | 1
      ],
    ].filter((text) => text !== raw);
    for (const text of junk) {
      assert.equal(parseEd25519PublicKey(text), null, JSON.stringify(text));
      assert.ok("problem" in vetEd25519PublicKey(text), JSON.stringify(text));
    }
  });
});
