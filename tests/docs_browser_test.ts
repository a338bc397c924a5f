// A real headless Chromium (Debian's `chromium`, driven by playwright-core) opens `/docs` with
// every request off 127.0.0.1 blocked, and sees the API's operations listed: the docs UI needs no
// CDN. Skipped with its reason when /usr/bin/chromium is missing, except under CI, where it fails.
import { deepEqual, equal, match, ok } from "node:assert/strict";
import { fileURLToPath } from "node:url";
import { startTestGateway } from "./_gateway.ts";

const CHROMIUM = "/usr/bin/chromium";
const DRIVER = fileURLToPath(new URL("./_docs_browser.ts", import.meta.url));
const present = await Deno.stat(CHROMIUM).then((s) => s.isFile, () => false);
const skip = !present && !Deno.env.get("CI");
if (skip) console.warn(`docs_browser_test: skipped, ${CHROMIUM} is not installed`);

interface Seen {
  links: string[];
  status?: number;
  csp: string;
  title: string;
  paths: string[];
  error?: string;
  blocked: string[];
  failed: string[];
  violations: string[];
}

Deno.test({
  name: skip
    ? `/docs lists the API operations in headless Chromium (skipped: no ${CHROMIUM})`
    : "/docs lists the API operations in headless Chromium without any network",
  ignore: skip,
  async fn(t) {
    ok(present, `${CHROMIUM} is missing: install Debian's chromium (CI installs it)`);
    await using gw = await startTestGateway();
    const out = await new Deno.Command(Deno.execPath(), {
      args: ["run", "--allow-all", DRIVER, gw.url, CHROMIUM],
      stdout: "piped",
      stderr: "piped",
    }).output();
    const stderr = new TextDecoder().decode(out.stderr);
    equal(out.code, 0, `the browser driver failed:\n${stderr}`);
    const seen: Seen = JSON.parse(new TextDecoder().decode(out.stdout).trim().split("\n").at(-1)!);

    await t.step("the landing page links to the docs, the document, health and metrics", () => {
      deepEqual(seen.links, ["/docs", "/openapi.json", "/healthz", "/metrics"]);
    });

    await t.step("/docs renders the operations from /openapi.json", () => {
      equal(seen.status, 200);
      match(seen.csp, /default-src 'self'/);
      match(seen.title, /GridTokenX/);
      equal(seen.error, undefined, "no operation appeared");
      for (
        const path of [
          "/api/auth/login",
          "/api/meters/submit-reading",
          "/api/admin/users",
          "/api/admin/devices/import",
        ]
      ) {
        ok(seen.paths.includes(path), `${path} is not listed; shown: ${seen.paths.join(", ")}`);
      }
    });

    await t.step("nothing was fetched from elsewhere and the CSP held", () => {
      deepEqual(seen.blocked, [], "requests off 127.0.0.1");
      deepEqual(seen.failed, [], "failed requests");
      deepEqual(seen.violations, [], "CSP violations");
    });
  },
});
