// Shared flag handling of the `deno task` commands: strict parsing, --help, usage errors.
import { parseArgs, type ParseArgsOptionsConfig } from "node:util";
import { METER_ID_PATTERN } from "../core/reading.ts";

/** Exit code of a usage or input error (bad flag, bad value, malformed file). */
export const EXIT_USAGE = 2;

const HELP = { help: { type: "boolean", short: "h" } } as const;

/** What a command accepts: its `node:util` parseArgs options and the usage text for --help. */
export interface CommandSpec<T extends ParseArgsOptionsConfig> {
  usage: string;
  options: T;
}

/**
 * Parses `args` strictly against `spec.options` (plus `--help`/`-h`).
 *
 * `--help` prints the usage and exits 0; an unknown flag, a missing value or a positional argument
 * prints the problem and the usage to stderr and exits 2.
 */
export function parseFlags<const T extends ParseArgsOptionsConfig>(
  args: string[],
  spec: CommandSpec<T>,
) {
  const usage = spec.usage;
  const values = parse(args, { usage, options: { ...spec.options, ...HELP } });
  if ((values as { help?: boolean }).help) {
    console.log(usage);
    Deno.exit(0);
  }
  return values;
}

function parse<const T extends ParseArgsOptionsConfig>(args: string[], spec: CommandSpec<T>) {
  try {
    return parseArgs({ args, options: spec.options, strict: true, allowPositionals: false })
      .values;
  } catch (error) {
    // node:util reports every parse problem with an ERR_PARSE_ARGS_* code; anything else is a bug.
    const code = (error as { code?: unknown }).code;
    if (typeof code !== "string" || !code.startsWith("ERR_PARSE_ARGS_")) throw error;
    console.error(`error: ${(error as Error).message}\n\n${spec.usage}`);
    Deno.exit(EXIT_USAGE);
  }
}

/** Prints `error: <message>` to stderr and exits with code 2 (bad usage or input). */
export function fatal(message: string): never {
  console.error(`error: ${message}`);
  Deno.exit(EXIT_USAGE);
}

/** Returns the value of a required flag, or exits 2 naming the missing `--flag`. */
export function required(value: string | undefined, flag: string): string {
  if (value === undefined || value === "") fatal(`Missing --${flag} (see --help)`);
  return value;
}

/** The required `--meter` flag, checked against the meter id rule; exits 2 when missing or bad. */
export function requiredMeterId(value: string | undefined): string {
  const meterId = required(value, "meter");
  if (!METER_ID_PATTERN.test(meterId)) {
    fatal(`--meter "${meterId}" must be 1-64 characters of A-Z a-z 0-9 . _ : -, not only dots`);
  }
  return meterId;
}

/** An environment variable, with empty treated as unset (so `VAR= deno task …` clears it). */
export function env(name: string): string | undefined {
  const value = Deno.env.get(name);
  return value === "" ? undefined : value;
}

/** A flag value, or the trimmed contents of a file when written `@path` (for PEM keys). */
export function valueOrFile(value: string, flag: string): string {
  if (!value.startsWith("@")) return value;
  const path = value.slice(1);
  try {
    return Deno.readTextFileSync(path).trim();
  } catch (error) {
    fatal(`Cannot read --${flag} file "${path}": ${(error as Error).message}`);
  }
}
