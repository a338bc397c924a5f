import type { Bus } from "../bus/bus.ts";
import type { Clock } from "../core/clock.ts";
import type { Logger } from "../core/logger.ts";
import type { Store } from "../db/store.ts";

/** Options of {@linkcode DeviceRecheck}. */
export interface DeviceRecheckOptions {
  bus: Bus;
  store: Pick<Store, "devicesChangedSince">;
  clock: Clock;
  logger: Logger;
  /** How often devices are re-checked while the bus is down (`DEVICE_RECHECK_INTERVAL`). */
  intervalMs: number;
  /** Called for each device changed while the bus was down (reload its actor, kick it). */
  onChanged: (meterId: string, status: "active" | "revoked") => void;
}

// Clocks of instances differ, and an update commits a little after it read its time: changes
// stamped up to this long before the outage began are looked at too.
const SKEW_MARGIN_MS = 60_000;

/**
 * Revocations must not be missed while an instance is cut off from the bus (Redis pub/sub is
 * at most once): while it is down, and once when it is back, devices changed since the outage
 * began are read from the store and their live actors reloaded.
 */
export class DeviceRecheck {
  #o: DeviceRecheckOptions;
  #since: number | null = null;
  #seen = new Map<string, number>();
  #timer: ReturnType<typeof setInterval> | undefined;
  #running: Promise<void> | null = null;
  #stop: () => void;
  /** Devices reloaded because of a recheck (tests, metrics). */
  reloaded = 0;

  constructor(options: DeviceRecheckOptions) {
    this.#o = options;
    this.#stop = options.bus.onConnectionChange((up) => up ? this.#recovered() : this.#lost());
  }

  #lost(): void {
    // Lost again while the check after the last outage runs: that outage's start still holds.
    this.#since ??= this.#o.clock.now() - SKEW_MARGIN_MS;
    this.#timer ??= setInterval(() => this.check(), this.#o.intervalMs);
  }

  #recovered(): void {
    if (this.#since === null) return;
    clearInterval(this.#timer);
    this.#timer = undefined;
    // Events published before the resubscription completed are lost: look once more.
    this.check().finally(() => {
      if (this.#timer === undefined) {
        this.#since = null;
        this.#seen.clear();
      }
    });
  }

  /** Reloads every device changed since the outage began (each change once). */
  check(): Promise<void> {
    const since = this.#since;
    if (since === null) return Promise.resolve();
    this.#running ??= (async () => {
      try {
        const changed = await this.#o.store.devicesChangedSince(since);
        for (const device of changed) {
          if (this.#seen.get(device.meter_id) === device.updated_at) continue;
          this.#seen.set(device.meter_id, device.updated_at);
          this.reloaded++;
          this.#o.onChanged(device.meter_id, device.status);
        }
      } catch (error) {
        this.#o.logger.warn("device recheck failed; retrying at the next interval", { error });
      } finally {
        this.#running = null;
      }
    })();
    return this.#running;
  }

  /** Stops watching the bus and clears the timer. */
  async close(): Promise<void> {
    this.#stop();
    clearInterval(this.#timer);
    this.#timer = undefined;
    await this.#running;
  }
}
