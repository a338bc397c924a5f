// The batch job runner of one gateway instance: claims durable batch jobs with a lease, runs
// their readings through the same actors, rules, signatures and writer as single readings, and
// records exact results (DESIGN.md §11).
import { setImmediate } from "node:timers";
import type { Submission } from "../actors/meter_actor.ts";
import type { Bus } from "../bus/bus.ts";
import type { BatchItemError, BatchJob, BatchStatus } from "../core/batch.ts";
import type { Clock } from "../core/clock.ts";
import type { ErrorCode } from "../core/errors.ts";
import type { Logger } from "../core/logger.ts";
import type { Metrics } from "../core/metrics.ts";
import type { Outcome } from "../core/outcome.ts";
import { type ReadingSubmission, readingSubmissionSchema } from "../core/reading.ts";
import type { Principal } from "../core/user.ts";
import type { ClaimedBatchJob, Store } from "../db/store.ts";

/** What the runner needs of the registry: the one path every reading takes. */
export interface BatchIntake {
  submit(msg: Submission): Promise<Outcome>;
}

/** What the runner reads of the writer to share its queue with live intake. */
export interface WriterLoad {
  readonly stats: { queued: number };
  /** The writer's last failure while it is failing, else `null`. */
  readonly stalled: string | null;
}

/** Options of {@linkcode BatchRunner}. */
export interface BatchRunnerOptions {
  store: Store;
  registry: BatchIntake;
  writer: WriterLoad;
  /** The writer's queue capacity (WRITER_QUEUE_MAX). */
  writerQueueMax: number;
  bus: Bus;
  clock: Clock;
  logger: Logger;
  metrics: Metrics;
  /** The lease owner's name: this instance. */
  instanceId: string;
  /** Jobs run at once (BATCH_WORKER_CONCURRENCY). */
  concurrency: number;
  leaseMs: number;
  maxAttempts: number;
  /** First wait after a transient failure; doubled per attempt, with jitter. */
  retryBackoffMs: number;
  /**
   * How long an attempt keeps retrying readings answered `unavailable` (the store is away)
   * before it ends and the job waits for its next attempt (BATCH_ATTEMPT_PATIENCE).
   */
  patienceMs: number;
  /** Finished jobs older than this are purged (BATCH_RETENTION). */
  retentionMs: number;
  /** Readings of one job in flight at first and at least; default 64. */
  window?: number;
  /** Readings of one job in flight at most, while live intake leaves room; default 2,048. */
  windowMax?: number;
  /** How often the store is polled for claimable jobs; default min(1 s, lease / 3). */
  pollMs?: number;
  /** How often the queue-depth gauge is refreshed; default 15 s. */
  statsEveryMs?: number;
}

/** Codes after which the same reading may succeed later: the attempt is retried. */
const TRANSIENT = new Set<ErrorCode>(["unavailable", "overloaded"]);
/** `overloaded` answers retried within the attempt (after a pause) before it counts as transient. */
const OVERLOAD_RETRIES = 20;
const OVERLOAD_PAUSE_MS = 25;
/** While the writer's queue is over half full, the runner looks again this often. */
const WRITER_BUSY_PAUSE_MS = 10;
/** Readings handed to the registry per task (~2-3 ms of work) before live intake gets a turn. */
const SLICE = 64;
/** A turn given to live intake that took this long halves the window; under LOW it may grow. */
const LAG_HIGH_MS = 40;
const LAG_LOW_MS = 10;
const MAX_BACKOFF_MS = 10 * 60_000;
/** Pauses between tries of a reading answered `unavailable`, within one attempt. */
const UNAVAILABLE_PAUSE_MIN_MS = 100;
const UNAVAILABLE_PAUSE_MAX_MS = 2_000;
const PROGRESS_EVERY_MS = 1_000;
const PURGE_EVERY_MS = 60 * 60_000;
const STATUSES: BatchStatus[] = ["queued", "running", "completed", "failed", "dead"];

