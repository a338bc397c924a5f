// A TCP proxy whose link can be cut: simulates a database outage at the connection level
// (open connections drop, new ones are refused) without stopping the machine's shared server.

/** A running proxy. */
export interface TcpProxy extends AsyncDisposable {
  port: number;
  /** Drops every open connection and refuses new ones until `restore()`. */
  cut(): Promise<void>;
  /** Listens again on the same port. */
  restore(): void;
  close(): Promise<void>;
}

/** Proxies 127.0.0.1:<ephemeral> to `target`. */
export function startTcpProxy(target: { hostname: string; port: number }): TcpProxy {
  let listener: Deno.Listener | null = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (listener.addr as Deno.NetAddr).port;
  const open = new Set<Deno.Conn>();
  const tasks = new Set<Promise<void>>();

  const track = (p: Promise<void>) => {
    tasks.add(p);
    p.finally(() => tasks.delete(p));
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
          open.add(client);
          track((async () => {
            let server: Deno.Conn;
            try {
              server = await Deno.connect(target);
            } catch {
              return closeQuietly(client);
            }
            open.add(server);
            await Promise.all([pump(client, server), pump(server, client)]);
          })());
        }
      } catch { /* listener closed */ }
    })());
  serve(listener);

  const cut = async () => {
    listener?.close();
    listener = null;
    for (const conn of [...open]) closeQuietly(conn);
    await Promise.allSettled([...tasks]);
  };
  const close = () => cut();
  return {
    port,
    cut,
    restore() {
      if (listener) return;
      listener = Deno.listen({ hostname: "127.0.0.1", port });
      serve(listener);
    },
    close,
    [Symbol.asyncDispose]: close,
  };
}
