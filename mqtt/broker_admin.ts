// Tells an external broker that a meter is revoked: it disconnects the device and refuses it from
// then on. The embedded broker needs none of this (it asks the gateway at every CONNECT and is
// told about revocations on the bus); an external broker authenticates devices itself.
import { connect, type MqttClient } from "mqtt";
import type { Config } from "../core/config.ts";
import type { Logger } from "../core/logger.ts";

/**
 * What the gateway asks of an external broker when a device's standing changes. A device logs
 * in with username = meter id (README, "Meters over MQTT"; `deploy/mosquitto.acl`'s `%u`
 * patterns), so every adapter acts on the username equal to the meter id.
 */
export interface BrokerAdmin {
  /** Disconnects every connection of the meter and refuses its logins from now on. */
  revoke(meterId: string): Promise<void>;
  /** Lets the meter log in again (after a registration). */
  reinstate(meterId: string): Promise<void>;
  /** Releases the adapter's connections; pending commands fail. */
  close(): Promise<void>;
}

/** A broker command that failed: refused by the broker, timed out, or never sent. */
export class BrokerAdminError extends Error {
  /** The meter the command was about. */
  readonly meterId: string;

  constructor(message: string, meterId: string, options: { cause?: unknown } = {}) {
    super(message, { cause: options.cause });
    this.name = "BrokerAdminError";
    this.meterId = meterId;
  }
}

/** How long one broker command may take, by default, in ms. */
export const DEFAULT_COMMAND_TIMEOUT_MS = 5_000;

// ---- Mosquitto: the dynamic security plugin ------------------------------------------------

/** Where the plugin takes commands and answers them (Mosquitto 2.0). */
export const DYNSEC_TOPIC = "$CONTROL/dynamic-security/v1";
export const DYNSEC_RESPONSE_TOPIC = "$CONTROL/dynamic-security/v1/response";
/** The plugin's answer for a username it does not know (Mosquitto 2.0.11). */
const CLIENT_NOT_FOUND = "Client not found";
const BACKOFF_MIN_MS = 500;
const BACKOFF_MAX_MS = 30_000;

/** Options of {@linkcode MosquittoDynsecAdmin}. */
export interface MosquittoDynsecAdminOptions {
  /** The broker, `mqtt://host:port` or `mqtts://…` (credentials in it are ignored). */
  url: string;
  /** A dynsec client with the admin role (`mosquitto_ctrl dynsec init … <user> <password>`). */
  username: string;
  password: string;
  /** Unique per gateway instance: a second connection with the same id would take this one over. */
  clientId: string;
  /**
   * Usernames that are never disabled, whatever meter is revoked: the admin's own and the
   * gateway's (`MQTT_USERNAME`). A meter with such an id is refused with an error instead.
   */
  reservedUsernames?: string[];
  /** How long one command may take, from the call to the plugin's answer (default 5 s). */
  timeoutMs?: number;
  logger: Logger;
}

interface Pending {
  meterId: string;
  command: string;
  /** The command's request, sent once the connection is ready. */
  payload: string;
  sent: boolean;
  timer: ReturnType<typeof setTimeout>;
  resolve: (error: string | undefined) => void;
  reject: (error: BrokerAdminError) => void;
}

/**
 * {@linkcode BrokerAdmin} for Mosquitto 2 with the dynamic security plugin. `revoke` sends
 * `disableClient` for the meter's username: the plugin disconnects every client logged in with
 * it and refuses new logins until `enableClient` (`reinstate`).
 *
 * One long-lived MQTT connection as a dynsec admin, reconnecting with back-off (0.5 s doubling
 * to 30 s). Requests carry a random `correlationData`, and answers on the response topic are
 * matched by it. Each command has a deadline: while the connection is being set up for the first
 * time, a command waits for it within that deadline; once a connection attempt has failed or the
 * connection is lost, commands fail at once (a fleet import must not wait out a timeout per
 * device while the broker is away) until the connection is back.
 */
