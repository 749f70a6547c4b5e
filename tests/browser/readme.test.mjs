// README's "Use" block, run as it is written by bash on a machine with
// nothing running (only its ports changed to free ones, and the relay
// binary from target/ first on PATH): the subscriber prints the event.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { RELAY_BIN, ROOT, until } from './support.mjs';

async function freePort() {
  const s = createServer();
  await new Promise((r) => s.listen(0, '127.0.0.1', r));
  const { port } = s.address();
  await new Promise((r) => s.close(r));
  return port;
}

test('README "Use" works on a machine with nothing running', async (t) => {
  const readme = readFileSync(join(ROOT, 'README.md'), 'utf8');
  const use = readme.slice(readme.indexOf('## Use\n'));
  const block = /```sh\n([\s\S]*?)```/.exec(use)[1];
  const [nats, relay] = [await freePort(), await freePort()];
  const script = block.replaceAll('4222', String(nats)).replaceAll('8080', String(relay));
  const tmp = mkdtempSync(join(tmpdir(), 'sse-relay-readme-'));
  const child = spawn('bash', ['-c', script], {
    cwd: tmp,
    detached: true, // its own process group: the background jobs end with it
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...process.env, TMPDIR: tmp, PATH: `${dirname(RELAY_BIN)}:${process.env.PATH}` },
  });
  t.after(() => {
    try { process.kill(-child.pid, 'SIGKILL'); } catch { /* already gone */ }
    rmSync(tmp, { recursive: true, force: true });
  });
  let out = '';
  let err = '';
  child.stdout.on('data', (d) => { out += d; });
  child.stderr.on('data', (d) => { err += d; });
  const event = 'id: 1\nevent: order.shipped\ndata: {"status":"shipped"}\n';
  await until('the publish answer and the event at the subscriber',
    () => out.includes('{"duplicate":false,"id":1}') && out.includes(event), 20000)
    .catch((e) => { throw new Error(`${e.message}\nstdout:\n${out}\nstderr:\n${err.slice(-2000)}`); });
  assert.equal(out.split(event).length, 2, 'the event once');
});
