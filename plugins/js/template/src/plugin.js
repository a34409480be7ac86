// {{name}}: an Owlery consumer plugin, in JavaScript.
//
// `init` gets the manifest's `[config]` (parsed); `handle` gets each batch of events, and what
// it does (state, broadcasts, publishes) is committed only if it returns without throwing;
// `query` answers `GET /api/plugins/{{name}}/query`. Keep what must last in `state`: after a
// failure the instance is thrown away and a fresh one retries. Take time from
// `event.timestamp`, never from `now()`, so a replay rebuilds the same state.

import { definePlugin, state, broadcast, dataOf, HandleError } from '../sdk/owlery.js';

export const { init, handle, query } = definePlugin({
  init(config) {},

  handle(batch) {
    let count = state.getJson('count', 0);
    batch.forEach((event, index) => {
      count += 1;
      const payload = { eventType: event.eventType, count, data: dataOf(event) };
      try {
        broadcast(event.eventId, 'all', payload);
      } catch (e) {
        throw new HandleError(index, e.message);
      }
    });
    state.setJson('count', count);
  },

  query(request) {
    return { count: state.getJson('count', 0) };
  },
});
