import { createHash } from "node:crypto";
import { createRoute, OpenAPIHono, z } from "@hono/zod-openapi";
import { type BatchJob, checkBatchReadings } from "../core/batch.ts";
import type { Clock } from "../core/clock.ts";
import { GatewayError } from "../core/errors.ts";
import type { Store } from "../db/store.ts";
import type { BatchRunner } from "../services/batch_runner.ts";
import { isFinished } from "../services/batch_runner.ts";
import type { TokenService } from "../services/tokens.ts";
import { parseDuration } from "../core/duration.ts";
import { type AuthEnv, bearerAuth, requireRole } from "./middleware.ts";
import { commonErrors, ErrorSchema, jsonBody, jsonResponse, userIdSchema } from "./schemas.ts";
import { validationHook } from "./validation.ts";
import type { MeterOwners } from "./meters.ts";

/** The path whose body limit is sized for batches (routes/app.ts). */
export const BATCH_SUBMIT_PATH = "/api/meters/submit-readings-batch";

/** Nesting a batch body may have: `{readings: [{field: value}]}` is 3; junk goes far deeper. */
const MAX_DEPTH = 6;
/** `Idempotency-Key`: 1–128 printable ASCII characters. */
const IDEMPOTENCY_KEY = /^[\x20-\x7E]{1,128}$/;

const STATUS = z.enum(["queued", "running", "completed", "failed", "dead"]);

const ItemErrorSchema = z.object({
  index: z.number().int(),
  meter_id: z.string().nullable(),
  code: z.string(),
  message: z.string(),
}).openapi("BatchItemError");

const JobSummarySchema = z.object({
  job_id: z.string(),
  user_id: z.string(),
  status: STATUS,
  total_submitted: z.number().int(),
  successful: z.number().int(),
  failed: z.number().int(),
  duplicates: z.number().int(),
  attempts: z.number().int(),
  last_error: z.string().nullable(),
  created_at: z.string(),
  started_at: z.string().nullable(),
  finished_at: z.string().nullable(),
}).openapi("BatchJobSummary");

const JobSchema = JobSummarySchema.extend({
  errors: z.array(ItemErrorSchema).openapi({
    description: "Every reading not stored by this job, by index: failed ones and duplicates",
  }),
}).openapi("BatchJob");

const AcceptedSchema = z.object({
  job_id: z.string(),
  total_submitted: z.number().int(),
  status: STATUS,
  status_url: z.string(),
}).openapi("BatchAccepted");

const JobParam = z.object({
  job_id: z.string().regex(/^[A-Za-z0-9._:-]{1,64}$/, "job_id is malformed").openapi({
    param: { name: "job_id", in: "path" },
  }),
});

/** A job as the API shows it, with its errors. */
export function jobView(job: BatchJob): z.infer<typeof JobSchema> {
  return { ...jobSummary(job), errors: job.errors };
}

/** A job as listings show it: without its errors. */
export function jobSummary(job: BatchJob): z.infer<typeof JobSummarySchema> {
  const iso = (ms: number | null) => ms === null ? null : new Date(ms).toISOString();
  return {
    job_id: job.id,
    user_id: job.user_id,
    status: job.status,
    total_submitted: job.total_submitted,
    successful: job.successful,
    failed: job.failed,
    duplicates: job.duplicates,
    attempts: job.attempts,
    last_error: job.last_error,
    created_at: new Date(job.created_at).toISOString(),
    started_at: iso(job.started_at),
    finished_at: iso(job.finished_at),
  };
}

/** Dependencies of {@linkcode batchRoutes} and {@linkcode adminBatchRoutes}. */
export interface BatchRoutesDeps {
  store: Store;
  tokens: TokenService;
  clock: Clock;
  runner: Pick<BatchRunner, "submitted" | "awaitFinished" | "wake">;
  /** `maxOpenPerUser`: queued and running jobs one account may have (BATCH_MAX_OPEN_PER_USER). */
  batch: { maxSize: number; syncMax: number; maxOpenPerUser: number };
  /** Each meter's owner, cached (the rights checked at submission); absent: the store. */
  owners?: MeterOwners;
  /** How long `?mode=sync` waits for the result before answering 202. */
  syncWaitMs: number;
}

