import { METER_ID_PATTERN } from "../core/reading.ts";

/** Where a meter publishes readings. */
export function readingsTopic(meterId: string): string {
  return `meters/${meterId}/readings`;
}

/** Where the gateway answers each reading. */
export function acksTopic(meterId: string): string {
  return `meters/${meterId}/acks`;
}

/** The meter id of a readings topic, or `null` for any other topic. */
export function meterOfReadingsTopic(topic: string): string | null {
  const parts = topic.split("/");
  if (parts.length !== 3 || parts[0] !== "meters" || parts[2] !== "readings") return null;
  return METER_ID_PATTERN.test(parts[1]) ? parts[1] : null;
}

const PREFIX = [...new TextEncoder().encode("meters/")];
const SUFFIX = [...new TextEncoder().encode("/readings")];

/**
 * {@linkcode meterOfReadingsTopic} of a UTF-8 topic inside `bytes`, without decoding the whole
 * topic: it runs on every reading.
 */
export function meterOfReadingsTopicBytes(
  bytes: Uint8Array,
  start: number,
  end: number,
): string | null {
  const idStart = start + PREFIX.length;
  const idEnd = end - SUFFIX.length;
  if (idEnd <= idStart) return null;
  for (let i = 0; i < PREFIX.length; i++) if (bytes[start + i] !== PREFIX[i]) return null;
  for (let i = 0; i < SUFFIX.length; i++) if (bytes[idEnd + i] !== SUFFIX[i]) return null;
  let id = "";
  for (let i = idStart; i < idEnd; i++) {
    const c = bytes[i];
    if (c >= 0x80) return null; // meter ids are ASCII
    id += String.fromCharCode(c);
  }
  return METER_ID_PATTERN.test(id) ? id : null;
}
