import assert from "node:assert/strict";
import { Buffer } from "node:buffer";
import { connect, type IClientOptions } from "mqtt";
import { connectCredentials, readingPayload } from "../mqtt/device_credentials.ts";
import { isoAgo, startTestGateway } from "./_gateway.ts";
import { within } from "./_mosquitto.ts";

const HAS_OPENSSL = await new Deno.Command("openssl", { args: ["version"], stdout: "null" })
  .output().then((o) => o.success, () => false);

async function openssl(dir: string, ...args: string[]): Promise<void> {
  const out = await new Deno.Command("openssl", { args, cwd: dir, stdout: "null", stderr: "piped" })
    .output();
  if (!out.success) throw new Error(`openssl ${args[0]}: ${new TextDecoder().decode(out.stderr)}`);
}

/** A CA, a server certificate for 127.0.0.1 and client certificates with the given CNs. */
async function makePki(dir: string, clients: string[]): Promise<void> {
  const ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
  await openssl(
    dir,
    "req",
    "-x509",
    ...ec,
    "-keyout",
    "ca.key",
    "-out",
    "ca.crt",
    "-days",
    "2",
    "-subj",
    "/CN=test-ca",
  );
  await openssl(
    dir,
    "req",
    "-x509",
    ...ec,
    "-keyout",
    "rogue-ca.key",
    "-out",
    "rogue-ca.crt",
    "-days",
    "2",
    "-subj",
    "/CN=rogue-ca",
  );
  await Deno.writeTextFile(`${dir}/san.ext`, "subjectAltName=IP:127.0.0.1,DNS:localhost\n");
  await openssl(
    dir,
    "req",
    ...ec,
    "-keyout",
    "server.key",
    "-out",
    "server.csr",
    "-subj",
    "/CN=127.0.0.1",
  );
  await openssl(
    dir,
    "x509",
    "-req",
    "-in",
    "server.csr",
    "-CA",
    "ca.crt",
    "-CAkey",
    "ca.key",
    "-CAcreateserial",
    "-out",
    "server.crt",
    "-days",
    "2",
    "-extfile",
    "san.ext",
  );
  for (const [cn, ca] of clients.map((c) => c.split("@"))) {
    const issuer = ca ?? "ca";
    await openssl(
      dir,
      "req",
      ...ec,
      "-keyout",
      `${cn}.key`,
      "-out",
      `${cn}.csr`,
      "-subj",
      `/CN=${cn}`,
    );
    await openssl(
      dir,
      "x509",
      "-req",
      "-in",
      `${cn}.csr`,
      "-CA",
      `${issuer}.crt`,
      "-CAkey",
      `${issuer}.key`,
      "-CAcreateserial",
      "-out",
      `${cn}.crt`,
      "-days",
      "2",
    );
  }
}

/** Connects; resolves to the CONNACK return code (0 = accepted). */
function tryConnect(
  url: string,
  options: IClientOptions,
): Promise<{ code: number; end(): Promise<void>; client: ReturnType<typeof connect> }> {
  const client = connect(url, { reconnectPeriod: 0, connectTimeout: 5_000, ...options });
  return new Promise((resolve) => {
    const end = () => client.endAsync(true);
    client.once("connect", () => resolve({ code: 0, end, client }));
    client.once(
      "error",
      (error) => resolve({ code: (error as { code?: number }).code ?? -1, end, client }),
    );
  });
}