const security = [{ bearer: [] }];
const tags = ["batches"];

/** `/api/meters`: batch submission and job status. */
export function batchRoutes(deps: BatchRoutesDeps): OpenAPIHono<AuthEnv> {
  const { maxSize, syncMax } = deps.batch;
  const submit = createRoute({
    method: "post",
    path: "/submit-readings-batch",
    tags,
    security,
    summary: `Submit up to ${maxSize} signed readings as one durable job (202), or up to ` +
      `${syncMax} with ?mode=sync (200 with the result)`,
    description: "Each reading is checked like a single submission; readings that fail are " +
      "reported by index in the job's `errors`, they do not refuse the batch. Schema and the " +
      "caller's right to each meter are checked before the answer, so the job shows those " +
      "errors from the start; signatures, rules and duplicates as it runs. With an " +
      "`Idempotency-Key`, the same key and body give the same job; the same key with another " +
      "body is 422.",
    request: {
      query: z.object({ mode: z.enum(["async", "sync"]).default("async") }),
      headers: z.object({
        "idempotency-key": z.string().optional().openapi({
          description: "1-128 printable ASCII characters",
        }),
      }),
      body: jsonBody(
        z.strictObject({
          readings: z.array(z.unknown().openapi({ description: "A ReadingSubmission" }))
            .min(1, "readings is empty")
            .max(maxSize, `A batch holds at most ${maxSize} readings (BATCH_MAX_SIZE)`),
        }).openapi("ReadingBatch"),
      ),
    },
    responses: {
      200: jsonResponse(JobSchema, "Finished (sync mode, or a finished job's key replayed)"),
      202: jsonResponse(AcceptedSchema, "Stored durably; it runs in the background"),
      413: jsonResponse(ErrorSchema, "Body over the batch body limit"),
      422: jsonResponse(ErrorSchema, "Idempotency-Key reused with another body"),
      ...commonErrors,
    },
  });
  const get = createRoute({
    method: "get",
    path: "/batches/{job_id}",
    tags,
    security,
    summary: "A batch job's status and result (submitter or admin)",
    request: { params: JobParam },
    responses: {
      200: jsonResponse(JobSchema, "The job"),
      404: jsonResponse(ErrorSchema, "No such job (or not yours)"),
      ...commonErrors,
    },
  });
  const list = createRoute({
    method: "get",
    path: "/batches",
    tags,
    security,
    summary: "The caller's batch jobs, newest first (admins: all, or ?user_id)",
    request: {
      query: z.object({
        user_id: userIdSchema.optional(),
        status: STATUS.optional(),
        limit: z.coerce.number().int().min(1).max(1000).default(100),
        cursor: z.string().max(1024).optional(),
      }),
    },
    responses: {
      200: jsonResponse(
        z.object({ items: z.array(JobSummarySchema), next_cursor: z.string().nullable() }),
        "A page of jobs (without their errors)",
      ),
      ...commonErrors,
    },
  });

  const ownerOf = deps.owners
    ? (meterId: string) => deps.owners!.get(meterId)
    : async (meterId: string) => (await deps.store.getDevice(meterId))?.user_id ?? null;

  const app = new OpenAPIHono<AuthEnv>({ defaultHook: validationHook });
  const maxOpen = deps.batch.maxOpenPerUser;
  /**
   * One account's backlog is bounded: jobs run oldest first, so without a bound one user's
   * flood would hold back everyone's (and fill the store). A retried submission of a job still
   * open passes (its Idempotency-Key finds it); two submissions racing may both pass.
   */
  async function checkOpenJobs(userId: string, key: string | undefined): Promise<void> {
    const open: BatchJob[] = [];
    for (const status of ["queued", "running"] as const) {
      const page = await deps.store.listBatchJobs({ user_id: userId, status, limit: maxOpen });
      open.push(...page.items);
    }
    if (open.length < maxOpen) return;
    if (key !== undefined && open.some((j) => j.idempotency_key === key)) return;
    throw new GatewayError(
      "rate_limited",
      `This account has ${open.length} batch jobs queued or running (BATCH_MAX_OPEN_PER_USER ` +
        `is ${maxOpen}); submit more once they finish`,
      { retryAfter: 30 },
    );
  }
  /** Runs `fn` after every earlier call for the same account has settled. */
  const tails = new Map<string, Promise<unknown>>();
  function serially<T>(userId: string, fn: () => Promise<T>): Promise<T> {
    const run = (tails.get(userId) ?? Promise.resolve()).then(fn, fn);
    const tail = run.catch(() => {});
    tails.set(userId, tail);
    tail.then(() => {
      if (tails.get(userId) === tail) tails.delete(userId);
    });
    return run;
  }
  app.use("/submit-readings-batch", bearerAuth(deps.tokens));
  app.use("/batches", bearerAuth(deps.tokens));
  app.use("/batches/*", bearerAuth(deps.tokens));
  return app
    .openapi(submit, async (c) => {
      const principal = c.var.principal;
      const body = c.req.valid("json");
      const sync = c.req.valid("query").mode === "sync";
      const key = c.req.header("idempotency-key");
      if (key !== undefined && !IDEMPOTENCY_KEY.test(key)) {
        throw new GatewayError(
          "invalid_payload",
          "Idempotency-Key must be 1-128 printable ASCII characters",
        );
      }
      if (depthOf(body.readings, MAX_DEPTH) > MAX_DEPTH - 1) {
        throw new GatewayError("invalid_payload", "readings are nested too deeply to be readings");
      }
      if (sync && body.readings.length > syncMax) {
        throw new GatewayError(
          "invalid_payload",
          `mode=sync takes at most ${syncMax} readings (BATCH_SYNC_MAX); submit larger ` +
            "batches without it and follow status_url",
        );
      }
      // One native hash over the whole body: core/sha256.ts is built for short messages and
      // cost ~7 µs per reading here (1,000 readings ≈ 170 KB).
      const digest = createHash("sha256").update(canonicalJson(body)).digest("hex");
      // Schema and rights now, recorded by index with the job; the runner checks the rest.
      const errors = await checkBatchReadings(body.readings, principal, ownerOf);
      // The account's count of open jobs and the new job are one step per account on this
      // instance: parallel submissions cannot all pass the check before any is stored.
      const { job, created } = await serially(principal.user_id, async () => {
        await checkOpenJobs(principal.user_id, key);
        return await deps.store.createBatchJob({
          id: crypto.randomUUID(),
          user_id: principal.user_id,
          idempotency_key: key ?? null,
          body_sha256: digest,
          total_submitted: body.readings.length,
          created_at: deps.clock.now(),
          failed: errors.length,
          errors,
        }, body.readings);
      });
      if (!created && job.body_sha256 !== digest) {
        throw new GatewayError(
          "idempotency_mismatch",
          "This Idempotency-Key was used with a different body",
          { details: { job_id: job.id } },
        );
      }
      if (created) deps.runner.submitted(job);
      let current: BatchJob | null = job;
      if (sync && !isFinished(job.status)) {
        current = await deps.runner.awaitFinished(job, deps.syncWaitMs);
      }
      if (current && isFinished(current.status)) return c.json(jobView(current), 200);
      return c.json({
        job_id: job.id,
        total_submitted: job.total_submitted,
        status: current?.status ?? job.status,
        status_url: `/api/meters/batches/${job.id}`,
      }, 202);
    })
    .openapi(get, async (c) => {
      const job = await deps.store.getBatchJob(c.req.valid("param").job_id);
      const principal = c.var.principal;
      // Someone else's job answers like an unknown one: ids reveal nothing.
      if (!job || (principal.role !== "admin" && job.user_id !== principal.user_id)) {
        throw new GatewayError("not_found", "No such batch job");
      }
      return c.json(jobView(job), 200);
    })
    .openapi(list, async (c) => {
      const q = c.req.valid("query");
      const principal = c.var.principal;
      if (q.user_id && principal.role !== "admin" && q.user_id !== principal.user_id) {
        throw new GatewayError("forbidden", "Only admins may list another user's batch jobs");
      }
      const page = await deps.store.listBatchJobs({
        user_id: principal.role === "admin" ? q.user_id : principal.user_id,
        status: q.status,
        limit: q.limit,
        cursor: q.cursor,
      });
      return c.json({
        items: page.items.map(jobSummary),
        next_cursor: page.next_cursor,
      }, 200);
    });
}

