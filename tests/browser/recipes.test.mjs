// The publishing recipes README shows (recipes/, examples/publish.rs) run
// against a real nats-server and relay: a subscribed client receives each
// event with its `Sse-Event` name, and README shows each file as it is.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';
import {
  Cleanup, RELAY_BIN, ROOT, Relay, mintToken, startNats, until,
} from './support.mjs';

const SECRET = 'recipes-test-secret';
const run = promisify(execFile);
const cleanup = new Cleanup();
let env;
let stream = '';

before(async () => {
  const nats = await startNats(cleanup);
  const relay = new Relay(cleanup, { natsUrl: nats.url, secret: SECRET });
  await relay.start();
  env = {
    ...process.env,
    NATS_URL: nats.url,
    RELAY_URL: relay.origin,
    PUBLISH_TOKEN: await mintToken(SECRET, ['--publish', 'events.orders.>', '--ttl', '5m']),
  };
  // The subscriber: an SSE stream read as text.
  const token = await mintToken(SECRET, ['--subjects', 'events.orders.>', '--ttl', '5m']);
  const abort = new AbortController();
  const res = await fetch(`${relay.events}?subject=events.orders.42`, {
    headers: { authorization: `Bearer ${token}` }, signal: abort.signal,
  });
  assert.equal(res.status, 200);
  (async () => {
    const decoder = new TextDecoder();
    try {
      for await (const chunk of res.body) stream += decoder.decode(chunk, { stream: true });
    } catch { /* aborted at the end */ }
  })();
  cleanup.add(() => abort.abort());
  await until('the subscriber is live', () => stream.includes('event: relay.live'));
});
after(() => cleanup.run());

/** Runs a recipe; its output is the event's id; the subscriber gets it. */
async function runRecipe(cmd, args) {
  const { stdout } = await run(cmd, args, { env, cwd: ROOT, timeout: 30000 });
  const id = Number(/"id":(\d+)/.exec(stdout)?.[1] ?? stdout.trim());
  assert.ok(Number.isSafeInteger(id) && id > 0, `an id, not ${JSON.stringify(stdout)}`);
  const frame = `id: ${id}\nevent: order.shipped\ndata: {"status":"shipped"}\n\n`;
  await until(`event ${id} at the subscriber`, () => stream.includes(frame));
  return id;
}

/** The file without the lines README leaves out (shebang, module docs). */
function shown(path) {
  return readFileSync(join(ROOT, path), 'utf8').split('\n')
    .filter((l) => !l.startsWith('#!') && !l.startsWith('//!'))
    .join('\n').trim();
}

const readme = readFileSync(join(ROOT, 'README.md'), 'utf8');
const ids = [];

for (const [name, cmd, args, path] of [
  ['curl against POST /publish', 'sh', ['recipes/publish.sh'], 'recipes/publish.sh'],
  ['Rust (async-nats)', join(RELAY_BIN, '..', 'examples', 'publish'), [], 'examples/publish.rs'],
  ['JavaScript (nats.js)', 'node', ['recipes/publish.mjs'], 'recipes/publish.mjs'],
  ['Python (nats-py)', 'python3', ['recipes/publish.py'], 'recipes/publish.py'],
]) {
  test(`${name}: a subscribed client receives the event; README shows ${path}`, async () => {
    ids.push(await runRecipe(cmd, args));
    assert.ok(readme.includes(shown(path)), `README.md shows ${path} as it is`);
  });
}

test('each recipe stored one event', () => {
  assert.deepEqual(ids, [1, 2, 3, 4]);
});
