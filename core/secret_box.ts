import { createCipheriv, createDecipheriv, randomBytes } from "node:crypto";
import { Buffer } from "node:buffer";

/** AES-256-GCM sealing of device secrets under the key-encryption key; `aad` binds the context. */
export function seal(kek: Uint8Array, plaintext: Uint8Array, aad: string): string {
  const iv = randomBytes(12);
  const cipher = createCipheriv("aes-256-gcm", kek, iv);
  cipher.setAAD(Buffer.from(aad));
  const body = Buffer.concat([cipher.update(plaintext), cipher.final()]);
  return Buffer.concat([iv, body, cipher.getAuthTag()]).toString("base64url");
}

/** Opens a value made by {@linkcode seal}; throws when the key, data or context do not match. */
export function open(kek: Uint8Array, sealed: string, aad: string): Buffer {
  const all = Buffer.from(sealed, "base64url");
  const iv = all.subarray(0, 12);
  const tag = all.subarray(all.length - 16);
  const decipher = createDecipheriv("aes-256-gcm", kek, iv);
  decipher.setAAD(Buffer.from(aad));
  decipher.setAuthTag(tag);
  return Buffer.concat([decipher.update(all.subarray(12, all.length - 16)), decipher.final()]);
}
