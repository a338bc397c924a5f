import { Buffer } from "node:buffer";
import { createHmac, timingSafeEqual } from "node:crypto";
import { sign } from "hono/jwt";
import type { Clock } from "../core/clock.ts";
import { GatewayError } from "../core/errors.ts";
import type { SecurityLog } from "../core/security_log.ts";
import { type Principal, ROLES, type User } from "../core/user.ts";
import type { UserStateCache } from "./user_state.ts";

/** The login response. */
export interface AccessToken {
  access_token: string;
  token_type: "Bearer";
  expires_in: number;
}

/** Options of {@linkcode TokenService}. */
export interface TokenServiceOptions {
  secret: string;
  ttlMs: number;
  clock: Clock;
  /** The accounts' current role, disabled flag and generation, checked on every verify. */
  state: UserStateCache;
  /** Where refused tokens and forbidden attempts are reported. */
  security?: SecurityLog;
  /**
   * What expiry is measured against; default the system clock. Not `clock`: that one is the
   * domain's time (reading windows, key ages), which tests move by days with tokens in hand.
   */
  wallClock?: Clock;
}

/** Seconds a token's issue time may lie ahead of this instance's clock (clock drift). */
const CLOCK_SKEW_S = 60;

// Three base64url parts without padding; canonical form is checked separately.
const JWT_SHAPE = /^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$/;

/**
 * Issues and checks HS256 JWT access tokens. A token names the account's token generation; it
 * is refused once the account is deleted or disabled, its role changed, or its generation was
 * bumped (password change, logout, any change of rights).
 */
export class TokenService {
  #secret: string;
  #ttlMs: number;
  #state: UserStateCache;
  #wallClock: Clock;
  /** The security log of the gateway, for the routes that check tokens. */
  readonly security?: SecurityLog;

  constructor(options: TokenServiceOptions) {
    this.#secret = options.secret;
    this.#ttlMs = options.ttlMs;
    this.#state = options.state;
    this.security = options.security;
    this.#wallClock = options.wallClock ?? { now: () => Date.now() };
  }

  /** Milliseconds until the token `principal` came from expires (0 when it has). */
  expiresIn(principal: Principal): number {
    return Math.max(0, (principal.expires_at ?? 0) - this.#wallClock.now());
  }

  /** Issues a token for `user` under its current token generation. */
  async issue(user: User): Promise<AccessToken> {
    // The clock verify() measures against: a token is never born in its future.
    const now = Math.floor(this.#wallClock.now() / 1000);
    const ttl = Math.floor(this.#ttlMs / 1000);
    const token = await sign(
      {
        sub: user.id,
        role: user.role,
        email: user.email,
        gen: user.token_generation,
        iat: now,
        exp: now + ttl,
      },
      this.#secret,
      "HS256",
    );
    return { access_token: token, token_type: "Bearer", expires_in: ttl };
  }

  /**
   * Verifies a token against the signature, its expiry and the account's current state; throws
   * `unauthorized` with the reason. `address` (the client's) is logged when the token is refused.
   */
  async verify(token: string, address = "unknown"): Promise<Principal> {
    try {
      return await this.#verify(token);
    } catch (error) {
      if (error instanceof GatewayError) {
        this.security?.warn("token_rejected", address, { reason: error.message });
      }
      throw error;
    }
  }

  async #verify(token: string): Promise<Principal> {
    const payload = verifyHs256(token, this.#secret);
    if (payload === null) throw new GatewayError("unauthorized", "The access token is invalid");
    const { sub, role, gen, exp, iat } = payload;
    const invalid = () => new GatewayError("unauthorized", "The access token is invalid");
    if (
      typeof sub !== "string" || !ROLES.includes(role as Principal["role"]) ||
      typeof gen !== "number" || !Number.isSafeInteger(gen) || gen < 0
    ) {
      throw invalid();
    }
    if (typeof exp !== "number" || !Number.isFinite(exp)) {
      throw new GatewayError("unauthorized", "The access token has no expiry");
    }
    const nowS = this.#wallClock.now() / 1000;
    if (exp * 1000 <= this.#wallClock.now()) {
      throw new GatewayError("unauthorized", "The access token has expired");
    }
    // Even with the real secret, a token is only what issue() writes: whole seconds, issued
    // now or before (within the skew), living at most the configured TTL.
    if (
      !Number.isSafeInteger(exp) || typeof iat !== "number" || !Number.isSafeInteger(iat) ||
      iat <= 0 || iat > nowS + CLOCK_SKEW_S ||
      exp - iat > Math.ceil(this.#ttlMs / 1000) + CLOCK_SKEW_S
    ) {
      throw new GatewayError(
        "unauthorized",
        "The access token's issue time or lifetime is not acceptable",
      );
    }
    const state = await this.#state.get(sub);
    if (state === null) throw new GatewayError("unauthorized", "The account no longer exists");
    if (state.disabled) throw new GatewayError("unauthorized", "The account is disabled");
    if (gen !== state.token_generation) {
      throw new GatewayError("unauthorized", "The access token has been revoked; log in again");
    }
    if (role !== state.role) {
      throw new GatewayError("unauthorized", "The account's role has changed; log in again");
    }
    return {
      user_id: sub,
      role: state.role,
      token_generation: gen,
      expires_at: exp * 1000,
    };
  }
}

/**
 * The payload of an HS256 JWT whose signature verifies under `secret`, else `null`. Each part is
 * decoded once and must be canonical base64url (no padding, zero unused bits: one token has one
 * spelling); the header must name HS256. Done here with node:crypto rather than hono's verify,
 * which imports the key through WebCrypto on every call and accepts non-canonical encodings.
 */
function verifyHs256(token: string, secret: string): Record<string, unknown> | null {
  if (!JWT_SHAPE.test(token)) return null;
  const [h, p, sig] = token.split(".");
  const parts = [h, p, sig].map(canonicalBase64url);
  if (parts.some((part) => part === null)) return null;
  const [header, payload, signature] = parts as Buffer[];
  const expected = createHmac("sha256", secret).update(`${h}.${p}`).digest();
  if (signature.length !== expected.length || !timingSafeEqual(signature, expected)) return null;
  const head = parseObject(header);
  if (head === null || head.alg !== "HS256") return null;
  return parseObject(payload);
}

/** `part` decoded, if it is base64url exactly as an encoder writes it; else `null`. */
function canonicalBase64url(part: string): Buffer | null {
  if (part.length % 4 === 1) return null;
  const bytes = Buffer.from(part, "base64url");
  return bytes.toString("base64url") === part ? bytes : null;
}

function parseObject(bytes: Buffer): Record<string, unknown> | null {
  try {
    const value = JSON.parse(bytes.toString("utf8"));
    return typeof value === "object" && value !== null && !Array.isArray(value) ? value : null;
  } catch {
    return null;
  }
}
