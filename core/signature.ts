import { createHmac, createPublicKey, type KeyObject } from "node:crypto";
import { Buffer } from "node:buffer";
import { ed25519KeyProblem, verifyEd25519Strict, weakPointProblem } from "./ed25519_strict.ts";
import { hmacSha256Equals, type HmacSha256Key, hmacSha256Key } from "./sha256.ts";

/** Device key algorithms. */
export type KeyAlgorithm = "hmac-sha256" | "ed25519";

const SIGNATURE_BYTES: Record<KeyAlgorithm, number> = { "hmac-sha256": 32, ed25519: 64 };

/** The canonical message a device signs (DESIGN.md §4); values exactly as transmitted. */
export function canonicalMessage(meterId: string, timestamp: string, kwh: string): string {
  return `GRIDTOKENX_METER_READING\nmeter_id: ${meterId}\ntimestamp: ${timestamp}\nkwh_amount: ${kwh}`;
}

/**
 * The message signed as the MQTT CONNECT password (DESIGN.md §8a); bound to the client id so a
 * captured password cannot open another session.
 */
export function connectMessage(meterId: string, clientId: string, unixSeconds: string): string {
  return `GRIDTOKENX_MQTT_CONNECT\nmeter_id: ${meterId}\nclient_id: ${clientId}\ntimestamp: ${unixSeconds}`;
}

/** Decodes a hex or base64url (padding optional) signature; `null` when neither fits. */
export function decodeSignature(text: string, algorithm: KeyAlgorithm): Uint8Array | null {
  const bytes = SIGNATURE_BYTES[algorithm];
  if (text.length === bytes * 2) {
    const decoded = decodeHex(text);
    if (decoded) return decoded;
  }
  if (!/^[A-Za-z0-9_-]+={0,2}$/.test(text)) return null;
  const decoded = Buffer.from(text.replace(/=+$/, ""), "base64url");
  return decoded.length === bytes ? decoded : null;
}

/** Hex digits to bytes; `null` at the first character that is not one. */
function decodeHex(text: string): Uint8Array | null {
  const out = new Uint8Array(text.length >> 1);
  for (let i = 0; i < out.length; i++) {
    const hi = nibble(text.charCodeAt(2 * i)), lo = nibble(text.charCodeAt(2 * i + 1));
    if ((hi | lo) < 0) return null;
    out[i] = (hi << 4) | lo;
  }
  return out;
}

function nibble(c: number): number {
  if (c >= 48 && c <= 57) return c - 48; // 0-9
  if (c >= 97 && c <= 102) return c - 87; // a-f
  if (c >= 65 && c <= 70) return c - 55; // A-F
  return -1;
}

/**
 * Parses an Ed25519 public key given as 32 raw bytes in hex/base64url/base64, or as PEM; `null`
 * when malformed or weak (non-canonical or of small order: such a key lets a fixed signature
 * verify for any message).
 */
export function parseEd25519PublicKey(text: string): KeyObject | null {
  const parsed = readEd25519PublicKey(text);
  return parsed && weakPointProblem(parsed.raw) === null ? parsed.key : null;
}

/**
 * Vets a public key offered at registration or rotation: the key, or why it is refused. Beyond
 * {@linkcode parseEd25519PublicKey} it requires a point of the prime-order subgroup (a few ms).
 */
export function vetEd25519PublicKey(text: string): { key: KeyObject } | { problem: string } {
  const parsed = readEd25519PublicKey(text);
  if (!parsed) {
    return {
      problem: "public_key must be an Ed25519 key: 32 raw bytes as hex or base64url, or a PEM " +
        "public key",
    };
  }
  const problem = ed25519KeyProblem(parsed.raw);
  if (problem) return { problem: `public_key ${problem}; it is refused as a weak key` };
  return { key: parsed.key };
}

function readEd25519PublicKey(text: string): { key: KeyObject; raw: Uint8Array } | null {
  try {
    if (text.includes("BEGIN PUBLIC KEY")) {
      const key = createPublicKey(text);
      if (key.asymmetricKeyType !== "ed25519") return null;
      return { key, raw: rawOf(key) };
    }
    // Strictly one of the encodings: Buffer's base64 decoder silently skips characters that do
    // not belong, so a key with junk (or spaces) inside would otherwise register.
    let raw: Buffer;
    if (/^[0-9a-fA-F]{64}$/.test(text)) raw = Buffer.from(text, "hex");
    else if (/^[A-Za-z0-9+/_-]{43}=?$/.test(text)) {
      raw = Buffer.from(
        text.replace(/=$/, "").replace(/\+/g, "-").replace(/\//g, "_"),
        "base64url",
      );
      // The last character carries 2 unused bits: only their zero form is canonical.
      if (
        raw.toString("base64url") !== text.replace(/=$/, "").replace(/\+/g, "-").replace(/\//g, "_")
      ) {
        return null;
      }
    } else return null;
    if (raw.length !== 32) return null;
    const key = createPublicKey({
      key: { kty: "OKP", crv: "Ed25519", x: raw.toString("base64url") },
      format: "jwk",
    });
    return { key, raw };
  } catch {
    return null;
  }
}

/** Raw 32-byte form (base64url) of an Ed25519 public key, the form we store. */
export function ed25519Raw(key: KeyObject): string {
  return (key.export({ format: "jwk" }) as { x: string }).x;
}

function rawOf(key: KeyObject): Uint8Array {
  return Buffer.from(ed25519Raw(key), "base64url");
}

/** Key material ready to verify: an HMAC secret or an Ed25519 public key. */
export type KeyMaterial =
  | { algorithm: "hmac-sha256"; key: HmacSha256Key }
  | { algorithm: "ed25519"; publicKey: KeyObject };

/** Raw bytes of the Ed25519 keys seen by {@linkcode verifyWith}, exported once per key. */
const rawKeys = new WeakMap<KeyObject, Uint8Array>();

/** Verifies `signature` over `message`; constant-time for HMAC, strict for Ed25519. */
export function verifyWith(material: KeyMaterial, message: string, signature: string): boolean {
  const sig = decodeSignature(signature, material.algorithm);
  if (sig === null) return false;
  if (material.algorithm === "hmac-sha256") return hmacSha256Equals(material.key, message, sig);
  const key = material.publicKey;
  let raw = rawKeys.get(key);
  if (raw === undefined) {
    raw = rawOf(key);
    rawKeys.set(key, raw);
  }
  return verifyEd25519Strict(key, raw, Buffer.from(message), sig);
}

/** HMAC key material from a device secret (pad states computed once, here). */
export function hmacMaterial(secret: Uint8Array): KeyMaterial {
  return { algorithm: "hmac-sha256", key: hmacSha256Key(secret) };
}

/** Signs `message` with an HMAC secret (the reference signer; returns hex). */
export function signHmac(secret: Uint8Array, message: string): string {
  return createHmac("sha256", secret).update(message).digest("hex");
}
