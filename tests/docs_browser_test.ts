// A real headless Chromium (Debian's `chromium`, driven by playwright-core) opens `/docs` with
// every request off 127.0.0.1 blocked, and sees the API's operations listed: the docs UI needs no
// CDN. Skipped with its reason when /usr/bin/chromium is missing, except under CI, where it fails.
import { deepEqual, equal, match, ok } from "node:assert/strict";
import { chromium } from "playwright-core";
import { startTestGateway } from "./_gateway.ts";

const CHROMIUM = "/usr/bin/chromium";
const present = await Deno.stat(CHROMIUM).then((s) => s.isFile, () => false);
const inCi = Boolean(Deno.env.get("CI"));
const skip = !present && !inCi;
if (skip) console.warn(`docs_browser_test: skipped, ${CHROMIUM} is not installed`);

Deno.test({
  name: skip
    ? `/docs lists the API operations in headless Chromium (skipped: no ${CHROMIUM})`
    : "/docs lists the API operations in headless Chromium without any network",
  ignore: skip,
  async fn(t) {
    ok(present, `${CHROMIUM} is missing: install Debian's chromium (CI installs it)`);
    await using gw = await startTestGateway();
    const profile = await Deno.makeTempDir({ prefix: "gw-chromium-" });
    const context = await chromium.launchPersistentContext(profile, {
      executablePath: CHROMIUM,
      headless: true,
      args: [
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
      ],
    });
    const blocked: string[] = [];
    const failed: string[] = [];
    const violations: string[] = [];
    try {
      const page = context.pages()[0] ?? await context.newPage();
      await page.route("**/*", (route) => {
        const url = new URL(route.request().url());
        if (url.hostname === "127.0.0.1") return route.continue();
        blocked.push(url.href);
        return route.abort();
      });
      page.on("requestfailed", (r) => failed.push(r.url()));
      page.on("console", (m) => {
        if (/Content Security Policy|Refused to/i.test(m.text())) violations.push(m.text());
      });

      await t.step(
        "the landing page links to the docs, the document, health and metrics",
        async () => {
          await page.goto(`${gw.url}/`);
          const links = await page.locator("a").evaluateAll((as) =>
            as.map((a) => a.getAttribute("href"))
          );
          deepEqual(links, ["/docs", "/openapi.json", "/healthz", "/metrics"]);
        },
      );

      await t.step("/docs renders every tag's operations from /openapi.json", async () => {
        const response = await page.goto(`${gw.url}/docs`);
        equal(response?.status(), 200);
        match(response?.headers()["content-security-policy"] ?? "", /default-src 'self'/);
        await page.locator(".opblock").first().waitFor({ timeout: 30_000 });
        const paths = await page.locator(".opblock-summary-path").allTextContents();
        const shown = paths.map((p) => p.replace(/\u200b/g, "").trim());
        for (
          const path of [
            "/api/auth/login",
            "/api/meters/submit-reading",
            "/api/admin/users",
            "/api/admin/devices/import",
          ]
        ) {
          ok(shown.includes(path), `${path} is not listed; shown: ${shown.join(", ")}`);
        }
        match(await page.title(), /GridTokenX/);
      });

      await t.step("nothing was fetched from elsewhere and the CSP held", () => {
        deepEqual(blocked, [], "requests off 127.0.0.1");
        deepEqual(failed, [], "failed requests");
        deepEqual(violations, [], "CSP violations");
      });
    } finally {
      await context.close();
      await Deno.remove(profile, { recursive: true });
    }
  },
});
