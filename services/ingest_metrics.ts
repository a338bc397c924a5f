// The reading-path metrics of the platform plan, counted where readings enter (MQTT, HTTP,
// batch) and where they are decided (the registry). Labels are bounded sets: source, error
// code, result; never a meter id (100k meters would be 100k series: see README "Metrics").
import type { Metrics } from "../core/metrics.ts";
import type { Outcome } from "../core/outcome.ts";
import type { Submission } from "../actors/meter_actor.ts";
import type { VerifyResult } from "../actors/registry.ts";
import type { ReadingSource } from "../core/reading.ts";
import type { ReadingCounters } from "../core/reading_counters.ts";

/** Codes that are the gateway's state, not the reading's: retried, never a validation error. */
const TRANSIENT = new Set(["unavailable", "overloaded", "internal"]);

/** Seconds from submission to outcome: an accepted reading waits for its commit (~10–50 ms). */
const PROCESSING_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5];
/** Seconds of a signature check: HMAC ~5 µs, Ed25519 ~50 µs. */
const VERIFY_BUCKETS = [0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.005, 0.01];

/** Label sets allocated once: the hot path passes these, never a fresh object per reading. */
const SOURCE: Record<string, { source: string }> = {
  mqtt: { source: "mqtt" },
  http: { source: "http" },
  batch: { source: "batch" },
};
const RESULT: Record<VerifyResult, { result: VerifyResult }> = {
  valid: { result: "valid" },
  invalid: { result: "invalid" },
  expired: { result: "expired" },
};
const KIND = { reading: { kind: "reading" }, connect: { kind: "connect" } } as const;

/** Declares the reading-path families on `metrics` and counts into them. */
export class IngestMetrics implements ReadingCounters {
  #m: Metrics;
  #on: boolean;

  /** With `enabled` false only `gateway_readings_total` counts (benchmarks of the overhead). */
  constructor(metrics: Metrics, enabled = true) {
    this.#m = metrics;
    this.#on = enabled;
    metrics.counter("meter_readings_submitted_total", "Readings received, by source");
    metrics.counter(
      "meter_readings_validation_errors_total",
      "Readings refused for their content or sender (not duplicates, not transient), by code",
    );
    metrics.histogram(
      "meter_readings_processing_duration_seconds",
      "From a reading's submission to its actor's final answer (commit included), by source",
      PROCESSING_BUCKETS,
    );
    metrics.counter("gateway_readings_total", "Readings by source and final outcome");
    metrics.counter(
      "device_signature_verifications_total",
      "Device signature checks of readings and MQTT CONNECT credentials, by result",
    );
    metrics.histogram(
      "device_authentication_duration_seconds",
      "Duration of an actor's decision that checked a signature, by kind (reading, connect)",
      VERIFY_BUCKETS,
    );
  }

  submitted(source: ReadingSource, n = 1): void {
    if (this.#on) this.#m.inc("meter_readings_submitted_total", SOURCE[source], n);
  }

  rejected(_source: ReadingSource, code: string): void {
    if (this.#on) this.#m.inc("meter_readings_validation_errors_total", { error_type: code });
  }

  /** The registry's answer for one submission (retries of transient answers included). */
  outcome(msg: Submission, outcome: Outcome, seconds: number): void {
    const m = this.#m;
    const code = outcome.status === "rejected" ? outcome.code : outcome.status;
    m.inc("gateway_readings_total", { source: msg.source, outcome: code });
    if (!this.#on) return;
    m.observe("meter_readings_processing_duration_seconds", SOURCE[msg.source], seconds);
    if (outcome.status === "rejected" && !TRANSIENT.has(outcome.code)) {
      m.inc("meter_readings_validation_errors_total", { error_type: outcome.code });
    }
  }

  /** One signature check. */
  verified(kind: "reading" | "connect", result: VerifyResult, seconds: number): void {
    if (!this.#on) return;
    this.#m.inc("device_signature_verifications_total", RESULT[result]);
    this.#m.observe("device_authentication_duration_seconds", KIND[kind], seconds);
  }
}
