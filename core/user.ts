import { z } from "zod";

export const ROLES = ["admin", "operator", "user"] as const;
/** Who may do what: admins everything, operators provisioning, users their own meters. */
export type Role = typeof ROLES[number];

/** A gateway account. */
export interface User {
  id: string;
  email: string;
  role: Role;
  wallet_address: string | null;
  created_at: number;
}

/** An account with its password hash, as stored. */
export interface UserRecord extends User {
  password_hash: string;
}

/** The authenticated party of a request. */
export interface Principal {
  user_id: string;
  role: Role;
}

export const emailSchema = z.string().trim().toLowerCase().max(254).email();
export const passwordSchema = z.string().min(8).max(256);
/** Solana base58 or EVM hex addresses. */
export const walletSchema = z.string().regex(
  /^([1-9A-HJ-NP-Za-km-z]{32,44}|0x[0-9a-fA-F]{40})$/,
  "wallet_address must be a base58 (Solana) or 0x-hex (EVM) address",
);
