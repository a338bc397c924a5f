import { connect, type Server, type Socket } from "node:net";

/** Why a connection was refused or closed by the guard. */
export type GuardRefusal = "listener_full" | "address_full" | "connect_timeout";

/** Options of {@linkcode ListenerGuard}. */
export interface ListenerGuardOptions {
  /** Creates the server (again after a stall); connections reach it only through the guard. */
  create: () => Server;
  /** Hands an admitted raw socket on (plain TCP); TLS servers handle theirs themselves. */
  accept?: (socket: Socket) => void;
  host: string;
  port: number;
  /** Open connections on this listener, authenticated or not. */
  maxConnections: number;
  /** Connections from one address that have not authenticated yet. */
  maxPendingPerAddress: number;
  /** Time from accept until the connection must have authenticated. */
  connectTimeoutMs: number;
  /** Period of the accept probe; 0 turns it off. Default 2 s. */
  probeMs?: number;
  onRefused: (reason: GuardRefusal, address: string) => void;
  /** The listener stopped accepting (descriptors ran out) and was started again, or failed to. */
  onStall: (event: { restarted: boolean; error?: string }) => void;
  /** A probe connection failed, e.g. with EMFILE. */
  onProbeError: (code: string) => void;
}

interface Probe {
  socket: Socket;
  /** The probe's local port once connected; 0 before. */
  port: number;
  seen: boolean;
  timer?: ReturnType<typeof setTimeout>;
}

interface Entry {
  address: string;
  key: string;
  pending: boolean;
  timer?: ReturnType<typeof setTimeout>;
}

const LOOPBACK = new Set(["127.0.0.1", "::1", "::ffff:127.0.0.1"]);

/**
 * Admission control for one broker listener: caps its connections and each address's
 * unauthenticated ones, closes connections that do not authenticate in time, and restarts the
 * listener when accepting stalls. Deno 2.9.6's node:net server stops accepting for good after
 * accept() fails with EMFILE, without an `error` event (measured under `ulimit -n 256`; existing
 * connections keep working), so a periodic loopback probe checks that accepting still works and
 * listens again once descriptors are free.
 */
export class ListenerGuard {
  #o: ListenerGuardOptions;
  #server: Server | undefined;
  #retired: Server[] = [];
  #port = 0;
  #entries = new Map<Socket, Entry>();
  #byKey = new Map<string, Socket>();
  #pending = new Map<string, number>();
  #probeTimer: ReturnType<typeof setInterval> | undefined;
  #probe: Probe | undefined;
  #unidentified = new Map<number, Socket>();
  #closed = false;

  constructor(options: ListenerGuardOptions) {
    this.#o = options;
  }

  /** Starts listening; resolves with the bound port. */
  async listen(): Promise<number> {
    this.#port = await this.#start(this.#o.port);
    const every = this.#o.probeMs ?? 2_000;
    if (every > 0) this.#probeTimer = setInterval(() => this.#runProbe(every), every);
    return this.#port;
  }

  /** Open connections. */
  get size(): number {
    return this.#entries.size;
  }

  /** Marks the connection (raw or TLS socket) as authenticated: it no longer times out. */
  authenticated(conn: { remoteAddress?: string; remotePort?: number }): void {
    const socket = this.#byKey.get(keyOf(conn));
    const entry = socket && this.#entries.get(socket);
    if (!entry?.pending) return;
    entry.pending = false;
    clearTimeout(entry.timer);
    this.#release(entry.address);
  }

