// The real process (main.ts) as a subprocess: first start, restarts, kill -9, config errors.
import assert from "node:assert/strict";
import { isoAgo, signedReading } from "./_gateway.ts";
import { call, GatewayProcess, login } from "./_gateway_process.ts";

const ADMIN_EMAIL = "root@crash.test";

/** A temporary data directory, removed on dispose. */
async function tempDir(): Promise<{ path: string } & AsyncDisposable> {
  const path = await Deno.makeTempDir({ prefix: "gw-crash-" });
  return {
    path,
    [Symbol.asyncDispose]: () => Deno.remove(path, { recursive: true }),
  };
}

Deno.test("the first start generates an admin password once and keeps secrets beside the KV", async (t) => {
  await using dir = await tempDir();
  const kvPath = `${dir.path}/gateway.kv`;
  const secretsFile = `${dir.path}/gateway.secrets.json`;
  const env = { DENO_KV_PATH: kvPath, ADMIN_EMAIL, LOG_LEVEL: "info" };
  let password = "";
  let firstToken = "";
  let secretsText = "";

  await t.step(
    "an empty data dir without ADMIN_PASSWORD prints a generated password once",
    async () => {
      await using gw = await GatewayProcess.start(env);
      const withPassword = gw.logs().filter((e) => "password" in e);
      assert.equal(withPassword.length, 1, `one password line expected:\n${gw.describe()}`);
      const [entry] = withPassword;
      assert.equal(entry.email, ADMIN_EMAIL);
      assert.equal(typeof entry.password, "string");
      password = entry.password as string;
      assert.ok(password.length >= 16, "a generated password is long");
      const mentions = [...gw.stdout, ...gw.stderr].filter((l) => l.includes(password));
      assert.equal(mentions.length, 1, "the password appears in exactly one line");

      firstToken = await login(gw.url, ADMIN_EMAIL, password);
      const created = await call(gw.url, "POST", "/api/admin/users", {
        token: firstToken,
        body: { email: "someone@crash.test", password: "holder-Secret-83", role: "user" },
      });
      assert.equal(created.status, 201, "the generated account is an admin");
      const wrong = await call(gw.url, "POST", "/api/auth/login", {
        body: { email: ADMIN_EMAIL, password: password + "x" },
      });
      assert.equal(wrong.status, 401);

      const info = await Deno.stat(secretsFile);
      assert.ok(info.isFile, "gateway.secrets.json exists beside the KV file");
      assert.equal((info.mode ?? 0) & 0o777, 0o600, "the secrets file is private to its owner");
      secretsText = await Deno.readTextFile(secretsFile);

      const status = await gw.stop("SIGTERM");
      assert.equal(status.code, 0, `graceful stop:\n${gw.describe()}`);
      assert.ok(gw.logs().some((e) => e.msg === "stopped"), "the shutdown completed");
    },
  );

  await t.step("the embedded secrets are not stored inside the KV", async () => {
    const secrets = JSON.parse(secretsText);
    assert.match(secrets.jwt_secret, /^[0-9a-f]{64}$/);
    assert.match(secrets.device_key_encryption_key, /^[0-9a-f]{64}$/);
    const kekHex = secrets.device_key_encryption_key as string;

    const kv = await Deno.openKv(kvPath);
    let entries = 0;
    try {
      for await (const entry of kv.list({ prefix: [] })) {
        entries++;
        const text = JSON.stringify(
          { key: entry.key, value: entry.value },
          (_k, v) =>
            typeof v === "bigint"
              ? v.toString()
              : v instanceof Uint8Array
              ? Array.from(v, (b) => b.toString(16).padStart(2, "0")).join("")
              : v,
        );
        assert.ok(!text.includes(secrets.jwt_secret), `the JWT secret is in ${entry.key}`);
        assert.ok(!text.includes(kekHex), `the key-encryption key is in ${entry.key}`);
      }
    } finally {
      kv.close();
    }
    assert.ok(entries > 0, "the KV holds the admin account");

    // Nor anywhere in the database files (WAL included), in any spelling.
    for await (const file of Deno.readDir(dir.path)) {
      if (!file.isFile || file.name === "gateway.secrets.json") continue;
      const bytes = await Deno.readFile(`${dir.path}/${file.name}`);
      const text = new TextEncoder();
      assert.ok(
        !containsBytes(bytes, text.encode(secrets.jwt_secret)),
        `JWT secret in ${file.name}`,
      );
      assert.ok(!containsBytes(bytes, text.encode(kekHex)), `KEK (hex) in ${file.name}`);
      assert.ok(!containsBytes(bytes, hexToBytes(kekHex)), `KEK (raw) in ${file.name}`);
    }
  });

  await t.step("a second start prints no password and the same password still works", async () => {
    await using gw = await GatewayProcess.start(env);
    assert.equal(gw.logs().filter((e) => "password" in e).length, 0, gw.describe());
    assert.ok(
      ![...gw.stdout, ...gw.stderr].some((l) => l.includes(password)),
      "the password is not printed again",
    );
    const token = await login(gw.url, ADMIN_EMAIL, password);
    assert.equal(typeof token, "string");
    // The persisted JWT secret keeps tokens of the previous run valid.
    const stats = await call(gw.url, "GET", "/api/meters/stats", { token: firstToken });
    assert.equal(stats.status, 200, JSON.stringify(stats.body));
    assert.equal(await Deno.readTextFile(secretsFile), secretsText, "the secrets are reused");
    assert.equal((await Deno.stat(secretsFile)).mode! & 0o777, 0o600);
  });
});

