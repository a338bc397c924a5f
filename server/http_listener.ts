// The gateway's HTTP listener: an accept loop it controls, so a connection flood can neither kill
// the process nor starve the clients it already serves. `Deno.serve` owns its accept loop, and
// on EMFILE that loop rejects and never accepts again (measured on Deno 2.9.6); here accept
// errors pause the loop, connections are capped per listener and per client address, and a
// connection that sends no complete request head in time is closed.
import type { Clock } from "../core/clock.ts";
import type { Logger } from "../core/logger.ts";
import type { Metrics } from "../core/metrics.ts";
import { SecurityLog } from "../core/security_log.ts";

/** What the handler gets with each request: the same shape as `Deno.ServeHandlerInfo`. */
export interface HttpConnInfo {
  remoteAddr: Deno.NetAddr;
}

/** A request handler, e.g. a Hono app's `fetch`. */
export type HttpHandler = (
  request: Request,
  info: HttpConnInfo,
) => Response | Promise<Response>;

/** Options of {@linkcode HttpListener.start}. */
export interface HttpListenerOptions {
  hostname: string;
  port: number;
  handler: HttpHandler;
  /** Open connections at most; one more is closed at once. */
  maxConnections: number;
  /** Open connections per client address at most. */
  maxConnectionsPerAddress: number;
  /** A new connection must send a complete request head within this many ms. */
  headerTimeoutMs: number;
  /** A keep-alive connection with no request in progress is closed after this many ms. */
  idleTimeoutMs: number;
  /**
   * From a request's head to the end of its response: a body that never arrives, or a client
   * that never reads its answer, would otherwise hold the connection for good.
   */
  requestTimeoutMs: number;
  logger: Logger;
  clock: Clock;
  metrics?: Metrics;
  /** First pause after an accept error (EMFILE…); doubles up to `acceptBackoffMaxMs`. */
  acceptBackoffMs?: number;
  acceptBackoffMaxMs?: number;
  /** How long `close()` lets requests in progress finish. */
  closeGraceMs?: number;
}

/** Counters of one listener, also exported as metrics. */
export interface HttpListenerStats {
  open: number;
  accepted: number;
  refused: { max_connections: number; max_per_address: number };
  timedOut: { header: number; idle: number; request: number };
  acceptErrors: number;
}

// `Deno.serveHttp` serves one accepted connection with Deno's HTTP stack, WebSocket upgrades
// included. It is deprecated and gone from the type declarations, but present in Deno 2.9.6.
// Measured alternatives: serving each connection with the runtime-internal
// `serveHttpOnConnection` (12 µs CPU per request, the same as `Deno.serve`) closes upgraded
// WebSockets as soon as the upgrade completes; piping each connection to an internal
// `Deno.serve` costs 85 µs per request and 3 descriptors per connection; this costs 22 µs and 1.
interface RequestEvent {
  readonly request: Request;
  respondWith(response: Response | Promise<Response>): Promise<void>;
}
interface ServedConn {
  nextRequest(): Promise<RequestEvent | null>;
  close(): void;
}
type ServeHttp = (conn: Deno.Conn) => ServedConn;

function serveHttpOf(): ServeHttp {
  const serveHttp = (Deno as unknown as { serveHttp?: ServeHttp }).serveHttp;
  if (typeof serveHttp !== "function") {
    throw new Error(
      `This Deno (${Deno.version.deno}) has no Deno.serveHttp, which the HTTP listener needs; ` +
        "run the Deno version the project pins (2.9.6)",
    );
  }
  return serveHttp;
}

const REFUSAL_BODY = JSON.stringify({
  error: { code: "overloaded", message: "Too many connections; retry shortly" },
});
const REFUSAL = new TextEncoder().encode(
  "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n" +
    `Connection: close\r\nContent-Length: ${REFUSAL_BODY.length}\r\n\r\n${REFUSAL_BODY}`,
);

