// `deno task device:rotate`: issues a meter a new key; the old one stays valid for the grace period.
import { parseDuration } from "../core/duration.ts";
import { fatal, parseFlags, requiredMeterId, valueOrFile } from "./_args.ts";
import {
  apiPath,
  CONNECTION_OPTIONS,
  CONNECTION_USAGE,
  type IssuedKey,
  SECRET_WARNING,
  withGateway,
} from "./_client.ts";

const USAGE = `Usage: deno task device:rotate --meter ID [--public-key KEY] [--grace DURATION]

Issues a new key to a meter (same algorithm as its current key). The previous key stays valid
for the grace period (DEVICE_KEY_ROTATION_GRACE, default 24 h) so the meter can switch over;
any older key stops verifying at once. For a leaked key, end its grace now with --grace 0.

Options:
  --meter ID             Meter id
  --public-key KEY       New Ed25519 public key (hex, base64url, PEM, or @path); ed25519 meters only
  --grace DURATION       How long the previous key stays valid: 0 (at once), 90s, 15m, 2h ...;
                         at most DEVICE_KEY_ROTATION_GRACE, which is the default
  --json                 Print the new key as JSON
  -h, --help             Show this help

${CONNECTION_USAGE}`;

function main(args: string[]): Promise<void> {
  const flags = parseFlags(args, {
    usage: USAGE,
    options: {
      meter: { type: "string" },
      "public-key": { type: "string" },
      grace: { type: "string" },
      json: { type: "boolean", default: false },
      ...CONNECTION_OPTIONS,
    },
  });
  const meterId = requiredMeterId(flags.meter);
  const publicKey = flags["public-key"] === undefined
    ? undefined
    : valueOrFile(flags["public-key"], "public-key");
  const graceSeconds = flags.grace === undefined ? undefined : graceOf(flags.grace);

  return withGateway(flags, async (client) => {
    const issued = await client.request<IssuedKey>(
      "POST",
      apiPath`/api/admin/devices/${meterId}/rotate`,
      {
        body: {
          ...(publicKey === undefined ? {} : { public_key: publicKey }),
          ...(graceSeconds === undefined ? {} : { grace_seconds: graceSeconds }),
        },
      },
    );
    if (flags.json) {
      console.log(JSON.stringify(issued, null, 2));
    } else {
      console.log(
        graceSeconds === 0
          ? `Rotated meter "${issued.meter_id}"; its previous key no longer verifies.`
          : `Rotated meter "${issued.meter_id}"; its previous key stays valid for ${
            graceSeconds === undefined ? "the grace period" : `${graceSeconds} s`
          }.`,
      );
      console.log(`meter_id:   ${issued.meter_id}`);
      console.log(`key_id:     ${issued.key_id}`);
      console.log(`algorithm:  ${issued.algorithm}`);
      if (issued.secret_hex) console.log(`secret_hex: ${issued.secret_hex}`);
    }
    if (issued.secret_hex) console.error(SECRET_WARNING);
  });
}

/** `--grace` in whole seconds; exits 2 when it is no duration. */
function graceOf(text: string): number {
  const ms = parseDuration(text);
  if (ms === undefined || ms % 1000 !== 0) {
    fatal(`--grace "${text}" is not a whole number of seconds or a duration like 0, 90s, 15m, 2h`);
  }
  return ms / 1000;
}

if (import.meta.main) await main(Deno.args);
