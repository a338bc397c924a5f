import { type Clock, systemClock } from "../core/clock.ts";
import { type Cache, type CacheFill, type CacheKey, type CacheLookup, checkTtl } from "./cache.ts";

/** Options of {@linkcode LruCache}. */
export interface LruCacheOptions {
  /** Entries kept; the least recently used one goes first (CACHE_MAX_ENTRIES). */
  maxEntries: number;
  /** Expiry clock; the system clock unless a test moves time itself. */
  clock?: Clock;
}

interface Entry {
  generation: string;
  value: string;
  expiresAt: number;
}

/**
 * The in-process adapter of the {@linkcode Cache} port: one instance's memory, bounded by a
 * count of entries with least-recently-used replacement. Generations are drawn from one counter
 * that only grows, so a group never gets a generation back; a group's generation is created by
 * its first `get`; at most twice `maxEntries` are kept, and forgetting one only makes its
 * entries and pending fills miss (the group's next generation is new).
 */
export class LruCache implements Cache {
  #max: number;
  #clock: Clock;
  /** `group \0 item` → entry, least recently used first. */
  #entries = new Map<string, Entry>();
  /** group → current generation, least recently used first. */
  #generations = new Map<string, string>();
  #counter = 0;

  constructor(options: LruCacheOptions) {
    if (!Number.isInteger(options.maxEntries) || options.maxEntries < 1) {
      throw new RangeError(`maxEntries must be a positive integer, got "${options.maxEntries}"`);
    }
    this.#max = options.maxEntries;
    this.#clock = options.clock ?? systemClock;
  }

  /** Entries held, including expired or outdated ones not yet dropped. */
  get size(): number {
    return this.#entries.size;
  }

  get(key: CacheKey): Promise<CacheLookup> {
    const generation = this.#generationOf(key.group);
    const id = idOf(key);
    const entry = this.#entries.get(id);
    if (entry === undefined) return Promise.resolve({ value: undefined, generation });
    this.#entries.delete(id);
    if (entry.generation !== generation || entry.expiresAt <= this.#clock.now()) {
      return Promise.resolve({ value: undefined, generation });
    }
    this.#entries.set(id, entry);
    return Promise.resolve({ value: entry.value, generation });
  }

  fill(key: CacheKey, fill: CacheFill): Promise<boolean> {
    try {
      checkTtl(fill.ttlMs);
    } catch (error) {
      return Promise.reject(error);
    }
    if (this.#generations.get(key.group) !== fill.generation) return Promise.resolve(false);
    const id = idOf(key);
    this.#entries.delete(id);
    this.#entries.set(id, {
      generation: fill.generation,
      value: fill.value,
      expiresAt: this.#clock.now() + fill.ttlMs,
    });
    if (this.#entries.size > this.#max) this.#entries.delete(this.#entries.keys().next().value!);
    return Promise.resolve(true);
  }

  invalidate(groups: readonly string[]): Promise<void> {
    // Entries of the old generation are unreadable from now on; they are dropped when next
    // looked up, or fall out of the LRU (nothing touches them any more).
    for (const group of groups) this.#setGeneration(group, this.#next());
    return Promise.resolve();
  }

  #generationOf(group: string): string {
    const generation = this.#generations.get(group);
    if (generation === undefined) return this.#setGeneration(group, this.#next());
    this.#generations.delete(group);
    this.#generations.set(group, generation);
    return generation;
  }

  #setGeneration(group: string, generation: string): string {
    this.#generations.delete(group);
    this.#generations.set(group, generation);
    // Twice the entries: groups looked up but not (yet) filled must not push out the
    // generations of entries that are still held. Forgetting one only costs misses.
    if (this.#generations.size > 2 * this.#max) {
      this.#generations.delete(this.#generations.keys().next().value!);
    }
    return generation;
  }

  #next(): string {
    return String(++this.#counter);
  }
}

function idOf(key: CacheKey): string {
  return `${key.group}\u0000${key.item}`;
}
