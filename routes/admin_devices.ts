import { createRoute, OpenAPIHono, z } from "@hono/zod-openapi";
import type { Context, Next } from "hono";
import type { Clock } from "../core/clock.ts";
import { GatewayError } from "../core/errors.ts";
import type { Logger } from "../core/logger.ts";
import { meterIdSchema } from "../core/reading.ts";
import type { DeviceService } from "../services/devices.ts";
import type { TokenService } from "../services/tokens.ts";
import { type AuthEnv, bearerAuth, perAddressLimit, requireRole } from "./middleware.ts";
import {
  commonErrors,
  DeviceSchema,
  ErrorSchema,
  IssuedKeySchema,
  jsonBody,
  jsonResponse,
  MeterParam,
  noteSchema,
  userIdSchema,
} from "./schemas.ts";
import { validationHook } from "./validation.ts";

const RegisterSchema = z.strictObject({
  meter_id: meterIdSchema,
  user_id: userIdSchema,
  algorithm: z.enum(["hmac-sha256", "ed25519"]).default("hmac-sha256"),
  public_key: z.string().min(1).max(512).optional(),
}).openapi("DeviceRegistration");

const ImportSchema = z.strictObject({
  devices: z.array(RegisterSchema).min(1).max(10_000),
}).openapi("DeviceImport");

const ImportResultSchema = z.object({
  results: z.array(z.object({
    meter_id: z.string(),
    key_id: z.string().optional(),
    algorithm: z.string().optional(),
    secret_hex: z.string().optional(),
    error: z.object({ code: z.string(), message: z.string() }).optional(),
  })),
}).openapi("DeviceImportResult");

const ListQuery = z.object({
  user_id: userIdSchema.optional(),
  limit: z.coerce.number().int().min(1).max(1000).default(100),
  cursor: z.string().max(512).optional(),
});

const RotateSchema = z.strictObject({
  public_key: z.string().min(1).max(512).optional(),
  grace_seconds: z.number().int("grace_seconds must be a whole number of seconds").min(0)
    .optional().openapi({
      description: "How long the previous key stays valid; default and maximum " +
        "DEVICE_KEY_ROTATION_GRACE. 0 ends it at once (a leaked key).",
    }),
}).openapi("DeviceRotation");
const RevokeSchema = z.strictObject({ reason: noteSchema.optional() });

const security = [{ bearer: [] }];
const tags = ["devices"];

const register = createRoute({
  method: "post",
  path: "/register",
  tags,
  security,
  summary: "Register a meter to a user and issue its first key (rate-limited per address)",
  request: { body: jsonBody(RegisterSchema) },
  responses: {
    201: jsonResponse(IssuedKeySchema, "Registered; an HMAC secret is shown only here"),
    409: jsonResponse(ErrorSchema, "Meter already registered"),
    429: jsonResponse(ErrorSchema, "Too many registrations from this address"),
    ...commonErrors,
  },
});

const bulk = createRoute({
  method: "post",
  path: "/import",
  tags,
  security,
  summary: "Register many meters in one request (fleet provisioning)",
  request: { body: jsonBody(ImportSchema) },
  responses: { 200: jsonResponse(ImportResultSchema, "One result per device"), ...commonErrors },
});

const list = createRoute({
  method: "get",
  path: "/",
  tags,
  security,
  summary: "List devices",
  request: { query: ListQuery },
  responses: {
    200: jsonResponse(
      z.object({ items: z.array(DeviceSchema), next_cursor: z.string().nullable() }),
      "Devices",
    ),
    ...commonErrors,
  },
});

const rotate = createRoute({
  method: "post",
  path: "/{meter_id}/rotate",
  tags,
  security,
  summary: "Issue a new key; the previous one stays valid for the grace period (or " +
    "grace_seconds, 0 for none) and older ones are dropped",
  // The body is optional, so it is parsed in the handler (an empty body means `{}`).
  request: { params: MeterParam },
  responses: { 200: jsonResponse(IssuedKeySchema, "New key"), ...commonErrors },
});

