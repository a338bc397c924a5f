import { deepEqual, equal } from "node:assert/strict";
import { ManualClock } from "../core/clock.ts";
import { jsonLogger } from "../core/logger.ts";
import { SecurityLog } from "../core/security_log.ts";

function capture() {
  const lines: Record<string, unknown>[] = [];
  const logger = jsonLogger("debug", { sink: (line) => lines.push(JSON.parse(line)) });
  return { lines, logger };
}

Deno.test("SecurityLog writes one warn line per event and address per period", async (t) => {
  const clock = new ManualClock("2026-12-01T00:00:00Z");
  const { lines, logger } = capture();
  const log = new SecurityLog({ logger, clock, everyMs: 10_000 });

  await t.step("the first event is logged at warn with its fields", () => {
    log.warn("login_failed", "10.0.0.1", { email: "a@b.c" });
    equal(lines.length, 1);
    equal(lines[0].level, "warn");
    equal(lines[0].event, "login_failed");
    equal(lines[0].address, "10.0.0.1");
    equal(lines[0].email, "a@b.c");
  });

  await t.step("repeats within the period are counted, not logged", () => {
    for (let i = 0; i < 50; i++) log.warn("login_failed", "10.0.0.1");
    equal(lines.length, 1);
    log.warn("login_failed", "10.0.0.2");
    log.warn("forbidden", "10.0.0.1");
    equal(lines.length, 3);
  });

  await t.step("after the period the next line says how many were suppressed", () => {
    clock.advance(10_000);
    log.warn("login_failed", "10.0.0.1");
    equal(lines.length, 4);
    equal(lines[3].suppressed, 50);
  });
});

Deno.test("SecurityLog stays bounded in lines and memory under a flood from many addresses", () => {
  const clock = new ManualClock("2026-12-01T00:00:00Z");
  const { lines, logger } = capture();
  const log = new SecurityLog({ logger, clock, maxKeys: 100, perEventMax: 20 });
  for (let i = 0; i < 10_000; i++) log.warn("connection_refused", `10.0.${i >> 8}.${i & 255}`);
  equal(lines.length, 20);
  deepEqual(Object.keys(lines[0]).sort(), ["address", "event", "level", "msg", "ts"]);
  // Another event has its own budget.
  log.warn("login_failed", "10.0.0.1");
  equal(lines.length, 21);
  clock.advance(10_000);
  log.warn("connection_refused", "10.9.9.9");
  equal(lines.length, 22);
  equal(lines[21].suppressed_all_addresses, 9_980);
});
