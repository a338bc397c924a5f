import { keySlot } from "../core/key_slot.ts";
import type { Cluster, Redis } from "ioredis";
import type { RedisSpec } from "../core/config.ts";
import { type GatewayEvent, type Topic, topicKind, topicsOf } from "../core/events.ts";
import { type Logger, silentLogger } from "../core/logger.ts";
import type { Bus, BusStats, EventHandler, Subscription } from "./bus.ts";
import { deliver, subscribeTo } from "./local_bus.ts";
import { openRedis, reconnectDelay } from "./redis_client.ts";

/** The version of the message format; a message of another version is dropped as malformed. */
export const BUS_FORMAT = 1;

/**
 * One message on a channel: the events of one topic from one `publish` call, in order, with
 * the publishing bus's random `o`rigin, so that a bus recognises (and skips) its own messages.
 */
export interface BusMessage {
  v: typeof BUS_FORMAT;
  o: string;
  e: GatewayEvent[];
}

/** Options of {@linkcode RedisBus}. */
export interface RedisBusOptions {
  /** Prepended to every topic to make the channel name; default `gtx:`. */
  prefix?: string;
  logger?: Logger;
  /** Receives whatever a handler throws; default: logged as an error. */
  onError?: (error: unknown) => void;
  /** A publish not taken by Redis within this many ms rejects; default 2 000. */
  publishTimeoutMs?: number;
  /** Reconnection waits: doubling from `baseMs` (100) up to `maxMs` (5 000), forever. */
  reconnect?: { baseMs?: number; maxMs?: number };
}

/** {@linkcode BusStats} plus the messages dropped because they were not the bus's format. */
export interface RedisBusStats extends BusStats {
  malformed: number;
}

interface Channel {
  topic: Topic;
  /** Subscriptions of this bus to the channel. */
  refs: number;
  /** The server acknowledged the (re)subscription since the last loss. */
  acked: boolean;
  ready: PromiseWithResolvers<void>;
}

/** Channels per SUBSCRIBE command when a single server's subscriptions are restored. */
const SUBSCRIBE_CHUNK = 1_000;
/** Cluster checks that find a reachable node with other subscriptions than ours before repair. */
const MISMATCHES_BEFORE_REPAIR = 3;
const KNOWN_TYPES = new Set([
  "meter.reading.accepted",
  "meter.reading.minted",
  "device.changed",
  "user.changed",
  "batch.progress",
  "batch.completed",
]);

/**
 * The bus over Redis pub/sub, on one server (`PUBLISH`/`SUBSCRIBE`, a publisher and a
 * subscriber connection) or on a Redis Cluster (sharded pub/sub: `SPUBLISH`/`SSUBSCRIBE`, each
 * channel living on the shard of its slot, so meters spread over the nodes). Channel =
 * prefix + topic. Local subscribers get a publish at once, in-process; the bus's own messages
 * coming back from Redis are skipped.
 */
export class RedisBus implements Bus, AsyncDisposable {
  /** Random per bus: marks its messages. */
  readonly origin: string = crypto.randomUUID();
  readonly stats: RedisBusStats = {
    published: {},
    received: {},
    publishErrors: 0,
    disconnects: 0,
    malformed: 0,
  };
  #prefix: string;
  #logger: Logger;
  #onError: (error: unknown) => void;
  #publishTimeoutMs: number;
  #baseMs: number;
  #maxMs: number;
  /** Single server: commands and publishes. */
  #publisher: Redis | null = null;
  /** Single server: subscriptions only. */
  #subscriber: Redis | null = null;
  /** Cluster: publishes through the node connections, subscribes through its sharded ones. */
  #cluster: Cluster | null = null;
  #topics = new Map<Topic, Set<EventHandler>>();
  #channels = new Map<string, Channel>();
  /** Cluster: channels given up while their SUNSUBSCRIBE could not be sent. */
  #stale = new Set<string>();
  #connected = false;
  #listeners = new Set<(connected: boolean) => void>();
  /** Moves on every loss: a restore that started before it does not report success. */
  #epoch = 0;
  #syncing = false;
  #syncAgain = false;
  #syncFailures = 0;
  #mismatches = 0;
  #timer: ReturnType<typeof setTimeout> | undefined;
  #closed = false;
  #connectionName: string;
  #clusterSpec: RedisSpec | null = null;
  /** Replaced cluster clients still closing. */
  #retiring: Promise<void>[] = [];

