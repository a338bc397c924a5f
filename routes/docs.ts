// The API docs UI and the landing page, served from the gateway itself: on a network without
// internet the docs still work, and no unpinned third-party code runs in an operator's browser.
// The Swagger UI assets come from the pinned npm package, embedded in the module graph (text
// imports), so they are fetched with the rest at `deno cache` time.
import { Hono } from "hono";
import bundle from "swagger-ui-dist/swagger-ui-bundle.js" with { type: "text" };
import css from "swagger-ui-dist/swagger-ui.css" with { type: "text" };
import pkg from "swagger-ui-dist/package.json" with { type: "json" };

/** Where the assets live; the version in the path lets browsers cache them for good. */
export const DOCS_ASSETS = `/docs/assets/${pkg.version}`;

// Only our own origin; Swagger UI's icons are data: URLs and its components set style
// attributes. No inline script: the initializer is a file of its own.
const CSP = [
  "default-src 'self'",
  "img-src 'self' data:",
  "style-src 'self' 'unsafe-inline'",
  "script-src 'self'",
  "connect-src 'self'",
  "object-src 'none'",
  "base-uri 'none'",
  "frame-ancestors 'none'",
  "form-action 'self'",
].join("; ");

const INIT = `window.addEventListener("load", function () {
  window.ui = SwaggerUIBundle({
    url: document.getElementById("swagger-ui").dataset.url,
    dom_id: "#swagger-ui",
    deepLinking: true,
    // The default asks validator.swagger.io about our document: no third-party calls.
    validatorUrl: null,
    persistAuthorization: false,
  });
});
`;

const DOCS_HTML = `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>GridTokenX Meter Gateway API</title>
<link rel="stylesheet" href="${DOCS_ASSETS}/swagger-ui.css">
</head>
<body>
<div id="swagger-ui" data-url="/openapi.json"></div>
<script src="${DOCS_ASSETS}/swagger-ui-bundle.js"></script>
<script src="${DOCS_ASSETS}/init.js"></script>
</body>
</html>
`;

const LANDING_HTML = `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>GridTokenX Meter Gateway</title>
<style>
body { font-family: system-ui, sans-serif; max-width: 40rem; margin: 3rem auto; padding: 0 1rem; }
li { margin: .4rem 0; }
</style>
</head>
<body>
<h1>GridTokenX Meter Gateway</h1>
<p>Signed smart-meter readings in, stored exactly once, streamed live.</p>
<ul>
<li><a href="/docs">/docs</a>: the REST API, interactive</li>
<li><a href="/openapi.json">/openapi.json</a>: the OpenAPI 3.1 document</li>
<li><a href="/healthz">/healthz</a>: liveness</li>
<li><a href="/metrics">/metrics</a>: Prometheus metrics</li>
</ul>
</body>
</html>
`;

const LONG_CACHE = "public, max-age=31536000, immutable";

interface Asset {
  body: string;
  type: string;
}

const ASSETS = new Map<string, Asset>([
  ["swagger-ui-bundle.js", { body: bundle, type: "text/javascript; charset=utf-8" }],
  ["swagger-ui.css", { body: css, type: "text/css; charset=utf-8" }],
  ["init.js", { body: INIT, type: "text/javascript; charset=utf-8" }],
]);

function page(html: string): Response {
  return new Response(html, {
    headers: {
      "content-type": "text/html; charset=utf-8",
      "content-security-policy": CSP,
      "x-content-type-options": "nosniff",
      "referrer-policy": "no-referrer",
      "cache-control": "no-cache",
    },
  });
}

/** `/` (landing page), `/docs` (Swagger UI) and `/docs/assets/<version>/*`. */
export function docsRoutes(): Hono {
  return new Hono()
    .get("/", () => page(LANDING_HTML))
    .get("/docs", () => page(DOCS_HTML))
    .get(`${DOCS_ASSETS}/:name`, (c) => {
      const asset = ASSETS.get(c.req.param("name"));
      if (!asset) return c.notFound();
      return new Response(asset.body, {
        headers: {
          "content-type": asset.type,
          "cache-control": LONG_CACHE,
          "x-content-type-options": "nosniff",
        },
      });
    });
}
