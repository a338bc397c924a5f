import { GatewayError } from "../core/errors.ts";
import type { GatewayEvent, UserChangedEvent } from "../core/events.ts";
import type { Principal } from "../core/user.ts";

/** The transport-neutral face of one WebSocket connection. */
export interface HubClient {
  /** Who is connected; decides what the client may subscribe to. */
  readonly principal: Principal;
  /** Sends one text message; dropped when the socket is no longer open. */
  send(text: string): void;
  /** Bytes queued but not yet sent. */
  bufferedAmount(): number;
  /** Closes the connection with a WebSocket close code and reason. */
  close(code: number, reason: string): void;
}

interface Subscriptions {
  meters: Set<string>;
  account: boolean;
  all: boolean;
}

/**
 * Close code of a socket whose access token ended: expired, or ended by a logout, a password
 * change, a change of the account's rights, or its deletion (the reason says which).
 */
export const CLOSE_TOKEN_ENDED = 4001;

const ENDED_REASON: Record<UserChangedEvent["data"]["change"], string> = {
  updated: "Account rights changed; log in again",
  deleted: "Account deleted",
  password: "Password changed; log in again",
  logout: "Logged out",
};

/** Options of {@linkcode WsHub}. */
export interface WsHubOptions {
  /** Bytes a client may have queued before it is disconnected (1013). */
  sendBufferMax: number;
  /** Connections one account may hold at once; default 16. */
  maxPerUser?: number;
  /** Meters one connection may be subscribed to at once; default 1 000. */
  maxMetersPerClient?: number;
}

/** Meters one connection may be subscribed to by default. */
export const MAX_METERS_PER_CLIENT = 1_000;

/**
 * Routes committed readings from the bus to subscribed WebSocket clients. A client whose send
 * buffer passes the bound is disconnected rather than waited for; clients whose token a
 * `user.changed` event ended are closed with {@linkcode CLOSE_TOKEN_ENDED}.
 */
export class WsHub {
  #sendBufferMax: number;
  #maxPerUser: number;
  #maxMeters: number;
  #clients = new Map<HubClient, Subscriptions>();
  /** Every client by the account it authenticated as (subscribed or not). */
  #byPrincipal = new Map<string, Set<HubClient>>();
  #byMeter = new Map<string, Set<HubClient>>();
  #byUser = new Map<string, Set<HubClient>>();
  #all = new Set<HubClient>();
  /** Clients dropped for a full send buffer, for metrics. */
  dropped = 0;

  constructor(options: WsHubOptions) {
    this.#sendBufferMax = options.sendBufferMax;
    this.#maxPerUser = options.maxPerUser ?? 16;
    this.#maxMeters = options.maxMetersPerClient ?? MAX_METERS_PER_CLIENT;
  }

  /** Connections being opened (upgrade answered, socket not open yet), by account. */
  #reserved = new Map<string, number>();

