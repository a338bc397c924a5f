// The Bus contract on every adapter: in-process, Redis on one server (the machine's, or
// TEST_REDIS_URL), and Redis Cluster (three local nodes started per case, sharded pub/sub).
import { Cluster, Redis } from "ioredis";
import { LocalBus } from "../bus/local_bus.ts";
import { whenConnected } from "../bus/open_bus.ts";
import { RedisBus } from "../bus/redis_bus.ts";
import type { RedisSpec } from "../core/config.ts";
import type { Topic } from "../core/events.ts";
import { busContract, type BusFixture } from "./contracts/bus_contract.ts";
import { redisBinariesAvailable, startRedisCluster } from "./_redis_cluster.ts";
import { probeTcp, redactUrl, redisUrl, requireService } from "./_services.ts";

const CONNECT_TIMEOUT_MS = 10_000;

busContract("LocalBus", () => {
  return Promise.resolve({
    buses: [new LocalBus({ onError: () => {} })],
    cleanup: () => Promise.resolve(),
  });
}, { remote: false, counts: false });

/** A prefix of its own per case: the shared Redis never sees two cases' channels mix. */
function testPrefix(): string {
  return `gtx-test-${crypto.randomUUID().slice(0, 8)}:`;
}

/** `count` RedisBus on `spec`, each connected, or throws (closing them). */
async function connectedBuses(spec: RedisSpec, prefix: string, count: number) {
  const buses = Array.from(
    { length: count },
    () => new RedisBus(spec, { prefix, onError: () => {}, reconnect: { maxMs: 500 } }),
  );
  const ok = await Promise.all(buses.map((bus) => whenConnected(bus, CONNECT_TIMEOUT_MS)));
  if (!ok.every(Boolean)) {
    await Promise.all(buses.map((bus) => bus.close()));
    throw new Error(`RedisBus did not connect within ${CONNECT_TIMEOUT_MS} ms`);
  }
  return buses;
}

const url = redisUrl();
const single = await requireService(`Redis at ${redactUrl(url)}`, probeTcp(url, 6379));
busContract(
  `RedisBus on ${redactUrl(url)}${single.ok ? "" : ` (skipped: ${single.reason})`}`,
  async (count): Promise<BusFixture> => {
    const prefix = testPrefix();
    const buses = await connectedBuses({ mode: "single", url }, prefix, count);
    const raw = new Redis(url);
    return {
      buses,
      injectRaw: async (topic: Topic, text: string) => {
        await raw.publish(prefix + topic, text);
      },
      serverSubscribers: async (topic: Topic) => {
        const reply = await raw.call("PUBSUB", "NUMSUB", prefix + topic) as [string, number];
        return Number(reply[1]);
      },
      cleanup: async () => {
        await raw.quit();
      },
    };
  },
  { remote: true, counts: true, ignore: !single.ok },
);

const binaries = await redisBinariesAvailable();
busContract(
  `RedisBus on a 3-node Redis Cluster${binaries.ok ? "" : ` (skipped: ${binaries.reason})`}`,
  async (count): Promise<BusFixture> => {
    const cluster = await startRedisCluster();
    try {
      const prefix = testPrefix();
      const nodes = cluster.nodes.map((node) => {
        const [host, port] = node.split(":");
        return { host, port: Number(port) };
      });
      const buses = await connectedBuses({ mode: "cluster", nodes }, prefix, count);
      const raw = new Cluster(nodes);
      return {
        buses,
        injectRaw: async (topic: Topic, text: string) => {
          await raw.spublish(prefix + topic, text);
        },
        // SHARDNUMSUB counts a node's own subscribers: the sum over the masters is the total.
        serverSubscribers: async (topic: Topic) => {
          const counts = await Promise.all(
            raw.nodes("master").map((node) =>
              node.call("PUBSUB", "SHARDNUMSUB", prefix + topic) as Promise<[string, number]>
            ),
          );
          return counts.reduce((sum, reply) => sum + Number(reply[1]), 0);
        },
        cleanup: async () => {
          await raw.quit();
          await cluster.close();
        },
      };
    } catch (error) {
      await cluster.close();
      throw error;
    }
  },
  { remote: true, counts: true, ignore: !binaries.ok },
);
