-- Durable batch jobs (DESIGN.md §11): a bulk submission is stored with its readings before it
-- is acknowledged, then run by whichever instance claims it (a lease, kept by heartbeats and
-- taken over once it runs out), retried after transient failures, dead-lettered when its
-- attempts are exhausted.
--
-- The batch_jobs table of 0001 was a placeholder that no release ever wrote: it is replaced.
DROP TABLE batch_jobs;

CREATE TABLE batch_jobs (
  id              text COLLATE "C" PRIMARY KEY,
  user_id         text COLLATE "C" NOT NULL,
  status          text NOT NULL
                  CHECK (status IN ('queued', 'running', 'completed', 'failed', 'dead')),
  -- The submission's Idempotency-Key, and the SHA-256 (hex) of its body: a resubmission with
  -- the key finds this job, and a different body under the same key is refused by the API.
  idempotency_key text,
  body_sha256     text NOT NULL,
  total_submitted integer NOT NULL CHECK (total_submitted >= 0),
  successful      integer NOT NULL DEFAULT 0 CHECK (successful >= 0),
  failed          integer NOT NULL DEFAULT 0 CHECK (failed >= 0),
  duplicates      integer NOT NULL DEFAULT 0 CHECK (duplicates >= 0),
  -- BatchItemError[] (core/batch.ts), as the API reports them.
  errors          jsonb NOT NULL DEFAULT '[]' CHECK (jsonb_typeof(errors) = 'array'),
  -- Attempts started (a claim starts one), and why the last one failed transiently.
  attempts        integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
  last_error      text,
  created_at      timestamptz NOT NULL,
  started_at      timestamptz,
  finished_at     timestamptz,
  updated_at      timestamptz NOT NULL,
  -- Earliest claim (backoff after a transient failure).
  run_after       timestamptz NOT NULL,
  -- The runner holding a running job, and until when.
  lease_owner     text,
  lease_until     timestamptz
);

-- Idempotency: concurrent submissions with one key make one job (INSERT ... ON CONFLICT DO
-- NOTHING waits for the other insert's transaction, then the SELECT finds its job).
CREATE UNIQUE INDEX batch_jobs_idempotency_key
  ON batch_jobs (user_id, idempotency_key) WHERE idempotency_key IS NOT NULL;
-- Claiming: the live jobs (queued or running, few) in age order; finished ones, the bulk of
-- the table until they are purged, are not in it.
CREATE INDEX batch_jobs_claim_idx ON batch_jobs (created_at, id)
  WHERE status IN ('queued', 'running');
-- Listings, newest first: all, one user's, one status's.
CREATE INDEX batch_jobs_created_idx ON batch_jobs (created_at, id);
CREATE INDEX batch_jobs_user_idx ON batch_jobs (user_id, created_at, id);
CREATE INDEX batch_jobs_status_idx ON batch_jobs (status, created_at, id);
-- Purging finished jobs by age.
CREATE INDEX batch_jobs_finished_idx ON batch_jobs (finished_at)
  WHERE status IN ('completed', 'failed', 'dead');

-- A job's readings as submitted, in chunks of consecutive readings (JSON arrays), written in
-- the job's transaction. json, not jsonb: kept as the exact text, never queried into, and any
-- JSON string is accepted (jsonb refuses \u0000).
CREATE TABLE batch_job_items (
  job_id   text COLLATE "C" NOT NULL REFERENCES batch_jobs (id) ON DELETE CASCADE,
  chunk_no integer NOT NULL CHECK (chunk_no >= 0),
  items    json NOT NULL,
  PRIMARY KEY (job_id, chunk_no)
);

-- The job that stored a reading (source 'batch'); NULL for every other reading. Adding a NULL
-- column is catalog-only (also on a compressed hypertable).
ALTER TABLE meter_readings ADD COLUMN batch_job_id text COLLATE "C";

-- readingsOfBatchJob: a re-run of a job finds what it stored before. Partial: readings of
-- other sources, the vast majority, are not indexed, and cost the insert only the predicate.
CREATE INDEX meter_readings_batch_idx ON meter_readings (batch_job_id)
  WHERE batch_job_id IS NOT NULL;

-- gateway_insert_readings_seq of 0006 with one more argument, the rows' batch jobs (an array
-- of NULLs, or NULL itself, for rows of no job). Otherwise the same: same locks in the same
-- order, same probe, same numbering. The 0006 version stays for instances of the previous
-- release during a rolling upgrade; their rows have no batch job.
CREATE FUNCTION gateway_insert_readings_seq(
  p_meters text[],
  p_meter_id text[],
  p_ts_ms int8[],
  p_kwh_e4 int8[],
  p_user_id text[],
  p_wallet_address text[],
  p_key_id text[],
  p_device_signature text[],
  p_source text[],
  p_submitted_ms int8[],
  p_minted bool[],
  p_window interval,
  p_batch_job_id text[]
)
RETURNS TABLE (ord int4, conflict_ts float8, seq int8)
LANGUAGE plpgsql VOLATILE
SET plan_cache_mode = force_custom_plan
SET jit = off
AS $$
#variable_conflict use_column
DECLARE
  v_lo timestamptz;
  v_hi timestamptz;
  -- Per meter of the call: last_seq before it, rows of the call (both in allocation order).
  v_meter text[];
  v_base int8[];
  v_rows int8[];
  v_most int8;
  -- Rows with a stored neighbour within the window, and that neighbour (epoch ms).
  v_hit_ord int4[];
  v_hit_ts float8[];
  -- The general path's answer, and the meters whose allocation it did not use up.
  v_ans_ord int4[];
  v_ans_ts float8[];
  v_ans_seq int8[];
  v_fix_meter text[];
  v_fix_top int8[];
  v_answered int8;
