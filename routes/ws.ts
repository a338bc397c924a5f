import { Hono } from "hono";
import { upgradeWebSocket } from "hono/deno";
import { z } from "zod";
import { GatewayError } from "../core/errors.ts";
import { meterIdSchema } from "../core/reading.ts";
import type { Principal } from "../core/user.ts";
import type { Store } from "../db/store.ts";
import type { MeterOwners } from "./meters.ts";
import type { TokenService } from "../services/tokens.ts";
import { clientAddress } from "./middleware.ts";
import { CLOSE_TOKEN_ENDED, type HubClient, type WsHub } from "../ws/hub.ts";

const Selection = {
  meters: z.array(meterIdSchema).max(1000).optional(),
  account: z.boolean().optional(),
  all: z.boolean().optional(),
};
// A resume position as received in an event's "position" (`<meter_id>@<seq>`).
const position = z.string().max(100);
const ClientMessage = z.discriminatedUnion("type", [
  z.strictObject({
    type: z.literal("subscribe"),
    ...Selection,
    since: z.union([position, z.array(position).max(10_000)]).optional(),
  }),
  z.strictObject({ type: z.literal("unsubscribe"), ...Selection }),
  z.strictObject({ type: z.literal("ping") }),
]);
type ClientMessage = z.infer<typeof ClientMessage>;

/**
 * Largest client message; a bigger one closes the socket with 1009. Deno 2.9.6 has no frame or
 * message size option at the upgrade (`Deno.UpgradeWebSocketOptions` is protocol, idleTimeout,
 * socket, head; denoland/deno#15809 is open), and buffers a message of up to 64 MiB before
 * JavaScript sees it: closing on the first oversized one, and capping connections per account,
 * bounds what one account can make the gateway buffer.
 */
const MAX_MESSAGE_BYTES = 64 * 1024;
/** Messages of one client received but not yet handled; one more closes the socket (1008). */
const MAX_PENDING_MESSAGES = 16;
// setTimeout's longest delay; a token living longer is re-armed when this one fires.
const MAX_TIMER_MS = 2 ** 31 - 1;

/** Variables of the WebSocket route: the principal its token names. */
export type WsEnv = { Variables: { principal: Principal; release: () => void } };

/**
 * `GET /ws?token=<jwt>`: live committed readings of subscribed meters (at most 1 000 meters per
 * connection; `account` and `all` are not counted). Each `subscribed` reply lists the meters
 * of that request now subscribed, with `meter_count` for the whole connection. Close codes: 1008 too
 * many pending messages, 1009 message too big, 1013 send buffer full, 4001 the access token
 * ended (expired, logout, password change, account changed or deleted; the reason says which).
 */
