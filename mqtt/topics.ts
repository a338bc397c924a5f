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
