import assert from "node:assert/strict";
import type { Cache, CacheKey } from "../../cache/cache.ts";

/** A cache under test and how to dispose of it. */
export interface CacheFixture {
  cache: Cache;
  /** A second handle on the same backend (another connection), where the backend is shared. */
  peer?: Cache;
  /** Moves the adapter's expiry clock; absent: entries expire in real time. */
  advance?: (ms: number) => void;
  cleanup(): Promise<void>;
}

/** Makes a fresh, empty cache; every test case gets its own. */
export type CacheFactory = () => Promise<CacheFixture>;

/** How the suite runs against one backend. */
export interface CacheContractOptions {
  /** Skip the suite, e.g. when the backend is unreachable here. */
  ignore?: boolean;
}

const k = (group: string, item = "v"): CacheKey => ({ group, item });

/**
 * Registers the behaviour every {@linkcode Cache} adapter must show, as `Deno.test` cases named
 * `"<name>: ..."`.
 */
export function cacheContract(
  name: string,
  factory: CacheFactory,
  options: CacheContractOptions = {},
): void {
  const test = (title: string, fn: (f: CacheFixture) => Promise<void>) => {
    Deno.test({
      name: `${name}: ${title}`,
      ignore: options.ignore ?? false,
      async fn() {
        const fixture = await factory();
        try {
          await fn(fixture);
        } finally {
          await fixture.cleanup();
        }
      },
    });
  };

  test("a miss has no value and a generation that stays until an invalidation", async ({ cache }) => {
    const first = await cache.get(k("g1"));
    assert.equal(first.value, undefined);
    assert.equal(typeof first.generation, "string");
    assert.equal((await cache.get(k("g1"))).generation, first.generation);
    assert.equal((await cache.get(k("g1", "other"))).generation, first.generation);
  });

  test("a fill under the current generation is read back exactly", async ({ cache }) => {
    const values = ["", "plain", '{"n":1.5,"x":null,"minted":true}', "a|b|c", "ünïcödé ✓ \n\t"];
    for (const [i, value] of values.entries()) {
      const key = k("g2", `i${i}`);
      const { generation } = await cache.get(key);
      assert.equal(await cache.fill(key, { generation, value, ttlMs: 60_000 }), true);
      assert.deepEqual(await cache.get(key), { value, generation });
    }
  });

  test("a fill under an outdated generation does not land", async ({ cache }) => {
    const key = k("g3");
    const { generation } = await cache.get(key);
    await cache.invalidate(["g3"]);
    assert.equal(await cache.fill(key, { generation, value: "stale", ttlMs: 60_000 }), false);
    const after = await cache.get(key);
    assert.equal(after.value, undefined);
    assert.notEqual(after.generation, generation);
    // Under the new generation the fill lands.
    assert.equal(
      await cache.fill(key, { generation: after.generation, value: "fresh", ttlMs: 60_000 }),
      true,
    );
    assert.equal((await cache.get(key)).value, "fresh");
  });

  test("an invalidation hides every item of its groups and nothing else", async ({ cache }) => {
    for (const key of [k("a", "1"), k("a", "2"), k("b"), k("c")]) {
      const { generation } = await cache.get(key);
      await cache.fill(key, { generation, value: `${key.group}${key.item}`, ttlMs: 60_000 });
    }
    await cache.invalidate(["a", "b", "a", "never-filled"]);
    assert.equal((await cache.get(k("a", "1"))).value, undefined);
    assert.equal((await cache.get(k("a", "2"))).value, undefined);
    assert.equal((await cache.get(k("b"))).value, undefined);
    assert.equal((await cache.get(k("c"))).value, "cv");
    await cache.invalidate([]);
    assert.equal((await cache.get(k("c"))).value, "cv");
  });

  test("a group never gets a generation back", async ({ cache }) => {
    const seen = new Set<string>();
    for (let i = 0; i < 20; i++) {
      const { generation } = await cache.get(k("g5"));
      assert.ok(!seen.has(generation), `generation "${generation}" came back`);
      seen.add(generation);
      await cache.invalidate(["g5"]);
    }
  });

  test("a fill replaces the item's value and leaves the group's other items", async ({ cache }) => {
    const { generation } = await cache.get(k("g6", "x"));
    await cache.fill(k("g6", "x"), { generation, value: "x1", ttlMs: 60_000 });
    await cache.fill(k("g6", "y"), { generation, value: "y1", ttlMs: 60_000 });
    await cache.fill(k("g6", "x"), { generation, value: "x2", ttlMs: 60_000 });
    assert.equal((await cache.get(k("g6", "x"))).value, "x2");
    assert.equal((await cache.get(k("g6", "y"))).value, "y1");
  });

  test("an entry expires after its TTL", async ({ cache, advance }) => {
    const key = k("g7");
    const { generation } = await cache.get(key);
    await cache.fill(key, { generation, value: "short", ttlMs: 40 });
    await cache.fill(k("g7", "long"), { generation, value: "long", ttlMs: 600_000 });
    assert.equal((await cache.get(key)).value, "short");
    if (advance) advance(40);
    else {
      // Real time: poll until the backend expires it (bounded), not a fixed sleep.
      const deadline = Date.now() + 5_000;
      while ((await cache.get(key)).value !== undefined && Date.now() < deadline) {
        await new Promise((resolve) => setTimeout(resolve, 10));
      }
    }
    assert.equal((await cache.get(key)).value, undefined);
    assert.equal((await cache.get(k("g7", "long"))).value, "long");
  });

  test("a TTL must be a positive whole number of milliseconds", async ({ cache }) => {
    const { generation } = await cache.get(k("g8"));
    for (const ttlMs of [0, -1, 1.5, NaN]) {
      await assert.rejects(
        async () => await cache.fill(k("g8"), { generation, value: "v", ttlMs }),
        RangeError,
      );
    }
  });

  test("another handle on the backend sees fills and invalidations", async ({ cache, peer }) => {
    if (!peer) return; // Not a shared backend.
    const key = k("g9");
    const { generation } = await cache.get(key);
    assert.equal((await peer.get(key)).generation, generation);
    await cache.fill(key, { generation, value: "shared", ttlMs: 60_000 });
    assert.equal((await peer.get(key)).value, "shared");
    // A fill that one handle started before the other's invalidation does not land.
    const slow = await cache.get(k("g9", "slow"));
    await peer.invalidate(["g9"]);
    assert.equal((await cache.get(key)).value, undefined);
    assert.equal(
      await cache.fill(k("g9", "slow"), {
        generation: slow.generation,
        value: "old",
        ttlMs: 60_000,
      }),
      false,
    );
    assert.equal((await peer.get(k("g9", "slow"))).value, undefined);
  });
}
