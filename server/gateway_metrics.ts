// The gateway's scrape-time metrics: figures its components keep themselves (registry, writer,
// hub, bus, pools, services), read when /metrics is scraped, so none costs the hot path more
// than the component's own `+= 1`.
import type { ActorRegistry } from "../actors/registry.ts";
import type { Bus } from "../bus/bus.ts";
import type { Metrics } from "../core/metrics.ts";
import type { Store } from "../db/store.ts";
import type { DeviceService } from "../services/devices.ts";
import type { WriterClient } from "../workers/writer_client.ts";
import type { WsHub } from "../ws/hub.ts";

/** Writer batch sizes in rows, and their durations in seconds. */
const BATCH_SIZE_BUCKETS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000];
const FLUSH_BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5];
/** Seconds to fan one bus event out to this instance's WebSocket clients. */
const BROADCAST_BUCKETS = [0.00001, 0.00005, 0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1];

/** The parts whose figures are exported. */
export interface MeteredParts {
  registry: ActorRegistry;
  writer: WriterClient;
  hub: WsHub;
  bus: Bus;
  store: Store;
  devices: DeviceService;
  /** Whether Redis backs the bus (then `redis_connected` is exported). */
  redis: boolean;
}

/** Declares the writer's histograms; returns the `onBatch` hook that fills them. */
export function writerMetrics(metrics: Metrics): (rows: number, ms: number) => void {
  metrics.histogram(
    "gateway_writer_batch_size",
    "Rows per committed writer batch",
    BATCH_SIZE_BUCKETS,
  );
  metrics.histogram(
    "gateway_writer_flush_duration_seconds",
    "Duration of a writer batch in the store (insert and commit)",
    FLUSH_BUCKETS,
  );
  return (rows, ms) => {
    metrics.observe("gateway_writer_batch_size", {}, rows);
    metrics.observe("gateway_writer_flush_duration_seconds", {}, ms / 1000);
  };
}

/** Declares `websocket_broadcast_duration_seconds`; returns the hub's `onBroadcast` hook. */
export function broadcastMetrics(metrics: Metrics): (seconds: number) => void {
  metrics.histogram(
    "websocket_broadcast_duration_seconds",
    "Time to fan one bus event out to this instance's WebSocket clients",
    BROADCAST_BUCKETS,
  );
  return (seconds) => metrics.observe("websocket_broadcast_duration_seconds", {}, seconds);
}

