// deno task bench:actors — memory per live meter actor, measured with 100,000 actors built
// the way activation builds them (unsealed HMAC key, rehydrated recent readings, a bucket).
import { Buffer } from "node:buffer";
import { MeterActor } from "../actors/meter_actor.ts";
import { liveKeys, secretContext } from "../core/device_keys.ts";
import { seal } from "../core/secret_box.ts";
import { canonicalMessage, signHmac } from "../core/signature.ts";

const N = Number(Deno.args[0] ?? 100_000);
const RECENT = 8;
const gc = (globalThis as { gc?: () => void }).gc;
if (!gc) throw new Error("Run with --v8-flags=--expose-gc (deno task bench:actors does)");

const kek = new Uint8Array(32).fill(5);
const now = Date.parse("2026-11-29T12:00:00Z");
const settings = {
  rules: { kwhMax: 100, maxAgeMs: 7 * 86_400_000, maxFutureMs: 300_000, dedupeWindowMs: 900_000 },
  bucket: { burst: 200, refillPerMs: 4 / 60_000 },
  keys: { rotationMs: 90 * 86_400_000, graceMs: 86_400_000 },
  recent: RECENT,
};
// Sealed secrets prepared first so only the live actors are measured.
const sealed = Array.from({ length: N }, (_, i) => {
  const secret = Buffer.alloc(32, i % 251);
  return { secret, enc: seal(kek, secret, secretContext(`meter-${i}`, "k1")) };
});

function measure(): { heap: number; external: number } {
  gc!();
  gc!();
  const m = Deno.memoryUsage();
  return { heap: m.heapUsed, external: m.external };
}

const before = measure();
const actors = new Map<string, MeterActor>();
for (let i = 0; i < N; i++) {
  const meterId = `meter-${i}`;
  const keys = liveKeys(meterId, [{
    key_id: "k1",
    algorithm: "hmac-sha256",
    secret_enc: sealed[i].enc,
    created_at: now - 86_400_000,
    retired_at: null,
  }], kek);
  const recent = Array.from({ length: RECENT }, (_, k) => now - (k + 1) * 900_000).reverse();
  const actor = new MeterActor(
    meterId,
    { user_id: crypto.randomUUID(), wallet_address: null, revoked: false, keys },
    recent,
    now,
  );
  // One real turn so the bucket exists and the window is full, as on a live meter.
  const ts = new Date(now).toISOString().replace(".000Z", "Z");
  const verdict = actor.decide(
    {
      meter_id: meterId,
      kwh_amount: "1.5",
      reading_timestamp: ts,
      device_signature: signHmac(sealed[i].secret, canonicalMessage(meterId, ts, "1.5")),
      source: "mqtt",
    },
    now,
    settings,
  );
  if (verdict.kind !== "accept") throw new Error(`unexpected ${JSON.stringify(verdict)}`);
  actor.settle(verdict.row.ts, { status: "stored", seq: 1 }, settings);
  actors.set(meterId, actor);
}
const after = measure();
const heap = (after.heap - before.heap) / N;
const external = (after.external - before.external) / N;
console.log(
  `${N} live actors (${RECENT} recent readings each, one HMAC key, bucket): ` +
    `${heap.toFixed(0)} B heap + ${external.toFixed(0)} B external = ` +
    `${(heap + external).toFixed(0)} B per actor (target < 1024)`,
);
if (actors.size !== N) throw new Error("actors lost");