export class MosquittoDynsecAdmin implements BrokerAdmin, AsyncDisposable {
  #o: MosquittoDynsecAdminOptions;
  #client: MqttClient;
  #timeoutMs: number;
  #reserved: Set<string>;
  #pending = new Map<string, Pending>();
  /** Connected and subscribed to the response topic. */
  #ready = false;
  /** Why the connection is down, once an attempt failed or it was lost; null before that. */
  #down: string | null = null;
  /** The last error mqtt.js reported (a refused CONNACK, a socket error). */
  #lastError: string | null = null;
  #backoff = BACKOFF_MIN_MS;
  #closed = false;
  #closing: Promise<void> | null = null;
  #safeUrl: string;

  constructor(options: MosquittoDynsecAdminOptions) {
    this.#o = options;
    this.#timeoutMs = options.timeoutMs ?? DEFAULT_COMMAND_TIMEOUT_MS;
    this.#reserved = new Set([options.username, ...(options.reservedUsernames ?? [])]);
    const url = new URL(options.url);
    url.username = "";
    url.password = "";
    this.#safeUrl = url.href;
    const client = this.#client = connect(url.href, {
      clientId: options.clientId,
      username: options.username,
      password: options.password,
      protocolVersion: 5,
      clean: true,
      keepalive: 30,
      connectTimeout: this.#timeoutMs,
      reconnectPeriod: BACKOFF_MIN_MS,
      // A refused login (wrong admin password) is retried too, with the back-off below.
      reconnectOnConnackError: true,
      resubscribe: false,
      log: () => {},
    });
    client.on("connect", () => this.#onConnect());
    client.on("message", (topic, payload) => {
      if (topic === DYNSEC_RESPONSE_TOPIC) this.#onResponse(payload);
    });
    client.on("error", (error) => this.#lastError = error.message);
    client.on("close", () => this.#onClose());
  }

  /** Whether commands are sent right now (connected and subscribed to the answers). */
  get connected(): boolean {
    return this.#ready;
  }

  /** `disableClient` for the meter's username; a username dynsec does not know is logged. */
  async revoke(meterId: string): Promise<void> {
    if (this.#reserved.has(meterId)) {
      throw new BrokerAdminError(
        `Meter "${meterId}" has the username of a broker service account; it is not disabled`,
        meterId,
      );
    }
    const error = await this.#command("disableClient", meterId);
    if (error === CLIENT_NOT_FOUND) {
      this.#o.logger.info("meter unknown to Mosquitto dynamic security: nothing to disconnect", {
        meter_id: meterId,
      });
    } else if (error !== undefined) {
      throw this.#refused("disableClient", meterId, error);
    }
  }

  /** `enableClient` for the meter's username; a username dynsec does not know is logged. */
  async reinstate(meterId: string): Promise<void> {
    if (this.#reserved.has(meterId)) return;
    const error = await this.#command("enableClient", meterId);
    if (error === CLIENT_NOT_FOUND) {
      this.#o.logger.debug("meter unknown to Mosquitto dynamic security: nothing to enable", {
        meter_id: meterId,
      });
    } else if (error !== undefined) {
      throw this.#refused("enableClient", meterId, error);
    }
  }

  /** Ends the connection; commands still pending fail. */
  close(): Promise<void> {
    this.#closed = true;
    for (const id of [...this.#pending.keys()]) {
      this.#fail(id, (p) => `Broker admin closed before "${p.command}" was answered`);
    }
    return this.#closing ??= new Promise<void>((resolve) =>
      this.#client.end(true, {}, () => resolve())
    );
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }

  /** Sends one command; resolves with the plugin's `error` field (undefined: success). */
  #command(command: string, meterId: string): Promise<string | undefined> {
    if (this.#closed) {
      return Promise.reject(new BrokerAdminError("Broker admin is closed", meterId));
    }
    if (!this.#ready && this.#down !== null) {
      return Promise.reject(new BrokerAdminError(this.#notConnected(), meterId));
    }
    const correlationData = crypto.randomUUID();
    const payload = JSON.stringify({
      commands: [{ command, username: meterId, correlationData }],
    });
    return new Promise((resolve, reject) => {
      const timer = setTimeout(
        () =>
          this.#fail(
            correlationData,
            (p) =>
              p.sent
                ? `Mosquitto dynamic security did not answer "${command}" for "${meterId}" ` +
                  `within ${this.#timeoutMs} ms`
                : `Broker admin did not connect to "${this.#safeUrl}" as ` +
                  `"${this.#o.username}" within ${this.#timeoutMs} ms`,
          ),
        this.#timeoutMs,
      );
      const pending: Pending = {
        meterId,
        command,
        payload,
        sent: false,
        timer,
        resolve,
        reject,
      };
      this.#pending.set(correlationData, pending);
      if (this.#ready) this.#send(pending);
    });
  }

  #send(pending: Pending): void {
    pending.sent = true;
    this.#client.publish(DYNSEC_TOPIC, pending.payload, { qos: 1 });
  }

  #onConnect(): void {
    this.#client.subscribe(DYNSEC_RESPONSE_TOPIC, { qos: 1 }, (error, granted) => {
      if (this.#closed) return;
      const code = granted?.[0]?.qos ?? 128;
      if (error || code >= 128) {
        this.#down = `subscribing to "${DYNSEC_RESPONSE_TOPIC}" was refused` +
          (error ? ` (${error.message})` : ` (reason ${code}); does the user have the admin role?`);
        this.#o.logger.error("broker admin cannot receive dynamic security answers", {
          url: this.#safeUrl,
          username: this.#o.username,
          reason: this.#down,
        });
        this.#failUnsent();
        return;
      }
      if (this.#down !== null) {
        this.#o.logger.info("broker admin connected again", { url: this.#safeUrl });
      }
      this.#ready = true;
      this.#down = null;
      this.#lastError = null;
      this.#backoff = BACKOFF_MIN_MS;
      this.#client.options.reconnectPeriod = BACKOFF_MIN_MS;
      for (const pending of this.#pending.values()) if (!pending.sent) this.#send(pending);
    });
  }

  #onClose(): void {
    if (this.#closed) return;
    const wasReady = this.#ready;
    const first = this.#down === null;
    this.#ready = false;
    this.#down = this.#lastError ?? "connection closed";
    if (wasReady || first) {
      this.#o.logger.warn("broker admin connection down; revocations are not passed on", {
        url: this.#safeUrl,
        username: this.#o.username,
        reason: this.#down,
      });
    }
    // Answers to commands already sent are lost with the connection: fail them all.
    for (const id of [...this.#pending.keys()]) {
      this.#fail(
        id,
        (p) =>
          p.sent
            ? `Connection to the broker admin was lost before "${p.command}" for "${p.meterId}" ` +
              `was answered`
            : this.#notConnected(),
      );
    }
    this.#backoff = Math.min(BACKOFF_MAX_MS, this.#backoff * 2);
    this.#client.options.reconnectPeriod = this.#backoff;
  }

  #onResponse(payload: Uint8Array): void {
    let responses: unknown;
    try {
      responses = (JSON.parse(new TextDecoder().decode(payload)) as { responses?: unknown })
        .responses;
    } catch {
      return; // not ours to judge
    }
    if (!Array.isArray(responses)) return;
    for (const r of responses as { correlationData?: unknown; error?: unknown }[]) {
      const id = typeof r?.correlationData === "string" ? r.correlationData : undefined;
      const pending = id === undefined ? undefined : this.#pending.get(id);
      if (!pending) continue; // another admin's answer
      this.#pending.delete(id!);
      clearTimeout(pending.timer);
      pending.resolve(typeof r.error === "string" ? r.error : undefined);
    }
  }

  #failUnsent(): void {
    for (const [id, pending] of [...this.#pending]) {
      if (!pending.sent) this.#fail(id, () => this.#notConnected());
    }
  }

  #fail(id: string, message: (p: Pending) => string): void {
    const pending = this.#pending.get(id);
    if (!pending) return;
    this.#pending.delete(id);
    clearTimeout(pending.timer);
    pending.reject(new BrokerAdminError(message(pending), pending.meterId));
  }

  #notConnected(): string {
    const why = this.#down ?? this.#lastError;
    return `Broker admin is not connected to "${this.#safeUrl}" as "${this.#o.username}"` +
      (why ? ` (${why})` : "");
  }

  #refused(command: string, meterId: string, error: string): BrokerAdminError {
    return new BrokerAdminError(
      `Mosquitto dynamic security refused "${command}" for "${meterId}": ${error}`,
      meterId,
    );
  }
}

