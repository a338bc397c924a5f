// The `deno task` operator commands, run as real subprocesses against a real gateway.
import assert from "node:assert/strict";
import { Buffer } from "node:buffer";
import { generateKeyPairSync, verify } from "node:crypto";
import { canonicalMessage, signHmac } from "../core/signature.ts";
import { ADMIN, isoAgo, startTestGateway, type TestGateway } from "./_gateway.ts";

const ROOT = new URL("..", import.meta.url).pathname;
const VECTOR = {
  secret: "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f",
  meter: "meter-1",
  timestamp: "2026-11-29T10:15:00Z",
  kwh: "12.5",
  signature: "9396d1b1e4fbc88d8cdcba4b9fcf3ff17d6e5f33bc5a003d893823c5ccfc6ceb",
};
const HEX_SECRET = /^[0-9a-f]{64}$/;

interface Run {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs `deno task -q <task> ...args`; the caller's GATEWAY_* and ADMIN_* variables are cleared. */
async function task(name: string, args: string[], env: Record<string, string> = {}): Promise<Run> {
  const output = await new Deno.Command(Deno.execPath(), {
    args: ["task", "-q", name, ...args],
    cwd: ROOT,
    env: {
      NO_COLOR: "1",
      GATEWAY_URL: "",
      GATEWAY_TOKEN: "",
      ADMIN_EMAIL: "",
      ADMIN_PASSWORD: "",
      ...env,
    },
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).output();
  const decoder = new TextDecoder();
  return {
    code: output.code,
    stdout: decoder.decode(output.stdout),
    stderr: decoder.decode(output.stderr),
  };
}

/** Like {@linkcode task}, failing with the command's stderr unless it exits 0. */
async function ok(name: string, args: string[], env: Record<string, string> = {}): Promise<Run> {
  const run = await task(name, args, env);
  assert.equal(run.code, 0, `${name} ${args.join(" ")} failed:\n${run.stderr}`);
  return run;
}

function adminEnv(gw: TestGateway): Record<string, string> {
  return { GATEWAY_URL: gw.url, ADMIN_EMAIL: ADMIN.email, ADMIN_PASSWORD: ADMIN.password };
}

function signedReadingFor(meter: string, secretHex: string, ts: string): Record<string, unknown> {
  return {
    meter_id: meter,
    kwh_amount: "1.5",
    reading_timestamp: ts,
    device_signature: signHmac(
      Buffer.from(secretHex, "hex"),
      canonicalMessage(meter, ts, "1.5"),
    ),
  };
}

function signArgs(meter: string, secret: string, extra: string[] = []): string[] {
  return ["--meter", meter, "--secret", secret, ...extra];
}

Deno.test("sign reproduces the test vector and prints both payload forms offline", async (t) => {
  await t.step("the HTTP form carries meter_id and the hex HMAC of DESIGN.md §4", async () => {
    const run = await ok(
      "sign",
      signArgs(VECTOR.meter, VECTOR.secret, [
        "--kwh",
        VECTOR.kwh,
        "--timestamp",
        VECTOR.timestamp,
      ]),
    );
    assert.deepEqual(JSON.parse(run.stdout), {
      meter_id: VECTOR.meter,
      kwh_amount: VECTOR.kwh,
      reading_timestamp: VECTOR.timestamp,
      device_signature: VECTOR.signature,
    });
  });

  await t.step("--mqtt drops meter_id, and base64url and --key-id are honoured", async () => {
    const run = await ok(
      "sign",
      signArgs(VECTOR.meter, VECTOR.secret, [
        "--timestamp",
        VECTOR.timestamp,
        "--mqtt",
        "--encoding",
        "base64url",
        "--key-id",
        "k1",
      ]),
    );
    assert.deepEqual(JSON.parse(run.stdout), {
      kwh_amount: VECTOR.kwh,
      reading_timestamp: VECTOR.timestamp,
      device_signature: Buffer.from(VECTOR.signature, "hex").toString("base64url"),
      key_id: "k1",
    });
  });

  await t.step("the default timestamp is now in whole seconds with Z", async () => {
    const before = Math.floor(Date.now() / 1000) * 1000;
    const run = await ok("sign", signArgs("meter-1", VECTOR.secret));
    const ts: string = JSON.parse(run.stdout).reading_timestamp;
    assert.match(ts, /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$/);
    assert.ok(Date.parse(ts) >= before && Date.parse(ts) <= Date.now());
  });

  await t.step("--ed25519-key signs with a PKCS#8 PEM key", async () => {
    const dir = await Deno.makeTempDir({ prefix: "cli-sign-" });
    try {
      const { privateKey, publicKey } = generateKeyPairSync("ed25519");
      const pemPath = `${dir}/device.pem`;
      await Deno.writeTextFile(
        pemPath,
        privateKey.export({ format: "pem", type: "pkcs8" }).toString(),
      );
      const run = await ok("sign", ["--meter", "ed-1", "--ed25519-key", pemPath]);
      const body = JSON.parse(run.stdout);
      const message = canonicalMessage("ed-1", body.reading_timestamp, body.kwh_amount);
      const signature = Buffer.from(body.device_signature, "hex");
      assert.ok(verify(null, Buffer.from(message), publicKey, signature));
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  });

  await t.step("values not in canonical form are refused with the form to sign", async () => {
    const cases: [string[], RegExp][] = [
      [["--kwh", "12.50"], /--kwh "12.50" is not in canonical form.*: sign "12.5"/],
      [["--kwh", "0.00005"], /--kwh "0.00005" is not in canonical form/],
      [
        ["--timestamp", "2026-11-29T10:15:00.000Z"],
        /not in canonical form \(UTC, whole seconds.*: sign "2026-11-29T10:15:00Z"/,
      ],
      [["--timestamp", "2026-11-29T17:15:00+07:00"], /: sign "2026-11-29T10:15:00Z"/],
      [["--timestamp", "2026-11-29T10:15:00.5Z"], /YYYY-MM-DDTHH:MM:SSZ\)$/m],
    ];
    for (const [extra, expected] of cases) {
      const run = await task("sign", signArgs("meter-1", VECTOR.secret, extra));
      assert.equal(run.code, 2, extra.join(" "));
      assert.match(run.stderr, expected);
      assert.equal(run.stdout, "");
    }
  });

  await t.step("a malformed secret is refused without echoing it", async () => {
    const run = await task("sign", signArgs("meter-1", "not-a-secret"));
    assert.equal(run.code, 2);
    assert.match(run.stderr, /--secret must be 64 hex characters/);
    assert.doesNotMatch(run.stderr, /not-a-secret/);
  });

  await t.step("an unknown flag exits 2 with the usage", async () => {
    const run = await task("sign", ["--meter", "meter-1", "--bogus"]);
    assert.equal(run.code, 2);
    assert.match(run.stderr, /Unknown option '--bogus'/);
    assert.match(run.stderr, /Usage: deno task sign/);
    assert.equal(run.stdout, "");
  });
});

Deno.test("operator commands provision, list, rotate and revoke devices on a running gateway", async (t) => {
  await using gw = await startTestGateway();
  const env = adminEnv(gw);
  let userId = "";
  let secret = "";
  let keyId = "";

  await t.step("sign output submitted over HTTP is stored (201)", async () => {
    const owner = await gw.createUser("signer@example.com");
    const meter = await gw.registerMeter("meter-signed", owner.id);
    const run = await ok("sign", signArgs("meter-signed", meter.secret_hex, ["--kwh", "3.25"]));
    const res = await gw.request("POST", "/api/meters/submit-reading", {
      token: owner.token,
      body: JSON.parse(run.stdout),
    });
    assert.equal(res.status, 201, JSON.stringify(res.body));
    assert.equal(res.body.kwh_amount, 3.25);
  });

  await t.step("user:create prints the new user as JSON", async () => {
    const run = await ok("user:create", [
      "--email",
      "owner@example.com",
      "--password",
      "holder-Secret-81",
      "--wallet",
      "0x1234567890abcdef1234567890abcdef12345678",
    ], env);
    const user = JSON.parse(run.stdout);
    assert.equal(user.email, "owner@example.com");
    assert.equal(user.role, "user");
    assert.equal(user.wallet_address, "0x1234567890abcdef1234567890abcdef12345678");
    userId = user.id;
    assert.ok(userId);
  });

  await t.step("device:register shows the secret once, with a warning", async () => {
    const run = await ok("device:register", ["--meter", "meter-cli", "--user", userId], env);
    const secretLine = /^secret_hex: ([0-9a-f]+)$/m.exec(run.stdout);
    const keyLine = /^key_id: +(\S+)$/m.exec(run.stdout);
    assert.ok(secretLine && keyLine, run.stdout);
    secret = secretLine[1];
    keyId = keyLine[1];
    assert.match(secret, HEX_SECRET);
    assert.match(run.stdout, /meter_id: +meter-cli/);
    assert.match(run.stderr, /shown only once/);
  });

  await t.step("device:list shows the registered meter", async () => {
    const table = await ok("device:list", [], env);
    const row = table.stdout.split("\n").find((line) => line.startsWith("meter-cli "));
    assert.ok(row, table.stdout);
    assert.match(row, new RegExp(`${userId} +active +hmac-sha256 +${keyId}`));
    const json = await ok("device:list", ["--user", userId, "--json"], env);
    const devices = JSON.parse(json.stdout);
    assert.deepEqual(devices.map((d: { meter_id: string }) => d.meter_id), ["meter-cli"]);
  });

  await t.step("a reading signed with the registered secret is accepted", async () => {
    const run = await ok("sign", signArgs("meter-cli", secret, ["--timestamp", isoAgo(3600_000)]));
    const res = await gw.request("POST", "/api/meters/submit-reading", {
      token: gw.adminToken,
      body: JSON.parse(run.stdout),
    });
    assert.equal(res.status, 201, JSON.stringify(res.body));
  });

  await t.step("device:rotate issues a new key the gateway accepts", async () => {
    const run = await ok("device:rotate", ["--meter", "meter-cli", "--json"], env);
    const issued = JSON.parse(run.stdout);
    assert.notEqual(issued.key_id, keyId);
    assert.match(issued.secret_hex, HEX_SECRET);
    assert.match(run.stderr, /shown only once/);
    const signed = await ok(
      "sign",
      signArgs("meter-cli", issued.secret_hex, [
        "--key-id",
        issued.key_id,
        "--timestamp",
        isoAgo(1800_000),
      ]),
    );
    const res = await gw.request("POST", "/api/meters/submit-reading", {
      token: gw.adminToken,
      body: JSON.parse(signed.stdout),
    });
    assert.equal(res.status, 201, JSON.stringify(res.body));
    const list = JSON.parse((await ok("device:list", ["--json"], env)).stdout);
    const device = list.find((d: { meter_id: string }) => d.meter_id === "meter-cli");
    assert.equal(device.keys.length, 2);
  });

  await t.step("device:revoke makes the gateway reject the meter", async () => {
    const run = await ok("device:revoke", ["--meter", "meter-cli", "--reason", "stolen"], env);
    assert.match(run.stdout, /Revoked meter "meter-cli"/);
    const list = JSON.parse((await ok("device:list", ["--json"], env)).stdout);
    const device = list.find((d: { meter_id: string }) => d.meter_id === "meter-cli");
    assert.equal(device.status, "revoked");
    const signed = await ok("sign", signArgs("meter-cli", secret));
    const res = await gw.request("POST", "/api/meters/submit-reading", {
      token: gw.adminToken,
      body: JSON.parse(signed.stdout),
    });
    assert.equal(res.status, 403);
    assert.equal(res.body.error.code, "device_revoked");
  });

  await t.step("API errors print their code and exit 1", async () => {
    const run = await task("device:revoke", ["--meter", "no-such-meter"], env);
    assert.equal(run.code, 1);
    assert.match(run.stderr, /^error: not_found: Meter "no-such-meter" is not registered$/m);
    const login = await task("device:list", [], { ...env, ADMIN_PASSWORD: "wrong-password" });
    assert.equal(login.code, 1);
    assert.match(login.stderr, /error: unauthorized: Login as "admin@test.local" failed/);
  });

  await t.step("a token from GATEWAY_TOKEN is used without logging in", async () => {
    const run = await ok("device:list", ["--json"], {
      GATEWAY_URL: gw.url,
      GATEWAY_TOKEN: gw.adminToken,
    });
    assert.ok(JSON.parse(run.stdout).length >= 2);
  });
});

Deno.test("dot-only meter ids are refused; other ids round-trip through the device tasks", async (t) => {
  await using gw = await startTestGateway();
  const env = adminEnv(gw);
  const owner = await gw.createUser("colon@example.com");

  await t.step("registering ., .. or ... is refused (API and CLI)", async () => {
    for (const meter_id of [".", "..", "..."]) {
      const res = await gw.request("POST", "/api/admin/devices/register", {
        token: gw.adminToken,
        body: { meter_id, user_id: owner.id },
      });
      assert.equal(res.status, 400, meter_id);
      assert.equal(res.body.error.code, "invalid_payload");
      assert.match(res.body.error.message, /not only dots/);
    }
    const run = await task("device:register", ["--meter", "..", "--user", owner.id], env);
    assert.equal(run.code, 2);
    assert.match(run.stderr, /--meter "\.\." .*not only dots/);
  });

  const meter = "site:7.a_b-c";
  let first = "";
  await t.step(
    "register, rotate --grace 0, list and revoke a meter named with : . _ -",
    async () => {
      const reg = JSON.parse(
        (await ok("device:register", ["--meter", meter, "--user", owner.id, "--json"], env)).stdout,
      );
      assert.equal(reg.meter_id, meter);
      first = reg.secret_hex;
      const rotated = await ok("device:rotate", ["--meter", meter, "--grace", "0", "--json"], env);
      const issued = JSON.parse(rotated.stdout);
      assert.equal(issued.meter_id, meter);
      const submit = (secret: string, ago: number) =>
        gw.request("POST", "/api/meters/submit-reading", {
          token: gw.adminToken,
          body: signedReadingFor(meter, secret, isoAgo(ago)),
        });
      assert.equal((await submit(first, 3600_000)).status, 401, "the old key ended at once");
      assert.equal((await submit(issued.secret_hex, 1800_000)).status, 201);
      const list = JSON.parse((await ok("device:list", ["--json"], env)).stdout);
      const device = list.find((d: { meter_id: string }) => d.meter_id === meter);
      assert.deepEqual(device.keys.map((k: { key_id: string }) => k.key_id), [issued.key_id]);
      const revoked = await ok("device:revoke", ["--meter", meter], env);
      assert.match(revoked.stdout, /Revoked meter "site:7\.a_b-c"/);
    },
  );

  await t.step("--grace must be a duration", async () => {
    const bad = await task("device:rotate", ["--meter", "x1", "--grace", "soon"], env);
    assert.equal(bad.code, 2);
    assert.match(bad.stderr, /--grace "soon" is not/);
  });
});

Deno.test("device:import provisions a fleet from a CSV and writes the secrets 0600", async (t) => {
  await using gw = await startTestGateway();
  const env = adminEnv(gw);
  const owner = await gw.createUser("fleet@example.com");
  const dir = await Deno.makeTempDir({ prefix: "cli-import-" });
  const devices = async () =>
    JSON.parse((await ok("device:list", ["--json"], env)).stdout) as { meter_id: string }[];

  try {
    await t.step("valid rows get keys and a bad user id gets an error row", async () => {
      const input = `${dir}/devices.csv`;
      const output = `${dir}/secrets.csv`;
      await Deno.writeTextFile(
        input,
        "meter_id,user_id,algorithm,public_key\n" +
          `fleet-1,${owner.id},hmac-sha256,\n` +
          `fleet-2,no-such-user,,\n` +
          `fleet-3,${owner.id},,\n`,
      );
      const run = await task("device:import", ["--in", input, "--out", output], env);
      assert.equal(run.code, 1, "a failed device makes the exit code 1");
      assert.match(run.stdout, /Registered 2 devices, 1 failed/);

      assert.equal((await Deno.stat(output)).mode! & 0o777, 0o600);
      const [header, ...rows] = (await Deno.readTextFile(output)).trimEnd().split("\n");
      assert.equal(header, "meter_id,key_id,algorithm,secret_hex,error_code,error_message");
      const byMeter = new Map(rows.map((r) => [r.split(",")[0], r.split(",")]));
      assert.equal(rows.length, 3);
      for (const meter of ["fleet-1", "fleet-3"]) {
        const [, key, algorithm, secret, code] = byMeter.get(meter)!;
        assert.ok(key);
        assert.equal(algorithm, "hmac-sha256");
        assert.match(secret, HEX_SECRET);
        assert.equal(code, "");
      }
      assert.equal(byMeter.get("fleet-2")![4], "not_found");
      assert.match(byMeter.get("fleet-2")!.slice(5).join(","), /no-such-user/);

      const ids = (await devices()).map((d) => d.meter_id).sort();
      assert.deepEqual(ids, ["fleet-1", "fleet-3"]);
    });

    await t.step("an existing output file is not overwritten without --force", async () => {
      const input = `${dir}/more.csv`;
      const output = `${dir}/secrets.csv`;
      const before = await Deno.readTextFile(output);
      await Deno.writeTextFile(input, `meter_id,user_id\nfleet-4,${owner.id}\n`);
      const run = await task("device:import", ["--in", input, "--out", output], env);
      assert.equal(run.code, 2);
      assert.match(run.stderr, /already exists.*--force/);
      assert.equal(await Deno.readTextFile(output), before);
      assert.ok(!(await devices()).some((d) => d.meter_id === "fleet-4"));
    });

    await t.step(
      "a malformed CSV is refused with its line numbers and nothing is sent",
      async () => {
        const input = `${dir}/bad.csv`;
        const output = `${dir}/bad-secrets.csv`;
        await Deno.writeTextFile(
          input,
          "meter_id,user_id\n" +
            `fleet-5,${owner.id}\n` +
            `bad meter!,${owner.id}\n` +
            `fleet-6,${owner.id},extra\n`,
        );
        const run = await task("device:import", ["--in", input, "--out", output], env);
        assert.equal(run.code, 2);
        assert.match(run.stderr, /bad\.csv:3: meter_id "bad meter!" must be/);
        assert.match(run.stderr, /bad\.csv:4: expected 2 columns/);
        assert.match(run.stderr, /nothing was registered/);
        await assert.rejects(Deno.stat(output), Deno.errors.NotFound);
        assert.ok(!(await devices()).some((d) => d.meter_id === "fleet-5"));
      },
    );

    await t.step("a bad header is refused on line 1", async () => {
      const input = `${dir}/header.csv`;
      await Deno.writeTextFile(input, `meter,user_id\nfleet-7,${owner.id}\n`);
      const run = await task("device:import", ["--in", input, "--out", `${dir}/h.csv`], env);
      assert.equal(run.code, 2);
      assert.match(run.stderr, /header\.csv:1: bad header: unknown column "meter"/);
    });
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("commands explain an unreachable gateway and exit 1", async () => {
  // A port that was just free: nothing listens there.
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = listener.addr.port;
  listener.close();
  const run = await task("device:list", [], {
    GATEWAY_URL: `http://127.0.0.1:${port}`,
    ADMIN_EMAIL: ADMIN.email,
    ADMIN_PASSWORD: ADMIN.password,
  });
  assert.equal(run.code, 1);
  assert.match(run.stderr, new RegExp(`Cannot reach the gateway at http://127.0.0.1:${port}`));
  assert.match(run.stderr, /Is the gateway running\? Start it with `deno task start`/);
});

Deno.test("gateway commands refuse an unknown flag with the usage and exit 2", async () => {
  const run = await task("device:register", ["--meter", "m-1", "--usr", "u-1"]);
  assert.equal(run.code, 2);
  assert.match(run.stderr, /Unknown option '--usr'/);
  assert.match(run.stderr, /Usage: deno task device:register/);
});

Deno.test("--help prints the usage and exits 0", async () => {
  for (const name of ["user:create", "device:list", "device:import"]) {
    const run = await ok(name, ["--help"]);
    assert.match(run.stdout, new RegExp(`Usage: deno task ${name}`));
  }
});
