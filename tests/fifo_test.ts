import assert from "node:assert/strict";
import { Fifo } from "../core/fifo.ts";

Deno.test("Fifo keeps order across compactions and drains", () => {
  const q = new Fifo<number>();
  assert.equal(q.shift(), undefined);
  let next = 0, expected = 0;
  // Interleave pushes and shifts well past the compaction threshold.
  for (let round = 0; round < 50; round++) {
    for (let i = 0; i < 300; i++) q.push(next++);
    for (let i = 0; i < 250; i++) assert.equal(q.shift(), expected++);
    assert.equal(q.length, next - expected);
    assert.equal(q.peek(), expected);
  }
  assert.deepEqual(q.drain(), Array.from({ length: next - expected }, (_, i) => expected + i));
  assert.equal(q.length, 0);
  assert.equal(q.peek(), undefined);
});