// ---- EMQX 5: the REST API ------------------------------------------------------------------

/** Options of {@linkcode EmqxHttpAdmin}. */
export interface EmqxHttpAdminOptions {
  /** The API's base, e.g. `http://emqx:18083` (`/api/v5` is added unless it is there). */
  apiUrl: string;
  /** An API key and its secret (EMQX dashboard: System, API Keys), sent as basic auth. */
  apiKey: string;
  apiSecret: string;
  /** How long one HTTP request may take (default 5 s). */
  timeoutMs?: number;
  logger: Logger;
  /** What the ban records as its reason. */
  reason?: string;
}

/** Clients listed per page when looking up a meter's connections. */
const EMQX_PAGE_LIMIT = 100;
/** Pages looked at, at most: a meter has a handful of sessions, not thousands. */
const EMQX_MAX_PAGES = 10;

/**
 * {@linkcode BrokerAdmin} for EMQX 5 over its REST API. `revoke` bans the meter's username
 * (`POST /api/v5/banned`, an existing ban counts as done), then kicks every client with that
 * username (`GET /api/v5/clients?username=…`, `DELETE /api/v5/clients/{clientid}`, a client
 * already gone counts as done). `reinstate` removes the ban
 * (`DELETE /api/v5/banned/username/{meter}`, no ban counts as done).
 */
