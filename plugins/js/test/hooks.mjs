// Node module hooks: resolve the host's interface, which only exists inside a component, to
// the fake in fake-host.mjs, so plugins run in plain Node for tests.
const HOST = 'owlery:plugin/host@0.2.1';
const FAKE = new URL('./fake-host.mjs', import.meta.url).href;

export async function resolve(specifier, context, nextResolve) {
  if (specifier === HOST) return { url: FAKE, shortCircuit: true };
  return nextResolve(specifier, context);
}
