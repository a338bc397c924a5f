import type { ReadingCounters } from "../core/reading_counters.ts";
import { createRoute, OpenAPIHono, z } from "@hono/zod-openapi";
import type { ActorRegistry } from "../actors/registry.ts";
import { GatewayError } from "../core/errors.ts";
import type { Outcome } from "../core/outcome.ts";
import {
  isRealDateTime,
  meterIdSchema,
  type Reading,
  readingSubmissionSchema,
  RFC3339,
  toReading,
} from "../core/reading.ts";
import { mayUseMeter, notYourMeter } from "../core/ownership.ts";
import type { Principal } from "../core/user.ts";
import type { Store } from "../db/store.ts";
import type { StoreReads } from "../cache/read_cache.ts";
import type { TokenService } from "../services/tokens.ts";
import { type AuthEnv, bearerAuth, clientAddress } from "./middleware.ts";
import {
  commonErrors,
  ErrorSchema,
  jsonBody,
  jsonResponse,
  MeterParam,
  ReadingSchema,
  userIdSchema,
} from "./schemas.ts";
import type { Clock } from "../core/clock.ts";
import { validationHook } from "./validation.ts";

const SubmissionSchema = readingSubmissionSchema.meta({
  id: "ReadingSubmission",
  example: {
    meter_id: "meter-1",
    kwh_amount: "12.5",
    reading_timestamp: "2026-11-29T10:15:00Z",
    device_signature: "9396d1b1e4fbc88d8cdcba4b9fcf3ff17d6e5f33bc5a003d893823c5ccfc6ceb",
  },
});

// Query bounds between 1970 and 9999 (UTC): readings are never outside, and every store can
// represent them (PostgreSQL refuses year 0 and years past 9999 in ISO form).
const MIN_QUERY_MS = 0;
const MAX_QUERY_MS = Date.UTC(10000, 0, 1);
const isoDate = z.string().max(40).regex(RFC3339, "must be an RFC 3339 date-time").refine(
  isRealDateTime,
  "names a day or time that does not exist",
).refine((text) => {
  const ms = Date.parse(text);
  return ms >= MIN_QUERY_MS && ms < MAX_QUERY_MS;
}, "must lie between 1970 and 9999 (UTC)");

const ListQuery = z.object({
  meter_id: meterIdSchema.optional(),
  from: isoDate.optional().openapi({ description: "Inclusive lower bound (RFC 3339)" }),
  to: isoDate.optional().openapi({ description: "Exclusive upper bound (RFC 3339)" }),
  minted: z.enum(["true", "false"]).optional(),
  order: z.enum(["asc", "desc"]).default("desc"),
  limit: z.coerce.number().int().min(1).max(1000).default(100),
  cursor: z.string().max(1024).optional(),
});

const StatsSchema = z.object({
  meter_count: z.number().int(),
  reading_count: z.number().int(),
  total_kwh: z.number(),
  minted_count: z.number().int(),
  first_reading_at: z.string().nullable(),
  last_reading_at: z.string().nullable(),
}).openapi("ReadingStats");

const HourlySchema = z.object({
  meter_id: z.string(),
  start: z.string(),
  end: z.string(),
  hours: z.array(z.object({
    hour: z.string(),
    count: z.number().int(),
    sum_kwh: z.number(),
    avg_kwh: z.number(),
    min_kwh: z.number(),
    max_kwh: z.number(),
  })),
}).openapi("HourlyStats");

const MAX_HOURLY_RANGE_MS = 366 * 86_400_000;

const security = [{ bearer: [] }];
const tags = ["meters"];

const submit = createRoute({
  method: "post",
  path: "/submit-reading",
  tags,
  security,
  summary: "Submit a signed reading; 201 only after it is stored",
  request: { body: jsonBody(SubmissionSchema) },
  responses: {
    201: jsonResponse(ReadingSchema, "Stored"),
    409: jsonResponse(ErrorSchema, "Duplicate; details.id is the stored reading's id"),
    422: jsonResponse(ErrorSchema, "Rule violation"),
    429: jsonResponse(ErrorSchema, "Meter rate limit; see Retry-After"),
    503: jsonResponse(ErrorSchema, "Writer saturated; see Retry-After"),
    ...commonErrors,
  },
});

const list = createRoute({
  method: "get",
  path: "/readings",
  tags,
  security,
  summary: "List readings (own meters; admins all)",
  request: { query: ListQuery },
  responses: {
    200: jsonResponse(
      z.object({ items: z.array(ReadingSchema), next_cursor: z.string().nullable() }),
      "A page of readings",
    ),
    ...commonErrors,
  },
});

const stats = createRoute({
  method: "get",
  path: "/stats",
  tags,
  security,
  summary: "Totals of the caller's readings (admins: all, or one user's)",
  request: { query: z.object({ user_id: userIdSchema.optional() }) },
  responses: { 200: jsonResponse(StatsSchema, "Totals"), ...commonErrors },
});

