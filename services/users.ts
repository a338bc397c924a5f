import type { Bus } from "../bus/bus.ts";
import { Backoff } from "../core/backoff.ts";
import type { Clock } from "../core/clock.ts";
import { GatewayError } from "../core/errors.ts";
import type { UserChangedEvent } from "../core/events.ts";
import { type Logger, ShownOnce } from "../core/logger.ts";
import {
  dummyHash,
  hashPassword,
  needsRehash,
  SCRYPT_DEFAULT,
  type ScryptParams,
  verifyPassword,
} from "../core/password.ts";
import { passwordProblem, type Role, type User, type UserRecord } from "../core/user.ts";
import type { Store } from "../db/store.ts";
import { Semaphore } from "../core/semaphore.ts";
import type { UserStateCache } from "./user_state.ts";

/** What a new account needs. */
export interface NewUser {
  email: string;
  password: string;
  role: Role;
  wallet_address?: string | null;
}

/** What an admin may change of an account. */
export interface UserPatch {
  role?: Role;
  disabled?: boolean;
}

/** Options of {@linkcode UserService}. */
export interface UserServiceOptions {
  store: Store;
  clock: Clock;
  /** Where changes of rights are announced to every instance (`user.changed`). */
  bus: Bus;
  /** This instance's cache of account states, dropped at once on a local change. */
  state: UserStateCache;
  logger?: Logger;
  /** scrypt parameters of new hashes; older ones are re-hashed at login. Default N=2^17. */
  passwordParams?: ScryptParams;
  /** Per-account login back-off: attempts free, then 1 s, 2 s, 4 s … up to `maxMs`. */
  loginBackoff?: { free?: number; baseMs?: number; maxMs?: number; maxKeys?: number };
}

/** Accounts: creation, logins, changes of rights and credentials, and the first admin. */
export class UserService {
  #store: Store;
  #clock: Clock;
  #bus: Bus;
  #state: UserStateCache;
  #logger?: Logger;
  #params: ScryptParams;
  #dummyHash: string;
  #backoff: Backoff;
  // scrypt at N=2^17 costs 128 MiB and a few hundred ms of CPU per call: bound how many run at
  // once so a login flood cannot starve ingestion or exhaust memory.
  #kdf = new Semaphore(2, 64);

  constructor(options: UserServiceOptions) {
    this.#store = options.store;
    this.#clock = options.clock;
    this.#bus = options.bus;
    this.#state = options.state;
    this.#logger = options.logger;
    this.#params = options.passwordParams ?? SCRYPT_DEFAULT;
    this.#dummyHash = dummyHash(this.#params);
    this.#backoff = new Backoff({ clock: options.clock, ...options.loginBackoff });
  }