const revoke = createRoute({
  method: "post",
  path: "/{meter_id}/revoke",
  tags,
  security,
  summary: "Revoke a meter on every instance",
  request: { params: MeterParam },
  responses: { 200: jsonResponse(DeviceSchema, "Revoked device"), ...commonErrors },
});

/** What {@linkcode adminDeviceRoutes} needs. */
export interface AdminDeviceDeps {
  /** Does the provisioning. */
  devices: DeviceService;
  /** Verifies the bearer tokens. */
  tokens: TokenService;
  /** Drives the per-address rate limit. */
  clock: Clock;
  /** Register and import requests, together, allowed per minute from one client address. */
  registerPerMinute: number;
  /** Receives unexpected failures of single devices of an import. */
  logger: Logger;
}

/** Responses that carry device secrets must not be kept by any cache or proxy. */
async function noStore(c: Context, next: Next): Promise<void> {
  await next();
  c.header("Cache-Control", "no-store");
}

/** `/api/admin/devices`: provisioning, rotation, revocation (admin and operator). */
export function adminDeviceRoutes(deps: AdminDeviceDeps): OpenAPIHono<AuthEnv> {
  const app = new OpenAPIHono<AuthEnv>({ defaultHook: validationHook });
  app.use(bearerAuth(deps.tokens), requireRole("admin", "operator"));
  const limit = perAddressLimit({
    perMinute: deps.registerPerMinute,
    clock: deps.clock,
    what: "device registration",
  });
  app.use("/register", noStore, limit);
  app.use("/import", noStore, limit);
  app.use("/:meter_id/rotate", noStore);
  return app
    .openapi(register, async (c) => {
      const issued = await deps.devices.register(c.req.valid("json"), c.var.principal.user_id);
      return c.json(issued, 201);
    })
    .openapi(bulk, async (c) => {
      const results = [];
      for (const device of c.req.valid("json").devices) {
        // Every failure stays with its device: throwing would lose the secrets of the devices
        // registered earlier in this import, which are shown only in this response.
        try {
          results.push(await deps.devices.register(device, c.var.principal.user_id));
        } catch (error) {
          let failure: GatewayError;
          if (error instanceof GatewayError) {
            failure = error;
          } else {
            deps.logger.error("device import: registration failed", {
              error,
              meter_id: device.meter_id,
            });
            failure = new GatewayError("internal", "Internal error");
          }
          results.push({
            meter_id: device.meter_id,
            error: { code: failure.code, message: failure.message },
          });
        }
      }
      return c.json({ results }, 200);
    })
    .openapi(list, async (c) => c.json(await deps.devices.list(c.req.valid("query")), 200))
    .openapi(rotate, async (c) => {
      const body = optionalJson(await c.req.text(), RotateSchema);
      const issued = await deps.devices.rotate(
        c.req.valid("param").meter_id,
        body,
        c.var.principal.user_id,
      );
      return c.json(issued, 200);
    })
    .openapi(revoke, async (c) => {
      const body = optionalJson(await c.req.text(), RevokeSchema);
      const view = await deps.devices.revoke(
        c.req.valid("param").meter_id,
        c.var.principal.user_id,
        body.reason,
      );
      return c.json(view, 200);
    });
}

/** Bodies that may be omitted entirely (rotate/revoke): empty means `{}`. */
function optionalJson<T extends z.ZodType>(text: string, schema: T): z.infer<T> {
  if (text.trim() === "") return schema.parse({});
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch {
    throw new GatewayError("invalid_payload", "Request body is not valid JSON");
  }
  const parsed = schema.safeParse(value);
  if (!parsed.success) {
    throw new GatewayError("invalid_payload", `Invalid json: ${parsed.error.issues[0].message}`);
  }
  return parsed.data;
}
