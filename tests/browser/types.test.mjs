// clients/web/relay.js is typed with JSDoc: TypeScript checks it, strict,
// against the DOM's types (what an editor uses to autocomplete it).

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { ROOT } from './support.mjs';

test('the JSDoc types of clients/web/relay.js check under tsc --strict', async () => {
  const tsc = join(ROOT, 'tests/browser/node_modules/typescript/bin/tsc');
  const args = ['--noEmit', '--allowJs', '--checkJs', '--strict', '--target', 'es2022',
    '--module', 'es2022', '--lib', 'es2022,dom', join(ROOT, 'clients/web/relay.js')];
  const r = await promisify(execFile)(process.execPath, [tsc, ...args], { timeout: 60000 })
    .catch((e) => e);
  assert.equal(r.code ?? 0, 0, `${r.stdout}${r.stderr}`);
});