function hexToBytes(hex: string): Uint8Array {
  return Uint8Array.from(hex.match(/../g) ?? [], (h) => parseInt(h, 16));
}

function containsBytes(haystack: Uint8Array, needle: Uint8Array): boolean {
  outer: for (let i = 0; i + needle.length <= haystack.length; i++) {
    for (let j = 0; j < needle.length; j++) if (haystack[i + j] !== needle[j]) continue outer;
    return true;
  }
  return false;
}

interface Submission {
  meter: string;
  body: Record<string, unknown>;
}

/** Pages through GET /api/meters/readings and returns every item. */
async function listAll(base: string, token: string): Promise<Record<string, unknown>[]> {
  const items: Record<string, unknown>[] = [];
  let cursor: string | null = null;
  for (let page = 0;; page++) {
    assert.ok(page < 1000, "paging terminates");
    const query = new URLSearchParams({ limit: "37", order: "asc" });
    if (cursor) query.set("cursor", cursor);
    const res = await call(base, "GET", `/api/meters/readings?${query}`, { token });
    assert.equal(res.status, 200, JSON.stringify(res.body));
    assert.ok(res.body.items.length <= 37);
    items.push(...res.body.items);
    cursor = res.body.next_cursor;
    if (cursor === null) return items;
  }
}

/** Runs `fn` over `items` with at most `concurrency` at a time; stops taking new work on `stop`. */
async function pool<T>(
  items: T[],
  concurrency: number,
  fn: (item: T) => Promise<void>,
  stop: () => boolean = () => false,
): Promise<void> {
  let next = 0;
  await Promise.all(
    Array.from({ length: concurrency }, async () => {
      while (next < items.length && !stop()) await fn(items[next++]);
    }),
  );
}

