/** Log severities, lowest first. */
export type LogLevel = "debug" | "info" | "warn" | "error";

const RANK: Record<LogLevel, number> = { debug: 10, info: 20, warn: 30, error: 40 };

/** Structured logger: one JSON object per line. */
export interface Logger {
  debug(msg: string, fields?: Record<string, unknown>): void;
  info(msg: string, fields?: Record<string, unknown>): void;
  warn(msg: string, fields?: Record<string, unknown>): void;
  error(msg: string, fields?: Record<string, unknown>): void;
}

/** A JSON-lines logger writing to `sink` (stdout by default). */
export function jsonLogger(
  level: LogLevel,
  options: { sink?: (line: string) => void; base?: Record<string, unknown> } = {},
): Logger {
  const sink = options.sink ?? ((line: string) => console.log(line));
  const min = RANK[level];
  const emit = (lvl: LogLevel) => (msg: string, fields?: Record<string, unknown>) => {
    if (RANK[lvl] < min) return;
    const err = fields?.error instanceof Error
      ? { error: { name: fields.error.name, message: fields.error.message } }
      : {};
    sink(
      JSON.stringify({
        ts: new Date().toISOString(),
        level: lvl,
        msg,
        ...options.base,
        ...fields,
        ...err,
      }),
    );
  };
  return { debug: emit("debug"), info: emit("info"), warn: emit("warn"), error: emit("error") };
}

/** A logger that drops everything; for tests. */
export const silentLogger: Logger = jsonLogger("error", { sink: () => {} });
