-- Rights that end when taken away (issue #10): an account can be disabled, and every change of
-- its rights or credentials bumps token_generation; access tokens carry the generation they were
-- issued under and older ones are refused.
ALTER TABLE users
  ADD COLUMN disabled         boolean NOT NULL DEFAULT false,
  ADD COLUMN token_generation integer NOT NULL DEFAULT 0 CHECK (token_generation >= 0);

-- The last-admin rule looks for another enabled admin.
CREATE INDEX users_active_admins_idx ON users (id) WHERE role = 'admin' AND NOT disabled;
