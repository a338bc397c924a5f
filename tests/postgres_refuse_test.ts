// The PostgreSQL pool through repeated outages in which the port refuses connections, as a
// stopped server does: every query settles (none hangs), the process survives (the patched
// postgres.js, vendor/postgres/PATCHES.md), and the pool is back within about a second of the
// server (db/postgres_pool.ts reconnectBackoff).
import assert from "node:assert/strict";
import { openPinnedPool, reconnectBackoff } from "../db/postgres_pool.ts";
import { postgresUrl, probePostgres, redactUrl, requireService } from "./_services.ts";
import { startTcpProxy } from "./_tcp_proxy.ts";

const status = await requireService(
  `PostgreSQL at ${redactUrl(postgresUrl())}`,
  probePostgres(postgresUrl()),
);

/** Settles with the query's outcome, or "hung" after `ms`. */
async function settled(query: Promise<unknown>, ms: number): Promise<"ok" | "error" | "hung"> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const hung = new Promise<"hung">((resolve) => timer = setTimeout(() => resolve("hung"), ms));
  try {
    return await Promise.race([query.then(() => "ok" as const, () => "error" as const), hung]);
  } finally {
    clearTimeout(timer);
  }
}

Deno.test("reconnectBackoff stays between 25 ms and 1 s", () => {
  for (let retries = 0; retries < 40; retries++) {
    const s = reconnectBackoff(retries);
    assert.ok(s >= 0.025 && s <= 1, `${retries}: ${s}`);
  }
  assert.ok(reconnectBackoff(30) >= 0.5, "grows to the cap");
});

Deno.test({
  name: status.ok
    ? "a pool through refused-connection outages: every query settles and it recovers in ~1 s"
    : `a pool through refused-connection outages (skipped: ${status.reason})`,
  ignore: !status.ok,
  fn: async () => {
    const base = new URL(postgresUrl());
    await using proxy = startTcpProxy({ hostname: base.hostname, port: Number(base.port || 5432) });
    const proxied = new URL(postgresUrl());
    proxied.hostname = "127.0.0.1";
    proxied.port = String(proxy.port);
    const { sql } = await openPinnedPool(proxied.href, { max: 4, connectTimeout: 2 });
    try {
      for (let round = 0; round < 6; round++) {
        // Load in flight when the link goes: small statements (flushed from a timer), a
        // transaction, and queries sent while the port refuses.
        // Each watched from the start: a rejection must find its handler.
        const load: Promise<"ok" | "error" | "hung">[] = [];
        const add = (q: Promise<unknown>) => load.push(settled(q, 20_000));
        for (let i = 0; i < 24; i++) add(sql`SELECT ${i}::int AS i, pg_sleep(0.005)`);
        add(sql.begin(async (tx) => {
          await tx`SELECT 1`;
          await tx`SELECT pg_sleep(0.05)`;
        }));
        await new Promise((resolve) => setTimeout(resolve, round * 3));
        await proxy.cut({ mode: "refuse" });
        for (let i = 0; i < 12; i++) add(sql`SELECT 2`);
        // Long enough for postgres.js's own backoff to have grown past several seconds.
        for (let i = 0; i < 10; i++) {
          add(sql`SELECT 3`);
          await new Promise((resolve) => setTimeout(resolve, 100));
        }
        proxy.restore();
        const back = performance.now();
        const outcomes = await Promise.all(load);
        assert.equal(outcomes.filter((o) => o === "hung").length, 0, `round ${round}`);
        for (;;) {
          if (await settled(sql`SELECT 1`, 5_000) === "ok") break;
          assert.ok(performance.now() - back < 5_000, `round ${round}: no recovery`);
        }
        const ms = performance.now() - back;
        // Everything answered and the pool usable again: with postgres.js's own backoff (grown to
        // 5–20 s by the failed connects) this took ~9 s a round.
        assert.ok(ms < 3_000, `round ${round}: back after ${Math.round(ms)} ms`);
      }
    } finally {
      await sql.end({ timeout: 5 });
    }
  },
});
