// A WebSocket test client that queues every server message, so none is missed between awaits.

/** Upper bound for one awaited message; a guard against hangs, not a synchronisation. */
const WAIT_MS = 20_000;

/** A message from the gateway's WebSocket endpoint. */
// deno-lint-ignore no-explicit-any -- messages of many shapes; tests assert on them
export type ServerMessage = { type: string; [field: string]: any };

/** A connected WebSocket with a queue of received messages. */
export class QueuedWs implements AsyncDisposable {
  readonly ws: WebSocket;
  readonly received: ServerMessage[] = [];
  readonly closed: Promise<CloseEvent>;
  #read = 0;
  #changed = Promise.withResolvers<void>();

  private constructor(ws: WebSocket) {
    this.ws = ws;
    ws.addEventListener("message", (event) => {
      this.received.push(JSON.parse(String(event.data)));
      this.#notify();
    });
    this.closed = new Promise((resolve) =>
      ws.addEventListener("close", (event) => {
        this.#notify();
        resolve(event);
      }, { once: true })
    );
  }

  /** Opens `ws://…/ws?token=…` on `baseUrl` (http://host:port). */
  static async connect(baseUrl: string, token: string): Promise<QueuedWs> {
    const ws = new WebSocket(`${baseUrl.replace(/^http/, "ws")}/ws?token=${token}`);
    const client = new QueuedWs(ws);
    await new Promise<void>((resolve, reject) => {
      ws.addEventListener("open", () => resolve(), { once: true });
      ws.addEventListener("close", (e) => reject(new Error(`closed ${e.code} ${e.reason}`)), {
        once: true,
      });
    });
    return client;
  }

  #notify(): void {
    const changed = this.#changed;
    this.#changed = Promise.withResolvers<void>();
    changed.resolve();
  }

  /** Sends a JSON message. */
  send(message: unknown): void {
    this.ws.send(JSON.stringify(message));
  }

  /** The next unread message matching `predicate` (messages before it are skipped). */
  async next(
    predicate: (m: ServerMessage) => boolean = () => true,
    what = "a message",
  ): Promise<ServerMessage> {
    const deadline = Date.now() + WAIT_MS;
    for (;;) {
      while (this.#read < this.received.length) {
        const message = this.received[this.#read++];
        if (predicate(message)) return message;
      }
      if (this.ws.readyState === WebSocket.CLOSED) throw new Error(`closed while awaiting ${what}`);
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`${what}: not within ${WAIT_MS} ms`);
      let timer: ReturnType<typeof setTimeout> | undefined;
      await Promise.race([
        this.#changed.promise,
        new Promise((resolve) => timer = setTimeout(resolve, left)),
      ]);
      clearTimeout(timer);
    }
  }

  /** Sends a subscribe and returns its `subscribed` reply (or throws on an `error`). */
  async subscribe(selection: Record<string, unknown>): Promise<ServerMessage> {
    this.send({ type: "subscribe", ...selection });
    const reply = await this.next(
      (m) => m.type === "subscribed" || m.type === "error",
      "the subscribed reply",
    );
    if (reply.type === "error") throw new Error(`subscribe refused: ${JSON.stringify(reply)}`);
    return reply;
  }

  /** Every reading event received so far (live and replayed), in arrival order. */
  readings(): ServerMessage[] {
    return this.received.filter((m) => m.type === "meter.reading.accepted");
  }

  /** Waits until `condition` holds over the received messages. */
  async until(condition: (received: ServerMessage[]) => boolean, what: string): Promise<void> {
    const deadline = Date.now() + WAIT_MS * 3;
    while (!condition(this.received)) {
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`${what}: not within ${WAIT_MS * 3} ms`);
      let timer: ReturnType<typeof setTimeout> | undefined;
      await Promise.race([
        this.#changed.promise,
        new Promise((resolve) => timer = setTimeout(resolve, left)),
      ]);
      clearTimeout(timer);
    }
  }

  /** Closes and waits for the close. */
  async close(): Promise<void> {
    if (this.ws.readyState !== WebSocket.CLOSED) this.ws.close();
    await this.closed;
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }
}
