// The end-to-end suites (HTTP, WebSocket, MQTT, CLI) once more, on PostgreSQL instead of Deno KV.
// Run by `deno task test` after the main run. Without PostgreSQL it says why and skips, unless
// CI is set: then a missing database fails the run.
import { postgresUrl, probePostgres, redactUrl, requireService } from "./_services.ts";

const SUITES = [
  "tests/http_flow_test.ts",
  "tests/http_rules_test.ts",
  "tests/http_bad_input_test.ts",
  "tests/http_login_limit_test.ts",
  "tests/http_hourly_test.ts",
  "tests/ws_test.ts",
  "tests/mqtt_embedded_test.ts",
  "tests/mqtt_crash_test.ts",
  "tests/cli_test.ts",
];

const status = await requireService(
  `PostgreSQL at ${redactUrl(postgresUrl())}`,
  probePostgres(postgresUrl()),
);
if (!status.ok) {
  console.log(`end-to-end run on PostgreSQL skipped: ${status.reason}`);
  Deno.exit(0);
}
console.log(`end-to-end suites on PostgreSQL (${redactUrl(postgresUrl())})`);
const child = new Deno.Command(Deno.execPath(), {
  args: ["test", "--allow-all", ...SUITES],
  env: { GATEWAY_TEST_STORE: "postgres" },
  stdout: "inherit",
  stderr: "inherit",
}).spawn();
Deno.exit((await child.status).code);