  /** Whether `userId` may open another connection (open and reserved ones count). */
  canAttach(userId: string): boolean {
    return (this.#byPrincipal.get(userId)?.size ?? 0) + (this.#reserved.get(userId) ?? 0) <
      this.#maxPerUser;
  }

  /**
   * Reserves one of `userId`'s connection slots before the upgrade, so that parallel upgrades
   * cannot all pass the check before any socket is attached; `null` when none is left. The
   * returned function gives the slot back (idempotent): call it once the socket is attached,
   * or when the upgrade fails or the socket closes before it opened.
   */
  reserve(userId: string): (() => void) | null {
    if (!this.canAttach(userId)) return null;
    this.#reserved.set(userId, (this.#reserved.get(userId) ?? 0) + 1);
    let held = true;
    return () => {
      if (!held) return;
      held = false;
      const left = (this.#reserved.get(userId) ?? 1) - 1;
      if (left > 0) this.#reserved.set(userId, left);
      else this.#reserved.delete(userId);
    };
  }

  /** Slots reserved and not yet given back, over all accounts (tests, metrics). */
  get reservedCount(): number {
    let n = 0;
    for (const v of this.#reserved.values()) n += v;
    return n;
  }

  /** Number of connected clients. */
  get size(): number {
    return this.#clients.size;
  }

  /** Registers a newly connected client, with no subscriptions. */
  attach(client: HubClient): void {
    this.#clients.set(client, { meters: new Set(), account: false, all: false });
    addTo(this.#byPrincipal, client.principal.user_id, client);
  }

  /** Forgets a client and all its subscriptions; unknown clients are ignored. */
  detach(client: HubClient): void {
    const subs = this.#clients.get(client);
    if (!subs) return;
    for (const meter of subs.meters) removeFrom(this.#byMeter, meter, client);
    if (subs.account) removeFrom(this.#byUser, client.principal.user_id, client);
    this.#all.delete(client);
    this.#clients.delete(client);
    removeFrom(this.#byPrincipal, client.principal.user_id, client);
  }

  /**
   * Adds subscriptions; ownership is checked by the caller. Throws `invalid_payload` (adding
   * nothing) when the client would hold more than the per-connection number of meters.
   */
  subscribe(
    client: HubClient,
    what: { meters?: string[]; account?: boolean; all?: boolean },
  ): void {
    const subs = this.#clients.get(client);
    if (!subs) return;
    const added = new Set((what.meters ?? []).filter((m) => !subs.meters.has(m)));
    if (subs.meters.size + added.size > this.#maxMeters) {
      throw new GatewayError(
        "invalid_payload",
        `At most ${this.#maxMeters} meters per connection (${subs.meters.size} subscribed, ` +
          `${added.size} more asked); unsubscribe some, or subscribe to "account" or "all"`,
      );
    }
    for (const meter of added) {
      subs.meters.add(meter);
      addTo(this.#byMeter, meter, client);
    }
    if (what.account && !subs.account) {
      subs.account = true;
      addTo(this.#byUser, client.principal.user_id, client);
    }
    if (what.all) {
      subs.all = true;
      this.#all.add(client);
    }
  }

  /** Removes subscriptions; what the client is not subscribed to is ignored. */
  unsubscribe(
    client: HubClient,
    what: { meters?: string[]; account?: boolean; all?: boolean },
  ): void {
    const subs = this.#clients.get(client);
    if (!subs) return;
    for (const meter of what.meters ?? []) {
      subs.meters.delete(meter);
      removeFrom(this.#byMeter, meter, client);
    }
    if (what.account && subs.account) {
      subs.account = false;
      removeFrom(this.#byUser, client.principal.user_id, client);
    }
    if (what.all) {
      subs.all = false;
      this.#all.delete(client);
    }
  }

  /**
   * What a client is subscribed to: of `named` (the meters of one request), those it now is
   * subscribed to, and how many meters in all; the reply's size follows the request's, not
   * the subscription's.
   */
  subscriptions(
    client: HubClient,
    named: readonly string[] = [],
  ): { meters: string[]; meter_count: number; account: boolean; all: boolean } {
    const subs = this.#clients.get(client);
    return {
      meters: [...new Set(named)].filter((m) => subs?.meters.has(m)),
      meter_count: subs?.meters.size ?? 0,
      account: subs?.account ?? false,
      all: subs?.all ?? false,
    };
  }

  /**
   * Bus handler: delivers committed readings, and closes the connections of a user whose
   * tokens a `user.changed` event ended; device events are not for clients.
   */
  handle(event: GatewayEvent): void {
    if (event.type === "user.changed") return this.#endSessions(event.data);
    if (event.type !== "meter.reading.accepted") return;
    const reading = event.data;
    const all = this.#all.size > 0 ? this.#all : undefined;
    const meter = this.#byMeter.get(reading.meter_id);
    const owner = this.#byUser.get(reading.user_id);
    // Every committed reading passes here: when nobody listens, allocate nothing.
    if (all === undefined && meter === undefined && owner === undefined) return;
    // One interested index is used as it is (detach() only deletes the client being visited,
    // which Set iteration allows); several are merged so that nobody gets the reading twice.
    let targets: Set<HubClient>;
    if (meter === undefined && owner === undefined) {
      targets = all!;
    } else if (all === undefined && owner === undefined) {
      targets = meter!;
    } else if (all === undefined && meter === undefined) {
      targets = owner!;
    } else {
      targets = new Set(all);
      for (const c of meter ?? []) targets.add(c);
      for (const c of owner ?? []) targets.add(c);
    }
    const text = JSON.stringify(event); // serialised once for every recipient
    for (const client of targets) {
      if (client.bufferedAmount() > this.#sendBufferMax) {
        this.dropped++;
        this.detach(client);
        client.close(1013, "Send buffer full: the client is not keeping up");
        continue;
      }
      client.send(text);
    }
  }

  #endSessions(data: UserChangedEvent["data"]): void {
    const clients = this.#byPrincipal.get(data.user_id);
    if (!clients) return;
    for (const client of [...clients]) {
      const generation = client.principal.token_generation ?? -1;
      // A late event must not close a connection opened with a token issued after the change.
      if (data.token_generation !== null && generation >= data.token_generation) continue;
      this.detach(client);
      client.close(CLOSE_TOKEN_ENDED, ENDED_REASON[data.change]);
    }
  }
}

function addTo(index: Map<string, Set<HubClient>>, key: string, client: HubClient): void {
  let set = index.get(key);
  if (!set) index.set(key, set = new Set());
  set.add(client);
}

function removeFrom(index: Map<string, Set<HubClient>>, key: string, client: HubClient): void {
  const set = index.get(key);
  if (!set) return;
  set.delete(client);
  if (set.size === 0) index.delete(key);
}