const hourly = createRoute({
  method: "get",
  path: "/{meter_id}/stats/hourly",
  tags,
  security,
  summary: "Per-hour count, sum, avg, min and max of one meter's readings (owner or admin)",
  request: {
    params: MeterParam,
    query: z.object({
      start: isoDate.optional().openapi({ description: "Inclusive (default: end - 24 h)" }),
      end: isoDate.optional().openapi({ description: "Exclusive (default: now)" }),
    }),
  },
  responses: { 200: jsonResponse(HourlySchema, "Hourly statistics"), ...commonErrors },
});

/** Turns a non-accepted outcome into the error the HTTP layer maps. */
export function outcomeError(outcome: Exclude<Outcome, { status: "accepted" }>): GatewayError {
  if (outcome.status === "duplicate") {
    return new GatewayError("duplicate", outcome.message, { details: { id: outcome.id } });
  }
  return new GatewayError(outcome.code, outcome.message, { retryAfter: outcome.retryAfter });
}

/** Dependencies of {@linkcode meterRoutes}. */
export interface MeterRoutesDeps {
  registry: ActorRegistry;
  store: Store;
  tokens: TokenService;
  clock: Clock;
  /** Read-through cache of listings and stats (cache/read_cache.ts); absent: the store. */
  cache?: StoreReads;
  /** Each meter's owner, cached and invalidated by device events; absent: the store. */
  owners?: MeterOwners;
  /** Counts submissions and those refused before their actor (metrics). */
  counters?: ReadingCounters;
}

/** Who owns a meter (`null`: unknown meter). */
export interface MeterOwners {
  get(meterId: string): Promise<string | null>;
}

/** `/api/meters`: submission, listing and stats. */
export function meterRoutes(deps: MeterRoutesDeps): OpenAPIHono<AuthEnv> {
  const app = new OpenAPIHono<AuthEnv>({ defaultHook: validationHook });
  const reads: StoreReads = deps.cache ?? deps.store;
  app.use(bearerAuth(deps.tokens));

  /** Users may only name their own meters; unknown ones get the same answer as others'. */
  async function assertOwner(principal: Principal, meterId: string): Promise<void> {
    if (principal.role === "admin") return;
    const owner = deps.owners
      ? await deps.owners.get(meterId)
      : (await deps.store.getDevice(meterId))?.user_id;
    if (!mayUseMeter(principal, owner ?? undefined)) {
      throw new GatewayError("forbidden", notYourMeter(meterId));
    }
  }

  return app
    .openapi(submit, async (c) => {
      deps.counters?.submitted("http");
      const outcome = await deps.registry.submit({
        ...c.req.valid("json"),
        source: "http",
        caller: c.var.principal,
        address: clientAddress(c),
      });
      if (outcome.status !== "accepted") throw outcomeError(outcome);
      return c.json(outcome.reading as Reading, 201);
    }, (result) => {
      if (result.success) return;
      deps.counters?.submitted("http");
      deps.counters?.rejected("http", "invalid_payload");
      validationHook(result);
      return undefined as never;
    })
    .openapi(list, async (c) => {
      const q = c.req.valid("query");
      const principal = c.var.principal;
      if (q.meter_id) await assertOwner(principal, q.meter_id);
      const page = await reads.listReadings({
        user_id: principal.role === "admin" ? undefined : principal.user_id,
        meter_id: q.meter_id,
        from: q.from ? Date.parse(q.from) : undefined,
        to: q.to ? Date.parse(q.to) : undefined,
        minted: q.minted === undefined ? undefined : q.minted === "true",
        order: q.order,
        limit: q.limit,
        cursor: q.cursor,
      });
      return c.json({ items: page.items.map(toReading), next_cursor: page.next_cursor }, 200);
    })
    .openapi(stats, async (c) => {
      const principal = c.var.principal;
      const requested = c.req.valid("query").user_id;
      if (requested && principal.role !== "admin" && requested !== principal.user_id) {
        throw new GatewayError("forbidden", "Only admins may read another user's stats");
      }
      const userId = principal.role === "admin" ? requested : principal.user_id;
      const s = await reads.readingStats({ user_id: userId });
      return c.json({
        meter_count: s.meter_count,
        reading_count: s.reading_count,
        total_kwh: s.kwh_e4 / 10_000,
        minted_count: s.minted_count,
        first_reading_at: s.first_ts === null ? null : new Date(s.first_ts).toISOString(),
        last_reading_at: s.last_ts === null ? null : new Date(s.last_ts).toISOString(),
      }, 200);
    })
    .openapi(hourly, async (c) => {
      const { meter_id } = c.req.valid("param");
      const q = c.req.valid("query");
      await assertOwner(c.var.principal, meter_id);
      const end = q.end ? Date.parse(q.end) : deps.clock.now();
      const start = q.start ? Date.parse(q.start) : end - 86_400_000;
      if (start >= end || end - start > MAX_HOURLY_RANGE_MS) {
        throw new GatewayError(
          "invalid_payload",
          "start must be before end, at most 366 days apart",
        );
      }
      const hours = await reads.hourlyStats(meter_id, start, end);
      return c.json({
        meter_id,
        start: new Date(start).toISOString(),
        end: new Date(end).toISOString(),
        hours: hours.map((h) => ({ ...h, hour: new Date(h.hour).toISOString() })),
      }, 200);
    });
}