BEGIN
  SELECT timestamptz 'epoch' + min(t) * interval '1 millisecond' - p_window,
         timestamptz 'epoch' + max(t) * interval '1 millisecond' + p_window
    INTO v_lo, v_hi
    FROM unnest(p_ts_ms) AS t;

  -- gateway_lock_meters' locks, taken in the same order, allocating as they lock.
  WITH counts AS (
    SELECT c.meter_id, count(*) AS n FROM unnest(p_meter_id) AS c(meter_id) GROUP BY c.meter_id
  ),
  allocated AS (
    INSERT INTO reading_meters AS m (meter_id, last_seq)
    SELECT u.meter_id, c.n
    FROM unnest(p_meters) WITH ORDINALITY AS u(meter_id, o)
    JOIN counts c ON c.meter_id = u.meter_id
    ORDER BY u.o
    ON CONFLICT (meter_id) DO UPDATE SET last_seq = m.last_seq + excluded.last_seq
    RETURNING m.meter_id, m.last_seq
  )
  SELECT array_agg(a.meter_id), array_agg(a.last_seq - c.n), array_agg(c.n), max(c.n)
    INTO v_meter, v_base, v_rows, v_most
    FROM allocated a JOIN counts c ON c.meter_id = a.meter_id;

  -- A fresh snapshot, taken after the locks were granted: it sees every earlier writer of
  -- these meters, their readings and their last_seq.
  WITH input AS (
    SELECT u.ord::int4 AS ord, u.meter_id,
           timestamptz 'epoch' + u.ts_ms * interval '1 millisecond' AS ts
    FROM unnest(p_meter_id, p_ts_ms) WITH ORDINALITY AS u(meter_id, ts_ms, ord)
  )
  SELECT array_agg(i.ord), array_agg((extract(epoch FROM h.hit) * 1000)::float8)
    INTO v_hit_ord, v_hit_ts
    FROM input i
    CROSS JOIN LATERAL gateway_nearest_reading(i.meter_id, i.ts, p_window, v_lo, v_hi) h;

  IF v_hit_ord IS NULL AND v_most = 1 THEN
    -- One row per meter, none a duplicate: each is its meter's base + 1, as allocated.
    RETURN QUERY
    WITH input AS (
      SELECT u.ord::int4 AS ord, u.meter_id,
             timestamptz 'epoch' + u.ts_ms * interval '1 millisecond' AS ts,
             u.kwh_e4, u.user_id, u.wallet_address, u.key_id, u.device_signature, u.source,
             u.submitted_ms, u.minted, u.batch_job_id, b.base + 1 AS seq
      FROM unnest(p_meter_id, p_ts_ms, p_kwh_e4, p_user_id, p_wallet_address, p_key_id,
                  p_device_signature, p_source, p_submitted_ms, p_minted, p_batch_job_id)
        WITH ORDINALITY AS u(meter_id, ts_ms, kwh_e4, user_id, wallet_address, key_id,
                             device_signature, source, submitted_ms, minted, batch_job_id,
                             ord)
      JOIN unnest(v_meter, v_base) AS b(meter_id, base) ON b.meter_id = u.meter_id
    ),
    inserted AS (
      INSERT INTO meter_readings (meter_id, reading_timestamp, kwh_amount, user_id,
        wallet_address, key_id, device_signature, source, submitted_at, minted, seq,
        batch_job_id)
      SELECT i.meter_id, i.ts, i.kwh_e4 * 0.0001, i.user_id, i.wallet_address, i.key_id,
             i.device_signature, i.source,
             timestamptz 'epoch' + i.submitted_ms * interval '1 millisecond', i.minted, i.seq,
             i.batch_job_id
      FROM input i
      ON CONFLICT DO NOTHING
      RETURNING 1
    )
    -- Only when every row was inserted (else the answer is short, see above).
    SELECT i.ord, NULL::float8, i.seq FROM input i
    WHERE (SELECT count(*) FROM inserted) = (SELECT count(*) FROM input);
    GET DIAGNOSTICS v_answered = ROW_COUNT;
    IF v_answered <> cardinality(p_meter_id) THEN
      RAISE EXCEPTION 'a reading of this batch was inserted concurrently without a meter lock'
        USING ERRCODE = 'serialization_failure';
    END IF;
    RETURN;
  END IF;

  WITH input AS (
    SELECT u.ord::int4 AS ord, u.meter_id, u.ts_ms,
           timestamptz 'epoch' + u.ts_ms * interval '1 millisecond' AS ts,
           u.kwh_e4, u.user_id, u.wallet_address, u.key_id, u.device_signature, u.source,
           u.submitted_ms, u.minted, u.batch_job_id
    FROM unnest(p_meter_id, p_ts_ms, p_kwh_e4, p_user_id, p_wallet_address, p_key_id,
                p_device_signature, p_source, p_submitted_ms, p_minted, p_batch_job_id)
      WITH ORDINALITY AS u(meter_id, ts_ms, kwh_e4, user_id, wallet_address, key_id,
                           device_signature, source, submitted_ms, minted, batch_job_id, ord)
  ),
  hits AS (
    SELECT h.ord, h.conflict_ts FROM unnest(v_hit_ord, v_hit_ts) AS h(ord, conflict_ts)
  ),
  candidates AS (
    SELECT DISTINCT ON (i.meter_id, i.ts) i.*
    FROM input i
    WHERE NOT EXISTS (SELECT 1 FROM hits h WHERE h.ord = i.ord)
    ORDER BY i.meter_id, i.ts, i.ord
  ),
  numbered AS (
    SELECT c.*, b.base + row_number() OVER (PARTITION BY c.meter_id ORDER BY c.ord) AS seq
    FROM candidates c JOIN unnest(v_meter, v_base) AS b(meter_id, base)
      ON b.meter_id = c.meter_id
  ),
  inserted AS (
    INSERT INTO meter_readings (meter_id, reading_timestamp, kwh_amount, user_id,
      wallet_address, key_id, device_signature, source, submitted_at, minted, seq,
      batch_job_id)
    SELECT n.meter_id, n.ts, n.kwh_e4 * 0.0001, n.user_id, n.wallet_address, n.key_id,
           n.device_signature, n.source,
           timestamptz 'epoch' + n.submitted_ms * interval '1 millisecond', n.minted, n.seq,
           n.batch_job_id
    FROM numbered n
    ON CONFLICT DO NOTHING
    RETURNING 1
  ),
  answers AS (
    SELECT h.ord, h.conflict_ts, NULL::int8 AS seq FROM hits h
    UNION ALL
    -- A later row of the call with the natural key of a candidate: a duplicate of it.
    SELECT i.ord, i.ts_ms::float8, NULL::int8 FROM input i
    WHERE NOT EXISTS (SELECT 1 FROM hits h WHERE h.ord = i.ord)
      AND NOT EXISTS (SELECT 1 FROM candidates c WHERE c.ord = i.ord)
    UNION ALL
    -- Only when every candidate was inserted (else the answer is short, see above).
    SELECT n.ord, NULL::float8, n.seq FROM numbered n
    WHERE (SELECT count(*) FROM inserted) = (SELECT count(*) FROM numbered)
  ),
  -- Meters that numbered fewer rows than step 1 allocated, and their last number given (the
  -- base for a meter whose rows were all duplicates).
  fixes AS (
    SELECT b.meter_id, b.base + coalesce(n.used, 0) AS top
    FROM unnest(v_meter, v_base, v_rows) AS b(meter_id, base, allocated)
    LEFT JOIN (SELECT meter_id, count(*) AS used FROM numbered GROUP BY meter_id) n
      ON n.meter_id = b.meter_id
    WHERE b.allocated <> coalesce(n.used, 0)
  )
  SELECT a.ords, a.conflicts, a.seqs, f.meters, f.tops
    INTO v_ans_ord, v_ans_ts, v_ans_seq, v_fix_meter, v_fix_top
    FROM (SELECT array_agg(ord) AS ords, array_agg(conflict_ts) AS conflicts,
                 array_agg(seq) AS seqs FROM answers) a,
         (SELECT array_agg(meter_id) AS meters, array_agg(top) AS tops FROM fixes) f;
  v_answered := coalesce(cardinality(v_ans_ord), 0);

  IF v_answered <> cardinality(p_meter_id) THEN
    RAISE EXCEPTION 'a reading of this batch was inserted concurrently without a meter lock'
      USING ERRCODE = 'serialization_failure';
  END IF;
  IF v_fix_meter IS NOT NULL THEN
    -- A statement of its own, over the meters concerned only (usually few: the planner then
    -- takes the primary key).
    UPDATE reading_meters m SET last_seq = f.top
    FROM unnest(v_fix_meter, v_fix_top) AS f(meter_id, top)
    WHERE m.meter_id = f.meter_id;
  END IF;
  RETURN QUERY SELECT a.ord, a.conflict_ts, a.seq
    FROM unnest(v_ans_ord, v_ans_ts, v_ans_seq) AS a(ord, conflict_ts, seq);
END
$$;
