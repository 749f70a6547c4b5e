// clients/web/relay.js in real Chromium, against a real nats-server and the
// relay binary. One Chromium for the file; each test starts its own
// nats-server and relay, and serves the test page from another origin than
// the relay's (so every stream is cross-origin, as in production).

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { chromium } from 'playwright-core';
import { connect, headers, StringCodec } from 'nats';
import {
  CHROMIUM, Cleanup, Relay, mintToken, startDev, startNats, startPages, until,
} from './support.mjs';

const SECRET = 'browser-test-secret';
const sc = StringCodec();
/** @type {import('playwright-core').Browser} */
let browser;
const shared = new Cleanup();
let pages;

before(async () => {
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    // Playwright gives each launch a fresh, empty --user-data-dir itself.
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
    timeout: 30000,
  });
  shared.add(() => browser.close());
  pages = await startPages(shared);
});
after(() => shared.run());

/** A nats-server, a relay allowing the page origins, and a NATS client. */
async function setup(t, relayArgs = []) {
  const cleanup = new Cleanup();
  t.after(() => cleanup.run());
  const nats = await startNats(cleanup);
  const origins = [`http://127.0.0.1:${pages.port}`, `http://localhost:${pages.port}`];
  const relay = new Relay(cleanup, { natsUrl: nats.url, secret: SECRET, origins, args: relayArgs });
  await relay.start();
  const nc = await connect({ servers: nats.url });
  cleanup.add(() => nc.close());
  const js = nc.jetstream();
  /** JetStream publish (acknowledged): resolves to the event's id. */
  const publish = async (subject, data, event) => {
    const h = headers();
    if (event) h.set('Sse-Event', event);
    return (await js.publish(subject, sc.encode(data), { headers: h })).seq;
  };
  const context = await browser.newContext();
  cleanup.add(() => context.close());
  await context.exposeFunction('relayToken', () =>
    mintToken(SECRET, ['--subjects', 'events.>', '--ttl', '1h']));
  return { cleanup, nats, relay, nc, publish, context };
}

/** A tab with the test page, subscribed with `opts`. */
async function open(context, opts, host = '127.0.0.1') {
  const page = await context.newPage();
  await page.goto(`http://${host}:${pages.port}/page.html`);
  await page.waitForFunction(() => window.ready, null, { timeout: 10000 });
  await page.evaluate((o) => window.start(o), opts);
  return page;
}

/** Waits until `fn(rec)` holds in the page; `fn` is page-side source. */
function waitRec(page, fn, arg, timeout = 10000) {
  return page.waitForFunction(new Function('arg', `return (${fn})(window.rec, arg)`), arg,
    { timeout, polling: 25 });
}

const ids = (page) => page.evaluate(() => window.rec.events.map((e) => e.id));
const range = (a, b) => Array.from({ length: b - a + 1 }, (_, i) => a + i);

test('events published with a plain NATS publish and with POST /publish reach the page', async (t) => {
  const { relay, nc, context } = await setup(t);
  const page = await open(context, {
    url: relay.events, subjects: ['events.orders.>'], tokenBinding: 'relayToken',
    events: ['order.shipped', 'order.paid'],
  });
  await waitRec(page, (r) => r.lives.length === 1);
  assert.deepEqual(await page.evaluate(() => window.rec.lives), [{ last_event_id: 0 }],
    'a fresh stream on an empty stream starts at 0');
  assert.deepEqual(await page.evaluate(async () => ({ ...(await import('/client/relay.js')).DEFAULTS })),
    { watchdogMs: 60000, refreshMarginMs: 30000, backoffMs: 1000, maxBackoffMs: 30000 },
    'the defaults README states');

  // A core NATS publish (no acknowledgement): the stream stores it.
  const h = headers();
  h.set('Sse-Event', 'order.shipped');
  nc.publish('events.orders.42', sc.encode('{"status":"shipped"}'), { headers: h });
  await nc.flush();

  const token = await mintToken(SECRET, ['--publish', 'events.orders.>', '--ttl', '1m']);
  const res = await fetch(`${relay.origin}/publish/events.orders.43`, {
    method: 'POST',
    headers: { authorization: `Bearer ${token}`, 'sse-event': 'order.paid' },
    body: '{"status":"paid"}',
  });
  assert.equal(res.status, 200);
  assert.equal((await res.json()).id, 2);

  // A subject the token does not grant: refused for good, with the reason.
  await context.exposeFunction('ordersOnly', () => mintToken(SECRET, ['--subjects', 'events.orders.>']));
  const denied = await open(context, { url: relay.events, subjects: ['events.users.>'], tokenBinding: 'ordersOnly' });
  await waitRec(denied, (r) => r.statuses.some((s) => s.state === 'refused'));
  const refusal = (await denied.evaluate(() => window.rec.statuses)).find((s) => s.state === 'refused');
  assert.deepEqual([refusal.status, refusal.error], [403, 'forbidden_subject']);

  await waitRec(page, (r) => r.events.length === 2);
  assert.deepEqual(await page.evaluate(() => window.rec.events), [
    { id: 1, type: 'order.shipped', data: '{"status":"shipped"}' },
    { id: 2, type: 'order.paid', data: '{"status":"paid"}' },
  ]);
});

