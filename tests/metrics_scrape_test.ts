// A scripted workload against a running gateway, then one scrape of /metrics: each metric of
// the platform plan is there with exactly the values the workload implies (issue 14).
import assert from "node:assert/strict";
import { isoAgo, signedReading, startTestGateway } from "./_gateway.ts";

/** Parses the exposition text into `name{labels}` → value (labels as rendered). */
function parse(text: string): Map<string, number> {
  const samples = new Map<string, number>();
  for (const line of text.split("\n")) {
    if (line === "" || line.startsWith("#")) continue;
    const at = line.lastIndexOf(" ");
    samples.set(line.slice(0, at), Number(line.slice(at + 1)));
  }
  return samples;
}

/** The value of one series (0 when absent: a counter that never moved). */
function value(samples: Map<string, number>, series: string): number {
  return samples.get(series) ?? 0;
}

Deno.test("a scrape after a scripted workload shows the plan's metrics with exact values", async (t) => {
  await using gw = await startTestGateway({ env: { METRICS_TOKEN: "scrape-token-0123456789" } });
  const user = await gw.createUser("metrics@test.local");
  const meters = ["mx-1", "mx-2", "mx-3"];
  const secrets: Record<string, string> = {};
  for (const m of meters) secrets[m] = (await gw.registerMeter(m, user.id)).secret_hex;
  const revoked = await gw.registerMeter("mx-gone", user.id);
  assert.ok(revoked.secret_hex);
  assert.equal(
    (await gw.request("POST", "/api/admin/devices/mx-gone/revoke", { token: gw.adminToken }))
      .status,
    200,
  );

  // 10 good readings, 2 duplicates, 3 bad signatures, 4 invalid bodies, 1 out-of-range kWh.
  const t0 = Date.now();
  const submit = (body: unknown) =>
    gw.request("POST", "/api/meters/submit-reading", { token: user.token, body });
  for (let i = 0; i < 10; i++) {
    const m = meters[i % 3];
    const res = await submit(
      signedReading(m, secrets[m], isoAgo(4 * 3_600_000 - i * 20 * 60_000, t0)),
    );
    assert.equal(res.status, 201, JSON.stringify(res.body));
  }
  for (let i = 0; i < 2; i++) {
    const res = await submit(
      signedReading(meters[0], secrets[meters[0]], isoAgo(4 * 3_600_000, t0)),
    );
    assert.equal(res.status, 409, JSON.stringify(res.body));
  }
  for (let i = 0; i < 3; i++) {
    const body = signedReading(meters[1], secrets[meters[1]], isoAgo(100_000 + i * 1000, t0));
    body.device_signature = "AAAA" + String(body.device_signature).slice(4);
    assert.equal((await submit(body)).status, 401);
  }
  for (const body of [{}, { meter_id: "mx-1" }, { kwh_amount: "x" }, []]) {
    assert.equal((await submit(body)).status, 400);
  }
  assert.equal(
    (await submit(signedReading(meters[2], secrets[meters[2]], isoAgo(50_000, t0), "1000000")))
      .status,
    422,
  );

  // WebSocket: one client connected, one refused for a bad token.
  const ws = new WebSocket(`${gw.url.replace("http", "ws")}/ws?token=${user.token}`);
  await new Promise<void>((resolve, reject) => {
    ws.onopen = () => resolve();
    ws.onerror = () => reject(new Error("websocket failed"));
  });
  const bad = new WebSocket(`${gw.url.replace("http", "ws")}/ws?token=nope`);
  await new Promise<void>((resolve) => {
    bad.onerror = () => {};
    bad.onclose = () => resolve();
  });

  const scrape = async (token?: string) =>
    await fetch(`${gw.url}/metrics`, {
      headers: token ? { authorization: `Bearer ${token}` } : {},
    });

  await t.step("METRICS_TOKEN guards /metrics", async () => {
    const denied = await scrape();
    assert.equal(denied.status, 401);
    await denied.body?.cancel();
    const wrong = await scrape("scrape-token-0123456780");
    assert.equal(wrong.status, 401);
    await wrong.body?.cancel();
  });

  const res = await scrape("scrape-token-0123456789");
  assert.equal(res.status, 200);
  const text = await res.text();
  const s = parse(text);

  await t.step("readings submitted, validation errors by type, processing durations", () => {
    assert.equal(value(s, 'meter_readings_submitted_total{source="http"}'), 20);
    assert.equal(
      value(s, 'meter_readings_validation_errors_total{error_type="invalid_payload"}'),
      4,
    );
    assert.equal(
      value(s, 'meter_readings_validation_errors_total{error_type="bad_signature"}'),
      3,
    );
    assert.equal(
      value(s, 'meter_readings_validation_errors_total{error_type="kwh_out_of_range"}'),
      1,
    );
    // 16 reached their actors (10 + 2 + 3 + 1); the 4 invalid bodies did not.
    assert.equal(value(s, 'meter_readings_processing_duration_seconds_count{source="http"}'), 16);
    assert.equal(
      value(s, 'meter_readings_processing_duration_seconds_bucket{source="http",le="+Inf"}'),
      16,
    );
    assert.equal(value(s, 'gateway_readings_total{source="http",outcome="accepted"}'), 10);
    assert.equal(value(s, 'gateway_readings_total{source="http",outcome="duplicate"}'), 2);
  });

  await t.step("signature checks by result, with their durations", () => {
    // 10 accepted and 2 duplicates verified first; the kWh refusal came before the check.
    assert.equal(value(s, 'device_signature_verifications_total{result="valid"}'), 12);
    assert.equal(value(s, 'device_signature_verifications_total{result="invalid"}'), 3);
    assert.equal(value(s, 'device_authentication_duration_seconds_count{kind="reading"}'), 15);
  });

  await t.step("device keys registered and revoked", () => {
    assert.equal(value(s, "device_keys_registered_total"), 4);
    assert.equal(value(s, "device_keys_revoked_total"), 1);
  });

  await t.step("WebSocket clients, attempts and failures; HTTP durations by route", () => {
    assert.equal(value(s, "websocket_clients_connected"), 1);
    assert.equal(value(s, "websocket_connection_attempts_total"), 2);
    assert.equal(value(s, 'websocket_connection_failures_total{reason="unauthorized"}'), 1);
    assert.equal(
      value(
        s,
        'http_request_duration_seconds_count{method="POST",route="/api/meters/submit-reading",status="201"}',
      ),
      10,
    );
    assert.equal(
      value(
        s,
        'http_request_duration_seconds_count{method="POST",route="/api/meters/submit-reading",status="400"}',
      ),
      4,
    );
  });

  await t.step("every family of the plan is declared, histograms included", () => {
    for (
      const name of [
        "meter_readings_submitted_total",
        "meter_readings_validation_errors_total",
        "meter_readings_processing_duration_seconds",
        "mqtt_messages_received_total",
        "mqtt_connection_errors_total",
        "device_signature_verifications_total",
        "device_authentication_duration_seconds",
        "device_keys_registered_total",
        "device_keys_revoked_total",
        "websocket_clients_connected",
        "websocket_messages_sent_total",
        "redis_pubsub_messages_total",
        "websocket_broadcast_duration_seconds",
        "batch_jobs_submitted_total",
        "batch_jobs_completed_total",
        "batch_processing_duration_seconds",
        "batch_readings_per_job",
        "cache_hits_total",
        "cache_misses_total",
        "cache_invalidations_total",
        "cache_operation_duration_seconds",
        "gateway_actors_live",
        "gateway_actor_activations_total",
        "gateway_actor_passivations_total",
        "gateway_mailbox_overflows_total",
        "gateway_writer_queue",
        "gateway_writer_batch_size",
        "gateway_writer_flush_duration_seconds",
        "http_request_duration_seconds",
        "mqtt_broker_connected",
      ]
    ) {
      assert.match(text, new RegExp(`^# TYPE ${name} `, "m"), name);
    }
    assert.match(text, /^# TYPE meter_readings_processing_duration_seconds histogram$/m);
    assert.equal(value(s, "gateway_actor_activations_total"), 3, "one per meter that submitted");
  });

  await t.step("no label carries a meter id", () => {
    for (const m of [...meters, "mx-gone"]) assert.ok(!text.includes(m), m);
  });

  await t.step("the per-meter view is the admin top-N, not a label", async () => {
    const res = await gw.request("GET", "/api/admin/metrics/top-meters?n=2", {
      token: gw.adminToken,
    });
    assert.equal(res.status, 200, JSON.stringify(res.body));
    // mx-1 stored 4 of the 10 (i = 0, 3, 6, 9), mx-2 and mx-3 three each.
    assert.deepEqual(
      res.body.items.map((m: { meter_id: string; stored: number }) => [m.meter_id, m.stored]),
      [["mx-1", 4], ["mx-2", 3]],
    );
    const denied = await gw.request("GET", "/api/admin/metrics/top-meters", { token: user.token });
    assert.equal(denied.status, 403);
  });

  ws.close();
  await new Promise((resolve) => ws.onclose = resolve);
});