Deno.test("readings acknowledged with 201 survive kill -9 exactly once", async () => {
  await using dir = await tempDir();
  const env = {
    DENO_KV_PATH: `${dir.path}/gateway.kv`,
    ADMIN_EMAIL,
    ADMIN_PASSWORD: "crash-admin-password",
    LOG_LEVEL: "info",
    DEVICE_REGISTER_RATE_LIMIT: "100",
  };

  // ---- before the crash
  await using first = await GatewayProcess.start(env);
  const adminToken = await login(first.url, ADMIN_EMAIL, env.ADMIN_PASSWORD);
  const user = await call(first.url, "POST", "/api/admin/users", {
    token: adminToken,
    body: { email: "owner@crash.test", password: "holder-Secret-82", role: "user" },
  });
  assert.equal(user.status, 201, JSON.stringify(user.body));
  const userToken = await login(first.url, "owner@crash.test", "holder-Secret-82");
  const meters: { id: string; secret: string }[] = [];
  for (let i = 0; i < 6; i++) {
    const res = await call(first.url, "POST", "/api/admin/devices/register", {
      token: adminToken,
      body: { meter_id: `crash-meter-${i}`, user_id: user.body.id, algorithm: "hmac-sha256" },
    });
    assert.equal(res.status, 201, JSON.stringify(res.body));
    meters.push({ id: res.body.meter_id, secret: res.body.secret_hex });
  }

  // 300 readings, 16 minutes apart across all meters, newest 2 minutes ago (80 h in total).
  const now = Date.now();
  const submissions: Submission[] = Array.from({ length: 300 }, (_, k) => {
    const meter = meters[k % meters.length];
    const ts = isoAgo(2 * 60_000 + k * 16 * 60_000, now);
    return { meter: meter.id, body: signedReading(meter.id, meter.secret, ts, `${k % 97}.125`) };
  });

  const accepted = new Map<Submission, Record<string, unknown>>();
  const unknownFate: Submission[] = [];
  const otherStatuses: string[] = [];
  let outstanding = 0; // dispatched, no answer yet
  let killed = false;
  let outstandingAtKill = -1;
  const KILL_AFTER = 120;

  await pool(submissions, 12, async (s) => {
    outstanding++;
    const answer = call(first.url, "POST", "/api/meters/submit-reading", {
      token: userToken,
      body: s.body,
    }).finally(() => outstanding--);
    try {
      const res = await answer;
      if (res.status === 201) accepted.set(s, res.body);
      else otherStatuses.push(`${res.status} ${JSON.stringify(res.body)}`);
    } catch {
      unknownFate.push(s); // the connection died with the process: fate unknown
    }
    // Kill once enough were acknowledged while others still wait for their answers.
    if (!killed && accepted.size >= KILL_AFTER && outstanding >= 4) {
      killed = true;
      outstandingAtKill = outstanding;
      first.child.kill("SIGKILL");
    }
  }, () => killed);

  assert.ok(killed, "the kill happened during the run");
  assert.ok(outstandingAtKill >= 4, "submissions were in flight at the kill");
  const status = await first.waitForExit();
  assert.equal(status.success, false);
  assert.equal(status.signal, "SIGKILL");
  assert.deepEqual(otherStatuses, [], "every answered submission was accepted");
  assert.ok(accepted.size >= KILL_AFTER);
  for (const [s, reading] of accepted) {
    assert.equal(reading.meter_id, s.meter);
    assert.equal(typeof reading.id, "string");
  }

  // ---- after the restart
  await using second = await GatewayProcess.start(env);
  const token = await login(second.url, "owner@crash.test", "holder-Secret-82");
  const listed = await listAll(second.url, token);
  const count = new Map<string, number>();
  for (const item of listed) count.set(item.id as string, (count.get(item.id as string) ?? 0) + 1);
  for (const [s, reading] of accepted) {
    assert.equal(count.get(reading.id as string), 1, `201 reading ${s.body.reading_timestamp}`);
  }
  assert.equal(count.size, listed.length, "no reading is listed twice");
  assert.ok(
    listed.length <= accepted.size + unknownFate.length,
    `${listed.length} listed > ${accepted.size} accepted + ${unknownFate.length} in flight`,
  );
  const byId = new Map(listed.map((item) => [item.id as string, item]));
  for (const reading of accepted.values()) {
    const stored = byId.get(reading.id as string)!;
    assert.equal(stored.reading_timestamp, reading.reading_timestamp);
    assert.equal(stored.kwh_amount, reading.kwh_amount);
    assert.equal(stored.meter_id, reading.meter_id);
  }

  // Replays of acknowledged readings are duplicates carrying the stored id.
  await pool([...accepted], 12, async ([s, reading]) => {
    const res = await call(second.url, "POST", "/api/meters/submit-reading", {
      token,
      body: s.body,
    });
    assert.equal(
      res.status,
      409,
      `replay of ${s.body.reading_timestamp}: ${JSON.stringify(res.body)}`,
    );
    assert.equal(res.body.error.code, "duplicate");
    assert.equal(res.body.error.details.id, reading.id);
  });

  // Readings whose answer was lost are stored at most once: a replay is 201 iff it was not stored.
  await pool(unknownFate, 12, async (s) => {
    const res = await call(second.url, "POST", "/api/meters/submit-reading", {
      token,
      body: s.body,
    });
    if (res.status === 201) {
      assert.ok(!byId.has(res.body.id), `${res.body.id} was listed yet accepted again`);
    } else {
      assert.equal(res.status, 409, JSON.stringify(res.body));
      assert.equal(res.body.error.code, "duplicate");
      assert.ok(byId.has(res.body.error.details.id), "a duplicate of a listed reading");
    }
  });
  const final = await listAll(second.url, token);
  const finalIds = new Set(final.map((item) => item.id as string));
  assert.equal(finalIds.size, final.length, "no reading is listed twice after the replays");
  assert.equal(final.length, accepted.size + unknownFate.length);
});

Deno.test("invalid configuration stops the process with a message naming every bad variable", async () => {
  await using dir = await tempDir();
  const gw = new GatewayProcess({
    PORT: "abc",
    DEVICE_KEY_ENCRYPTION_KEY: "xyz",
    DENO_KV_PATH: `${dir.path}/gateway.kv`,
    ADMIN_EMAIL,
    ADMIN_PASSWORD: "config-admin-password",
    LOG_LEVEL: "info",
  });
  const status = await gw.waitForExit();
  assert.equal(status.success, false, gw.describe());
  assert.notEqual(status.code, 0);
  const stderr = gw.stderr.join("\n");
  assert.match(stderr, /\bPORT\b/, stderr);
  assert.match(stderr, /\bDEVICE_KEY_ENCRYPTION_KEY\b/, stderr);
  assert.ok(!gw.logs().some((e) => e.msg === "gateway listening"), "it never listened");
  const left = [];
  for await (const entry of Deno.readDir(dir.path)) left.push(entry.name);
  assert.deepEqual(left, [], "nothing was written to the data dir");
});
