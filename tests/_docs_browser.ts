// `deno run -A tests/_docs_browser.ts <gateway url>`: headless Chromium (Debian's, driven by
// playwright-core) opens `/` and `/docs` with every request off 127.0.0.1 blocked and prints
// what it saw as one JSON line. A child process because playwright-core reads /proc files at
// import, which Deno allows only with --allow-all (the test suite runs with narrower flags).
import { chromium } from "playwright-core";

const [url, executablePath] = Deno.args;
const profile = await Deno.makeTempDir({ prefix: "gw-chromium-" });
const context = await chromium.launchPersistentContext(profile, {
  executablePath,
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
    const target = new URL(route.request().url());
    if (target.hostname === "127.0.0.1") return route.continue();
    blocked.push(target.href);
    return route.abort();
  });
  page.on("requestfailed", (r) => failed.push(r.url()));
  page.on("console", (m) => {
    if (/Content Security Policy|Refused to/i.test(m.text())) violations.push(m.text());
  });

  await page.goto(`${url}/`);
  const links = await page.locator("a").evaluateAll((as) => as.map((a) => a.getAttribute("href")));

  const response = await page.goto(`${url}/docs`);
  let paths: string[] = [];
  let error: string | undefined;
  try {
    await page.locator(".opblock").first().waitFor({ timeout: 30_000 });
    paths = (await page.locator(".opblock-summary-path").allTextContents())
      .map((p) => p.replace(/\u200b/g, "").trim());
  } catch (e) {
    error = (e as Error).message.split("\n")[0];
  }
  console.log(JSON.stringify({
    links,
    status: response?.status(),
    csp: response?.headers()["content-security-policy"] ?? "",
    title: await page.title(),
    paths,
    error,
    blocked,
    failed,
    violations,
  }));
} finally {
  await context.close();
  await Deno.remove(profile, { recursive: true });
}