/** One attempt at one job. */
interface Run {
  job: BatchJob;
  readings: unknown[];
  principal: Principal;
  successful: number;
  failed: number;
  duplicates: number;
  errors: BatchItemError[];
  /** Indices already reported (at submission, or permanently by an earlier attempt): skipped. */
  settled: Set<number>;
  /** Natural keys (`meter_id\nts`) this job stored in earlier attempts, not yet matched. */
  own: Set<string>;
  /** Keys counted `successful` in this attempt (stored now, or matched in `own`). */
  claimed: Set<string>;
  /** This attempt's `duplicate` answers: checked against the job's rows at the end. */
  suspects: { index: number; key: string }[];
  /** Since when readings have been answered `unavailable` without a success between. */
  unavailableSince: number | null;
  /** The store or the writer failed during this attempt (a commit may be in doubt). */
  troubled: boolean;
  /** The first transient failure of this attempt: the job is retried. */
  transient: string | null;
  /** Stop dispatching: the lease was lost or the instance is shutting down. */
  stop: boolean;
  lost: boolean;
  lastProgressAt: number;
  lastDecile: number;
  /** Readings of this job handed out and not yet settled. */
  inFlight: number;
  /** Called once when one of the job's readings settles (the dispatcher waits for room). */
  wake: (() => void) | undefined;
}

/**
 * Runs batch jobs: polls {@linkcode Store.claimBatchJob} (and wakes at once when this instance
 * created one), at most `concurrency` at a time, heartbeats each lease every `leaseMs / 3` with
 * the progress so far and stops a job whose heartbeat is refused (another instance took it over).
 *
 * **Sharing the writer.** A job hands its readings to the registry in slices of
 * {@linkcode SLICE}, one slice per event-loop task, with at most the runner's window in flight:
 * `window` (64) at first, doubled up to `windowMax` (2,048) after each full window that settled
 * while live intake got its turns promptly (a task boundary under {@linkcode LAG_LOW_MS}), halved back
 * towards `window` when a turn took {@linkcode LAG_HIGH_MS} or more or the writer's queue is half
 * full. It adds readings only while the writer's queue is under half its capacity: the other
 * half stays free for MQTT and HTTP intake, which therefore never see `overloaded` because of a
 * batch. In the writer, batch rows go after live ones and never take a lane's last free slot
 * (workers/writer_client.ts), so a live reading waits for at most one batch insert in progress.
 * A batch slows down when live traffic is heavy, never the other way round.
 *
 * **Exact results.** At the start of every attempt the runner reads which readings this job
 * already stored ({@linkcode Store.readingsOfBatchJob}; rows carry the job id) and counts them as
 * its own successes without submitting them again; any other duplicate is a `duplicate`. The
 * readings already in the job's `errors` (refused at submission, or permanently by an earlier
 * attempt) are kept and skipped. So an attempt after a crash reports exactly the counts of an
 * uninterrupted run.
 */
export class BatchRunner implements AsyncDisposable {
  #o: BatchRunnerOptions;
  #window: number;
  #windowMax: number;
  /**
   * Readings each job may have in flight now, adapted between `window` and `windowMax`; one
   * figure for the runner, so that every job starts where the last one left it.
   */
  #windowNow: number;
  /** Readings settled since the window last changed. */
  #sinceResize = 0;
  #pollMs: number;
  #active = new Map<string, { run?: Run; done: Promise<void> }>();
  #closed = false;
  #wake: (() => void) | undefined;
  #loop: Promise<void>;
  #timers: ReturnType<typeof setInterval>[] = [];
  #claimFailures = 0;

  constructor(options: BatchRunnerOptions) {
    this.#o = options;
    this.#window = options.window ?? 64;
    this.#windowMax = Math.max(this.#window, options.windowMax ?? 2048);
    this.#windowNow = this.#window;
    this.#pollMs = options.pollMs ?? Math.min(1_000, Math.max(50, options.leaseMs / 3));
    const m = options.metrics;
    m.counter("batch_jobs_submitted_total", "Batch jobs created");
    m.counter("batch_jobs_completed_total", "Batch jobs finished, by final status");
    m.histogram(
      "batch_processing_duration_seconds",
      "From a job's first start to its end",
      [0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600],
    );
    m.histogram(
      "batch_readings_per_job",
      "Readings submitted per finished job",
      [1, 10, 100, 500, 1000, 2500, 5000, 10_000],
    );
    m.gaugeSet("batch_jobs", "Batch jobs by status (refreshed periodically)");
    this.#timers.push(
      setInterval(() => this.#refreshCounts(), options.statsEveryMs ?? 15_000),
      setInterval(
        () => this.#purge(),
        Math.max(60_000, Math.min(PURGE_EVERY_MS, options.retentionMs / 4)),
      ),
    );
    this.#loop = this.#run();
    this.#refreshCounts();
    this.#purge();
  }

