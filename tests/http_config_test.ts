// The HTTP listener's and the body budget's settings: defaults, and bad values named.
import { deepEqual, fail, ok } from "node:assert/strict";
import { loadConfig } from "../core/config.ts";
import { ConfigError } from "../core/errors.ts";

Deno.test("loadConfig() gives the HTTP listener bounded defaults", () => {
  deepEqual(loadConfig({}).http, {
    bodyBudget: 64 * 1024 * 1024,
    maxConnections: 512,
    maxConnectionsPerAddress: 32,
    headerTimeoutMs: 10_000,
    idleTimeoutMs: 60_000,
    requestTimeoutMs: 60_000,
  });
  deepEqual(
    loadConfig({
      HTTP_BODY_BUDGET: "9000000",
      HTTP_MAX_CONNECTIONS: "2000",
      HTTP_MAX_CONNECTIONS_PER_ADDRESS: "50",
      HTTP_HEADER_TIMEOUT: "5s",
      HTTP_IDLE_TIMEOUT: "2m",
      HTTP_REQUEST_TIMEOUT: "45s",
    }).http,
    {
      bodyBudget: 9_000_000,
      maxConnections: 2000,
      maxConnectionsPerAddress: 50,
      headerTimeoutMs: 5_000,
      idleTimeoutMs: 120_000,
      requestTimeoutMs: 45_000,
    },
  );
});

Deno.test("loadConfig() names each bad HTTP_* setting", () => {
  try {
    loadConfig({
      HTTP_BODY_BUDGET: "10",
      HTTP_MAX_CONNECTIONS: "0",
      HTTP_MAX_CONNECTIONS_PER_ADDRESS: "many",
      HTTP_HEADER_TIMEOUT: "soon",
      HTTP_IDLE_TIMEOUT: "0s",
    });
    fail("expected a ConfigError");
  } catch (error) {
    ok(error instanceof ConfigError);
    deepEqual(error.variables.sort(), [
      "HTTP_BODY_BUDGET",
      "HTTP_HEADER_TIMEOUT",
      "HTTP_IDLE_TIMEOUT",
      "HTTP_MAX_CONNECTIONS",
      "HTTP_MAX_CONNECTIONS_PER_ADDRESS",
    ]);
  }
});

Deno.test("loadConfig() refuses a body budget smaller than one allowed body", () => {
  try {
    loadConfig({ HTTP_BODY_BUDGET: "1048576" });
    fail("expected a ConfigError");
  } catch (error) {
    ok(error instanceof ConfigError);
    deepEqual(error.variables, ["HTTP_BODY_BUDGET"]);
  }
});
