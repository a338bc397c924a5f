import { dirname, join } from "node:path";
import { hexBytes } from "../core/config.ts";
import { ensurePrivateDir, restrictFile } from "./private_files.ts";

/** Secrets generated once for embedded mode. */
export interface EmbeddedSecrets {
  jwtSecret: string;
  kek: Uint8Array;
}

/** Where embedded secrets live: beside the KV file, never inside it. */
export function secretsPath(kvPath: string): string {
  return join(dirname(kvPath), "gateway.secrets.json");
}

function randomHex(bytes: number): string {
  return Array.from(
    crypto.getRandomValues(new Uint8Array(bytes)),
    (b) => b.toString(16).padStart(2, "0"),
  )
    .join("");
}

/** Reads the secrets file (setting it to 0600), creating it and its directory (0700) first. */
export async function loadOrCreateSecrets(path: string): Promise<EmbeddedSecrets> {
  let text: string;
  try {
    text = await Deno.readTextFile(path);
  } catch (error) {
    if (!(error instanceof Deno.errors.NotFound)) throw error;
    await ensurePrivateDir(dirname(path));
    const fresh = { jwt_secret: randomHex(32), device_key_encryption_key: randomHex(32) };
    // createNew: two processes starting at once must not overwrite each other's secrets.
    try {
      await Deno.writeTextFile(path, JSON.stringify(fresh, null, 2) + "\n", {
        createNew: true,
        mode: 0o600,
      });
    } catch (e) {
      if (!(e instanceof Deno.errors.AlreadyExists)) throw e;
    }
    text = await Deno.readTextFile(path);
  }
  // A file an earlier version wrote through the umask, or copied in by hand.
  await restrictFile(path);
  const parsed = JSON.parse(text) as { jwt_secret?: string; device_key_encryption_key?: string };
  if (!parsed.jwt_secret || !/^[0-9a-f]{64}$/i.test(parsed.device_key_encryption_key ?? "")) {
    throw new Error(
      `Secrets file "${path}" is damaged: it needs jwt_secret and a 64-hex device_key_encryption_key`,
    );
  }
  return { jwtSecret: parsed.jwt_secret, kek: hexBytes(parsed.device_key_encryption_key!) };
}