class Connection {
  readonly address: string;
  readonly remoteAddr: Deno.NetAddr;
  inFlight = 0;
  upgraded = false;
  closed = false;
  timer: ReturnType<typeof setTimeout> | undefined;
  served: ServedConn | undefined;
  readonly conn: Deno.Conn;

  constructor(conn: Deno.Conn) {
    this.conn = conn;
    this.remoteAddr = conn.remoteAddr as Deno.NetAddr;
    this.address = this.remoteAddr.hostname;
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    clearTimeout(this.timer);
    try {
      if (this.served) this.served.close();
      else this.conn.close();
    } catch { /* already closed by the peer */ }
  }
}

/**
 * An HTTP/1.1 server over `Deno.listen` with connection caps, a header timeout, an idle timeout,
 * and an accept loop that survives descriptor exhaustion. Not for TLS.
 */
export class HttpListener implements AsyncDisposable {
  readonly addr: Deno.NetAddr;
  readonly stats: HttpListenerStats = {
    open: 0,
    accepted: 0,
    refused: { max_connections: 0, max_per_address: 0 },
    timedOut: { header: 0, idle: 0, request: 0 },
    acceptErrors: 0,
  };
  #listener: Deno.Listener;
  #options: HttpListenerOptions;
  #serveHttp: ServeHttp;
  #security: SecurityLog;
  #connections = new Set<Connection>();
  #perAddress = new Map<string, number>();
  #closing = false;
  #loop: Promise<void>;
  #backoff: { timer?: ReturnType<typeof setTimeout>; wake?: () => void } = {};
  #closed: Promise<void> | undefined;
  #drained = Promise.withResolvers<void>();

