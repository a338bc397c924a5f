import { sign, verify } from "hono/jwt";
import type { Clock } from "../core/clock.ts";
import { GatewayError } from "../core/errors.ts";
import { type Principal, ROLES, type User } from "../core/user.ts";

/** The login response. */
export interface AccessToken {
  access_token: string;
  token_type: "Bearer";
  expires_in: number;
}

/** Issues and checks HS256 JWT access tokens. */
export class TokenService {
  #secret: string;
  #ttlMs: number;
  #clock: Clock;

  constructor(options: { secret: string; ttlMs: number; clock: Clock }) {
    this.#secret = options.secret;
    this.#ttlMs = options.ttlMs;
    this.#clock = options.clock;
  }

  /** Issues a token for `user`. */
  async issue(user: User): Promise<AccessToken> {
    const now = Math.floor(this.#clock.now() / 1000);
    const ttl = Math.floor(this.#ttlMs / 1000);
    const token = await sign(
      { sub: user.id, role: user.role, email: user.email, iat: now, exp: now + ttl },
      this.#secret,
      "HS256",
    );
    return { access_token: token, token_type: "Bearer", expires_in: ttl };
  }

  /** Verifies a token; throws `unauthorized` with the reason. */
  async verify(token: string): Promise<Principal> {
    let payload: Record<string, unknown>;
    try {
      payload = await verify(token, this.#secret, "HS256");
    } catch (error) {
      const expired = (error as Error).name === "JwtTokenExpired";
      throw new GatewayError(
        "unauthorized",
        expired ? "The access token has expired" : "The access token is invalid",
      );
    }
    const role = payload.role as Principal["role"];
    if (typeof payload.sub !== "string" || !ROLES.includes(role)) {
      throw new GatewayError("unauthorized", "The access token is invalid");
    }
    return { user_id: payload.sub, role };
  }
}
