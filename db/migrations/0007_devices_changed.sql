-- Devices by the time they last changed: an instance cut off from the bus (Redis) re-checks the
-- devices changed since its outage began (DEVICE_RECHECK_INTERVAL), so that a revocation
-- published meanwhile is not missed (services/device_recheck.ts).
CREATE INDEX devices_updated_idx ON devices (updated_at);
