import { createRoute, OpenAPIHono, z } from "@hono/zod-openapi";
import { emailSchema, passwordSchema, ROLES, walletSchema } from "../core/user.ts";
import type { TokenService } from "../services/tokens.ts";
import type { UserService } from "../services/users.ts";
import { type AuthEnv, bearerAuth, requireRole } from "./middleware.ts";
import { commonErrors, ErrorSchema, jsonBody, jsonResponse, UserSchema } from "./schemas.ts";
import { validationHook } from "./validation.ts";

const NewUserSchema = z.strictObject({
  email: emailSchema,
  password: passwordSchema,
  role: z.enum(ROLES).default("user"),
  wallet_address: walletSchema.optional(),
}).openapi("NewUser");

const create = createRoute({
  method: "post",
  path: "/",
  tags: ["admin"],
  summary: "Create a user (admin)",
  security: [{ bearer: [] }],
  request: { body: jsonBody(NewUserSchema) },
  responses: {
    201: jsonResponse(UserSchema, "Created"),
    409: jsonResponse(ErrorSchema, "Email already registered"),
    ...commonErrors,
  },
});

/** `/api/admin/users`. */
export function adminUserRoutes(
  deps: { users: UserService; tokens: TokenService },
): OpenAPIHono<AuthEnv> {
  const app = new OpenAPIHono<AuthEnv>({ defaultHook: validationHook });
  app.use(bearerAuth(deps.tokens), requireRole("admin"));
  return app.openapi(create, async (c) => {
    const user = await deps.users.create(c.req.valid("json"));
    return c.json({ ...user, created_at: new Date(user.created_at).toISOString() }, 201);
  });
}
