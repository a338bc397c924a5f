// Batch ingestion end to end over real HTTP: exact results by index, idempotency, envelope
// limits, rights, sync mode and WebSocket progress (Deno KV, or PostgreSQL with
// GATEWAY_TEST_STORE=postgres).
import { deepEqual, equal, ok, throws } from "node:assert/strict";
import { loadConfig } from "../core/config.ts";
import { isoAgo, signedReading, startTestGateway, type TestGateway } from "./_gateway.ts";
import { QueuedWs } from "./_ws_client.ts";

const MINUTE = 60_000;
/** A guard against hangs; every wait ends as soon as the job has finished. */
const JOB_DEADLINE_MS = 60_000;
const FINISHED = new Set(["completed", "failed", "dead"]);

type Res = Awaited<ReturnType<TestGateway["request"]>>;

interface Meter {
  meter_id: string;
  secret_hex: string;
}

/** Registers `count` HMAC meters of `userId` in one import. */
async function importMeters(
  gw: TestGateway,
  prefix: string,
  userId: string,
  count: number,
): Promise<Meter[]> {
  const devices = Array.from({ length: count }, (_, i) => ({
    meter_id: `${prefix}-${i}`,
    user_id: userId,
  }));
  const res = await gw.request("POST", "/api/admin/devices/import", {
    token: gw.adminToken,
    body: { devices },
  });
  equal(res.status, 200, JSON.stringify(res.body));
  return res.body.results.map((r: Meter) => ({ meter_id: r.meter_id, secret_hex: r.secret_hex }));
}

function submitBatch(
  gw: TestGateway,
  token: string,
  readings: unknown[],
  options: { key?: string; query?: string } = {},
): Promise<Res> {
  return gw.request("POST", `/api/meters/submit-readings-batch${options.query ?? ""}`, {
    token,
    body: { readings },
    headers: options.key === undefined ? {} : { "idempotency-key": options.key },
  });
}

