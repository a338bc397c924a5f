// `deno task device:register`: registers a meter to a user and shows its first key once.
import { fatal, parseFlags, required, requiredMeterId, valueOrFile } from "./_args.ts";
import {
  CONNECTION_OPTIONS,
  CONNECTION_USAGE,
  type IssuedKey,
  SECRET_WARNING,
  withGateway,
} from "./_client.ts";

const ALGORITHMS = ["hmac-sha256", "ed25519"];

const USAGE = `Usage: deno task device:register --meter ID --user USER_ID [options]

Registers a meter to its owner and issues the meter's first key. For hmac-sha256 the gateway
generates the secret and prints it once; for ed25519 pass the device's public key.

Options:
  --meter ID             Meter id (1-64 characters of A-Z a-z 0-9 . _ : -)
  --user USER_ID         Owner's user id (the "id" printed by user:create)
  --algorithm ALG        hmac-sha256 (default) or ed25519
  --public-key KEY       Ed25519 public key: 32 raw bytes as hex or base64url, a PEM public key,
                         or @path to read it from a file
  --json                 Print the issued key as JSON
  -h, --help             Show this help

${CONNECTION_USAGE}`;

function main(args: string[]): Promise<void> {
  const flags = parseFlags(args, {
    usage: USAGE,
    options: {
      meter: { type: "string" },
      user: { type: "string" },
      algorithm: { type: "string", default: "hmac-sha256" },
      "public-key": { type: "string" },
      json: { type: "boolean", default: false },
      ...CONNECTION_OPTIONS,
    },
  });
  const meterId = requiredMeterId(flags.meter);
  const userId = required(flags.user, "user");
  const algorithm = flags.algorithm;
  if (!ALGORITHMS.includes(algorithm)) {
    fatal(`--algorithm "${algorithm}" must be hmac-sha256 or ed25519`);
  }
  const publicKey = flags["public-key"] === undefined
    ? undefined
    : valueOrFile(flags["public-key"], "public-key");
  if (algorithm === "ed25519" && publicKey === undefined) {
    fatal("--algorithm ed25519 needs --public-key (the device keeps its private key)");
  }
  if (algorithm === "hmac-sha256" && publicKey !== undefined) {
    fatal("--public-key is only for ed25519; the gateway generates hmac-sha256 secrets");
  }

  return withGateway(flags, async (client) => {
    const issued = await client.request<IssuedKey>("POST", "/api/admin/devices/register", {
      body: {
        meter_id: meterId,
        user_id: userId,
        algorithm,
        ...(publicKey === undefined ? {} : { public_key: publicKey }),
      },
    });
    if (flags.json) {
      console.log(JSON.stringify(issued, null, 2));
    } else {
      console.log(`Registered meter "${issued.meter_id}" to user "${userId}".`);
      console.log(`meter_id:   ${issued.meter_id}`);
      console.log(`key_id:     ${issued.key_id}`);
      console.log(`algorithm:  ${issued.algorithm}`);
      if (issued.secret_hex) console.log(`secret_hex: ${issued.secret_hex}`);
    }
    if (issued.secret_hex) console.error(SECRET_WARNING);
  });
}

if (import.meta.main) await main(Deno.args);
