// `deno task device:revoke`: revokes a meter; every instance rejects its readings from then on.
import { fatal, parseFlags, requiredMeterId } from "./_args.ts";
import {
  apiPath,
  CONNECTION_OPTIONS,
  CONNECTION_USAGE,
  type DeviceView,
  withGateway,
} from "./_client.ts";

const USAGE = `Usage: deno task device:revoke --meter ID [--reason TEXT]

Revokes a meter: every gateway instance rejects its readings (device_revoked) within a second.
Its stored readings are kept.

Options:
  --meter ID             Meter id
  --reason TEXT          Why, for the audit log (at most 500 characters)
  --json                 Print the revoked device as JSON
  -h, --help             Show this help

${CONNECTION_USAGE}`;

function main(args: string[]): Promise<void> {
  const flags = parseFlags(args, {
    usage: USAGE,
    options: {
      meter: { type: "string" },
      reason: { type: "string" },
      json: { type: "boolean", default: false },
      ...CONNECTION_OPTIONS,
    },
  });
  const meterId = requiredMeterId(flags.meter);
  const reason = flags.reason;
  if (reason !== undefined && reason.length > 500) {
    fatal(`--reason is ${reason.length} characters; at most 500 are kept in the audit log`);
  }

  return withGateway(flags, async (client) => {
    const device = await client.request<DeviceView>(
      "POST",
      apiPath`/api/admin/devices/${meterId}/revoke`,
      { body: reason === undefined ? {} : { reason } },
    );
    if (flags.json) {
      console.log(JSON.stringify(device, null, 2));
    } else {
      console.log(`Revoked meter "${device.meter_id}" at ${device.revoked_at}.`);
    }
  });
}

if (import.meta.main) await main(Deno.args);
