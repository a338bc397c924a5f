// PostgreSQL/TimescaleDB in production (issue #11): writes that stay fast over a year of chunks,
// hourly stats right at once, one source of policy settings, schema-pinned lookups, logs and
// teardown. Every test runs on plain PostgreSQL; the TimescaleDB ones run where the server has
// the extension installed and preloaded (TEST_DATABASE_URL), and say why they are skipped
// elsewhere.
import assert from "node:assert/strict";
import postgres from "postgres";
import { loadConfig, loadStorageConfig } from "../core/config.ts";
import { GatewayError } from "../core/errors.ts";
import { jsonLogger } from "../core/logger.ts";
import {
  migrate,
  pgInterval,
  preloads,
  sameIntervals,
  TIMESCALE_DEFAULTS,
  timescaleAvailability,
  type TimescaleOptions,
} from "../db/migrate.ts";
import { storeSpecOf, timescaleOptionsOf } from "../db/open_store.ts";
import { PostgresStore } from "../db/postgres_store.ts";
import { JWT_SECRET, startTestGateway } from "./_gateway.ts";
import { within } from "./_mosquitto.ts";
import {
  createTestSchema,
  dropTestSchema,
  postgresUrl,
  probePostgres,
  redactUrl,
  requireService,
  type TestSchema,
} from "./_services.ts";

const MIN = 60_000;
const HOUR = 60 * MIN;
const DAY = 24 * HOUR;
const WINDOW = 15 * MIN;
const ROOT = new URL("..", import.meta.url).pathname;
const KEK_HEX = "0f1e2d3c4b5a69788796a5b4c3d2e1f00011223344556677889900aabbccddee";

const PG_URL = postgresUrl();
const service = await requireService(`PostgreSQL at ${redactUrl(PG_URL)}`, probePostgres(PG_URL));
const skipped = service.ok ? "" : ` (skipped: ${service.reason})`;
const availability = service.ok ? await withSql(PG_URL, timescaleAvailability) : "absent";
const timescaleHere = availability === "available" || availability === "created";
const tsSkipped = !service.ok
  ? skipped
  : timescaleHere
  ? ""
  : ` (skipped: TimescaleDB is ${
    availability === "absent" ? "not installed" : "installed but not preloaded"
  } on ${redactUrl(PG_URL)})`;

async function withSql<T>(url: string, fn: (sql: postgres.Sql) => Promise<T>): Promise<T> {
  const sql = postgres(url, { max: 1, onnotice: () => {} });
  try {
    return await fn(sql);
  } finally {
    await sql.end({ timeout: 5 });
  }
}

interface Db {
  schema: TestSchema;
  open(options?: Partial<Parameters<typeof PostgresStore.connect>[1]>): Promise<PostgresStore>;
  raw(onnotice?: (notice: postgres.Notice) => void): postgres.Sql;
}

/** A test with a schema of its own (dropped after, jobs first); `timescale` tests need it. */
function pgTest(
  name: string,
  fn: (t: Deno.TestContext, db: Db) => Promise<void>,
  options: { timescale?: boolean } = {},
): void {
  const why = options.timescale ? tsSkipped : skipped;
  Deno.test({
    name: `${name}${why}`,
    ignore: why !== "",
    async fn(t) {
      const schema = await createTestSchema(PG_URL);
      const closers: (() => Promise<void>)[] = [];
      const db: Db = {
        schema,
        async open(options = {}) {
          const store = await PostgresStore.connect(schema.url, {
            dedupeWindowMs: WINDOW,
            max: 2,
            ...options,
          });
          closers.push(() => store.close());
          return store;
        },
        raw(onnotice = () => {}) {
          const sql = postgres(schema.url, { max: 1, onnotice });
          closers.push(() => sql.end({ timeout: 5 }));
          return sql;
        },
      };
      try {
        await fn(t, db);
      } finally {
        for (const close of closers) await close();
        await schema.drop();
      }
    },
  });
}

/** Loads `count` readings of `meter` every 15 minutes ending at `lastMs`, by SQL. */
async function loadHistory(sql: postgres.Sql, meter: string, count: number, lastMs: number) {
  await sql`
    INSERT INTO meter_readings (meter_id, reading_timestamp, kwh_amount, user_id, key_id,
                                device_signature, source, submitted_at)
    SELECT ${meter}, ${new Date(lastMs)}::timestamptz - g * interval '15 minutes', 1.5, 'u1',
           'k1', 'sig', 'mqtt', now()
    FROM generate_series(0, ${count - 1}) AS g`;
  await sql`ANALYZE meter_readings`;
}

