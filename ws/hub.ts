import type { Bus, Subscription } from "../bus/bus.ts";
import { GatewayError } from "../core/errors.ts";
import { Semaphore } from "../core/semaphore.ts";
import {
  type DeviceChangedEvent,
  formatPosition,
  type GatewayEvent,
  parsePosition,
  type ReadingAcceptedEvent,
  type Topic,
  type UserChangedEvent,
} from "../core/events.ts";
import type { Logger } from "../core/logger.ts";
import { type ReadingRow, toReading } from "../core/reading.ts";
import type { Principal } from "../core/user.ts";
import type { Store } from "../db/store.ts";

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

/** What the hub reads from the store: resume replays, positions, an owner's meters. */
export type HubStore = Pick<Store, "readingsAfter" | "lastSeqs" | "listDevices">;

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

/** Meters one connection may be subscribed to by default. */
export const MAX_METERS_PER_CLIENT = 1_000;
/** Readings one resume may replay per meter by default; a larger gap gets `resync_required`. */
export const RESUME_MAX = 1_000;
// Replays and gap fills reading the store at once, and waiting for a turn, per instance.
const STORE_READS = 8;
const STORE_READS_WAITING = 1_000_000;
// An account subscription follows at most this many of the owner's meters.
const MAX_ACCOUNT_METERS = 10_000;

/** Options of {@linkcode WsHub}. */
export interface WsHubOptions {
  bus: Bus;
  store: HubStore;
  logger: Logger;
  /** Bytes a client may have queued before it is disconnected (1013). */
  sendBufferMax: number;
  /** Connections one account may hold at once; default 16. */
  maxPerUser?: number;
  /** Meters one connection may name at once; default 1 000. */
  maxMetersPerClient?: number;
  /** Readings replayed per meter at most; a larger gap gets `resync_required`. Default 1 000. */
  resumeMax?: number;
  /**
   * How often followed meters' store positions are compared with what clients were sent
   * (`WS_POSITION_CHECK_INTERVAL`); 0 or absent: never. Pub/sub is at most once: an event lost
   * where no outage was seen (a publish that failed on another instance while this one was
   * connected) is then sent from the store within this interval, even when no later reading of
   * the meter reveals the gap.
   */
  positionCheckMs?: number;
  /** Told how long each bus event's fan-out to this instance's clients took, in seconds. */
  onBroadcast?: (seconds: number) => void;
}

/** What one subscribe or unsubscribe asks for. */
export interface Selection {
  meters?: string[];
  account?: boolean;
  all?: boolean;
  /** Resume positions (`<meter>@<seq>`), at most one per meter. */
  since?: string | string[];
}

/** The `subscribed` reply's fields. */
export interface SubscriptionView {
  meters: string[];
  meter_count: number;
  account: boolean;
  all: boolean;
  /** The position of each meter of the request (and of the account's, when asked). */
  positions: Record<string, string>;
}

/** One meter a client follows: the last `seq` it was sent, and live events held meanwhile. */
interface Follow {
  seq: number;
  explicit: boolean;
  viaAccount: boolean;
  /** Non-null while a replay or catch-up runs: live events wait here, in arrival order. */
  held: ReadingAcceptedEvent[] | null;
  /** A store head that a catch-up after a bus outage found while a replay ran (0: none). */
  behind: number;
}

interface ClientState {
  follows: Map<string, Follow>;
  explicitCount: number;
  account: boolean;
  all: boolean;
  detached: boolean;
}

/** Counters of the hub, for metrics. */
export interface HubStats {
  /** Clients dropped for a full send buffer. */
  dropped: number;
  /** Readings sent from the store (resume, gaps, catch-up after a bus outage). */
  replayed: number;
  /** `resync_required` messages sent. */
  resyncs: number;
  /** Times fan-out from other instances stopped (bus disconnected). */
  busOutages: number;
  /** Messages sent to clients by the hub, by event type (`resync_required`, …). */
  sent: Map<string, number>;
  /** Bus events fanned out to this instance's clients. */
  broadcasts: number;
  /** WebSocket upgrade requests, and those refused (by error code) before the socket opened. */
  connectAttempts: number;
  connectFailures: Map<string, number>;
}