export class EmqxHttpAdmin implements BrokerAdmin, AsyncDisposable {
  #base: string;
  #auth: string;
  #timeoutMs: number;
  #o: EmqxHttpAdminOptions;
  #inFlight = new Set<AbortController>();

  constructor(options: EmqxHttpAdminOptions) {
    this.#o = options;
    const base = options.apiUrl.replace(/\/+$/, "");
    this.#base = base.endsWith("/api/v5") ? base : `${base}/api/v5`;
    this.#auth = `Basic ${btoa(`${options.apiKey}:${options.apiSecret}`)}`;
    this.#timeoutMs = options.timeoutMs ?? DEFAULT_COMMAND_TIMEOUT_MS;
  }

  async revoke(meterId: string): Promise<void> {
    const ban = await this.#request(meterId, "POST", "/banned", {
      as: "username",
      who: meterId,
      by: "gridtokenx-gateway",
      reason: this.#o.reason ?? "device revoked in the GridTokenX gateway",
    });
    if (!(ban.status === 200 || (ban.status === 400 && ban.code === "ALREADY_EXISTS"))) {
      throw this.#refused("ban", meterId, ban);
    }
    const clientIds: string[] = [];
    for (let page = 1; page <= EMQX_MAX_PAGES; page++) {
      const query = new URLSearchParams({
        username: meterId,
        limit: String(EMQX_PAGE_LIMIT),
        page: String(page),
      });
      const list = await this.#request(meterId, "GET", `/clients?${query}`);
      if (list.status !== 200) throw this.#refused("list clients", meterId, list);
      const body = list.body as { data?: { clientid?: unknown }[]; meta?: { hasnext?: unknown } };
      for (const c of body?.data ?? []) {
        if (typeof c?.clientid === "string") clientIds.push(c.clientid);
      }
      if (body?.meta?.hasnext !== true) break;
    }
    for (const clientId of clientIds) {
      const kick = await this.#request(
        meterId,
        "DELETE",
        `/clients/${encodeURIComponent(clientId)}`,
      );
      if (kick.status !== 204 && kick.status !== 404) throw this.#refused("kick", meterId, kick);
    }
    this.#o.logger.info("meter banned and kicked at EMQX", {
      meter_id: meterId,
      clients_kicked: clientIds.length,
    });
  }

  async reinstate(meterId: string): Promise<void> {
    const res = await this.#request(
      meterId,
      "DELETE",
      `/banned/username/${encodeURIComponent(meterId)}`,
    );
    if (res.status !== 204 && res.status !== 404) throw this.#refused("unban", meterId, res);
  }

  /** Aborts requests still running. */
  close(): Promise<void> {
    for (const controller of this.#inFlight) controller.abort();
    return Promise.resolve();
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }

  async #request(
    meterId: string,
    method: string,
    path: string,
    json?: unknown,
  ): Promise<{ status: number; code?: string; message?: string; body?: unknown }> {
    const controller = new AbortController();
    this.#inFlight.add(controller);
    const timer = setTimeout(() => controller.abort(), this.#timeoutMs);
    try {
      const res = await fetch(`${this.#base}${path}`, {
        method,
        headers: {
          authorization: this.#auth,
          accept: "application/json",
          ...(json === undefined ? {} : { "content-type": "application/json" }),
        },
        body: json === undefined ? undefined : JSON.stringify(json),
        signal: controller.signal,
      });
      const text = await res.text();
      let body: unknown;
      try {
        body = text === "" ? undefined : JSON.parse(text);
      } catch {
        body = undefined;
      }
      const err = body as { code?: unknown; message?: unknown } | undefined;
      return {
        status: res.status,
        code: typeof err?.code === "string" ? err.code : undefined,
        message: typeof err?.message === "string" ? err.message : undefined,
        body,
      };
    } catch (error) {
      const what = controller.signal.aborted
        ? `no answer within ${this.#timeoutMs} ms`
        : (error as Error).message;
      throw new BrokerAdminError(
        `EMQX API ${method} ${this.#base}${path.replace(/\?.*$/, "")} failed: ${what}`,
        meterId,
        { cause: error },
      );
    } finally {
      clearTimeout(timer);
      this.#inFlight.delete(controller);
    }
  }

  #refused(
    what: string,
    meterId: string,
    res: { status: number; code?: string; message?: string },
  ): BrokerAdminError {
    const detail = [res.code, res.message].filter((s) => s !== undefined).join(": ");
    return new BrokerAdminError(
      `EMQX refused to ${what} "${meterId}": HTTP ${res.status}${detail ? ` ${detail}` : ""}`,
      meterId,
    );
  }
}

