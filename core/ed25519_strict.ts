// Strict Ed25519 (RFC 8032 §5.1.7 plus the checks of "Taming the many EdDSAs", Chalkias et al.
// 2020): a small-order public key lets one fixed signature verify for every message, so keys and
// signatures are vetted before the library's verify. The per-signature checks are byte
// comparisons; the full subgroup check (BigInt) runs only when a key is registered.
import { type KeyObject, verify } from "node:crypto";
import { Buffer } from "node:buffer";

/** Encoded points of small order (libsodium's blocklist), compared with the sign bit cleared. */
const SMALL_ORDER: readonly Uint8Array[] = [
  // 0 (order 4)
  "0000000000000000000000000000000000000000000000000000000000000000",
  // 1 (order 1, the identity)
  "0100000000000000000000000000000000000000000000000000000000000000",
  // the two y of the points of order 8
  "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
  "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
  // p - 1 (order 2)
  "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
  // p and p + 1: non-canonical encodings of 0 and 1
  "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
  "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
].map((hex) => Uint8Array.from(Buffer.from(hex, "hex")));

/** The group order L = 2^252 + 27742317777372353535851937790883648493, little-endian. */
const L_BYTES = Uint8Array.from(
  Buffer.from("edd3f55c1a631258d69cf7a2def9de1400000000000000000000000000000010", "hex"),
);

/** Whether the 32-byte point encoding at `at` names y < p (p = 2^255 - 19), sign bit aside. */
export function isCanonicalPoint(bytes: Uint8Array, at = 0): boolean {
  // y >= p only when the 255 bits are 2^255 - 19 .. 2^255 - 1: 0x7f, 0xff x 30, then >= 0xed.
  if ((bytes[at + 31] & 0x7f) !== 0x7f) return true;
  for (let i = 30; i > 0; i--) if (bytes[at + i] !== 0xff) return true;
  return bytes[at] < 0xed;
}

/** Whether the point encoding at `at` is one of the small-order points (any encoding of one). */
export function isSmallOrderPoint(bytes: Uint8Array, at = 0): boolean {
  for (const bad of SMALL_ORDER) {
    let diff = (bytes[at + 31] & 0x7f) ^ bad[31];
    for (let i = 0; i < 31 && diff === 0; i++) diff |= bytes[at + i] ^ bad[i];
    if (diff === 0) return true;
  }
  return false;
}

/** Whether the little-endian scalar at `at` is below the group order L. */
export function isCanonicalScalar(bytes: Uint8Array, at = 0): boolean {
  for (let i = 31; i >= 0; i--) {
    const b = bytes[at + i];
    if (b !== L_BYTES[i]) return b < L_BYTES[i];
  }
  return false; // S = L
}

/** Why a 32-byte point encoding may not serve as a public key or `R`; `null` when it may. */
export function weakPointProblem(bytes: Uint8Array, at = 0): string | null {
  if (!isCanonicalPoint(bytes, at)) return "is not canonically encoded (y >= 2^255 - 19)";
  if (isSmallOrderPoint(bytes, at)) return "is a point of small order";
  return null;
}

/**
 * Verifies an Ed25519 signature strictly: `A` (the raw public key) and `R` canonical and not of
 * small order, `S < L`, then the library's check. `rawPublicKey` must be the bytes of `publicKey`.
 */
export function verifyEd25519Strict(
  publicKey: KeyObject,
  rawPublicKey: Uint8Array,
  message: Uint8Array,
  signature: Uint8Array,
): boolean {
  if (rawPublicKey.length !== 32 || signature.length !== 64) return false;
  if (weakPointProblem(rawPublicKey) !== null) return false;
  if (weakPointProblem(signature, 0) !== null) return false;
  if (!isCanonicalScalar(signature, 32)) return false;
  try {
    return verify(null, message, publicKey, signature);
  } catch {
    return false; // R or A that does not decode to a curve point
  }
}

/**
 * Why a raw Ed25519 public key must not be registered; `null` when it is a canonical encoding of
 * a point of the prime-order subgroup. Uses BigInt point arithmetic (a few ms): registration only.
 */
export function ed25519KeyProblem(raw: Uint8Array): string | null {
  if (raw.length !== 32) return `must be 32 bytes, got ${raw.length}`;
  const weak = weakPointProblem(raw);
  if (weak) return weak;
  const point = decodePoint(raw);
  if (point === null) return "is not a point on the Ed25519 curve";
  if (!isIdentity(multiply(point, L))) {
    return "has a small-order component (not in the prime-order subgroup)";
  }
  return null;
}

// --- BigInt arithmetic on edwards25519 (extended coordinates), for registration only. ---

const P = (1n << 255n) - 19n;
/** The group order. */
const L = (1n << 252n) + 27742317777372353535851937790883648493n;

type Point = readonly [x: bigint, y: bigint, z: bigint, t: bigint];

function mod(a: bigint): bigint {
  const r = a % P;
  return r < 0n ? r + P : r;
}

function pow(base: bigint, exp: bigint): bigint {
  let result = 1n;
  let b = mod(base);
  for (let e = exp; e > 0n; e >>= 1n) {
    if (e & 1n) result = (result * b) % P;
    b = (b * b) % P;
  }
  return result;
}

let curveD: bigint | undefined;
let sqrtM1: bigint | undefined;

/** d = -121665 / 121666 and sqrt(-1), computed on first use. */
function constants(): { d: bigint; i: bigint } {
  curveD ??= mod(-121665n * pow(121666n, P - 2n));
  sqrtM1 ??= pow(2n, (P - 1n) / 4n);
  return { d: curveD, i: sqrtM1 };
}

/** RFC 8032 §5.1.3 point decoding; `null` when the encoding names no curve point. */
function decodePoint(raw: Uint8Array): Point | null {
  const { d, i } = constants();
  let y = 0n;
  for (let k = 31; k >= 0; k--) y = (y << 8n) | BigInt(k === 31 ? raw[k] & 0x7f : raw[k]);
  const sign = raw[31] >> 7;
  if (y >= P) return null;
  const y2 = (y * y) % P;
  const u = mod(y2 - 1n);
  const v = mod(d * y2 + 1n);
  const v3 = (v * v % P) * v % P;
  let x = (u * v3 % P) * pow(u * (v3 * v3 % P) % P * v % P, (P - 5n) / 8n) % P;
  const vx2 = v * (x * x % P) % P;
  if (vx2 !== u) {
    if (vx2 !== mod(-u)) return null;
    x = x * i % P;
  }
  if (x === 0n && sign === 1) return null;
  if (Number(x & 1n) !== sign) x = P - x;
  return [x, y, 1n, x * y % P];
}

/** Unified addition (add-2008-hwcd-3), complete on edwards25519, so it also doubles. */
function add(a: Point, b: Point): Point {
  const { d } = constants();
  const A = mod((a[1] - a[0]) * (b[1] - b[0]));
  const B = mod((a[1] + a[0]) * (b[1] + b[0]));
  const C = mod(a[3] * 2n * d % P * b[3]);
  const D = mod(a[2] * 2n * b[2]);
  const E = B - A, F = D - C, G = D + C, H = B + A;
  return [mod(E * F), mod(G * H), mod(F * G), mod(E * H)];
}

function multiply(p: Point, n: bigint): Point {
  let result: Point = [0n, 1n, 1n, 0n];
  let q = p;
  for (let e = n; e > 0n; e >>= 1n) {
    if (e & 1n) result = add(result, q);
    q = add(q, q);
  }
  return result;
}

function isIdentity(p: Point): boolean {
  return p[0] === 0n && p[1] === p[2];
}
