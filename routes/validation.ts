import type { z } from "@hono/zod-openapi";
import { GatewayError } from "../core/errors.ts";

/** The zod-openapi hook: schema failures become `invalid_payload` with the issues listed. */
export function validationHook(
  result: { success: true } | { success: false; error: z.ZodError; target: string },
): void {
  if (result.success) return;
  const issues = result.error.issues.map((i) => ({
    path: i.path.join("."),
    message: i.message,
  }));
  const first = issues[0];
  throw new GatewayError(
    "invalid_payload",
    `Invalid ${result.target}: ${first.path ? `${first.path}: ` : ""}${first.message}`,
    { details: { issues } },
  );
}
