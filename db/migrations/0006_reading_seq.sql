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
--   * Candidates are numbered last_seq + row_number() per meter, in input order, and last_seq
--     moves by the number of candidates, in the same statement as the insert.
--   * ON CONFLICT DO NOTHING can then only skip a row that a writer outside this protocol (one
--     that took no meter lock) inserted meanwhile; its number would be a hole. Every input row
--     is answered exactly once otherwise, so a short answer means a skip: the function raises
--     serialization_failure, the transaction rolls back, and insertReadings runs it again (the
--     probe then finds that row and reports it).
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
  v_answered int8;
BEGIN
  SELECT timestamptz 'epoch' + min(t) * interval '1 millisecond' - p_window,
         timestamptz 'epoch' + max(t) * interval '1 millisecond' + p_window
    INTO v_lo, v_hi
    FROM unnest(p_ts_ms) AS t;

  PERFORM gateway_lock_meters(p_meters);

  -- A fresh snapshot, taken after the locks were granted: it sees every earlier writer of
  -- these meters, their readings and their last_seq.
  RETURN QUERY
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
    SELECT i.ord, h.hit
    FROM input i
    CROSS JOIN LATERAL gateway_nearest_reading(i.meter_id, i.ts, p_window, v_lo, v_hi) h
  ),
  candidates AS (
    SELECT DISTINCT ON (i.meter_id, i.ts) i.*
    FROM input i
    WHERE NOT EXISTS (SELECT 1 FROM hits h WHERE h.ord = i.ord)
    ORDER BY i.meter_id, i.ts, i.ord
  ),
  numbered AS (
    SELECT c.*, m.last_seq + row_number() OVER (PARTITION BY c.meter_id ORDER BY c.ord) AS seq
    FROM candidates c JOIN reading_meters m ON m.meter_id = c.meter_id
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
  bumped AS (
    UPDATE reading_meters m SET last_seq = n.top
    FROM (SELECT meter_id, max(seq) AS top FROM numbered GROUP BY meter_id) n
    -- The ANY bound gives the planner the primary key: without it, misled by the CTE's row
    -- estimate, it read all of reading_meters for each batch (4 ms at 20 000 meters, growing).
    WHERE m.meter_id = n.meter_id AND m.meter_id = ANY (p_meters)
    RETURNING 1
  )
  SELECT h.ord, (extract(epoch FROM h.hit) * 1000)::float8, NULL::int8 FROM hits h
  UNION ALL
  -- A later row of the call with the natural key of a candidate: a duplicate of it.
  SELECT i.ord, i.ts_ms::float8, NULL::int8 FROM input i
  WHERE NOT EXISTS (SELECT 1 FROM hits h WHERE h.ord = i.ord)
    AND NOT EXISTS (SELECT 1 FROM candidates c WHERE c.ord = i.ord)
  UNION ALL
  -- Only when every candidate was inserted (else the answer is short, see above).
  SELECT n.ord, NULL::float8, n.seq FROM numbered n
  WHERE (SELECT count(*) FROM inserted) = (SELECT count(*) FROM numbered);

  GET DIAGNOSTICS v_answered = ROW_COUNT;
  IF v_answered <> cardinality(p_meter_id) THEN
    RAISE EXCEPTION 'a reading of this batch was inserted concurrently without a meter lock'
      USING ERRCODE = 'serialization_failure';
  END IF;
END
$$;
