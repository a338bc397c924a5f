// The embedded store's files hold password hashes, device keys and the JWT secret: the files are
// 0600 and the directory the gateway creates is 0700 (not the umask's 0644/0755).
import { equal } from "node:assert/strict";
import { loadOrCreateSecrets, secretsPath } from "../db/secrets_file.ts";
import { openStore } from "../db/open_store.ts";

const OPTIONS = { dedupeWindowMs: 15 * 60_000 };

async function modeOf(path: string): Promise<string> {
  return ((await Deno.stat(path)).mode! & 0o777).toString(8);
}

Deno.test({
  name: "the embedded store's files are 0600 and its new directory 0700",
  ignore: Deno.build.os === "windows",
  async fn(t) {
    const root = await Deno.makeTempDir({ prefix: "gw-modes-" });
    try {
      await t.step("a first start creates them private", async () => {
        const kvPath = `${root}/data/gateway.kv`;
        await loadOrCreateSecrets(secretsPath(kvPath));
        const store = await openStore({ kind: "kv", path: kvPath }, OPTIONS);
        try {
          equal(await modeOf(`${root}/data`), "700", "data directory");
          equal(await modeOf(secretsPath(kvPath)), "600", "secrets file");
          equal(await modeOf(kvPath), "600", "KV file");
          // SQLite's side files exist while the store is open (WAL mode).
          for (const side of ["-wal", "-shm"]) {
            equal(await modeOf(kvPath + side), "600", `KV ${side} file`);
          }
        } finally {
          await store.close();
        }
      });

      await t.step("files an earlier version left readable are tightened", async () => {
        const dir = `${root}/old`;
        await Deno.mkdir(dir);
        const kvPath = `${dir}/gateway.kv`;
        const first = await Deno.openKv(kvPath);
        const secrets = secretsPath(kvPath);
        await Deno.writeTextFile(
          secrets,
          JSON.stringify({ jwt_secret: "a".repeat(64), device_key_encryption_key: "b".repeat(64) }),
          { mode: 0o644 },
        );
        for (const path of [kvPath, kvPath + "-wal", kvPath + "-shm", secrets]) {
          await Deno.chmod(path, 0o644);
        }
        first.close();
        await loadOrCreateSecrets(secrets);
        const store = await openStore({ kind: "kv", path: kvPath }, OPTIONS);
        try {
          equal(await modeOf(secrets), "600", "secrets file");
          equal(await modeOf(kvPath), "600", "KV file");
          for (const side of ["-wal", "-shm"]) {
            equal(await modeOf(kvPath + side), "600", `KV ${side} file`);
          }
        } finally {
          await store.close();
        }
      });
    } finally {
      await Deno.remove(root, { recursive: true });
    }
  },
});
