import assert from "node:assert/strict";
import {
  dummyHash,
  hashParams,
  hashPassword,
  needsRehash,
  SCRYPT_DEFAULT,
  verifyPassword,
} from "../core/password.ts";
import { passwordProblem } from "../core/user.ts";

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

Deno.test("passwordProblem() refuses weak passwords with a clear reason", async (t) => {
  const email = "jane.doe@example.com";
  const cases: [string, string, RegExp][] = [
    ["aaaaaaaaaaab", "two different characters", /at least 6 different characters/],
    [" ".repeat(11) + "a", "spaces and one letter", /at least 6 different characters/],
    ["123456789013", "almost a digit run", /keyboard or digit sequence/],
    ["abababababab", "a repeated pair", /at least 6 different characters/],
    ["abcdefabcdef", "a repeated pattern", /short pattern repeated/],
    ["passwordpassword1", "a common word repeated", /too common/],
    ["Password!2026", "a common core in digits and symbols", /too common/],
    ["Gridtokenx2026", "the product's name", /product's name/],
    ["my-Grid_TokenX-pass", "the product's name, split", /product's name/],
    ["\0".repeat(11) + "\u0001", "control characters", /control characters/],
    ["tab\there-ok-yes", "a tab", /control characters/],
    ["qwertyuiop12", "a keyboard row", /keyboard or digit sequence|too common/],
    [email, "the email itself", /email/],
    ["x-Jane.Doe-pw!", "the email's local part", /email/],
    ["JaneDoe-2026!", "the local part's letters", /email/],
  ];
  for (const [password, what, reason] of cases) {
    await t.step(`${what}: ${JSON.stringify(password)}`, () => {
      const problem = passwordProblem(password, { email });
      assert.ok(problem !== null, `${JSON.stringify(password)} was accepted`);
      assert.match(problem, reason);
    });
  }
  await t.step("a new password equal to the current one", () => {
    const current = "a fine old passphrase";
    assert.match(passwordProblem(current, { current }) ?? "", /differ from the current/);
  });
  await t.step("good passwords pass", () => {
    for (
      const good of [
        "correct horse battery",
        "brand-new-password-1",
        "Tr0ub4dor&3-xkcd",
        "8#4!92@7&1^6",
        "a-new-ws-password-1",
      ]
    ) {
      assert.equal(passwordProblem(good, { email, current: "something else" }), null, good);
    }
  });
});