// ---- from the configuration ----------------------------------------------------------------

/**
 * The broker admin `MQTT_BROKER_ADMIN` asks for, or `undefined` for `none`. It connects in the
 * background; the caller owns it and closes it at shutdown.
 */
export function openBrokerAdmin(
  config: Pick<Config, "brokerAdmin" | "mqtt">,
  logger: Logger,
): BrokerAdmin | undefined {
  const admin = config.brokerAdmin;
  switch (admin.kind) {
    case "none":
      return undefined;
    case "mosquitto-dynsec": {
      logger.info("broker admin: Mosquitto dynamic security", {
        url: redacted(admin.url),
        username: admin.username,
      });
      return new MosquittoDynsecAdmin({
        url: admin.url,
        username: admin.username,
        password: admin.password,
        clientId: admin.clientId,
        reservedUsernames: config.mqtt.username ? [config.mqtt.username] : [],
        logger,
      });
    }
    case "emqx":
      logger.info("broker admin: EMQX REST API", { url: redacted(admin.apiUrl) });
      return new EmqxHttpAdmin({
        apiUrl: admin.apiUrl,
        apiKey: admin.apiKey,
        apiSecret: admin.apiSecret,
        logger,
      });
  }
}

function redacted(url: string): string {
  try {
    const parsed = new URL(url);
    parsed.username = "";
    parsed.password = "";
    return parsed.href;
  } catch {
    return "<malformed URL>";
  }
}