test('the relay is killed and restarted while the page stays open: every missed event arrives once', async (t) => {
  const { relay, publish, context } = await setup(t);
  const page = await open(context, {
    url: relay.events, subjects: ['events.>'], tokenBinding: 'relayToken', backoffMs: 100, maxBackoffMs: 400,
  });
  await waitRec(page, (r) => r.lives.length === 1);
  for (let i = 1; i <= 3; i++) await publish('events.a', `before ${i}`);
  await waitRec(page, (r) => r.events.length === 3);

  // A tab with the default backoff beside it: its first retry waits 0.5-1 s.
  const byDefault = await open(context, { url: relay.events, subjects: ['events.>'], tokenBinding: 'relayToken', shared: false });
  await waitRec(byDefault, (r) => r.lives.length === 1);

  await relay.kill('SIGKILL');
  // Four failed connects: each delay is within [cap/2, cap], the cap
  // doubling from 100 ms up to 400 ms.
  await waitRec(page, (r) => r.statuses.filter((s) => s.state === 'reconnecting').length >= 4);
  const delays = (await page.evaluate(() => window.rec.statuses))
    .filter((s) => s.state === 'reconnecting').map((s) => s.delayMs);
  [100, 200, 400, 400].forEach((cap, i) =>
    assert.ok(delays[i] >= cap / 2 && delays[i] <= cap, `retry ${i + 1} after ${delays[i]} ms (cap ${cap})`));
  await waitRec(byDefault, (r) => r.statuses.some((s) => s.state === 'reconnecting'));
  const first = (await byDefault.evaluate(() => window.rec.statuses)).find((s) => s.state === 'reconnecting');
  assert.ok(first.delayMs >= 500 && first.delayMs <= 1000, `first retry after ${first.delayMs} ms`);
  for (let i = 4; i <= 8; i++) await publish('events.a', `while down ${i}`);
  await relay.start(); // same port

  await waitRec(page, (r) => r.lives.length === 2);
  assert.deepEqual((await page.evaluate(() => window.rec.lives))[1], { last_event_id: 8 },
    'the resume replayed up to the last stored event, then went live');
  for (let i = 9; i <= 10; i++) await publish('events.a', `after ${i}`);
  await waitRec(page, (r) => r.events.length >= 10);
  assert.deepEqual(await ids(page), range(1, 10));
  // The other tab had received nothing when the relay died: it comes back
  // from the start its relay.live named and misses nothing either.
  assert.deepEqual((await byDefault.evaluate(() => window.rec.lives))[0], { last_event_id: 3 });
  await waitRec(byDefault, (r) => r.events.length >= 7, null, 15000);
  assert.deepEqual(await ids(byDefault), range(4, 10));
  const reasons = await page.evaluate(() => window.rec.statuses.filter((s) => s.state === 'reconnecting'));
  assert.ok(reasons.every((s) => s.reason === 'error' && s.delayMs >= 50 && s.delayMs <= 400),
    `backed off with jitter within the bounds: ${JSON.stringify(reasons)}`);
  // shared: false: the other tab holds a stream of its own.
  await until('two streams', async () => (await relay.streams()) === 2);
});

