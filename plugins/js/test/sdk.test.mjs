// The SDK's wrappers, in plain Node (run with `npm test`).
import test from 'node:test';
import assert from 'node:assert/strict';
import * as host from './fake-host.mjs';
import { definePlugin, state, broadcast, publish, sendHttp, log, now, dataOf, metadataOf, envelopeOf, toJson, HandleError, CONTRACT } from '../sdk/owlery.js';

const event = (i, data = {}) => ({
  eventId: `e${i}`, eventType: 'thing.done', timestamp: '2026-01-01T00:00:00Z', source: 'api', userId: undefined,
  metadata: '{"m":1}', data: JSON.stringify(data), topic: 'things', partition: 0, offset: BigInt(i),
});

test('state: bytes, strings and JSON, scans in key order', async () => {
  host.reset();
  state.set('b', new Uint8Array([1, 2, 3]));
  state.set('a', 'text');
  state.setJson('j', { n: 1, big: 5n });
  assert.deepEqual(state.get('b'), new Uint8Array([1, 2, 3]));
  assert.equal(new TextDecoder().decode(state.get('a')), 'text');
  assert.deepEqual(state.getJson('j'), { n: 1, big: 5 });
  assert.equal(state.get('missing'), undefined);
  assert.equal(state.getJson('missing', 7), 7);
  assert.equal(state.getJson('b', 'unreadable'), 'unreadable');
  assert.deepEqual(state.scan('').map(([k]) => k), ['a', 'b', 'j']);
  assert.deepEqual(state.scanJson(''), [['j', { n: 1, big: 5 }]]);
  state.delete('a');
  assert.equal(state.get('a'), undefined);
  assert.throws(() => state.set('x', 42), TypeError);
});

test('envelopes, JSON, log, now', () => {
  host.reset();
  const e = event(3, { id: 1 });
  assert.deepEqual(dataOf(e), { id: 1 });
  assert.deepEqual(metadataOf(e), { m: 1 });
  assert.equal(dataOf({ ...e, data: 'nope' }), null);
  assert.deepEqual(envelopeOf(e), { eventId: 'e3', eventType: 'thing.done', timestamp: '2026-01-01T00:00:00Z', source: 'api', userId: null, metadata: { m: 1 }, data: { id: 1 } });
  assert.equal(toJson({ o: 2n ** 60n, s: 3n }), '{"o":"1152921504606846976","s":3}');
  log.info('hello');
  log.error({ toString: () => 'obj' });
  assert.deepEqual(host.out.logs, [['info', 'hello'], ['error', 'obj']]);
  assert.equal(typeof now(), 'number');
  assert.equal(CONTRACT, 'owlery:plugin@0.2.1');
});

test('broadcast and publish stringify, and turn a refusal into an Error', () => {
  host.reset();
  broadcast('e1', 'all', { offset: 1n, a: 'b' });
  publish('e1', 'thing.counted', { n: 1 });
  assert.deepEqual(host.out.broadcasts, [['e1', 'all', '{"offset":1,"a":"b"}']]);
  assert.deepEqual(host.out.publishes, [['e1', 'thing.counted', '{"n":1}']]);
  host.refuse.broadcast = 'broadcast is not allowed by the manifest';
  assert.throws(() => broadcast('e1', 'all', {}), { message: 'broadcast: broadcast is not allowed by the manifest' });
});

test('sendHttp sends JSON bodies as JSON, bytes and text as they are, and turns a refusal into an Error', () => {
  host.reset();
  sendHttp('e1', { url: 'http://127.0.0.1:9/h', body: { offset: 2n } });
  sendHttp('e1', { method: 'PUT', url: 'http://127.0.0.1:9/h', headers: { 'content-type': 'text/plain', 'x-n': 1 }, body: 'hi' });
  const [[cause, json], [, text]] = host.out.http;
  assert.equal(cause, 'e1');
  assert.equal(json.method, 'POST');
  assert.deepEqual(json.headers, [['content-type', 'application/json']]);
  assert.equal(new TextDecoder().decode(json.body), '{"offset":2}');
  assert.deepEqual(text.headers, [['content-type', 'text/plain'], ['x-n', '1']]);
  assert.equal(new TextDecoder().decode(text.body), 'hi');
  host.refuse.http = 'the manifest does not allow http://evil';
  assert.throws(() => sendHttp('e1', { url: 'http://evil/' }), { message: 'sendHttp: the manifest does not allow http://evil' });
});

