import { z } from "zod";
import { isCommonPassword, lettersOnly, PRODUCT_NAME, runCoverage } from "./common_passwords.ts";

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
/** Fewest different characters a password must have. */
export const PASSWORD_MIN_DISTINCT = 6;

/** What is known of the account a password is for: its email, its current password. */
export interface PasswordContext {
  email?: string;
  current?: string;
}

/**
 * Why `password` is refused, or `null` when it is acceptable: 12 to 256 characters, no control
 * characters, at least 6 different characters, not one short pattern repeated, not mostly a
 * keyboard or digit run, not common (also once digits and symbols are stripped), not containing
 * the product's name, nor (where known) the account's email or its local part, and different
 * from the current password.
 */
export function passwordProblem(password: string, context: PasswordContext = {}): string | null {
  if (password.length < PASSWORD_MIN_LENGTH) {
    return `Passwords need at least ${PASSWORD_MIN_LENGTH} characters`;
  }
  if (password.length > 256) return "Passwords have at most 256 characters";
  if (/\p{Cc}/u.test(password)) return "A password must not contain control characters";
  if (password.trim().length === 0) return "A password of only spaces is not accepted";
  if (new Set(password).size < PASSWORD_MIN_DISTINCT) {
    return `A password needs at least ${PASSWORD_MIN_DISTINCT} different characters`;
  }
  const folded = password.toLowerCase();
  if (/^(.+?)\1+$/su.test(folded)) return "A password must not be a short pattern repeated";
  if (runCoverage(password) * 2 >= password.length) {
    return "A password must not be mostly a keyboard or digit sequence";
  }
  if (folded.includes(PRODUCT_NAME) || lettersOnly(password).includes(PRODUCT_NAME)) {
    return "A password must not contain the product's name";
  }
  if (isCommonPassword(password)) return "This password is too common; choose another";
  if (context.email !== undefined) {
    const email = context.email.trim().toLowerCase();
    const local = email.split("@")[0];
    const localLetters = lettersOnly(local);
    if (
      folded.includes(email) || (local.length >= 3 && folded.includes(local)) ||
      (localLetters.length >= 3 && lettersOnly(password).includes(localLetters))
    ) {
      return "A password must not contain the account's email or its name part";
    }
  }
  if (context.current !== undefined && password === context.current) {
    return "The new password must differ from the current one";
  }
  return null;
}

/** A password that {@linkcode passwordProblem} accepts (without the account's context). */
export const passwordSchema = z.string().superRefine((pw, ctx) => {
  const problem = passwordProblem(pw);
  if (problem !== null) ctx.addIssue({ code: "custom", message: problem });
});
/** Solana base58 or EVM hex addresses. */
export const walletSchema = z.string().regex(
  /^([1-9A-HJ-NP-Za-km-z]{32,44}|0x[0-9a-fA-F]{40})$/,
  "wallet_address must be a base58 (Solana) or 0x-hex (EVM) address",
);
