// Batch jobs of real gateway processes (main.ts) on real PostgreSQL: two instances sharing one
// schema run every job exactly once and take over the job of an instance killed with SIGKILL;
// a job survives the database going away under it, and one whose attempts the outage used up
// ends `dead` and completes when an admin retries it.
import assert from "node:assert/strict";
import postgres from "postgres";
import { isoAgo, signedReading } from "./_gateway.ts";
import { call, GatewayProcess, login } from "./_gateway_process.ts";
import {
  createTestSchema,
  postgresUrl,
  probePostgres,
  redactUrl,
  requireService,
  type TestSchema,
} from "./_services.ts";
import { startTcpProxy } from "./_tcp_proxy.ts";

const ADMIN = { email: "root@batch-cluster.test", password: "Batch-cluster-root-pw-3" };
const OWNER = { email: "owner@batch-cluster.test", password: "holder-Secret-82" };
/** Guards against hangs only: every wait below ends on what it waits for. */
const DEADLINE_MS = 45_000;
const MINUTE = 60_000;

const service = await requireService(
  `PostgreSQL at ${redactUrl(postgresUrl())}`,
  probePostgres(postgresUrl()),
);

function pgTest(name: string, fn: (t: Deno.TestContext) => Promise<void>): void {
  Deno.test({
    name: service.ok ? name : `${name} (skipped: ${service.reason})`,
    ignore: !service.ok,
    fn,
  });
}

/** What every instance of a test shares: secrets, the admin, no MQTT, no Redis. */
function commonEnv(databaseUrl: string): Record<string, string> {
  return {
    DATABASE_URL: databaseUrl,
    JWT_SECRET: "Kq8vTz3pXw9LmN2rB7yC4dF6hJ1sG5aE0uI",
    DEVICE_KEY_ENCRYPTION_KEY: "0f1e2d3c4b5a69788796a5b4c3d2e1f00011223344556677889900aabbccddee",
    ADMIN_EMAIL: ADMIN.email,
    ADMIN_PASSWORD: ADMIN.password,
    MQTT_ENABLED: "false",
    DEDUPE_WINDOW: "1s",
    DEVICE_REGISTER_RATE_LIMIT: "1000",
    LOG_LEVEL: "info",
    BATCH_MAX_SIZE: "5000",
    BATCH_LEASE: "2s",
  };
}

interface Meter {
  meter_id: string;
  secret_hex: string;
}

interface Owner {
  adminToken: string;
  token: string;
  meters: Meter[];
}

/** The submitter and `n` meters of theirs, created through `base`. */
async function createOwner(base: string, prefix: string, n: number): Promise<Owner> {
  const adminToken = await login(base, ADMIN.email, ADMIN.password);
  const user = await call(base, "POST", "/api/admin/users", {
    token: adminToken,
    body: { email: OWNER.email, password: OWNER.password, role: "user" },
  });
  assert.equal(user.status, 201, JSON.stringify(user.body));
  const token = await login(base, OWNER.email, OWNER.password);
  const imported = await call(base, "POST", "/api/admin/devices/import", {
    token: adminToken,
    body: {
      devices: Array.from({ length: n }, (_, i) => ({
        meter_id: `${prefix}-${i}`,
        user_id: user.body.id,
      })),
    },
  });
  assert.equal(imported.status, 200, JSON.stringify(imported.body));
  return { adminToken, token, meters: imported.body.results };
}

/** A job's readings and what an uninterrupted run reports for it. */
interface JobInput {
  readings: unknown[];
  /** `meter_id\nepoch ms` of every reading the job stores. */
  stored: Set<string>;
  successful: number;
  duplicates: number;
  failed: number;
  /** Indices of `errors`: the duplicates, then the invalid ones, at the end. */
  errorIndices: number[];
}

/**
 * `distinct` valid readings (the meters in turn, each walking back from `firstStep` in
 * 20-minute steps), then `dups` exact copies of the first ones, then `invalid` unparsable ones.
 */
