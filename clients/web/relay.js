// @ts-check
/**
 * A browser client for sse-relay: an EventSource that never loses an event.
 *
 * - Every reconnect resumes from the last id received (`last_event_id=`),
 *   and an event whose id is not above it is dropped, so each event reaches
 *   `onEvent` once, in id order.
 * - The token comes from a callback. It is fetched again before it expires,
 *   on `relay.expired`, and on a 401 (a native EventSource cannot read a
 *   status, so the same URL is asked again as a plain request to read the
 *   relay's JSON error); the stream reopens from the last id.
 * - Failed connects back off exponentially with jitter; a watchdog fed by
 *   `relay.heartbeat` (the query asks for `heartbeat=event`) reopens a
 *   stream that went silent (sleep, NAT timeouts, proxies).
 * - One connection per browser: the tabs of an origin that subscribe to the
 *   same thing elect a leader with the Web Locks API; it holds the
 *   EventSource and forwards over a BroadcastChannel. When it closes, the
 *   next tab takes the lock and resumes from the last id the tabs saw.
 *
 * @module
 */

/**
 * @typedef {object} RelayEvent
 * @property {number} id The event's id: its JetStream sequence, increasing.
 * @property {string} type Its name (the `Sse-Event` header), or `message`.
 * @property {string} data The payload.
 */

/**
 * `relay.gap`: the events after `last_event_id` and before
 * `first_available` are gone (stream limits) or beyond the relay's
 * `--replay-limit`; the stream goes on from `first_available`.
 * @typedef {{last_event_id: number, first_available: number}} Gap
 */

/**
 * `relay.live`: caught up. `last_event_id` is the last id the stream
 * delivered before going live; on a fresh stream, where it starts (a
 * reconnect before the first event resumes from there; null if unknown).
 * @typedef {{last_event_id: number | null}} Live
 */

/**
 * `relay.reset`: the stream was deleted and created again, so its ids
 * restarted. What follows is the new stream from its first event; the page
 * should reload its state.
 * @typedef {{reason: string, last_event_id: 0}} Reset
 */

/**
 * @typedef {object} Status
 * @property {'connecting' | 'live' | 'reconnecting' | 'refused' | 'closed'} state
 *   `refused` is final: the relay said no for a reason a retry cannot fix.
 * @property {boolean} leader Whether this tab holds the connection.
 * @property {string} [reason] Why it reconnects: `error`, `expired`,
 *   `unauthorized`, `token-refresh`, `watchdog` or `token-callback`.
 * @property {number} [delayMs] How long until it reconnects.
 * @property {number} [status] A refusal's HTTP status.
 * @property {string} [error] A refusal's code, e.g. `forbidden_subject`.
 * @property {string} [message] A refusal's sentence for humans.
 */

/**
 * @typedef {object} Options
 * @property {string} url The relay's `/events` URL.
 * @property {string[]} [subjects] Subject patterns; none: all the token grants.
 * @property {() => Promise<string | null | undefined>} [token] Called for
 *   every connection; a falsy answer sends no `token=` (the credential is
 *   the `relay_token` cookie, which the callback may refresh first).
 * @property {string[]} [events] Event names to receive besides `message`:
 *   EventSource hands a named event only to listeners for that name.
 * @property {(event: RelayEvent) => void} [onEvent]
 * @property {(gap: Gap) => void} [onGap]
 * @property {(live: Live) => void} [onLive]
 * @property {(reset: Reset) => void} [onReset]
 * @property {(status: Status) => void} [onStatus]
 * @property {boolean} [withCredentials] Send cookies cross-origin.
 * @property {number} [lastEventId] Resume after this id (e.g. kept in storage).
 * @property {'last' | number} [initial] First state on a fresh connect:
 *   the last event of every subject, or the last n events.
 * @property {boolean} [shared] One connection for all tabs (default: true
 *   where Web Locks and BroadcastChannel exist).
 * @property {number} [watchdogMs] Reopen after this long without a word
 *   (default 60000: four of the relay's default 15 s heartbeat intervals;
 *   a silent stream hears something at least every two).
 * @property {number} [refreshMarginMs] Fetch a new token this long before
 *   the current one's `exp` (default 30000; 0 waits for `relay.expired`).
 * @property {number} [backoffMs] First retry delay (default 1000), doubled
 *   per failure up to `maxBackoffMs` (default 30000), with jitter.
 * @property {number} [maxBackoffMs]
 */

