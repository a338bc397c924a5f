// `deno task jobs:list|jobs:show|jobs:retry|jobs:purge`: batch jobs of the running gateway.
import { fatal, parseFlags } from "./_args.ts";
import {
  ApiError,
  apiPath,
  CONNECTION_OPTIONS,
  CONNECTION_USAGE,
  type GatewayClient,
  withGateway,
} from "./_client.ts";

const STATUSES = ["queued", "running", "completed", "failed", "dead"];
const PAGE_SIZE = 1000;

const USAGE = `Usage:
  deno task jobs:list [--status queued|running|completed|failed|dead] [--user USER_ID] [--json]
  deno task jobs:show ID
  deno task jobs:retry ID          Requeue a dead (or failed) job, attempts reset
  deno task jobs:purge --older-than 7d

Batch jobs (POST /api/meters/submit-readings-batch) of the running gateway.

${CONNECTION_USAGE}`;

interface JobSummary {
  job_id: string;
  user_id: string;
  status: string;
  total_submitted: number;
  successful: number;
  failed: number;
  duplicates: number;
  attempts: number;
  created_at: string;
  finished_at: string | null;
}

async function main(args: string[]): Promise<void> {
  const [command, ...rest] = args;
  // A job id may follow the command; everything else is a flag.
  const id = rest[0] !== undefined && !rest[0].startsWith("-") ? rest.shift() : undefined;
  const flags = parseFlags(rest, {
    usage: USAGE,
    options: {
      status: { type: "string" },
      user: { type: "string" },
      json: { type: "boolean", default: false },
      "older-than": { type: "string" },
      ...CONNECTION_OPTIONS,
    },
  });
  switch (command) {
    case "list": {
      if (flags.status !== undefined && !STATUSES.includes(flags.status)) {
        fatal(`--status must be one of ${STATUSES.join(", ")}`);
      }
      return await withGateway(flags, async (client) => {
        const jobs = await listAll(client, flags.status, flags.user);
        if (flags.json) return console.log(JSON.stringify(jobs, null, 2));
        if (jobs.length === 0) return console.log("No batch jobs.");
        console.log(table(jobs));
        console.log(`${jobs.length} job${jobs.length === 1 ? "" : "s"}`);
      });
    }
    case "show":
    case "retry": {
      if (id === undefined) fatal(`jobs:${command} needs a job id (see --help)`);
      return await withGateway(flags, async (client) => {
        const job = command === "show"
          ? await client.request("GET", apiPath`/api/meters/batches/${id}`)
          : await client.request("POST", apiPath`/api/admin/batches/${id}/retry`);
        console.log(JSON.stringify(job, null, 2));
      });
    }
    case "purge": {
      const olderThan = flags["older-than"];
      if (olderThan === undefined) fatal("jobs:purge needs --older-than, e.g. 7d");
      return await withGateway(flags, async (client) => {
        const res = await client.request<{ purged: number }>("POST", "/api/admin/batches/purge", {
          body: { older_than: olderThan },
        });
        console.log(`Purged ${res.purged} finished job${res.purged === 1 ? "" : "s"}.`);
      });
    }
    default:
      fatal(`Unknown jobs command "${command ?? ""}"\n\n${USAGE}`);
  }
}

async function listAll(
  client: GatewayClient,
  status?: string,
  userId?: string,
): Promise<JobSummary[]> {
  const jobs: JobSummary[] = [];
  const seen = new Set<string>();
  let cursor: string | null = null;
  do {
    const query = new URLSearchParams({ limit: String(PAGE_SIZE) });
    if (status !== undefined) query.set("status", status);
    if (userId !== undefined) query.set("user_id", userId);
    if (cursor !== null) query.set("cursor", cursor);
    const page: { items: JobSummary[]; next_cursor: string | null } = await client.request(
      "GET",
      `/api/meters/batches?${query}`,
    );
    jobs.push(...page.items);
    cursor = page.next_cursor;
    if (cursor !== null && seen.has(cursor)) {
      throw new ApiError("bad_response", `The gateway returned the cursor "${cursor}" twice`, {
        status: 200,
      });
    }
    if (cursor !== null) seen.add(cursor);
  } while (cursor !== null);
  return jobs;
}

function table(jobs: JobSummary[]): string {
  const header = [
    "JOB_ID",
    "USER_ID",
    "STATUS",
    "TOTAL",
    "OK",
    "FAILED",
    "DUP",
    "ATTEMPTS",
    "CREATED_AT",
  ];
  const rows = jobs.map((j) => [
    j.job_id,
    j.user_id,
    j.status,
    String(j.total_submitted),
    String(j.successful),
    String(j.failed),
    String(j.duplicates),
    String(j.attempts),
    j.created_at,
  ]);
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)));
  return [header, ...rows]
    .map((cells) => cells.map((c, i) => c.padEnd(widths[i])).join("  ").trimEnd())
    .join("\n");
}

if (import.meta.main) await main(Deno.args);