/** Calls the insert function directly for `times` of one meter; returns its conflicts. */
function insertViaFunction(sql: postgres.Sql, meter: string, times: number[]) {
  const n = times.length;
  const fill = <T>(v: T) => new Array<T>(n).fill(v);
  // The store's insert function (migration 0006); its duplicates, as 0005's function reported.
  return sql`
    SELECT ord, conflict_ts FROM gateway_insert_readings_seq(
      ${sql.array([meter], 25)}::text[], ${sql.array(fill(meter), 25)}::text[],
      ${sql.array(times, 20)}::int8[], ${sql.array(fill(10_000), 20)}::int8[],
      ${sql.array(fill("u1"), 25)}::text[], ${
    sql.array(fill(null) as unknown as string[], 25)
  }::text[],
      ${sql.array(fill("k1"), 25)}::text[], ${sql.array(times.map((t) => `sig-${t}`), 25)}::text[],
      ${sql.array(fill("mqtt"), 25)}::text[], ${sql.array(fill(Date.now()), 20)}::int8[],
      ${sql.array(fill(false), 16)}::bool[], ${`${WINDOW} milliseconds`}::interval)
    WHERE seq IS NULL`;
}

interface PlanNode {
  "Node Type": string;
  "Relation Name"?: string;
  "Index Name"?: string;
  "Index Cond"?: string;
  "Shared Hit Blocks"?: number;
  "Shared Read Blocks"?: number;
  Plans?: PlanNode[];
}

function* walk(node: PlanNode): Generator<PlanNode> {
  yield node;
  for (const child of node.Plans ?? []) yield* walk(child);
}

/** Plans auto_explain sent as notices, for statements whose text contains `marker`. */
function plansOf(notices: postgres.Notice[], marker: string): PlanNode[] {
  const plans: PlanNode[] = [];
  for (const notice of notices) {
    const text = String(notice.message ?? "");
    const at = text.indexOf("{");
    if (!text.includes("plan:") || at < 0) continue;
    const doc = JSON.parse(text.slice(at)) as { "Query Text": string; Plan: PlanNode };
    if (doc["Query Text"].includes(marker)) plans.push(doc.Plan);
  }
  return plans;
}

/** The index scans of meter_readings (or its chunks) in `plans`: the probe's reads. */
function probeScans(plans: PlanNode[]): PlanNode[] {
  return plans.flatMap((plan) =>
    [...walk(plan)].filter((n) =>
      /Index (Only )?Scan/.test(n["Node Type"]) &&
      /meter_readings|_hyper_/.test(n["Relation Name"] ?? "")
    )
  );
}

async function explainLater(sql: postgres.Sql): Promise<void> {
  await sql.unsafe("LOAD 'auto_explain'");
  await sql.unsafe(`
    SET auto_explain.log_min_duration = 0;
    SET auto_explain.log_nested_statements = on;
    SET auto_explain.log_analyze = on;
    SET auto_explain.log_buffers = on;
    SET auto_explain.log_format = 'json';
    SET client_min_messages = 'log'`);
}

// ---- point 1: the duplicate probe ----------------------------------------------------------