  private constructor(listener: Deno.Listener, options: HttpListenerOptions) {
    this.#listener = listener;
    this.#options = options;
    this.#serveHttp = serveHttpOf();
    this.addr = listener.addr as Deno.NetAddr;
    // Accept errors are not per client: one line per few seconds for the whole listener.
    this.#security = new SecurityLog({
      logger: options.logger,
      clock: options.clock,
      everyMs: 5_000,
    });
    this.#registerMetrics(options.metrics);
    this.#loop = this.#acceptLoop();
  }

  /** Listens on `hostname:port` (0 picks a free port) and starts accepting. */
  static start(options: HttpListenerOptions): HttpListener {
    const listener = Deno.listen({ hostname: options.hostname, port: options.port });
    return new HttpListener(listener, options);
  }

  /** Open connections now. */
  get connections(): number {
    return this.#connections.size;
  }

  #registerMetrics(metrics: Metrics | undefined): void {
    if (!metrics) return;
    const s = this.stats;
    metrics.gauge("gateway_http_connections", "Open HTTP connections", () => s.open);
    metrics.counterOf(
      "gateway_http_connections_accepted_total",
      "HTTP connections accepted",
      () => s.accepted,
    );
    metrics.counterOf(
      "gateway_http_connections_refused_max_total",
      "HTTP connections closed at once because HTTP_MAX_CONNECTIONS were open",
      () => s.refused.max_connections,
    );
    metrics.counterOf(
      "gateway_http_connections_refused_per_address_total",
      "HTTP connections closed at once because their address had " +
        "HTTP_MAX_CONNECTIONS_PER_ADDRESS open",
      () => s.refused.max_per_address,
    );
    metrics.counterOf(
      "gateway_http_header_timeouts_total",
      "HTTP connections closed for sending no request head within HTTP_HEADER_TIMEOUT",
      () => s.timedOut.header,
    );
    metrics.counterOf(
      "gateway_http_idle_timeouts_total",
      "Keep-alive HTTP connections closed after HTTP_IDLE_TIMEOUT without a request",
      () => s.timedOut.idle,
    );
    metrics.counterOf(
      "gateway_http_request_timeouts_total",
      "HTTP connections closed because a request's body or response took over HTTP_REQUEST_TIMEOUT",
      () => s.timedOut.request,
    );
    metrics.counterOf(
      "gateway_http_accept_errors_total",
      "Failed HTTP accepts (e.g. EMFILE: out of descriptors); accepting pauses and retries",
      () => s.acceptErrors,
    );
  }

  async #acceptLoop(): Promise<void> {
    const base = this.#options.acceptBackoffMs ?? 50;
    const max = this.#options.acceptBackoffMaxMs ?? 1_000;
    let pause = base;
    while (!this.#closing) {
      let conn: Deno.Conn;
      try {
        conn = await this.#listener.accept();
      } catch (error) {
        if (this.#closing) break;
        this.stats.acceptErrors++;
        const exhausted = outOfResources(error);
        this.#security.warn("accept_failed", "*", {
          listener: "http",
          error: (error as { code?: string }).code ?? (error as Error).message,
          ...(exhausted ? { retry_in_ms: pause } : {}),
        });
        // A connection reset before it was accepted (ECONNABORTED, ENOTCONN) is that client's
        // problem: accept the next one at once. Only EMFILE/ENFILE/ENOMEM/ENOBUFS mean waiting
        // for resources to free up; pending connections stay in the kernel's backlog meanwhile.
        if (!exhausted) continue;
        await this.#sleep(pause);
        pause = Math.min(max, pause * 2);
        continue;
      }
      pause = base;
      this.#admit(conn);
    }
  }

  #sleep(ms: number): Promise<void> {
    return new Promise((resolve) => {
      this.#backoff.wake = resolve;
      this.#backoff.timer = setTimeout(resolve, ms);
    });
  }

  #admit(conn: Deno.Conn): void {
    const c = new Connection(conn);
    this.stats.accepted++;
    const o = this.#options;
    const fromAddress = this.#perAddress.get(c.address) ?? 0;
    const refused = this.#connections.size >= o.maxConnections
      ? "max_connections"
      : fromAddress >= o.maxConnectionsPerAddress
      ? "max_per_address"
      : undefined;
    if (refused) {
      this.stats.refused[refused]++;
      this.#security.warn("connection_refused", c.address, { listener: "http", reason: refused });
      this.#refuse(c);
      return;
    }
    this.#connections.add(c);
    this.#perAddress.set(c.address, fromAddress + 1);
    this.stats.open = this.#connections.size;
    this.#serve(c).catch((error) => {
      o.logger.error("http connection failed", { error });
    }).finally(() => this.#forget(c));
  }

  // A client that sends its request at once reads why instead of a bare reset; nothing is read
  // from the connection, and it is closed right after (a peer that does not read is not waited
  // for: the 503 fits the socket buffer).
  #refuse(c: Connection): void {
    c.conn.write(REFUSAL).catch(() => {}).finally(() => c.close());
  }

  #forget(c: Connection): void {
    if (!this.#connections.delete(c)) return;
    // An upgraded connection belongs to its WebSocket now: closing it here would cut the socket.
    if (!c.upgraded) c.close();
    clearTimeout(c.timer);
    const n = (this.#perAddress.get(c.address) ?? 1) - 1;
    if (n > 0) this.#perAddress.set(c.address, n);
    else this.#perAddress.delete(c.address);
    this.stats.open = this.#connections.size;
    if (this.#closing && this.#connections.size === 0) this.#drained.resolve();
  }

  #arm(c: Connection, kind: "header" | "idle" | "request"): void {
    clearTimeout(c.timer);
    const o = this.#options;
    const ms = kind === "header"
      ? o.headerTimeoutMs
      : kind === "idle"
      ? o.idleTimeoutMs
      : o.requestTimeoutMs;
    c.timer = setTimeout(() => {
      if (c.upgraded || (kind === "request") !== (c.inFlight > 0)) return;
      this.stats.timedOut[kind]++;
      c.close();
    }, ms);
  }

  async #serve(c: Connection): Promise<void> {
    c.served = this.#serveHttp(c.conn);
    this.#arm(c, "header");
    const info: HttpConnInfo = { remoteAddr: c.remoteAddr };
    while (!c.closed) {
      let event: RequestEvent | null;
      try {
        event = await c.served.nextRequest();
      } catch {
        break; // malformed request head, reset by the peer, or closed by a timeout
      }
      if (event === null) break;
      c.inFlight++;
      this.#arm(c, "request");
      // Requests on one connection arrive one after the other; responding does not block the
      // next read (HTTP/1.1 pipelining is answered in order by the HTTP stack).
      const responded = this.#respond(c, event, info);
      // An upgrade the app accepts (101) is the connection's last request; a refused one (401…)
      // leaves an ordinary connection, still counted and timed.
      if (event.request.headers.get("upgrade")?.toLowerCase() === "websocket") {
        await responded;
        if (c.upgraded) break;
      }
    }
  }

  async #respond(c: Connection, event: RequestEvent, info: HttpConnInfo): Promise<void> {
    try {
      let response: Response | Promise<Response>;
      try {
        response = this.#options.handler(event.request, info);
      } catch (error) {
        response = this.#internalError(error);
      }
      const res = await Promise.resolve(response).catch((error) => this.#internalError(error));
      if (res.status === 101) c.upgraded = true;
      else uncompressed(res);
      await event.respondWith(res);
    } catch {
      // The client went away before the response was written.
    } finally {
      c.inFlight--;
      if (c.inFlight === 0 && !c.upgraded && !c.closed) {
        if (this.#closing) c.close();
        else this.#arm(c, "idle");
      }
    }
  }

  #internalError(error: unknown): Response {
    this.#options.logger.error("http handler failed", { error });
    return Response.json({ error: { code: "internal", message: "Internal error" } }, {
      status: 500,
    });
  }

  /** Stops accepting, closes idle connections, lets requests in progress finish (bounded). */
  close(): Promise<void> {
    return this.#closed ??= this.#close();
  }

  async #close(): Promise<void> {
    this.#closing = true;
    try {
      this.#listener.close();
    } catch { /* already closed */ }
    clearTimeout(this.#backoff.timer);
    this.#backoff.wake?.();
    await this.#loop;
    for (const c of this.#connections) if (c.inFlight === 0 || c.upgraded) c.close();
    if (this.#connections.size > 0) {
      let timer: ReturnType<typeof setTimeout> | undefined;
      await Promise.race([
        this.#drained.promise,
        new Promise<void>((resolve) => {
          timer = setTimeout(resolve, this.#options.closeGraceMs ?? 5_000);
        }),
      ]);
      clearTimeout(timer);
      for (const c of this.#connections) c.close();
    }
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }
}

/**
 * Turns off `Deno.serveHttp`'s automatic compression: it brotli-compresses every compressible
 * answer the client accepts, measured at ~500 µs of CPU for a 400-byte JSON reading, more than
 * the whole rest of a request (`Deno.serve`, used before, sends them as they are).
 * `no-transform` is the header that makes it skip; it tells proxies the same.
 */
function uncompressed(res: Response): void {
  if (res.headers.has("content-encoding")) return;
  const cacheControl = res.headers.get("cache-control");
  if (cacheControl?.includes("no-transform")) return;
  try {
    res.headers.set(
      "cache-control",
      cacheControl ? `${cacheControl}, no-transform` : "no-transform",
    );
  } catch {
    // Immutable headers (a Response from fetch): sent as they are.
  }
}

const RESOURCE_ERRORS = new Set(["EMFILE", "ENFILE", "ENOMEM", "ENOBUFS"]);

/** Whether an accept failed for want of descriptors or memory (os errors 12, 23, 24, 105). */
function outOfResources(error: unknown): boolean {
  const code = (error as { code?: string }).code;
  if (code !== undefined && RESOURCE_ERRORS.has(code)) return true;
  return /Too many open files|os error (12|23|24|105)\b/.test(String((error as Error)?.message));
}
