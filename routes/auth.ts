import { createRoute, OpenAPIHono, z } from "@hono/zod-openapi";
import type { MiddlewareHandler } from "hono";
import { GatewayError } from "../core/errors.ts";
import { emailSchema, passwordSchema } from "../core/user.ts";
import type { TokenService } from "../services/tokens.ts";
import type { UserService } from "../services/users.ts";
import { commonErrors, ErrorSchema, jsonBody, jsonResponse, TokenSchema } from "./schemas.ts";
import { validationHook } from "./validation.ts";
import { type AuthEnv, bearerAuth, clientAddress, perAddressLimit } from "./middleware.ts";
import type { Clock } from "../core/clock.ts";

const LoginSchema = z.strictObject({
  email: emailSchema,
  password: z.string().min(1).max(256),
}).openapi("Login");

const PasswordChangeSchema = z.strictObject({
  current_password: z.string().min(1).max(256),
  new_password: passwordSchema,
}).openapi("PasswordChange");

const limited = jsonResponse(ErrorSchema, "Too many attempts; see Retry-After");

const login = createRoute({
  method: "post",
  path: "/login",
  tags: ["auth"],
  summary: "Exchange email and password for a JWT access token",
  description: "Limited per client address (LOGIN_RATE_LIMIT per minute) and per account: " +
    "after LOGIN_BACKOFF_AFTER failed attempts each further one waits 1 s, 2 s, 4 s … up to " +
    "LOGIN_BACKOFF_MAX (429 with Retry-After); a successful login resets the account.",
  request: { body: jsonBody(LoginSchema) },
  responses: { 200: jsonResponse(TokenSchema, "Access token"), 429: limited, ...commonErrors },
});

const password = createRoute({
  method: "post",
  path: "/password",
  tags: ["auth"],
  summary: "Change your password; every earlier token ends, a new one is returned",
  security: [{ bearer: [] }],
  request: { body: jsonBody(PasswordChangeSchema) },
  responses: { 200: jsonResponse(TokenSchema, "New access token"), 429: limited, ...commonErrors },
});

const logout = createRoute({
  method: "post",
  path: "/logout",
  tags: ["auth"],
  summary: "End every access token of your account (all sessions) and its WebSockets",
  security: [{ bearer: [] }],
  responses: { 204: { description: "Logged out" }, ...commonErrors },
});

/** Responses that carry tokens are never stored by caches. */
function noStore(): MiddlewareHandler {
  return async function noStore(c, next) {
    await next();
    c.header("Cache-Control", "no-store");
    c.header("Pragma", "no-cache");
  };
}

/** `/api/auth`: login, password change, logout. */
export function authRoutes(
  deps: { users: UserService; tokens: TokenService; clock: Clock; loginPerMinute: number },
): OpenAPIHono<AuthEnv> {
  const app = new OpenAPIHono<AuthEnv>({ defaultHook: validationHook });
  const security = deps.tokens.security;
  app.use("*", noStore());
  // Password guessing is bounded per client address, and per account by the users' back-off.
  app.use(
    "/login",
    perAddressLimit({ perMinute: deps.loginPerMinute, clock: deps.clock, what: "login" }),
  );
  app.use("/password", bearerAuth(deps.tokens));
  app.use("/logout", bearerAuth(deps.tokens));
  return app
    .openapi(login, async (c) => {
      const { email, password } = c.req.valid("json");
      try {
        const user = await deps.users.login(email, password);
        return c.json(await deps.tokens.issue(user), 200);
      } catch (error) {
        if (error instanceof GatewayError && error.code !== "overloaded") {
          security?.warn("login_failed", clientAddress(c), { email, reason: error.message });
        }
        throw error;
      }
    })
    .openapi(password, async (c) => {
      const { current_password, new_password } = c.req.valid("json");
      const id = c.var.principal.user_id;
      try {
        const user = await deps.users.changePassword(id, current_password, new_password);
        return c.json(await deps.tokens.issue(user), 200);
      } catch (error) {
        if (error instanceof GatewayError && error.code !== "overloaded") {
          security?.warn("login_failed", clientAddress(c), { user_id: id, reason: error.message });
        }
        throw error;
      }
    })
    .openapi(logout, async (c) => {
      await deps.users.logout(c.var.principal.user_id);
      return c.body(null, 204);
    });
}
