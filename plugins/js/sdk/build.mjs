#!/usr/bin/env node
// Build an Owlery plugin component from a JavaScript ES module with componentize-js:
//
//   node sdk/build.mjs <source.js> <out.wasm>
//
// The WIT is sdk/wit/owlery.wit, beside this script. The source may import the SDK and its own
// modules by relative paths (`../sdk/owlery.js`, `./rules.js`): componentize-js evaluates the
// modules at build time (Wizer) inside a directory mapped as `/`, which is the project (the
// directory above sdk/) when the source lies inside it, so every relative import inside the
// project resolves; nothing is bundled. Only bare specifiers are not resolved (no npm packages
// at run time), except the host's own `owlery:plugin/host@0.2.1`.

import { componentize } from '@bytecodealliance/componentize-js';
import { mkdir, rename, stat, unlink, writeFile } from 'node:fs/promises';
import { dirname, isAbsolute, relative, resolve, sep } from 'node:path';
import { fileURLToPath } from 'node:url';

const sdkDir = dirname(fileURLToPath(import.meta.url));
const projectDir = dirname(sdkDir);
const witPath = resolve(sdkDir, 'wit', 'owlery.wit');
const worldName = 'plugin';
// The host links WASI 0.2 (no filesystem, network or environment granted) but not wasi:http:
// leave out outbound `fetch` (`http`) and the `wasi:http/incoming-handler` export
// (`fetch-event`). `stdio` stays so console.* and uncaught errors reach the host log (a guest
// without it traps silently), `clocks` so timers and promises work, `random` so Math.random
// and crypto are random (leaving `random` or `clocks` out saves only about 2 KB).
const disableFeatures = ['http', 'fetch-event'];

function usage(message) {
  if (message) console.error(`error: ${message}`);
  console.error('usage: node sdk/build.mjs <source.js> <out.wasm>');
  process.exit(2);
}

const args = process.argv.slice(2);
if (args.length !== 2) usage(args.length ? 'expected exactly two arguments' : undefined);
const callerDir = process.cwd();
const sourcePath = resolve(args[0]);
const outPath = resolve(args[1]);

try {
  if (!(await stat(sourcePath)).isFile()) usage(`${args[0]} is not a file`);
} catch {
  usage(`${args[0]} does not exist`);
}

const inside = (dir, file) => {
  const rel = relative(dir, file);
  return rel !== '' && !rel.startsWith('..') && !isAbsolute(rel);
};

// componentize-js maps the current directory as `/` when the source lies inside it (else the
// source's own directory): work from the project so `../sdk/owlery.js` is inside the map.
const workDir = inside(projectDir, sourcePath) && projectDir !== sep ? projectDir : dirname(sourcePath);
process.chdir(workDir);

const started = performance.now();
let component;
try {
  ({ component } = await componentize({ sourcePath, witPath, worldName, disableFeatures }));
} catch (e) {
  console.error(`error: componentize-js failed on ${args[0]}:\n${e?.message ?? e}`);
  process.exit(1);
}
const seconds = (performance.now() - started) / 1000;

// Write beside the target and rename, so a host watching the directory never reads half a file.
await mkdir(dirname(outPath), { recursive: true });
const tmp = `${outPath}.${process.pid}.tmp`;
try {
  await writeFile(tmp, component);
  await rename(tmp, outPath);
} catch (e) {
  await unlink(tmp).catch(() => {});
  console.error(`error: cannot write ${args[1]}: ${e?.message ?? e}`);
  process.exit(1);
}

const mb = (component.length / (1024 * 1024)).toFixed(1);
const shown = relative(callerDir, outPath);
console.log(`built ${shown && !shown.startsWith('..') ? shown : outPath}: ${component.length} bytes (${mb} MiB) in ${seconds.toFixed(1)} s`);