/**
 * @typedef {object} Subscription
 * @property {() => void} close Stops for good: closes the stream, hands the
 *   connection to another tab, and calls nothing any more.
 * @property {number | null} lastEventId The last id delivered to `onEvent`
 *   (before the first, where the stream started).
 * @property {boolean} leader Whether this tab holds the connection.
 */

/** The defaults of the tuning options. */
export const DEFAULTS = Object.freeze({
  watchdogMs: 60000,
  refreshMarginMs: 30000,
  backoffMs: 1000,
  maxBackoffMs: 30000,
});

const noop = () => {};

/**
 * Subscribes to the relay.
 * @param {Options} options
 * @returns {Subscription}
 */
export function subscribe(options) {
  const o = { ...options };
  const onEvent = o.onEvent ?? noop;
  const onGap = o.onGap ?? noop;
  const onLive = o.onLive ?? noop;
  const onReset = o.onReset ?? noop;
  const onStatus = o.onStatus ?? noop;
  /** @type {number | null} */
  let lastId = o.lastEventId ?? null;
  let leader = false;
  let closed = false;
  /** @type {Connection | null} */
  let conn = null;

  /** @param {RelayEvent} ev */
  const deliver = (ev) => {
    if (lastId !== null && ev.id <= lastId) return; // already delivered
    lastId = ev.id;
    onEvent(ev);
  };

  /** A fresh stream's start: where a reconnect before any event resumes. @param {Live} l */
  const startAt = (l) => {
    if (lastId === null && typeof l.last_event_id === 'number') lastId = l.last_event_id;
  };

  const canShare = typeof BroadcastChannel === 'function' && !!globalThis.navigator?.locks;
  const key = 'sse-relay ' + JSON.stringify([
    new URL(o.url, globalThis.location?.href).href,
    [...(o.subjects ?? [])].sort(),
    [...(o.events ?? [])].sort(),
    !!o.withCredentials,
  ]);
  const channel = (o.shared ?? true) && canShare ? new BroadcastChannel(key) : null;
  const me = Math.random().toString(36).slice(2);
  /** @type {Status} */
  let lastStatus = { state: 'connecting', leader: false };

  /** What the leader's connection reports: to this tab, and to the others. */
  const sink = {
    /** @param {RelayEvent} ev */
    event(ev) {
      channel?.postMessage({ kind: 'event', ev });
      deliver(ev);
    },
    /** @param {Gap} g */
    gap(g) {
      channel?.postMessage({ kind: 'gap', g });
      onGap(g);
    },
    /** @param {Reset} r */
    reset(r) {
      channel?.postMessage({ kind: 'reset', r });
      lastId = 0;
      onReset(r);
    },
    /** @param {Live} l */
    live(l) {
      channel?.postMessage({ kind: 'live', l });
      startAt(l);
      onLive(l);
    },
    /** @param {Omit<Status, 'leader'>} s */
    status(s) {
      lastStatus = { ...s, leader: true };
      channel?.postMessage({ kind: 'status', s });
      onStatus(lastStatus);
    },
    lastId: () => lastId,
  };

  const lead = () => {
    leader = true;
    conn = new Connection(o, sink);
  };

  /** @type {() => void} */
  let releaseLock = noop;
  const abort = new AbortController();
  if (channel) {
    channel.onmessage = ({ data: m }) => {
      if (closed) return;
      if (m.kind === 'hello' && leader) {
        channel.postMessage({ kind: 'welcome', to: m.from, lastId, s: lastStatus });
      } else if (m.kind === 'welcome' && m.to === me && !leader) {
        // Where the stream is now: a takeover resumes from there.
        if (m.lastId !== null && (lastId === null || m.lastId > lastId)) lastId = m.lastId;
        onStatus({ ...m.s, leader: false });
      } else if (m.kind === 'event') deliver(m.ev);
      else if (m.kind === 'gap') onGap(m.g);
      else if (m.kind === 'live') {
        startAt(m.l);
        onLive(m.l);
      }
      else if (m.kind === 'reset') {
        lastId = 0;
        onReset(m.r);
      }
      else if (m.kind === 'status') onStatus({ ...m.s, leader: false });
    };
    onStatus({ state: 'connecting', leader: false });
    channel.postMessage({ kind: 'hello', from: me });
    // Held until this tab closes or unsubscribes; then the next waiting
    // tab gets it and takes over.
    navigator.locks
      .request(key, { signal: abort.signal }, () => {
        if (closed) return undefined;
        lead();
        return new Promise((resolve) => { releaseLock = () => resolve(undefined); });
      })
      .catch(noop); // aborted by close() before it was granted
  } else {
    lead();
  }

  return {
    close() {
      if (closed) return;
      closed = true;
      conn?.stop();
      releaseLock();
      abort.abort();
      channel?.close();
      onStatus({ state: 'closed', leader });
    },
    get lastEventId() { return lastId; },
    get leader() { return leader; },
  };
}

