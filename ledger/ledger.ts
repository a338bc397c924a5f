// The ledger port: where minted energy tokens are recorded (DESIGN.md §12). A mint is turned
// into one signed transaction that is stored before it is sent, so a retry or a restart sends the
// same bytes again; a replacement is built only once the first is provably expired and absent.

/** What a mint asks the ledger to record: `amount_e4` kWh × 10 000 for one owner. */
export interface LedgerTransfer {
  /** The mint's id: named in the transaction (memo) so every ledger entry maps back to it. */
  mint_id: string;
  /** The owner the tokens are for. */
  user_id: string;
  /** The owner's wallet (base58 32-byte address); required by the `solana` ledger. */
  wallet_address: string | null;
  /** Energy in units of 0.0001 kWh (the readings' exact sum). */
  kwh_e4: number;
}

/**
 * A signed transaction, as the mint stores it before sending. Everything in it is public: the
 * signature proves the authority signed, it does not reveal the key.
 */
export interface PreparedTx {
  /** The transaction's id on the ledger (Solana: the base58 signature; local: the entry id). */
  signature: string;
  /** The signed transaction in the ledger's wire form (Solana: base64), resent as is. */
  wire: string;
  /**
   * The ledger's expiry of this transaction (Solana: the blockhash's last valid block height);
   * `null` when it never expires.
   */
  expires_at: number | null;
  /** Token base units the transaction mints (kWh × 10^decimals), as a decimal string. */
  amount: string;
}

/** Where a stored transaction stands on the ledger. */
export type TxState =
  /** Recorded at the configured commitment: the tokens exist. */
  | { state: "confirmed" }
  /** Recorded but failed, or refused for good: no tokens, and none can come of this tx. */
  | { state: "failed"; error: string }
  /** Seen by the ledger, not yet at the configured commitment: wait. */
  | { state: "pending" }
  /** Not known to the ledger, and it may still land: send it (again). */
  | { state: "absent" }
  /** Not known to the ledger, and it can never land (its blockhash expired): build a new one. */
  | { state: "expired" };

/**
 * A refusal that no retry can change (a wrong authority, an invalid account): the mint fails
 * with this message and its readings become mintable again. Every other error of a ledger call
 * is taken as transient (the ledger is unreachable): the mint waits and tries again.
 */
export class LedgerRefusedError extends Error {
  constructor(message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = "LedgerRefusedError";
  }
}

/** The port. Every adapter passes tests/contracts/ledger_contract.ts. */
export interface Ledger {
  /** `local` or `solana`: stored with each mint. */
  readonly name: string;
  /**
   * Checks that an owner's wallet can receive tokens on this ledger; throws
   * `GatewayError("invalid_payload")` naming what is wrong. Returns the address to use.
   */
  checkWallet(wallet: string | null): string | null;
  /** Token base units of `kwh_e4` (kWh × 10^decimals), exact. */
  amountOf(kwh_e4: number): bigint;
  /** Builds and signs the transaction of a transfer. No ledger state changes. */
  prepare(transfer: LedgerTransfer): Promise<PreparedTx>;
  /**
   * Sends a prepared transaction; sending one that the ledger already has is harmless.
   * Throws {@linkcode LedgerRefusedError} when the ledger refuses it for good.
   */
  send(tx: PreparedTx): Promise<void>;
  /** Where the transaction stands (see {@linkcode TxState}). */
  status(tx: PreparedTx): Promise<TxState>;
  /** Cheap reachability probe (doctor, readiness). */
  ping(): Promise<void>;
  close(): Promise<void>;
}
