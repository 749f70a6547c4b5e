// Real parts for the browser tests: a nats-server with JetStream on a port
// it picks itself, the relay binary, a static server for the test pages,
// and Debian's Chromium. Every process started here is killed at the end,
// and every wait is bounded.

import { spawn, execFile } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, readdirSync } from 'node:fs';
import { createServer } from 'node:http';
import { tmpdir } from 'node:os';
import { join, resolve, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';

export const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '../..');
const TARGET = process.env.CARGO_TARGET_DIR
  ? resolve(ROOT, process.env.CARGO_TARGET_DIR)
  : join(ROOT, 'target');
export const RELAY_BIN = process.env.RELAY_BIN ?? join(TARGET, 'debug', 'sse-relay');
export const CHROMIUM = '/usr/bin/chromium';

/** Polls `check` until it returns something truthy; fails after `ms`. */
export async function until(what, check, ms = 10000, every = 25) {
  const deadline = Date.now() + ms;
  for (;;) {
    const v = await check();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, every));
  }
}

/** Everything a test started, stopped in reverse order. */
export class Cleanup {
  #fns = [];
  add(fn) { this.#fns.push(fn); }
  async run() {
    for (const fn of this.#fns.reverse()) {
      try { await fn(); } catch (e) { console.error('cleanup:', e); }
    }
    this.#fns = [];
  }
}

/** Kills a child and waits (bounded) for it to exit. */
async function kill(child, signal = 'SIGKILL') {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise((r) => child.once('exit', r));
  child.kill(signal);
  const timeout = new Promise((r) => setTimeout(() => r('timeout'), 5000));
  if ((await Promise.race([exited, timeout])) === 'timeout') {
    child.kill('SIGKILL');
    await Promise.race([exited, new Promise((r) => setTimeout(r, 5000))]);
  }
}

/** `nats-server -js` on a free loopback port with a temporary store. */
export async function startNats(cleanup) {
  const dir = mkdtempSync(join(tmpdir(), 'sse-relay-browser-nats-'));
  const child = spawn('nats-server', ['-js', '-a', '127.0.0.1', '-p', '-1', '-sd', join(dir, 'js'),
    '--ports_file_dir', dir], { stdio: ['ignore', 'ignore', 'pipe'] });
  let log = '';
  child.stderr.on('data', (d) => { log += d; });
  cleanup.add(async () => { await kill(child); rmSync(dir, { recursive: true, force: true }); });
  const port = await until('nats-server ports file', () => {
    if (child.exitCode !== null) throw new Error(`nats-server exited: ${log}`);
    const f = readdirSync(dir).find((n) => n.endsWith('.ports'));
    if (!f) return null;
    try {
      const url = JSON.parse(readFileSync(join(dir, f), 'utf8')).nats[0];
      return Number(new URL(url).port);
    } catch { return null; }
  });
  return { url: `nats://127.0.0.1:${port}`, port };
}

/**
 * `sse-relay serve` against `natsUrl` (creating the EVENTS stream), one
 * shard, on `port` (0: a free one). `start()` again after `kill()` comes
 * back on the same port.
 */
export class Relay {
  constructor(cleanup, { natsUrl, secret, origins = [], args = [] }) {
    this.opts = { natsUrl, secret, origins, args };
    this.port = 0;
    this.child = null;
    cleanup.add(() => this.kill());
  }

  get origin() { return `http://127.0.0.1:${this.port}`; }
  get events() { return `${this.origin}/events`; }

  async start() {
    const { natsUrl, secret, origins, args } = this.opts;
    const child = spawn(RELAY_BIN, ['serve', '--listen', `127.0.0.1:${this.port}`, '--nats-url', natsUrl,
      '--jwt-secret', secret, '--create-stream', '--workers', '1', '--log-format', 'json',
      ...(origins.length ? ['--cors-origins', origins.join(',')] : []), ...args],
    { stdio: ['ignore', 'ignore', 'pipe'], env: { ...process.env, RUST_LOG: 'info' } });
    this.child = child;
    let buf = '';
    let log = '';
    const listening = new Promise((resolve, reject) => {
      child.stderr.on('data', (d) => {
        buf += d;
        log += d;
        let i;
        while ((i = buf.indexOf('\n')) >= 0) {
          const line = buf.slice(0, i);
          buf = buf.slice(i + 1);
          try {
            const { fields } = JSON.parse(line);
            if (fields?.message === 'listening') resolve(Number(fields.addr.split(':').pop()));
          } catch { /* not JSON: ignore */ }
        }
      });
      child.once('exit', (code) => reject(new Error(`relay exited with ${code}: ${log}`)));
    });
    this.port = await Promise.race([listening,
      new Promise((_, reject) => setTimeout(() => reject(new Error(`relay did not listen: ${log}`)), 10000))]);
    await until('relay /readyz', async () => (await fetch(`${this.origin}/readyz`).catch(() => null))?.ok);
  }

  async kill(signal = 'SIGKILL') {
    if (this.child) await kill(this.child, signal);
  }

  /** Sends a signal without waiting (SIGSTOP, SIGCONT). */
  signal(sig) { this.child.kill(sig); }

  /** The `sse_relay_connections` gauge: open SSE streams. */
  async streams() {
    const text = await (await fetch(`${this.origin}/metrics`)).text();
    const line = text.split('\n').find((l) => l.startsWith('sse_relay_connections '));
    return Number(line.split(' ')[1]);
  }
}

/**
 * `sse-relay dev` on a free port: its own nats-server, the demo page at
 * `/`. Stopped with SIGTERM, so it stops its nats-server too.
 */
export async function startDev(cleanup) {
  const child = spawn(RELAY_BIN, ['dev', '--listen', '127.0.0.1:0'],
    { stdio: ['ignore', 'ignore', 'pipe'], env: { ...process.env, RUST_LOG: 'info' } });
  cleanup.add(() => kill(child, 'SIGTERM'));
  let log = '';
  const port = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`dev did not listen: ${log}`)), 15000);
    child.stderr.on('data', (d) => {
      log += d;
      const m = /listening addr=[\d.]+:(\d+)/.exec(log);
      if (m) { clearTimeout(timer); resolve(Number(m[1])); }
    });
    child.once('exit', (code) => { clearTimeout(timer); reject(new Error(`dev exited with ${code}: ${log}`)); });
  });
  const origin = `http://127.0.0.1:${port}`;
  await until('dev /readyz', async () => (await fetch(`${origin}/readyz`).catch(() => null))?.ok);
  return { origin };
}

/** A token signed by `sse-relay token`. */
export async function mintToken(secret, args) {
  const { stdout } = await promisify(execFile)(RELAY_BIN, ['token', '--secret', secret, ...args]);
  return stdout.trim();
}

/**
 * A static server for the test pages and the client module, on `host`:
 * `/page.html` loads `/client/relay.js` (clients/web/relay.js).
 */
export async function startPages(cleanup) {
  const files = {
    '/page.html': ['text/html', () => readFileSync(join(ROOT, 'tests/browser/page.html'))],
    '/client/relay.js': ['text/javascript', () => readFileSync(join(ROOT, 'clients/web/relay.js'))],
  };
  const server = createServer((req, res) => {
    const f = files[new URL(req.url, 'http://x').pathname];
    if (!f) { res.writeHead(404).end(); return; }
    res.writeHead(200, { 'content-type': f[0], 'cache-control': 'no-store' }).end(f[1]());
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  cleanup.add(() => new Promise((r) => { server.closeAllConnections(); server.close(r); }));
  return { port: server.address().port };
}
