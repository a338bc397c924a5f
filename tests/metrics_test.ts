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
