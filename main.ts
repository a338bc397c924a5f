// Composition root: read config, pick adapters, serve, shut down cleanly.
import { LocalBus } from "./bus/local_bus.ts";
import { systemClock } from "./core/clock.ts";
import { loadConfig } from "./core/config.ts";
import { ConfigError } from "./core/errors.ts";
import { jsonLogger } from "./core/logger.ts";
import { loadOrCreateSecrets, secretsPath } from "./db/secrets_file.ts";
import { createGateway } from "./services/gateway.ts";

async function main(): Promise<void> {
  let config;
  try {
    config = loadConfig(Deno.env.toObject());
  } catch (error) {
    if (!(error instanceof ConfigError)) throw error;
    console.error(error.message);
    Deno.exit(2);
  }
  const logger = jsonLogger(config.logLevel, { base: { instance: config.instanceId } });

  const embedded = await loadOrCreateSecrets(secretsPath(config.kvPath));
  const jwtSecret = config.jwtSecret ?? embedded.jwtSecret;
  const kek = config.kek ?? embedded.kek;

  const bus = new LocalBus();
  const gateway = await createGateway({
    config,
    storeSpec: { kind: "kv", path: config.kvPath },
    bus,
    clock: systemClock,
    logger,
    jwtSecret,
    kek,
  });

  const abort = new AbortController();
  const server = Deno.serve({
    hostname: config.host,
    port: config.port,
    signal: abort.signal,
    onListen: ({ hostname, port }) =>
      logger.info("gateway listening", {
        url: `http://${hostname}:${port}`,
        store: `deno-kv:${config.kvPath}`,
        bus: "in-process",
      }),
  }, gateway.app.fetch);

  let stopping = false;
  const stop = async (signal: string) => {
    if (stopping) return;
    stopping = true;
    logger.info("shutting down", { signal });
    abort.abort();
    await server.finished;
    await gateway.close();
    await bus.close();
    logger.info("stopped");
    Deno.exit(0);
  };
  Deno.addSignalListener("SIGINT", () => stop("SIGINT"));
  Deno.addSignalListener("SIGTERM", () => stop("SIGTERM"));
}

if (import.meta.main) await main();
