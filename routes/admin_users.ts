import { createRoute, OpenAPIHono, z } from "@hono/zod-openapi";
import { GatewayError } from "../core/errors.ts";
import { emailSchema, passwordProblem, passwordSchema, ROLES, walletSchema } from "../core/user.ts";
import type { TokenService } from "../services/tokens.ts";
import type { UserService } from "../services/users.ts";
import { type AuthEnv, bearerAuth, requireRole } from "./middleware.ts";
import {
  commonErrors,
  ErrorSchema,
  jsonBody,
  jsonResponse,
  UserIdParam,
  UserSchema,
  userView,
} from "./schemas.ts";
import { validationHook } from "./validation.ts";

const NewUserSchema = z.strictObject({
  email: emailSchema,
  password: passwordSchema,
  role: z.enum(ROLES).default("user"),
  wallet_address: walletSchema.optional(),
}).openapi("NewUser");

const UserPatchSchema = z.strictObject({
  role: z.enum(ROLES).optional(),
  disabled: z.boolean().optional(),
}).refine((p) => p.role !== undefined || p.disabled !== undefined, {
  message: "Give role, disabled or both",
}).openapi("UserPatch");

const notFound = jsonResponse(ErrorSchema, "No such user");
const lastAdmin = jsonResponse(ErrorSchema, "The change would leave no active admin");

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

const get = createRoute({
  method: "get",
  path: "/{id}",
  tags: ["admin"],
  summary: "Show a user (admin)",
  security: [{ bearer: [] }],
  request: { params: UserIdParam },
  responses: { 200: jsonResponse(UserSchema, "The user"), 404: notFound, ...commonErrors },
});

const patch = createRoute({
  method: "patch",
  path: "/{id}",
  tags: ["admin"],
  summary: "Change a user's role or disable it (admin); its tokens end at once",
  description: "Any change ends every token of the user, on every instance, and closes its " +
    "WebSockets (code 4001). At least one enabled admin always remains (409 otherwise).",
  security: [{ bearer: [] }],
  request: { params: UserIdParam, body: jsonBody(UserPatchSchema) },
  responses: {
    200: jsonResponse(UserSchema, "The changed user"),
    404: notFound,
    409: lastAdmin,
    ...commonErrors,
  },
});

const remove = createRoute({
  method: "delete",
  path: "/{id}",
  tags: ["admin"],
  summary: "Delete a user (admin); its tokens end at once",
  description: "Refused (409) for the last enabled admin, and while the user owns meters that " +
    "are not revoked: revoke or re-register them first, so that no active meter keeps " +
    "crediting readings to a deleted account.",
  security: [{ bearer: [] }],
  request: { params: UserIdParam },
  responses: {
    204: { description: "Deleted" },
    404: notFound,
    409: jsonResponse(ErrorSchema, "The last active admin, or the user still owns active meters"),
    ...commonErrors,
  },
});

/** `/api/admin/users`. */
export function adminUserRoutes(
  deps: { users: UserService; tokens: TokenService },
): OpenAPIHono<AuthEnv> {
  const app = new OpenAPIHono<AuthEnv>({ defaultHook: validationHook });
  app.use(bearerAuth(deps.tokens), requireRole("admin"));
  return app
    .openapi(create, async (c) => {
      const input = c.req.valid("json");
      // The schema checked the password alone; now against the account's email too.
      const problem = passwordProblem(input.password, { email: input.email });
      if (problem !== null) throw new GatewayError("invalid_payload", problem);
      const user = await deps.users.create(input);
      return c.json(userView(user), 201);
    })
    .openapi(get, async (c) => {
      const { id } = c.req.valid("param");
      const user = await deps.users.get(id);
      if (!user) throw new GatewayError("not_found", `User "${id}" not found`);
      return c.json(userView(user), 200);
    })
    .openapi(patch, async (c) => {
      const user = await deps.users.update(c.req.valid("param").id, c.req.valid("json"));
      return c.json(userView(user), 200);
    })
    .openapi(remove, async (c) => {
      await deps.users.remove(c.req.valid("param").id);
      return c.body(null, 204);
    });
}
