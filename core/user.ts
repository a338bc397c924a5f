import { z } from "zod";
import { isCommonPassword } from "./common_passwords.ts";

/** Every role, least restricted first. */
export const ROLES = ["admin", "operator", "user"] as const;
/** Who may do what: admins everything, operators provisioning, users their own meters. */
export type Role = typeof ROLES[number];

/** A gateway account. */
export interface User {
  /** Stable account id. */
  id: string;
  /** Login name, lower-cased; unique. */
  email: string;
  /** What the account may do. */
  role: Role;
  /** A Solana (base58) or EVM (0x-hex) address, if set; copied onto accepted readings. */
  wallet_address: string | null;
  /** Epoch milliseconds of creation. */
  created_at: number;
  /** A disabled account cannot log in and its tokens are refused. */
  disabled: boolean;
  /**
   * Bumped by every change of the account's rights or credentials (role, disabled, password,
   * logout): tokens carry the generation they were issued under and older ones are refused.
   */
  token_generation: number;
}

/** An account with its password hash, as stored. */
export interface UserRecord extends User {
  /** The encoded password hash; never shown by the API. */
  password_hash: string;
}

/** What {@linkcode UserRecord} a store is given to create; a new account is enabled, generation 0. */
export type NewUserRecord =
  & Omit<UserRecord, "disabled" | "token_generation">
  & Partial<Pick<UserRecord, "disabled" | "token_generation">>;

/** What the token check needs of an account, per request (cached in memory). */
export interface UserState {
  role: Role;
  disabled: boolean;
  token_generation: number;
}

/** The authenticated party of a request. */
export interface Principal {
  /** The account acting. */
  user_id: string;
  /** Its role when the token was issued (and still, or the token is refused). */
  role: Role;
  /** The account's token generation the token was issued under. */
  token_generation?: number;
  /** Epoch milliseconds when the token expires. */
  expires_at?: number;
}

/** An email address, trimmed and lower-cased. */
export const emailSchema = z.string().trim().toLowerCase().max(254).email();
/** Shortest password accepted (NIST SP 800-63B allows 8; we ask for 12 since nothing else is asked). */
export const PASSWORD_MIN_LENGTH = 12;

/**
 * A password of 12 to 256 characters that is not all one character, not blank and not one of
 * the commonly used passwords of core/common_passwords.ts.
 */
export const passwordSchema = z.string()
  .min(PASSWORD_MIN_LENGTH, `Passwords need at least ${PASSWORD_MIN_LENGTH} characters`)
  .max(256)
  .refine((pw) => pw.trim().length > 0, "A password of only spaces is not accepted")
  .refine((pw) => new Set(pw).size > 1, "A password of one repeated character is not accepted")
  .refine((pw) => !isCommonPassword(pw), "This password is too common; choose another");
/** Solana base58 or EVM hex addresses. */
export const walletSchema = z.string().regex(
  /^([1-9A-HJ-NP-Za-km-z]{32,44}|0x[0-9a-fA-F]{40})$/,
  "wallet_address must be a base58 (Solana) or 0x-hex (EVM) address",
);
