-- The duplicate-window probe with time bounds the planner can see (DESIGN.md §7, rule 3).
--
-- Migration 0003 bounded the probe only by row comparisons on (meter_id, reading_timestamp),
-- to keep the planner on the primary key. PostgreSQL's btree does not end a scan on such a
-- comparison next to `meter_id = ...`: each probe read the meter's history from its start
-- bound to the meter's newest reading, so a backfill into a long history read it all, and
-- TimescaleDB could exclude no chunk, so every probe visited every chunk (2.1-2.3 s per
-- 1 000 rows at 365 chunks). Combined with scalar bounds, the row comparisons made it worse
-- (measured: the scan then started at the meter's oldest reading). The probe now has only
-- scalar bounds, both of them ends of the primary key's range for `meter_id = p_meter`:
--   * per row, p_ts +- p_window;
--   * per batch, p_lo and p_hi (the earliest reading minus the window, the latest plus the
--     window): constants of the statement, so TimescaleDB excludes at plan time every chunk
--     the batch cannot collide with.
-- With the meter fixed by equality, the primary key stays the cheaper path (checked on a year
-- of 200 meters' 15-minute readings: 4-6 buffers per probe, at the newest end and mid-history).
-- tests/postgres_production_test.ts checks the plan.

CREATE FUNCTION gateway_nearest_reading(
  p_meter text, p_ts timestamptz, p_window interval, p_lo timestamptz, p_hi timestamptz
)
RETURNS TABLE (hit timestamptz)
LANGUAGE sql STABLE
AS $$
  SELECT m.reading_timestamp FROM meter_readings m
  WHERE m.meter_id = p_meter
    AND m.reading_timestamp > p_ts - p_window
    AND m.reading_timestamp < p_ts + p_window
    AND m.reading_timestamp > p_lo
    AND m.reading_timestamp < p_hi
  ORDER BY abs(extract(epoch FROM m.reading_timestamp - p_ts)), m.reading_timestamp
  LIMIT 1
$$;

-- Same signature and results as in 0003 (an instance of the previous release keeps working
-- during a rolling upgrade); only the probe is bounded. The bounds are PL/pgSQL variables:
-- with plan_cache_mode = force_custom_plan each statement is planned with their values as
-- constants, which is what lets TimescaleDB exclude chunks while planning. The previous
-- three-argument probe stays for an instance of the previous release during the upgrade.
CREATE OR REPLACE FUNCTION gateway_insert_readings(
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
RETURNS TABLE (ord int4, conflict_ts float8)
LANGUAGE plpgsql VOLATILE
SET plan_cache_mode = force_custom_plan
SET jit = off
AS $$
#variable_conflict use_column
DECLARE
  v_lo timestamptz;
  v_hi timestamptz;
BEGIN
  SELECT timestamptz 'epoch' + min(t) * interval '1 millisecond' - p_window,
         timestamptz 'epoch' + max(t) * interval '1 millisecond' + p_window
    INTO v_lo, v_hi
    FROM unnest(p_ts_ms) AS t;

  PERFORM gateway_lock_meters(p_meters);

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
  inserted AS (
    INSERT INTO meter_readings (meter_id, reading_timestamp, kwh_amount, user_id,
      wallet_address, key_id, device_signature, source, submitted_at, minted)
    SELECT i.meter_id, i.ts, i.kwh_e4 * 0.0001, i.user_id, i.wallet_address, i.key_id,
           i.device_signature, i.source,
           timestamptz 'epoch' + i.submitted_ms * interval '1 millisecond', i.minted
    FROM input i
    WHERE NOT EXISTS (SELECT 1 FROM hits h WHERE h.ord = i.ord)
    ON CONFLICT DO NOTHING
    RETURNING meter_id, reading_timestamp
  )
  SELECT h.ord, (extract(epoch FROM h.hit) * 1000)::float8 FROM hits h
  UNION ALL
  SELECT i.ord, i.ts_ms::float8 FROM input i
  WHERE NOT EXISTS (SELECT 1 FROM hits h WHERE h.ord = i.ord)
    AND NOT EXISTS (
      SELECT 1 FROM inserted x WHERE x.meter_id = i.meter_id AND x.reading_timestamp = i.ts
    );
END
$$;