/**
 * Routes events from the bus to subscribed WebSocket clients, exactly once and in `seq` order per
 * meter. Each client's position per meter is the `seq` of the last reading it was sent; a live
 * event that skips numbers (an event lost by the bus, or two commits whose events crossed) is
 * filled in from the store, the source of truth, before it is sent. The hub subscribes the bus
 * only to what its clients need: `meter:<id>` per followed meter, `user:<id>` per connected
 * account, `all` while an admin firehose subscription exists.
 */
export class WsHub {
  #bus: Bus;
  #store: HubStore;
  #logger: Logger;
  #sendBufferMax: number;
  #maxPerUser: number;
  #maxMeters: number;
  #resumeMax: number;
  #clients = new Map<HubClient, ClientState>();
  /** Every client by the account it authenticated as (subscribed or not). */
  #byPrincipal = new Map<string, Set<HubClient>>();
  #followers = new Map<string, Set<HubClient>>();
  /** Clients with an account subscription, by owner; and the meters each such owner has. */
  #accountClients = new Map<string, Set<HubClient>>();
  #ownerMeters = new Map<string, Set<string>>();
  /** Owners whose meters are being read for their first account subscriber. */
  #ownerLoads = new Map<string, Promise<void>>();
  #all = new Set<HubClient>();
  #topics = new Map<Topic, Subscription>();
  /** Connections being opened (upgrade answered, socket not open yet), by account. */
  #reserved = new Map<string, number>();
  #stopBusWatch: () => void;
  #positionTimer: ReturnType<typeof setInterval> | undefined;
  #reads = new Semaphore(STORE_READS, STORE_READS_WAITING);
  #checking = false;
  readonly stats: HubStats = {
    dropped: 0,
    replayed: 0,
    resyncs: 0,
    busOutages: 0,
    sent: new Map(),
    broadcasts: 0,
    connectAttempts: 0,
    connectFailures: new Map(),
  };
  #onBroadcast: ((seconds: number) => void) | undefined;