  #start(port: number): Promise<number> {
    const server = this.#o.create();
    server.prependListener("connection", (socket: Socket) => this.#admit(socket));
    return new Promise((resolve, reject) => {
      server.once("error", reject);
      server.listen(port, this.#o.host, () => {
        server.off("error", reject);
        server.on("error", () => {}); // accept errors surface through the probe
        this.#server = server;
        const address = server.address();
        resolve(typeof address === "object" && address ? address.port : port);
      });
    });
  }

  #admit(socket: Socket): void {
    const address = socket.remoteAddress ?? "unknown";
    if (LOOPBACK.has(address) && this.#probe && this.#isProbe(socket)) return;
    socket.on("error", () => {}); // the connection's owner reports errors; never crash here
    if (this.#closed) {
      socket.destroy();
      return;
    }
    if (this.#entries.size >= this.#o.maxConnections) return this.#refuse(socket, "listener_full");
    const pending = this.#pending.get(address) ?? 0;
    if (pending >= this.#o.maxPendingPerAddress) return this.#refuse(socket, "address_full");
    this.#pending.set(address, pending + 1);
    const entry: Entry = { address, key: keyOf(socket), pending: true };
    entry.timer = setTimeout(() => {
      if (!entry.pending) return;
      this.#o.onRefused("connect_timeout", address);
      socket.destroy();
    }, this.#o.connectTimeoutMs);
    this.#entries.set(socket, entry);
    this.#byKey.set(entry.key, socket);
    socket.once("close", () => {
      this.#entries.delete(socket);
      if (this.#byKey.get(entry.key) === socket) this.#byKey.delete(entry.key);
      clearTimeout(entry.timer);
      if (entry.pending) this.#release(address);
    });
    this.#o.accept?.(socket);
  }

  #refuse(socket: Socket, reason: GuardRefusal): void {
    this.#o.onRefused(reason, socket.remoteAddress ?? "unknown");
    socket.destroy();
  }

  #release(address: string): void {
    const n = (this.#pending.get(address) ?? 1) - 1;
    if (n <= 0) this.#pending.delete(address);
    else this.#pending.set(address, n);
  }

  // The server may see the probe before the probe's own `connect` event tells us its port.
  #isProbe(socket: Socket): boolean {
    const probe = this.#probe!;
    if (probe.port === 0) {
      if (socket.remotePort !== undefined) this.#unidentified.set(socket.remotePort, socket);
      return false;
    }
    if (socket.remotePort !== probe.port) return false;
    probe.seen = true;
    socket.destroy();
    return true;
  }

  #runProbe(timeoutMs: number): void {
    if (this.#probe || this.#closed) return;
    const host = this.#o.host === "0.0.0.0"
      ? "127.0.0.1"
      : this.#o.host === "::"
      ? "::1"
      : this.#o.host;
    const socket = connect({ host, port: this.#port });
    const probe: Probe = { socket, port: 0, seen: false };
    this.#probe = probe;
    const end = () => {
      clearTimeout(probe.timer);
      socket.destroy();
      this.#unidentified.clear();
      if (this.#probe === probe) this.#probe = undefined;
    };
    socket.once("error", (error: NodeJS.ErrnoException) => {
      end();
      if (this.#closed) return;
      if (error.code === "ECONNREFUSED" && !this.#server) this.#restart();
      else this.#o.onProbeError(error.code ?? "unknown");
    });
    socket.once("connect", () => {
      probe.port = socket.localPort ?? -1;
      const early = this.#unidentified.get(probe.port);
      if (early) {
        early.destroy();
        probe.seen = true;
      }
      if (probe.seen) return end();
      probe.timer = setTimeout(() => {
        const seen = probe.seen;
        end();
        if (!seen && !this.#closed) this.#restart();
      }, timeoutMs);
    });
  }

  // Existing connections stay; only the listening socket is replaced.
  #restart(): void {
    const old = this.#server;
    this.#server = undefined;
    if (old) {
      old.close();
      this.#retired.push(old);
    }
    this.#start(this.#port).then(
      () => this.#o.onStall({ restarted: true }),
      (error: NodeJS.ErrnoException) =>
        this.#o.onStall({ restarted: false, error: error.code ?? error.message }),
    );
  }

  /** Stops listening and probing, and closes every connection. */
  async close(): Promise<void> {
    this.#closed = true;
    clearInterval(this.#probeTimer);
    if (this.#probe) {
      clearTimeout(this.#probe.timer);
      this.#probe.socket.destroy();
      this.#probe = undefined;
    }
    const server = this.#server;
    this.#server = undefined;
    const closed = server
      ? new Promise<void>((resolve) => server.close(() => resolve()))
      : Promise.resolve();
    for (const socket of this.#entries.keys()) socket.destroy();
    for (const entry of this.#entries.values()) clearTimeout(entry.timer);
    for (const old of this.#retired) old.close();
    this.#retired = [];
    await closed;
  }
}

function keyOf(conn: { remoteAddress?: string; remotePort?: number }): string {
  return `${conn.remoteAddress}|${conn.remotePort}`;
}
