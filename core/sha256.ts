// SHA-256 (FIPS 180-4) and HMAC-SHA256 (RFC 2104) for the verification hot path.
//
// Why not node:crypto: every reading is verified on the actors' thread, and `createHmac` costs
// several native calls and Buffer conversions per message (a third of the thread's time under
// MQTT load, measured). Here a device key's inner and outer pad states are computed once at
// activation, so verifying a short message costs three compression rounds and no allocation.
// tests/sha256_test.ts checks both against node:crypto on random inputs.

const K = new Int32Array([
  0x428a2f98,
  0x71374491,
  0xb5c0fbcf,
  0xe9b5dba5,
  0x3956c25b,
  0x59f111f1,
  0x923f82a4,
  0xab1c5ed5,
  0xd807aa98,
  0x12835b01,
  0x243185be,
  0x550c7dc3,
  0x72be5d74,
  0x80deb1fe,
  0x9bdc06a7,
  0xc19bf174,
  0xe49b69c1,
  0xefbe4786,
  0x0fc19dc6,
  0x240ca1cc,
  0x2de92c6f,
  0x4a7484aa,
  0x5cb0a9dc,
  0x76f988da,
  0x983e5152,
  0xa831c66d,
  0xb00327c8,
  0xbf597fc7,
  0xc6e00bf3,
  0xd5a79147,
  0x06ca6351,
  0x14292967,
  0x27b70a85,
  0x2e1b2138,
  0x4d2c6dfc,
  0x53380d13,
  0x650a7354,
  0x766a0abb,
  0x81c2c92e,
  0x92722c85,
  0xa2bfe8a1,
  0xa81a664b,
  0xc24b8b70,
  0xc76c51a3,
  0xd192e819,
  0xd6990624,
  0xf40e3585,
  0x106aa070,
  0x19a4c116,
  0x1e376c08,
  0x2748774c,
  0x34b0bcb5,
  0x391c0cb3,
  0x4ed8aa4a,
  0x5b9cca4f,
  0x682e6ff3,
  0x748f82ee,
  0x78a5636f,
  0x84c87814,
  0x8cc70208,
  0x90befffa,
  0xa4506ceb,
  0xbef9a3f7,
  0xc67178f2,
]);

const IV = new Int32Array([
  0x6a09e667,
  0xbb67ae85,
  0x3c6ef372,
  0xa54ff53a,
  0x510e527f,
  0x9b05688c,
  0x1f83d9ab,
  0x5be0cd19,
]);

/** Scratch space of one thread; every function below finishes before returning (no reentrancy). */
const W = new Int32Array(64);
const TAIL = new Uint8Array(128);
const INNER = new Int32Array(8);
const STATE = new Int32Array(8);
const DIGEST = new Uint8Array(32);
const encoder = new TextEncoder();
let text = new Uint8Array(256);

/** Runs the compression function over `block[at .. at+64)`, updating `h` in place. */
function compress(h: Int32Array, block: Uint8Array, at: number): void {
  for (let i = 0; i < 16; i++, at += 4) {
    W[i] = (block[at] << 24) | (block[at + 1] << 16) | (block[at + 2] << 8) | block[at + 3];
  }
  for (let i = 16; i < 64; i++) {
    const a = W[i - 15], b = W[i - 2];
    const s0 = ((a >>> 7) | (a << 25)) ^ ((a >>> 18) | (a << 14)) ^ (a >>> 3);
    const s1 = ((b >>> 17) | (b << 15)) ^ ((b >>> 19) | (b << 13)) ^ (b >>> 10);
    W[i] = (W[i - 16] + s0 + W[i - 7] + s1) | 0;
  }
  let a = h[0], b = h[1], c = h[2], d = h[3], e = h[4], f = h[5], g = h[6], k = h[7];
  for (let i = 0; i < 64; i++) {
    const S1 = ((e >>> 6) | (e << 26)) ^ ((e >>> 11) | (e << 21)) ^ ((e >>> 25) | (e << 7));
    const t1 = (k + S1 + ((e & f) ^ (~e & g)) + K[i] + W[i]) | 0;
    const S0 = ((a >>> 2) | (a << 30)) ^ ((a >>> 13) | (a << 19)) ^ ((a >>> 22) | (a << 10));
    const t2 = (S0 + ((a & b) ^ (a & c) ^ (b & c))) | 0;
    k = g;
    g = f;
    f = e;
    e = (d + t1) | 0;
    d = c;
    c = b;
    b = a;
    a = (t1 + t2) | 0;
  }
  h[0] = (h[0] + a) | 0;
  h[1] = (h[1] + b) | 0;
  h[2] = (h[2] + c) | 0;
  h[3] = (h[3] + d) | 0;
  h[4] = (h[4] + e) | 0;
  h[5] = (h[5] + f) | 0;
  h[6] = (h[6] + g) | 0;
  h[7] = (h[7] + k) | 0;
}

