import type { Principal } from "./user.ts";

/** Whether `caller` may name a meter owned by `ownerId` (`undefined`: unknown meter). */
export function mayUseMeter(caller: Principal, ownerId: string | undefined): boolean {
  return caller.role === "admin" || (ownerId !== undefined && caller.user_id === ownerId);
}

/**
 * The one answer a non-admin gets for another user's meter and for an unknown one alike, so
 * that the API does not reveal which meter ids exist.
 */
export function notYourMeter(meterId: string): string {
  return `Meter "${meterId}" is not registered to your account`;
}
