// How batch jobs share the writer with live intake: batch rows go after live ones and never take
// a lane's last free slot (real PostgreSQL), and the runner's adaptive window stays within the
// writer's half, so live readings are never refused while a large batch runs.
import assert from "node:assert/strict";
import type { ReadingRow } from "../core/reading.ts";
import { WriterClient } from "../workers/writer_client.ts";
import {
  createTestSchema,
  postgresUrl,
  probePostgres,
  redactUrl,
  requireService,
} from "./_services.ts";
import { isoAgo, signedReading, startTestGateway } from "./_gateway.ts";

const WINDOW = 15 * 60_000;
const T0 = Date.parse("2026-11-29T00:00:00Z");
const FINISHED = new Set(["completed", "failed", "dead"]);

function row(meter: string, i: number, source: ReadingRow["source"]): ReadingRow {
  return {
    meter_id: meter,
    ts: T0 + i * WINDOW,
    kwh_e4: 10_000 + i,
    user_id: "u1",
    wallet_address: null,
    key_id: "k1",
    device_signature: "ff".repeat(32),
    source,
    submitted_at: T0 + i,
    minted: false,
    ...(source === "batch" ? { batch_job_id: "job-1" } : {}),
  };
}

const pg = await requireService(
  `PostgreSQL at ${redactUrl(postgresUrl())}`,
  probePostgres(postgresUrl()),
);

Deno.test({
  name: `WriterClient sends a live row before queued batch rows, in the slot they leave free${
    pg.ok ? "" : ` (ignored: ${pg.reason})`
  }`,
  ignore: !pg.ok,
  async fn() {
    const schema = await createTestSchema();
    const writer = await WriterClient.start({
      spec: { kind: "postgres", url: schema.url, max: 2, migrate: true, timescale: false },
      storeOptions: { dedupeWindowMs: WINDOW },
      lanes: 1,
      maxInFlight: 2,
      batchMax: 500,
      flushMs: 2,
      queueMax: 100_000,
    });
    try {
      let bulkDone = 0;
      const bulk = Array.from({ length: 2_000 }, (_, i) => {
        const r = row(`bulk-${i % 400}`, Math.floor(i / 400), "batch");
        return writer.submit(r)!.then((result) => {
          bulkDone++;
          return result;
        });
      });
      // FIFO would answer it after all 2,000; first among live rows, it rides the free slot
      // beside the one batch insert running.
      const live = await writer.submit(row("live-1", 0, "mqtt"))!;
      assert.equal(live.status, "stored");
      assert.ok(bulkDone <= 500, `${bulkDone} batch rows were answered before the live one`);
      const results = await Promise.all(bulk);
      assert.equal(results.filter((r) => r.status === "stored").length, 2_000);
    } finally {
      await writer.close();
      await schema.drop();
    }
  },
});

Deno.test("a batch larger than the writer's half runs beside live readings, none refused", async () => {
  // Half the queue is 100 rows: the window (up to 2,048) must stay under it, and live intake
  // keeps the other half; every reading of both kinds is stored.
  await using gw = await startTestGateway({
    env: {
      WRITER_QUEUE_MAX: "200",
      WRITER_BATCH_MAX: "50",
      BATCH_MAX_SIZE: "3000",
      // The live meter sends a reading per round trip: no bucket may refuse that.
      METER_RATE_BURST: "1000000",
      METER_RATE_PER_MINUTE: "1000000",
    },
  });
  const owner = await gw.createUser("owner@batch-share.test");
  const imported = await gw.request("POST", "/api/admin/devices/import", {
    token: gw.adminToken,
    body: {
      devices: Array.from({ length: 301 }, (_, i) => ({ meter_id: `bs-${i}`, user_id: owner.id })),
    },
  });
  assert.equal(imported.status, 200, JSON.stringify(imported.body));
  const meters: { meter_id: string; secret_hex: string }[] = imported.body.results;
  const [liveMeter, ...batchMeters] = meters;
  const now = Date.now();
  const readings = Array.from({ length: 3_000 }, (_, i) => {
    const m = batchMeters[i % batchMeters.length];
    const ts = isoAgo((Math.floor(i / batchMeters.length) + 1) * 30 * 60_000, now);
    return signedReading(m.meter_id, m.secret_hex, ts, "2.5");
  });
  const res = await gw.request("POST", "/api/meters/submit-readings-batch", {
    token: owner.token,
    body: { readings },
  });
  assert.equal(res.status, 202, JSON.stringify(res.body));
  const jobId = res.body.job_id;

  // Live readings one after another until the job has finished: each answered 201.
  let live = 0;
  let job;
  for (;;) {
    job = (await gw.request("GET", `/api/meters/batches/${jobId}`, { token: owner.token })).body;
    if (FINISHED.has(job.status)) break;
    const ts = isoAgo((live + 1) * 30 * 60_000, now);
    const single = await gw.request("POST", "/api/meters/submit-reading", {
      token: owner.token,
      body: signedReading(liveMeter.meter_id, liveMeter.secret_hex, ts, "1.5"),
    });
    assert.equal(single.status, 201, JSON.stringify(single.body));
    live++;
    assert.ok(live < 300, "the job did not finish");
  }
  assert.equal(job.status, "completed", JSON.stringify(job));
  assert.equal(job.successful, 3_000);
  assert.equal(job.attempts, 1, "no reading was answered overloaded long enough to retry");
  assert.ok(live > 0, "the job finished before any live reading went in");
});
