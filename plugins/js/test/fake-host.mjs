// A fake of the host interface `owlery:plugin/host@0.2.1`, shaped as componentize-js gives it
// to a guest: `now()` a BigInt, `stateGet` a Uint8Array or undefined, `stateScan` an array of
// [key, Uint8Array], and an `err` result thrown as an error carrying the string as `payload`.
// `begin()`/`commit()`/`abort()` buffer the writes of one call like the host does.

export const committed = new Map();
let pending = null;
export const out = { logs: [], broadcasts: [], publishes: [], http: [] };
export const refuse = { broadcast: null, publish: null, http: null };

export function reset() {
  committed.clear();
  pending = null;
  out.logs.length = 0;
  out.broadcasts.length = 0;
  out.publishes.length = 0;
  out.http.length = 0;
  refuse.broadcast = refuse.publish = refuse.http = null;
}
export function begin() {
  pending = new Map();
}
export function commit() {
  for (const [k, v] of pending ?? []) v === null ? committed.delete(k) : committed.set(k, v);
  pending = null;
}
export function abort() {
  pending = null;
}
export function json(key) {
  const v = committed.get(key);
  return v === undefined ? undefined : JSON.parse(new TextDecoder().decode(v));
}

const read = (k) => (pending?.has(k) ? pending.get(k) : committed.get(k));
class ComponentError extends Error {
  constructor(payload) {
    super(payload);
    Object.defineProperty(this, 'payload', { value: payload });
  }
}
const LEVELS = ['trace', 'debug', 'info', 'warn', 'error'];

export function log(level, message) {
  if (!LEVELS.includes(level)) throw new TypeError(`"${level}" is not one of the cases of log-level`);
  if (typeof message !== 'string') throw new TypeError('expected a string');
  out.logs.push([level, message]);
}
export function now() {
  return BigInt(Date.now());
}
export function stateGet(key) {
  const v = read(key);
  return v == null ? undefined : new Uint8Array(v);
}
export function stateSet(key, value) {
  if (typeof key !== 'string' || !(value instanceof Uint8Array)) throw new TypeError('state-set takes a string and a Uint8Array');
  (pending ?? committed).set(key, Uint8Array.from(value));
}
export function stateDelete(key) {
  if (pending) pending.set(key, null);
  else committed.delete(key);
}
export function stateScan(prefix) {
  const keys = new Set([...committed.keys(), ...(pending?.keys() ?? [])]);
  return [...keys]
    .filter((k) => k.startsWith(prefix) && read(k) != null)
    .sort()
    .map((k) => [k, new Uint8Array(read(k))]);
}
export function broadcast(cause, room, payload) {
  if (refuse.broadcast) throw new ComponentError(refuse.broadcast);
  JSON.parse(payload);
  out.broadcasts.push([cause, room, payload]);
}
export function publish(cause, eventType, data) {
  if (refuse.publish) throw new ComponentError(refuse.publish);
  JSON.parse(data);
  out.publishes.push([cause, eventType, data]);
}
export function sendHttp(cause, request) {
  if (refuse.http) throw new ComponentError(refuse.http);
  if (!(request.body instanceof Uint8Array)) throw new TypeError('body must be a Uint8Array');
  out.http.push([cause, request]);
}

/** Call an export as the host would: its writes count only if it returned `ok`. */
export async function call(fn, ...args) {
  begin();
  const result = await fn(...args);
  if (result?.tag === 'ok') commit();
  else abort();
  return result;
}
