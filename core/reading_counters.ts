import type { ReadingSource } from "./reading.ts";

/** What the intake edges report: readings received, and those refused before their actor. */
export interface ReadingCounters {
  /** `n` readings arrived (a publish, a request, a job's readings). */
  submitted(source: ReadingSource, n?: number): void;
  /** A reading refused for its content before it reached its actor (e.g. invalid JSON). */
  rejected(source: ReadingSource, code: string): void;
}