test('cross-origin with the relay_token cookie and withCredentials', async (t) => {
  const { relay, publish, context } = await setup(t);
  const token = await mintToken(SECRET, ['--subjects', 'events.>', '--ttl', '1h']);
  // The page is http://localhost:<pages>, the relay http://localhost:<relay>:
  // another origin on the same site, so the cookie the site set goes along.
  const relayUrl = `http://localhost:${relay.port}/events`;
  const withCookie = await open(context, { url: relayUrl, subjects: ['events.>'], withCredentials: true }, 'localhost');
  const withoutCookie = await open(context, { url: relayUrl, subjects: ['events.>'] }, 'localhost');
  // Before the cookie is set both are refused; set it from the page (as a
  // login response would) and subscribe again.
  await waitRec(withCookie, (r) => r.statuses.some((s) => s.state === 'refused'));
  assert.deepEqual(
    (await withCookie.evaluate(() => window.rec.statuses)).find((s) => s.state === 'refused'),
    {
      state: 'refused', leader: true, status: 401, error: 'invalid_token',
      message: 'no token: send Authorization: Bearer <jwt>, a token query parameter or a relay_token cookie',
    },
  );
  await withCookie.evaluate((tok) => {
    document.cookie = `relay_token=${tok}; path=/; SameSite=Lax`;
    window.sub.close();
  }, token);
  await withoutCookie.evaluate(() => window.sub.close());
  const opts = { url: relayUrl, subjects: ['events.>'], shared: false };
  await withCookie.evaluate((o) => { window.rec.statuses = []; window.start({ ...o, withCredentials: true }); }, opts);
  await withoutCookie.evaluate((o) => { window.rec.statuses = []; window.start(o); }, opts);

  await waitRec(withCookie, (r) => r.lives.length === 1);
  const id = await publish('events.x', 'hello', null);
  await waitRec(withCookie, (r, id) => r.events.some((e) => e.id === id), id);
  assert.deepEqual(await withCookie.evaluate(() => window.rec.events), [{ id, type: 'message', data: 'hello' }]);

  // Without withCredentials the browser keeps the cookie back: 401, and the
  // client reads why from the relay's JSON answer.
  await waitRec(withoutCookie, (r) => r.statuses.some((s) => s.state === 'refused'));
  const refused = (await withoutCookie.evaluate(() => window.rec.statuses)).find((s) => s.state === 'refused');
  assert.equal(refused.status, 401);
  assert.equal(refused.error, 'invalid_token');
  assert.deepEqual(await withoutCookie.evaluate(() => window.rec.events), []);
});

test('token expiry: refreshed before exp, on relay.expired and on a 401, with no event lost', async (t) => {
  const { relay, publish, context } = await setup(t, ['--jwt-leeway', '0']);
  let calls = 0;
  // The first token of the `expiring` binding is garbage (a 401); then
  // tokens that live two seconds.
  await context.exposeFunction('shortToken', () =>
    (calls++ === 0 ? 'not-a-jwt' : mintToken(SECRET, ['--subjects', 'events.>', '--ttl', '2s'])));
  await context.exposeFunction('shortTokenProactive', () =>
    mintToken(SECRET, ['--subjects', 'events.>', '--ttl', '2s']));
  const onExpired = await open(context, {
    url: relay.events, tokenBinding: 'shortToken', refreshMarginMs: 0, shared: false, backoffMs: 100,
  });
  const proactive = await open(context, {
    url: relay.events, tokenBinding: 'shortTokenProactive', shared: false, backoffMs: 100,
  });
  await waitRec(onExpired, (r) => r.lives.length >= 1);
  await waitRec(proactive, (r) => r.lives.length >= 1);

  // Publish through several token lifetimes.
  const end = Date.now() + 5000;
  let last = 0;
  while (Date.now() < end) {
    last = await publish('events.t', `n${last + 1}`);
    await new Promise((r) => setTimeout(r, 50));
  }
  for (const page of [onExpired, proactive]) {
    await waitRec(page, (r, n) => r.events.length >= n, last);
    assert.deepEqual(await ids(page), range(1, last), 'every event once, in order');
  }
  const reasons = async (page) => page.evaluate(() =>
    window.rec.statuses.filter((s) => s.state === 'reconnecting').map((s) => s.reason));
  const a = await reasons(onExpired);
  assert.equal(a[0], 'unauthorized', `a 401 fetched a new token: ${a}`);
  assert.ok(a.filter((r) => r === 'expired').length >= 2, `relay.expired reopened the stream: ${a}`);
  const b = await reasons(proactive);
  assert.ok(b.length >= 2 && b.every((r) => r === 'token-refresh'),
    `renewed before exp, never expired: ${b}`);
  assert.ok(await proactive.evaluate(() => window.rec.tokens) >= 3);
});

