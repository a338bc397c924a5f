// `deno task device:rotate`: issues a meter a new key; the old one stays valid for the grace period.
import { parseFlags, requiredMeterId, valueOrFile } from "./_args.ts";
import {
  CONNECTION_OPTIONS,
  CONNECTION_USAGE,
  type IssuedKey,
  SECRET_WARNING,
  withGateway,
} from "./_client.ts";

const USAGE = `Usage: deno task device:rotate --meter ID [--public-key KEY]

Issues a new key to a meter (same algorithm as its current key). The previous key stays valid
for the grace period (DEVICE_KEY_ROTATION_GRACE, default 24 h) so the meter can switch over.

Options:
  --meter ID             Meter id
  --public-key KEY       New Ed25519 public key (hex, base64url, PEM, or @path); ed25519 meters only
  --json                 Print the new key as JSON
  -h, --help             Show this help

${CONNECTION_USAGE}`;

function main(args: string[]): Promise<void> {
  const flags = parseFlags(args, {
    usage: USAGE,
    options: {
      meter: { type: "string" },
      "public-key": { type: "string" },
      json: { type: "boolean", default: false },
      ...CONNECTION_OPTIONS,
    },
  });
  const meterId = requiredMeterId(flags.meter);
  const publicKey = flags["public-key"] === undefined
    ? undefined
    : valueOrFile(flags["public-key"], "public-key");

  return withGateway(flags, async (client) => {
    const issued = await client.request<IssuedKey>(
      "POST",
      `/api/admin/devices/${encodeURIComponent(meterId)}/rotate`,
      { body: publicKey === undefined ? {} : { public_key: publicKey } },
    );
    if (flags.json) {
      console.log(JSON.stringify(issued, null, 2));
    } else {
      console.log(
        `Rotated meter "${issued.meter_id}"; its previous key stays valid for the grace period.`,
      );
      console.log(`meter_id:   ${issued.meter_id}`);
      console.log(`key_id:     ${issued.key_id}`);
      console.log(`algorithm:  ${issued.algorithm}`);
      if (issued.secret_hex) console.log(`secret_hex: ${issued.secret_hex}`);
    }
    if (issued.secret_hex) console.error(SECRET_WARNING);
  });
}

if (import.meta.main) await main(Deno.args);
