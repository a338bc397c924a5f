// A Deno KV file written before accounts could be changed: users without the new fields and
// without the active-admin index.
import assert from "node:assert/strict";
import { GatewayError } from "../core/errors.ts";
import { KvStore } from "../db/kv_store.ts";

const OPTIONS = { dedupeWindowMs: 15 * 60_000 };

function legacyUser(id: string, role: string) {
  return {
    id,
    email: `${id}@legacy.test`,
    role,
    wallet_address: null,
    created_at: 0,
    password_hash: "h",
  };
}

Deno.test("KvStore applies the last-admin rule to users stored before the index existed", async () => {
  const dir = await Deno.makeTempDir({ prefix: "kv-legacy-" });
  try {
    const path = `${dir}/gateway.kv`;
    const kv = await Deno.openKv(path);
    for (const user of [legacyUser("a1", "admin"), legacyUser("a2", "admin")]) {
      await kv.atomic()
        .set(["users", user.id], user)
        .set(["users_by_email", user.email], user.id)
        .sum(["counters", "users"], 1n)
        .commit();
    }
    kv.close();

    const store = await KvStore.open(path, OPTIONS);
    try {
      const a1 = await store.getUser("a1");
      assert.equal(a1?.disabled, false);
      assert.equal(a1?.token_generation, 0);
      // Two admins: one may go; then the other is the last.
      await store.updateUser("a1", (u) => ({ ...u, role: "user" }));
      await assert.rejects(
        store.updateUser("a2", (u) => ({ ...u, disabled: true })),
        (e) => e instanceof GatewayError && e.code === "conflict",
      );
      await assert.rejects(
        store.deleteUser("a2"),
        (e) => e instanceof GatewayError && e.code === "conflict",
      );
    } finally {
      await store.close();
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
