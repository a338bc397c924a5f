import assert from "node:assert/strict";
import { createHash, createHmac, randomBytes } from "node:crypto";
import { hmacSha256, hmacSha256Equals, hmacSha256Key, sha256 } from "../core/sha256.ts";

const hex = (bytes: Uint8Array) =>
  Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");

Deno.test("sha256 and HMAC-SHA256 agree with node:crypto", async (t) => {
  await t.step("FIPS 180-4 and RFC 4231 vectors", () => {
    assert.equal(
      hex(sha256("abc")),
      "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
    );
    assert.equal(
      hex(sha256("")),
      "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    );
    // RFC 4231 test case 2: key "Jefe".
    const key = hmacSha256Key(new TextEncoder().encode("Jefe"));
    assert.equal(
      hex(hmacSha256(key, "what do ya want for nothing?")),
      "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843",
    );
  });
  await t.step("random messages of every length up to 300 bytes, keys up to 150 bytes", () => {
    for (let n = 0; n <= 300; n++) {
      // Latin-1 and multi-byte characters exercise the UTF-8 path too.
      const message = n % 7 === 0
        ? `ünïcødé ${randomBytes(n).toString("hex")}`
        : randomBytes(n).toString("latin1");
      const secret = randomBytes(n % 151);
      assert.equal(hex(sha256(message)), createHash("sha256").update(message).digest("hex"));
      const key = hmacSha256Key(secret);
      const mac = createHmac("sha256", secret).update(message).digest();
      assert.equal(hex(hmacSha256(key, message)), mac.toString("hex"), `length ${n}`);
      assert.equal(hmacSha256Equals(key, message, mac), true);
      mac[n % 32] ^= 1;
      assert.equal(hmacSha256Equals(key, message, mac), false);
      assert.equal(hmacSha256Equals(key, message, mac.subarray(0, 31)), false);
    }
  });
});
