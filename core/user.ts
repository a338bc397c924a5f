import { z } from "zod";

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
}

/** An account with its password hash, as stored. */
export interface UserRecord extends User {
  /** The encoded password hash; never shown by the API. */
  password_hash: string;
}

/** The authenticated party of a request. */
export interface Principal {
  /** The account acting. */
  user_id: string;
  /** Its role when the token was issued. */
  role: Role;
}

/** An email address, trimmed and lower-cased. */
export const emailSchema = z.string().trim().toLowerCase().max(254).email();
/** A password of 8 to 256 characters. */
export const passwordSchema = z.string().min(8).max(256);
/** Solana base58 or EVM hex addresses. */
export const walletSchema = z.string().regex(
  /^([1-9A-HJ-NP-Za-km-z]{32,44}|0x[0-9a-fA-F]{40})$/,
  "wallet_address must be a base58 (Solana) or 0x-hex (EVM) address",
);
