import type { Context, MiddlewareHandler } from "hono";
import { GatewayError } from "../core/errors.ts";

/** Bytes of request bodies held at once, over all requests: the memory a flood of uploads gets. */
export class BodyBudget {
  readonly capacity: number;
  #used = 0;

  constructor(capacity: number) {
    this.capacity = capacity;
  }

  /** Bytes reserved now. */
  get used(): number {
    return this.#used;
  }

  /** Reserves `bytes`; `false` when that would exceed the capacity. */
  tryReserve(bytes: number): boolean {
    if (this.#used + bytes > this.capacity) return false;
    this.#used += bytes;
    return true;
  }

  /** Returns bytes reserved before. */
  release(bytes: number): void {
    this.#used = Math.max(0, this.#used - bytes);
  }
}

/** Options of {@linkcode boundedBody}. */
export interface BoundedBodyOptions {
  /** The largest body this request may send, in bytes. */
  limitOf: (c: Context) => number;
  budget: BodyBudget;
}

const tooLarge = (limit: number) =>
  new GatewayError("payload_too_large", `Request body exceeds ${limit} bytes`);

/**
 * Reads the request body under a size limit and a global byte budget, checks it is UTF-8 (before
 * JSON parsing silently mangles it) and keeps it for the handlers. A `Content-Length` over the
 * limit is refused before a byte is read; a body without one is counted while it streams in.
 * The reservation lasts until the response, since the handler holds the body that long.
 */
export function boundedBody(options: BoundedBodyOptions): MiddlewareHandler {
  return async function boundedBody(c, next) {
    const raw = c.req.raw;
    if (raw.body === null || c.req.method === "GET" || c.req.method === "HEAD") return next();
    const limit = options.limitOf(c);
    // With Transfer-Encoding the HTTP stack reads chunks and ignores Content-Length: so does the
    // reservation (a small declared length must not let a large chunked body past the budget).
    const declared = c.req.header("transfer-encoding") === undefined
      ? c.req.header("content-length")
      : undefined;
    let length: number | undefined;
    if (declared !== undefined) {
      if (!/^\d+$/.test(declared.trim())) {
        throw new GatewayError("invalid_payload", "Content-Length is not a number");
      }
      length = Number(declared);
      if (length > limit) throw tooLarge(limit);
    }
    const reserved = length ?? limit;
    if (!options.budget.tryReserve(reserved)) {
      throw new GatewayError(
        "overloaded",
        "Too many request bodies are being received; retry shortly",
        { retryAfter: 1 },
      );
    }
    try {
      // Hono keeps the body promise of each reader in bodyCache (typed as the value).
      const cache = c.req.bodyCache as Record<string, Promise<unknown>>;
      cache.text = Promise.resolve(await readText(raw.body, limit));
      await next();
    } finally {
      options.budget.release(reserved);
    }
  };
}

/** Reads a body stream as strict UTF-8, failing with 413 as soon as it passes `limit` bytes. */
async function readText(body: ReadableStream<Uint8Array>, limit: number): Promise<string> {
  const decoder = new TextDecoder("utf-8", { fatal: true });
  const reader = body.getReader();
  let received = 0;
  let text = "";
  try {
    for (;;) {
      const { value, done } = await reader.read().catch((error) => {
        // A malformed chunk or a peer that went away mid-body: the request's fault, not ours.
        throw new GatewayError("invalid_payload", "The request body could not be read", {
          cause: error,
        });
      });
      if (done) break;
      received += value.byteLength;
      if (received > limit) throw tooLarge(limit);
      text += utf8(decoder, value);
    }
    return text + utf8(decoder);
  } catch (error) {
    // Stop receiving the rest; the HTTP stack closes the connection after the error response.
    await reader.cancel().catch(() => {});
    throw error;
  } finally {
    reader.releaseLock();
  }
}

function utf8(decoder: TextDecoder, chunk?: Uint8Array): string {
  try {
    return chunk ? decoder.decode(chunk, { stream: true }) : decoder.decode();
  } catch {
    throw new GatewayError("invalid_payload", "Request body is not valid UTF-8");
  }
}