  /** Connects at once (in the background); `connected` turns true when subscribed. */
  constructor(spec: RedisSpec, options: RedisBusOptions = {}) {
    this.#prefix = options.prefix ?? "gtx:";
    this.#logger = options.logger ?? silentLogger;
    this.#onError = options.onError ??
      ((error) => this.#logger.error("bus handler failed", { error }));
    this.#publishTimeoutMs = options.publishTimeoutMs ?? 2_000;
    this.#baseMs = options.reconnect?.baseMs ?? 100;
    this.#maxMs = options.reconnect?.maxMs ?? 5_000;
    this.#connectionName = `gtx-bus-${this.origin}`;
    const reconnect = { baseMs: this.#baseMs, maxMs: this.#maxMs };
    if (spec.mode === "single") {
      this.#publisher = openRedis(spec, {
        connectionName: `${this.#connectionName}-pub`,
        reconnect,
      }) as Redis;
      // Subscriptions are restored by #sync, which knows when the server acknowledged them.
      const subscriber = openRedis(spec, {
        connectionName: this.#connectionName,
        reconnect,
        autoResubscribe: false,
      }) as Redis;
      this.#subscriber = subscriber;
      this.#publisher.on("error", (error) => this.#connectionError("publisher", error));
      subscriber.on("error", (error) => this.#connectionError("subscriber", error));
      subscriber.on("close", () => this.#lost("subscriber connection closed"));
      subscriber.on("ready", () => {
        this.#cancelTimer();
        this.#syncFailures = 0;
        this.#sync();
      });
      subscriber.on("message", (channel: string, text: string) => this.#receive(channel, text));
    } else {
      this.#clusterSpec = spec;
      this.#openCluster();
    }
  }

  /**
   * Opens the cluster client; a replaced one's events are ignored. ioredis 6.0.0's sharded
   * subscriber group can wedge after a full outage (a stop during its reset leaves the reset
   * pending: "No sharded subscriber for slot"), so a wedged client is replaced by a new one.
   */
  #openCluster(): void {
    const cluster = openRedis(this.#clusterSpec!, {
      connectionName: this.#connectionName,
      reconnect: { baseMs: this.#baseMs, maxMs: this.#maxMs },
      shardedSubscribers: true,
    }) as Cluster;
    this.#cluster = cluster;
    const live = () => this.#cluster === cluster;
    cluster.on("error", (error: Error) => live() && this.#connectionError("cluster", error));
    cluster.on("node error", (error: Error) => live() && this.#connectionError("node", error));
    cluster.on("nodeError", (error: Error) => live() && this.#connectionError("subscriber", error));
    for (const event of ["close", "reconnecting", "end"]) {
      cluster.on(event, () => live() && this.#lost(`cluster ${event}`));
    }
    // Emitted with the node key only when a sharded subscriber connection ended.
    cluster.on("-node", (_redis: unknown, nodeKey?: string) => {
      if (nodeKey !== undefined && live()) this.#lost(`sharded subscriber of ${nodeKey} ended`);
    });
    cluster.on("ready", () => live() && this.#sync());
    cluster.on("subscribersReady", () => live() && this.#sync());
    cluster.on("smessage", (channel: string, text: string) => {
      if (live()) this.#receive(channel, text);
    });
  }

  /** Drops the cluster client for a new one; every channel is subscribed afresh on it. */
  #replaceCluster(): void {
    const old = this.#cluster!;
    this.#logger.warn("bus replaces its Redis Cluster client (sharded subscribers wedged)");
    this.#openCluster();
    this.#stale.clear();
    for (const channel of this.#channels.values()) channel.acked = false;
    this.#lost("cluster client replaced");
    this.#retiring.push(quit(old).catch(() => {}));
  }

  /** Whether events of other instances arrive: subscribed, every channel acknowledged. */
  get connected(): boolean {
    return this.#connected;
  }

  /**
   * Delivers the events to this instance's subscribers at once, then sends one message per
   * topic: a single server gets them pipelined in one round trip, a cluster one `SPUBLISH` per
   * topic in parallel. Rejects when Redis did not take every message (at once while
   * disconnected; after `publishTimeoutMs` at most otherwise).
   */
  publish(events: readonly GatewayEvent[]): Promise<void> {
    try {
      if (events.length === 0) return Promise.resolve();
      deliver(this.#topics, events, (error) => this.#reportError(error));
      if (this.#closed) return Promise.reject(new Error("The bus is closed"));
      const byTopic = new Map<Topic, GatewayEvent[]>();
      for (const event of events) {
        for (const topic of topicsOf(event)) {
          const list = byTopic.get(topic);
          if (list) list.push(event);
          else byTopic.set(topic, [event]);
        }
      }
      const messages: [channel: string, text: string, topic: Topic][] = [];
      for (const [topic, list] of byTopic) {
        const message: BusMessage = { v: BUS_FORMAT, o: this.origin, e: list };
        messages.push([this.#prefix + topic, JSON.stringify(message), topic]);
      }
      return this.#send(messages);
    } catch (error) {
      // Never throws synchronously: an event that cannot be serialised rejects the promise.
      this.stats.publishErrors++;
      return Promise.reject(error);
    }
  }

  /**
   * Subscribes to one topic. The first subscription of a channel subscribes on the server
   * (`ready` settles on its acknowledgement, or on the one after a reconnect); the last
   * `unsubscribe` unsubscribes there.
   */
  subscribe(topic: Topic, handler: EventHandler): Subscription {
    const local = subscribeTo(this.#topics, topic, handler);
    if (this.#closed) return local;
    const name = this.#prefix + topic;
    let channel = this.#channels.get(name);
    if (!channel) {
      channel = { topic, refs: 0, acked: false, ready: Promise.withResolvers() };
      this.#channels.set(name, channel);
      this.#stale.delete(name);
      this.#serverSubscribe(name, channel);
    }
    channel.refs++;
    const held = channel;
    let active = true;
    return {
      ready: held.ready.promise,
      unsubscribe: () => {
        if (!active) return;
        active = false;
        local.unsubscribe();
        held.refs--;
        if (held.refs > 0 || this.#channels.get(name) !== held) return;
        this.#channels.delete(name);
        this.#serverUnsubscribe(name);
      },
    };
  }

  /** Adds a listener of connection changes; returns its removal. */
  onConnectionChange(listener: (connected: boolean) => void): () => void {
    this.#listeners.add(listener);
    return () => this.#listeners.delete(listener);
  }

  /** Quits the connections, stops every timer, settles pending `ready`s; idempotent. */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    this.#cancelTimer();
    this.#listeners.clear();
    for (const channel of this.#channels.values()) channel.ready.resolve();
    this.#channels.clear();
    this.#topics.clear();
    const clients = [this.#publisher, this.#subscriber, this.#cluster].filter((c) => c !== null);
    await Promise.all([...clients.map((client) => quit(client)), ...this.#retiring]);
    this.#connected = false;
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }

  async #send(messages: [string, string, Topic][]): Promise<void> {
    let sent: Promise<unknown>;
    if (this.#publisher) {
      if (this.#publisher.status !== "ready") {
        this.stats.publishErrors++;
        throw new Error(`Redis is unavailable (publisher ${this.#publisher.status})`);
      }
      const pipeline = this.#publisher.pipeline();
      for (const [channel, text] of messages) pipeline.publish(channel, text);
      sent = pipeline.exec().then((results) => {
        const failed = results?.find(([error]) => error);
        if (!results || failed) throw failed?.[0] ?? new Error("Redis discarded the pipeline");
      });
    } else {
      const cluster = this.#cluster!;
      if (cluster.status !== "ready") {
        this.stats.publishErrors++;
        throw new Error(`Redis Cluster is unavailable (${cluster.status})`);
      }
      sent = Promise.all(messages.map(([channel, text]) => cluster.spublish(channel, text)));
    }
    let timer: ReturnType<typeof setTimeout> | undefined;
    try {
      await Promise.race([
        sent,
        new Promise<never>((_, reject) => {
          timer = setTimeout(
            () =>
              reject(new Error(`Redis did not take the batch within ${this.#publishTimeoutMs} ms`)),
            this.#publishTimeoutMs,
          );
        }),
      ]);
    } catch (error) {
      sent.catch(() => {});
      this.stats.publishErrors++;
      throw new Error("Bus publish failed", { cause: error });
    } finally {
      clearTimeout(timer);
    }
    for (const [, , topic] of messages) {
      const kind = topicKind(topic);
      this.stats.published[kind] = (this.stats.published[kind] ?? 0) + 1;
    }
  }

  #serverSubscribe(name: string, channel: Channel): void {
    const acknowledged = () => this.#acknowledge(name, channel);
    const failed = (error: unknown) => {
      this.#logger.debug("bus subscribe not acknowledged", { channel: name, error });
      if (this.#connected) this.#schedule();
    };
    if (this.#subscriber) {
      // Not connected: the restore after the next `ready` subscribes it.
      if (this.#subscriber.status === "ready") {
        this.#subscriber.subscribe(name).then(acknowledged, failed);
      }
    } else if (this.#cluster!.status === "ready") {
      this.#cluster!.ssubscribe(name).then(acknowledged, failed);
    }
  }

  #serverUnsubscribe(name: string): void {
    if (this.#subscriber) {
      // Disconnected, the server has forgotten it already; the restore leaves it out.
      if (this.#subscriber.status === "ready") {
        this.#subscriber.unsubscribe(name).catch(() => {});
      }
      return;
    }
    // ioredis remembers cluster channels across reconnects: a channel it could not leave now
    // is left by the next restore.
    const cluster = this.#cluster!;
    if (cluster.status !== "ready") {
      this.#stale.add(name);
      return;
    }
    cluster.sunsubscribe(name).catch(() => {
      if (!this.#channels.has(name)) this.#stale.add(name);
    });
  }

  #acknowledge(name: string, channel: Channel): void {
    if (this.#channels.get(name) !== channel) return;
    channel.acked = true;
    channel.ready.resolve();
  }

  /** A message from Redis: dropped when it is ours or malformed, else delivered to the topic. */
  #receive(name: string, text: string): void {
    const channel = this.#channels.get(name);
    if (!channel) return;
    let message: BusMessage;
    try {
      message = JSON.parse(text);
    } catch {
      this.#malformed(name, "not JSON");
      return;
    }
    const problem = checkMessage(message, channel.topic);
    if (problem) {
      this.#malformed(name, problem);
      return;
    }
    if (message.o === this.origin) return;
    const kind = topicKind(channel.topic);
    this.stats.received[kind] = (this.stats.received[kind] ?? 0) + 1;
    const handlers = this.#topics.get(channel.topic);
    if (!handlers) return;
    // Only this channel's topic: the same event also arrives on its other topics' channels.
    deliver(new Map([[channel.topic, handlers]]), message.e, (error) => this.#reportError(error));
  }

  #malformed(channel: string, reason: string): void {
    const count = ++this.stats.malformed;
    // 1st, 10th, 100th …: visible without flooding the log.
    if (Number.isInteger(Math.log10(count))) {
      this.#logger.warn("bus dropped a malformed message", { channel, reason, malformed: count });
    }
  }

  #lost(reason: string): void {
    if (this.#closed) return;
    this.#epoch++;
    this.#mismatches = 0;
    if (this.#subscriber) {
      // The server forgot this connection's subscriptions: all are restored after `ready`.
      for (const channel of this.#channels.values()) channel.acked = false;
    } else {
      // A cluster restores on its own events; the timer covers the case none comes.
      this.#schedule();
    }
    if (!this.#connected) return;
    this.#connected = false;
    this.stats.disconnects++;
    this.#logger.warn("bus lost Redis", { reason });
    this.#emit(false);
  }

  #connectionError(role: string, error: Error): void {
    // ioredis reports every failed reconnection attempt: only the first of an outage is news.
    if (this.#connected) this.#logger.warn("bus Redis connection error", { role, error });
    else this.#logger.debug("bus Redis connection error", { role, error });
  }

  /** Runs {@linkcode #restore}, one at a time, again when asked meanwhile. */
  #sync(): void {
    if (this.#closed) return;
    if (this.#syncing) {
      this.#syncAgain = true;
      return;
    }
    this.#syncing = true;
    const epoch = this.#epoch;
    this.#restore().then(
      (done) => {
        this.#syncing = false;
        if (this.#closed) return;
        if (done && epoch === this.#epoch) {
          this.#syncFailures = 0;
          if (!this.#connected) {
            this.#connected = true;
            this.#logger.info("bus subscribed on Redis", { channels: this.#channels.size });
            this.#emit(true);
          }
        } else {
          this.#schedule();
        }
        if (this.#syncAgain) {
          this.#syncAgain = false;
          this.#sync();
        }
      },
      (error) => {
        this.#syncing = false;
        this.#logger.debug("bus restore failed", { error });
        this.#schedule();
        if (this.#syncAgain) {
          this.#syncAgain = false;
          this.#sync();
        }
      },
    );
  }

  /**
   * Brings the server's subscriptions in line with `#channels`; true when they are. A single
   * server: SUBSCRIBE every channel not acknowledged since the connection came up. A cluster:
   * ioredis re-subscribes its sharded channels itself; this subscribes what it never knew,
   * leaves the stale ones, and checks each node's `CLIENT LIST` (`ssub=`) for our subscriber.
   */
  async #restore(): Promise<boolean> {
    if (this.#subscriber) {
      const subscriber = this.#subscriber;
      if (subscriber.status !== "ready") return false;
      const pending = [...this.#channels].filter(([, channel]) => !channel.acked);
      for (let i = 0; i < pending.length; i += SUBSCRIBE_CHUNK) {
        const chunk = pending.slice(i, i + SUBSCRIBE_CHUNK);
        await subscriber.subscribe(...chunk.map(([name]) => name));
        for (const [name, channel] of chunk) this.#acknowledge(name, channel);
      }
      return [...this.#channels.values()].every((channel) => channel.acked);
    }
    const cluster = this.#cluster!;
    if (cluster.status !== "ready") return false;
    const stale = [...this.#stale];
    await Promise.all(stale.map(async (name) => {
      await cluster.sunsubscribe(name);
      if (!this.#channels.has(name)) this.#stale.delete(name);
    }));
    const pending = [...this.#channels].filter(([, channel]) => !channel.acked);
    try {
      await Promise.all(pending.map(async ([name, channel]) => {
        await cluster.ssubscribe(name);
        this.#acknowledge(name, channel);
      }));
    } catch (error) {
      if (!/No sharded subscriber/.test(String((error as Error)?.message))) throw error;
      this.#replaceCluster();
      return false;
    }
    const wrong = await this.#checkCluster(cluster);
    if (wrong === null) return false;
    if (wrong.length === 0) {
      this.#mismatches = 0;
      return true;
    }
    if (++this.#mismatches < MISMATCHES_BEFORE_REPAIR) return false;
    // ioredis did not restore these (a reachable node shows other subscriptions than ours).
    this.#mismatches = 0;
    this.#logger.warn("bus re-subscribes sharded channels ioredis did not restore", {
      channels: wrong.length,
    });
    try {
      await Promise.all(wrong.map((name) => cluster.ssubscribe(name)));
    } catch (error) {
      this.#logger.debug("bus repair failed", { error });
      this.#replaceCluster();
      return false;
    }
    return true;
  }

  /**
   * The channels of nodes whose sharded subscriber of this bus holds another number of
   * channels than it should; `null` when a node with channels of ours cannot be asked.
   * Without the right to `CLIENT LIST` the check passes.
   */
  async #checkCluster(cluster: Cluster): Promise<string[] | null> {
    if (this.#channels.size === 0) return [];
    const byNode = new Map<string, string[]>();
    for (const name of this.#channels.keys()) {
      const node = cluster.slots[keySlot(name)]?.[0];
      if (node === undefined) return null;
      const list = byNode.get(node);
      if (list) list.push(name);
      else byNode.set(node, [name]);
    }
    const masters = new Map(
      cluster.nodes("master").map((
        redis,
      ) => [`${redis.options.host}:${redis.options.port}`, redis]),
    );
    const wrong: string[] = [];
    const ours = `ioredis-cluster(ssubscriber):${this.#connectionName}`;
    for (const [node, names] of byNode) {
      const redis = masters.get(node);
      if (!redis) return null;
      let list: string;
      try {
        list = String(await redis.client("LIST"));
      } catch (error) {
        if (/NOPERM|unknown command/i.test(String((error as Error)?.message))) return [];
        return null;
      }
      const line = list.split("\n").find((l) => l.includes(` name=${ours} `));
      const count = Number(/ ssub=(\d+)/.exec(line ?? "")?.[1] ?? 0);
      if (count !== names.length) wrong.push(...names);
    }
    return wrong;
  }

  /** Runs {@linkcode #sync} after the next back-off wait (one timer at most). */
  #schedule(): void {
    if (this.#closed || this.#timer !== undefined) return;
    const wait = reconnectDelay(++this.#syncFailures, this.#baseMs, this.#maxMs);
    this.#timer = setTimeout(() => {
      this.#timer = undefined;
      this.#sync();
    }, wait);
  }

  #cancelTimer(): void {
    clearTimeout(this.#timer);
    this.#timer = undefined;
  }

  #emit(connected: boolean): void {
    for (const listener of [...this.#listeners]) {
      try {
        listener(connected);
      } catch (error) {
        this.#reportError(error);
      }
    }
  }

  #reportError(error: unknown): void {
    try {
      this.#onError(error);
    } catch {
      // A failing error reporter must not break delivery either.
    }
  }
}

/** Why `message` is not a {@linkcode BusMessage} of `topic`; `null` when it is one. */
function checkMessage(message: unknown, topic: Topic): string | null {
  if (typeof message !== "object" || message === null) return "not an object";
  const { v, o, e } = message as Partial<BusMessage>;
  if (v !== BUS_FORMAT) return `format ${JSON.stringify(v)} is not ${BUS_FORMAT}`;
  if (typeof o !== "string" || o === "") return "no origin";
  if (!Array.isArray(e) || e.length === 0) return "no events";
  for (const event of e) {
    if (
      typeof event !== "object" || event === null || !KNOWN_TYPES.has(event.type) ||
      typeof event.data !== "object" || event.data === null
    ) {
      return "an event of unknown shape";
    }
    let topics: Topic[];
    try {
      topics = topicsOf(event);
    } catch {
      return "an event of unknown shape";
    }
    if (!topics.includes(topic)) return "an event of another topic";
  }
  return null;
}

/** How long {@linkcode quit} waits for the sockets to close after QUIT. */
const QUIT_TIMEOUT_MS = 2_000;

/**
 * Quits gracefully when connected, else just disconnects (stopping reconnection); resolves
 * when the client has ended, so that no socket outlives `close()`.
 */
async function quit(client: Redis | Cluster): Promise<void> {
  if (client.status === "end") return;
  const ended = new Promise<void>((resolve) => client.once("end", () => resolve()));
  let timer: ReturnType<typeof setTimeout> | undefined;
  try {
    if (client.status === "ready") {
      await client.quit().catch(() => client.disconnect());
    } else {
      client.disconnect();
    }
    await Promise.race([
      ended,
      new Promise<void>((resolve) => timer = setTimeout(resolve, QUIT_TIMEOUT_MS)),
    ]);
  } finally {
    clearTimeout(timer);
  }
}
