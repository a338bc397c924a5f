-- Hourly stats read one meter's readings by primary key. Carrying kwh_amount in the key lets
-- them be index-only scans instead of one heap page per reading (measured at 10M rows on plain
-- PostgreSQL: p95 25.6 ms -> 7.4 ms; inserts ~5-12% slower). The file migrations run before the
-- TimescaleDB setup, so a hypertable is created with this key too, and keeps it: TimescaleDB
-- sums the recent hours, where late readings may still land, from raw rows the same way.
ALTER TABLE meter_readings
  DROP CONSTRAINT meter_readings_pkey,
  ADD CONSTRAINT meter_readings_pkey PRIMARY KEY (meter_id, reading_timestamp)
    INCLUDE (kwh_amount);
