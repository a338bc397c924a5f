import type { Context, MiddlewareHandler } from "hono";
import { getConnInfo } from "hono/deno";
import type { Clock } from "../core/clock.ts";
import { GatewayError } from "../core/errors.ts";
import type { SecurityLog } from "../core/security_log.ts";
import type { Principal, Role } from "../core/user.ts";
import type { TokenService } from "../services/tokens.ts";

/** Hono environment of authenticated routes. */
export type AuthEnv = { Variables: { principal: Principal; securityLog?: SecurityLog } };

/**
 * Requires a bearer token, checked against the account's current state on every request
 * (in-memory, see services/user_state.ts); sets `principal`, once per request.
 */
export function bearerAuth(tokens: TokenService): MiddlewareHandler<AuthEnv> {
  return async function bearerAuth(c, next) {
    // Verified earlier in this request (before its body was read): once is enough.
    if ((c.var as { principal?: Principal }).principal) return next();
    const header = c.req.header("authorization") ?? "";
    const match = /^Bearer\s+(\S+)$/i.exec(header);
    if (!match) {
      throw new GatewayError("unauthorized", "Send an Authorization: Bearer <token> header");
    }
    c.set("principal", await tokens.verify(match[1], clientAddress(c)));
    if (tokens.security) c.set("securityLog", tokens.security);
    await next();
  };
}

/** Requires one of `roles`; a refusal is logged as a security event. */
export function requireRole(...roles: Role[]): MiddlewareHandler<AuthEnv> {
  return async function requireRole(c, next) {
    if (!roles.includes(c.var.principal.role)) {
      c.var.securityLog?.warn("forbidden", clientAddress(c), {
        user_id: c.var.principal.user_id,
        role: c.var.principal.role,
        method: c.req.method,
        path: c.req.path,
      });
      throw new GatewayError(
        "forbidden",
        `This needs the role ${roles.map((r) => `"${r}"`).join(" or ")}`,
      );
    }
    await next();
  };
}

/** The client's address, or `"unknown"` when served in-process. */
export function clientAddress(c: Context): string {
  try {
    return getConnInfo(c).remote.address ?? "unknown";
  } catch {
    return "unknown";
  }
}

/**
 * Fixed-window limit of requests per minute per client: per account behind `bearerAuth` (so
 * another address does not bypass it, and a neighbour behind the same address cannot use up an
 * account's budget), else per client address.
 */
export function perAddressLimit(
  options: { perMinute: number; clock: Clock; what: string },
): MiddlewareHandler {
  const windows = new Map<string, { start: number; count: number }>();
  return async function perAddressLimit(c, next) {
    const now = options.clock.now();
    const principal = (c.var as { principal?: Principal }).principal;
    const address = principal ? `account:${principal.user_id}` : clientAddress(c);
    let w = windows.get(address);
    if (!w || now - w.start >= 60_000) {
      // Forget finished windows so the map stays bounded by the active clients.
      if (windows.size > 10_000) {
        for (const [k, v] of windows) if (now - v.start >= 60_000) windows.delete(k);
      }
      w = { start: now, count: 0 };
      windows.set(address, w);
    }
    if (++w.count > options.perMinute) {
      throw new GatewayError(
        "rate_limited",
        `At most ${options.perMinute} ${options.what} requests per minute per ${
          principal ? "account" : "address"
        }`,
        { retryAfter: Math.ceil((w.start + 60_000 - now) / 1000) },
      );
    }
    await next();
  };
}
