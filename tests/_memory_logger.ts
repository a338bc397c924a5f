import type { Logger } from "../core/logger.ts";

/** One line a {@linkcode memoryLogger} kept. */
export interface LoggedEntry {
  level: string;
  msg: string;
  fields: Record<string, unknown>;
}

/** A logger that keeps its entries (every level, children included), for assertions. */
export function memoryLogger(): Logger & { entries: LoggedEntry[] } {
  const entries: LoggedEntry[] = [];
  const at = (level: string) => (msg: string, fields: Record<string, unknown> = {}) => {
    entries.push({ level, msg, fields });
  };
  const logger: ReturnType<typeof memoryLogger> = {
    entries,
    debug: at("debug"),
    info: at("info"),
    warn: at("warn"),
    error: at("error"),
    child: () => logger,
    enabled: () => true,
  };
  return logger;
}