/** The leader's EventSource, reopened as long as it is not stopped. */
class Connection {
  /**
   * @param {Options} o
   * @param {{event(ev: RelayEvent): void, gap(g: Gap): void, live(l: Live): void, reset(r: Reset): void,
   *          status(s: Omit<Status, 'leader'>): void, lastId(): number | null}} sink
   */
  constructor(o, sink) {
    this.o = o;
    this.sink = sink;
    /** @type {EventSource | null} */
    this.es = null;
    /** Bumped by every open and by stop: callbacks of an older one are ignored. */
    this.generation = 0;
    /** Failures since the stream was last live. */
    this.failures = 0;
    /** Whether the last refusal was a 401. */
    this.unauthorized = false;
    /** @type {ReturnType<typeof setTimeout>[]} */
    this.timers = [];
    /** @type {ReturnType<typeof setTimeout> | undefined} */
    this.watchdog = undefined;
    this.open();
  }

  stop() {
    this.generation++;
    this.close();
  }

  close() {
    this.es?.close();
    this.es = null;
    this.timers.forEach(clearTimeout);
    this.timers = [];
    clearTimeout(this.watchdog);
  }

  /**
   * Closes the stream and opens another after a delay: none for planned
   * reopens, exponential backoff with jitter for failures.
   * @param {string} reason
   * @param {boolean} failed
   */
  reopen(reason, failed) {
    const gen = ++this.generation;
    this.close();
    let delayMs = 0;
    if (failed) {
      const base = this.o.backoffMs ?? DEFAULTS.backoffMs;
      const cap = Math.min(this.o.maxBackoffMs ?? DEFAULTS.maxBackoffMs, base * 2 ** this.failures);
      this.failures++;
      delayMs = Math.round(cap / 2 + (Math.random() * cap) / 2);
    }
    this.sink.status({ state: 'reconnecting', reason, delayMs });
    this.timers.push(setTimeout(() => { if (gen === this.generation) this.open(); }, delayMs));
  }