Deno.test({
  name: HAS_OPENSSL
    ? "the embedded broker's TLS listener authenticates devices by client certificate or password"
    : "the embedded broker's TLS listener (skipped: openssl not found)",
  ignore: !HAS_OPENSSL && !Deno.env.get("CI"),
  fn: async (t) => {
    const dir = await Deno.makeTempDir({ prefix: "mqtt-tls-" });
    try {
      await makePki(dir, ["meter-tls", "meter-unknown", "meter-rogue@rogue-ca"]);
      await using gw = await startTestGateway({
        env: {
          MQTT_TLS_PORT: "0",
          MQTT_TLS_CERT: `${dir}/server.crt`,
          MQTT_TLS_KEY: `${dir}/server.key`,
          MQTT_TLS_CA: `${dir}/ca.crt`,
          MQTT_MAX_CONNECTIONS_PER_ADDRESS: "3",
          MQTT_CONNECT_TIMEOUT: "3s",
        },
      });
      const url = `mqtts://127.0.0.1:${gw.gateway.broker!.ports.mqtts}`;
      const ca = await Deno.readTextFile(`${dir}/ca.crt`);
      const tls = async (cn: string) => ({
        ca,
        cert: await Deno.readTextFile(`${dir}/${cn}.crt`),
        key: await Deno.readTextFile(`${dir}/${cn}.key`),
      });
      const user = await gw.createUser("tls@example.com");
      const { secret_hex } = await gw.registerMeter("meter-tls", user.id);
      await gw.registerMeter("meter-rogue", user.id);

      await t.step("a certificate whose CN is a registered meter needs no password", async () => {
        const conn = await tryConnect(url, {
          ...(await tls("meter-tls")),
          clientId: "meter-tls/1",
        });
        assert.equal(conn.code, 0);
        const ts = isoAgo(60_000);
        await conn.client.publishAsync(
          "meters/meter-tls/readings",
          readingPayload("meter-tls", Buffer.from(secret_hex, "hex"), ts, "4.2"),
          { qos: 1 },
        );
        const stored = await gw.gateway.store.getReading("meter-tls", Date.parse(ts));
        assert.equal(stored?.kwh_e4, 42_000);
        await conn.end();
      });

      await t.step("a certificate's meter may not use another meter's client id", async () => {
        const conn = await tryConnect(url, {
          ...(await tls("meter-tls")),
          clientId: "meter-rogue",
        });
        assert.equal(conn.code, 2, "identifier rejected");
        await conn.end();
      });

      await t.step("a certificate for an unregistered meter is refused", async () => {
        const conn = await tryConnect(url, {
          ...(await tls("meter-unknown")),
          clientId: "meter-unknown/2",
        });
        assert.equal(conn.code, 5);
        await conn.end();
      });

      await t.step("a certificate from another CA proves nothing", async () => {
        const conn = await tryConnect(url, {
          ...(await tls("meter-rogue")),
          clientId: "meter-rogue/3",
        });
        assert.notEqual(conn.code, 0);
        await conn.end();
      });

      await t.step("without a certificate, the signed password works over TLS", async () => {
        const creds = connectCredentials("meter-tls", Buffer.from(secret_hex, "hex"), {
          clientId: "meter-tls/4",
        });
        const conn = await tryConnect(url, { ca, ...creds });
        assert.equal(conn.code, 0);
        await conn.end();
      });

      await t.step(
        "idle TCP sockets on the TLS port are capped per address and closed after the deadline",
        async () => {
          const port = gw.gateway.broker!.ports.mqtts!;
          const open = async () => {
            const conn = await Deno.connect({ hostname: "127.0.0.1", port });
            const closed = (async () => {
              try {
                while (await conn.read(new Uint8Array(64)) !== null) { /* drain */ }
              } catch { /* reset */ }
            })();
            return { conn, closed };
          };
          // A device authenticated by its certificate is not subject to the deadline.
          const device = await tryConnect(url, {
            ...(await tls("meter-tls")),
            clientId: "meter-tls/long",
          });
          assert.equal(device.code, 0);
          const idle = [await open(), await open(), await open()];
          const extra = await open();
          await within(extra.closed, "the 4th socket from one address is closed at once", 2_500);
          extra.conn.close();
          // No TLS handshake, no CONNECT: closed after MQTT_CONNECT_TIMEOUT (3 s).
          await within(Promise.all(idle.map((s) => s.closed)), "idle sockets closed", 10_000);
          for (const s of idle) s.conn.close();
          assert.ok(device.client.connected, "the authenticated device outlived the deadline");
          const ts = isoAgo(2 * 60_000);
          await device.client.publishAsync(
            "meters/meter-tls/readings",
            readingPayload("meter-tls", Buffer.from(secret_hex, "hex"), ts, "1"),
            { qos: 1 },
          );
          await device.end();
          // A device still connects.
          const creds = connectCredentials("meter-tls", Buffer.from(secret_hex, "hex"), {
            clientId: "meter-tls/after",
          });
          const conn = await tryConnect(url, { ca, ...creds });
          assert.equal(conn.code, 0);
          await conn.end();
        },
      );
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});
