import { createRoute, OpenAPIHono, z } from "@hono/zod-openapi";
import type { ActorRegistry } from "../actors/registry.ts";
import type { TokenService } from "../services/tokens.ts";
import { type AuthEnv, bearerAuth, requireRole } from "./middleware.ts";
import { commonErrors, jsonResponse } from "./schemas.ts";
import { validationHook } from "./validation.ts";

const TopMetersSchema = z.object({
  items: z.array(z.object({
    meter_id: z.string(),
    stored: z.number().int().openapi({ description: "Readings stored since activation" }),
    last_active: z.string().openapi({ format: "date-time" }),
  })),
}).openapi("TopMeters");

const top = createRoute({
  method: "get",
  path: "/top-meters",
  tags: ["admin"],
  summary: "The busiest live meters of this instance (admin)",
  description: "Per-meter figures are not metric labels (a series per meter would explode at " +
    "100k meters): this lists the `n` live meters of this instance that stored the most readings " +
    "since their actor was activated.",
  security: [{ bearer: [] }],
  request: { query: z.object({ n: z.coerce.number().int().min(1).max(100).default(10) }) },
  responses: { 200: jsonResponse(TopMetersSchema, "Busiest meters first"), ...commonErrors },
});

/** `/api/admin/metrics`: per-meter views that would be unbounded as labels. */
export function adminMetricsRoutes(
  deps: { registry: ActorRegistry; tokens: TokenService },
): OpenAPIHono<AuthEnv> {
  const app = new OpenAPIHono<AuthEnv>({ defaultHook: validationHook });
  app.use(bearerAuth(deps.tokens), requireRole("admin"));
  return app.openapi(top, (c) => {
    const items = deps.registry.topMeters(c.req.valid("query").n).map((m) => ({
      ...m,
      last_active: new Date(m.last_active).toISOString(),
    }));
    return c.json({ items }, 200);
  });
}
