// Hostile review of /metrics (routes/metrics.ts, routes/http_metrics.ts, core/metrics.ts) and
// /api/admin/metrics: can a client blow up label cardinality, and does METRICS_TOKEN hold?
//
// Every step here documents an attack the gateway withstood (they pass).
import { equal, ok } from "node:assert/strict";
import { startTestGateway, type TestGateway } from "./_gateway.ts";

const TOKEN = "metrics-token-Zx81-qqpL-2026";

async function scrape(gw: TestGateway): Promise<string> {
  const res = await fetch(`${gw.url}/metrics`, { headers: { authorization: `Bearer ${TOKEN}` } });
  equal(res.status, 200);
  return await res.text();
}

/** Distinct series (label sets) of a family, histogram buckets folded. */
function seriesOf(text: string, family: string): Set<string> {
  const out = new Set<string>();
  for (const line of text.split("\n")) {
    if (!line.startsWith(family)) continue;
    const m = /^([a-z_]+)\{([^}]*)\}/.exec(line);
    if (!m) continue;
    out.add(m[2].replace(/,?le="[^"]*"/, ""));
  }
  return out;
}

Deno.test("hostile: metrics cardinality and METRICS_TOKEN", async (t) => {
  await using gw = await startTestGateway({ env: { METRICS_TOKEN: TOKEN } });
  const mallory = await gw.createUser("mallory@metrics.test");

  await t.step("anonymous and wrong tokens: the same 401, nothing of the metrics", async () => {
    const bodies = new Set<string>();
    for (
      const auth of [
        undefined,
        `Bearer ${TOKEN.slice(0, -1)}X`, // same length
        `Bearer ${TOKEN}x`, // longer
        `bearer ${TOKEN}`,
        TOKEN,
        `Bearer ${mallory.token}`,
      ]
    ) {
      const res = await fetch(`${gw.url}/metrics`, {
        headers: auth ? { authorization: auth } : {},
      });
      const text = await res.text();
      equal(res.status, 401, String(auth));
      ok(!text.includes("http_request_duration_seconds"));
      bodies.add(text);
    }
    equal(bodies.size, 1, [...bodies].join("\n"));
  });

  await t.step(
    "300 distinct paths, odd methods, odd statuses: route/method series stay bounded",
    async () => {
      const before = seriesOf(await scrape(gw), "http_request_duration_seconds").size;
      const reqs: Promise<void>[] = [];
      for (let i = 0; i < 300; i++) {
        const paths = [
          `/nope/${crypto.randomUUID()}`,
          `/api/meters/batches/${crypto.randomUUID()}`,
          `/api/meters/m-${i}/stats/hourly`,
          `/api/admin/batches/${i}/retry`,
          `/api/meters/batches/x/${i}`,
        ];
        const method = ["GET", "POST", "FOO" + (i % 50), "PROPFIND", "DELETE"][i % 5];
        reqs.push(
          fetch(gw.url + paths[i % paths.length], {
            method,
            headers: { authorization: `Bearer ${i % 2 ? mallory.token : "bad"}` },
          }).then((r) => r.body?.cancel()),
        );
        if (reqs.length >= 16) await Promise.all(reqs.splice(0));
      }
      await Promise.all(reqs);
      const after = seriesOf(await scrape(gw), "http_request_duration_seconds");
      console.log(`http_request_duration_seconds series: ${before} -> ${after.size}`);
      ok(after.size - before < 40, [...after].join("\n"));
      for (const s of after) ok(!/[0-9a-f]{8}-[0-9a-f]{4}/.test(s), s);
      for (const s of after) ok(!/FOO/.test(s), s);
    },
  );

  await t.step("WebSocket failure reasons are error codes, not client text", async () => {
    for (
      const q of [
        "?token=bad",
        `?token=${mallory.token}`,
        "",
        `?token=${encodeURIComponent('a"b\nc')}`,
      ]
    ) {
      const res = await fetch(`${gw.url}/ws${q}`);
      await res.body?.cancel();
    }
    const reasons = seriesOf(await scrape(gw), "websocket_connection_failures_total");
    for (const r of reasons) ok(/^reason="[a-z_]+"$/.test(r), r);
    ok(reasons.size <= 6, [...reasons].join(" "));
  });

  await t.step("/api/admin/metrics/top-meters: 401 anonymous, 403 user and operator", async () => {
    equal((await gw.request("GET", "/api/admin/metrics/top-meters")).status, 401);
    equal(
      (await gw.request("GET", "/api/admin/metrics/top-meters", { token: mallory.token })).status,
      403,
    );
    const op = await gw.createUser("op@metrics.test", "operator");
    equal(
      (await gw.request("GET", "/api/admin/metrics/top-meters?n=100", { token: op.token })).status,
      403,
    );
    equal(
      (await gw.request("GET", "/api/admin/metrics/top-meters?n=101", { token: gw.adminToken }))
        .status,
      400,
    );
  });
});
