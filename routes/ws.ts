import { Hono } from "hono";
import { upgradeWebSocket } from "hono/deno";
import { z } from "zod";
import { GatewayError } from "../core/errors.ts";
import { meterIdSchema } from "../core/reading.ts";
import type { Principal } from "../core/user.ts";
import type { Store } from "../db/store.ts";
import type { TokenService } from "../services/tokens.ts";
import type { HubClient, WsHub } from "./ws_hub.ts";

const Selection = {
  meters: z.array(meterIdSchema).max(1000).optional(),
  account: z.boolean().optional(),
  all: z.boolean().optional(),
};
const ClientMessage = z.discriminatedUnion("type", [
  z.strictObject({ type: z.literal("subscribe"), ...Selection }),
  z.strictObject({ type: z.literal("unsubscribe"), ...Selection }),
  z.strictObject({ type: z.literal("ping") }),
]);
type ClientMessage = z.infer<typeof ClientMessage>;

const MAX_MESSAGE_BYTES = 64 * 1024;
/** Messages of one client received but not yet handled; one more closes the socket (1008). */
const MAX_PENDING_MESSAGES = 16;

/** Variables of the WebSocket route: the principal its token names. */
export type WsEnv = { Variables: { principal: Principal } };

/** `GET /ws?token=<jwt>`: live committed readings of subscribed meters. */
export function wsRoutes(deps: { hub: WsHub; tokens: TokenService; store: Store }): Hono<WsEnv> {
  const app = new Hono<WsEnv>();

  async function checkSelection(principal: Principal, msg: ClientMessage & { type: "subscribe" }) {
    if (principal.role === "admin") return;
    if (msg.all) throw new GatewayError("forbidden", "Only admins may subscribe to all meters");
    for (const meter of msg.meters ?? []) {
      const device = await deps.store.getDevice(meter);
      if (!device || device.user_id !== principal.user_id) {
        throw new GatewayError("forbidden", `Meter "${meter}" is not one of yours`);
      }
    }
  }

  app.get(
    "/",
    async function wsAuth(c, next) {
      const bearer = /^Bearer\s+(\S+)$/i.exec(c.req.header("authorization") ?? "")?.[1];
      const token = c.req.query("token") ?? bearer;
      if (!token) throw new GatewayError("unauthorized", "Pass the access token as ?token=<jwt>");
      c.set("principal", await deps.tokens.verify(token));
      if (c.req.header("upgrade")?.toLowerCase() !== "websocket") {
        throw new GatewayError("invalid_payload", "Expected a WebSocket upgrade request");
      }
      await next();
    },
    upgradeWebSocket((c) => {
      const principal = c.var.principal;
      let client: HubClient;
      // One message at a time per client, so replies keep their order; bounded, so a client
      // cannot queue unlimited work (each subscribe may look up to 1000 meters in the store).
      let chain = Promise.resolve();
      let pending = 0;
      let overflowed = false;

      const reply = (value: unknown) => client.send(JSON.stringify(value));
      const fail = (error: unknown) => {
        const gw = error instanceof GatewayError
          ? error
          : new GatewayError("internal", "Internal error");
        reply({ type: "error", code: gw.code, message: gw.message });
      };

      async function handle(text: string): Promise<void> {
        let msg: ClientMessage;
        try {
          const parsed = ClientMessage.safeParse(JSON.parse(text));
          if (!parsed.success) {
            throw new GatewayError(
              "invalid_payload",
              `Invalid message: ${parsed.error.issues[0].message}`,
            );
          }
          msg = parsed.data;
        } catch (error) {
          throw error instanceof GatewayError
            ? error
            : new GatewayError("invalid_payload", "Messages must be JSON objects");
        }
        if (msg.type === "ping") return reply({ type: "pong" });
        if (msg.type === "subscribe") {
          await checkSelection(principal, msg);
          deps.hub.subscribe(client, msg);
        } else {
          deps.hub.unsubscribe(client, msg);
        }
        reply({ type: "subscribed", ...deps.hub.subscriptions(client) });
      }

      return {
        onOpen(_event, ws) {
          const raw = ws.raw as WebSocket;
          client = {
            principal,
            send: (text) => raw.readyState === WebSocket.OPEN && raw.send(text),
            bufferedAmount: () => raw.bufferedAmount,
            close: (code, reason) => raw.close(code, reason),
          };
          deps.hub.attach(client);
        },
        onMessage(event) {
          const data = event.data;
          // Length counts UTF-16 units; a unit is at most 3 UTF-8 bytes, so encode only if close.
          if (
            typeof data !== "string" || data.length > MAX_MESSAGE_BYTES ||
            (data.length > MAX_MESSAGE_BYTES / 3 &&
              new TextEncoder().encode(data).length > MAX_MESSAGE_BYTES)
          ) {
            return fail(
              new GatewayError("invalid_payload", "Send text messages of at most 64 KiB"),
            );
          }
          if (overflowed) return;
          if (pending === MAX_PENDING_MESSAGES) {
            overflowed = true;
            client.close(1008, "Too many pending messages");
            return;
          }
          pending++;
          chain = chain
            .then(() => overflowed ? undefined : handle(data))
            .catch(fail)
            .finally(() => pending--);
        },
        onClose() {
          if (client) deps.hub.detach(client);
        },
      };
    }),
  );
  return app;
}
