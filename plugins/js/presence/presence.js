// presence: who is online, per room, from the user.* events (and presence.connected /
// presence.disconnected). The shipped JavaScript plugin; built with
// `node sdk/build.mjs presence/presence.js presence.wasm`.
//
// One state key per user, `user/{userId}`:
//   {"rooms": [...], "connections": n, "lastSeen": "<event timestamp>",
//    "conns": [{"id": "<connectionId>", "n": 1, "rooms": [...]}, ...]}
// `rooms` and `connections` are derived from `conns`, one entry per open connection, so two
// tabs of one user work: the user is online, and in a room, while any connection is. Events
// without a `connectionId` (a producer's own user.* events, with only the envelope's `userId`
// and `data.room`) count on one shared entry with `id: null`, whose `n` counts connects minus
// disconnects. A user without connections keeps only `lastSeen`. Each record stays bounded:
// at most `max_connections_per_user` connections (the oldest is dropped past it),
// `max_rooms_per_connection` rooms each, room names of at most 256 characters, and under
// `max_record_bytes` of JSON (900,000 by default: the host takes 1 MiB per value), all
// settable in the manifest's [config]. Time comes only from event timestamps.
//
// GET /api/plugins/presence/query            {"rooms": {room: [userId...]}, "users": {userId: {rooms, connections}}}
//                              ?room=ROOM     {"room": ROOM, "users": [userId...]}
//                              ?user=USER     {"user": USER, "online", "rooms", "connections", "lastSeen"}
// (online users only, sorted).

import { definePlugin, state, dataOf, log, HandleError } from '../sdk/owlery.js';

const PREFIX = 'user/';
const MAX_KEY_BYTES = 1024; // the host's default limits.max_state_key_bytes
const MAX_ROOM_CHARS = 256;

const settings = {
  maxConnectionsPerUser: 32,
  maxRoomsPerConnection: 100, // the host's max_rooms_per_client
  maxRecordBytes: 900_000, // under the host's default 1 MiB per value
};

const encoder = new TextEncoder();
const byteLength = (s) => encoder.encode(s).length;

function positiveInt(value, fallback) {
  return Number.isInteger(value) && value > 0 ? value : fallback;
}

function str(value) {
  return typeof value === 'string' && value !== '' ? value : undefined;
}

function validRoom(room) {
  return typeof room === 'string' && room !== '' && room.length <= MAX_ROOM_CHARS;
}

/** A stored record, or a new one; anything unreadable starts over. */
function normalize(stored) {
  const rec = { rooms: [], connections: 0, lastSeen: null, conns: [] };
  if (!stored || typeof stored !== 'object') return rec;
  if (typeof stored.lastSeen === 'string') rec.lastSeen = stored.lastSeen;
  if (Array.isArray(stored.conns)) {
    for (const c of stored.conns) {
      if (!c || typeof c !== 'object') continue;
      const id = typeof c.id === 'string' ? c.id : null;
      const n = positiveInt(c.n, 1);
      const rooms = Array.isArray(c.rooms) ? c.rooms.filter(validRoom) : [];
      rec.conns.push({ id, n, rooms });
    }
  }
  return rec;
}

function findConn(rec, id) {
  return rec.conns.find((c) => c.id === id);
}

function openConn(rec, id) {
  let conn = findConn(rec, id);
  if (!conn) {
    conn = { id, n: 0, rooms: [] };
    rec.conns.push(conn);
  }
  return conn;
}

function connect(rec, id) {
  const conn = openConn(rec, id);
  // A named connection is one connection however often it is announced; the shared entry
  // of events without an id counts each connect.
  conn.n = id === null ? conn.n + 1 : 1;
  return conn;
}

function disconnect(rec, id, rooms) {
  const conn = findConn(rec, id);
  if (!conn) return;
  if (id === null && conn.n > 1) {
    conn.n -= 1;
    if (Array.isArray(rooms)) conn.rooms = conn.rooms.filter((r) => !rooms.includes(r));
    return;
  }
  rec.conns.splice(rec.conns.indexOf(conn), 1);
}

function join(rec, id, room, userId) {
  const conn = findConn(rec, id) ?? connect(rec, id); // joining implies being connected
  if (conn.rooms.includes(room)) return;
  if (conn.rooms.length >= settings.maxRoomsPerConnection) {
    log.warn(`presence: ${userId} is in ${conn.rooms.length} rooms on one connection; not tracking ${room}`);
    return;
  }
  conn.rooms.push(room);
}

function leave(rec, id, room) {
  const conn = findConn(rec, id);
  if (conn) conn.rooms = conn.rooms.filter((r) => r !== room);
}

/** Derive `rooms` and `connections` from `conns`. */
function summarize(rec) {
  const rooms = new Set();
  let connections = 0;
  for (const c of rec.conns) {
    connections += c.n;
    for (const r of c.rooms) rooms.add(r);
  }
  rec.rooms = [...rooms].sort();
  rec.connections = connections;
  return rec;
}

/**
 * At least the bytes of the record's JSON (each character counted as 6, a `\uXXXX` escape):
 * cheap enough to check after every event, so what is dropped never depends on how the events
 * were batched.
 */
function sizeBound(rec) {
  let n = 96 + 6 * (rec.lastSeen?.length ?? 4);
  for (const r of rec.rooms) n += 6 * r.length + 3;
  for (const c of rec.conns) {
    n += 32 + 6 * (c.id?.length ?? 4);
    for (const r of c.rooms) n += 6 * r.length + 3;
  }
  return n;
}