  async #withKdf<T>(fn: () => Promise<T>): Promise<T> {
    if (!await this.#kdf.acquire()) {
      throw new GatewayError("overloaded", "Too many logins in progress; retry shortly", {
        retryAfter: 1,
      });
    }
    try {
      return await fn();
    } finally {
      this.#kdf.release();
    }
  }

  /** Creates an account; `conflict` when the email is taken. */
  async create(input: NewUser): Promise<User> {
    const user: User = {
      id: crypto.randomUUID(),
      email: input.email.toLowerCase(),
      role: input.role,
      wallet_address: input.wallet_address ?? null,
      created_at: this.#clock.now(),
      disabled: false,
      token_generation: 0,
    };
    const password_hash = await this.#withKdf(() => hashPassword(input.password, this.#params));
    await this.#store.createUser({ ...user, password_hash });
    return user;
  }

  /** The account, or `null`. */
  get(id: string): Promise<User | null> {
    return this.#store.getUser(id);
  }

  /** Returns the account when the password matches, else `null` (same cost either way). */
  async authenticate(email: string, password: string): Promise<User | null> {
    const record = await this.#store.getUserByEmail(email.toLowerCase());
    // Hash anyway so response time does not reveal whether the email exists.
    const hash = record?.password_hash ?? this.#dummyHash;
    const ok = await this.#withKdf(() => verifyPassword(password, hash));
    if (!record || !ok) return null;
    const current = needsRehash(hash, this.#params) ? await this.#rehash(record, password) : record;
    const { password_hash: _, ...user } = current;
    return user;
  }

  /**
   * A login: the account when the password matches and the account is enabled. Throws
   * `rate_limited` (with the wait) while the account is backing off after failed attempts,
   * `unauthorized` otherwise.
   */
  async login(email: string, password: string): Promise<User> {
    const key = email.toLowerCase();
    const user = await this.#attempt(
      key,
      "Too many failed logins for this account; wait before trying again",
      () => this.authenticate(key, password),
    );
    // A disabled account answers exactly like a wrong password, and a right guess does not
    // reset its back-off: nothing tells whether the password was right.
    if (!user || user.disabled) {
      throw new GatewayError("unauthorized", "Email or password is wrong");
    }
    this.#backoff.succeeded(key);
    return user;
  }

  /**
   * Runs `check` as one counted attempt of `key`'s back-off. An attempt the server did not
   * evaluate (overloaded, store failure) is taken back, so a flood that overloads the gateway
   * cannot lock the account out, nor fill the table with its keys.
   */
  async #attempt<T>(key: string, waitMessage: string, check: () => Promise<T>): Promise<T> {
    const attempt = this.#backoff.attempt(key);
    if (!attempt.ok) {
      if (attempt.reason === "full") {
        throw new GatewayError(
          "overloaded",
          "Too many accounts are backing off after failed logins; retry shortly",
          { retryAfter: Math.ceil(attempt.waitMs / 1000) },
        );
      }
      throw new GatewayError("rate_limited", waitMessage, {
        retryAfter: Math.ceil(attempt.waitMs / 1000),
      });
    }
    try {
      return await check();
    } catch (error) {
      attempt.undo();
      throw error;
    }
  }

  // Stores a hash with the current parameters; a concurrent password change wins.
  async #rehash(record: UserRecord, password: string): Promise<UserRecord> {
    try {
      const password_hash = await this.#withKdf(() => hashPassword(password, this.#params));
      return await this.#store.updateUser(
        record.id,
        (u) => u.password_hash === record.password_hash ? { ...u, password_hash } : u,
      );
    } catch (error) {
      // The login itself succeeded; the next one tries again.
      this.#logger?.warn("password re-hash failed", { user_id: record.id, error });
      return record;
    }
  }

  /**
   * Changes an account's role or disabled flag; a real change bumps its token generation so
   * every token issued before ends. `conflict` when no active admin would remain.
   */
  async update(id: string, patch: UserPatch): Promise<User> {
    const record = await this.#store.updateUser(id, (u) => {
      const role = patch.role ?? u.role;
      const disabled = patch.disabled ?? u.disabled;
      if (role === u.role && disabled === u.disabled) return u;
      return { ...u, role, disabled, token_generation: u.token_generation + 1 };
    });
    await this.#changed(record, "updated");
    return withoutHash(record);
  }

  /** Deletes an account; its tokens end. `conflict` for the last active admin, or while it owns meters that are not revoked. */
  async remove(id: string): Promise<void> {
    await this.#store.deleteUser(id);
    await this.#announce({ user_id: id, change: "deleted", token_generation: null });
  }

  /**
   * Changes the caller's password after checking the current one (with the same per-account
   * back-off as logins); every token issued before ends. Returns the updated account.
   */
  async changePassword(id: string, current: string, next: string): Promise<User> {
    const user = await this.#store.getUser(id);
    if (!user) throw new GatewayError("unauthorized", "The account no longer exists");
    // Rules that need the account (its email, the current password): before any hashing.
    const problem = passwordProblem(next, { email: user.email, current });
    if (problem !== null) throw new GatewayError("invalid_payload", problem);
    const key = user.email;
    const record = await this.#attempt(
      key,
      "Too many wrong passwords; wait before trying again",
      async () => {
        const record = await this.#store.getUserByEmail(key);
        const ok = record !== null &&
          await this.#withKdf(() => verifyPassword(current, record.password_hash));
        return ok ? record : null;
      },
    );
    if (!record) throw new GatewayError("unauthorized", "The current password is wrong");
    this.#backoff.succeeded(key);
    const password_hash = await this.#withKdf(() => hashPassword(next, this.#params));
    // Compare-and-set: only the hash that was verified may be replaced, so of two parallel
    // changes with the same current password exactly one succeeds.
    const updated = await this.#store.updateUser(id, (u) => {
      if (u.password_hash !== record.password_hash) {
        throw new GatewayError(
          "conflict",
          "The password was changed meanwhile; log in again with the new one",
        );
      }
      return { ...u, password_hash, token_generation: u.token_generation + 1 };
    });
    await this.#changed(updated, "password");
    return withoutHash(updated);
  }

  /** Ends every token of the account (all its sessions), by bumping its generation. */
  async logout(id: string): Promise<void> {
    const updated = await this.#store.updateUser(id, (u) => ({
      ...u,
      token_generation: u.token_generation + 1,
    }));
    await this.#changed(updated, "logout");
  }

  #changed(user: UserRecord, change: UserChangedEvent["data"]["change"]): Promise<void> {
    return this.#announce({ user_id: user.id, change, token_generation: user.token_generation });
  }

  // This instance forgets at once; the others when the event reaches them (or their cache
  // entry's TTL passes, should the event be lost). A failed publish does not undo the change.
  async #announce(data: UserChangedEvent["data"]): Promise<void> {
    this.#state.invalidate(data.user_id);
    try {
      await this.#bus.publish([{ type: "user.changed", data }]);
    } catch (error) {
      this.#logger?.error("bus publish of a user change failed", { user_id: data.user_id, error });
    }
  }

  /** On an empty store, creates the first admin; prints a generated password once. */
  async bootstrapAdmin(email: string, password: string | undefined, logger: Logger): Promise<void> {
    if (await this.#store.countUsers() > 0) return;
    const generated = password === undefined;
    const pw = password ?? crypto.randomUUID().replaceAll("-", "");
    try {
      await this.create({ email, password: pw, role: "admin" });
    } catch (error) {
      // Another instance created it first.
      if (error instanceof GatewayError && error.code === "conflict") return;
      throw error;
    }
    if (generated) {
      logger.warn(
        "created the first admin with a generated password; it is shown only now: change it with POST /api/auth/password",
        // The one secret let through the log's redaction: the operator has no other way to it.
        { email, password: new ShownOnce(pw) },
      );
    } else {
      logger.info("created the first admin", { email });
    }
  }
}

function withoutHash(record: UserRecord): User {
  const { password_hash: _, ...user } = record;
  return user;
}
