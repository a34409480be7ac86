// The JavaScript guest SDK for Owlery plugins (an ES module), over the imports of the world
// `plugin` of `owlery:plugin@0.2.1` (wit/owlery.wit). Built into a component by
// `node sdk/build.mjs src/plugin.js NAME.wasm` (componentize-js).
//
//   import { definePlugin, state, broadcast, dataOf } from '../sdk/owlery.js';
//
//   export const { init, handle, query } = definePlugin({
//     handleEvent(event, index) {
//       const n = (state.getJson('n') ?? 0) + 1;
//       state.setJson('n', n);
//       broadcast(event.eventId, 'all', { type: event.eventType, data: dataOf(event) });
//     },
//     query(request) { return { n: state.getJson('n') ?? 0 }; },
//   });
//
// How the WIT types look in JavaScript (componentize-js 0.23.0): strings are strings,
// `u32` a number, `u64` a BigInt (`envelope.offset`; `now()` here converts), `option<T>` is T
// or undefined, `list<u8>` a Uint8Array, records are objects with camelCase fields, enums the
// kebab-case strings, `tuple` an array. An export returning `result<T, E>` may return T (ok),
// return `{tag: 'ok' | 'err', val}`, or throw: the thrown value itself (or its own `payload`
// property) is then the `err` payload, and the instance traps if it does not fit E (an Error
// thrown where E is `string`, a string thrown from `handle`). An import returning
// `result<_, string>` returns on ok and throws an error whose `payload` is the string.
// `definePlugin` returns tagged results only, so a plugin made with it never traps that way.

import {
  log as hostLog,
  now as hostNow,
  stateGet,
  stateSet,
  stateDelete,
  stateScan,
  broadcast as hostBroadcast,
  publish as hostPublish,
  sendHttp as hostSendHttp,
} from 'owlery:plugin/host@0.2.1';

/** The plugin contract this SDK was written for (the package of sdk/wit/owlery.wit). */
export const CONTRACT = 'owlery:plugin@0.2.1';

const encoder = new TextEncoder();
const decoder = new TextDecoder();

/** JSON.stringify that writes BigInts (an envelope's `offset`) as numbers (strings past 2^53). */
export function toJson(value) {
  return JSON.stringify(value, (_key, v) =>
    typeof v === 'bigint' ? (v <= BigInt(Number.MAX_SAFE_INTEGER) && v >= -BigInt(Number.MAX_SAFE_INTEGER) ? Number(v) : v.toString()) : v,
  );
}

function parseJson(text, fallback) {
  try {
    return JSON.parse(text);
  } catch {
    return fallback;
  }
}

function bytesOf(value) {
  if (value instanceof Uint8Array) return value;
  if (typeof value === 'string') return encoder.encode(value);
  if (value instanceof ArrayBuffer) return new Uint8Array(value);
  if (ArrayBuffer.isView(value)) return new Uint8Array(value.buffer, value.byteOffset, value.byteLength);
  throw new TypeError('state value must be a Uint8Array, an ArrayBuffer or a string');
}

/** A host call's `err` (componentize-js throws it with the payload on `.payload`) as an Error. */
function hostError(what, e) {
  return new Error(`${what}: ${messageOf(e)}`);
}

/** The plugin's own key space. Every write is committed with the batch, or not at all. */
export const state = {
  /** The value of `key` (bytes), or undefined. Sees the writes of the current batch. */
  get(key) {
    return stateGet(key);
  },
  /** Set `key` to `value` (a Uint8Array; a string is stored as UTF-8). */
  set(key, value) {
    stateSet(key, bytesOf(value));
  },
  delete(key) {
    stateDelete(key);
  },
  /** Every `[key, bytes]` whose key starts with `prefix`, in key order. */
  scan(prefix) {
    return stateScan(prefix);
  },
  /** The value of `key` parsed as JSON; `fallback` (default undefined) when missing or unreadable. */
  getJson(key, fallback = undefined) {
    const bytes = stateGet(key);
    return bytes === undefined ? fallback : parseJson(decoder.decode(bytes), fallback);
  },
  /** Store `value` as JSON under `key`. */
  setJson(key, value) {
    stateSet(key, encoder.encode(toJson(value)));
  },
  /** Every `[key, value]` whose key starts with `prefix`, values parsed as JSON (unreadable ones left out). */
  scanJson(prefix) {
    const out = [];
    for (const [key, bytes] of stateScan(prefix)) {
      const value = parseJson(decoder.decode(bytes), undefined);
      if (value !== undefined) out.push([key, value]);
    }
    return out;
  },
};

