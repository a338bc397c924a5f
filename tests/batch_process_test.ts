// Batch jobs across a kill -9 of the real process (main.ts): the job is taken over after the
// lease and completes with exactly the counts of an uninterrupted run.
import assert from "node:assert/strict";
import { isoAgo, signedReading } from "./_gateway.ts";
import { call, GatewayProcess, login } from "./_gateway_process.ts";

const ADMIN_EMAIL = "root@batch-crash.test";
const DEADLINE_MS = 90_000;

Deno.test("a batch job interrupted by kill -9 completes after a restart with exact counts", async () => {
  const dir = await Deno.makeTempDir({ prefix: "gw-batch-crash-" });
  const env = {
    DENO_KV_PATH: `${dir}/gateway.kv`,
    ADMIN_EMAIL,
    ADMIN_PASSWORD: "batch-crash-admin-password",
    LOG_LEVEL: "info",
    BATCH_MAX_SIZE: "5000",
    BATCH_LEASE: "2s",
    // A slow writer (small batches, long linger), so the kill lands in the middle of the job.
    WRITER_BATCH_MAX: "20",
    WRITER_FLUSH_MS: "25",
  };
  try {
    await using first = await GatewayProcess.start(env);
    const adminToken = await login(first.url, ADMIN_EMAIL, env.ADMIN_PASSWORD);
    const user = await call(first.url, "POST", "/api/admin/users", {
      token: adminToken,
      body: { email: "owner@batch-crash.test", password: "holder-Secret-82", role: "user" },
    });
    assert.equal(user.status, 201, JSON.stringify(user.body));
    const token = await login(first.url, "owner@batch-crash.test", "holder-Secret-82");
    const imported = await call(first.url, "POST", "/api/admin/devices/import", {
      token: adminToken,
      body: {
        devices: Array.from({ length: 100 }, (_, i) => ({
          meter_id: `bc-${i}`,
          user_id: user.body.id,
        })),
      },
    });
    assert.equal(imported.status, 200);
    const meters: { meter_id: string; secret_hex: string }[] = imported.body.results;

    // 5,000 readings: 4,900 distinct, 50 exact duplicates, 50 invalid.
    const now = Date.now();
    const readings: unknown[] = [];
    for (let k = 0; k < 49; k++) {
      for (const m of meters) {
        readings.push(signedReading(m.meter_id, m.secret_hex, isoAgo((k + 1) * 20 * 60_000, now)));
      }
    }
    for (let i = 0; i < 50; i++) readings.push(readings[i * 7]);
    for (let i = 0; i < 50; i++) readings.push({ meter_id: `bc-${i}`, kwh_amount: "x" });

    const res = await call(first.url, "POST", "/api/meters/submit-readings-batch", {
      token,
      body: { readings },
    });
    assert.equal(res.status, 202, JSON.stringify(res.body));
    const id = res.body.job_id;

    // Kill once the job has recorded progress (a heartbeat), well before its end.
    const deadline = Date.now() + DEADLINE_MS;
    let seen;
    for (;;) {
      seen = (await call(first.url, "GET", `/api/meters/batches/${id}`, { token })).body;
      if (seen.status === "running" && seen.successful > 0) break;
      assert.ok(Date.now() < deadline, `no progress: ${JSON.stringify(seen)}`);
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
    assert.ok(seen.successful < 4900, `the job ended before the kill: ${JSON.stringify(seen)}`);
    await first.stop("SIGKILL");

    await using second = await GatewayProcess.start(env);
    let job;
    for (;;) {
      job = (await call(second.url, "GET", `/api/meters/batches/${id}`, { token })).body;
      if (job.status === "completed" || job.status === "dead") break;
      assert.ok(Date.now() < deadline, `not completed: ${JSON.stringify(job)}`);
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
    assert.equal(job.status, "completed", JSON.stringify(job));
    assert.deepEqual(
      [job.successful, job.duplicates, job.failed, job.attempts],
      [4900, 50, 50, 2],
    );
    assert.deepEqual(
      job.errors.map((e: { index: number }) => e.index),
      Array.from({ length: 100 }, (_, i) => 4900 + i),
    );
    const stats = await call(second.url, "GET", "/api/meters/stats", { token });
    assert.equal(stats.body.reading_count, 4900);
    await second.stop("SIGTERM");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