/** Polls the job's status until it is finished (bounded). */
async function waitForJob(gw: TestGateway, token: string, jobId: string) {
  const deadline = Date.now() + JOB_DEADLINE_MS;
  for (;;) {
    const res = await gw.request("GET", `/api/meters/batches/${jobId}`, { token });
    equal(res.status, 200, JSON.stringify(res.body));
    if (FINISHED.has(res.body.status)) return res.body;
    if (Date.now() > deadline) throw new Error(`job ${jobId} not finished: ${res.body.status}`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

async function countJobs(gw: TestGateway): Promise<number> {
  const res = await gw.request("GET", "/api/meters/batches?limit=1000", { token: gw.adminToken });
  equal(res.status, 200);
  return res.body.items.length;
}

/** Every stored reading of a user's meters, as `meter_id@timestamp`. */
async function storedKeys(gw: TestGateway, token: string): Promise<Set<string>> {
  const keys = new Set<string>();
  let cursor: string | null = null;
  do {
    const res: Res = await gw.request(
      "GET",
      `/api/meters/readings?limit=1000${cursor ? `&cursor=${encodeURIComponent(cursor)}` : ""}`,
      { token },
    );
    equal(res.status, 200);
    for (const r of res.body.items) {
      equal(r.source, "batch");
      keys.add(`${r.meter_id}@${r.reading_timestamp}`);
    }
    cursor = res.body.next_cursor;
  } while (cursor);
  return keys;
}

Deno.test("batch submission reports every reading by index and stores exactly the rest", async (t) => {
  await using gw = await startTestGateway();
  const alice = await gw.createUser("alice@batch.test");
  const bob = await gw.createUser("bob@batch.test");
  const meters = await importMeters(gw, "bm", alice.id, 50);
  const now = Date.now();

  await t.step("1,000 readings: 37 invalid, 12 duplicates, 3 bad signatures", async () => {
    const readings: unknown[] = [];
    const expectedErrors: { index: number; code: string }[] = [];
    const stored = new Set<string>();
    const valid: Record<string, unknown>[] = [];
    let slot = 0;
    const nextValid = () => {
      const meter = meters[slot % meters.length];
      const ts = isoAgo((Math.floor(slot / meters.length) + 1) * 30 * MINUTE, now);
      slot++;
      return { meter, ts, reading: signedReading(meter.meter_id, meter.secret_hex, ts, "1.25") };
    };
    for (let i = 0; i < 1000; i++) {
      if (i % 27 === 5 && expectedErrors.filter((e) => e.code === "invalid_payload").length < 37) {
        // Schema failures of different kinds.
        const kinds = [
          {
            meter_id: "bm-1",
            kwh_amount: "abc",
            reading_timestamp: isoAgo(MINUTE, now),
            device_signature: "x",
          },
          { meter_id: "bm-1" },
          "not a reading",
          { ...signedReading("bm-2", meters[2].secret_hex, isoAgo(MINUTE, now)), extra: 1 },
        ];
        readings.push(kinds[i % kinds.length]);
        expectedErrors.push({ index: i, code: "invalid_payload" });
      } else if (
        i % 50 === 49 && expectedErrors.filter((e) => e.code === "duplicate").length < 12
      ) {
        readings.push(valid[valid.length - 3]); // an exact copy of an earlier reading
        expectedErrors.push({ index: i, code: "duplicate" });
      } else if (i % 300 === 150) {
        const { meter, ts } = nextValid();
        readings.push(signedReading(meter.meter_id, "00".repeat(32), ts));
        expectedErrors.push({ index: i, code: "bad_signature" });
      } else {
        const { meter, ts, reading } = nextValid();
        readings.push(reading);
        valid.push(reading);
        stored.add(`${meter.meter_id}@${ts}`);
      }
    }
    const counts = (code: string) => expectedErrors.filter((e) => e.code === code).length;
    deepEqual(
      [counts("invalid_payload"), counts("duplicate"), counts("bad_signature")],
      [37, 12, 3],
    );

    const res = await submitBatch(gw, alice.token, readings);
    equal(res.status, 202, JSON.stringify(res.body));
    equal(res.body.total_submitted, 1000);
    equal(res.body.status_url, `/api/meters/batches/${res.body.job_id}`);
    const job = await waitForJob(gw, alice.token, res.body.job_id);
    equal(job.status, "completed", JSON.stringify(job));
    equal(job.successful, stored.size);
    equal(job.failed, 40);
    equal(job.duplicates, 12);
    equal(job.successful + job.failed + job.duplicates, job.total_submitted);
    deepEqual(
      job.errors.map((e: { index: number; code: string }) => ({ index: e.index, code: e.code })),
      expectedErrors,
    );
    ok(job.started_at && job.finished_at && job.created_at);
    deepEqual(await storedKeys(gw, alice.token), stored);
  });

  await t.step(
    "the same Idempotency-Key and body give the same job; another body is 422",
    async () => {
      const meter = meters[0];
      const body = [signedReading(meter.meter_id, meter.secret_hex, isoAgo(3 * 86_400_000, now))];
      const before = await countJobs(gw);
      const first = await submitBatch(gw, alice.token, body, { key: "upload-2026-12-04" });
      equal(first.status, 202);
      const again = await submitBatch(gw, alice.token, body, { key: "upload-2026-12-04" });
      ok(again.status === 200 || again.status === 202, JSON.stringify(again.body));
      equal(again.body.job_id, first.body.job_id);
      const other = await submitBatch(gw, alice.token, [...body, ...body], {
        key: "upload-2026-12-04",
      });
      equal(other.status, 422, JSON.stringify(other.body));
      equal(other.body.error.code, "idempotency_mismatch");
      equal(await countJobs(gw), before + 1);
      // Another caller's key is their own.
      const bobs = await submitBatch(gw, bob.token, body, { key: "upload-2026-12-04" });
      equal(bobs.status, 202);
      ok(bobs.body.job_id !== first.body.job_id);
      const bad = await submitBatch(gw, alice.token, body, { key: "" });
      equal(bad.status, 400);
      const long = await submitBatch(gw, alice.token, body, { key: "k".repeat(129) });
      equal(long.status, 400);
      await waitForJob(gw, alice.token, first.body.job_id);
      await waitForJob(gw, bob.token, bobs.body.job_id);
    },
  );

  await t.step("what is not a batch gets a clear 4xx and creates nothing", async () => {
    const before = await countJobs(gw);
    const reading = signedReading("bm-0", meters[0].secret_hex, isoAgo(MINUTE, now));
    const cases: [string, string, number][] = [
      ["too many", JSON.stringify({ readings: Array(1001).fill(reading) }), 400],
      ["readings not an array", JSON.stringify({ readings: { a: reading } }), 400],
      ["not an object", JSON.stringify([reading]), 400],
      ["empty", JSON.stringify({ readings: [] }), 400],
      ["unknown field", JSON.stringify({ readings: [reading], more: 1 }), 400],
      ["not JSON", "{readings: [", 400],
      ["10 MB", JSON.stringify({ readings: ["x".repeat(10 * 1024 * 1024)] }), 413],
      ["deeply nested junk", "[".repeat(100_000) + "]".repeat(100_000), 400],
      ["nested readings", JSON.stringify({ readings: [nest(1000)] }), 400],
    ];
    for (const [what, raw, status] of cases) {
      const res = await gw.request("POST", "/api/meters/submit-readings-batch", {
        token: alice.token,
        raw,
        headers: { "content-type": "application/json" },
      });
      equal(res.status, status, `${what}: ${res.status} ${JSON.stringify(res.body).slice(0, 300)}`);
      equal(typeof res.body.error?.code, "string", what);
    }
    equal(await countJobs(gw), before);
  });

  await t.step("other users' meters are recorded as forbidden by index", async () => {
    const bobMeters = await importMeters(gw, "bob-m", bob.id, 2);
    const readings = [
      signedReading(bobMeters[0].meter_id, bobMeters[0].secret_hex, isoAgo(2 * MINUTE, now)),
      signedReading(meters[3].meter_id, meters[3].secret_hex, isoAgo(5 * 86_400_000, now)),
      signedReading(bobMeters[1].meter_id, bobMeters[1].secret_hex, isoAgo(2 * MINUTE, now)),
      signedReading("no-such-meter", "00".repeat(32), isoAgo(2 * MINUTE, now)),
    ];
    const res = await submitBatch(gw, bob.token, readings);
    equal(res.status, 202);
    const job = await waitForJob(gw, bob.token, res.body.job_id);
    equal(job.successful, 2);
    deepEqual(
      job.errors.map((
        e: { index: number; code: string; meter_id: string },
      ) => [e.index, e.code, e.meter_id]),
      [[1, "forbidden", meters[3].meter_id], [3, "forbidden", "no-such-meter"]],
    );
    // Another user sees no such job; the admin sees it.
    const peek = await gw.request("GET", `/api/meters/batches/${job.job_id}`, {
      token: alice.token,
    });
    equal(peek.status, 404);
    equal(peek.body.error.code, "not_found");
    const unknown = await gw.request("GET", `/api/meters/batches/${crypto.randomUUID()}`, {
      token: alice.token,
    });
    equal(unknown.status, 404);
    const admin = await gw.request("GET", `/api/meters/batches/${job.job_id}`, {
      token: gw.adminToken,
    });
    equal(admin.status, 200);
    const mine = await gw.request("GET", "/api/meters/batches", { token: bob.token });
    ok(mine.body.items.every((j: { user_id: string }) => j.user_id === bob.id));
    ok(mine.body.items.some((j: { job_id: string }) => j.job_id === job.job_id));
  });

  await t.step("?mode=sync answers with the result", async () => {
    const readings = meters.slice(10, 20).map((m) =>
      signedReading(m.meter_id, m.secret_hex, isoAgo(6 * 86_400_000, now))
    );
    readings.push({ meter_id: "bm-1" } as never);
    const res = await submitBatch(gw, alice.token, readings, { query: "?mode=sync" });
    equal(res.status, 200, JSON.stringify(res.body));
    equal(res.body.status, "completed");
    deepEqual([res.body.successful, res.body.failed, res.body.duplicates], [10, 1, 0]);
    deepEqual(res.body.errors.map((e: { index: number }) => e.index), [10]);
    const tooBig = await submitBatch(gw, alice.token, Array(101).fill(readings[0]), {
      query: "?mode=sync",
    });
    equal(tooBig.status, 400);
  });

  await t.step("the submitter's WebSockets get batch.progress and batch.completed", async () => {
    await using ws = await QueuedWs.connect(gw.url, alice.token);
    const readings = meters.flatMap((m) =>
      [1, 2, 3, 4, 5, 6].map((k) =>
        signedReading(m.meter_id, m.secret_hex, isoAgo(2 * 86_400_000 + k * 30 * MINUTE, now))
      )
    );
    const res = await submitBatch(gw, alice.token, readings);
    equal(res.status, 202);
    const id = res.body.job_id;
    const progress = await ws.next(
      (m) => m.type === "batch.progress" && m.data.job_id === id,
      "batch.progress",
    );
    ok(progress.data.processed > 0 && progress.data.processed < readings.length);
    const done = await ws.next(
      (m) => m.type === "batch.completed" && m.data.job_id === id,
      "batch.completed",
    );
    deepEqual(
      [done.data.status, done.data.successful, done.data.failed, done.data.duplicates],
      ["completed", 300, 0, 0],
    );
  });

  await t.step("admins retry only dead or failed jobs; purge deletes nothing recent", async () => {
    const list = await gw.request("GET", "/api/meters/batches?status=completed", {
      token: gw.adminToken,
    });
    const id = list.body.items[0].job_id;
    const retry = await gw.request("POST", `/api/admin/batches/${id}/retry`, {
      token: gw.adminToken,
    });
    equal(retry.status, 409, JSON.stringify(retry.body));
    const notAdmin = await gw.request("POST", `/api/admin/batches/${id}/retry`, {
      token: alice.token,
    });
    equal(notAdmin.status, 403);
    const purge = await gw.request("POST", "/api/admin/batches/purge", {
      token: gw.adminToken,
      body: { older_than: "7d" },
    });
    deepEqual([purge.status, purge.body], [200, { purged: 0 }]);
    const metrics = await (await fetch(`${gw.url}/metrics`)).text();
    ok(metrics.includes("batch_jobs_submitted_total"));
    ok(metrics.includes('batch_jobs_completed_total{status="completed"}'));
    ok(metrics.includes("batch_processing_duration_seconds_count"));
  });
});

Deno.test(
  "the 202's job already shows schema and ownership errors, before any runner touched it",
  async () => {
    await using gw = await startTestGateway();
    // No runner: whatever the job shows was recorded at submission.
    await gw.gateway.batches.close();
    const alice = await gw.createUser("alice@early.test");
    const bob = await gw.createUser("bob@early.test");
    const [mine] = await importMeters(gw, "early-a", alice.id, 1);
    const [bobs] = await importMeters(gw, "early-b", bob.id, 1);
    const readings = [
      signedReading(mine.meter_id, mine.secret_hex, isoAgo(MINUTE)),
      { meter_id: mine.meter_id, kwh_amount: "abc" },
      signedReading(bobs.meter_id, bobs.secret_hex, isoAgo(MINUTE)),
      signedReading(mine.meter_id, "00".repeat(32), isoAgo(2 * MINUTE)), // the runner's to find
      "not a reading",
      signedReading("no-such-meter", "00".repeat(32), isoAgo(MINUTE)),
      signedReading(bobs.meter_id, bobs.secret_hex, isoAgo(2 * MINUTE)),
    ];
    const res = await submitBatch(gw, alice.token, readings);
    equal(res.status, 202, JSON.stringify(res.body));
    equal(res.body.status, "queued");
    const job = await gw.request("GET", res.body.status_url, { token: alice.token });
    equal(job.status, 200);
    deepEqual(
      [job.body.status, job.body.started_at, job.body.successful, job.body.failed],
      ["queued", null, 0, 5],
    );
    deepEqual(
      job.body.errors.map((e: { index: number; code: string; meter_id: string | null }) => [
        e.index,
        e.code,
        e.meter_id,
      ]),
      [
        [1, "invalid_payload", mine.meter_id],
        [2, "forbidden", bobs.meter_id],
        [4, "invalid_payload", null],
        [5, "forbidden", "no-such-meter"],
        [6, "forbidden", bobs.meter_id],
      ],
    );
    // Admins may use every meter: only the schema is refused at submission.
    const admin = await submitBatch(gw, gw.adminToken, readings);
    const adminJob = await gw.request("GET", admin.body.status_url, { token: gw.adminToken });
    deepEqual(adminJob.body.errors.map((e: { index: number }) => e.index), [1, 4]);
  },
);

Deno.test("a job runs only the readings not refused at submission, with exact counts", async () => {
  await using gw = await startTestGateway();
  const alice = await gw.createUser("alice@rest.test");
  const bob = await gw.createUser("bob@rest.test");
  const meters = await importMeters(gw, "rest-a", alice.id, 3);
  const [bobs] = await importMeters(gw, "rest-b", bob.id, 1);
  const good = (m: Meter, k: number) =>
    signedReading(m.meter_id, m.secret_hex, isoAgo(k * 30 * MINUTE));
  const readings = [
    good(meters[0], 1),
    { meter_id: meters[0].meter_id },
    good(bobs, 1),
    good(meters[1], 1),
    good(meters[1], 1), // a duplicate of the one before
    signedReading(meters[2].meter_id, "00".repeat(32), isoAgo(MINUTE)),
    good(meters[2], 2),
  ];
  const res = await submitBatch(gw, alice.token, readings);
  equal(res.status, 202, JSON.stringify(res.body));
  const job = await waitForJob(gw, alice.token, res.body.job_id);
  deepEqual(
    [job.status, job.successful, job.failed, job.duplicates, job.total_submitted],
    ["completed", 3, 3, 1, 7],
  );
  deepEqual(
    job.errors.map((e: { index: number; code: string }) => [e.index, e.code]),
    [[1, "invalid_payload"], [2, "forbidden"], [4, "duplicate"], [5, "bad_signature"]],
  );
});

Deno.test("BATCH_MAX_SIZE is at most 10,000", () => {
  throws(() => loadConfig({ BATCH_MAX_SIZE: "10001" }), /BATCH_MAX_SIZE/);
  equal(loadConfig({ BATCH_MAX_SIZE: "10000" }).batch.maxSize, 10_000);
  equal(loadConfig({}).batch.maxSize, 1000);
});

function nest(depth: number): unknown {
  let v: unknown = "x";
  for (let i = 0; i < depth; i++) v = { v };
  return v;
}
