// presence's logic in plain Node (run with `npm test`); the built component behaves the same.
import test from 'node:test';
import assert from 'node:assert/strict';
import * as host from './fake-host.mjs';
import { init, handle, query } from '../presence/presence.js';

let n = 0;
const ev = (eventType, data, userId = undefined, timestamp = '2026-01-01T00:00:00Z') => ({
  eventId: `e${n}`, eventType, timestamp, source: 'owlery', userId, metadata: '{}',
  data: JSON.stringify(data), topic: 'presence-events', partition: 0, offset: BigInt(n++),
});
const ok = { tag: 'ok', val: undefined };
async function q(request) {
  const r = await host.call(query, JSON.stringify(request));
  assert.equal(r.tag, 'ok', JSON.stringify(r));
  return JSON.parse(r.val);
}
const connected = (userId, connectionId) => ev('user.connected', { userId, connectionId, transport: 'websocket' }, userId);
const joined = (userId, connectionId, room) => ev('user.joined_room', { room, userId, connectionId }, userId);

test('two tabs of one user: online, and in a room, while any connection is', async () => {
  host.reset();
  assert.deepEqual(await host.call(init, '{}'), ok);
  assert.deepEqual(await host.call(handle, [
    connected('alice', 'c1'), joined('alice', 'c1', 'incident:1'),
    connected('alice', 'c2'), joined('alice', 'c2', 'incident:1'), joined('alice', 'c2', 'incident:2'),
    connected('bob', 'c3'), joined('bob', 'c3', 'incident:2'),
  ]), ok);
  assert.deepEqual(await q({}), {
    rooms: { 'incident:1': ['alice'], 'incident:2': ['alice', 'bob'] },
    users: { alice: { rooms: ['incident:1', 'incident:2'], connections: 2 }, bob: { rooms: ['incident:2'], connections: 1 } },
  });
  await host.call(handle, [ev('user.disconnected', { rooms: ['incident:1', 'incident:2'], userId: 'alice', connectionId: 'c2' }, 'alice')]);
  assert.deepEqual(await q({ room: 'incident:2' }), { room: 'incident:2', users: ['bob'] });
  assert.deepEqual(await q({ room: 'incident:1' }), { room: 'incident:1', users: ['alice'] });
  await host.call(handle, [
    ev('user.left_room', { room: 'incident:2', userId: 'bob', connectionId: 'c3' }, 'bob'),
    ev('user.disconnected', { rooms: [], userId: 'bob', connectionId: 'c3' }, 'bob', '2026-01-01T01:00:00Z'),
  ]);
  assert.deepEqual(await q({}), { rooms: { 'incident:1': ['alice'] }, users: { alice: { rooms: ['incident:1'], connections: 1 } } });
  assert.deepEqual(await q({ user: 'bob' }), { user: 'bob', online: false, rooms: [], connections: 0, lastSeen: '2026-01-01T01:00:00Z' });
  assert.deepEqual(host.json('user/bob'), { rooms: [], connections: 0, lastSeen: '2026-01-01T01:00:00Z', conns: [] });
  assert.deepEqual(await q({ room: 'nowhere' }), { room: 'nowhere', users: [] });
});

test('the same state whatever the batch boundaries', async () => {
  const events = [connected('a', '1'), joined('a', '1', 'r'), connected('a', '2'), joined('a', '2', 's'), ev('user.disconnected', { userId: 'a', connectionId: '1' })];
  host.reset();
  await host.call(init, '{}');
  await host.call(handle, events);
  const together = host.json('user/a');
  host.reset();
  await host.call(init, '{}');
  for (const e of events) await host.call(handle, [e]);
  assert.deepEqual(host.json('user/a'), together);
  assert.deepEqual(together.rooms, ['s']);
});

test("a producer's own events: envelope userId and data.room, counted without connection ids", async () => {
  host.reset();
  await host.call(init, '{}');
  await host.call(handle, [ev('user.connected', {}, 'carol'), ev('user.connected', {}, 'carol'), ev('user.joined_room', { room: 'war-room' }, 'carol'), ev('user.disconnected', {}, 'carol')]);
  assert.deepEqual(await q({ room: 'war-room' }), { room: 'war-room', users: ['carol'] });
  await host.call(handle, [ev('user.disconnected', {}, 'carol')]);
  assert.deepEqual(await q({ room: 'war-room' }), { room: 'war-room', users: [] });
  // joining implies being connected; presence.* count like user.*
  await host.call(handle, [joined('dave', 'c9', 'r'), ev('presence.connected', { userId: 'erin', connectionId: 'c10' })]);
  assert.deepEqual((await q({})).users, { dave: { rooms: ['r'], connections: 1 }, erin: { rooms: [], connections: 1 } });
  await host.call(handle, [ev('presence.disconnected', { userId: 'erin', connectionId: 'c10' })]);
  assert.equal((await q({})).users.erin, undefined);
});

test('odd events are skipped; records stay bounded', async () => {
  host.reset();
  await host.call(init, '{"max_connections_per_user": 4}');
  assert.deepEqual(await host.call(handle, [
    ev('user.connected', { connectionId: 'x' }),
    { ...ev('user.joined_room', {}), data: '[1,2]' },
    { ...ev('user.joined_room', {}, 'zed'), data: 'null' },
    ev('user.joined_room', { room: 'r'.repeat(300) }, 'long-room'),
    ev('user.connected', {}, 'u'.repeat(2000)),
    ev('incident.created', { userId: 'x' }, 'x'),
  ]), ok);
  assert.deepEqual([...host.committed.keys()].sort(), ['user/long-room', 'user/zed']);
  await host.call(handle, Array.from({ length: 6 }, (_, i) => connected('many', `m${i}`)));
  assert.equal((await q({})).users.many.connections, 4);
  assert.deepEqual(host.json('user/many').conns.map((c) => c.id), ['m2', 'm3', 'm4', 'm5']);
  await host.call(handle, [joined('__proto__', 'p', '__proto__')]);
  assert.deepEqual((await q({})).rooms['__proto__'], ['__proto__']);
  assert.ok(host.out.logs.some(([level, m]) => level === 'warn' && m.includes('dropping the oldest')));
});
