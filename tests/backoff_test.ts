// The per-account login back-off (core/backoff.ts): counting, undo, and a bounded table that a
// spray of distinct keys cannot flush.
import assert from "node:assert/strict";
import { Backoff } from "../core/backoff.ts";
import { ManualClock } from "../core/clock.ts";

function fail(backoff: Backoff, key: string, times: number): void {
  for (let i = 0; i < times; i++) {
    const a = backoff.attempt(key);
    assert.ok(a.ok, `attempt ${i} of ${key} counted`);
  }
}

Deno.test("Backoff: an undone attempt does not count, nor keep its key", () => {
  const clock = new ManualClock(1_000_000);
  const backoff = new Backoff({ clock, free: 2, baseMs: 1_000 });
  for (let i = 0; i < 10; i++) {
    const a = backoff.attempt("victim");
    assert.ok(a.ok, `undone attempt ${i} never makes the key wait`);
    a.undo();
    a.undo(); // idempotent
  }
  assert.equal(backoff.size, 0, "a key whose only attempts were undone is not stored");
  fail(backoff, "victim", 1);
  const second = backoff.attempt("victim");
  assert.ok(second.ok);
  // The second attempt started the 1 s wait; undoing it takes the wait back.
  second.undo();
  assert.ok(backoff.attempt("victim").ok, "the wait of an undone attempt was taken back");
  const held = backoff.attempt("victim");
  assert.ok(!held.ok && held.reason === "backoff");
});

Deno.test("Backoff: a spray of new keys never forgets a running back-off", () => {
  const clock = new ManualClock(1_000_000);
  const backoff = new Backoff({ clock, free: 2, baseMs: 60_000, maxMs: 600_000, maxKeys: 10 });
  fail(backoff, "victim", 2); // now backing off for 60 s
  const held = backoff.attempt("victim");
  assert.ok(!held.ok && held.reason === "backoff");
  // Distinct junk keys, each with one failure (not backing off): they are the ones forgotten.
  for (let i = 0; i < 1_000; i++) backoff.attempt(`junk-${i}@example.com`);
  assert.ok(backoff.size <= 10);
  const still = backoff.attempt("victim");
  assert.ok(!still.ok && still.reason === "backoff", "the victim's wait survived the spray");
});

Deno.test("Backoff: a table full of running back-offs refuses new keys instead", () => {
  const clock = new ManualClock(1_000_000);
  const backoff = new Backoff({ clock, free: 1, baseMs: 60_000, maxMs: 600_000, maxKeys: 4 });
  for (let i = 0; i < 4; i++) fail(backoff, `held-${i}`, 1);
  const refused = backoff.attempt("new@example.com");
  assert.ok(!refused.ok && refused.reason === "full", JSON.stringify(refused));
  assert.ok(refused.waitMs > 0 && refused.waitMs <= 60_000);
  for (let i = 0; i < 4; i++) {
    const a = backoff.attempt(`held-${i}`);
    assert.ok(!a.ok && a.reason === "backoff", `held-${i} is still backing off`);
  }
  // Once the waits are over, those entries may go and new keys are counted again.
  clock.advance(60_000);
  assert.ok(backoff.attempt("new@example.com").ok);
});