  /** Jobs running on this instance now. */
  get active(): number {
    return this.#active.size;
  }

  /** A job was created on this instance: count it and look for work at once. */
  submitted(_job: BatchJob): void {
    this.#o.metrics.inc("batch_jobs_submitted_total");
    this.wake();
  }

  /** Looks for claimable jobs now instead of at the next poll. */
  wake(): void {
    this.#wake?.();
  }

  /**
   * Waits until the job is finished (its `batch.completed` event, or the store, polled in case
   * another instance runs it and the bus is away); `null` after `timeoutMs`.
   */
  async awaitFinished(job: BatchJob, timeoutMs: number): Promise<BatchJob | null> {
    const deadline = this.#o.clock.now() + timeoutMs;
    let signal = Promise.withResolvers<void>();
    const sub = this.#o.bus.subscribe(`user:${job.user_id}`, (event) => {
      if (event.type === "batch.completed" && event.data.job_id === job.id) signal.resolve();
    });
    try {
      await sub.ready;
      for (;;) {
        const current = await this.#o.store.getBatchJob(job.id);
        if (current === null) return null;
        if (isFinished(current.status)) return current;
        const left = deadline - this.#o.clock.now();
        if (left <= 0 || this.#closed) return null;
        await pause(Math.min(left, 500), signal.promise);
        signal = Promise.withResolvers<void>();
      }
    } finally {
      sub.unsubscribe();
    }
  }

  /**
   * Stops claiming, lets each running job's readings in flight settle (the writer is still
   * open), and hands the unfinished jobs back to the queue for the next instance or restart.
   */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    for (const timer of this.#timers) clearInterval(timer);
    for (const { run } of this.#active.values()) if (run) run.stop = true;
    this.wake();
    await this.#loop;
    await Promise.all([...this.#active.values()].map((a) => a.done));
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }

  async #run(): Promise<void> {
    while (!this.#closed) {
      await this.#fill();
      if (this.#closed) break;
      const woken = Promise.withResolvers<void>();
      this.#wake = woken.resolve;
      await pause(this.#pollMs, woken.promise);
      this.#wake = undefined;
    }
  }

  /** Claims jobs until the concurrency is reached or none is claimable. */
  async #fill(): Promise<void> {
    while (!this.#closed && this.#active.size < this.#o.concurrency) {
      let claim: ClaimedBatchJob | null;
      try {
        claim = await this.#o.store.claimBatchJob(
          this.#o.instanceId,
          this.#o.clock.now(),
          this.#o.leaseMs,
        );
        if (this.#claimFailures > 0) {
          this.#o.logger.info("batch jobs claimable again", { failures: this.#claimFailures });
          this.#claimFailures = 0;
        }
      } catch (error) {
        // The store is down: try again at the next poll, say so once.
        if (this.#claimFailures++ === 0) {
          this.#o.logger.warn("batch job claim failed; retrying", { error });
        }
        return;
      }
      if (claim === null) return;
      const current = this.#active.get(claim.job.id);
      if (current !== undefined) {
        // Our own lease ran out while the store was away, and this instance claimed the job
        // again: the attempt still running here goes on under the new claim. A second attempt
        // beside it would count the first one's readings as duplicates.
        if (current.run) current.run.job = claim.job;
        continue;
      }
      if (this.#closed) {
        // Claimed while closing: hand it back untouched (the attempt is spent, nothing done).
        await this.#release(claim.job, "the instance is shutting down");
        return;
      }
      const id = claim.job.id;
      const entry: { run?: Run; done: Promise<void> } = { done: Promise.resolve() };
      this.#active.set(id, entry);
      entry.done = this.#attempt(claim, entry).catch((error) =>
        this.#o.logger.error("batch job attempt crashed", { job_id: id, error })
      ).finally(() => {
        this.#active.delete(id);
        this.wake();
      });
    }
  }

  async #attempt(claim: ClaimedBatchJob, entry: { run?: Run }): Promise<void> {
    const { job, readings } = claim;
    const o = this.#o;
    // A job claimed more often than allowed: its runners died (perhaps because of it). Dead.
    if (job.attempts > o.maxAttempts) {
      await this.#end(job, "dead", {
        successful: job.successful,
        failed: job.failed,
        duplicates: job.duplicates,
        errors: job.errors,
        last_error: job.last_error ?? "Attempts exhausted: the instances running it stopped",
      });
      return;
    }
    const run: Run = {
      job,
      readings,
      principal: { user_id: job.user_id, role: "user" },
      successful: 0,
      failed: 0,
      duplicates: 0,
      errors: [],
      settled: new Set(),
      own: new Set(),
      claimed: new Set(),
      suspects: [],
      unavailableSince: null,
      troubled: false,
      transient: null,
      stop: this.#closed,
      lost: false,
      lastProgressAt: o.clock.now(),
      lastDecile: 0,
      inFlight: 0,
      wake: undefined,
    };
    // Readings refused at submission, and those an earlier attempt reported, stay as they were.
    for (const error of job.errors) {
      if (run.settled.has(error.index)) continue;
      run.settled.add(error.index);
      run.errors.push(error);
      if (error.code === "duplicate") run.duplicates++;
      else run.failed++;
    }
    entry.run = run;
    const heartbeat = this.#heartbeat(run);
    try {
      if (readings.length !== job.total_submitted) {
        // The store lost part of the job's input: no attempt can do better.
        await this.#end(job, "failed", {
          ...counts(run),
          last_error: `The job's stored readings are incomplete (${readings.length} of ` +
            `${job.total_submitted})`,
        });
        return;
      }
      const user = await o.store.getUser(job.user_id);
      if (user?.disabled) {
        // A disabled account's rights end everywhere, its queued jobs included.
        await this.#end(job, "failed", {
          ...counts(run),
          last_error: "The submitter's account is disabled",
        });
        return;
      }
      // A deleted submitter keeps no rights beyond a user's (their meters may still be theirs).
      run.principal = { user_id: job.user_id, role: user?.role ?? "user" };
      for (const r of await o.store.readingsOfBatchJob(job.id)) {
        run.own.add(`${r.meter_id}\n${r.ts}`);
      }
      await this.#dispatch(run);
      if (run.troubled && run.suspects.length > 0) await this.#reconcile(run);
    } catch (error) {
      run.transient ??= `The store failed: ${(error as Error)?.message ?? String(error)}`;
      o.logger.warn("batch job attempt failed", { job_id: job.id, error });
    } finally {
      heartbeat.stop();
    }
    await heartbeat.settled;
    // The claim this attempt runs under now (renewed if this instance claimed it again).
    const current = run.job;
    if (run.lost) {
      o.logger.info("batch job taken over by another instance", { job_id: current.id });
      return;
    }
    const done = run.successful + run.failed + run.duplicates;
    if (run.transient === null && done === current.total_submitted) {
      await this.#end(current, "completed", counts(run));
    } else if (run.transient === null) {
      // Stopped before the end without a failure: the instance is shutting down.
      await this.#release(current, "the instance shut down during the job", run);
    } else if (current.attempts >= o.maxAttempts) {
      await this.#end(current, "dead", { ...counts(run), last_error: run.transient });
    } else {
      const base = o.retryBackoffMs * 2 ** (current.attempts - 1);
      const wait = Math.min(MAX_BACKOFF_MS, Math.round(base * (0.5 + Math.random())));
      await this.#finish(current, {
        status: "queued",
        ...counts(run),
        run_after: o.clock.now() + wait,
        last_error: run.transient,
      });
      o.logger.info("batch job will be retried", {
        job_id: current.id,
        attempt: current.attempts,
        retry_in_ms: wait,
        reason: run.transient,
      });
    }
  }

  /**
   * Hands the readings to the registry in index order, a slice per task, within the job's
   * window and the writer's half; ends when every reading has settled.
   */
  async #dispatch(run: Run): Promise<void> {
    const o = this.#o;
    const half = o.writerQueueMax / 2;
    const n = run.readings.length;
    let i = 0;
    let lag = 0;
    while (!run.stop) {
      while (i < n && run.settled.has(i)) i++;
      if (i >= n) break;
      const queued = o.writer.stats.queued;
      const room = Math.min(this.#windowNow - run.inFlight, half - queued, SLICE);
      if (room <= 0) {
        if (queued >= half) this.#shrink();
        else this.#grow(lag, queued, half);
        if (this.#windowNow > run.inFlight && queued < half) continue;
        // Window full, or the writer's half taken: wait for a reading to settle (or a moment).
        await this.#settledOne(run, queued >= half ? WRITER_BUSY_PAUSE_MS : undefined);
        continue;
      }
      for (let k = 0; k < room && i < n; i++) {
        if (run.settled.has(i)) continue;
        this.#start(run, i);
        k++;
      }
      // One slice per task: MQTT and HTTP get the event loop between slices, and how long they
      // kept it (the lag) says how busy live intake is.
      const before = o.clock.now();
      await nextTask();
      lag = o.clock.now() - before;
      if (lag >= LAG_HIGH_MS) this.#shrink();
    }
    while (run.inFlight > 0) await this.#settledOne(run);
  }

  /** Starts one reading; it counts against the window until its result is recorded. */
  #start(run: Run, index: number): void {
    run.inFlight++;
    const done = () => {
      run.inFlight--;
      this.#sinceResize++;
      const wake = run.wake;
      run.wake = undefined;
      wake?.();
    };
    this.#item(run, index).then(done, (error) => {
      done();
      // #item does not throw (the store is not touched here); if it ever does, retry the job.
      run.transient ??= `Reading ${index} failed: ${(error as Error)?.message ?? String(error)}`;
    });
  }

  /** Resolves when one of the job's readings settles, or after `ms`. */
  #settledOne(run: Run, ms?: number): Promise<void> {
    const settled = new Promise<void>((resolve) => run.wake = resolve);
    return ms === undefined ? settled : pause(ms, settled);
  }

  /**
   * Doubles the window (up to `windowMax`) after a full window of readings settled with the
   * event loop free (lag under {@linkcode LAG_LOW_MS}) and room for it in the writer's half.
   */
  #grow(lag: number, queued: number, half: number): void {
    if (this.#windowNow >= this.#windowMax || this.#sinceResize < this.#windowNow) return;
    if (lag >= LAG_LOW_MS || queued + this.#windowNow > half) return;
    this.#windowNow = Math.min(this.#windowMax, this.#windowNow * 2);
    this.#sinceResize = 0;
  }

  /** Halves the window (down to `window`): live intake waits, or the writer is half full. */
  #shrink(): void {
    if (this.#windowNow <= this.#window) return;
    this.#windowNow = Math.max(this.#window, Math.floor(this.#windowNow / 2));
    this.#sinceResize = 0;
  }

  /** One reading: checked, recognised as this job's own, or submitted like any other. */
  async #item(run: Run, index: number): Promise<void> {
    const raw = run.readings[index];
    // Every reading not settled passed readingSubmissionSchema at submission (which transforms
    // nothing): a shape check guards against stored input that did not, and only then does the
    // schema run again, for its message.
    let reading = asSubmission(raw);
    if (reading === null) {
      const parsed = readingSubmissionSchema.safeParse(raw);
      if (!parsed.success) {
        const issue = parsed.error.issues[0];
        const path = issue.path.join(".");
        this.#fail(
          run,
          index,
          meterIdOf(raw),
          "invalid_payload",
          `${path ? `${path}: ` : ""}${issue.message}`,
        );
        return;
      }
      reading = parsed.data;
    }
    const key = `${reading.meter_id}\n${Date.parse(reading.reading_timestamp)}`;
    // Synchronous up to here, so the first index with a key claims this job's stored row.
    if (run.own.delete(key)) {
      run.successful++;
      run.claimed.add(key);
      this.#progress(run);
      return;
    }
    for (let tries = 0, waits = 0;; tries++) {
      if (this.#o.writer.stalled !== null) run.troubled = true;
      const outcome = await this.#o.registry.submit({
        ...reading,
        source: "batch",
        caller: run.principal,
        batch_job_id: run.job.id,
      });
      if (outcome.status !== "rejected" || outcome.code !== "unavailable") {
        run.unavailableSince = null;
      }
      if (outcome.status === "accepted") {
        run.successful++;
        run.claimed.add(key);
      } else if (outcome.status === "duplicate") {
        run.duplicates++;
        run.suspects.push({ index, key });
        run.errors.push({
          index,
          meter_id: reading.meter_id,
          code: "duplicate",
          message: outcome.message,
        });
      } else if (!TRANSIENT.has(outcome.code)) {
        // Permanent for this reading (rules, signature, rights, rate): reported, not retried.
        this.#fail(run, index, reading.meter_id, outcome.code, outcome.message);
        return;
      } else if (outcome.code === "overloaded" && tries < OVERLOAD_RETRIES && !run.stop) {
        await pause(OVERLOAD_PAUSE_MS);
        continue;
      } else if (outcome.code === "unavailable" && !run.stop && this.#patient(run)) {
        // The store is away: wait for it within this attempt rather than spend the attempt.
        const ms = Math.min(UNAVAILABLE_PAUSE_MAX_MS, UNAVAILABLE_PAUSE_MIN_MS * 2 ** waits++);
        await pause(Math.round(ms * (0.5 + Math.random() / 2)));
        continue;
      } else {
        // Left unresolved: the next attempt submits it again.
        run.transient ??= `${outcome.code}: ${outcome.message}`;
        return;
      }
      this.#progress(run);
      return;
    }
  }

  /** Whether an `unavailable` answer is still within the attempt's patience (and starts it). */
  #patient(run: Run): boolean {
    run.troubled = true;
    const now = this.#o.clock.now();
    run.unavailableSince ??= now;
    return now - run.unavailableSince < this.#o.patienceMs;
  }

  /**
   * After a failure of the store or the writer, a commit may have been in doubt and a reading
   * this job stored answered as a duplicate of itself (or a later copy of it counted instead).
   * The job's rows say which keys are its own: the first index of each that is not already
   * counted becomes the success, as in an uninterrupted run.
   */
  async #reconcile(run: Run): Promise<void> {
    const stored = new Set<string>();
    for (const r of await this.#o.store.readingsOfBatchJob(run.job.id)) {
      stored.add(`${r.meter_id}\n${r.ts}`);
    }
    const moved = new Set<number>();
    for (const { index, key } of [...run.suspects].sort((a, b) => a.index - b.index)) {
      if (!stored.has(key) || run.claimed.has(key)) continue;
      run.claimed.add(key);
      moved.add(index);
    }
    if (moved.size === 0) return;
    run.errors = run.errors.filter((e) => !(e.code === "duplicate" && moved.has(e.index)));
    run.duplicates -= moved.size;
    run.successful += moved.size;
    this.#o.logger.info("batch job results reconciled with its stored rows", {
      job_id: run.job.id,
      readings: moved.size,
    });
  }

  #fail(run: Run, index: number, meterId: string | null, code: ErrorCode, message: string): void {
    run.failed++;
    run.errors.push({ index, meter_id: meterId, code, message });
    this.#progress(run);
  }

  /** Publishes `batch.progress` at most once a second or per tenth of the job. */
  #progress(run: Run): void {
    const done = run.successful + run.failed + run.duplicates;
    const decile = Math.floor((done * 10) / run.job.total_submitted);
    const now = this.#o.clock.now();
    if (decile <= run.lastDecile && now - run.lastProgressAt < PROGRESS_EVERY_MS) return;
    if (done === run.job.total_submitted) return; // batch.completed follows
    run.lastDecile = decile;
    run.lastProgressAt = now;
    this.#publish("batch.progress", run.job, {
      status: "running",
      processed: done,
      ...countsOnly(run),
    });
  }

  /** Extends the lease every leaseMs / 3 with the progress so far; a refusal stops the run. */
  #heartbeat(run: Run): { stop(): void; settled: Promise<void> } {
    const o = this.#o;
    let beating: Promise<void> = Promise.resolve();
    const timer = setInterval(() => {
      beating = beating.then(async () => {
        if (run.lost) return;
        try {
          const held = await o.store.heartbeatBatchJob(
            run.job.id,
            o.instanceId,
            o.clock.now() + o.leaseMs,
            { ...countsOnly(run), errors: sortedErrors(run) },
          );
          if (!held) {
            run.lost = true;
            run.stop = true;
          }
        } catch (error) {
          // The store is away: keep working; the lease holds until it runs out.
          o.logger.debug("batch heartbeat failed", { job_id: run.job.id, error });
        }
      });
    }, Math.max(10, Math.floor(o.leaseMs / 3)));
    return {
      stop: () => clearInterval(timer),
      get settled() {
        return beating;
      },
    };
  }

  /** Ends the job for good and tells its submitter. */
  async #end(
    job: BatchJob,
    status: "completed" | "failed" | "dead",
    result: ReturnType<typeof counts> & { last_error?: string },
  ): Promise<void> {
    const now = this.#o.clock.now();
    const ok = await this.#finish(job, { status, ...result, finished_at: now });
    if (!ok) return;
    const m = this.#o.metrics;
    m.inc("batch_jobs_completed_total", { status });
    m.observe("batch_processing_duration_seconds", {}, (now - (job.started_at ?? now)) / 1000);
    m.observe("batch_readings_per_job", {}, job.total_submitted);
    this.#publish("batch.completed", job, {
      status,
      successful: result.successful,
      failed: result.failed,
      duplicates: result.duplicates,
      total_submitted: job.total_submitted,
    });
  }

  /** Back to the queue at once (shutdown), keeping the progress for the status endpoint. */
  async #release(job: BatchJob, reason: string, run?: Run): Promise<void> {
    await this.#finish(job, {
      status: "queued",
      ...(run ? counts(run) : {}),
      run_after: this.#o.clock.now(),
      last_error: reason,
    });
  }

  async #finish(job: BatchJob, change: Parameters<Store["finishBatchJob"]>[2]): Promise<boolean> {
    try {
      const ok = await this.#o.store.finishBatchJob(
        job.id,
        this.#o.instanceId,
        change,
        this.#o.clock.now(),
      );
      if (!ok) this.#o.logger.info("batch job lease lost before its end", { job_id: job.id });
      return ok;
    } catch (error) {
      // The lease runs out and another attempt (here or elsewhere) recognises this one's work.
      this.#o.logger.warn("batch job end not recorded; it will run again", {
        job_id: job.id,
        error,
      });
      return false;
    }
  }

  #publish(type: "batch.progress" | "batch.completed", job: BatchJob, data: object): void {
    this.#o.bus.publish([{ type, data: { job_id: job.id, user_id: job.user_id, ...data } }])
      .catch((error) => this.#o.logger.debug("batch event not published", { error }));
  }

  async #refreshCounts(): Promise<void> {
    try {
      const counts = await this.#o.store.countBatchJobs();
      for (const status of STATUSES) {
        this.#o.metrics.set("batch_jobs", { status }, counts[status] ?? 0);
      }
    } catch (error) {
      this.#o.logger.debug("batch job count failed", { error });
    }
  }

  async #purge(): Promise<void> {
    try {
      const purged = await this.#o.store.purgeBatchJobs(
        this.#o.clock.now() - this.#o.retentionMs,
      );
      if (purged > 0) this.#o.logger.info("batch jobs purged", { purged });
    } catch (error) {
      this.#o.logger.debug("batch job purge failed", { error });
    }
  }
}

