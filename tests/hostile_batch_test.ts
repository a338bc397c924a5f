// Hostile review of batch ingestion (routes/batches.ts, core/batch.ts, services/batch_runner.ts,
// the stores' batch methods): a hostile authenticated user and an anonymous client against a real
// gateway (Deno KV, or PostgreSQL with GATEWAY_TEST_STORE=postgres).
//
// Each step is an attack; the ones a first review found to succeed (marked "was:") are fixed and
// now assert the fix.
import { equal, notEqual, ok } from "node:assert/strict";
import { isoAgo, signedReading, startTestGateway, type TestGateway } from "./_gateway.ts";

const ON_POSTGRES = Deno.env.get("GATEWAY_TEST_STORE") === "postgres";
const FINISHED = new Set(["completed", "failed", "dead"]);
const BATCH_PATH = "/api/meters/submit-readings-batch";

type Res = Awaited<ReturnType<TestGateway["request"]>>;

function postRaw(
  gw: TestGateway,
  token: string | undefined,
  raw: BodyInit,
  headers: Record<string, string> = {},
  query = "",
): Promise<Res> {
  return gw.request("POST", BATCH_PATH + query, {
    token,
    raw,
    headers: { "content-type": "application/json", ...headers },
  });
}

function submit(
  gw: TestGateway,
  token: string,
  readings: unknown[],
  headers: Record<string, string> = {},
  query = "",
): Promise<Res> {
  return gw.request("POST", BATCH_PATH + query, { token, body: { readings }, headers });
}

