import { createRoute, OpenAPIHono, z } from "@hono/zod-openapi";
import { GatewayError } from "../core/errors.ts";
import { emailSchema } from "../core/user.ts";
import type { TokenService } from "../services/tokens.ts";
import type { UserService } from "../services/users.ts";
import { commonErrors, jsonBody, jsonResponse } from "./schemas.ts";
import { validationHook } from "./validation.ts";
import { perAddressLimit } from "./middleware.ts";
import type { Clock } from "../core/clock.ts";

const LoginSchema = z.strictObject({
  email: emailSchema,
  password: z.string().min(1).max(256),
}).openapi("Login");

const TokenSchema = z.object({
  access_token: z.string(),
  token_type: z.literal("Bearer"),
  expires_in: z.number().int(),
}).openapi("AccessToken");

const login = createRoute({
  method: "post",
  path: "/login",
  tags: ["auth"],
  summary: "Exchange email and password for a JWT access token",
  request: { body: jsonBody(LoginSchema) },
  responses: { 200: jsonResponse(TokenSchema, "Access token"), ...commonErrors },
});

/** `/api/auth`: login. */
export function authRoutes(
  deps: { users: UserService; tokens: TokenService; clock: Clock; loginPerMinute: number },
): OpenAPIHono {
  const app = new OpenAPIHono({ defaultHook: validationHook });
  // Password guessing is bounded per client address.
  app.use(
    "/login",
    perAddressLimit({ perMinute: deps.loginPerMinute, clock: deps.clock, what: "login" }),
  );
  return app.openapi(login, async (c) => {
    const { email, password } = c.req.valid("json");
    const user = await deps.users.authenticate(email, password);
    if (!user) throw new GatewayError("unauthorized", "Email or password is wrong");
    return c.json(await deps.tokens.issue(user), 200);
  });
}
