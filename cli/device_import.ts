// `deno task device:import`: bulk provisioning from a CSV; the issued secrets go to a 0600 CSV.
import { METER_ID_PATTERN } from "../core/reading.ts";
import { parseEd25519PublicKey } from "../core/signature.ts";
import { env, fatal, parseFlags, required } from "./_args.ts";
import {
  ApiError,
  CONNECTION_OPTIONS,
  CONNECTION_USAGE,
  EXIT_FAILURE,
  type GatewayClient,
  GatewayUnreachableError,
  withGateway,
} from "./_client.ts";

/** Devices per request; one request per chunk keeps the per-address registration limit happy. */
const CHUNK_DEVICES = 1000;
/** The gateway's default HTTP_BODY_LIMIT; chunks are also cut to fit it. */
const DEFAULT_BODY_LIMIT = 64 * 1024;
/** Registering 1,000 devices takes a while on a busy store; a timeout leaves their fate unknown. */
const CHUNK_TIMEOUT_MS = 300_000;
const MAX_RATE_LIMIT_WAITS = 10;
const MAX_PROBLEMS_SHOWN = 20;

const COLUMNS = ["meter_id", "user_id", "algorithm", "public_key"];
const REQUIRED_COLUMNS = ["meter_id", "user_id"];
const ALGORITHMS = ["hmac-sha256", "ed25519"] as const;
const OUT_HEADER = ["meter_id", "key_id", "algorithm", "secret_hex", "error_code", "error_message"];

const USAGE = `Usage: deno task device:import --in devices.csv --out secrets.csv [--force]

Registers many meters at once. The input CSV has the header
  meter_id,user_id[,algorithm][,public_key]
(algorithm defaults to hmac-sha256; ed25519 rows need public_key: hex, base64url or a quoted PEM).
The whole file is checked first; if any line is bad, nothing is registered.

Devices are sent in chunks of up to ${CHUNK_DEVICES} (one request each). The output CSV
  meter_id,key_id,algorithm,secret_hex,error_code,error_message
has one row per device, is created with mode 0600, and holds the only copy of the HMAC secrets:
move them to the meters, then delete it. Exits 1 when any device failed (see error_code).

Options:
  --in FILE              Input CSV
  --out FILE             Output CSV for keys, secrets and errors (must not exist)
  --force                Overwrite --out if it exists
  -h, --help             Show this help

${CONNECTION_USAGE}`;

/** One validated input row. */
interface DeviceRow {
  /** 1-based line of the row in the input file. */
  line: number;
  meter_id: string;
  user_id: string;
  algorithm: typeof ALGORITHMS[number];
  public_key?: string;
}

/** One entry of the import response. */
interface ImportResult {
  meter_id: string;
  key_id?: string;
  algorithm?: string;
  secret_hex?: string;
  error?: { code: string; message: string };
}

function main(args: string[]): Promise<void> {
  const flags = parseFlags(args, {
    usage: USAGE,
    options: {
      in: { type: "string" },
      out: { type: "string" },
      force: { type: "boolean", default: false },
      ...CONNECTION_OPTIONS,
    },
  });
  const inPath = required(flags.in, "in");
  const outPath = required(flags.out, "out");
  let text: string;
  try {
    text = Deno.readTextFileSync(inPath);
  } catch (error) {
    fatal(`Cannot read --in "${inPath}": ${(error as Error).message}`);
  }
  const devices = parseDevices(text, inPath);
  // Checked again atomically when the file is created; this early check only saves a login.
  if (!flags.force && exists(outPath)) fatal(refuseOverwrite(outPath));

  return withGateway(flags, async (client) => {
    const out = await SecretsFile.create(outPath, flags.force);
    let failure: unknown;
    try {
      failure = await importAll(client, devices, out);
    } finally {
      await out.close();
    }
    console.log(
      `Registered ${out.registered} device${out.registered === 1 ? "" : "s"}, ` +
        `${out.failed} failed.`,
    );
    console.log(
      out.secrets === 0 ? `Wrote ${outPath} (mode 0600).` : `Wrote ${outPath} (mode 0600). ` +
        `It holds the only copy of ${out.secrets} HMAC secret${out.secrets === 1 ? "" : "s"}: ` +
        "move them to the meters, then delete the file.",
    );
    if (failure !== undefined) throw failure;
    if (out.failed > 0) {
      console.error(`error: ${out.failed} device(s) failed; see error_code in ${outPath}`);
      Deno.exit(EXIT_FAILURE);
    }
  });
}