test('relay.gap, relay.live and relay.heartbeat reach the page; the watchdog reopens a silent stream', async (t) => {
  const { relay, publish, context } = await setup(t, ['--replay-limit', '3', '--heartbeat', '1']);
  for (let i = 1; i <= 6; i++) await publish('events.g', `g${i}`);
  // Resume after id 1: ids 2..3 are beyond the replay limit of 3 events.
  const page = await open(context, {
    url: relay.events, tokenBinding: 'relayToken', lastEventId: 1, watchdogMs: 4000, backoffMs: 100,
  });
  await waitRec(page, (r) => r.lives.length === 1);
  const rec = await page.evaluate(() => window.rec);
  assert.deepEqual(rec.gaps, [{ last_event_id: 1, first_available: 4 }]);
  assert.deepEqual(rec.events.map((e) => e.id), [4, 5, 6]);
  assert.deepEqual(rec.lives, [{ last_event_id: 6 }]);

  // First state on connect: the last two events, then live.
  const fresh = await open(context, { url: relay.events, tokenBinding: 'relayToken', initial: 2, shared: false });
  await waitRec(fresh, (r) => r.lives.length === 1);
  assert.deepEqual(await ids(fresh), [5, 6]);
  await fresh.close();

  // The heartbeat as a page sees it, on a plain EventSource.
  const token = await mintToken(SECRET, ['--subjects', 'events.>', '--ttl', '1h']);
  const beats = await page.evaluate(({ url, token }) => new Promise((resolve, reject) => {
    const es = new EventSource(`${url}?heartbeat=event&token=${token}`);
    let n = 0;
    es.addEventListener('relay.heartbeat', (e) => {
      if (++n === 2) { es.close(); resolve({ n, data: e.data, id: e.lastEventId }); }
    });
    setTimeout(() => { es.close(); reject(new Error('no heartbeat within 5 s')); }, 5000);
  }), { url: relay.events, token });
  // No id of its own: the EventSource's last id stays the start that the
  // fresh stream's relay.live named (the last stored event, 6).
  assert.deepEqual(beats, { n: 2, data: '{}', id: '6' });

  // Heartbeats keep the watchdog (4 s) fed through a quiet spell of 6 s.
  await new Promise((r) => setTimeout(r, 6000));
  assert.deepEqual(await page.evaluate(() =>
    window.rec.statuses.filter((s) => s.state === 'reconnecting')), []);

  // A frozen relay (its socket open, silent) trips the watchdog; the client
  // reopens and, once the relay runs again, gets what was published meanwhile.
  relay.signal('SIGSTOP');
  t.after(() => relay.signal('SIGCONT'));
  await waitRec(page, (r) => r.statuses.some((s) => s.reason === 'watchdog'), null, 8000);
  const id = await publish('events.g', 'while frozen');
  relay.signal('SIGCONT');
  await waitRec(page, (r, id) => r.events.some((e) => e.id === id), id, 10000);
  assert.deepEqual(await ids(page), [4, 5, 6, 7]);
});

test('a recreated stream: the page is told (relay.reset) and gets the new stream from its first event', async (t) => {
  const { relay, nc, publish, context } = await setup(t);
  const page = await open(context, { url: relay.events, subjects: ['events.re.>'], tokenBinding: 'relayToken' });
  await waitRec(page, (r) => r.lives.length === 1);
  for (let i = 0; i < 3; i++) await publish('events.re.1', `old${i}`);
  await waitRec(page, (r) => r.events.length === 3);
  const jsm = await nc.jetstreamManager();
  const config = (await jsm.streams.info('EVENTS')).config;
  await jsm.streams.delete('EVENTS');
  await jsm.streams.add(config);
  // Published at once: whether the relay has noticed yet or not.
  for (let i = 0; i < 2; i++) await publish('events.re.1', `new${i}`);
  await waitRec(page, (r) => r.events.length === 5);
  assert.deepEqual(await page.evaluate(() => window.rec.resets),
    [{ reason: 'stream_recreated', last_event_id: 0 }]);
  assert.deepEqual(await page.evaluate(() => window.rec.events.map((e) => [e.id, e.data])),
    [[1, 'old0'], [2, 'old1'], [3, 'old2'], [1, 'new0'], [2, 'new1']]);
});

