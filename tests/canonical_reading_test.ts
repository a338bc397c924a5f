// What is stored is what was signed: every reading the gateway stores can be re-verified from the
// fields the API returns for it; readings whose values are not in canonical form are refused.
import assert from "node:assert/strict";
import { Buffer } from "node:buffer";
import { canonicalMessage, signHmac } from "../core/signature.ts";
import { startTestGateway } from "./_gateway.ts";

const MINUTE = 60_000;

/** One variant: the signed values as sent, and whether the gateway should store it. */
interface Variant {
  what: string;
  /** `reading_timestamp` as sent, from the slot's instant (whole seconds). */
  ts: (ms: number) => string;
  /** `kwh_amount` as the JSON text sent: `"..."` is a string, anything else a JSON number. */
  kwhJson: string;
  stored: boolean;
}

const iso = (ms: number) => new Date(ms).toISOString();
const canonical = (ms: number) => iso(ms).replace(".000Z", "Z");
/** The same instant written with a zone offset of `minutes`. */
function withOffset(ms: number, minutes: number): string {
  const local = iso(ms + minutes * MINUTE).slice(0, 19);
  const sign = minutes < 0 ? "-" : "+";
  const abs = Math.abs(minutes);
  const hh = String(Math.floor(abs / 60)).padStart(2, "0");
  const mm = String(abs % 60).padStart(2, "0");
  return `${local}${sign}${hh}:${mm}`;
}

const ts = (what: string, make: (ms: number) => string, stored = false): Variant => ({
  what: `timestamp ${what}`,
  ts: make,
  kwhJson: '"1.5"',
  stored,
});
const kwh = (kwhJson: string, stored = false): Variant => ({
  what: `kwh ${kwhJson}`,
  ts: canonical,
  kwhJson,
  stored,
});

const VARIANTS: Variant[] = [
  ts("canonical, whole seconds, Z", canonical, true),
  ts(".000 milliseconds", (ms) => iso(ms)),
  ts("a 1-digit fraction", (ms) => canonical(ms).replace("Z", ".5Z")),
  ts("a 3-digit fraction", (ms) => canonical(ms).replace("Z", ".123Z")),
  ts("a 9-digit fraction", (ms) => canonical(ms).replace("Z", ".123456789Z")),
  ts("a 9-digit zero fraction", (ms) => canonical(ms).replace("Z", ".000000000Z")),
  ts("+00:00", (ms) => withOffset(ms, 0)),
  ts("-00:00", (ms) => withOffset(ms, 0).replace("+", "-")),
  ts("+07:00", (ms) => withOffset(ms, 7 * 60)),
  ts("-05:30", (ms) => withOffset(ms, -330)),
  ts("+14:00", (ms) => withOffset(ms, 14 * 60)),
  ts("+07:00 with a fraction", (ms) => withOffset(ms, 420).replace(/([+-]\d\d:\d\d)$/, ".250$1")),
  ts("lower-case t", (ms) => canonical(ms).replace("T", "t")),
  ts("lower-case z", (ms) => canonical(ms).replace("Z", "z")),
  ts("a space for T", (ms) => canonical(ms).replace("T", " ")),
  kwh('"12.5"', true),
  kwh('"12.50"'),
  kwh('"012.5"'),
  kwh('"+12.5"'),
  kwh('"12.5000"'),
  kwh('"0100"'),
  kwh('"100"', true),
  kwh('"100.0"'),
  kwh('"0.0001"', true),
  kwh('"0.00005"'),
  kwh('"0.00010"'),
  kwh('"0.00015"'),
  kwh('".5"'),
  kwh('"5."'),
  kwh('"0.5"', true),
  kwh('"00.5"'),
  kwh('"7.0"'),
  kwh('"1e1"'),
  kwh('"3.1415"', true),
  kwh('"99.9999"', true),
  kwh('"12.34567"'),
  kwh("12.5", true),
  kwh("12.50", true), // a JSON number: signed in its JSON.stringify form, "12.5"
  kwh("7", true),
  kwh("1E1", true), // the number 10, signed as "10"
  kwh("1e-5"), // JSON.stringify gives "0.00001": more than 4 decimals
  kwh("0.00005"),
  kwh("0.30000000000000004"),
  kwh("2.5e0", true), // the number 2.5
];