/** Declares every scrape-time family over `parts`. */
export function declareGatewayMetrics(metrics: Metrics, parts: MeteredParts): void {
  const { registry, writer, hub, bus, store, devices } = parts;
  metrics.gauge("gateway_actors_live", "Live meter actors", () => registry.size);
  metrics.counterOf(
    "gateway_actor_activations_total",
    "Actors activated (device state loaded)",
    () => registry.stats.activations,
  );
  metrics.counterOf(
    "gateway_actor_activation_failures_total",
    "Activations that failed (store unavailable)",
    () => registry.stats.activationFailures,
  );
  metrics.counterOf(
    "gateway_actor_passivations_total",
    "Idle actors passivated by the sweep",
    () => registry.stats.passivations,
  );
  metrics.counterOf(
    "gateway_actor_evictions_total",
    "Idle actors dropped to stay under ACTOR_MAX",
    () => registry.stats.evictions,
  );
  metrics.counterOf(
    "gateway_mailbox_overflows_total",
    "Readings refused because their meter's mailbox was full",
    () => registry.stats.mailboxOverflows,
  );
  metrics.gauge(
    "gateway_writer_queue",
    "Readings accepted and not yet committed (writer queue depth)",
    () => writer.stats.queued,
  );
  metrics.counterOf(
    "gateway_writer_batches_total",
    "Batches committed",
    () => writer.stats.batches,
  );
  metrics.counterOf("gateway_writer_rows_total", "Rows written", () => writer.stats.rows);
  metrics.gauge(
    "gateway_writer_batch_max",
    "Largest batch so far",
    () => writer.stats.maxBatchSize,
  );
  metrics.gauge(
    "gateway_writer_last_batch_ms",
    "Duration of the last batch",
    () => writer.stats.lastBatchMs,
  );
  metrics.gauge(
    "gateway_writer_last_round_trip_ms",
    "From handing the last batch to the writer until its results were back",
    () => writer.stats.lastRoundTripMs,
  );
  metrics.gauge(
    "gateway_writer_stalled",
    "1 while the store is failing",
    () => writer.stalled === null ? 0 : 1,
  );
  metrics.gauge("websocket_clients_connected", "Connected WebSocket clients", () => hub.size);
  metrics.collect(
    "websocket_messages_sent_total",
    "Messages sent to WebSocket clients, by event type",
    "counter",
    () => [...hub.stats.sent].map(([event_type, n]) => [{ event_type }, n] as const),
  );
  metrics.counterOf(
    "websocket_connection_attempts_total",
    "WebSocket upgrade requests",
    () => hub.stats.connectAttempts,
  );
  metrics.collect(
    "websocket_connection_failures_total",
    "WebSocket upgrades refused or failed, by reason",
    "counter",
    () => [...hub.stats.connectFailures].map(([reason, n]) => [{ reason }, n] as const),
  );
  metrics.counterOf(
    "gateway_ws_dropped_total",
    "WebSocket clients dropped as too slow",
    () => hub.stats.dropped,
  );
  metrics.counterOf(
    "gateway_ws_replayed_total",
    "Readings sent to WebSocket clients from the store (resume, gaps, after a bus outage)",
    () => hub.stats.replayed,
  );
  metrics.counterOf(
    "gateway_ws_resyncs_total",
    "resync_required messages sent",
    () => hub.stats.resyncs,
  );
  metrics.collect(
    "redis_pubsub_messages_total",
    "Bus messages through Redis pub/sub, by channel kind (meter, user, all, control) and direction",
    "counter",
    () => [
      ...Object.entries(bus.stats.published).map(([channel, n]) =>
        [{ channel, direction: "published" }, n] as const
      ),
      ...Object.entries(bus.stats.received).map(([channel, n]) =>
        [{ channel, direction: "received" }, n] as const
      ),
    ],
  );
  if (parts.redis) {
    metrics.gauge(
      "redis_connected",
      "1 while the Redis bus is connected",
      () => bus.connected ? 1 : 0,
    );
  }
  metrics.gauge(
    "gateway_bus_connected",
    "1 while events of other instances arrive",
    () => bus.connected ? 1 : 0,
  );
  metrics.counterOf(
    "gateway_bus_disconnects_total",
    "Times the bus lost its backend (fan-out across instances paused)",
    () => bus.stats.disconnects,
  );
  metrics.counterOf(
    "gateway_bus_publish_errors_total",
    "Batches the bus backend did not take (other instances catch up from the store)",
    () => bus.stats.publishErrors,
  );
  metrics.counterOf(
    "device_keys_registered_total",
    "Device keys issued (registrations and rotations) by this instance",
    () => devices.stats.keysRegistered,
  );
  metrics.counterOf(
    "device_keys_revoked_total",
    "Devices revoked by this instance",
    () => devices.stats.keysRevoked,
  );
  const pool = store.poolStats;
  if (pool) {
    const read = () => pool.call(store);
    metrics.gauge("db_pool_connections_max", "Connections the API pool may open", () => read().max);
    metrics.gauge(
      "db_pool_connections_busy",
      "API pool connections running queries (reserved for transactions included)",
      () => {
        const s = read();
        return s.busy + s.full + s.reserved;
      },
    );
    metrics.gauge(
      "db_pool_connections_idle",
      "API pool connections open and idle",
      () => read().open,
    );
    metrics.gauge(
      "db_pool_waiting",
      "Queries waiting for an API pool connection",
      () => read().waiting,
    );
  }
}