function jobInput(
  meters: Meter[],
  options: { distinct: number; dups: number; invalid: number; firstStep?: number; now: number },
): JobInput {
  const { distinct, dups, invalid, now } = options;
  const readings: unknown[] = [];
  const stored = new Set<string>();
  for (let i = 0; i < distinct; i++) {
    const m = meters[i % meters.length];
    const step = (options.firstStep ?? 0) + Math.floor(i / meters.length) + 1;
    const ts = isoAgo(step * 20 * MINUTE, now);
    readings.push(signedReading(m.meter_id, m.secret_hex, ts));
    stored.add(`${m.meter_id}\n${Date.parse(ts)}`);
  }
  for (let i = 0; i < dups; i++) readings.push(readings[i]);
  for (let i = 0; i < invalid; i++) {
    readings.push({ meter_id: meters[i % meters.length].meter_id, kwh_amount: "x" });
  }
  return {
    readings,
    stored,
    successful: distinct,
    duplicates: dups,
    failed: invalid,
    errorIndices: Array.from({ length: dups + invalid }, (_, i) => distinct + i),
  };
}

async function submit(base: string, token: string, input: JobInput): Promise<string> {
  const res = await call(base, "POST", "/api/meters/submit-readings-batch", {
    token,
    body: { readings: input.readings },
  });
  assert.equal(res.status, 202, JSON.stringify(res.body));
  return res.body.job_id;
}

// deno-lint-ignore no-explicit-any
type Job = any;