test('three tabs share one connection; closing the leader hands over without loss', async (t) => {
  const { relay, publish, context } = await setup(t);
  const opts = { url: relay.events, subjects: ['events.>'], tokenBinding: 'relayToken', backoffMs: 100 };
  const tabs = [];
  for (let i = 0; i < 3; i++) tabs.push(await open(context, opts));
  for (const tab of tabs) await waitRec(tab, (r) => r.statuses.some((s) => s.state === 'live'));
  await until('one stream for three tabs', async () => (await relay.streams()) === 1);
  const leaders = [];
  for (const tab of tabs) if (await tab.evaluate(() => window.sub.leader)) leaders.push(tab);
  assert.equal(leaders.length, 1);
  for (const tab of tabs.filter((x) => x !== leaders[0])) {
    assert.deepEqual((await tab.evaluate(() => window.rec.statuses)).at(-1), { state: 'live', leader: false });
  }

  for (let i = 1; i <= 3; i++) await publish('events.tabs', `e${i}`);
  for (const tab of tabs) await waitRec(tab, (r) => r.events.length === 3);

  const [leader] = leaders;
  const rest = tabs.filter((tab) => tab !== leader);
  await leader.close();
  // Published while no tab holds the stream.
  for (let i = 4; i <= 6; i++) await publish('events.tabs', `e${i}`);
  await until('a new leader', async () => {
    for (const tab of rest) if (await tab.evaluate(() => window.sub.leader)) return true;
    return false;
  });
  for (let i = 7; i <= 8; i++) await publish('events.tabs', `e${i}`);
  for (const tab of rest) {
    await waitRec(tab, (r) => r.events.length >= 8);
    assert.deepEqual(await ids(tab), range(1, 8));
  }
  await until('still one stream', async () => (await relay.streams()) === 1);

  // close() in the new leader: the last tab takes over; the closed one
  // reports nothing more.
  const [closing, last] = (await rest[0].evaluate(() => window.sub.leader)) ? rest : [rest[1], rest[0]];
  await closing.evaluate(() => window.sub.close());
  await publish('events.tabs', 'e9');
  await waitRec(last, (r) => r.events.length >= 9);
  assert.deepEqual(await ids(last), range(1, 9));
  assert.ok(await last.evaluate(() => window.sub.leader));
  assert.deepEqual(await ids(closing), range(1, 8));
  assert.deepEqual((await closing.evaluate(() => window.rec.statuses)).at(-1), { state: 'closed', leader: true });
});

test('the dev demo page connects on load, resumes on Reconnect and shows why a subscription was refused', async (t) => {
  const cleanup = new Cleanup();
  t.after(() => cleanup.run());
  const dev = await startDev(cleanup);
  const context = await browser.newContext();
  cleanup.add(() => context.close());
  const page = await context.newPage();
  await page.goto(`${dev.origin}/`);
  const state = page.locator('#state');
  await state.filter({ hasText: /^live$/ }).waitFor({ timeout: 10000 });

  // Published from the page's own form.
  await page.fill('#pub-data', '{"n":1}');
  await page.click('#pub-form button[type=submit]');
  const rows = page.locator('#events li');
  const row = (id) => rows.filter({ has: page.locator('.id', { hasText: new RegExp(`^id ${id}$`) }) });
  await row(1).waitFor({ timeout: 10000 });

  // Disconnected, two events are published; Reconnect brings them.
  await page.click('#disconnect');
  await state.filter({ hasText: 'closed' }).waitFor({ timeout: 10000 });
  for (const n of [2, 3]) {
    const res = await fetch(`${dev.origin}/dev/publish`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ subject: 'events.demo', data: `{"n":${n}}` }),
    });
    assert.equal(res.status, 201);
  }
  assert.equal(await rows.filter({ hasText: '"n": 2' }).count(), 0);
  await page.click('#connect');
  await row(3).waitFor({ timeout: 10000 });
  await row(2).waitFor({ timeout: 10000 });
  const ids = await page.locator('#events .id').allTextContents();
  assert.deepEqual(ids.filter((s) => s !== 'no id'), ['id 3', 'id 2', 'id 1'], 'newest first, each once');
  const live = await page.locator('#events li', { hasText: 'relay.live' }).first().locator('pre').textContent();
  assert.deepEqual(JSON.parse(live), { last_event_id: 3 });

  // A subject outside the stream: the page shows the relay's reason.
  await page.fill('#subject', 'other.things');
  await page.click('#connect');
  await state.filter({ hasText: 'refused' }).waitFor({ timeout: 10000 });
  assert.equal(await page.locator('#refusal').textContent(),
    '400 subject_outside_stream: subject "other.things" is not stored by this relay\'s stream');
});
