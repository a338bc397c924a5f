import assert from "node:assert/strict";
import { Metrics } from "../core/metrics.ts";

Deno.test("Metrics counts each label set in its own series", async (t) => {
  const m = new Metrics();
  m.counter("c_total", "test counter");
  m.gauge("g", "test gauge", () => 7);

  await t.step("the same label set adds up; another set is another series", () => {
    m.inc("c_total", { source: "mqtt", outcome: "accepted" });
    m.inc("c_total", { source: "mqtt", outcome: "accepted" }, 2);
    m.inc("c_total", { source: "mqtt", outcome: "duplicate" });
    m.inc("c_total", { source: "http", outcome: "accepted" });
    m.inc("c_total");
    const lines = m.render().split("\n");
    assert.ok(lines.includes('c_total{source="mqtt",outcome="accepted"} 3'));
    assert.ok(lines.includes('c_total{source="mqtt",outcome="duplicate"} 1'));
    assert.ok(lines.includes('c_total{source="http",outcome="accepted"} 1'));
    assert.ok(lines.includes("c_total 1"));
    assert.ok(lines.includes("g 7"));
  });

  await t.step("a value that is a prefix of another is not confused with it", () => {
    m.inc("c_total", { source: "mq" });
    m.inc("c_total", { source: "mq", outcome: "x" });
    const lines = m.render().split("\n");
    assert.ok(lines.includes('c_total{source="mq"} 1'));
    assert.ok(lines.includes('c_total{source="mq",outcome="x"} 1'));
  });

  await t.step("quotes, backslashes and newlines in values are replaced", () => {
    m.inc("c_total", { reason: 'a"b\\c\nd' });
    assert.ok(m.render().split("\n").includes('c_total{reason="a_b_c_d"} 1'));
  });

  await t.step("an undeclared metric is a programming error", () => {
    assert.throws(() => m.inc("nope_total"), RangeError);
  });
});

Deno.test("Metrics renders a histogram with cumulative buckets, +Inf, _sum and _count", () => {
  const m = new Metrics();
  m.counter("before_total", "a counter declared first");
  m.histogram("op_seconds", "test histogram", [0.1, 1]);
  m.observe("op_seconds", { op: "get" }, 0.05);
  m.observe("op_seconds", { op: "get" }, 0.1); // on a bound: counted in that bucket
  m.observe("op_seconds", { op: "get" }, 0.5);
  m.observe("op_seconds", { op: "get" }, 2);
  m.observe("op_seconds", {}, 0.25);
  assert.equal(
    m.render(),
    [
      "# HELP before_total a counter declared first",
      "# TYPE before_total counter",
      "# HELP op_seconds test histogram",
      "# TYPE op_seconds histogram",
      'op_seconds_bucket{op="get",le="0.1"} 2',
      'op_seconds_bucket{op="get",le="1"} 3',
      'op_seconds_bucket{op="get",le="+Inf"} 4',
      'op_seconds_sum{op="get"} 2.65',
      'op_seconds_count{op="get"} 4',
      'op_seconds_bucket{le="0.1"} 0',
      'op_seconds_bucket{le="1"} 1',
      'op_seconds_bucket{le="+Inf"} 1',
      "op_seconds_sum 0.25",
      "op_seconds_count 1",
      "",
    ].join("\n"),
  );
});

Deno.test("Metrics histograms default to buckets from 100 µs to 1 s and refuse misuse", () => {
  const m = new Metrics();
  m.histogram("d_seconds", "default buckets");
  m.observe("d_seconds", {}, 0.0003);
  const buckets = m.render().split("\n").filter((l) => l.startsWith("d_seconds_bucket"));
  assert.equal(buckets[0], 'd_seconds_bucket{le="0.0001"} 0');
  assert.equal(buckets[2], 'd_seconds_bucket{le="0.0005"} 1');
  assert.equal(buckets.at(-2), 'd_seconds_bucket{le="1"} 1');
  assert.equal(buckets.at(-1), 'd_seconds_bucket{le="+Inf"} 1');
  assert.ok(m.has("d_seconds") && !m.has("nope"));
  assert.throws(() => m.inc("d_seconds"), RangeError);
  m.counter("c_total", "counter");
  assert.throws(() => m.observe("c_total", {}, 1), RangeError);
  assert.throws(() => m.observe("nope", {}, 1), RangeError);
  assert.throws(() => m.histogram("bad", "unordered", [1, 0.5]), RangeError);
});