  async open() {
    const gen = ++this.generation;
    this.sink.status({ state: 'connecting' });
    /** @type {string | null | undefined} */
    let token = null;
    try {
      token = this.o.token ? await this.o.token() : null;
    } catch {
      if (gen === this.generation) this.reopen('token-callback', true);
      return;
    }
    if (gen !== this.generation) return; // stopped meanwhile
    const url = this.url(token);
    const es = new EventSource(url, { withCredentials: !!this.o.withCredentials });
    this.es = es;
    this.feedWatchdog();
    this.scheduleRefresh(token);

    /** @param {string} name @param {(e: MessageEvent) => void} fn */
    const on = (name, fn) => es.addEventListener(name, (e) => {
      if (gen !== this.generation) return;
      this.feedWatchdog();
      fn(/** @type {MessageEvent} */ (e));
    });
    for (const name of ['message', ...(this.o.events ?? [])]) {
      on(name, (e) => this.sink.event({ id: Number(e.lastEventId), type: e.type, data: e.data }));
    }
    on('relay.heartbeat', noop);
    on('relay.gap', (e) => this.sink.gap(JSON.parse(e.data)));
    on('relay.live', (e) => {
      this.failures = 0;
      this.unauthorized = false;
      this.sink.status({ state: 'live' });
      this.sink.live(JSON.parse(e.data));
    });
    on('relay.expired', () => this.reopen('expired', false));
    // Its `id: 0` restarts the ids: the next connection resumes from the
    // new stream's beginning.
    on('relay.reset', (e) => this.sink.reset(JSON.parse(e.data)));
    es.onerror = () => {
      if (gen !== this.generation) return;
      // CONNECTING: a network error or the relay ended the stream; the
      // browser would retry on its own, without backoff: take over.
      if (es.readyState !== EventSource.CLOSED) return this.reopen('error', true);
      // CLOSED: a non-200 answer. Ask again to read why.
      es.close();
      readRefusal(url, !!this.o.withCredentials).then((r) => {
        if (gen !== this.generation) return;
        if (r?.status === 401 && this.o.token) {
          // A fresh token at once; 401s in a row back off (the callback
          // may keep answering with a token the relay refuses). Without
          // a callback a 401 is final, like any other 4xx.
          this.reopen('unauthorized', this.unauthorized);
          this.unauthorized = true;
        } else if (!r || r.status === 200 || r.status === 429 || r.status >= 500) {
          this.reopen('error', true);
        } else {
          this.stop();
          this.sink.status({ state: 'refused', status: r.status, error: r.error, message: r.message });
        }
      });
    };
  }

  /** @param {string | null | undefined} token */
  url(token) {
    const u = new URL(this.o.url, globalThis.location?.href);
    for (const s of this.o.subjects ?? []) u.searchParams.append('subject', s);
    u.searchParams.set('heartbeat', 'event');
    if (token) u.searchParams.set('token', token);
    const last = this.sink.lastId();
    if (last !== null) u.searchParams.set('last_event_id', String(last));
    else if (this.o.initial !== undefined) u.searchParams.set('initial', String(this.o.initial));
    return u.href;
  }

  feedWatchdog() {
    clearTimeout(this.watchdog);
    const gen = this.generation;
    this.watchdog = setTimeout(() => {
      if (gen === this.generation) this.reopen('watchdog', true);
    }, this.o.watchdogMs ?? DEFAULTS.watchdogMs);
  }

  /** Reopens with a fresh token before this one's `exp`. @param {string | null | undefined} token */
  scheduleRefresh(token) {
    const margin = this.o.refreshMarginMs ?? DEFAULTS.refreshMarginMs;
    const exp = token ? expiry(token) : null;
    if (!margin || exp === null) return;
    const left = exp - Date.now();
    if (left <= 0) return; // the relay refuses it: handled as a 401
    // Never sooner than half the time left: a short token must not loop.
    const delay = Math.max(left - margin, left / 2);
    const gen = this.generation;
    this.timers.push(setTimeout(() => {
      if (gen === this.generation) this.reopen('token-refresh', false);
    }, delay));
  }
}

/**
 * A JWT's `exp` in ms, or null. Read only to plan a refresh: the relay
 * verifies the token.
 * @param {string} token
 */
function expiry(token) {
  try {
    const claims = JSON.parse(atob(token.split('.')[1].replace(/-/g, '+').replace(/_/g, '/')));
    return typeof claims.exp === 'number' ? claims.exp * 1000 : null;
  } catch {
    return null;
  }
}

/**
 * Why the relay refused `url`: the same request without
 * `Accept: text/event-stream`, which gets the status and JSON body that an
 * EventSource never shows. Null when that request fails too.
 * @param {string} url
 * @param {boolean} withCredentials
 * @returns {Promise<{status: number, error?: string, message?: string} | null>}
 */
export async function readRefusal(url, withCredentials) {
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), 10000);
  try {
    const res = await fetch(url, {
      headers: { accept: 'application/json' },
      credentials: withCredentials ? 'include' : 'same-origin',
      cache: 'no-store',
      signal: abort.signal,
    });
    // Accepted now: a stream, which is not read.
    if (res.ok) return { status: res.status };
    const body = await res.json().catch(() => ({}));
    return { status: res.status, error: body.error, message: body.message };
  } catch {
    return null;
  } finally {
    clearTimeout(timer);
    abort.abort();
  }
}
