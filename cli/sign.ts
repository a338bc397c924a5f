// `deno task sign`: the reference device signer (offline). Prints a signed reading as JSON.
import { Buffer } from "node:buffer";
import { createPrivateKey, type KeyObject, sign as signEd25519 } from "node:crypto";
import {
  CANONICAL_KWH,
  CANONICAL_TIMESTAMP,
  keyIdSchema,
  kwhSchema,
  readingTimestamp,
  rfc3339Schema,
} from "../core/reading.ts";
import { canonicalMessage, signHmac } from "../core/signature.ts";
import { fatal, parseFlags, requiredMeterId } from "./_args.ts";

const USAGE = `Usage: deno task sign --meter ID (--secret HEX | --ed25519-key FILE) [options]

Signs a meter reading the way a device must (DESIGN.md §4) and prints the JSON payload, ready for
POST /api/meters/submit-reading (or, with --mqtt, for the topic meters/<ID>/readings).
Works offline: no gateway needed.

Options:
  --meter ID              Meter id (1-64 characters of A-Z a-z 0-9 . _ : -)
  --secret HEX            The meter's HMAC-SHA256 secret: 64 hex characters, as shown at registration
  --ed25519-key FILE      Sign with Ed25519 using this PKCS#8 PEM private key instead of --secret
  --kwh DECIMAL           Energy in kWh, signed exactly as given (default 12.5); must be the
                          canonical form: shortest decimal, at most 4 decimals (12.5, 0.0001, 100)
  --timestamp RFC3339     Reading time, signed exactly as given (default now); must be the
                          canonical form: UTC, whole seconds, YYYY-MM-DDTHH:MM:SSZ

The gateway stores only readings signed over canonical values (it rejects others with
invalid_payload), so every stored reading can be re-verified from the fields the API shows.
  --key-id ID             Add key_id (needed while an old and a rotated key are both valid)
  --encoding hex|base64url  Signature encoding (default hex)
  --mqtt                  Print the MQTT payload (no meter_id; the topic carries it)
  -h, --help              Show this help

Example (the test vector of DESIGN.md §4):
  deno task sign --meter meter-1 --kwh 12.5 --timestamp 2026-11-29T10:15:00Z \\
    --secret 000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f`;

const OPTIONS = {
  meter: { type: "string" },
  secret: { type: "string" },
  "ed25519-key": { type: "string" },
  kwh: { type: "string", default: "12.5" },
  timestamp: { type: "string" },
  "key-id": { type: "string" },
  encoding: { type: "string", default: "hex" },
  mqtt: { type: "boolean", default: false },
} as const;

function main(args: string[]): void {
  const flags = parseFlags(args, { usage: USAGE, options: OPTIONS });
  const meterId = requiredMeterId(flags.meter);
  const kwh = flags.kwh;
  if (!kwhSchema.safeParse(kwh).success) fatal(`--kwh "${kwh}" is not a decimal number like 12.5`);
  if (!CANONICAL_KWH.test(kwh)) {
    const shortest = String(Number(kwh));
    fatal(
      `--kwh "${kwh}" is not in canonical form (shortest decimal, at most 4 decimals, no sign, ` +
        `exponent, leading or trailing zeros)` +
        (CANONICAL_KWH.test(shortest) ? `: sign "${shortest}"` : ""),
    );
  }
  const timestamp = flags.timestamp ?? nowWholeSeconds();
  if (!rfc3339Schema.safeParse(timestamp).success) {
    fatal(`--timestamp "${timestamp}" is not an RFC 3339 date-time like 2026-11-29T10:15:00Z`);
  }
  if (!CANONICAL_TIMESTAMP.test(timestamp)) {
    const ms = Date.parse(timestamp);
    fatal(
      `--timestamp "${timestamp}" is not in canonical form (UTC, whole seconds, ` +
        `YYYY-MM-DDTHH:MM:SSZ)` + (ms % 1000 === 0 ? `: sign "${readingTimestamp(ms)}"` : ""),
    );
  }
  const keyId = flags["key-id"];
  if (keyId !== undefined && !keyIdSchema.safeParse(keyId).success) {
    fatal(`--key-id "${keyId}" must be 1-64 characters of A-Z a-z 0-9 . _ : -`);
  }
  const encoding = flags.encoding;
  if (encoding !== "hex" && encoding !== "base64url") {
    fatal(`--encoding "${encoding}" must be hex or base64url`);
  }
  const sign = signer(flags.secret, flags["ed25519-key"]);

  const signature = sign(canonicalMessage(meterId, timestamp, kwh)).toString(encoding);
  const payload = {
    ...(flags.mqtt ? {} : { meter_id: meterId }),
    kwh_amount: kwh,
    reading_timestamp: timestamp,
    device_signature: signature,
    ...(keyId === undefined ? {} : { key_id: keyId }),
  };
  console.log(JSON.stringify(payload));
}

/** A signing function for whichever key the flags name (exactly one of the two). */
function signer(secret?: string, keyPath?: string): (message: string) => Buffer {
  if ((secret === undefined) === (keyPath === undefined)) {
    fatal("Pass exactly one of --secret HEX or --ed25519-key FILE (see --help)");
  }
  if (secret !== undefined) {
    // The value itself is never echoed: it is the device's secret.
    if (!/^[0-9a-fA-F]{64}$/.test(secret)) {
      fatal(`--secret must be 64 hex characters (32 bytes), got ${secret.length} characters`);
    }
    const bytes = Buffer.from(secret, "hex");
    return (message) => Buffer.from(signHmac(bytes, message), "hex");
  }
  const key = readEd25519Key(keyPath!);
  return (message) => signEd25519(null, Buffer.from(message), key);
}

function readEd25519Key(path: string): KeyObject {
  let pem: string;
  try {
    pem = Deno.readTextFileSync(path);
  } catch (error) {
    fatal(`Cannot read --ed25519-key "${path}": ${(error as Error).message}`);
  }
  let key: KeyObject;
  try {
    key = createPrivateKey(pem);
  } catch {
    fatal(`--ed25519-key "${path}" is not a PEM private key (expected PKCS#8 "BEGIN PRIVATE KEY")`);
  }
  if (key.asymmetricKeyType !== "ed25519") {
    fatal(`--ed25519-key "${path}" holds a ${key.asymmetricKeyType} key, not an Ed25519 one`);
  }
  return key;
}

function nowWholeSeconds(): string {
  return readingTimestamp(Math.floor(Date.now() / 1000) * 1000);
}

if (import.meta.main) main(Deno.args);