/** Whether a job has reached an end (no runner will touch it again unless retried). */
export function isFinished(status: BatchStatus): boolean {
  return status === "completed" || status === "failed" || status === "dead";
}

function countsOnly(run: Run): { successful: number; failed: number; duplicates: number } {
  return { successful: run.successful, failed: run.failed, duplicates: run.duplicates };
}

function counts(run: Run) {
  return { ...countsOnly(run), errors: sortedErrors(run) };
}

function sortedErrors(run: Run): BatchItemError[] {
  return [...run.errors].sort((a, b) => a.index - b.index);
}

function meterIdOf(raw: unknown): string | null {
  const id = (raw as { meter_id?: unknown } | null)?.meter_id;
  return typeof id === "string" && id.length <= 64 ? id : null;
}

/** The reading as the actor takes it, when it has a submission's shape; else `null`. */
function asSubmission(raw: unknown): ReadingSubmission | null {
  if (raw === null || typeof raw !== "object" || Array.isArray(raw)) return null;
  const r = raw as Record<string, unknown>;
  for (const k in r) if (!SUBMISSION_KEYS.has(k)) return null;
  const kwh = typeof r.kwh_amount;
  if (
    typeof r.meter_id !== "string" || typeof r.reading_timestamp !== "string" ||
    typeof r.device_signature !== "string" || (kwh !== "string" && kwh !== "number") ||
    (r.key_id !== undefined && typeof r.key_id !== "string")
  ) return null;
  return r as unknown as ReadingSubmission;
}

const SUBMISSION_KEYS = new Set([
  "meter_id",
  "kwh_amount",
  "reading_timestamp",
  "key_id",
  "device_signature",
]);

/** Resolves at the start of a later task (after pending I/O and timers), without a 1 ms timer. */
function nextTask(): Promise<void> {
  return new Promise((resolve) => setImmediate(resolve));
}

/** Resolves after `ms` or when `early` settles, whichever comes first; leaves no timer behind. */
function pause(ms: number, early?: Promise<unknown>): Promise<void> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<void>((resolve) => timer = setTimeout(resolve, ms));
  const settle = early ? Promise.race([timeout, early.then(() => {}, () => {})]) : timeout;
  return settle.finally(() => clearTimeout(timer));
}