/**
 * Sends every chunk and writes each result; returns the error that stopped the import early
 * (after writing every device not known to be registered as a failed row), if any.
 */
async function importAll(
  client: GatewayClient,
  devices: DeviceRow[],
  out: SecretsFile,
): Promise<unknown> {
  const limit = Number(env("HTTP_BODY_LIMIT") ?? DEFAULT_BODY_LIMIT) || DEFAULT_BODY_LIMIT;
  const queue = chunk(devices, limit);
  const total = devices.length;
  const chunks = queue.length;
  let sent = 0;
  while (queue.length > 0) {
    const part = queue.shift()!;
    let results: ImportResult[];
    try {
      results = await sendChunk(client, part);
    } catch (error) {
      if (!(error instanceof ApiError || error instanceof GatewayUnreachableError)) throw error;
      const code = error instanceof ApiError ? error.code : "unreachable";
      // The body limit may be lower than assumed: split and retry (a rejected body did nothing).
      if (code === "payload_too_large" && part.length > 1) {
        const half = Math.ceil(part.length / 2);
        queue.unshift(part.slice(0, half), part.slice(half));
        continue;
      }
      if (code === "payload_too_large") {
        await out.failure(part[0].meter_id, code, error.message);
        continue;
      }
      for (const device of part) await out.failure(device.meter_id, code, error.message);
      for (const device of queue.flat()) {
        await out.failure(device.meter_id, "not_sent", "Not sent: the import stopped earlier");
      }
      return error;
    }
    await out.results(part, results);
    sent += part.length;
    if (chunks > 1) console.error(`Sent ${sent}/${total} devices`);
  }
  return undefined;
}

/** POSTs one chunk, waiting out the per-address registration limit when it answers 429. */
async function sendChunk(client: GatewayClient, part: DeviceRow[]): Promise<ImportResult[]> {
  const body = { devices: part.map(requestDevice) };
  for (let attempt = 1;; attempt++) {
    try {
      const res = await client.request<{ results: ImportResult[] }>(
        "POST",
        "/api/admin/devices/import",
        { body, timeoutMs: CHUNK_TIMEOUT_MS },
      );
      return res.results;
    } catch (error) {
      if (
        !(error instanceof ApiError) || error.code !== "rate_limited" ||
        attempt >= MAX_RATE_LIMIT_WAITS
      ) throw error;
      const seconds = error.retryAfter ?? 60;
      console.error(
        `Rate limited by the gateway (DEVICE_REGISTER_RATE_LIMIT); retrying in ${seconds} s`,
      );
      await new Promise((resolve) => setTimeout(resolve, seconds * 1000));
    }
  }
}

function requestDevice(row: DeviceRow) {
  return {
    meter_id: row.meter_id,
    user_id: row.user_id,
    algorithm: row.algorithm,
    ...(row.public_key === undefined ? {} : { public_key: row.public_key }),
  };
}

/** Splits rows into chunks of at most CHUNK_DEVICES devices and `maxBytes` of JSON body. */
function chunk(rows: DeviceRow[], maxBytes: number): DeviceRow[][] {
  const encoder = new TextEncoder();
  const overhead = '{"devices":[]}'.length;
  const chunks: DeviceRow[][] = [];
  let current: DeviceRow[] = [];
  let bytes = overhead;
  for (const row of rows) {
    const size = encoder.encode(JSON.stringify(requestDevice(row))).length + 1; // + comma
    if (current.length > 0 && (current.length >= CHUNK_DEVICES || bytes + size > maxBytes)) {
      chunks.push(current);
      current = [];
      bytes = overhead;
    }
    current.push(row);
    bytes += size;
  }
  if (current.length > 0) chunks.push(current);
  return chunks;
}

/** The output CSV: created 0600 before anything is sent, written as each chunk returns. */
class SecretsFile {
  registered = 0;
  failed = 0;
  /** HMAC secrets written (Ed25519 rows carry none). */
  secrets = 0;
  #file: Deno.FsFile;
  #encoder = new TextEncoder();

  private constructor(file: Deno.FsFile) {
    this.#file = file;
  }

