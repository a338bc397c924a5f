// PostgreSQL cut off for 30 s under steady HTTP and MQTT load: nothing accepted is lost or
// doubled, intake pushes back meanwhile, and resumes by itself (issue 4).
import assert from "node:assert/strict";
import { Buffer } from "node:buffer";
import { connect } from "mqtt";
import { connectCredentials, readingPayload } from "../mqtt/device_credentials.ts";
import { isoAgo, signedReading, startTestGateway } from "./_gateway.ts";
import {
  createTestSchema,
  postgresUrl,
  probePostgres,
  redactUrl,
  requireService,
} from "./_services.ts";
import { startTcpProxy } from "./_tcp_proxy.ts";

const OUTAGE_MS = Number(Deno.env.get("TEST_OUTAGE_MS") ?? 30_000);
const status = await requireService(
  `PostgreSQL at ${redactUrl(postgresUrl())}`,
  probePostgres(postgresUrl()),
);

Deno.test({
  name: status.ok
    ? "a 30 s PostgreSQL outage under load loses and doubles nothing, and intake resumes by itself"
    : `a 30 s PostgreSQL outage under load (skipped: ${status.reason})`,
  ignore: !status.ok,
  // mqtt.js keeps a reconnect timer alive briefly after end(); the client is closed.
  sanitizeOps: false,
  fn: async (t) => {
    const schema = await createTestSchema();
    const base = new URL(schema.url);
    await using proxy = startTcpProxy({ hostname: base.hostname, port: Number(base.port || 5432) });
    const proxied = new URL(schema.url);
    proxied.hostname = "127.0.0.1";
    proxied.port = String(proxy.port);
    const gw = await startTestGateway({
      env: {
        DATABASE_URL: proxied.href,
        JWT_SECRET: "outage-test-jwt-secret-0123456789abcdef",
        DEVICE_KEY_ENCRYPTION_KEY:
          "0f1e2d3c4b5a69788796a5b4c3d2e1f00011223344556677889900aabbccddee",
        WRITER_QUEUE_MAX: "4",
        METER_RATE_BURST: "100000",
        // The MQTT device walks back 16 minutes per reading; at the default 7 days a fast run
        // reached readings too old to store, whose PUBACKs (final rejections) looked like losses.
        READING_MAX_AGE: "300d",
      },
    });
    try {
      const user = await gw.createUser("outage@example.com");
      const meters = Array.from({ length: 40 }, (_, i) => `outage-${i}`);
      const secrets = new Map<string, string>();
      for (const m of meters) secrets.set(m, (await gw.registerMeter(m, user.id)).secret_hex);

      // HTTP load: each loop owns some meters and walks back in 16-minute steps.
      const created = new Map<string, string>(); // "meter|ts" -> id
      const refused = { overloaded: 0, unavailable: 0, withoutRetryAfter: 0 };
      let stop = false;
      let slot = 0;
      const next = () => {
        const n = slot++;
        const meter = meters[n % meters.length];
        return { meter, ts: isoAgo((Math.floor(n / meters.length) + 1) * 16 * 60_000) };
      };
      const loops = Array.from({ length: 8 }, async () => {
        while (!stop) {
          const { meter, ts } = next();
          const res = await gw.request("POST", "/api/meters/submit-reading", {
            token: user.token,
            body: signedReading(meter, secrets.get(meter)!, ts, "2.5"),
          });
          if (res.status === 201) created.set(`${meter}|${ts}`, res.body.id);
          else if (res.status === 503) {
            if (res.body.error.code === "overloaded") refused.overloaded++;
            else refused.unavailable++;
            if (!res.headers.get("retry-after")) refused.withoutRetryAfter++;
            // A real client backs off; keeping this loop busy does not prove more.
            await new Promise((r) => setTimeout(r, 100));
          } else {
            assert.fail(`unexpected ${res.status}: ${JSON.stringify(res.body)}`);
          }
        }
      });

      // MQTT load: one device publishing at QoS 1; its PUBACK means "stored".
      const device = "outage-mqtt";
      const deviceSecret = Buffer.from((await gw.registerMeter(device, user.id)).secret_hex, "hex");
      const client = connect(`mqtt://127.0.0.1:${gw.gateway.broker!.ports.mqtt}`, {
        ...connectCredentials(device, deviceSecret, { clientId: `${device}/device` }),
        reconnectPeriod: 0,
      });
      await new Promise((resolve, reject) => {
        client.once("connect", resolve);
        client.once("error", reject);
      });
      const pubacked = new Set<string>();
      const publisher = (async () => {
        for (let i = 0; !stop; i++) {
          const ts = isoAgo((i + 1) * 16 * 60_000);
          await client.publishAsync(
            `meters/${device}/readings`,
            readingPayload(device, deviceSecret, ts, "1.25"),
            { qos: 1 },
          );
          pubacked.add(ts);
        }
      })();

      const waitFor = async (what: string, check: () => boolean | Promise<boolean>) => {
        const deadline = Date.now() + 60_000;
        while (!(await check())) {
          if (Date.now() > deadline) assert.fail(`timed out waiting for ${what}`);
          await new Promise((r) => setTimeout(r, 50));
        }
      };

      await t.step("before the outage, readings are stored", async () => {
        await waitFor("100 stored readings", () => created.size >= 100 && pubacked.size >= 5);
      });

      let during = { created: 0, pubacked: 0 };
      await t.step("during the outage, intake pushes back and /readyz reports it", async () => {
        await proxy.cut();
        const cutAt = Date.now();
        await waitFor("503 answers", () => refused.overloaded + refused.unavailable > 0);
        await waitFor(
          "/readyz 503",
          async () => (await gw.request("GET", "/readyz")).status === 503,
        );
        const ready = await gw.request("GET", "/readyz");
        assert.equal(ready.body.status, "not_ready");
        during = { created: created.size, pubacked: pubacked.size };
        await new Promise((r) => setTimeout(r, Math.max(0, OUTAGE_MS - (Date.now() - cutAt))));
        // Nothing can have been confirmed while nothing could be stored.
        assert.ok(created.size - during.created <= 4, "201s beyond the writer queue");
        assert.equal(refused.withoutRetryAfter, 0);
        proxy.restore();
      });

      await t.step("after it, intake resumes by itself", async () => {
        await waitFor("new 201s", () => created.size > during.created + 50);
        await waitFor("new PUBACKs", () => pubacked.size > during.pubacked + 5);
        await waitFor(
          "/readyz 200",
          async () => (await gw.request("GET", "/readyz")).status === 200,
        );
        stop = true;
        await Promise.all(loops);
        await publisher;
        await client.endAsync();
      });

      await t.step("every 201 and every PUBACK is stored exactly once", async () => {
        const stored = new Map<string, string>();
        let cursor: string | undefined;
        do {
          const page = await gw.request(
            "GET",
            `/api/meters/readings?limit=1000&order=asc${cursor ? `&cursor=${cursor}` : ""}`,
            { token: gw.adminToken },
          );
          assert.equal(page.status, 200);
          for (const r of page.body.items) {
            const key = `${r.meter_id}|${r.reading_timestamp.replace(".000Z", "Z")}`;
            assert.ok(!stored.has(key), `stored twice: ${key}`);
            stored.set(key, r.id);
          }
          cursor = page.body.next_cursor ?? undefined;
        } while (cursor);
        for (const [key, id] of created) assert.equal(stored.get(key), id, `lost: ${key}`);
        for (const ts of pubacked) assert.ok(stored.has(`${device}|${ts}`), `lost MQTT ${ts}`);
        assert.ok(refused.overloaded > 0, "the full writer queue answered 503 overloaded");
      });
    } finally {
      await gw.close();
      await schema.drop();
    }
  },
});
