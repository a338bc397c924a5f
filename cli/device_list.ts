// `deno task device:list`: every registered device (all pages), as a table or JSON.
import { fatal, parseFlags } from "./_args.ts";
import {
  ApiError,
  CONNECTION_OPTIONS,
  CONNECTION_USAGE,
  type DeviceView,
  type GatewayClient,
  withGateway,
} from "./_client.ts";

const PAGE_SIZE = 1000; // the API's maximum `limit`

const USAGE = `Usage: deno task device:list [--user USER_ID] [--json]

Lists registered devices, following the API's pages until the end.

Options:
  --user USER_ID         Only this owner's devices
  --json                 Print a JSON array of devices (with every key) instead of a table
  -h, --help             Show this help

${CONNECTION_USAGE}`;

function main(args: string[]): Promise<void> {
  const flags = parseFlags(args, {
    usage: USAGE,
    options: {
      user: { type: "string" },
      json: { type: "boolean", default: false },
      ...CONNECTION_OPTIONS,
    },
  });
  if (flags.user === "") fatal("--user is empty; omit it to list every owner's devices");

  return withGateway(flags, async (client) => {
    const devices = await listAll(client, flags.user);
    if (flags.json) {
      console.log(JSON.stringify(devices, null, 2));
      return;
    }
    if (devices.length === 0) {
      console.log(flags.user === undefined ? "No devices." : `No devices of user "${flags.user}".`);
      return;
    }
    console.log(table(devices));
    console.log(`${devices.length} device${devices.length === 1 ? "" : "s"}`);
  });
}

/** Every page of GET /api/admin/devices. */
async function listAll(client: GatewayClient, userId?: string): Promise<DeviceView[]> {
  const devices: DeviceView[] = [];
  const seen = new Set<string>();
  let cursor: string | null = null;
  do {
    const query = new URLSearchParams({ limit: String(PAGE_SIZE) });
    if (userId !== undefined) query.set("user_id", userId);
    if (cursor !== null) query.set("cursor", cursor);
    const page: { items: DeviceView[]; next_cursor: string | null } = await client.request(
      "GET",
      `/api/admin/devices?${query}`,
    );
    devices.push(...page.items);
    cursor = page.next_cursor;
    // A cursor seen before would loop forever; that is a gateway bug worth reporting, not hiding.
    if (cursor !== null && seen.has(cursor)) {
      throw new ApiError(
        "bad_response",
        `The gateway returned the cursor "${cursor}" twice; stopped listing`,
        { status: 200 },
      );
    }
    if (cursor !== null) seen.add(cursor);
  } while (cursor !== null);
  return devices;
}

function table(devices: DeviceView[]): string {
  const header = [
    "METER_ID",
    "USER_ID",
    "STATUS",
    "ALGORITHM",
    "KEY_ID",
    "KEYS",
    "ROTATION",
    "CREATED_AT",
  ];
  const rows = devices.map((d) => {
    // The current key is the one not yet retired; retired ones are still valid during the grace.
    const current = d.keys.findLast((k) => k.retired_at === null) ?? d.keys.at(-1);
    return [
      d.meter_id,
      d.user_id,
      d.status,
      current?.algorithm ?? "-",
      current?.key_id ?? "-",
      String(d.keys.length),
      d.rotation_due ? "due" : "ok",
      d.created_at,
    ];
  });
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)));
  return [header, ...rows]
    .map((cells) => cells.map((c, i) => c.padEnd(widths[i])).join("  ").trimEnd())
    .join("\n");
}

if (import.meta.main) await main(Deno.args);