  /** Creates (or with `force` truncates) the file with mode 0600 and writes the header. */
  static async create(path: string, force: boolean): Promise<SecretsFile> {
    let file: Deno.FsFile;
    try {
      file = await Deno.open(path, {
        write: true,
        create: true,
        createNew: !force,
        truncate: true,
        mode: 0o600,
      });
    } catch (error) {
      if (error instanceof Deno.errors.AlreadyExists) fatal(refuseOverwrite(path));
      fatal(`Cannot create --out "${path}": ${(error as Error).message}`);
    }
    // `mode` only applies to a new file; an overwritten one keeps its old, maybe wider, mode.
    if (Deno.build.os !== "windows") await Deno.chmod(path, 0o600);
    const out = new SecretsFile(file);
    await out.#write(OUT_HEADER);
    return out;
  }

  /** Writes the gateway's results of `part`, and a failed row for any device it left out. */
  async results(part: DeviceRow[], results: ImportResult[]): Promise<void> {
    const answered = new Set<string>();
    for (const r of results) {
      answered.add(r.meter_id);
      if (r.error || !r.key_id) {
        const code = r.error?.code ?? "bad_response";
        await this.failure(r.meter_id, code, r.error?.message ?? "The gateway returned no key");
      } else {
        this.registered++;
        if (r.secret_hex) this.secrets++;
        await this.#write([r.meter_id, r.key_id, r.algorithm ?? "", r.secret_hex ?? "", "", ""]);
      }
    }
    for (const device of part) {
      if (!answered.has(device.meter_id)) {
        await this.failure(device.meter_id, "bad_response", "The gateway returned no result");
      }
    }
    // The secrets exist nowhere else: get them onto the disk before sending the next chunk.
    await this.#file.syncData();
  }

  /** Writes a failed row. */
  async failure(meterId: string, code: string, message: string): Promise<void> {
    this.failed++;
    await this.#write([meterId, "", "", "", code, message]);
  }

  /** Flushes and closes the file. */
  async close(): Promise<void> {
    await this.#file.syncData();
    this.#file.close();
  }

  async #write(fields: string[]): Promise<void> {
    const bytes = this.#encoder.encode(fields.map(csvField).join(",") + "\n");
    let written = 0;
    while (written < bytes.length) written += await this.#file.write(bytes.subarray(written));
  }
}

