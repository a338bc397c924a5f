-- GridTokenX Meter Gateway: base schema (DESIGN.md §3, §7).
--
-- Applied by db/migrate.ts in one transaction, into the first schema of the search_path.
-- Identifiers that are sorted or paged on use COLLATE "C": byte order, the same on every
-- server whatever its locale, and the order the Deno KV adapter pages in.
-- Instants are timestamptz; the Store port speaks epoch milliseconds and converts.

CREATE TABLE users (
  id             text COLLATE "C" PRIMARY KEY,
  -- Lower-cased by the API before it gets here.
  email          text NOT NULL,
  role           text NOT NULL CHECK (role IN ('admin', 'operator', 'user')),
  wallet_address text,
  password_hash  text NOT NULL,
  created_at     timestamptz NOT NULL,
  CONSTRAINT users_email_key UNIQUE (email)
);

-- A device and its keys. Keys are a JSONB array of StoredKey (core/device.ts): they are only
-- ever read and replaced together with their device (rotation, revocation), so one row keeps
-- every change atomic without a join; fleet-wide key queries can still use
-- jsonb_array_elements(keys).
-- user_id has no foreign key: devices may be imported before their owners' accounts exist.
CREATE TABLE devices (
  meter_id   text COLLATE "C" PRIMARY KEY,
  user_id    text COLLATE "C" NOT NULL,
  status     text NOT NULL CHECK (status IN ('active', 'revoked')),
  created_at timestamptz NOT NULL,
  updated_at timestamptz NOT NULL,
  revoked_at timestamptz,
  keys       jsonb NOT NULL DEFAULT '[]' CHECK (jsonb_typeof(keys) = 'array')
);

CREATE INDEX devices_user_idx ON devices (user_id, meter_id);

-- Append-only log of provisioning, rotation and revocation (listed oldest first).
CREATE TABLE device_audit (
  id       text COLLATE "C" PRIMARY KEY,
  meter_id text COLLATE "C" NOT NULL,
  action   text NOT NULL CHECK (action IN ('registered', 'rotated', 'revoked')),
  -- User id, or 'cli' for operator commands.
  actor    text NOT NULL,
  at       timestamptz NOT NULL,
  key_id   text,
  note     text
);

CREATE INDEX device_audit_meter_idx ON device_audit (meter_id, at, id);
CREATE INDEX device_audit_at_idx ON device_audit (at, id);

-- Every accepted reading, stored exactly once: the natural key is the primary key, so a
-- redelivery can only ever be reported as a duplicate.
CREATE TABLE meter_readings (
  meter_id          text COLLATE "C" NOT NULL,
  reading_timestamp timestamptz NOT NULL,
  -- At most 4 decimals are stored (rule 1); the port speaks kWh × 10 000 as an integer.
  kwh_amount        numeric(12, 4) NOT NULL CHECK (kwh_amount >= 0),
  -- Owner at the time the reading was accepted.
  user_id           text COLLATE "C" NOT NULL,
  wallet_address    text,
  key_id            text NOT NULL,
  device_signature  text NOT NULL,
  source            text NOT NULL CHECK (source IN ('mqtt', 'http', 'batch')),
  submitted_at      timestamptz NOT NULL,
  minted            boolean NOT NULL DEFAULT false,
  -- Set by the minting worker (later issue); null until a mint is attempted.
  mint_id           text,
  mint_status       text CHECK (mint_status IN ('pending', 'submitted', 'confirmed', 'failed')),
  mint_tx           text,
  minted_at         timestamptz,
  PRIMARY KEY (meter_id, reading_timestamp)
);

-- An owner's readings in (time, meter) order: the per-user listing and stats.
CREATE INDEX meter_readings_user_idx ON meter_readings (user_id, reading_timestamp, meter_id);
-- All readings in (time, meter) order: the admin listing, and retention deletes by age.
CREATE INDEX meter_readings_time_idx ON meter_readings (reading_timestamp, meter_id);

-- One row per meter that has readings. insertReadings locks the rows of a batch's meters
-- (INSERT ... ON CONFLICT DO UPDATE ... WHERE false, in meter_id order) before it looks for
-- stored neighbours, which makes "check the dedupe window, then insert" atomic per meter
-- across connections and gateway instances. Row locks live in the tuples, not in the shared
-- lock table, so a batch of 10 000 meters cannot exhaust max_locks_per_transaction the way
-- 10 000 advisory locks would. See db/postgres_store.ts.
CREATE TABLE reading_meters (
  meter_id text COLLATE "C" PRIMARY KEY
);

-- Batch imports (later issue): progress of one uploaded file.
CREATE TABLE batch_jobs (
  id          text COLLATE "C" PRIMARY KEY,
  user_id     text COLLATE "C" NOT NULL,
  status      text NOT NULL CHECK (status IN ('queued', 'running', 'done', 'failed')),
  total       integer NOT NULL DEFAULT 0 CHECK (total >= 0),
  accepted    integer NOT NULL DEFAULT 0 CHECK (accepted >= 0),
  rejected    integer NOT NULL DEFAULT 0 CHECK (rejected >= 0),
  -- Per-row outcomes of rejected rows, as the API reports them.
  errors      jsonb NOT NULL DEFAULT '[]',
  error       text,
  created_at  timestamptz NOT NULL,
  updated_at  timestamptz NOT NULL,
  finished_at timestamptz
);

CREATE INDEX batch_jobs_user_idx ON batch_jobs (user_id, created_at);

-- Token mints (later issue): one mint covers many readings (meter_readings.mint_id).
CREATE TABLE mints (
  id             text COLLATE "C" PRIMARY KEY,
  user_id        text COLLATE "C" NOT NULL,
  wallet_address text NOT NULL,
  status         text NOT NULL CHECK (status IN ('pending', 'submitted', 'confirmed', 'failed')),
  kwh_amount     numeric(16, 4) NOT NULL CHECK (kwh_amount >= 0),
  reading_count  integer NOT NULL CHECK (reading_count >= 0),
  tx_signature   text,
  error          text,
  created_at     timestamptz NOT NULL,
  updated_at     timestamptz NOT NULL
);

CREATE INDEX mints_user_idx ON mints (user_id, created_at);
CREATE INDEX mints_status_idx ON mints (status, created_at);

-- Readings of one mint (partial: unminted readings, the vast majority, are not indexed).
CREATE INDEX meter_readings_mint_idx ON meter_readings (mint_id) WHERE mint_id IS NOT NULL;
