// aedes' in-memory persistence (aedes-persistence 11) keeps every QoS 1 message queued for a
// persistent session until it is delivered, with no bound and no expiry. This wraps it: each
// session's queue holds at most `queueMax` messages (newer ones are dropped and counted), and a
// session can be forgotten entirely (its subscriptions and its queue).
import memory from "aedes-persistence";

/** What aedes calls on its persistence (the parts this module touches). */
interface Persistence {
  outgoingEnqueue(sub: { clientId: string }, packet: unknown): Promise<void>;
  outgoingEnqueueCombi(subs: { clientId: string }[], packet: unknown): Promise<void>;
  outgoingClearMessageId(client: { id: string }, packet: unknown): Promise<unknown>;
  outgoingStream(client: { id: string }): AsyncIterable<unknown>;
  cleanSubscriptions(client: { id: string }): Promise<unknown>;
  cleanIncoming?(client: { id: string }): Promise<unknown>;
}

/** Options of {@linkcode boundedPersistence}. */
export interface BoundedPersistenceOptions {
  /** Messages queued per session at most. */
  queueMax: number;
  /** Called for each message not queued because the session's queue was full. */
  onDrop: (clientId: string) => void;
}

/** The persistence handed to aedes, and what the broker does with it. */
export interface BoundedPersistence {
  /** Pass as aedes' `persistence` option. */
  persistence: unknown;
  /** Messages queued for a session (in flight or waiting). */
  queued(clientId: string): number;
  /** Deletes a session's subscriptions and queued messages. */
  forget(clientId: string): Promise<void>;
}

/** aedes' memory persistence with a bound on every session's queue. */
export function boundedPersistence(options: BoundedPersistenceOptions): BoundedPersistence {
  // A CommonJS module: its default export is the factory function (the bundled types disagree).
  const p = (memory as unknown as () => Persistence)();
  const counts = new Map<string, number>();
  const enqueue = p.outgoingEnqueue.bind(p);
  const enqueueCombi = p.outgoingEnqueueCombi.bind(p);
  const clear = p.outgoingClearMessageId.bind(p);
  const admit = (clientId: string): boolean => {
    const n = counts.get(clientId) ?? 0;
    if (n >= options.queueMax) {
      options.onDrop(clientId);
      return false;
    }
    counts.set(clientId, n + 1);
    return true;
  };
  p.outgoingEnqueue = (sub, packet) =>
    admit(sub.clientId) ? enqueue(sub, packet) : Promise.resolve();
  p.outgoingEnqueueCombi = (subs, packet) => {
    const admitted = subs.filter((sub) => admit(sub.clientId));
    return admitted.length > 0 ? enqueueCombi(admitted, packet) : Promise.resolve();
  };
  p.outgoingClearMessageId = async (client, packet) => {
    const removed = await clear(client, packet);
    if (removed) {
      const n = (counts.get(client.id) ?? 1) - 1;
      if (n <= 0) counts.delete(client.id);
      else counts.set(client.id, n);
    }
    return removed;
  };
  return {
    persistence: p,
    queued: (clientId) => counts.get(clientId) ?? 0,
    async forget(clientId) {
      const client = { id: clientId };
      await p.cleanSubscriptions(client);
      const queued: unknown[] = [];
      for await (const packet of p.outgoingStream(client)) queued.push(packet);
      for (const packet of queued) await clear(client, packet);
      await p.cleanIncoming?.(client);
      counts.delete(clientId);
    },
  };
}
