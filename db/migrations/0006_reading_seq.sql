-- Per-meter resume sequence (DESIGN.md §10: resume positions `<meter>@<seq>`).
--
-- Every reading stored from this release on gets `seq`, its number among its meter's stored
-- readings: dense (1, 2, 3, ...) and commit-ordered. Both follow from the meter's
-- reading_meters row lock, which every insert takes (0003) and holds to commit: the next
-- number is `last_seq + 1` of the locked row, so two transactions of one meter number their
-- rows one after the other, and the later one cannot commit before the earlier is visible.
-- A reader that sees seq = k therefore already sees 1 .. k - 1.
--
-- Rows stored by older releases keep seq NULL (no backfill: numbering them would need every
-- meter's history locked and rewritten). They are not part of any resume position, and a
-- meter's numbering starts at 1 with its first reading stored by this release. An instance of
-- the previous release still writes through gateway_insert_readings during a rolling upgrade:
-- its rows get seq NULL and do not move last_seq, so the numbering stays dense.
--
-- Both column additions are catalog-only (a NULL column, a constant default). The index build
-- reads meter_readings once while it holds off writers; it indexes no old row (partial: NULL
-- seqs are left out), and a non-unique index is allowed on a TimescaleDB hypertable.

ALTER TABLE reading_meters ADD COLUMN last_seq bigint NOT NULL DEFAULT 0;
-- Every batch now writes a new version of each of its meters' rows: room on the page lets
-- those be HOT updates (last_seq is in no index). Applies to pages filled from now on.
ALTER TABLE reading_meters SET (fillfactor = 50);

ALTER TABLE meter_readings ADD COLUMN seq bigint;

-- readingsAfter: one meter's readings past a position, in seq order.
CREATE INDEX meter_readings_seq_idx ON meter_readings (meter_id, seq) WHERE seq IS NOT NULL;

-- Like gateway_insert_readings (0005: same locks in the same order, same bounded probe, which
-- stays for instances of the previous release), and numbers what it stores: returns one row per
-- input row, `seq` for a stored row, `conflict_ts` for a duplicate.
--   * Rows of the call with the same natural key: the first (by ord) is a candidate, the others
--     are duplicates of it (0005 reported both as stored).
--   * Candidates are numbered last_seq + 1, + 2, ... per meter, in input order.
--   * ON CONFLICT DO NOTHING can then only skip a row that a writer outside this protocol (one
--     that took no meter lock) inserted meanwhile; its number would be a hole. Every input row
--     is answered exactly once otherwise, so a short answer means a skip: the function raises
--     serialization_failure, the transaction rolls back, and insertReadings runs it again (the
--     probe then finds that row and reports it).
-- Cost (docs/BENCHMARKS.md, "Resume sequence cost"). A first version did it all in one
-- statement after the locks (probe, numbering by a window over the de-duplicated rows, insert,
-- then an UPDATE of last_seq joined to reading_meters); a 1 000-row batch took ~45% longer
-- than 0005's. Now:
--   1. The lock statement allocates: ON CONFLICT DO UPDATE moves last_seq on by the meter's
--      number of rows in the call (an upper bound) and returns it, so locking and the one write
--      of the meter row are a single step, in p_meters order. With the lock held to commit no
--      one sees the bound; where fewer rows were stored, last_seq is set back before the end.
--   2. The probe is a statement of its own (a fresh snapshot, after the locks), so that:
--   3. usually (no stored neighbour, one row per meter) each row is simply its meter's
--      base + 1: no de-duplication, no window, no sort. Otherwise the general statement.
-- What remains is the seq index (about one sixth of a batch's database time, measured) and
-- the HOT update of each meter's row.
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
  p_window interval
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
             u.submitted_ms, u.minted, b.base + 1 AS seq
      FROM unnest(p_meter_id, p_ts_ms, p_kwh_e4, p_user_id, p_wallet_address, p_key_id,
                  p_device_signature, p_source, p_submitted_ms, p_minted)
        WITH ORDINALITY AS u(meter_id, ts_ms, kwh_e4, user_id, wallet_address, key_id,
                             device_signature, source, submitted_ms, minted, ord)
      JOIN unnest(v_meter, v_base) AS b(meter_id, base) ON b.meter_id = u.meter_id
    ),
    inserted AS (
      INSERT INTO meter_readings (meter_id, reading_timestamp, kwh_amount, user_id,
        wallet_address, key_id, device_signature, source, submitted_at, minted, seq)
      SELECT i.meter_id, i.ts, i.kwh_e4 * 0.0001, i.user_id, i.wallet_address, i.key_id,
             i.device_signature, i.source,
             timestamptz 'epoch' + i.submitted_ms * interval '1 millisecond', i.minted, i.seq
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
           u.submitted_ms, u.minted
    FROM unnest(p_meter_id, p_ts_ms, p_kwh_e4, p_user_id, p_wallet_address, p_key_id,
                p_device_signature, p_source, p_submitted_ms, p_minted)
      WITH ORDINALITY AS u(meter_id, ts_ms, kwh_e4, user_id, wallet_address, key_id,
                           device_signature, source, submitted_ms, minted, ord)
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
      wallet_address, key_id, device_signature, source, submitted_at, minted, seq)
    SELECT n.meter_id, n.ts, n.kwh_e4 * 0.0001, n.user_id, n.wallet_address, n.key_id,
           n.device_signature, n.source,
           timestamptz 'epoch' + n.submitted_ms * interval '1 millisecond', n.minted, n.seq
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