pgTest(
  "the duplicate probe reads only the batch's time range, however long the history",
  async (t, db) => {
    const store = await db.open();
    const notices: postgres.Notice[] = [];
    const sql = db.raw((n) => notices.push(n));
    const last = Math.floor(Date.now() / HOUR) * HOUR - 2 * HOUR;
    // 208 days of a meter's readings (208 daily chunks with TimescaleDB), with a gap 100 days
    // back that a backfill fills: the unbounded probe read from there to the meter's newest row.
    await loadHistory(sql, "m-long", 20_000, last);
    const gap = last - 100 * DAY;
    await sql`DELETE FROM meter_readings WHERE meter_id = 'm-long'
    AND reading_timestamp > ${new Date(gap - HOUR)} AND reading_timestamp < ${new Date(
      gap + 2 * HOUR,
    )}`;
    await explainLater(sql);
    const batch = [gap, gap + 15 * MIN, gap + 30 * MIN, gap + 45 * MIN];
    // The fifth collides with the stored reading before the gap.
    const conflicts = await insertViaFunction(sql, "m-long", [...batch, gap - 55 * MIN]);
    await sql.unsafe("SET client_min_messages = 'notice'");
    const scans = probeScans(plansOf(notices, "WITH input AS"));

    await t.step("the batch is judged right: four stored, the fifth a duplicate", () => {
      assert.deepEqual(conflicts.map((c) => [c.ord, c.conflict_ts]), [[5, gap - HOUR]]);
    });

    await t.step("each index scan is bounded in time by scalar bounds", () => {
      // TimescaleDB may read the one small chunk left by a sequential scan instead.
      if (store.timescale && scans.length === 0) return;
      assert.ok(scans.length > 0, "no index scan of meter_readings in the plan");
      for (const scan of scans) {
        assert.match(scan["Index Cond"] ?? "", /\(reading_timestamp > /, JSON.stringify(scan));
        assert.match(scan["Index Cond"] ?? "", /\(reading_timestamp < /, JSON.stringify(scan));
      }
    });

    await t.step("and reads a few pages, not the meter's 9 600 newer readings", () => {
      const pages = scans.reduce(
        (sum, s) => sum + (s["Shared Hit Blocks"] ?? 0) + (s["Shared Read Blocks"] ?? 0),
        0,
      );
      // The unbounded probe read ~40 index pages per row here (the history after the gap).
      assert.ok(pages <= 5 * 12, `the probe read ${pages} pages for 5 rows`);
    });

    if (store.timescale) {
      await t.step("TimescaleDB: only the chunks of the batch's range are planned", async () => {
        const read = new Set(
          plansOf(notices, "WITH input AS").flatMap((plan) =>
            [...walk(plan)].filter((n) => /Scan/.test(n["Node Type"]))
              .map((n) => n["Relation Name"]).filter((r) => r?.startsWith("_hyper_"))
          ),
        );
        const [{ chunks }] = await sql<{ chunks: number }[]>`
          SELECT count(*)::int AS chunks FROM timescaledb_information.chunks
          WHERE hypertable_schema = ${db.schema.name} AND hypertable_name = 'meter_readings'`;
        assert.ok(chunks >= 200, `only ${chunks} chunks`);
        assert.ok(read.size >= 1 && read.size <= 2, `probe read ${read.size} chunks: ${[...read]}`);
      });
    }

    await t.step(
      "the store's judging path (a batch colliding with itself) is bounded too",
      async () => {
        notices.length = 0;
        const times = [last + 2 * HOUR, last + 2 * HOUR + MIN];
        const result = await store.insertReadings(times.map((ts) => reading("m-long", ts)));
        // The history was loaded in SQL, unnumbered; the backfill above took seqs 1 to 4.
        assert.deepEqual(result, [{ status: "stored", seq: 5 }, {
          status: "duplicate",
          conflict_ts: times[0],
        }]);
      },
    );
  },
);

function reading(meter: string, ts: number) {
  return {
    meter_id: meter,
    ts,
    kwh_e4: 10_000,
    user_id: "u1",
    wallet_address: null,
    key_id: "k1",
    device_signature: `sig-${ts}`,
    source: "mqtt" as const,
    submitted_at: ts,
    minted: false,
  };
}

// ---- point 2: hourly stats at once ---------------------------------------------------------

pgTest(
  "a reading backfilled 3 days ago counts in its hour at once, after a refresh",
  async (t, db) => {
    const store = await db.open();
    const hour = Math.floor((Date.now() - 3 * DAY) / HOUR) * HOUR;
    await store.insertReadings([reading("m-late", hour), reading("m-late", hour + 20 * MIN)]);
    // Materialised now, as the refresh policy would have done since.
    await store.refreshHourlyStats(hour - DAY, Date.now() - HOUR);

    await t.step("before: two readings in the hour", async () => {
      const [stat] = await store.hourlyStats("m-late", hour, hour + HOUR);
      assert.equal(stat.count, 2);
    });

    await t.step("a late reading shows in the very next request", async () => {
      assert.deepEqual(await store.insertReadings([reading("m-late", hour + 40 * MIN)]), [{
        status: "stored",
        seq: 3,
      }]);
      const [stat] = await store.hourlyStats("m-late", hour, hour + HOUR);
      assert.equal(stat.count, 3);
      assert.equal(stat.sum_kwh, 3);
    });

    await t.step("old hours and recent hours are joined without loss or overlap", async () => {
      const old = Math.floor((Date.now() - 20 * DAY) / HOUR) * HOUR;
      await store.insertReadings([reading("m-late", old), reading("m-late", old + HOUR)]);
      await store.refreshHourlyStats(old - HOUR, old + 2 * HOUR);
      const stats = await store.hourlyStats("m-late", old, Date.now());
      assert.deepEqual(stats.map((s) => [s.hour, s.count]), [[old, 1], [old + HOUR, 1], [
        hour,
        3,
      ]]);
    });
  },
);

// ---- point 3: one source of settings -------------------------------------------------------

/** Runs `deno task -q <task>` with only `env` (and PATH) set. */
async function task(name: string, args: string[], env: Record<string, string>) {
  const output = await new Deno.Command(Deno.execPath(), {
    args: ["task", "-q", name, ...args],
    cwd: ROOT,
    clearEnv: true,
    env: {
      PATH: Deno.env.get("PATH") ?? "",
      HOME: Deno.env.get("HOME") ?? "",
      NO_COLOR: "1",
      ...env,
    },
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).output();
  const decoder = new TextDecoder();
  return {
    code: output.code,
    stdout: decoder.decode(output.stdout),
    stderr: decoder.decode(output.stderr),
  };
}

const CONFIGURED = {
  READING_MAX_AGE: "30d",
  TIMESCALE_COMPRESS_AFTER: "45d",
  READINGS_RETENTION: "400d",
  TIMESCALE_CHUNK_INTERVAL: "7d",
};

/** The interval-valued fields of the schema's policy jobs, compared in SQL. */
async function jobSettings(sql: postgres.Sql, schema: string) {
  return await sql<
    { proc_name: string; on: string; job_id: number; config: Record<string, string> }[]
  >`
    SELECT j.job_id, j.proc_name, j.config,
           CASE WHEN j.hypertable_name = 'meter_readings' THEN 'readings' ELSE 'stats' END AS on
    FROM timescaledb_information.jobs j
    WHERE j.hypertable_schema = ${schema}
       OR (j.hypertable_schema, j.hypertable_name) IN (
         SELECT materialization_hypertable_schema, materialization_hypertable_name
         FROM timescaledb_information.continuous_aggregates WHERE view_schema = ${schema})
    ORDER BY j.job_id`;
}

pgTest(
  "deno task migrate applies the gateway's own settings from the environment",
  async (t, db) => {
    const env = { DATABASE_URL: db.schema.url, ...CONFIGURED };
    const run = await task("migrate", [], env);
    assert.equal(run.code, 0, run.stderr);
    const result = JSON.parse(run.stdout);

    await t.step("the settings are the ones the gateway derives from the same variables", () => {
      const gateway = storeSpecOf(
        loadConfig({ ...env, JWT_SECRET, DEVICE_KEY_ENCRYPTION_KEY: KEK_HEX }),
      );
      assert.equal(gateway.kind, "postgres");
      const expected = {
        ...TIMESCALE_DEFAULTS,
        ...(gateway.kind === "postgres" ? gateway.timescale as TimescaleOptions : {}),
      };
      assert.deepEqual(result.settings, expected);
      assert.deepEqual(result.settings, {
        ...TIMESCALE_DEFAULTS,
        ...timescaleOptionsOf(loadStorageConfig(env)) as TimescaleOptions,
      });
      assert.equal(result.settings.refreshStartOffsetMs, 31 * DAY);
      assert.equal(result.settings.compressAfterMs, 45 * DAY);
      assert.equal(result.settings.retainForMs, 400 * DAY);
      assert.equal(result.settings.chunkIntervalMs, 7 * DAY);
    });

    await t.step("a bad value stops it with a message naming the variable", async () => {
      const bad = await task("migrate", [], { ...env, READING_MAX_AGE: "a week" });
      assert.equal(bad.code, 2);
      assert.match(bad.stderr, /READING_MAX_AGE/);
    });

    if (timescaleHere) {
      await t.step(
        "TimescaleDB: the live jobs and chunk interval carry those settings",
        async () => {
          const sql = db.raw();
          const jobs = await jobSettings(sql, db.schema.name);
          const pick = (proc: string, on: string) => {
            const job = jobs.find((j) => j.proc_name === proc && j.on === on);
            assert.ok(job, `no ${proc} job on ${on}: ${JSON.stringify(jobs)}`);
            return job.config;
          };
          const checks: [string | null, string][] = [
            [pick("policy_refresh_continuous_aggregate", "stats").start_offset, "31 days"],
            [pick("policy_compression", "readings").compress_after, "45 days"],
            [pick("policy_retention", "readings").drop_after, "400 days"],
            [pick("policy_retention", "stats").drop_after, "400 days"],
          ];
          const [dim] = await sql<{ i: string }[]>`
        SELECT time_interval::text AS i FROM timescaledb_information.dimensions
        WHERE hypertable_schema = ${db.schema.name} AND hypertable_name = 'meter_readings'`;
          checks.push([dim.i, "7 days"]);
          assert.deepEqual(await sameIntervals(sql, checks), checks.map(() => true));
        },
      );
    }
  },
);

// ---- point 4: no fight over the policies ---------------------------------------------------

pgTest("intervals are compared by value, not by spelling", async () => {
  await withSql(PG_URL, async (sql) => {
    assert.deepEqual(
      await sameIntervals(sql, [
        ["8 days", "691200 seconds"],
        ["00:05:00", "5 minutes"],
        ["1 day", "24 hours"],
        ["1 year", "365 days"], // PostgreSQL's year is 12 months of 30 days
        [null, "1 day"],
        ["not an interval", "1 day"],
        ["7 days", "8 days"],
      ]),
      [true, true, true, false, false, false, false],
    );
  });
  assert.equal(pgInterval(8 * DAY), "8 days");
  assert.equal(pgInterval(HOUR), "1 hours");
  assert.equal(pgInterval(5 * MIN), "5 minutes");
  assert.equal(pgInterval(1_500), "1.5 seconds");
  assert.throws(() => pgInterval(0), RangeError);
});

pgTest("gateway and deno task migrate alternating leave the policy jobs alone", async (t, db) => {
  const env = { DATABASE_URL: db.schema.url, ...CONFIGURED };
  const options = timescaleOptionsOf(loadStorageConfig(env));
  const sql = db.raw();
  await db.open({ timescale: options });
  const before = await jobSettings(sql, db.schema.name);
  const schedule = () =>
    sql<{ job_id: number; next_start: Date }[]>`
      SELECT job_id, next_start FROM timescaledb_information.jobs
      WHERE job_id IN ${sql(before.map((j) => j.job_id))} ORDER BY job_id`;
  const started = await schedule();

  await t.step("the CLI after the gateway changes nothing", async () => {
    const run = await task("migrate", [], env);
    assert.equal(run.code, 0, run.stderr);
    assert.deepEqual(JSON.parse(run.stdout).applied, []);
    assert.deepEqual(await jobSettings(sql, db.schema.name), before);
    assert.deepEqual(await schedule(), started);
  });

  await t.step("a job spelled differently (an older CLI) is left as it is", async () => {
    const refresh = before.find((j) => j.proc_name === "policy_refresh_continuous_aggregate")!;
    await sql`SELECT alter_job(${refresh.job_id}, config => ${
      sql.json({ ...refresh.config, start_offset: "2678400 seconds" })
    })`;
    const changed = await jobSettings(sql, db.schema.name);
    const store = await db.open({ timescale: options });
    assert.equal(store.timescale, true);
    assert.deepEqual(await jobSettings(sql, db.schema.name), changed);
  });

  await t.step("a changed setting alters the same job in place", async () => {
    const run = await task("migrate", [], { ...env, READING_MAX_AGE: "10d" });
    assert.equal(run.code, 0, run.stderr);
    assert.deepEqual(JSON.parse(run.stdout).applied, ["timescale/policy/refresh"]);
    const after = await jobSettings(sql, db.schema.name);
    assert.deepEqual(after.map((j) => j.job_id), before.map((j) => j.job_id));
    const refresh = after.find((j) => j.proc_name === "policy_refresh_continuous_aggregate")!;
    assert.deepEqual(await sameIntervals(sql, [[refresh.config.start_offset, "11 days"]]), [true]);
  });
}, { timescale: true });

// ---- point 5: the gateway logs how its store was set up ------------------------------------

pgTest("the gateway's log says how the database was set up", async (_t, db) => {
  const lines: { msg: string; migration?: string }[] = [];
  const logger = jsonLogger("info", { sink: (line) => lines.push(JSON.parse(line)) });
  const gw = await startTestGateway({
    logger,
    env: {
      DATABASE_URL: db.schema.url,
      JWT_SECRET,
      DEVICE_KEY_ENCRYPTION_KEY: KEK_HEX,
      DATABASE_POOL_MAX: "2",
    },
  });
  try {
    const msgs = lines.map((l) => l.msg);
    assert.ok(
      msgs.includes(timescaleHere ? "storage mode: TimescaleDB" : "storage mode: plain PostgreSQL"),
      JSON.stringify(msgs),
    );
    assert.ok(
      lines.some((l) => l.msg === "migration applied" && l.migration === "0005_bounded_probe.sql"),
    );
    const ready = await gw.request("GET", "/readyz");
    assert.equal(ready.status, 200);
    if (timescaleHere) assert.equal(ready.body.checks.timescale_jobs, "ok");
  } finally {
    await gw.close();
  }
});

// ---- point 6: historical loads -------------------------------------------------------------

pgTest(
  "deno task stats:refresh on plain PostgreSQL says there is nothing to do",
  async (_t, db) => {
    await db.open({ timescale: false });
    const run = await task("stats:refresh", [
      "--from",
      "2026-01-01",
      "--to",
      "2026-02-01",
    ], { DATABASE_URL: db.schema.url, TIMESCALE_ENABLED: "false" });
    assert.equal(run.code, 0, run.stderr);
    assert.equal(JSON.parse(run.stdout).timescale, false);
    const bad = await task("stats:refresh", ["--from", "2026-02-01", "--to", "2026-01-01"], {
      DATABASE_URL: db.schema.url,
    });
    assert.equal(bad.code, 2);
    assert.match(bad.stderr, /--from must be before --to/);
  },
);

pgTest(
  "a historical load older than the refresh window reaches the stats through stats:refresh",
  async (t, db) => {
    const store = await db.open();
    const sql = db.raw();
    const hour = Math.floor((Date.now() - 40 * DAY) / HOUR) * HOUR;
    // The aggregate's watermark is the end of its newest materialised bucket: a recent reading
    // moves it past the hours loaded below, as months of traffic would.
    await store.insertReadings([reading("m-now", Date.now() - 3 * HOUR)]);
    await store.refreshHourlyStats(Date.now() - 60 * DAY, Date.now() - 2 * HOUR);
    await sql`
    INSERT INTO meter_readings (meter_id, reading_timestamp, kwh_amount, user_id, key_id,
                                device_signature, source, submitted_at)
    SELECT 'm-hist', ${new Date(hour)}::timestamptz + g * interval '15 minutes', 2, 'u1', 'k1',
           'sig', 'batch', now()
    FROM generate_series(0, 3) AS g`;

    await t.step("until refreshed, the aggregate does not know them", async () => {
      assert.deepEqual(await store.hourlyStats("m-hist", hour, hour + HOUR), []);
    });

    await t.step("after stats:refresh over the range they are counted", async () => {
      const run = await task("stats:refresh", [
        "--from",
        new Date(hour - DAY).toISOString(),
        "--to",
        new Date(hour + DAY).toISOString(),
        "--slice",
        "1",
      ], { DATABASE_URL: db.schema.url });
      assert.equal(run.code, 0, run.stderr);
      assert.deepEqual(JSON.parse(run.stdout).slices, 2);
      const [stat] = await store.hourlyStats("m-hist", hour, hour + HOUR);
      assert.equal(stat.count, 4);
      assert.equal(stat.sum_kwh, 8);
    });
  },
  { timescale: true },
);

pgTest("the first materialisation is recorded only once it succeeded", async (t, db) => {
  const sql = db.raw();
  const step = "timescale/0004_backfill_hourly_stats";
  await migrate(sql);
  // As on a database where the first materialisation never happened: readings, no record.
  await sql`DELETE FROM schema_migrations WHERE name = ${step}`;
  const last = Math.floor(Date.now() / HOUR) * HOUR - 40 * DAY;
  await loadHistory(sql, "m-pre", 8, last);
  const [mat] = await sql<{ name: string }[]>`
    SELECT format('%I.%I', materialization_hypertable_schema, materialization_hypertable_name)
      AS name
    FROM timescaledb_information.continuous_aggregates WHERE view_schema = ${db.schema.name}`;
  // The refresh waits for this lock until lock_timeout: the step fails.
  const blocker = postgres(db.schema.url, { max: 1, onnotice: () => {} });
  const released = Promise.withResolvers<void>();
  const locked = Promise.withResolvers<void>();
  const holding = blocker.begin(async (tx) => {
    await tx.unsafe(`LOCK TABLE ${mat.name} IN ACCESS EXCLUSIVE MODE`);
    locked.resolve();
    await released.promise;
  });
  const lines: { msg: string; migration?: string }[] = [];
  try {
    await locked.promise;
    const url = new URL(db.schema.url);
    url.searchParams.set("lock_timeout", "500");
    const first = await withSql(url.href, (s) =>
      migrate(s, {
        logger: jsonLogger("warn", { sink: (line) => lines.push(JSON.parse(line)) }),
      }));
    await t.step("a failed run leaves it unrecorded and says so", async () => {
      assert.ok(!first.applied.includes(step), JSON.stringify(first.applied));
      assert.ok(lines.some((l) => l.migration === step), JSON.stringify(lines));
      const [{ n }] = await sql<{ n: number }[]>`
        SELECT count(*)::int AS n FROM schema_migrations WHERE name = ${step}`;
      assert.equal(n, 0);
    });
  } finally {
    released.resolve();
    await holding;
    await blocker.end({ timeout: 5 });
  }

  await t.step("the next run does it, and the old hours are counted", async () => {
    const again = await migrate(sql);
    assert.ok(again.applied.includes(step), JSON.stringify(again.applied));
    const store = await db.open({ migrate: false });
    const stats = await store.hourlyStats("m-pre", last - DAY, last + HOUR);
    assert.equal(stats.reduce((n, s) => n + s.count, 0), 8);
  });
}, { timescale: true });

// ---- point 8: TimescaleDB installed but not preloaded --------------------------------------

Deno.test("shared_preload_libraries is read the way PostgreSQL lists libraries", () => {
  assert.equal(preloads("timescaledb"), true);
  assert.equal(preloads("pg_stat_statements, timescaledb"), true);
  assert.equal(preloads('"$libdir/timescaledb"'), true);
  assert.equal(preloads("timescaledb-2.29.2"), true);
  assert.equal(preloads(""), false);
  assert.equal(preloads("pg_stat_statements"), false);
  assert.equal(preloads("timescaledb_toolkit"), false);
  // Not readable by this role: let CREATE EXTENSION try (and report its own error).
  assert.equal(preloads(null), true);
});

pgTest("the test helper and the migration agree on what this server offers", async (_t, db) => {
  const sql = db.raw();
  const seen = await timescaleAvailability(sql);
  const [row] = await sql<{ offered: boolean; libs: string }[]>`
    SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb') AS offered,
           current_setting('shared_preload_libraries') AS libs`;
  if (!row.offered) assert.equal(seen, "absent");
  else if (!preloads(row.libs)) assert.equal(seen, "not_preloaded");
  else assert.equal(seen, "created"); // createTestSchema created it in public
  const result = await migrate(sql);
  assert.equal(result.timescale, (seen as string) === "created");
});

// ---- point 9: lookups stay in the store's schema -------------------------------------------

pgTest(
  "a store sees only its own schema, whatever lies further down the search_path",
  async (t, db) => {
    // `db.schema` plays `public`: a complete gateway schema, with TimescaleDB where available.
    const behind = db.raw();
    await migrate(behind);
    await behind`INSERT INTO meter_readings (meter_id, reading_timestamp, kwh_amount, user_id,
                 key_id, device_signature, source, submitted_at)
               VALUES ('m-behind', now() - interval '1 hour', 1, 'u', 'k', 's', 'mqtt', now())`;
    const front = await createTestSchema(PG_URL);
    try {
      const url = new URL(front.url);
      url.searchParams.set("search_path", `${front.name},${db.schema.name},public`);

      await t.step(
        "without migrations, an empty schema is refused, not served from behind",
        async () => {
          await assert.rejects(
            PostgresStore.connect(url.href, { dedupeWindowMs: WINDOW, migrate: false, max: 1 }),
            (error: unknown) => error instanceof GatewayError && error.code === "unavailable",
          );
        },
      );

      await t.step(
        "migrated plain, it neither reports nor reads the other's aggregate",
        async () => {
          const store = await PostgresStore.connect(url.href, {
            dedupeWindowMs: WINDOW,
            max: 1,
            timescale: false,
          });
          try {
            assert.equal(store.timescale, false);
            const from = Date.now() - DAY;
            assert.deepEqual(await store.hourlyStats("m-behind", from, Date.now() + HOUR), []);
            assert.equal((await store.listReadings({ limit: 10, order: "asc" })).items.length, 0);
            assert.deepEqual(await store.insertReadings([reading("m-front", Date.now() - HOUR)]), [
              { status: "stored", seq: 1 },
            ]);
          } finally {
            await store.close();
          }
          const [{ n }] = await behind<{ n: number }[]>`
        SELECT count(*)::int AS n FROM meter_readings`;
          assert.equal(n, 1);
        },
      );
    } finally {
      await front.drop();
    }
  },
);

// ---- point 10: teardown with running jobs --------------------------------------------------

pgTest("a schema whose policy jobs are running is dropped with its jobs", async () => {
  for (let round = 0; round < 3; round++) {
    const schema = await createTestSchema(PG_URL);
    let dropped = false;
    try {
      const store = await PostgresStore.connect(schema.url, { dedupeWindowMs: WINDOW, max: 1 });
      await store.insertReadings([reading("m-job", Date.now() - HOUR)]);
      await store.close();
      await withSql(schema.url, async (sql) => {
        const jobs = await jobSettings(sql, schema.name);
        for (const job of jobs) {
          await sql`SELECT alter_job(${job.job_id}, schedule_interval => interval '1 second',
                                     next_start => now())`;
        }
        // Wait until a run has started, so the drop races a running job (the scheduler has no
        // event to await).
        await within(
          (async () => {
            for (;;) {
              const [{ runs }] = await sql<{ runs: number }[]>`
                SELECT coalesce(sum(total_runs), 0)::int AS runs
                FROM timescaledb_information.job_stats
                WHERE job_id IN ${sql(jobs.map((j) => j.job_id))}`;
              if (runs > 0) return;
              await new Promise((resolve) => setTimeout(resolve, 50));
            }
          })(),
          "a policy job run",
          20_000,
        );
      });
      await dropTestSchema(PG_URL, schema.name);
      dropped = true;
      await withSql(PG_URL, async (sql) => {
        assert.deepEqual([...await jobSettings(sql, schema.name)], []);
        const [{ n }] = await sql<{ n: number }[]>`
          SELECT count(*)::int AS n FROM pg_namespace WHERE nspname = ${schema.name}`;
        assert.equal(n, 0);
      });
    } finally {
      if (!dropped) await schema.drop();
    }
  }
}, { timescale: true });

// ---- point 11: smaller ---------------------------------------------------------------------

pgTest(
  "an edited migration file known to be equivalent raises no warning; others do",
  async (_t, db) => {
    const sql = db.raw();
    await migrate(sql, { timescale: false });
    const warnings: string[] = [];
    const logger = jsonLogger("warn", { sink: (line) => warnings.push(JSON.parse(line).msg) });
    await sql`UPDATE schema_migrations SET checksum =
    '6674099aef48237524f051633ed0d7ebf60f233fa240a3bfa63c182baa9327e9'
    WHERE name = '0002_hourly_index_only.sql'`;
    await migrate(sql, { timescale: false, logger });
    assert.deepEqual(warnings, []);
    await sql`UPDATE schema_migrations SET checksum = 'edited' WHERE name = '0003_insert_function.sql'`;
    await migrate(sql, { timescale: false, logger });
    assert.deepEqual(warnings, ["applied migration file has changed since"]);
  },
);

pgTest(
  "the primary key carries kwh_amount for index-only hourly sums in every mode",
  async (_t, db) => {
    const sql = db.raw();
    await migrate(sql);
    const [{ def }] = await sql<{ def: string }[]>`
    SELECT pg_get_indexdef(format('%I.meter_readings_pkey', current_schema())::regclass) AS def`;
    assert.match(def, /\(meter_id, reading_timestamp\) INCLUDE \(kwh_amount\)/);
  },
);

pgTest("a changed chunk interval is applied to the hypertable", async (_t, db) => {
  const sql = db.raw();
  const interval = async () => {
    const [{ i }] = await sql<{ i: string }[]>`
      SELECT time_interval::text AS i FROM timescaledb_information.dimensions
      WHERE hypertable_schema = ${db.schema.name} AND hypertable_name = 'meter_readings'`;
    return i;
  };
  await migrate(sql, { timescale: { chunkIntervalMs: DAY } });
  assert.deepEqual(await sameIntervals(sql, [[await interval(), "1 day"]]), [true]);
  const result = await migrate(sql, { timescale: { chunkIntervalMs: 7 * DAY } });
  assert.ok(result.applied.includes("timescale/chunk_interval"));
  assert.deepEqual(await sameIntervals(sql, [[await interval(), "7 days"]]), [true]);
}, { timescale: true });

// ---- review findings -----------------------------------------------------------------------

Deno.test({
  name: `a role that may not read shared_preload_libraries still migrates${skipped}`,
  ignore: !service.ok,
  async fn() {
    const role = `gw_role_${crypto.randomUUID().replaceAll("-", "").slice(0, 12)}`;
    const schema = await createTestSchema(PG_URL);
    await withSql(PG_URL, (sql) =>
      sql.unsafe(`CREATE ROLE ${role} LOGIN;
                  GRANT USAGE, CREATE ON SCHEMA "${schema.name}" TO ${role}`));
    try {
      await withSql(schema.url, async (sql) => {
        await sql.unsafe(`SET ROLE ${role}`);
        await assert.rejects(sql`SELECT current_setting('shared_preload_libraries')`);
        const result = await migrate(sql);
        assert.ok(result.applied.includes("0005_bounded_probe.sql"));
      });
    } finally {
      await schema.drop();
      await withSql(PG_URL, (sql) => sql.unsafe(`DROP OWNED BY ${role}; DROP ROLE ${role}`));
    }
  },
});

Deno.test("storage settings that contradict each other stop the start, naming the variables", () => {
  for (const load of [loadStorageConfig, (env: Record<string, string>) => loadConfig(env)]) {
    assert.throws(
      () => load({ READING_MAX_AGE: "30d", READINGS_RETENTION: "30d" }),
      /READING_MAX_AGE: must be shorter than READINGS_RETENTION/,
    );
    assert.throws(() => load({ TIMESCALE_CHUNK_INTERVAL: "0" }), /TIMESCALE_CHUNK_INTERVAL/);
    assert.throws(() => load({ READINGS_RETENTION: "0s" }), /READINGS_RETENTION/);
  }
});

pgTest(
  "hours the live refresh policy no longer covers are summed from raw rows",
  async (_t, db) => {
    const lines: { msg: string }[] = [];
    const logger = jsonLogger("warn", { sink: (line) => lines.push(JSON.parse(line)) });
    // The policy was set for READING_MAX_AGE=30d; this instance runs with the default 7d.
    await db.open({ timescale: { refreshStartOffsetMs: 31 * DAY } });
    const store = await db.open({
      migrate: false,
      timescale: { refreshStartOffsetMs: 8 * DAY },
      logger,
    });
    assert.equal(lines.length, 0, JSON.stringify(lines));
    const hour = Math.floor((Date.now() - 20 * DAY) / HOUR) * HOUR;
    await store.insertReadings([reading("m-wide", Date.now() - 3 * HOUR)]);
    await store.refreshHourlyStats(Date.now() - 40 * DAY, Date.now() - 2 * HOUR);
    await store.insertReadings([reading("m-wide", hour)]);
    const [stat] = await store.hourlyStats("m-wide", hour, hour + HOUR);
    assert.equal(stat?.count, 1);
    // And the other way round: a policy narrower than wanted is reported.
    await db.open({ migrate: true, timescale: { refreshStartOffsetMs: 2 * DAY } });
    await db.open({ migrate: false, timescale: { refreshStartOffsetMs: 8 * DAY }, logger });
    assert.ok(lines.some((l) => l.msg.startsWith("the hourly stats refresh policy looks back")));
  },
  { timescale: true },
);
