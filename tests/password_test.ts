import assert from "node:assert/strict";
import {
  dummyHash,
  hashParams,
  hashPassword,
  needsRehash,
  SCRYPT_DEFAULT,
  verifyPassword,
} from "../core/password.ts";

Deno.test("hashPassword() uses scrypt N=2^17, r=8, p=1 by default, within scrypt's maxmem", async () => {
  assert.deepEqual(SCRYPT_DEFAULT, { N: 2 ** 17, r: 8, p: 1 });
  const hash = await hashPassword("a long enough password");
  assert.match(hash, /^scrypt\$131072\$8\$1\$/);
  assert.equal(await verifyPassword("a long enough password", hash), true);
  assert.equal(await verifyPassword("another password!", hash), false);
  assert.equal(needsRehash(hash), false);
});

Deno.test("hashes made with the old N=2^14 still verify and are due for a re-hash", async () => {
  const old = await hashPassword("an old password", { N: 2 ** 14, r: 8, p: 1 });
  assert.match(old, /^scrypt\$16384\$8\$1\$/);
  assert.equal(await verifyPassword("an old password", old), true);
  assert.equal(needsRehash(old), true);
  assert.equal(needsRehash(old, { N: 2 ** 14, r: 8, p: 1 }), false);
});

Deno.test("malformed or absurd hashes verify nothing and cost nothing", async () => {
  for (
    const hash of [
      "",
      "bcrypt$10$x",
      "scrypt$16384$8$1$salt",
      `scrypt$${2 ** 30}$8$1$AAAA$AAAA`,
      "scrypt$1000$8$1$AAAA$AAAA",
      "scrypt$16384$0$1$AAAA$AAAA",
    ]
  ) {
    assert.equal(hashParams(hash), null, hash);
    assert.equal(await verifyPassword("x", hash), false, hash);
    assert.equal(needsRehash(hash), true, hash);
  }
  const dummy = dummyHash({ N: 1024, r: 8, p: 1 });
  assert.deepEqual(hashParams(dummy), { N: 1024, r: 8, p: 1 });
  assert.equal(await verifyPassword("anything", dummy), false);
});