/**
 * Send `payload` (JSON-stringified) to every WebSocket client in `room`, because of the event
 * whose id is `cause` (its `eventId`). Needs `broadcast = true` in the manifest. Throws an
 * Error with the host's message when refused.
 */
export function broadcast(cause, room, payload) {
  try {
    hostBroadcast(cause, room, toJson(payload));
  } catch (e) {
    throw hostError('broadcast', e);
  }
}

/**
 * Publish a new event of `eventType` with `data` (JSON-stringified), caused by the event whose id
 * is `cause`. Needs the event type in the manifest's `publish` list. Throws an Error when refused.
 */
export function publish(cause, eventType, data) {
  try {
    hostPublish(cause, eventType, toJson(data));
  } catch (e) {
    throw hostError('publish', e);
  }
}

/**
 * Ask the host to send an HTTP request because of the event whose `eventId` is `cause`:
 * `{method, url, headers, body}`, headers an object or `[name, value]` pairs, body a string,
 * bytes, or anything else sent as JSON (then with `content-type: application/json` unless
 * given). Committed with the batch and sent after it, at least once, with an
 * `Idempotency-Key` header; the URL must be allowed by the manifest's `[capabilities] http`.
 */
export function sendHttp(cause, { method = 'POST', url, headers = {}, body = new Uint8Array() }) {
  const pairs = Array.isArray(headers) ? headers.map(([n, v]) => [String(n), String(v)]) : Object.entries(headers).map(([n, v]) => [n, String(v)]);
  let bytes;
  if (body instanceof Uint8Array || typeof body === 'string' || body instanceof ArrayBuffer || ArrayBuffer.isView(body)) {
    bytes = bytesOf(body);
  } else {
    bytes = encoder.encode(toJson(body));
    if (!pairs.some(([n]) => n.toLowerCase() === 'content-type')) pairs.push(['content-type', 'application/json']);
  }
  try {
    hostSendHttp(cause, { method, url, headers: pairs, body: bytes });
  } catch (e) {
    throw hostError('sendHttp', e);
  }
}

/** Log lines through the host, tagged with the plugin's name. */
export const log = {
  trace: (message) => hostLog('trace', String(message)),
  debug: (message) => hostLog('debug', String(message)),
  info: (message) => hostLog('info', String(message)),
  warn: (message) => hostLog('warn', String(message)),
  error: (message) => hostLog('error', String(message)),
};

/**
 * Wall-clock milliseconds since the Unix epoch (a number). Never store anything derived from
 * it: a replay must rebuild the same state, so take time from `event.timestamp`.
 */
export function now() {
  return Number(hostNow());
}

/** An envelope's `data` parsed as JSON (null if it does not parse, which the host prevents). */
export function dataOf(event) {
  return parseJson(event.data, null);
}

/** An envelope's `metadata` parsed as JSON (`{}` if it does not parse). */
export function metadataOf(event) {
  return parseJson(event.metadata, {});
}

/** The envelope as the JSON object producers sent (what `ws-broadcast` sends by default). */
export function envelopeOf(event) {
  return {
    eventId: event.eventId,
    eventType: event.eventType,
    timestamp: event.timestamp,
    source: event.source,
    userId: event.userId ?? null,
    metadata: metadataOf(event),
    data: dataOf(event),
  };
}

