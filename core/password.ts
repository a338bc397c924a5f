import { randomBytes, scrypt, timingSafeEqual } from "node:crypto";
import { Buffer } from "node:buffer";

/** scrypt cost parameters. */
export interface ScryptParams {
  /** CPU/memory cost, a power of two. */
  N: number;
  /** Block size. */
  r: number;
  /** Parallelisation. */
  p: number;
}

/**
 * OWASP's first scrypt recommendation (Password Storage Cheat Sheet): N=2^17, r=8, p=1, i.e.
 * 128 MiB and ~0.3-0.7 s of one core per hash. Hashes made with other parameters still verify
 * and are re-hashed at the next successful login.
 */
export const SCRYPT_DEFAULT: ScryptParams = { N: 2 ** 17, r: 8, p: 1 };

const LEN = 32;
// A hash names its own parameters; refuse absurd ones (a corrupted row must not cost GiBs).
const MAX_N = 2 ** 20;

function derive(password: string, salt: Buffer, params: ScryptParams): Promise<Buffer> {
  const { N, r, p } = params;
  // scrypt needs 128·N·r bytes (plus 128·r·p): allow twice that, so the default N=2^17 fits.
  const maxmem = 256 * N * r + 256 * r * p;
  return new Promise((resolve, reject) =>
    scrypt(password, salt, LEN, { N, r, p, maxmem }, (err, key) => err ? reject(err) : resolve(key))
  );
}

/** Hashes a password with scrypt; the result names its parameters so they can be raised later. */
export async function hashPassword(
  password: string,
  params: ScryptParams = SCRYPT_DEFAULT,
): Promise<string> {
  const salt = randomBytes(16);
  const key = await derive(password, salt, params);
  const { N, r, p } = params;
  return `scrypt$${N}$${r}$${p}$${salt.toString("base64url")}$${key.toString("base64url")}`;
}

/** The parameters a hash from {@linkcode hashPassword} was made with, or `null` if malformed. */
export function hashParams(hash: string): ScryptParams | null {
  const [scheme, n, r, p, salt, key] = hash.split("$");
  if (scheme !== "scrypt" || salt === undefined || !key) return null;
  const params = { N: Number(n), r: Number(r), p: Number(p) };
  const valid = Number.isInteger(params.N) && params.N > 1 && params.N <= MAX_N &&
    (params.N & (params.N - 1)) === 0 && Number.isInteger(params.r) && params.r >= 1 &&
    params.r <= 32 && Number.isInteger(params.p) && params.p >= 1 && params.p <= 16;
  return valid ? params : null;
}

/** Whether `hash` was made with other parameters than `params` (re-hash it). */
export function needsRehash(hash: string, params: ScryptParams = SCRYPT_DEFAULT): boolean {
  const used = hashParams(hash);
  return used === null || used.N !== params.N || used.r !== params.r || used.p !== params.p;
}

/** A well-formed hash that matches no password, with `params`: unknown accounts cost the same. */
export function dummyHash(params: ScryptParams = SCRYPT_DEFAULT): string {
  return `scrypt$${params.N}$${params.r}$${params.p}$${"A".repeat(22)}$${"A".repeat(43)}`;
}

/** Checks a password against a hash from {@linkcode hashPassword}, in constant time. */
export async function verifyPassword(password: string, hash: string): Promise<boolean> {
  const params = hashParams(hash);
  if (params === null) return false;
  const [, , , , salt, key] = hash.split("$");
  const expected = Buffer.from(key, "base64url");
  const actual = await derive(password, Buffer.from(salt, "base64url"), params);
  return actual.length === expected.length && timingSafeEqual(actual, expected);
}
