import type { Clock } from "../core/clock.ts";
import { GatewayError } from "../core/errors.ts";
import type { Logger } from "../core/logger.ts";
import { hashPassword, verifyPassword } from "../core/password.ts";
import type { Role, User } from "../core/user.ts";
import type { Store } from "../db/store.ts";
import { Semaphore } from "../core/semaphore.ts";

/** What a new account needs. */
export interface NewUser {
  email: string;
  password: string;
  role: Role;
  wallet_address?: string | null;
}

/** Accounts: creation, password checks, and the first admin. */
export class UserService {
  #store: Store;
  #clock: Clock;
  // scrypt costs ~16 MiB and ~30 ms of CPU per call: bound how many run at once so a login
  // flood cannot starve ingestion or exhaust memory.
  #kdf = new Semaphore(2, 64);

  constructor(store: Store, clock: Clock) {
    this.#store = store;
    this.#clock = clock;
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
    const user = {
      id: crypto.randomUUID(),
      email: input.email.toLowerCase(),
      role: input.role,
      wallet_address: input.wallet_address ?? null,
      created_at: this.#clock.now(),
    };
    const password_hash = await this.#withKdf(() => hashPassword(input.password));
    await this.#store.createUser({ ...user, password_hash });
    return user;
  }

  /** Returns the account when the password matches, else `null` (same cost either way). */
  async authenticate(email: string, password: string): Promise<User | null> {
    const record = await this.#store.getUserByEmail(email.toLowerCase());
    // Hash anyway so response time does not reveal whether the email exists.
    const ok = await this.#withKdf(() =>
      verifyPassword(password, record?.password_hash ?? DUMMY_HASH)
    );
    if (!record || !ok) return null;
    const { password_hash: _, ...user } = record;
    return user;
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
      logger.warn("created the first admin with a generated password; it is shown only now", {
        email,
        password: pw,
      });
    } else {
      logger.info("created the first admin", { email });
    }
  }
}

const DUMMY_HASH =
  "scrypt$16384$8$1$AAAAAAAAAAAAAAAAAAAAAA$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