function csvField(value: string): string {
  return /[",\r\n]/.test(value) ? `"${value.replaceAll('"', '""')}"` : value;
}

/** Parses and validates the input; prints every problem with its line and exits 2 if any. */
function parseDevices(text: string, path: string): DeviceRow[] {
  let records: CsvRecord[];
  try {
    records = parseCsv(text);
  } catch (error) {
    if (!(error instanceof CsvSyntaxError)) throw error;
    fatal(`${path}:${error.line}: ${error.message}; nothing was registered`);
  }
  records = records.filter((r) => !(r.fields.length === 1 && r.fields[0].trim() === ""));
  const expected = "meter_id,user_id[,algorithm][,public_key]";
  if (records.length === 0) fatal(`${path} is empty; expected the header ${expected}`);
  const [header, ...rows] = records;
  const names = header.fields.map((f) => f.trim().toLowerCase());
  const headerProblems = [
    ...names.filter((n) => !COLUMNS.includes(n)).map((n) => `unknown column "${n}"`),
    ...names.filter((n, i) => names.indexOf(n) !== i).map((n) => `column "${n}" repeats`),
    ...REQUIRED_COLUMNS.filter((n) => !names.includes(n)).map((n) => `missing column "${n}"`),
  ];
  if (headerProblems.length > 0) {
    fatal(
      `${path}:${header.line}: bad header: ${headerProblems.join("; ")} (expected ${expected})`,
    );
  }
  if (rows.length === 0) fatal(`${path} has a header but no devices`);

  const problems: string[] = [];
  const devices: DeviceRow[] = [];
  const firstLine = new Map<string, number>();
  for (const row of rows) {
    const at = `${path}:${row.line}`;
    if (row.fields.length !== names.length) {
      problems.push(
        `${at}: expected ${names.length} columns (${names.join(",")}), found ${row.fields.length}`,
      );
      continue;
    }
    const cell = (name: string) => {
      const i = names.indexOf(name);
      return i === -1 ? "" : row.fields[i].trim();
    };
    const rowProblems: string[] = [];
    const meterId = cell("meter_id");
    if (!METER_ID_PATTERN.test(meterId)) {
      rowProblems.push(`meter_id "${meterId}" must be 1-64 characters of A-Z a-z 0-9 . _ : -`);
    } else if (firstLine.has(meterId)) {
      rowProblems.push(`meter_id "${meterId}" repeats line ${firstLine.get(meterId)}`);
    } else {
      firstLine.set(meterId, row.line);
    }
    const userId = cell("user_id");
    if (userId === "") rowProblems.push("user_id is empty");
    else if (userId.length > 64) rowProblems.push(`user_id "${userId}" is longer than 64`);
    const algorithm = cell("algorithm") || "hmac-sha256";
    const publicKey = cell("public_key") || undefined;
    if (!(ALGORITHMS as readonly string[]).includes(algorithm)) {
      rowProblems.push(`algorithm "${algorithm}" must be hmac-sha256 or ed25519`);
    } else if (algorithm === "ed25519" && publicKey === undefined) {
      rowProblems.push("ed25519 needs a public_key");
    } else if (algorithm === "ed25519" && parseEd25519PublicKey(publicKey!) === null) {
      rowProblems.push(
        `public_key "${publicKey}" is not an Ed25519 public key (hex, base64url or PEM)`,
      );
    } else if (algorithm === "hmac-sha256" && publicKey !== undefined) {
      rowProblems.push("public_key must be empty for hmac-sha256 (the gateway makes the secret)");
    }
    if (rowProblems.length > 0) {
      problems.push(...rowProblems.map((p) => `${at}: ${p}`));
      continue;
    }
    devices.push({
      line: row.line,
      meter_id: meterId,
      user_id: userId,
      algorithm: algorithm as DeviceRow["algorithm"],
      ...(publicKey === undefined ? {} : { public_key: publicKey }),
    });
  }
  if (problems.length > 0) {
    for (const p of problems.slice(0, MAX_PROBLEMS_SHOWN)) console.error(`error: ${p}`);
    if (problems.length > MAX_PROBLEMS_SHOWN) {
      console.error(`… and ${problems.length - MAX_PROBLEMS_SHOWN} more`);
    }
    const s = problems.length === 1 ? "" : "s";
    fatal(`${path} has ${problems.length} problem${s}; nothing was registered`);
  }
  return devices;
}

/** A CSV record and the line it starts on (1-based). */
interface CsvRecord {
  line: number;
  fields: string[];
}

/** A CSV syntax error at a line. */
class CsvSyntaxError extends Error {
  readonly line: number;

  constructor(line: number, message: string) {
    super(message);
    this.name = "CsvSyntaxError";
    this.line = line;
  }
}

/** RFC 4180 CSV: quoted fields may hold commas, quotes (doubled) and newlines (PEM keys). */
function parseCsv(input: string): CsvRecord[] {
  const text = input.charCodeAt(0) === 0xfeff ? input.slice(1) : input; // Excel writes a BOM
  const records: CsvRecord[] = [];
  let fields: string[] = [];
  let field = "";
  let line = 1;
  let recordLine = 1;
  let quoted = false; // inside a quoted field
  let closed = false; // just after a quoted field's closing quote
  for (let i = 0; i < text.length; i++) {
    const ch = text[i];
    if (quoted) {
      if (ch === '"' && text[i + 1] === '"') {
        field += '"';
        i++;
      } else if (ch === '"') {
        quoted = false;
        closed = true;
      } else {
        if (ch === "\n") line++;
        field += ch;
      }
    } else if (ch === ",") {
      fields.push(field);
      field = "";
      closed = false;
    } else if (ch === "\n" || (ch === "\r" && text[i + 1] === "\n")) {
      if (ch === "\r") i++;
      fields.push(field);
      records.push({ line: recordLine, fields });
      fields = [];
      field = "";
      closed = false;
      recordLine = ++line;
    } else if (closed && (ch === " " || ch === "\t")) {
      continue; // spaces between a closing quote and the comma are harmless
    } else if (closed) {
      throw new CsvSyntaxError(line, `unexpected ${JSON.stringify(ch)} after a closing quote`);
    } else if (ch === '"') {
      if (field.trim() !== "") {
        throw new CsvSyntaxError(line, "a quote inside an unquoted field (quote the whole field)");
      }
      field = "";
      quoted = true;
    } else {
      field += ch;
    }
  }
  if (quoted) throw new CsvSyntaxError(recordLine, "a quoted field is never closed");
  if (field !== "" || fields.length > 0 || closed) {
    fields.push(field);
    records.push({ line: recordLine, fields });
  }
  return records;
}

function exists(path: string): boolean {
  try {
    Deno.lstatSync(path);
    return true;
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return false;
    throw error;
  }
}

function refuseOverwrite(path: string): string {
  return `--out "${path}" already exists (it may hold secrets of an earlier import); ` +
    "move it away or pass --force to overwrite it";
}

if (import.meta.main) await main(Deno.args);
