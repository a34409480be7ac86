// TypeScript declarations for sdk/owlery.js, the JavaScript guest SDK of Owlery
// (world `plugin` of `owlery:plugin@0.2.1`, sdk/wit/owlery.wit).

/** The plugin contract this SDK was written for. */
export const CONTRACT: 'owlery:plugin@0.2.1';

/** One event as read from the log (the WIT record `envelope`). */
export interface Envelope {
  /** UUID of the event, unique across the log. */
  eventId: string;
  /** Dotted type, e.g. `incident.created`. */
  eventType: string;
  /** RFC 3339 timestamp set by the producer (or the host on publish). */
  timestamp: string;
  /** Who produced the event, e.g. `api`. */
  source: string;
  /** The user the event concerns, if any. */
  userId?: string;
  /** JSON object, as text: read it with `metadataOf(event)`. */
  metadata: string;
  /** JSON value, as text: read it with `dataOf(event)`. */
  data: string;
  /** Where the event sits in the log. */
  topic: string;
  /** `u32`: a number. */
  partition: number;
  /** `u64`: a BigInt (`toJson` writes it as a number). */
  offset: bigint;
}

/** The envelope as producers sent it, parsed (what `envelopeOf` returns). */
export interface EnvelopeJson<D = unknown, M = Record<string, unknown>> {
  eventId: string;
  eventType: string;
  timestamp: string;
  source: string;
  userId: string | null;
  metadata: M;
  data: D;
}

/** The WIT record `handle-error`, as the host receives it. */
export interface HandleErrorRecord {
  index?: number;
  message: string;
}

/** The WIT enum `log-level`. */
export type LogLevel = 'trace' | 'debug' | 'info' | 'warn' | 'error';

/** The plugin's own key space. Every write is committed with the batch, or not at all. */
export declare const state: {
  /** The value of `key`, or undefined. Sees the writes of the current batch. */
  get(key: string): Uint8Array | undefined;
  /** Set `key` to `value` (a string is stored as UTF-8). */
  set(key: string, value: Uint8Array | ArrayBuffer | ArrayBufferView | string): void;
  delete(key: string): void;
  /** Every `[key, bytes]` whose key starts with `prefix`, in key order. */
  scan(prefix: string): Array<[string, Uint8Array]>;
  /** The value of `key` parsed as JSON; `fallback` when missing or unreadable. */
  getJson<T = unknown>(key: string): T | undefined;
  getJson<T = unknown>(key: string, fallback: T): T;
  /** Store `value` as JSON (BigInts as numbers). */
  setJson(key: string, value: unknown): void;
  /** Every `[key, value]` whose key starts with `prefix`, parsed as JSON (unreadable values left out). */
  scanJson<T = unknown>(prefix: string): Array<[string, T]>;
};

/**
 * Send `payload` (JSON-stringified) to every WebSocket client in `room`, because of the event
 * whose `eventId` is `cause`. Needs `broadcast = true` in the manifest. Throws an Error with the
 * host's message when refused.
 */
export declare function broadcast(cause: string, room: string, payload: unknown): void;

/**
 * Publish an event of `eventType` with `data` (JSON-stringified), caused by the event whose
 * `eventId` is `cause`. Needs the type in the manifest's `publish` list. Throws when refused.
 */
export declare function publish(cause: string, eventType: string, data: unknown): void;

/**
 * Ask the host to send an HTTP request because of the event whose `eventId` is `cause`.
 * A `body` that is not a string or bytes is sent as JSON (with `content-type:
 * application/json` unless given). Committed with the batch and sent after it, at least once,
 * with an `Idempotency-Key` header. The URL must be allowed by the manifest's
 * `[capabilities] http`. Throws an Error with the host's message when refused.
 */
export declare function sendHttp(
  cause: string,
  request: { method?: string; url: string; headers?: Record<string, string> | Array<[string, string]>; body?: unknown },
): void;

/** Log a line through the host, tagged with the plugin's name. */
export declare const log: {
  trace(message: unknown): void;
  debug(message: unknown): void;
  info(message: unknown): void;
  warn(message: unknown): void;
  error(message: unknown): void;
};

/** Wall-clock milliseconds since the Unix epoch. Never store anything derived from it. */
export declare function now(): number;

/** JSON.stringify that writes BigInts as numbers (as strings past 2^53). */
export declare function toJson(value: unknown): string;

/** An envelope's `data` parsed as JSON (null if it does not parse). */
export declare function dataOf<D = any>(event: Envelope): D;

/** An envelope's `metadata` parsed as JSON (`{}` if it does not parse). */
export declare function metadataOf<M = Record<string, any>>(event: Envelope): M;

/** The envelope as the JSON object producers sent (`metadata` and `data` parsed). */
export declare function envelopeOf<D = any, M = Record<string, any>>(event: Envelope): EnvelopeJson<D, M>;

/** Throw from `handle` to fail the batch, naming the event (`index` in the batch) that caused it. */
export declare class HandleError extends Error {
  constructor(index: number | undefined, message: string);
  index?: number;
}

type MaybePromise<T> = T | Promise<T>;

/** The functions `definePlugin` takes; each may be async. */
export interface PluginDefinition<Config = Record<string, any>, Request = Record<string, string>> {
  /** Once per instance, with the manifest's `[config]` table parsed (and as text). Throw to fail. */
  init?(config: Config, rawConfig: string): MaybePromise<void>;
  /** A batch, in log order per partition. Throw `new HandleError(index, message)` to fail it. */
  handle?(batch: Envelope[]): MaybePromise<void>;
  /** Instead of `handle`: each event in order; what it throws fails the batch at `index`. */
  handleEvent?(event: Envelope, index: number, batch: Envelope[]): MaybePromise<void>;
  /**
   * `GET /api/plugins/NAME/query`, with the query string as an object (and as text). Return a
   * value (sent as JSON) or a string (sent as it is: it must be JSON). Throw to answer an error.
   */
  query?(request: Request, rawRequest: string): MaybePromise<unknown>;
}

/** A WIT `result`, as componentize-js takes it from an export. */
export type Result<T, E> = { tag: 'ok'; val: T } | { tag: 'err'; val: E };

/** The three exports of the world. */
export interface PluginExports {
  init(config: string): MaybePromise<Result<void, string>>;
  handle(batch: Envelope[]): MaybePromise<Result<void, HandleErrorRecord>>;
  query(request: string): MaybePromise<Result<string, string>>;
}

/**
 * Make the exports from plain functions: `export const { init, handle, query } = definePlugin({...});`
 * Give `handle` or `handleEvent`. Every failure becomes the export's `err` (never a trap).
 */
export declare function definePlugin<Config = Record<string, any>, Request = Record<string, string>>(
  plugin: PluginDefinition<Config, Request>,
): PluginExports;
