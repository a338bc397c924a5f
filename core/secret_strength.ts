/**
 * Whether a secret looks random rather than typed: placeholders such as `aaaa…`,
 * `change-me-change-me-…` or a short pattern repeated fail. Counts the distinct n-grams
 * (characters of a string, bytes of a key): in a random secret nearly all differ, in a repeated
 * pattern only the pattern's own do.
 */
export function looksRandom(secret: string | Uint8Array): boolean {
  const units = typeof secret === "string" ? Array.from(secret) : Array.from(secret, String);
  // Trigrams for text (hex keeps ~16 symbols, so single characters say little); pairs for bytes.
  const n = typeof secret === "string" ? 3 : 2;
  const grams = units.length - n + 1;
  if (grams < 1 || new Set(units).size < MIN_DISTINCT) return false;
  const seen = new Set<string>();
  for (let i = 0; i < grams; i++) seen.add(units.slice(i, i + n).join("\u0000"));
  return seen.size >= MIN_DISTINCT_RATIO * grams;
}

/** Fewer distinct symbols than this is a placeholder (32 random bytes have ~31). */
const MIN_DISTINCT = 8;
/** Share of distinct n-grams below which a secret is mostly repetition. */
const MIN_DISTINCT_RATIO = 0.6;
