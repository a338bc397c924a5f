// Which MQTT client ids a meter may use on the embedded broker. A client id names a session; if
// any device could pick any id, one tenant's device could take over another meter's session
// (aedes disconnects the older connection with the same id and hands the new one its queue).

/** Characters allowed after `<meter_id>/`. */
const SUFFIX = /^[A-Za-z0-9._:-]{1,32}$/;

/**
 * Whether `clientId` belongs to `meterId`: exactly the meter id, or `<meter_id>/<suffix>` with a
 * suffix of 1–32 characters `[A-Za-z0-9._:-]`. `/` never occurs in a meter id, so `meter-1/a`
 * cannot be claimed by `meter-10`, nor `meter-10` by `meter-1`.
 */
export function clientIdBelongsTo(clientId: string, meterId: string): boolean {
  if (clientId === meterId) return true;
  if (clientId.length <= meterId.length + 1 || !clientId.startsWith(meterId)) return false;
  return clientId[meterId.length] === "/" && SUFFIX.test(clientId.slice(meterId.length + 1));
}