/** Polls the job through the API until it is finished; fails at the deadline. */
async function finishedJob(base: string, token: string, id: string, deadline: number) {
  for (;;) {
    const res = await call(base, "GET", `/api/meters/batches/${id}`, { token });
    assert.equal(res.status, 200, JSON.stringify(res.body));
    const job: Job = res.body;
    if (["completed", "failed", "dead"].includes(job.status)) return job;
    assert.ok(Date.now() < deadline, `job ${id} not finished: ${JSON.stringify(job)}`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

function assertExact(job: Job, input: JobInput, attempts: number): void {
  assert.equal(job.status, "completed", JSON.stringify(job));
  assert.deepEqual(
    [job.successful, job.duplicates, job.failed, job.attempts],
    [input.successful, input.duplicates, input.failed, attempts],
    JSON.stringify({ ...job, errors: job.errors.length }),
  );
  assert.deepEqual(job.errors.map((e: { index: number }) => e.index), input.errorIndices);
  for (const e of job.errors.slice(0, input.duplicates)) assert.equal(e.code, "duplicate");
  for (const e of job.errors.slice(input.duplicates)) assert.equal(e.code, "invalid_payload");
}

/** The job row as stored, read past the gateway. */
interface JobRow {
  status: string;
  attempts: number;
  successful: number;
  failed: number;
  duplicates: number;
  lease_owner: string | null;
  lease_expired: boolean;
}

async function jobRow(sql: postgres.Sql, id: string): Promise<JobRow> {
  const [row] = await sql<JobRow[]>`
    SELECT status, attempts, successful, failed, duplicates, lease_owner,
           coalesce(lease_until < now(), false) AS lease_expired
    FROM batch_jobs WHERE id = ${id}`;
  assert.ok(row, `no job ${id}`);
  return row;
}

/** Polls the job row until `done` holds; fails at the deadline. */
async function waitForRow(
  sql: postgres.Sql,
  id: string,
  what: string,
  done: (row: JobRow) => boolean,
  deadline: number,
): Promise<JobRow> {
  for (;;) {
    const row = await jobRow(sql, id);
    if (done(row)) return row;
    assert.ok(Date.now() < deadline, `${what}: ${JSON.stringify(row)}`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

/**
 * Every stored reading, by key, with the job that stored it: checks that none is stored twice
 * and that those of the jobs in `jobs` are exactly what each job stores.
 */
async function assertStoredExactly(
  sql: postgres.Sql,
  jobs: Map<string, JobInput>,
): Promise<void> {
  const rows = await sql<{ key: string; batch_job_id: string | null; n: number }[]>`
    SELECT meter_id || E'\n' ||
             (extract(epoch FROM reading_timestamp) * 1000)::bigint::text AS key,
           batch_job_id, count(*) OVER (PARTITION BY meter_id, reading_timestamp)::int AS n
    FROM meter_readings`;
  const expected = new Map<string, string>();
  for (const [id, input] of jobs) for (const key of input.stored) expected.set(key, id);
  for (const r of rows) {
    assert.equal(r.n, 1, `stored ${r.n} times: ${JSON.stringify(r.key)}`);
    assert.equal(r.batch_job_id, expected.get(r.key), `row ${JSON.stringify(r.key)}`);
  }
  assert.equal(rows.length, expected.size);
}

/** `batch_jobs_completed_total{status="completed"}` of one instance. */
async function completedOn(gw: GatewayProcess): Promise<number> {
  const res = await fetch(`${gw.url}/metrics`);
  const text = await res.text();
  assert.equal(res.status, 200, text);
  const match = /^batch_jobs_completed_total\{status="completed"\} (\d+)$/m.exec(text);
  return match ? Number(match[1]) : 0;
}

/** A direct connection to the test's schema (not through any proxy). */
function connect(schema: TestSchema): postgres.Sql {
  return postgres(schema.url, { max: 2, onnotice: () => {} });
}

pgTest(
  "20 batch jobs submitted alternately to two instances on one schema each run exactly once",
  async () => {
    const deadline = Date.now() + DEADLINE_MS;
    const schema = await createTestSchema();
    const sql = connect(schema);
    try {
      // One job at a time per instance, so that two jobs held running keep both instances busy.
      const env = { ...commonEnv(schema.url), BATCH_WORKER_CONCURRENCY: "1" };
      await using a = await GatewayProcess.start({ ...env, GATEWAY_INSTANCE_ID: "gw-a" });
      await using b = await GatewayProcess.start({ ...env, GATEWAY_INSTANCE_ID: "gw-b" });
      const owner = await createOwner(a.url, "two", 100);
      const now = Date.now();
      const inputs = Array.from(
        { length: 20 },
        (_, j) =>
          jobInput(owner.meters.slice((j % 5) * 20, (j % 5) * 20 + 20), {
            distinct: 40,
            dups: 5,
            invalid: 5,
            // Jobs sharing meters walk back from different steps: no reading is in two jobs.
            firstStep: Math.floor(j / 5) * 2,
            now,
          }),
      );

      // Readings cannot be looked up while this lock is held, so the first job each instance
      // claims stays running: both instances run at least one job, whatever the claim order.
      const lock = await sql.reserve();
      let locked = true;
      try {
        await lock`BEGIN`;
        await lock`LOCK TABLE meter_readings IN ACCESS EXCLUSIVE MODE`;
        const jobs = new Map<string, JobInput>();
        for (const [j, input] of inputs.entries()) {
          jobs.set(await submit(j % 2 === 0 ? a.url : b.url, owner.token, input), input);
        }
        for (;;) {
          const owners = await sql<{ lease_owner: string }[]>`
          SELECT lease_owner FROM batch_jobs WHERE status = 'running' ORDER BY lease_owner`;
          if (
            owners.map((r) => r.lease_owner).join() === "gw-a,gw-b"
          ) break;
          assert.ok(Date.now() < deadline, `two running jobs expected: ${JSON.stringify(owners)}`);
          await new Promise((resolve) => setTimeout(resolve, 20));
        }
        await lock`ROLLBACK`;
        locked = false;

        for (const [id, input] of jobs) {
          assertExact(await finishedJob(b.url, owner.token, id, deadline), input, 1);
        }
        await assertStoredExactly(sql, jobs);
        const ran = [await completedOn(a), await completedOn(b)];
        assert.equal(ran[0] + ran[1], 20, `completed per instance: ${ran}`);
        assert.ok(ran[0] > 0 && ran[1] > 0, `completed per instance: ${ran}`);
      } finally {
        if (locked) await lock`ROLLBACK`.catch(() => {});
        lock.release();
      }
      await a.stop("SIGTERM");
      await b.stop("SIGTERM");
    } finally {
      await sql.end({ timeout: 5 });
      await schema.drop();
    }
  },
);

pgTest(
  "a batch job of an instance killed with SIGKILL is taken over by the other with exact counts",
  async () => {
    const deadline = Date.now() + DEADLINE_MS;
    const schema = await createTestSchema();
    const sql = connect(schema);
    try {
      const env = {
        ...commonEnv(schema.url),
        // A slow writer (small batches, long linger), so the kill lands in the middle of the job.
        WRITER_BATCH_MAX: "20",
        WRITER_FLUSH_MS: "25",
      };
      await using a = await GatewayProcess.start({ ...env, GATEWAY_INSTANCE_ID: "gw-a" });
      await using b = await GatewayProcess.start({ ...env, GATEWAY_INSTANCE_ID: "gw-b" });
      const owner = await createOwner(a.url, "kill", 100);
      // 5,000 readings: 4,900 distinct, 50 exact duplicates, 50 invalid.
      const input = jobInput(owner.meters, {
        distinct: 4900,
        dups: 50,
        invalid: 50,
        now: Date.now(),
      });
      const id = await submit(a.url, owner.token, input);

      // Whichever instance claimed it is killed once it has recorded progress (a heartbeat).
      const running = await waitForRow(
        sql,
        id,
        "no progress",
        (r) => r.status === "running" && r.successful > 0,
        deadline,
      );
      assert.ok(running.successful < 4900, `ended before the kill: ${JSON.stringify(running)}`);
      const [victim, survivor] = running.lease_owner === "gw-a" ? [a, b] : [b, a];
      await victim.stop("SIGKILL");

      const job = await finishedJob(survivor.url, owner.token, id, deadline);
      assertExact(job, input, 2);
      await assertStoredExactly(sql, new Map([[id, input]]));
      assert.equal(await completedOn(survivor), 1);
      await survivor.stop("SIGTERM");
    } finally {
      await sql.end({ timeout: 5 });
      await schema.drop();
    }
  },
);

/**
 * The outages below refuse new connections, as a stopped server does. Unpatched, postgres.js
 * 3.4.9 ended the gateway process here (a write flushed from a timer after its socket had
 * closed; see vendor/postgres/PATCHES.md).
 */
const OUTAGE = { mode: "refuse" } as const;

/** One gateway whose link to PostgreSQL goes through a proxy that the test can cut. */
async function proxiedGateway(schema: TestSchema, env: Record<string, string>) {
  const base = new URL(schema.url);
  const proxy = startTcpProxy({ hostname: base.hostname, port: Number(base.port || 5432) });
  const proxied = new URL(schema.url);
  proxied.hostname = "127.0.0.1";
  proxied.port = String(proxy.port);
  try {
    const gw = await GatewayProcess.start({ ...commonEnv(proxied.href), ...env });
    return { gw, proxy };
  } catch (error) {
    await proxy.close();
    throw error;
  }
}

pgTest(
  "a batch job waits while PostgreSQL is unreachable and completes with exact counts after",
  async () => {
    const deadline = Date.now() + DEADLINE_MS;
    const schema = await createTestSchema();
    const sql = connect(schema);
    try {
      const { gw, proxy } = await proxiedGateway(schema, {
        GATEWAY_INSTANCE_ID: "gw-outage",
        WRITER_BATCH_MAX: "20",
        WRITER_FLUSH_MS: "25",
      });
      await using _proxy = proxy;
      await using _gw = gw;
      const owner = await createOwner(gw.url, "down", 100);
      const now = Date.now();
      const input = jobInput(owner.meters, { distinct: 4900, dups: 50, invalid: 50, now });
      const id = await submit(gw.url, owner.token, input);
      // The job row's counts move with each heartbeat only: the rows it stores show progress
      // at once.
      for (;;) {
        const [{ n }] = await sql<{ n: number }[]>`
          SELECT count(*)::int AS n FROM meter_readings WHERE batch_job_id = ${id}`;
        if (n > 0) break;
        assert.ok(Date.now() < deadline, "no progress");
        await new Promise((resolve) => setTimeout(resolve, 5));
      }
      await proxy.cut(OUTAGE);
      const before = await jobRow(sql, id);
      assert.ok(before.status === "running", `ended before the outage: ${JSON.stringify(before)}`);
      // The gateway notices (its writer keeps the readings and retries) and the job's lease runs
      // out meanwhile; nothing is reported failed, the job is neither finished nor given up.
      await gw.waitForLog((e) => e.msg === "writer stalled; batch kept for retry", DEADLINE_MS);
      const during = await waitForRow(sql, id, "lease kept", (r) => r.lease_expired, deadline);
      assert.equal(during.status, "running", JSON.stringify(during));
      // Only the readings refused at submission (unparsable): none for the outage.
      assert.equal(during.failed, input.failed, JSON.stringify(during));
      proxy.restore();
      // A new job wakes the runner at once: it claims the oldest claimable job, this one, whose
      // lease ran out, before the attempt still running here renews it (it would otherwise win
      // that race only sometimes). The instance must not run the job twice at once.
      const extra = jobInput(owner.meters, {
        distinct: 100,
        dups: 0,
        invalid: 0,
        firstStep: 60,
        now,
      });
      const extraId = await submit(gw.url, owner.token, extra);

      const job = await finishedJob(gw.url, owner.token, id, deadline);
      assert.ok(job.attempts <= 2, `attempts: ${job.attempts}`);
      assertExact(job, input, job.attempts);
      assertExact(await finishedJob(gw.url, owner.token, extraId, deadline), extra, 1);
      await assertStoredExactly(sql, new Map([[id, input], [extraId, extra]]));
      await gw.stop("SIGTERM");
    } finally {
      await sql.end({ timeout: 5 });
      await schema.drop();
    }
  },
);

pgTest(
  "a batch job whose attempts all meet a PostgreSQL outage ends dead and completes when retried",
  async () => {
    const deadline = Date.now() + DEADLINE_MS;
    const schema = await createTestSchema();
    const sql = connect(schema);
    try {
      const { gw, proxy } = await proxiedGateway(schema, {
        GATEWAY_INSTANCE_ID: "gw-dead",
        BATCH_MAX_ATTEMPTS: "2",
        BATCH_RETRY_BACKOFF: "100ms",
      });
      await using _proxy = proxy;
      await using _gw = gw;
      const owner = await createOwner(gw.url, "dead", 100);
      const input = jobInput(owner.meters, {
        distinct: 400,
        dups: 50,
        invalid: 50,
        now: Date.now(),
      });

      // Held, this lock stops every attempt at its first look at meter_readings (which readings
      // the job already stored), so each outage below lands in the middle of an attempt.
      const lock = await sql.reserve();
      let locked = true;
      try {
        await lock`BEGIN`;
        await lock`LOCK TABLE meter_readings IN ACCESS EXCLUSIVE MODE`;
        const id = await submit(gw.url, owner.token, input);
        for (let attempt = 1; attempt <= 2; attempt++) {
          await waitForRow(
            sql,
            id,
            `attempt ${attempt} not started`,
            (r) => r.status === "running" && r.attempts === attempt,
            deadline,
          );
          // Waiting for the lock: this attempt's query, and those of the earlier attempts (the
          // server notices that their clients went away only once it answers them).
          for (;;) {
            const [{ waiting }] = await sql<{ waiting: number }[]>`
            SELECT count(*)::int AS waiting FROM pg_stat_activity
            WHERE wait_event_type = 'Lock' AND query LIKE '%WHERE batch_job_id =%'`;
            if (waiting >= attempt) break;
            assert.ok(Date.now() < deadline, `attempt ${attempt} not waiting for the lock`);
            await new Promise((resolve) => setTimeout(resolve, 20));
          }
          const failedBefore = gw.logs().filter((e) => e.msg === "batch job attempt failed").length;
          await proxy.cut(OUTAGE);
          await gw.waitForLog(
            (e) =>
              e.msg === "batch job attempt failed" &&
              gw.logs().filter((l) => l.msg === "batch job attempt failed").length > failedBefore,
            DEADLINE_MS,
          );
          const during = await jobRow(sql, id);
          assert.ok(["running", "queued"].includes(during.status), JSON.stringify(during));
          assert.equal(during.failed, input.failed, JSON.stringify(during));
          proxy.restore();
        }

        // Read once the database is back: no attempt is left.
        const dead = await finishedJob(gw.url, owner.token, id, deadline);
        assert.equal(dead.status, "dead", JSON.stringify(dead));
        assert.equal(dead.failed, input.failed, JSON.stringify(dead));
        await lock`ROLLBACK`;
        locked = false;

        const retried = await call(gw.url, "POST", `/api/admin/batches/${id}/retry`, {
          token: owner.adminToken,
        });
        assert.equal(retried.status, 200, JSON.stringify(retried.body));
        assertExact(await finishedJob(gw.url, owner.token, id, deadline), input, 1);
        await assertStoredExactly(sql, new Map([[id, input]]));
      } finally {
        if (locked) await lock`ROLLBACK`.catch(() => {});
        lock.release();
      }
      await gw.stop("SIGTERM");
    } finally {
      await sql.end({ timeout: 5 });
      await schema.drop();
    }
  },
);