  constructor(options: WsHubOptions) {
    this.#bus = options.bus;
    this.#store = options.store;
    this.#logger = options.logger;
    this.#sendBufferMax = options.sendBufferMax;
    this.#maxPerUser = options.maxPerUser ?? 16;
    this.#maxMeters = options.maxMetersPerClient ?? MAX_METERS_PER_CLIENT;
    this.#resumeMax = options.resumeMax ?? RESUME_MAX;
    this.#onBroadcast = options.onBroadcast;
    if (options.positionCheckMs) {
      this.#positionTimer = setInterval(() => {
        if (this.#checking) return;
        this.#checking = true;
        this.#catchUpAll(null).finally(() => this.#checking = false);
      }, options.positionCheckMs);
    }
    this.#stopBusWatch = this.#bus.onConnectionChange((up) => {
      if (up) {
        this.#logger.info("bus reconnected; catching WebSocket clients up from the store", {});
        this.#catchUpAll("bus_outage");
      } else {
        this.stats.busOutages++;
        this.#logger.warn("bus disconnected; fan-out from other instances paused", {});
      }
    });
  }

  /** Clients dropped for a full send buffer (kept for the older metric). */
  get dropped(): number {
    return this.stats.dropped;
  }

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

  /** Bus topics this instance is subscribed to for its clients (tests, metrics). */
  get topics(): Topic[] {
    return [...this.#topics.keys()];
  }

  /** Registers a newly connected client, with no subscriptions. */
  attach(client: HubClient): void {
    this.#clients.set(client, {
      follows: new Map(),
      explicitCount: 0,
      account: false,
      all: false,
      detached: false,
    });
    const userId = client.principal.user_id;
    if (addTo(this.#byPrincipal, userId, client)) this.#retain(`user:${userId}`);
  }

  /** Forgets a client and all its subscriptions; unknown clients are ignored. */
  detach(client: HubClient): void {
    const state = this.#clients.get(client);
    if (!state) return;
    state.detached = true;
    for (const meter of [...state.follows.keys()]) this.#unfollow(client, state, meter);
    if (state.account) this.#dropAccount(client, state);
    if (state.all) this.#dropAll(client, state);
    this.#clients.delete(client);
    const userId = client.principal.user_id;
    if (removeFrom(this.#byPrincipal, userId, client)) this.#release(`user:${userId}`);
  }

  /**
   * Adds subscriptions (ownership is checked by the caller) and, for meters named in `since`,
   * replays from the store every reading committed after the position before going live:
   * replayed readings are sent before this resolves, live ones after them, none twice. A gap
   * larger than the resume bound gets `resync_required` instead. Throws `invalid_payload`
   * (adding nothing) for too many meters or a malformed position.
   */
  async subscribe(client: HubClient, what: Selection): Promise<void> {
    const state = this.#clients.get(client);
    if (!state) return;
    const since = positionsOf(what.since);
    const named = [...new Set(what.meters ?? [])];
    const added = named.filter((m) => !state.follows.get(m)?.explicit);
    if (state.explicitCount + added.length > this.#maxMeters) {
      throw new GatewayError(
        "invalid_payload",
        `At most ${this.#maxMeters} meters per connection (${state.explicitCount} subscribed, ` +
          `${added.length} more asked); unsubscribe some, or subscribe to "account" or "all"`,
      );
    }
    const fresh: string[] = [];
    for (const meter of added) {
      const follow = state.follows.get(meter);
      if (follow) follow.explicit = true;
      else fresh.push(meter);
      state.explicitCount++;
    }
    if (what.account && !state.account) {
      state.account = true;
      const owner = client.principal.user_id;
      if (addTo(this.#accountClients, owner, client)) {
        const loading = this.#metersOf(owner).then((meters) => {
          if (this.#accountClients.has(owner)) this.#ownerMeters.set(owner, new Set(meters));
        });
        this.#ownerLoads.set(owner, loading);
        loading.catch(() => {}).finally(() => {
          if (this.#ownerLoads.get(owner) === loading) this.#ownerLoads.delete(owner);
        });
      }
      try {
        // A second connection of the owner waits for the first one's read.
        await this.#ownerLoads.get(owner);
      } catch (error) {
        if (!state.detached) {
          // Adds nothing: the meters named with it are not counted either.
          for (const meter of added) {
            const follow = state.follows.get(meter);
            if (follow) follow.explicit = false;
            state.explicitCount--;
          }
          this.#dropAccount(client, state);
        }
        this.#logger.error("WebSocket account meters could not be read", { error });
        throw new GatewayError("unavailable", "The store is unavailable; subscribe again shortly", {
          retryAfter: 1,
        });
      }
      if (state.detached) return;
      for (const meter of this.#ownerMeters.get(owner) ?? []) {
        const follow = state.follows.get(meter);
        if (follow) follow.viaAccount = true;
        else if (!fresh.includes(meter)) fresh.push(meter);
      }
    }
    if (what.all && !state.all) {
      state.all = true;
      if (this.#all.add(client).size === 1) this.#retain("all");
    }
    await this.#start(client, state, fresh, named, since);
  }

  /** Removes subscriptions; what the client is not subscribed to is ignored. */
  unsubscribe(client: HubClient, what: Selection): void {
    const state = this.#clients.get(client);
    if (!state) return;
    for (const meter of new Set(what.meters ?? [])) {
      const follow = state.follows.get(meter);
      if (!follow?.explicit) continue;
      follow.explicit = false;
      state.explicitCount--;
      if (!follow.viaAccount) this.#unfollow(client, state, meter);
    }
    if (what.account && state.account) this.#dropAccount(client, state);
    if (what.all && state.all) this.#dropAll(client, state);
  }

  /**
   * What a client is subscribed to: of `named` (the meters of one request), those it now is
   * subscribed to, how many meters in all, and the position of each named (or, with `account`,
   * followed) meter.
   */
  subscriptions(client: HubClient, named: readonly string[] = []): SubscriptionView {
    const state = this.#clients.get(client);
    const positions: Record<string, string> = {};
    const meters = [...new Set(named)].filter((m) => state?.follows.get(m)?.explicit);
    for (const meter of meters) positions[meter] = formatPosition(meter, this.#seqOf(state, meter));
    return {
      meters,
      meter_count: state?.explicitCount ?? 0,
      account: state?.account ?? false,
      all: state?.all ?? false,
      positions,
    };
  }

  /** The positions of every meter a client follows through its account subscription. */
  accountPositions(client: HubClient): Record<string, string> {
    const state = this.#clients.get(client);
    const positions: Record<string, string> = {};
    for (const [meter, follow] of state?.follows ?? []) {
      if (follow.viaAccount) positions[meter] = formatPosition(meter, follow.seq);
    }
    return positions;
  }

  /**
   * Control events from the bus: closes the connections of a user whose tokens a
   * `user.changed` event ended, and re-checks subscriptions when a meter changes owner.
   */
  handleControl(event: GatewayEvent): void {
    if (event.type === "user.changed") this.#endSessions(event.data);
    else if (event.type === "device.changed") this.#deviceChanged(event.data);
  }

  /** Unsubscribes from the bus and closes every client with 1001 (going away). */
  close(): void {
    this.#stopBusWatch();
    clearInterval(this.#positionTimer);
    for (const client of [...this.#clients.keys()]) {
      this.detach(client);
      // 1001 going away: clients reconnect (to another instance) and resume from their positions.
      client.close(1001, "The gateway is shutting down");
    }
    for (const sub of this.#topics.values()) sub.unsubscribe();
    this.#topics.clear();
  }

  // --- following meters ------------------------------------------------------------------

  /**
   * Follows `fresh` meters: subscribes their topics, holds live events until each meter's
   * starting position is known, replays from `since` where given, then releases what was held.
   */
  async #start(
    client: HubClient,
    state: ClientState,
    fresh: string[],
    named: string[],
    since: Map<string, number>,
  ): Promise<void> {
    const owner = client.principal.user_id;
    const accountMeters = state.account ? this.#ownerMeters.get(owner) : undefined;
    const ready: Promise<void>[] = [];
    for (const meter of fresh) {
      state.follows.set(meter, {
        seq: 0,
        explicit: named.includes(meter),
        viaAccount: accountMeters?.has(meter) ?? false,
        held: [],
        behind: 0,
      });
      if (addTo(this.#followers, meter, client)) ready.push(this.#retain(`meter:${meter}`));
      else ready.push(this.#topics.get(`meter:${meter}`)?.ready ?? Promise.resolve());
    }
    // Positions read after the subscriptions are live: nothing committed later can be missed.
    await Promise.allSettled(ready);
    if (fresh.length === 0 || state.detached) return;
    let last: Map<string, number>;
    try {
      last = await this.#store.lastSeqs(fresh);
    } catch (error) {
      this.#logger.error("WebSocket positions could not be read", { error });
      for (const meter of fresh) this.#unfollow(client, state, meter);
      throw new GatewayError("unavailable", "The store is unavailable; subscribe again shortly", {
        retryAfter: 1,
      });
    }
    const resync: string[] = [];
    for (const meter of fresh) {
      const follow = state.follows.get(meter);
      if (!follow || state.detached) continue;
      const head = last.get(meter) ?? 0;
      const from = since.get(meter);
      if (from === undefined) {
        follow.seq = head;
      } else if (from > head || head - from > this.#resumeMax) {
        // From the future (another store) or too far behind: no partial replay.
        follow.seq = head;
        resync.push(meter);
      } else {
        follow.seq = from;
        if (head > from) await this.#replay(client, state, meter, follow, head);
      }
    }
    if (resync.length > 0) this.#resync(client, state, resync, "gap_too_large");
    for (const meter of fresh) {
      const follow = state.follows.get(meter);
      if (follow) this.#releaseHeld(client, state, meter, follow);
    }
  }

  /** Sends the readings after `follow.seq` up to `head` from the store. */
  async #replay(
    client: HubClient,
    state: ClientState,
    meter: string,
    follow: Follow,
    head: number,
  ): Promise<void> {
    // Until the client stops following the meter (unsubscribed, or no longer its owner).
    const following = () => !state.detached && state.follows.get(meter) === follow;
    while (follow.seq < head && following()) {
      // After an outage every (client, meter) behind the store starts here at once: the store
      // sees a bounded number of these reads, the rest wait their turn.
      if (!await this.#reads.acquire()) throw new Error("too many store reads waiting");
      let rows: ReadingRow[];
      try {
        rows = await this.#store.readingsAfter(meter, follow.seq, Math.min(head - follow.seq, 500));
      } finally {
        this.#reads.release();
      }
      if (rows.length === 0) break; // deleted by retention meanwhile: nothing left to send
      for (const row of rows) {
        if (!following()) return;
        const seq = row.seq ?? 0;
        if (seq <= follow.seq) continue;
        // Readings stored while the meter had another owner are not this client's to see.
        if (!mayRead(client, row.user_id)) {
          follow.seq = seq;
          continue;
        }
        this.stats.replayed++;
        if (!this.#send(client, JSON.stringify(eventOf(row)), "meter.reading.accepted")) return;
        follow.seq = seq;
      }
    }
  }

  /**
   * Sends what was held during a replay, filling any gap from the store first. After a fill
   * that the store could not complete (`fill` false), held events past a gap are dropped: the
   * store does not have what precedes them, and a new fill would only ask it again; the next
   * live event fills whatever was real.
   */
  #releaseHeld(
    client: HubClient,
    state: ClientState,
    meter: string,
    follow: Follow,
    fill = true,
  ): void {
    const held = follow.held ?? [];
    follow.held = null;
    held.sort((a, b) => seqOf(a) - seqOf(b));
    for (const event of held) {
      if (state.follows.get(meter) !== follow) return; // disowned by one of them
      if (!fill && seqOf(event) > follow.seq + 1) break;
      this.#deliver(client, state, meter, follow, event, seqOf(event), undefined);
    }
    if (follow.behind > follow.seq && follow.held === null && state.follows.get(meter) === follow) {
      // A bus outage ended while this replay ran: catch up to what the store had then.
      const head = follow.behind;
      follow.behind = 0;
      follow.held = [];
      this.#fill(client, state, meter, follow, head + 1);
    }
  }

  /** Live delivery of one reading to one follower, in `seq` order. */
  #deliver(
    client: HubClient,
    state: ClientState,
    meter: string,
    follow: Follow,
    event: ReadingAcceptedEvent,
    seq: number,
    text: string | undefined,
  ): string | undefined {
    if (follow.held) {
      follow.held.push(event);
      return text;
    }
    if (seq <= follow.seq) return text; // already sent (replayed, or from two topics)
    if (!mayRead(client, event.data.user_id)) {
      // A reading of another owner: the meter changed hands (a device.changed event lost, or
      // one that crossed this subscription's ownership check).
      this.#disown(client, state, meter);
      return text;
    }
    if (seq === follow.seq + 1) {
      text ??= JSON.stringify(event);
      if (this.#send(client, text, event.type)) follow.seq = seq;
      return text;
    }
    // A gap: the missing readings are committed (their seq is smaller), so the store has them.
    follow.held = [event];
    this.#fill(client, state, meter, follow, seq);
    return text;
  }

  /** Fills a gap up to `upTo` from the store, then releases what was held meanwhile. */
  #fill(client: HubClient, state: ClientState, meter: string, follow: Follow, upTo: number) {
    let head = upTo - 1;
    const run = async () => {
      if (head - follow.seq > this.#resumeMax) {
        // An event's seq is trusted only as far as the store has it (a forged or foreign
        // event must not move the client past every reading to come).
        head = Math.min(head, (await this.#store.lastSeqs([meter])).get(meter) ?? 0);
        if (head - follow.seq > this.#resumeMax) {
          follow.seq = head;
          this.#resync(client, state, [meter], "gap_too_large");
          return;
        }
      }
      await this.#replay(client, state, meter, follow, head);
    };
    run().catch((error) => {
      this.#logger.error("WebSocket catch-up from the store failed", { error, meter_id: meter });
      follow.seq = head;
      this.#resync(client, state, [meter], "store_unavailable");
    }).finally(() => {
      if (!state.detached && state.follows.get(meter) === follow) {
        this.#releaseHeld(client, state, meter, follow, follow.seq >= upTo - 1);
      }
    });
  }

  /** After a bus outage: every followed meter whose store head moved is caught up. */
  #catchUpAll(reason: string | null): Promise<void> {
    // The firehose is live only: after an outage its clients are told to resync.
    if (reason !== null) {
      for (const client of this.#all) this.#resync(client, this.#clients.get(client)!, [], reason);
    }
    const meters = [...this.#followers.keys()];
    if (meters.length === 0) return Promise.resolve();
    return this.#store.lastSeqs(meters).then((heads) => {
      for (const [meter, clients] of this.#followers) {
        const head = heads.get(meter) ?? 0;
        for (const client of clients) {
          const state = this.#clients.get(client);
          const follow = state?.follows.get(meter);
          if (!state || !follow || follow.seq >= head) continue;
          if (follow.held) {
            // A replay runs: it catches up to this head once it is done.
            follow.behind = Math.max(follow.behind, head);
            continue;
          }
          follow.held = [];
          this.#fill(client, state, meter, follow, head + 1);
        }
      }
    }).catch((error) => {
      // A periodic check tries again at its next interval.
      if (reason === null) return this.#logger.debug("position check failed", { error });
      this.#logger.error("catch-up after the bus outage failed", { error });
      for (const client of this.#clients.keys()) {
        const state = this.#clients.get(client)!;
        if (state.follows.size > 0) this.#resync(client, state, [], "store_unavailable");
      }
    });
  }

  #unfollow(client: HubClient, state: ClientState, meter: string): void {
    const follow = state.follows.get(meter);
    if (!follow) return;
    if (follow.explicit) state.explicitCount--;
    state.follows.delete(meter);
    if (removeFrom(this.#followers, meter, client)) this.#release(`meter:${meter}`);
  }

  #dropAccount(client: HubClient, state: ClientState): void {
    state.account = false;
    const owner = client.principal.user_id;
    for (const [meter, follow] of [...state.follows]) {
      follow.viaAccount = false;
      if (!follow.explicit) this.#unfollow(client, state, meter);
    }
    if (removeFrom(this.#accountClients, owner, client)) this.#ownerMeters.delete(owner);
  }

  #dropAll(client: HubClient, state: ClientState): void {
    state.all = false;
    if (this.#all.delete(client) && this.#all.size === 0) this.#release("all");
  }

  async #metersOf(owner: string): Promise<string[]> {
    const meters: string[] = [];
    let cursor: string | undefined;
    do {
      const page = await this.#store.listDevices({ user_id: owner, limit: 1000, cursor });
      for (const device of page.items) meters.push(device.meter_id);
      cursor = page.next_cursor ?? undefined;
    } while (cursor && meters.length < MAX_ACCOUNT_METERS);
    return meters.slice(0, MAX_ACCOUNT_METERS);
  }

  #seqOf(state: ClientState | undefined, meter: string): number {
    return state?.follows.get(meter)?.seq ?? 0;
  }

  // --- bus topics --------------------------------------------------------------------------

  #retain(topic: Topic): Promise<void> {
    const existing = this.#topics.get(topic);
    if (existing) return existing.ready;
    const sub = this.#bus.subscribe(topic, (event) => this.#onEvent(topic, event));
    this.#topics.set(topic, sub);
    sub.ready.catch((error) =>
      this.#logger.warn("bus subscription not confirmed", {
        topic_kind: topic.split(":")[0],
        error,
      })
    );
    return sub.ready;
  }

  #release(topic: Topic): void {
    this.#topics.get(topic)?.unsubscribe();
    this.#topics.delete(topic);
  }

  #onEvent(topic: Topic, event: GatewayEvent): void {
    const onBroadcast = this.#onBroadcast;
    if (!onBroadcast) return this.#fanOut(topic, event);
    const started = performance.now();
    this.#fanOut(topic, event);
    this.stats.broadcasts++;
    onBroadcast((performance.now() - started) / 1000);
  }

  #fanOut(topic: Topic, event: GatewayEvent): void {
    if (event.type === "meter.reading.accepted") {
      if (topic === "all") return this.#toFirehose(event);
      const meter = event.data.meter_id;
      const clients = this.#followers.get(meter);
      if (!clients) return;
      let text: string | undefined; // serialised once for every recipient
      const seq = seqOf(event);
      for (const client of clients) {
        const state = this.#clients.get(client);
        const follow = state?.follows.get(meter);
        if (!state || !follow || state.all) continue; // firehose clients get it from "all"
        text = this.#deliver(client, state, meter, follow, event, seq, text);
      }
      return;
    }
    if (topic === "all") {
      const text = JSON.stringify(event);
      for (const client of this.#all) this.#send(client, text, event.type);
      return;
    }
    if (topic.startsWith("user:")) {
      const userId = topic.slice(5);
      const text = JSON.stringify(event);
      for (const client of this.#byPrincipal.get(userId) ?? []) {
        // Admins on the firehose get mint events from "all".
        if (!(event.type === "meter.reading.minted" && this.#clients.get(client)?.all)) {
          this.#send(client, text, event.type);
        }
      }
    }
  }

  /** Firehose delivery: live only; a follower's position moves too, so nothing comes twice. */
  #toFirehose(event: ReadingAcceptedEvent): void {
    const text = JSON.stringify(event);
    const seq = seqOf(event);
    for (const client of this.#all) {
      const follow = this.#clients.get(client)?.follows.get(event.data.meter_id);
      if (follow && seq <= follow.seq) continue;
      if (this.#send(client, text, event.type) && follow && follow.held === null) {
        follow.seq = seq;
      }
    }
  }

  // --- control events -------------------------------------------------------------------

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

  /** A meter may have a new owner: drop followers who lost it, add it to the new owner's. */
  #deviceChanged(data: DeviceChangedEvent["data"]): void {
    const { meter_id: meter, user_id: owner } = data;
    if (owner === undefined || data.change !== "registered") return;
    for (const client of [...this.#followers.get(meter) ?? []]) {
      const state = this.#clients.get(client);
      const follow = state?.follows.get(meter);
      if (!state || !follow) continue;
      if (mayRead(client, owner)) continue;
      this.#disown(client, state, meter);
    }
    for (const [other, meters] of this.#ownerMeters) {
      if (other !== owner) meters.delete(meter);
    }
    const meters = this.#ownerMeters.get(owner);
    if (!meters || meters.has(meter)) return;
    meters.add(meter);
    for (const client of this.#accountClients.get(owner) ?? []) {
      const state = this.#clients.get(client);
      if (!state) continue;
      const follow = state.follows.get(meter);
      if (follow) {
        follow.viaAccount = true;
        continue;
      }
      this.#start(client, state, [meter], [], new Map()).catch((error) =>
        this.#logger.warn("could not follow a newly registered meter", { error, meter_id: meter })
      );
    }
  }

  /** Ends a client's following of a meter it no longer owns, and tells it so. */
  #disown(client: HubClient, state: ClientState, meter: string): void {
    const follow = state.follows.get(meter);
    if (!follow) return;
    if (follow.explicit) state.explicitCount--;
    follow.explicit = false;
    follow.viaAccount = false;
    this.#unfollow(client, state, meter);
    this.#ownerMeters.get(client.principal.user_id)?.delete(meter);
    this.#send(
      client,
      JSON.stringify({
        type: "unsubscribed",
        meters: [meter],
        reason: `Meter "${meter}" is no longer yours`,
      }),
      "unsubscribed",
    );
  }

  // --- sending ---------------------------------------------------------------------------

  #resync(client: HubClient, state: ClientState, meters: string[], reason: string): void {
    this.stats.resyncs++;
    const positions: Record<string, string> = {};
    for (const meter of meters) positions[meter] = formatPosition(meter, this.#seqOf(state, meter));
    this.#send(
      client,
      JSON.stringify({ type: "resync_required", reason, meters, positions }),
      "resync_required",
    );
  }

  /** Sends, or disconnects a client that stopped reading; false when it was disconnected. */
  #send(client: HubClient, text: string, type: string): boolean {
    if (!this.#clients.has(client)) return false;
    if (client.bufferedAmount() > this.#sendBufferMax) {
      this.stats.dropped++;
      this.detach(client);
      client.close(1013, "Send buffer full: the client is not keeping up");
      return false;
    }
    client.send(text);
    this.stats.sent.set(type, (this.stats.sent.get(type) ?? 0) + 1);
    return true;
  }
}

/** The live event of a stored row (replays look exactly like live events). */
export function eventOf(row: ReadingRow): ReadingAcceptedEvent {
  return {
    type: "meter.reading.accepted",
    data: toReading(row),
    position: formatPosition(row.meter_id, row.seq ?? 0),
  };
}

/** Whether a client may see readings owned by `userId` (admins see every meter's). */
function mayRead(client: HubClient, userId: string | undefined): boolean {
  return client.principal.role === "admin" || client.principal.user_id === userId;
}

function seqOf(event: ReadingAcceptedEvent): number {
  return parsePosition(event.position)?.seq ?? 0;
}

/** `since` as positions by meter; throws `invalid_payload` for a malformed one. */
function positionsOf(since: string | string[] | undefined): Map<string, number> {
  const positions = new Map<string, number>();
  for (const text of since === undefined ? [] : typeof since === "string" ? [since] : since) {
    const position = parsePosition(text);
    if (!position) {
      throw new GatewayError(
        "invalid_payload",
        `"${text.slice(0, 80)}" is not a position: pass one received as "position" ` +
          `(<meter_id>@<seq>)`,
      );
    }
    positions.set(position.meter_id, Math.max(position.seq, positions.get(position.meter_id) ?? 0));
  }
  return positions;
}

/** Adds; true when the key's set was created (the first member). */
function addTo(index: Map<string, Set<HubClient>>, key: string, client: HubClient): boolean {
  const set = index.get(key);
  if (set) {
    set.add(client);
    return false;
  }
  index.set(key, new Set([client]));
  return true;
}

/** Removes; true when the key's set became empty (the last member left). */
function removeFrom(index: Map<string, Set<HubClient>>, key: string, client: HubClient): boolean {
  const set = index.get(key);
  if (!set || !set.delete(client)) return false;
  if (set.size > 0) return false;
  index.delete(key);
  return true;
}