/** Hashes `data[0 .. length)` into `h`, which already absorbed `prefix` bytes (0 or 64). */
function absorb(h: Int32Array, data: Uint8Array, length: number, prefix: number): void {
  let at = 0;
  for (; at + 64 <= length; at += 64) compress(h, data, at);
  const rest = length - at;
  TAIL.fill(0);
  for (let i = 0; i < rest; i++) TAIL[i] = data[at + i];
  TAIL[rest] = 0x80;
  const blocks = rest < 56 ? 1 : 2;
  const bits = (prefix + length) * 8;
  const end = blocks * 64;
  // Messages here are far below 2^32 bits; the high word stays 0.
  TAIL[end - 4] = bits >>> 24;
  TAIL[end - 3] = bits >>> 16;
  TAIL[end - 2] = bits >>> 8;
  TAIL[end - 1] = bits;
  compress(h, TAIL, 0);
  if (blocks === 2) compress(h, TAIL, 64);
}

/** Encodes `message` as UTF-8 into the scratch buffer; returns its length. */
function utf8(message: string): number {
  const n = message.length;
  if (n * 3 > text.length) text = new Uint8Array(n * 3);
  // Canonical messages are ASCII: copying char codes beats a native encoder call.
  for (let i = 0; i < n; i++) {
    const c = message.charCodeAt(i);
    if (c > 0x7f) return encoder.encodeInto(message, text).written;
    text[i] = c;
  }
  return n;
}

function toBytes<T extends Uint8Array>(h: Int32Array, out: T): T {
  for (let i = 0; i < 8; i++) {
    out[i * 4] = h[i] >>> 24;
    out[i * 4 + 1] = h[i] >>> 16;
    out[i * 4 + 2] = h[i] >>> 8;
    out[i * 4 + 3] = h[i];
  }
  return out;
}

/** SHA-256 of a string (UTF-8) or bytes. */
export function sha256(data: string | Uint8Array): Uint8Array {
  return sha256Into(data, new Uint8Array(32));
}

/** SHA-256 of a string (UTF-8) or bytes, written into `out` (no allocation); returns `out`. */
export function sha256Into<T extends Uint8Array>(data: string | Uint8Array, out: T): T {
  STATE.set(IV);
  if (typeof data === "string") {
    const length = utf8(data); // may replace `text`: read it after
    absorb(STATE, text, length, 0);
  } else absorb(STATE, data, data.length, 0);
  return toBytes(STATE, out);
}

/** An HMAC-SHA256 key with its pad states precomputed: words 0–7 inner, 8–15 outer. */
export type HmacSha256Key = Int32Array & { readonly __hmacKey: true };

/** Prepares a secret for {@linkcode hmacSha256} and {@linkcode hmacSha256Equals}. */
export function hmacSha256Key(secret: Uint8Array): HmacSha256Key {
  const key = secret.length > 64 ? sha256(secret) : secret;
  const pad = new Uint8Array(64);
  const state = new Int32Array(16);
  for (const [offset, byte] of [[0, 0x36], [8, 0x5c]]) {
    pad.fill(byte);
    for (let i = 0; i < key.length; i++) pad[i] ^= key[i];
    STATE.set(IV);
    compress(STATE, pad, 0);
    state.set(STATE, offset);
  }
  return state as HmacSha256Key;
}

/** Computes the MAC into the scratch state and returns it (valid until the next call). */
function mac(key: HmacSha256Key, message: string): Int32Array {
  const length = utf8(message);
  INNER.set(key.subarray(0, 8));
  absorb(INNER, text, length, 64);
  toBytes(INNER, DIGEST);
  INNER.set(key.subarray(8, 16));
  absorb(INNER, DIGEST, 32, 64);
  return INNER;
}

/** HMAC-SHA256 of a string (UTF-8). */
export function hmacSha256(key: HmacSha256Key, message: string): Uint8Array {
  return toBytes(mac(key, message), new Uint8Array(32));
}

/** Whether `expected` (32 bytes) is the MAC of `message`; constant time in the MAC's bytes. */
export function hmacSha256Equals(
  key: HmacSha256Key,
  message: string,
  expected: Uint8Array,
): boolean {
  if (expected.length !== 32) return false;
  const h = mac(key, message);
  let diff = 0;
  for (let i = 0; i < 8; i++) {
    const word = (expected[i * 4] << 24) | (expected[i * 4 + 1] << 16) |
      (expected[i * 4 + 2] << 8) | expected[i * 4 + 3];
    diff |= word ^ h[i];
  }
  return diff === 0;
}