test('definePlugin: results are tagged, failures are err, never thrown', async () => {
  host.reset();
  const seen = [];
  const p = definePlugin({
    init(config, raw) {
      seen.push([config, raw]);
      if (config.fail) throw new Error('bad config');
    },
    handleEvent(e, index) {
      const d = dataOf(e);
      if (d.explicit) throw new HandleError(9, 'explicit');
      if (d.plain) throw new Error('plain');
      if (d.string) throw 'a string';
      if (d.async) return Promise.reject(new Error('async'));
      if (d.refused) broadcast(e.eventId, 'all', {});
      state.setJson('n', state.getJson('n', 0) + 1);
      return d.wait ? Promise.resolve() : undefined;
    },
    query(request) {
      if (request.fail) throw new Error('no such view');
      if (request.raw) return '"raw"';
      return { n: state.getJson('n', 0), request };
    },
  });
  assert.deepEqual(await host.call(p.init, '{"a":1}'), { tag: 'ok', val: undefined });
  assert.deepEqual(seen, [[{ a: 1 }, '{"a":1}']]);
  assert.deepEqual(await host.call(p.init, '{"fail":true}'), { tag: 'err', val: 'bad config' });
  assert.deepEqual(await host.call(p.handle, [event(0), event(1, { wait: true }), event(2)]), { tag: 'ok', val: undefined });
  assert.equal(host.json('n'), 3);
  assert.deepEqual(await host.call(p.handle, [event(0), event(1, { explicit: true })]), { tag: 'err', val: { index: 9, message: 'explicit' } });
  assert.deepEqual(await host.call(p.handle, [event(0), event(1), event(2, { plain: true })]), { tag: 'err', val: { index: 2, message: 'plain' } });
  assert.deepEqual(await host.call(p.handle, [event(0, { string: true })]), { tag: 'err', val: { index: 0, message: 'a string' } });
  assert.deepEqual(await host.call(p.handle, [event(0, { wait: true }), event(1, { async: true })]), { tag: 'err', val: { index: 1, message: 'async' } });
  host.refuse.broadcast = 'broadcast is not allowed by the manifest';
  assert.deepEqual(await host.call(p.handle, [event(0, { refused: true })]), { tag: 'err', val: { index: 0, message: 'broadcast: broadcast is not allowed by the manifest' } });
  assert.equal(host.json('n'), 3, 'failed batches left no trace');
  assert.deepEqual(await host.call(p.query, '{"x":"1"}'), { tag: 'ok', val: '{"n":3,"request":{"x":"1"}}' });
  assert.deepEqual(await host.call(p.query, '{"raw":"1"}'), { tag: 'ok', val: '"raw"' });
  assert.deepEqual(await host.call(p.query, '{"fail":"1"}'), { tag: 'err', val: 'no such view' });
});

test('definePlugin: handle(batch) with HandleError, and defaults', async () => {
  const p = definePlugin({
    handle(batch) {
      batch.forEach((e, i) => {
        if (dataOf(e).bad) throw new HandleError(i, `bad event ${e.eventId}`);
      });
    },
  });
  assert.deepEqual(await p.init('{}'), { tag: 'ok', val: undefined });
  assert.deepEqual(await p.handle([event(0), event(1, { bad: true })]), { tag: 'err', val: { index: 1, message: 'bad event e1' } });
  assert.deepEqual(await p.handle([event(0)]), { tag: 'ok', val: undefined });
  assert.deepEqual(await p.query('{}'), { tag: 'ok', val: '{}' });
  assert.throws(() => definePlugin({}), TypeError);
});