/** Derive `rooms` and `connections`, within the bounds: the oldest connections go first. */
function finish(rec, userId) {
  while (rec.conns.length > settings.maxConnectionsPerUser) {
    const dropped = rec.conns.shift();
    log.warn(`presence: ${userId} has more than ${settings.maxConnectionsPerUser} connections; dropping the oldest (${dropped.id ?? 'without id'})`);
  }
  summarize(rec);
  while (rec.conns.length > 1 && sizeBound(rec) > settings.maxRecordBytes) {
    const dropped = rec.conns.shift();
    log.warn(`presence: the record of ${userId} would be over ${settings.maxRecordBytes} bytes; dropping its oldest connection (${dropped.id ?? 'without id'})`);
    summarize(rec);
  }
  return rec;
}

/** The record as stored: a user without connections keeps only `lastSeen`. */
function stored(rec) {
  return rec.connections > 0 ? rec : { rooms: [], connections: 0, lastSeen: rec.lastSeen, conns: [] };
}

const PRESENCE_TYPES = new Set([
  'user.connected',
  'user.disconnected',
  'user.joined_room',
  'user.left_room',
  'presence.connected',
  'presence.disconnected',
]);

function apply(event, cache) {
  if (!PRESENCE_TYPES.has(event.eventType)) return; // the manifest subscribes to these only
  const raw = dataOf(event);
  const data = raw && typeof raw === 'object' && !Array.isArray(raw) ? raw : {};
  const userId = str(data.userId) ?? str(event.userId);
  if (userId === undefined) return;
  if (byteLength(PREFIX + userId) > MAX_KEY_BYTES) {
    log.warn(`presence: skipping ${event.eventType} ${event.eventId}: user id over ${MAX_KEY_BYTES - PREFIX.length} bytes`);
    return;
  }
  const id = str(data.connectionId) ?? null;
  let rec = cache.get(userId);
  if (!rec) {
    rec = normalize(state.getJson(PREFIX + userId));
    cache.set(userId, rec);
  }
  const room = validRoom(data.room) ? data.room : undefined;
  switch (event.eventType) {
    case 'user.connected':
    case 'presence.connected': {
      connect(rec, id);
      // A producer may announce the rooms a connection starts in.
      if (Array.isArray(data.rooms)) for (const r of data.rooms) if (validRoom(r)) join(rec, id, r, userId);
      if (room) join(rec, id, room, userId);
      break;
    }
    case 'user.disconnected':
    case 'presence.disconnected':
      disconnect(rec, id, data.rooms);
      break;
    case 'user.joined_room':
      if (room) join(rec, id, room, userId);
      break;
    case 'user.left_room':
      if (room) leave(rec, id, room);
      break;
  }
  if (typeof event.timestamp === 'string' && event.timestamp !== '') rec.lastSeen = event.timestamp;
  finish(rec, userId);
}

/** `rooms` and `connections` of a stored record (as `handle` derived them). */
function summaryOf(value) {
  if (value && Array.isArray(value.rooms) && Number.isInteger(value.connections)) return value;
  return summarize(normalize(value));
}

function onlineUsers() {
  const users = [];
  for (const [key, value] of state.scanJson(PREFIX)) {
    const rec = summaryOf(value);
    if (rec.connections > 0) users.push([key.slice(PREFIX.length), rec]);
  }
  return users; // in key order, so sorted by user id
}

export const { init, handle, query } = definePlugin({
  init(config) {
    settings.maxConnectionsPerUser = positiveInt(config?.max_connections_per_user, settings.maxConnectionsPerUser);
    settings.maxRoomsPerConnection = positiveInt(config?.max_rooms_per_connection, settings.maxRoomsPerConnection);
    settings.maxRecordBytes = positiveInt(config?.max_record_bytes, settings.maxRecordBytes);
  },

  handle(batch) {
    // Each user's record is written once per batch, however many of its events the batch has.
    const cache = new Map();
    for (let i = 0; i < batch.length; i++) {
      try {
        apply(batch[i], cache);
      } catch (e) {
        throw new HandleError(i, `presence: ${batch[i].eventType} ${batch[i].eventId}: ${e?.message ?? e}`);
      }
    }
    for (const [userId, rec] of cache) state.setJson(PREFIX + userId, stored(rec));
  },

  query(request) {
    if (typeof request.user === 'string') {
      const value = state.getJson(PREFIX + request.user);
      const rec = summaryOf(value);
      const lastSeen = typeof value?.lastSeen === 'string' ? value.lastSeen : null;
      return { user: request.user, online: rec.connections > 0, rooms: rec.rooms, connections: rec.connections, lastSeen };
    }
    const users = onlineUsers();
    if (typeof request.room === 'string') {
      return { room: request.room, users: users.filter(([, rec]) => rec.rooms.includes(request.room)).map(([id]) => id) };
    }
    const byRoom = new Map();
    const byUser = Object.create(null); // so a user or room named __proto__ is a key like any other
    for (const [id, rec] of users) {
      byUser[id] = { rooms: rec.rooms, connections: rec.connections };
      for (const r of rec.rooms) {
        if (!byRoom.has(r)) byRoom.set(r, []);
        byRoom.get(r).push(id);
      }
    }
    const rooms = Object.create(null);
    for (const r of [...byRoom.keys()].sort()) rooms[r] = byRoom.get(r);
    return { rooms, users: byUser };
  },
});