/** The text a device signs for `kwh_amount` sent as this JSON (DESIGN.md §4). */
function signedKwh(kwhJson: string): string {
  const value = JSON.parse(kwhJson);
  return typeof value === "string" ? value : JSON.stringify(value);
}

Deno.test("every stored reading re-verifies from its API fields; non-canonical ones are refused", async (t) => {
  await using gw = await startTestGateway();
  const owner = await gw.createUser("auditor@example.com");
  const meter = "audit-1";
  const { secret_hex } = await gw.registerMeter(meter, owner.id);
  const secret = Buffer.from(secret_hex, "hex");
  // 20 minutes apart, whole minutes: never within the dedupe window of one another.
  const base = Math.floor(Date.now() / MINUTE) * MINUTE - 60 * MINUTE;

  let expectedStored = 0;
  await t.step(
    `${VARIANTS.length} variants are each stored or refused with invalid_payload`,
    async () => {
      for (const [i, v] of VARIANTS.entries()) {
        const sentTs = v.ts(base - i * 20 * MINUTE);
        const signature = signHmac(secret, canonicalMessage(meter, sentTs, signedKwh(v.kwhJson)));
        // Built by hand so a JSON number reaches the gateway exactly as written.
        const raw = `{"meter_id":"${meter}","kwh_amount":${v.kwhJson},` +
          `"reading_timestamp":${JSON.stringify(sentTs)},"device_signature":"${signature}"}`;
        const res = await gw.request("POST", "/api/meters/submit-reading", {
          token: owner.token,
          raw,
          headers: { "content-type": "application/json" },
        });
        const label = `${v.what} (${sentTs}): ${JSON.stringify(res.body)}`;
        if (v.stored) {
          assert.equal(res.status, 201, label);
          expectedStored++;
        } else {
          assert.equal(res.status, 400, label);
          assert.equal(res.body.error.code, "invalid_payload", label);
        }
      }
    },
  );

  await t.step("zero stored readings fail re-verification from the listed fields", async () => {
    const res = await gw.request(
      "GET",
      `/api/meters/readings?meter_id=${meter}&limit=1000`,
      { token: owner.token },
    );
    assert.equal(res.status, 200);
    const items: {
      meter_id: string;
      reading_timestamp: string;
      kwh_amount: number;
      device_signature: string;
    }[] = res.body.items;
    assert.equal(items.length, expectedStored);
    const failures = items.filter((r) => {
      const message = canonicalMessage(
        r.meter_id,
        r.reading_timestamp,
        JSON.stringify(r.kwh_amount),
      );
      return signHmac(secret, message) !== r.device_signature;
    });
    assert.deepEqual(failures, []);
  });

  await t.step("the refusals state the canonical form", async () => {
    const sentTs = withOffset(base - 60 * 20 * MINUTE, 420);
    const body = {
      meter_id: meter,
      kwh_amount: "1.5",
      reading_timestamp: sentTs,
      device_signature: signHmac(secret, canonicalMessage(meter, sentTs, "1.5")),
    };
    const res = await gw.request("POST", "/api/meters/submit-reading", {
      token: owner.token,
      body,
    });
    assert.match(res.body.error.message, /YYYY-MM-DDTHH:MM:SSZ/);
    const odd = canonical(base - 61 * 20 * MINUTE);
    const kwhRes = await gw.request("POST", "/api/meters/submit-reading", {
      token: owner.token,
      body: {
        meter_id: meter,
        kwh_amount: "12.50",
        reading_timestamp: odd,
        device_signature: signHmac(secret, canonicalMessage(meter, odd, "12.50")),
      },
    });
    assert.match(kwhRes.body.error.message, /canonical form.*at most 4 decimals/);
  });
});