export function wsRoutes(
  deps: { hub: WsHub; tokens: TokenService; store: Store; owners?: MeterOwners },
): Hono<WsEnv> {
  const app = new Hono<WsEnv>();

  async function checkSelection(principal: Principal, msg: ClientMessage & { type: "subscribe" }) {
    if (principal.role === "admin") return;
    if (msg.all) throw new GatewayError("forbidden", "Only admins may subscribe to all meters");
    for (const meter of msg.meters ?? []) {
      const owner = deps.owners
        ? await deps.owners.get(meter)
        : (await deps.store.getDevice(meter))?.user_id;
      if (owner !== principal.user_id) {
        throw new GatewayError("forbidden", `Meter "${meter}" is not one of yours`);
      }
    }
  }

  app.get(
    "/",
    async function wsAuth(c, next) {
      const stats = deps.hub.stats;
      stats.connectAttempts++;
      let release: (() => void) | null;
      try {
        const bearer = /^Bearer\s+(\S+)$/i.exec(c.req.header("authorization") ?? "")?.[1];
        const token = c.req.query("token") ?? bearer;
        if (!token) {
          throw new GatewayError("unauthorized", "Pass the access token as ?token=<jwt>");
        }
        const principal = await deps.tokens.verify(token, clientAddress(c));
        c.set("principal", principal);
        if (c.req.header("upgrade")?.toLowerCase() !== "websocket") {
          throw new GatewayError("invalid_payload", "Expected a WebSocket upgrade request");
        }
        // The slot is taken now, not when the socket opens: parallel upgrades all see it.
        release = deps.hub.reserve(principal.user_id);
        if (!release) {
          throw new GatewayError(
            "rate_limited",
            "Too many WebSocket connections for this account",
            { retryAfter: 10 },
          );
        }
      } catch (error) {
        const reason = error instanceof GatewayError ? error.code : "internal";
        stats.connectFailures.set(reason, (stats.connectFailures.get(reason) ?? 0) + 1);
        throw error;
      }
      c.set("release", release);
      try {
        await next();
      } finally {
        if (c.res.status !== 101) {
          release();
          const failures = deps.hub.stats.connectFailures;
          failures.set("upgrade_failed", (failures.get("upgrade_failed") ?? 0) + 1);
        }
      }
    },
    upgradeWebSocket((c) => {
      const principal = c.var.principal;
      const release = c.var.release;
      const token = c.req.query("token") ??
        /^Bearer\s+(\S+)$/i.exec(c.req.header("authorization") ?? "")?.[1] ?? "";
      const address = clientAddress(c);
      let client: HubClient;
      let expiry: ReturnType<typeof setTimeout> | undefined;
      let closing: ReturnType<typeof setTimeout> | undefined;
      let closed = false;
      // Closing from inside a message handler while more frames are queued makes Deno 2.9.6
      // drop the connection without the close frame (the client sees 1006): close on the next
      // turn instead, once the frames already read have been delivered.
      const closeSoon = (code: number, reason: string) => {
        if (closing !== undefined || closed) return;
        closing = setTimeout(() => client.close(code, reason), 0);
      };
      const armExpiry = () => {
        const left = deps.tokens.expiresIn(principal);
        if (left <= 0) return client.close(CLOSE_TOKEN_ENDED, "Access token expired");
        expiry = setTimeout(armExpiry, Math.min(left, MAX_TIMER_MS));
      };
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
        if (gw.code === "forbidden") {
          deps.tokens.security?.warn("forbidden", address, {
            user_id: principal.user_id,
            role: principal.role,
            path: "/ws",
            reason: gw.message,
          });
        }
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
          // Readings replayed from `since` are sent before the reply, live ones after them.
          await deps.hub.subscribe(client, msg);
        } else {
          deps.hub.unsubscribe(client, msg);
        }
        const view = deps.hub.subscriptions(client, msg.meters);
        if (msg.type === "subscribe" && msg.account) {
          Object.assign(view.positions, deps.hub.accountPositions(client));
        }
        reply({ type: "subscribed", ...view });
      }

      return {
        onOpen(_event, ws) {
          const raw = ws.raw as WebSocket;
          client = {
            principal,
            send: (text) => raw.readyState === WebSocket.OPEN && raw.send(text),
            bufferedAmount: () => raw.bufferedAmount,
            close: (code, reason) => {
              if (raw.readyState === WebSocket.OPEN) raw.close(code, reason);
            },
          };
          deps.hub.attach(client);
          release();
          armExpiry();
          // A change of the account between the check above and attach() had no socket to
          // close: check once more, now that later changes will find this one.
          deps.tokens.verify(token, address).catch((error) => {
            deps.hub.detach(client);
            const message = (error as Error).message;
            client.close(
              CLOSE_TOKEN_ENDED,
              message.includes("expired") ? "Access token expired" : message.slice(0, 120),
            );
          });
        },
        onMessage(event) {
          const data = event.data;
          // Length counts UTF-16 units; a unit is at most 3 UTF-8 bytes, so encode only if close.
          if (
            typeof data !== "string" || data.length > MAX_MESSAGE_BYTES ||
            (data.length > MAX_MESSAGE_BYTES / 3 &&
              new TextEncoder().encode(data).length > MAX_MESSAGE_BYTES)
          ) {
            if (typeof data !== "string") {
              return fail(new GatewayError("invalid_payload", "Send text messages, not binary"));
            }
            overflowed = true;
            return closeSoon(1009, "Message too big: at most 64 KiB");
          }
          if (overflowed) return;
          if (pending === MAX_PENDING_MESSAGES) {
            overflowed = true;
            closeSoon(1008, "Too many pending messages");
            return;
          }
          pending++;
          chain = chain
            .then(() => overflowed ? undefined : handle(data))
            .catch(fail)
            .finally(() => pending--);
        },
        onError() {
          // Failed before it opened: no close may follow.
          if (!client) release();
        },
        onClose() {
          release();
          closed = true;
          clearTimeout(expiry);
          clearTimeout(closing);
          if (client) deps.hub.detach(client);
        },
      };
    }),
  );
  return app;
}