async function waitForJob(gw: TestGateway, token: string, id: string, deadlineMs = 60_000) {
  const deadline = Date.now() + deadlineMs;
  for (;;) {
    const res = await gw.request("GET", `/api/meters/batches/${id}`, { token });
    equal(res.status, 200, JSON.stringify(res.body));
    if (FINISHED.has(res.body.status)) return res.body;
    if (Date.now() > deadline) throw new Error(`job ${id} not finished: ${res.body.status}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** A raw HTTP/1.1 request over TCP, for what fetch will not send; the status line back. */
async function rawHttp(url: string, head: string, chunks: Uint8Array[] = []): Promise<string> {
  const { hostname, port } = new URL(url);
  const conn = await Deno.connect({ hostname, port: Number(port) });
  try {
    await conn.write(new TextEncoder().encode(head));
    for (const c of chunks) {
      try {
        await conn.write(c);
      } catch {
        break; // the server cut the body off: what we want to see
      }
    }
    const buf = new Uint8Array(64 * 1024);
    let text = "";
    const deadline = Date.now() + 10_000;
    while (!text.includes("\r\n\r\n") && Date.now() < deadline) {
      const n = await conn.read(buf).catch(() => null);
      if (n === null) break;
      text += new TextDecoder().decode(buf.subarray(0, n));
    }
    return text;
  } finally {
    try {
      conn.close();
    } catch { /* closed */ }
  }
}

Deno.test("hostile: batch envelope, body limits and hostile reading contents", async (t) => {
  await using gw = await startTestGateway();
  const mallory = await gw.createUser("mallory@hostile.test");
  const meter = await gw.registerMeter("hm-1", mallory.id);
  let slot = 0;
  // A fresh hour each time: never a duplicate of an earlier step's reading.
  const good = () => signedReading("hm-1", meter.secret_hex, isoAgo(++slot * 3_600_000));

  await t.step(
    "anonymous: no token, 401 before the body is read (even with a huge body)",
    async () => {
      const res = await postRaw(gw, undefined, JSON.stringify({ readings: ["x".repeat(600_000)] }));
      equal(res.status, 401);
      equal(res.body.error.code, "unauthorized");
    },
  );

  await t.step("a Content-Length over the batch limit: 413 before reading", async () => {
    const res = await postRaw(gw, mallory.token, "{" + " ".repeat(700_000) + "}");
    equal(res.status, 413);
    equal(res.body.error.code, "payload_too_large");
  });

  await t.step("a chunked body without Content-Length is cut off at the limit: 413", async () => {
    const piece = new TextEncoder().encode(" ".repeat(64 * 1024));
    const chunk = (b: Uint8Array) => {
      const head = new TextEncoder().encode(b.length.toString(16) + "\r\n");
      const out = new Uint8Array(head.length + b.length + 2);
      out.set(head);
      out.set(b, head.length);
      out.set([13, 10], head.length + b.length);
      return out;
    };
    const chunks = [chunk(new TextEncoder().encode('{"readings":['))];
    for (let i = 0; i < 20; i++) chunks.push(chunk(piece)); // 1.3 MB, over 640 KB
    const status = await rawHttp(
      gw.url,
      `POST ${BATCH_PATH} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${mallory.token}\r\n` +
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
      chunks,
    );
    ok(status.startsWith("HTTP/1.1 413"), status.slice(0, 200));
  });

  await t.step(
    "a body just under the limit is accepted (no off-by-one against the docs)",
    async () => {
      // BATCH_MAX_SIZE 1000 × 640 B = 640,000 bytes.
      const base = JSON.stringify({ readings: [good()] });
      const filler = 640_000 - base.length;
      const raw = base.slice(0, -1) + " ".repeat(filler) + "}";
      equal(new TextEncoder().encode(raw).length, 640_000);
      const res = await postRaw(gw, mallory.token, raw);
      equal(res.status, 202, JSON.stringify(res.body));
      const over = await postRaw(
        gw,
        mallory.token,
        base.slice(0, -1) + " ".repeat(filler + 1) + "}",
      );
      equal(over.status, 413);
    },
  );

  await t.step(
    "deeply nested arrays and objects (300k levels): 400, no stack overflow",
    async () => {
      for (
        const deep of [
          `{"readings":[${"[".repeat(300_000)}${"]".repeat(300_000)}]}`,
          `{"readings":[${'{"a":'.repeat(100_000)}1${"}".repeat(100_000)}]}`,
        ]
      ) {
        const res = await postRaw(gw, mallory.token, deep);
        equal(res.status, 400, JSON.stringify(res.body));
        equal(res.body.error.code, "invalid_payload");
      }
      // The gateway is still there.
      equal((await gw.request("GET", "/healthz")).status, 200);
    },
  );

  await t.step("non-object readings are refused by index with meter_id null", async () => {
    const res = await submit(gw, mallory.token, [good(), 1, "s", null, [], true, {}]);
    equal(res.status, 202);
    const job = await waitForJob(gw, mallory.token, res.body.job_id);
    equal(job.successful, 1);
    equal(job.failed, 6);
    for (const e of job.errors) {
      equal(e.code, "invalid_payload");
      equal(e.meter_id, null);
    }
  });

  await t.step("a NUL in an unknown key is stored as U+FFFD (no 500)", async () => {
    const g = JSON.stringify(good());
    const res = await postRaw(gw, mallory.token, `{"readings":[${g.slice(0, -1)},"x\\u0000y":1}]}`);
    equal(res.status, 202, JSON.stringify(res.body));
  });

  await t.step(
    "a lone surrogate in an unknown key is recorded as invalid_payload (was: 500 on PostgreSQL)",
    async () => {
      // zod's "Unrecognized key" message echoes the key, and jsonb refuses an unpaired surrogate:
      // stored messages are made well-formed (core/batch.ts storableMessage).
      const g = JSON.stringify(good());
      const res = await postRaw(gw, mallory.token, `{"readings":[${g.slice(0, -1)},"\\ud800":1}]}`);
      equal(
        res.status,
        202,
        `store=${ON_POSTGRES ? "postgres" : "kv"} ${JSON.stringify(res.body)}`,
      );
      const job = await waitForJob(gw, mallory.token, res.body.job_id);
      equal(job.errors[0].code, "invalid_payload");
    },
  );

  await t.step(
    "an unknown key's name is cut in the stored error message (was: copied whole, 200 KB)",
    async () => {
      // One reading with a 200 KB key name: the job's error message keeps 256 characters.
      const g = JSON.stringify(good());
      const key = "k".repeat(200_000);
      const res = await postRaw(gw, mallory.token, `{"readings":[${g.slice(0, -1)},"${key}":1}]}`);
      equal(res.status, 202);
      const job = await waitForJob(gw, mallory.token, res.body.job_id);
      ok(
        job.errors[0].message.length <= 256,
        `stored error message is ${job.errors[0].message.length} chars`,
      );
    },
  );

  await t.step("mode=sync over BATCH_SYNC_MAX is 400; a non-enum mode is 400", async () => {
    const many = Array.from({ length: 101 }, () => ({}));
    equal((await submit(gw, mallory.token, many, {}, "?mode=sync")).status, 400);
    equal((await submit(gw, mallory.token, [good()], {}, "?mode=SYNC")).status, 400);
  });

  await t.step("an envelope with extra fields, or readings not an array: 400", async () => {
    equal((await postRaw(gw, mallory.token, '{"readings":[{}],"user_id":"x"}')).status, 400);
    equal((await postRaw(gw, mallory.token, '{"readings":{"0":{}}}')).status, 400);
    equal((await postRaw(gw, mallory.token, '[{"readings":[{}]}]')).status, 400);
    equal((await postRaw(gw, mallory.token, "\xff\xfe")).status, 400);
  });
});

Deno.test("hostile: other users' meters, jobs and idempotency keys", async (t) => {
  await using gw = await startTestGateway();
  const alice = await gw.createUser("alice@hostile.test");
  const mallory = await gw.createUser("mallory@hostile.test");
  const am = await gw.registerMeter("ha-1", alice.id);
  const mm = await gw.registerMeter("hm-1", mallory.id);
  const ts = isoAgo(3_600_000);

  let aliceJob = "";
  let aliceBody: unknown[] = [];
  await t.step("alice submits a batch with an Idempotency-Key", async () => {
    aliceBody = [signedReading("ha-1", am.secret_hex, ts)];
    const res = await submit(gw, alice.token, aliceBody, { "idempotency-key": "shared-key" });
    equal(res.status, 202);
    aliceJob = res.body.job_id;
    await waitForJob(gw, alice.token, aliceJob);
  });

  await t.step("another user's meter and an unknown meter are refused identically", async () => {
    const res = await submit(gw, mallory.token, [
      signedReading("ha-1", am.secret_hex, isoAgo(7_200_000)), // alice's, validly signed
      signedReading("zz-none", am.secret_hex, isoAgo(7_200_000)), // unknown
      signedReading("hm-1", mm.secret_hex, isoAgo(7_200_000)), // own
    ]);
    equal(res.status, 202);
    const job = await waitForJob(gw, mallory.token, res.body.job_id);
    equal(job.successful, 1);
    const [a, b] = job.errors;
    equal(a.index, 0);
    equal(b.index, 1);
    equal(a.code, "forbidden");
    equal(b.code, "forbidden");
    equal(a.message.replace("ha-1", "M"), b.message.replace("zz-none", "M"));
    // And alice's reading was not stored.
    const readings = await gw.request("GET", "/api/meters/readings?meter_id=ha-1", {
      token: gw.adminToken,
    });
    equal(readings.body.items.length, 1);
  });

  await t.step(
    "mallory reusing alice's key with alice's exact body gets a new job of her own",
    async () => {
      const res = await submit(gw, mallory.token, aliceBody, { "idempotency-key": "shared-key" });
      equal(res.status, 202, JSON.stringify(res.body));
      notEqual(res.body.job_id, aliceJob);
      const job = await waitForJob(gw, mallory.token, res.body.job_id);
      equal(
        job.user_id,
        (await gw.request("GET", "/api/meters/batches", { token: mallory.token }))
          .body.items[0].user_id,
      );
      equal(job.errors[0].code, "forbidden");
    },
  );

  await t.step(
    "mallory reusing alice's key with another body: no 422 and no job id leak",
    async () => {
      const res = await submit(gw, mallory.token, [{}, {}], { "idempotency-key": "shared-key-2" });
      equal(res.status, 202);
      const other = await submit(gw, alice.token, [{}], { "idempotency-key": "shared-key-2" });
      equal(other.status, 202);
      ok(!JSON.stringify(other.body).includes(res.body.job_id));
    },
  );

  await t.step(
    "same user, same key, other body: 422 idempotency_mismatch naming her own job",
    async () => {
      const res = await submit(gw, alice.token, [{ x: 1 }], { "idempotency-key": "shared-key" });
      equal(res.status, 422);
      equal(res.body.error.code, "idempotency_mismatch");
      equal(res.body.error.details.job_id, aliceJob);
      // Same body with keys in another order: the same job (canonical hash).
      const r = aliceBody[0] as Record<string, unknown>;
      const reordered = Object.fromEntries(Object.entries(r).reverse());
      const again = await submit(gw, alice.token, [reordered], { "idempotency-key": "shared-key" });
      equal(again.status, 200);
      equal(again.body.job_id, aliceJob);
    },
  );

  await t.step("Idempotency-Key abuse: 129 chars, controls, non-ASCII are 400", async () => {
    equal(
      (await submit(gw, mallory.token, [{}], { "idempotency-key": "k".repeat(129) })).status,
      400,
    );
    equal(
      (await submit(gw, mallory.token, [{}], { "idempotency-key": "k".repeat(128) })).status,
      202,
    );
    const tab = await rawHttp(
      gw.url,
      `POST ${BATCH_PATH} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${mallory.token}\r\n` +
        'Content-Type: application/json\r\nIdempotency-Key: a\tb\r\nContent-Length: 16\r\n\r\n{"readings":[1]}',
    );
    ok(/^HTTP\/1.1 4\d\d/.test(tab), tab.slice(0, 100));
  });

  await t.step("GET another user's job: 404 exactly like an unknown id", async () => {
    const theirs = await gw.request("GET", `/api/meters/batches/${aliceJob}`, {
      token: mallory.token,
    });
    const unknown = await gw.request("GET", `/api/meters/batches/${crypto.randomUUID()}`, {
      token: mallory.token,
    });
    equal(theirs.status, 404);
    equal(unknown.status, 404);
    equal(JSON.stringify(theirs.body), JSON.stringify(unknown.body));
  });

  await t.step("job ids that are not UUIDs: 400/404, never 500", async () => {
    for (
      const id of [
        "x".repeat(65),
        "..",
        "%00",
        "a%0Ab",
        "%F0%9F%98%80",
        "' OR 1=1 --",
        "a".repeat(64),
        "__proto__",
      ]
    ) {
      const res = await gw.request("GET", `/api/meters/batches/${id}`, { token: mallory.token });
      ok([400, 404].includes(res.status), `${id}: ${res.status} ${JSON.stringify(res.body)}`);
    }
  });

  await t.step("listing: ?user_id=alice is 403; mallory's list holds only her jobs", async () => {
    const res = await gw.request("GET", `/api/meters/batches?user_id=${alice.id}`, {
      token: mallory.token,
    });
    equal(res.status, 403);
    const own = await gw.request("GET", "/api/meters/batches?limit=1000", { token: mallory.token });
    equal(own.status, 200);
    ok(own.body.items.length > 0);
    for (const j of own.body.items) notEqual(j.user_id, alice.id);
  });

  await t.step(
    "cursor tampering: a forged cursor pointing at alice's job shows nothing of hers",
    async () => {
      const enc = (parts: unknown) =>
        btoa(String.fromCharCode(...new TextEncoder().encode(JSON.stringify(parts)))).replaceAll(
          "+",
          "-",
        ).replaceAll("/", "_").replace(/=+$/, "");
      const far = Date.now() + 86_400_000;
      for (
        const cursor of [
          enc([far, aliceJob]),
          enc([far, "\uffff".repeat(200)]),
          enc([0, "x"]),
        ]
      ) {
        const res = await gw.request(
          "GET",
          `/api/meters/batches?cursor=${encodeURIComponent(cursor)}`,
          { token: mallory.token },
        );
        equal(res.status, 200, JSON.stringify(res.body));
        for (const j of res.body.items) notEqual(j.user_id, alice.id);
      }
    },
  );

  await t.step(
    "a forged cursor with an extreme date is 400 (was: 500 on PostgreSQL)",
    async () => {
      // Cursor dates are bounded to 1970–9999 like query dates (db/_cursor.ts validMs).
      const enc = (parts: unknown) =>
        btoa(JSON.stringify(parts)).replaceAll("+", "-").replaceAll("/", "_").replace(/=+$/, "");
      const got: string[] = [];
      for (
        const ms of [8.64e15, -8.64e15, -62_167_219_200_001, /* -0001-12-31 */ 253_402_300_800_000]
      ) {
        const res = await gw.request(
          "GET",
          `/api/meters/batches?cursor=${encodeURIComponent(enc([ms, "x"]))}`,
          { token: mallory.token },
        );
        got.push(`${ms}: ${res.status}`);
        // The same decoder (decodeMsKeyCursor) pages the readings listing.
        const readings = await gw.request(
          "GET",
          `/api/meters/readings?cursor=${encodeURIComponent(enc([ms, "hm-1"]))}`,
          { token: mallory.token },
        );
        got.push(`readings ${ms}: ${readings.status}`);
      }
      ok(got.every((g) => /: (200|400)$/.test(g)), got.join(", "));
    },
  );

  await t.step("malformed cursors are 400", async () => {
    const enc = (parts: unknown) =>
      btoa(JSON.stringify(parts)).replaceAll("+", "-").replaceAll("/", "_").replace(/=+$/, "");
    for (
      const cursor of [
        "!!",
        enc([1.5, "x"]),
        enc([9e15, "x"]),
        enc([1, "a\0b"]),
        enc({ a: 1 }),
        enc([1, 2]),
        "A".repeat(1025),
      ]
    ) {
      const res = await gw.request(
        "GET",
        `/api/meters/batches?cursor=${encodeURIComponent(cursor)}`,
        { token: mallory.token },
      );
      equal(res.status, 400, `${cursor.slice(0, 40)}: ${res.status} ${JSON.stringify(res.body)}`);
    }
  });

  await t.step("admin retry / purge / top-meters as a user: 403; anonymous: 401", async () => {
    for (const token of [mallory.token, undefined]) {
      const want = token ? 403 : 401;
      equal(
        (await gw.request("POST", `/api/admin/batches/${aliceJob}/retry`, { token })).status,
        want,
      );
      equal(
        (await gw.request("POST", "/api/admin/batches/purge", {
          token,
          body: { older_than: "0s" },
        })).status,
        want,
      );
      equal((await gw.request("GET", "/api/admin/metrics/top-meters", { token })).status, want);
    }
    // alice's job is still there.
    equal(
      (await gw.request("GET", `/api/meters/batches/${aliceJob}`, { token: alice.token })).status,
      200,
    );
  });

  await t.step("an operator is not an admin for batches either", async () => {
    const op = await gw.createUser("op@hostile.test", "operator");
    equal(
      (await gw.request("GET", `/api/meters/batches/${aliceJob}`, { token: op.token })).status,
      404,
    );
    equal(
      (await gw.request("POST", `/api/admin/batches/${aliceJob}/retry`, { token: op.token }))
        .status,
      403,
    );
    const res = await submit(gw, op.token, [signedReading("ha-1", am.secret_hex, isoAgo(9e6))]);
    const job = await waitForJob(gw, op.token, res.body.job_id);
    equal(job.errors[0]?.code, "forbidden");
  });
});

Deno.test("hostile: one user's job flood is bounded by BATCH_MAX_OPEN_PER_USER", async (t) => {
  await using gw = await startTestGateway({ env: { BATCH_WORKER_CONCURRENCY: "1" } });
  // No runner: every job stays queued, so the backlog is exactly what submissions leave.
  await gw.gateway.batches.close();
  const mallory = await gw.createUser("mallory@flood.test");
  const victim = await gw.createUser("victim@flood.test");
  const mm = await gw.registerMeter("fm-1", mallory.id);
  const vm = await gw.registerMeter("fv-1", victim.id);
  const FLOOD = 40;
  const QUOTA = 20; // the default BATCH_MAX_OPEN_PER_USER

  await t.step(
    `one user submitting ${FLOOD} jobs at once gets ${QUOTA}, the rest 429 (was: all ${FLOOD})`,
    async () => {
      const readings = Array.from({ length: 1000 }, (_, i) => ({
        ...signedReading("fm-1", mm.secret_hex, isoAgo((i + 1) * 60_000)),
        device_signature: "00".repeat(32),
      }));
      const results = await Promise.all(
        Array.from({ length: FLOOD }, () => submit(gw, mallory.token, readings)),
      );
      const accepted = results.filter((r) => r.status === 202);
      const refused = results.filter((r) => r.status === 429);
      equal(accepted.length, QUOTA, JSON.stringify(results.map((r) => r.status)));
      equal(refused.length, FLOOD - QUOTA);
      for (const r of refused) {
        equal(r.body.error.code, "rate_limited");
        equal(r.headers.get("retry-after"), "30");
      }
    },
  );

  await t.step("another account is not held by the flooder's quota", async () => {
    const res = await submit(gw, victim.token, [
      signedReading("fv-1", vm.secret_hex, isoAgo(60_000)),
    ]);
    equal(res.status, 202, JSON.stringify(res.body));
  });

  await t.step("a retry with the Idempotency-Key of an open job still gets it", async () => {
    const readings = [signedReading("fv-1", vm.secret_hex, isoAgo(120_000))];
    const first = await submit(gw, victim.token, readings, { "idempotency-key": "v-1" });
    equal(first.status, 202);
    for (let k = 0; k < QUOTA; k++) {
      await submit(gw, victim.token, [signedReading("fv-1", vm.secret_hex, isoAgo(k * 1e6))]);
    }
    const again = await submit(gw, victim.token, readings, { "idempotency-key": "v-1" });
    equal(again.status, 202, JSON.stringify(again.body));
    equal(again.body.job_id, first.body.job_id);
  });
});

Deno.test("hostile: ?mode=sync requests from one user are held open, not refused", async (t) => {
  await using gw = await startTestGateway({
    env: { BATCH_WORKER_CONCURRENCY: "1", HTTP_REQUEST_TIMEOUT: "8s" },
  });
  const mallory = await gw.createUser("mallory@sync.test");
  const mm = await gw.registerMeter("sm-1", mallory.id);
  await t.step("30 parallel sync batches: every one answered (200 or 202), none 5xx", async () => {
    const results = await Promise.all(Array.from({ length: 30 }, (_, k) =>
      submit(
        gw,
        mallory.token,
        Array.from({ length: 100 }, (_, i) => ({
          ...signedReading("sm-1", mm.secret_hex, isoAgo((k * 100 + i + 1) * 60_000)),
          device_signature: "00".repeat(32),
        })),
        {},
        "?mode=sync",
      )));
    const statuses = results.map((r) => r.status);
    console.log("sync statuses:", JSON.stringify(statuses));
    for (const s of statuses) ok(s === 200 || s === 202, String(s));
    equal((await gw.request("GET", "/healthz")).status, 200);
  });
});

Deno.test("hostile: a disabled admin's queued job does not run", async (t) => {
  await using gw = await startTestGateway({ env: { BATCH_WORKER_CONCURRENCY: "1" } });
  const alice = await gw.createUser("alice@disabled.test");
  const rogue = await gw.createUser("rogue-admin@disabled.test", "admin");
  const filler = await gw.createUser("filler@disabled.test");
  const am = await gw.registerMeter("da-1", alice.id);
  const fm = await gw.registerMeter("df-1", filler.id);

  await t.step(
    "a job of an admin disabled before it runs ends failed, storing nothing (was: stored)",
    async () => {
      // Keep the single runner slot busy so the rogue job is still queued when it is disabled.
      const junk = Array.from({ length: 1000 }, (_, i) => ({
        ...signedReading("df-1", fm.secret_hex, isoAgo((i + 1) * 60_000)),
        device_signature: "00".repeat(32),
      }));
      await Promise.all(Array.from({ length: 30 }, () => submit(gw, filler.token, junk)));
      // Validly signed readings of alice's meter (e.g. captured from the wire), submitted by the
      // admin: as an admin, the rights check at submission lets every meter through.
      const readings = Array.from(
        { length: 5 },
        (_, i) => signedReading("da-1", am.secret_hex, isoAgo((i + 1) * 3_600_000)),
      );
      const res = await submit(gw, rogue.token, readings);
      equal(res.status, 202);
      const patch = await gw.request("PATCH", `/api/admin/users/${rogue.id}`, {
        token: gw.adminToken,
        body: { disabled: true },
      });
      equal(patch.status, 200, JSON.stringify(patch.body));
      const before = await gw.request("GET", `/api/meters/batches/${res.body.job_id}`, {
        token: gw.adminToken,
      });
      console.log("rogue job status when the account was disabled:", before.body.status);
      const job = await waitForJob(gw, gw.adminToken, res.body.job_id, 120_000);
      equal(job.status, "failed", JSON.stringify(job));
      equal(job.last_error, "The submitter's account is disabled");
      equal(
        job.successful,
        0,
        `a disabled admin's job stored ${job.successful} of alice's readings`,
      );
    },
  );
});