/** Throw from `handle` to fail the batch, naming the event (`index` in the batch) that caused it. */
export class HandleError extends Error {
  constructor(index, message) {
    super(message);
    this.name = 'HandleError';
    this.index = index === undefined || index === null ? undefined : index;
  }
}

// The bindings run in a realm of their own, so their errors (a host call's err, a TypeError
// for a value of the wrong type) are not `instanceof Error` here: look at the fields.
function messageOf(e) {
  if (typeof e === 'string') return e;
  if (e && typeof e === 'object' && Object.prototype.hasOwnProperty.call(e, 'payload')) return messageOf(e.payload);
  if (e && typeof e.message === 'string') return e.message || String(e);
  try {
    return toJson(e) ?? String(e);
  } catch {
    return String(e);
  }
}

function validIndex(i) {
  return Number.isInteger(i) && i >= 0 && i <= 0xffffffff ? i : undefined;
}

function handleErrorOf(e, index) {
  if (e instanceof HandleError) return { index: validIndex(e.index ?? index), message: e.message };
  return { index: validIndex(index), message: messageOf(e) };
}

const isThenable = (v) => v !== null && (typeof v === 'object' || typeof v === 'function') && typeof v.then === 'function';

// Run `f` (sync or async); `ok(value)` or `err(e)` give the tagged result componentize-js
// writes back. Tagged results never trap, whatever was thrown.
function settle(f, ok, err) {
  let value;
  try {
    value = f();
  } catch (e) {
    return { tag: 'err', val: err(e) };
  }
  if (isThenable(value)) {
    return Promise.resolve(value).then(
      (v) => {
        try {
          return { tag: 'ok', val: ok(v) };
        } catch (e) {
          return { tag: 'err', val: err(e) };
        }
      },
      (e) => ({ tag: 'err', val: err(e) }),
    );
  }
  try {
    return { tag: 'ok', val: ok(value) };
  } catch (e) {
    return { tag: 'err', val: err(e) };
  }
}

/**
 * Make the three exports of the world from plain functions (each may be async):
 *
 * - `init(config, rawConfig)`: `config` is the manifest's `[config]` table, parsed. Throw to fail.
 * - `handle(batch)`: the batch (Envelope[]); throw `new HandleError(index, message)` to fail it
 *   naming the event, anything else fails it without an index.
 * - or `handleEvent(event, index, batch)`: called for each event in order; whatever it throws
 *   fails the batch at that event's index.
 * - `query(request, rawRequest)`: `request` is the HTTP query string as an object. Return a value
 *   (sent as JSON) or a string (sent as it is: it must be JSON). Throw to answer an error.
 *
 * Use: `export const { init, handle, query } = definePlugin({ ... });`
 */
export function definePlugin(plugin) {
  if (!plugin || (typeof plugin.handle !== 'function' && typeof plugin.handleEvent !== 'function')) {
    throw new TypeError('definePlugin: give `handle(batch)` or `handleEvent(event, index, batch)`');
  }
  const userInit = plugin.init;
  const userHandle = plugin.handle;
  const userHandleEvent = plugin.handleEvent;
  const userQuery = plugin.query;

  function init(config) {
    return settle(
      () => (userInit ? userInit(parseJson(config, {}), config) : undefined),
      () => undefined,
      messageOf,
    );
  }

  function handle(batch) {
    if (userHandle) {
      return settle(() => userHandle(batch), () => undefined, (e) => handleErrorOf(e, undefined));
    }
    let index = 0;
    const step = () => {
      for (; index < batch.length; index++) {
        const r = userHandleEvent(batch[index], index, batch);
        if (isThenable(r)) {
          return Promise.resolve(r).then(() => {
            index++;
            return step();
          });
        }
      }
      return undefined;
    };
    return settle(step, () => undefined, (e) => handleErrorOf(e, index));
  }

  function query(request) {
    return settle(
      () => (userQuery ? userQuery(parseJson(request, {}), request) : {}),
      (v) => (typeof v === 'string' ? v : (toJson(v === undefined ? null : v) ?? 'null')),
      messageOf,
    );
  }

  return { init, handle, query };
}
