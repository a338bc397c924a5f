// A TCP proxy whose link can be cut: simulates a database outage at the connection level
// (open connections drop, new ones are refused or reset) without stopping the machine's shared
// server.

/** Options of {@linkcode TcpProxy.cut}. */
export interface CutOptions {
  /**
   * How new connections fail until `restore()`: `"refuse"` (default) stops listening, so they
   * are refused; `"reset"` keeps accepting them and closes each at once, like a server that
   * is restarting.
   */
  mode?: "refuse" | "reset";
}

/** A running proxy. */
export interface TcpProxy extends AsyncDisposable {
  port: number;
  /** Drops every open connection; new ones fail (see {@linkcode CutOptions}) until `restore()`. */
  cut(options?: CutOptions): Promise<void>;
  /** Forwards new connections again (listening again on the same port if it had stopped). */
  restore(): void;
  close(): Promise<void>;
}

/** Proxies 127.0.0.1:<ephemeral> to `target`. */
export function startTcpProxy(target: { hostname: string; port: number }): TcpProxy {
  let listener: Deno.Listener | null = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (listener.addr as Deno.NetAddr).port;
  const open = new Set<Deno.Conn>();
  const tasks = new Set<Promise<void>>();
  let resetting = false;

  const track = (p: Promise<void>) => {
    tasks.add(p);
    p.finally(() => tasks.delete(p));
    return p;
  };
  const closeQuietly = (conn: Deno.Conn) => {
    open.delete(conn);
    try {
      conn.close();
    } catch { /* already closed */ }
  };
  const pump = async (from: Deno.Conn, to: Deno.Conn) => {
    try {
      await from.readable.pipeTo(to.writable);
    } catch { /* the link was cut or a side closed */ }
    closeQuietly(from);
    closeQuietly(to);
  };
  const serve = (l: Deno.Listener) =>
    track((async () => {
      try {
        for await (const client of l) {
          if (resetting) {
            client.close();
            continue;
          }
          open.add(client);
          track((async () => {
            let server: Deno.Conn;
            try {
              server = await Deno.connect(target);
            } catch {
              return closeQuietly(client);
            }
            if (resetting) {
              // Cut while this link was being made.
              server.close();
              return closeQuietly(client);
            }
            open.add(server);
            await Promise.all([pump(client, server), pump(server, client)]);
          })());
        }
      } catch { /* listener closed */ }
    })());
  let serving = serve(listener);

  const cut = async (options: CutOptions = {}) => {
    if (options.mode === "reset") {
      resetting = true;
    } else {
      listener?.close();
      listener = null;
    }
    for (const conn of [...open]) closeQuietly(conn);
    // The listener's own task runs until it is closed.
    await Promise.allSettled([...tasks].filter((t) => t !== serving));
  };
  const close = async () => {
    resetting = false;
    listener?.close();
    listener = null;
    for (const conn of [...open]) closeQuietly(conn);
    await Promise.allSettled([...tasks]);
  };
  return {
    port,
    cut,
    restore() {
      resetting = false;
      if (listener) return;
      listener = Deno.listen({ hostname: "127.0.0.1", port });
      serving = serve(listener);
    },
    close,
    [Symbol.asyncDispose]: close,
  };
}
