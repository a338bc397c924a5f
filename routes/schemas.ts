import { z } from "@hono/zod-openapi";
import { METER_ID_PATTERN } from "../core/reading.ts";
import type { User } from "../core/user.ts";

/** The error body of every failure. */
export const ErrorSchema = z.object({
  error: z.object({
    code: z.string().openapi({ example: "kwh_out_of_range" }),
    message: z.string(),
    details: z.record(z.string(), z.unknown()).optional(),
  }),
}).openapi("Error");

export const ReadingSchema = z.object({
  id: z.string().uuid(),
  meter_id: z.string(),
  user_id: z.string(),
  wallet_address: z.string().nullable(),
  kwh_amount: z.number(),
  reading_timestamp: z.string(),
  key_id: z.string(),
  device_signature: z.string(),
  source: z.enum(["mqtt", "http", "batch"]),
  submitted_at: z.string(),
  minted: z.boolean(),
}).openapi("Reading");

export const DeviceKeySchema = z.object({
  key_id: z.string(),
  algorithm: z.enum(["hmac-sha256", "ed25519"]),
  created_at: z.string(),
  retired_at: z.string().nullable(),
  state: z.enum(["valid", "due", "expired"]),
  public_key: z.string().optional(),
});

export const DeviceSchema = z.object({
  meter_id: z.string(),
  user_id: z.string(),
  status: z.enum(["active", "revoked"]),
  created_at: z.string(),
  revoked_at: z.string().nullable(),
  rotation_due: z.boolean(),
  keys: z.array(DeviceKeySchema),
}).openapi("Device");

export const IssuedKeySchema = z.object({
  meter_id: z.string(),
  key_id: z.string(),
  algorithm: z.enum(["hmac-sha256", "ed25519"]),
  secret_hex: z.string().optional().openapi({
    description: "HMAC secret, shown only in this response",
  }),
}).openapi("IssuedKey");

export const UserSchema = z.object({
  id: z.string(),
  email: z.string(),
  role: z.enum(["admin", "operator", "user"]),
  wallet_address: z.string().nullable(),
  created_at: z.string(),
  disabled: z.boolean(),
}).openapi("User");

/** A user as the API shows it: no hash, no token generation. */
export function userView(user: User): z.infer<typeof UserSchema> {
  return {
    id: user.id,
    email: user.email,
    role: user.role,
    wallet_address: user.wallet_address,
    created_at: new Date(user.created_at).toISOString(),
    disabled: user.disabled,
  };
}

/**
 * A user id as input: ids are UUIDs, so anything outside this set (a NUL byte, say, which
 * PostgreSQL text refuses) is a 400 here, not a 500 from the store.
 */
export const userIdSchema = z.string().regex(
  /^[A-Za-z0-9._:-]{1,64}$/,
  "must be a user id (1-64 of A-Z a-z 0-9 . _ : -)",
);

/** Free text kept in the store (reasons, notes): printable, no control characters. */
export const noteSchema = z.string().max(500).regex(
  // deno-lint-ignore no-control-regex -- the point is to refuse them
  /^[^\u0000-\u0008\u000B\u000C\u000E-\u001F\u007F]*$/,
  "must not contain control characters",
);

export const UserIdParam = z.object({
  id: userIdSchema.openapi({ param: { name: "id", in: "path" } }),
});

/** The body of responses that carry an access token. */
export const TokenSchema = z.object({
  access_token: z.string(),
  token_type: z.literal("Bearer"),
  expires_in: z.number().int(),
}).openapi("AccessToken");

export const MeterParam = z.object({
  // Built here, not taken from core/: zod-openapi only extends schemas created after it loads.
  meter_id: z.string().regex(METER_ID_PATTERN, "meter_id is malformed").openapi({
    param: { name: "meter_id", in: "path" },
  }),
});

/** Responses every authenticated JSON route may give. */
export const commonErrors = {
  400: {
    description: "Malformed request",
    content: { "application/json": { schema: ErrorSchema } },
  },
  401: {
    description: "Not authenticated",
    content: { "application/json": { schema: ErrorSchema } },
  },
  403: { description: "Not allowed", content: { "application/json": { schema: ErrorSchema } } },
} as const;

/** A JSON request body. */
export function jsonBody<T extends z.ZodType>(schema: T) {
  return { required: true, content: { "application/json": { schema } } } as const;
}

/** A JSON response. */
export function jsonResponse<T extends z.ZodType>(schema: T, description: string) {
  return { description, content: { "application/json": { schema } } } as const;
}
