// `deno task user:create`: creates a gateway account (admin only) and prints it as JSON.
import { fatal, parseFlags, required } from "./_args.ts";
import { withGateway } from "./_client.ts";

const ROLES = ["user", "operator", "admin"];

const USAGE =
  `Usage: deno task user:create --email EMAIL --password PASS [--role ROLE] [--wallet ADDR]

Creates a user on the running gateway and prints it as JSON (its "id" is the --user of
device:register). Needs an admin login.

Options:
  --email EMAIL          The new user's email
  --password PASS        The new user's password (at least 8 characters)
  --role ROLE            user (meter owner, default), operator (provisioning) or admin
  --wallet ADDR          Wallet address: Solana base58 or EVM 0x-hex
  -h, --help             Show this help

Gateway connection (--email/--password above are the new user's, so the admin logs in with):
  --url URL              Gateway base URL (env GATEWAY_URL; default http://127.0.0.1:$PORT or :8080)
  --token JWT            Bearer token of an admin (env GATEWAY_TOKEN)
  --admin-email EMAIL    Log in as this admin (env ADMIN_EMAIL)
  --admin-password PASS  The admin's password (env ADMIN_PASSWORD; prefer the env var)`;

function main(args: string[]): Promise<void> {
  const flags = parseFlags(args, {
    usage: USAGE,
    options: {
      email: { type: "string" },
      password: { type: "string" },
      role: { type: "string", default: "user" },
      wallet: { type: "string" },
      url: { type: "string" },
      token: { type: "string" },
      "admin-email": { type: "string" },
      "admin-password": { type: "string" },
    },
  });
  const email = required(flags.email, "email");
  const password = required(flags.password, "password");
  if (!ROLES.includes(flags.role)) {
    fatal(`--role "${flags.role}" must be one of ${ROLES.join(", ")}`);
  }
  const settings = {
    url: flags.url,
    token: flags.token,
    email: flags["admin-email"],
    password: flags["admin-password"],
  };
  return withGateway(settings, async (client) => {
    const user = await client.request("POST", "/api/admin/users", {
      body: {
        email,
        password,
        role: flags.role,
        ...(flags.wallet === undefined ? {} : { wallet_address: flags.wallet }),
      },
    });
    console.log(JSON.stringify(user, null, 2));
  });
}

if (import.meta.main) await main(Deno.args);