/** `/api/admin/batches`: operator actions on jobs (admin). */
export function adminBatchRoutes(deps: BatchRoutesDeps): OpenAPIHono<AuthEnv> {
  const adminTags = ["admin"];
  const retry = createRoute({
    method: "post",
    path: "/{job_id}/retry",
    tags: adminTags,
    security,
    summary: "Requeue a dead (or failed) job with its attempts reset",
    request: { params: JobParam },
    responses: {
      200: jsonResponse(JobSchema, "Requeued"),
      404: jsonResponse(ErrorSchema, "No such job"),
      409: jsonResponse(ErrorSchema, "The job is not dead or failed"),
      ...commonErrors,
    },
  });
  const purge = createRoute({
    method: "post",
    path: "/purge",
    tags: adminTags,
    security,
    summary: "Delete finished jobs that finished more than older_than ago",
    request: {
      body: jsonBody(z.strictObject({
        older_than: z.string().max(32).openapi({ example: "7d" }),
      })),
    },
    responses: {
      200: jsonResponse(z.object({ purged: z.number().int() }), "How many were deleted"),
      ...commonErrors,
    },
  });
  const app = new OpenAPIHono<AuthEnv>({ defaultHook: validationHook });
  app.use(bearerAuth(deps.tokens), requireRole("admin"));
  return app
    .openapi(retry, async (c) => {
      const job = await deps.store.retryBatchJob(c.req.valid("param").job_id, deps.clock.now());
      deps.runner.wake();
      return c.json(jobView(job), 200);
    })
    .openapi(purge, async (c) => {
      const ms = parseDuration(c.req.valid("json").older_than);
      if (ms === undefined) {
        throw new GatewayError("invalid_payload", "older_than must be a duration like 7d or 12h");
      }
      const purged = await deps.store.purgeBatchJobs(deps.clock.now() - ms);
      return c.json({ purged }, 200);
    });
}

/** JSON with object keys sorted: one text per value, whatever the sender's key order. */
export function canonicalJson(value: unknown): string {
  if (Array.isArray(value)) return `[${value.map(canonicalJson).join(",")}]`;
  if (value !== null && typeof value === "object") {
    const entries = Object.keys(value).sort().map((k) =>
      `${JSON.stringify(k)}:${canonicalJson((value as Record<string, unknown>)[k])}`
    );
    return `{${entries.join(",")}}`;
  }
  return JSON.stringify(value);
}

/** Nesting depth of a JSON value, counted up to `limit` (iterative: junk may be deep). */
function depthOf(value: unknown, limit: number): number {
  let max = 0;
  const stack: [unknown, number][] = [[value, 1]];
  while (stack.length > 0) {
    const [v, d] = stack.pop()!;
    if (v === null || typeof v !== "object") continue;
    if (d > max) max = d;
    if (max >= limit) return max;
    for (const child of Object.values(v)) stack.push([child, d + 1]);
  }
  return max;
}
