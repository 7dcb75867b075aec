// eps console: the live page served at GET / by `eps server`.
//
// Data comes from three endpoints, each with the header `Authorization: <token>`:
//   GET /console/stream    Server-Sent Events, one `event: summary` about every second. Read with
//                          fetch() and a stream reader, since EventSource cannot send a header.
//   GET /console/summary   the same JSON once: polled every 2 s while the stream is down.
// Both take `?range=5m|1h|24h`, the chart's range (the buttons above the chart).
// When no summary has arrived for a while (the stream dropped, the server is gone) the figures are
// greyed and the header says "last update HH:MM:SS" until one arrives again.
//   GET /userEvents/{id}   one user's revenue, for the search box.
// The token is asked for once and kept in sessionStorage (this tab only); a 401 from any call forgets
// it and asks again. Every text from the server goes in with textContent, never as HTML. Money values
// are exact decimal strings and are shown as given, never turned into numbers.
(function () {
  'use strict';

  // ---- settings
  const TOKEN_KEY = 'eps.console.token';
  const POLL_MS = 2000;              // polling period while the stream is down
  const STREAM_RETRY_MIN_MS = 5000;  // first retry of the stream after it failed...
  const STREAM_RETRY_MAX_MS = 30000; // ...doubling up to this
  const STREAM_STALL_MS = 20000;     // no byte for this long: the stream is dead (the server sends ~1/s)
  const REQUEST_TIMEOUT_MS = 10000;  // one poll or search
  const TAIL_MAX = 100;
  const STALE_MS = 5000;             // no summary for this long: the figures are stale (the server sends ~1/s)
  // The chart's ranges: span, time labels (minutes before now) and their unit, the title's words.
  const RANGES = {
    '5m': { span: 5 * 60000, ticks: [5, 4, 3, 2, 1], unit: 60000, label: (m) => m + ' min', title: 'last 5 minutes' },
    '1h': { span: 3600000, ticks: [60, 45, 30, 15], unit: 60000, label: (m) => m + ' min', title: 'last hour, per 10 s' },
    '24h': { span: 86400000, ticks: [24, 18, 12, 6], unit: 3600000, label: (h) => h + ' h', title: 'last 24 hours, per minute' },
  };
  const DASH = '—';

  const $ = (id) => document.getElementById(id);
  const el = {
    connection: $('connection'), updated: $('updated'), changeToken: $('change-token'),
    auth: $('auth'), authError: $('auth-error'), tokenForm: $('token-form'), tokenInput: $('token-input'),
    acceptedRate: $('accepted-rate'), appliedRate: $('applied-rate'),
    acceptedTotal: $('accepted-total'), appliedTotal: $('applied-total'),
    lagEvents: $('lag-events'), lagSeconds: $('lag-seconds'),
    logSize: $('log-size'), logSegments: $('log-segments'),
    users: $('users'), totalRevenue: $('total-revenue'), storeFiguresAt: $('store-figures-at'),
    chart: $('rate-chart'), errorChart: $('error-chart'), latencyChart: $('latency-chart'),
    acceptedApprox: $('accepted-approx'), stale: $('stale'), logSegmentsUnit: $('log-segments-unit'),
    acceptedDetail: $('accepted-detail'),
    processorTile: $('processor-tile'), processorState: $('processor-state'), processorDetail: $('processor-detail'),
    rate4xx: $('rate-4xx'), rate5xx: $('rate-5xx'), p99: $('p99-latency'),
    rangeLabel: $('range-label'), rangeButtons: Array.from(document.querySelectorAll('#range button')),
    topUsers: document.querySelector('#top-users tbody'), topUsersEmpty: $('top-users-empty'),
    tail: $('tail'), tailEmpty: $('tail-empty'), tailPause: $('tail-pause'), tailSampled: $('tail-sampled'),
    searchForm: $('search-form'), searchInput: $('search-input'), searchResult: $('search-result'),
  };

  // ---- state
  const state = {
    token: null,
    // Bumped by every connect and every sign-out: async work started under an older value drops its result.
    gen: 0,
    streamCtl: null,      // AbortController of the open stream
    pollId: 0,            // bumped to stop the polling loop
    polling: false,
    pollTimer: 0,
    retryTimer: 0,
    retryDelay: STREAM_RETRY_MIN_MS,
    live: false,          // a summary came through the stream since it opened
    downWhy: '',          // why the stream is down (the status pill's tooltip)
    summary: null,        // the latest summary shown (the chart redraws from it)
    lastNow: 0,
    lastReceived: 0,      // Date.now() when the latest summary arrived
    stale: false,
    range: '5m',          // the chart's range asked for
    lastSeq: -1,          // highest tail seq shown
    paused: false,
    searchId: 0,
  };

  // ---- token storage: sessionStorage only (falls back to memory when storage is unavailable)
  let memoryToken = null;
  function loadToken() {
    try { return sessionStorage.getItem(TOKEN_KEY); } catch (e) { return memoryToken; }
  }
  function saveToken(token) {
    memoryToken = token;
    try { sessionStorage.setItem(TOKEN_KEY, token); } catch (e) { /* memory only */ }
  }
  function clearToken() {
    memoryToken = null;
    try { sessionStorage.removeItem(TOKEN_KEY); } catch (e) { /* nothing stored */ }
  }

  // ---- HTTP
  class AuthError extends Error {}

  // fetch() with the token; a 401 signs out (once) and throws AuthError.
  async function api(path, options) {
    const opts = Object.assign({ cache: 'no-store', credentials: 'omit' }, options);
    opts.headers = Object.assign({ Authorization: state.token }, opts.headers);
    const gen = state.gen;
    const res = await fetch(path, opts);
    if (res.status === 401 || res.status === 403) {
      const msg = await errorText(res);
      if (gen === state.gen) {
        signOut(res.status === 401
          ? 'Wrong token: the server refused it (401' + (msg ? ': ' + msg : '') + '). Enter the server\u2019s token.'
          : 'This token may not read the data (403' + (msg ? ': ' + msg : '') + '). Enter a token with the read scope.');
      }
      throw new AuthError(String(res.status));
    }
    return res;
  }

  // The `error` string of a JSON error body, else the body's text (short), else ''.
  async function errorText(res) {
    let body = '';
    try { body = await res.text(); } catch (e) { return ''; }
    try {
      const v = JSON.parse(body);
      if (v && typeof v.error === 'string') return v.error;
    } catch (e) { /* not JSON */ }
    return body.length > 200 ? body.slice(0, 200) + '\u2026' : body;
  }

  // ---- connection status
  // The pill's text is exactly one of: live, polling, reconnecting…, connecting…, not connected.
  function setStatus(kind, detail) {
    const text = { live: 'live', polling: 'polling', reconnecting: 'reconnecting\u2026',
      connecting: 'connecting\u2026', idle: 'not connected' }[kind];
    if (el.connection.textContent !== text) el.connection.textContent = text;
    el.connection.dataset.state = kind;
    el.connection.title = detail || '';
  }

  // ---- sign in / out
  function showTokenForm() {
    el.auth.hidden = false;
    el.changeToken.hidden = true;
    el.tokenInput.value = '';
    el.tokenInput.focus();
  }

  // Stops every request and timer, forgets the token and what it showed, and asks for the token again.
  function signOut(message) {
    stopAll();
    state.token = null;
    clearToken();
    clearData();
    el.authError.textContent = message || '';
    setStatus('idle');
    showTokenForm();
  }

  function stopAll() {
    state.gen++;
    stopPolling();
    clearTimeout(state.retryTimer);
    if (state.streamCtl) state.streamCtl.abort();
    state.streamCtl = null;
    state.live = false;
    state.retryDelay = STREAM_RETRY_MIN_MS;
  }

  el.tokenForm.addEventListener('submit', (ev) => {
    ev.preventDefault();
    const token = el.tokenInput.value.trim();
    if (!token) return;
    // A header value must be Latin-1 without control characters: check as fetch() would.
    try { new Headers({ Authorization: token }); } catch (e) {
      el.authError.textContent = 'That token cannot be sent in an HTTP header (only printable ASCII).';
      return;
    }
    el.tokenInput.value = '';
    el.authError.textContent = '';
    saveToken(token);
    start(token);
  });

  el.changeToken.addEventListener('click', () => signOut(''));

  function start(token) {
    state.token = token;
    el.auth.hidden = true;
    el.changeToken.hidden = false;
    stopAll();
    setStatus('connecting');
    openStream(state.gen);
  }

  // ---- the stream, and polling when it is down
  async function openStream(gen) {
    const ctl = new AbortController();
    state.streamCtl = ctl;
    let stall = 0;
    const kick = () => { clearTimeout(stall); stall = setTimeout(() => ctl.abort(), STREAM_STALL_MS); };
    let why = '';
    try {
      kick();
      const res = await api('/console/stream?range=' + state.range, { signal: ctl.signal, headers: { Accept: 'text/event-stream' } });
      const type = res.headers.get('content-type') || '';
      if (!res.ok) throw new Error('stream answered HTTP ' + res.status + ': ' + await errorText(res));
      if (!res.body || !/^text\/event-stream/i.test(type)) throw new Error('stream answered ' + (type || 'no content type'));
      const reader = res.body.getReader();
      const decoder = new TextDecoder();
      const parser = sseParser((frame) => {
        if (gen !== state.gen || frame.event !== 'summary') return;
        let summary;
        try { summary = JSON.parse(frame.data); } catch (e) { return; }
        if (!state.live) {
          // The stream works: polling and retries stop.
          state.live = true;
          state.retryDelay = STREAM_RETRY_MIN_MS;
          stopPolling();
          clearTimeout(state.retryTimer);
        }
        setStatus('live');
        applySummary(summary);
      });
      for (;;) {
        const { value, done } = await reader.read();
        if (gen !== state.gen) { reader.cancel().catch(() => {}); return; }
        if (done) break;
        kick();
        parser.push(decoder.decode(value, { stream: true }));
      }
      parser.push(decoder.decode());
      parser.end();
      why = 'the stream ended';
    } catch (e) {
      if (e instanceof AuthError) return;
      why = ctl.signal.aborted ? 'the stream stalled' : 'stream: ' + (e && e.message ? e.message : e);
    } finally {
      clearTimeout(stall);
    }
    if (gen !== state.gen) return;
    // Down: the figures are stale until a summary arrives; poll meanwhile, and try the stream again later.
    setStale(true);
    state.streamCtl = null;
    state.live = false;
    state.downWhy = why;
    // While polling, the poll loop owns the status (polling, or reconnecting… when polls fail too).
    if (!state.polling) setStatus('reconnecting', why);
    startPolling(gen);
    clearTimeout(state.retryTimer);
    state.retryTimer = setTimeout(() => { if (gen === state.gen) openStream(gen); }, state.retryDelay);
    state.retryDelay = Math.min(state.retryDelay * 2, STREAM_RETRY_MAX_MS);
  }

  function startPolling(gen) {
    if (state.polling) return;
    state.polling = true;
    pollOnce(gen, ++state.pollId);
  }

  function stopPolling() {
    state.polling = false;
    state.pollId++;
    clearTimeout(state.pollTimer);
  }

  async function pollOnce(gen, id) {
    const current = () => gen === state.gen && id === state.pollId;
    if (!current()) return;
    try {
      const res = await api('/console/summary?range=' + state.range, { signal: AbortSignal.timeout(REQUEST_TIMEOUT_MS) });
      if (!res.ok) throw new Error('HTTP ' + res.status + ': ' + await errorText(res));
      const summary = await res.json();
      if (current()) { setStatus('polling', state.downWhy); applySummary(summary); }
    } catch (e) {
      if (e instanceof AuthError) return;
      if (current()) setStatus('reconnecting', 'summary: ' + (e && e.message ? e.message : e));
    }
    if (current()) state.pollTimer = setTimeout(() => pollOnce(gen, id), POLL_MS);
  }

  // The browser is back online: try the stream now rather than at the next retry.
  window.addEventListener('online', () => {
    if (state.token && !state.live && !state.streamCtl) {
      clearTimeout(state.retryTimer);
      openStream(state.gen);
    }
  });

  // A Server-Sent Events parser: push() text as it comes, onFrame({event, data}) per complete frame.
  // Lines end with \n, \r\n or \r; a blank line ends a frame; `:` lines are comments (keep-alives).
  function sseParser(onFrame) {
    let buf = '';
    let event = '';
    let data = [];
    const MAX_BUF = 16 * 1024 * 1024;
    function line(text) {
      if (text === '') {
        if (data.length) onFrame({ event: event || 'message', data: data.join('\n') });
        event = '';
        data = [];
        return;
      }
      if (text[0] === ':') return;
      const i = text.indexOf(':');
      const field = i < 0 ? text : text.slice(0, i);
      let value = i < 0 ? '' : text.slice(i + 1);
      if (value[0] === ' ') value = value.slice(1);
      if (field === 'event') event = value;
      else if (field === 'data') data.push(value);
      // id and retry are not used.
    }
    return {
      push(chunk) {
        buf += chunk;
        const eol = /\r\n|\r|\n/g;
        let start = 0;
        let m;
        while ((m = eol.exec(buf))) {
          // A lone \r at the very end may be the first half of \r\n: wait for more.
          if (m[0] === '\r' && m.index === buf.length - 1) break;
          line(buf.slice(start, m.index));
          start = m.index + m[0].length;
        }
        buf = buf.slice(start);
        if (buf.length > MAX_BUF) throw new Error('an event above 16 MiB');
      },
      end() { if (buf) line(buf); buf = ''; },
    };
  }

  // ---- staleness: greyed figures and "last update HH:MM:SS" while no summary arrives
  function setStale(stale) {
    if (!state.summary) stale = false;  // nothing shown, nothing stale
    state.stale = stale;
    document.body.classList.toggle('stale', stale);
    el.stale.hidden = !stale;
    if (state.summary && isNum(state.lastNow)) {
      el.updated.textContent = (stale ? 'last update ' : 'updated ') + clock(state.lastNow).slice(0, 8);
    }
  }
  setInterval(() => {
    if (state.token && state.summary && !state.stale && Date.now() - state.lastReceived > STALE_MS) setStale(true);
  }, 1000);

  // ---- the range: asked of the server, so the stream is opened again with it
  for (const button of el.rangeButtons) {
    button.addEventListener('click', () => {
      const range = button.dataset.range;
      if (!RANGES[range] || range === state.range) return;
      state.range = range;
      for (const b of el.rangeButtons) b.setAttribute('aria-pressed', String(b === button));
      if (state.token) { stopAll(); setStatus('connecting'); openStream(state.gen); }
    });
  }

  // ---- formatting
  const isNum = (v) => typeof v === 'number' && isFinite(v);
  // Plain integer digits, no separators (tests compare them exactly).
  const int = (v) => (isNum(v) ? String(Math.round(v)) : DASH);
  // A string shown exactly as the server gave it (money).
  const str = (v) => (typeof v === 'string' ? v : isNum(v) ? String(v) : DASH);

  // A rate per second: whole numbers as such, small ones with a decimal.
  function rate(v) {
    if (!isNum(v)) return DASH;
    return v === Math.round(v) || v >= 100 ? String(Math.round(v)) : v.toFixed(1);
  }

  function millis(v) {
    if (!isNum(v)) return DASH;
    return v < 10 ? v.toFixed(2) : v < 100 ? v.toFixed(1) : String(Math.round(v));
  }

  function seconds(v) {
    if (!isNum(v)) return DASH;
    return v < 100 ? v.toFixed(1) : String(Math.round(v));
  }

  function bytes(v) {
    if (!isNum(v)) return DASH;
    const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
    let i = 0;
    while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
    return (i === 0 ? String(v) : v.toFixed(1)) + ' ' + units[i];
  }

  const pad = (n, w) => String(n).padStart(w, '0');
  // Local time HH:MM:SS.mmm
  function clock(ms) {
    if (!isNum(ms)) return DASH;
    const d = new Date(ms);
    return pad(d.getHours(), 2) + ':' + pad(d.getMinutes(), 2) + ':' + pad(d.getSeconds(), 2) + '.' + pad(d.getMilliseconds(), 3);
  }

  function setText(node, text) {
    if (node.textContent !== text) node.textContent = text;
  }

  // ---- rendering a summary
  function applySummary(s) {
    if (!s || typeof s !== 'object') return;
    // Polling and the stream may overlap for a moment: never step back to an older summary
    // (unless much older: the server's clock moved).
    if (isNum(s.now) && s.now < state.lastNow && state.lastNow - s.now < 10000) return;
    if (isNum(s.now)) state.lastNow = s.now;
    state.summary = s;
    state.lastReceived = Date.now();

    const series = Array.isArray(s.series) ? s.series : [];
    const last = series.length ? series[series.length - 1] : null;
    const step = isNum(s.step_seconds) && s.step_seconds > 0 ? s.step_seconds : 1;
    const perSecond = (v) => (isNum(v) ? v / step : null);
    setText(el.acceptedRate, last ? int(perSecond(last.accepted)) : DASH);
    setText(el.appliedRate, last ? int(perSecond(last.applied)) : DASH);
    el.acceptedApprox.hidden = s.accepted_estimated !== true;
    // Why there is no total or why it is approximate; the JetStream log's counts are in `eps status`.
    setText(el.acceptedDetail, s.accepted_estimated === true ? 'estimated past 1 MiB of log'
      : s.accepted_total == null && s.log == null && s.applied_total != null ? 'JetStream: see eps status'
        : 'applied + waiting');
    setText(el.acceptedTotal, int(s.accepted_total));
    setText(el.appliedTotal, int(s.applied_total));
    setText(el.lagEvents, int(s.lag_events));
    setText(el.lagSeconds, seconds(s.lag_seconds));
    setText(el.logSize, s.log ? bytes(s.log.bytes) : DASH);
    setText(el.logSegments, s.log ? int(s.log.segments) : DASH);
    setText(el.logSegmentsUnit, s.log && s.log.segments === 1 ? 'segment' : 'segments');
    setText(el.users, int(s.users));
    setText(el.totalRevenue, str(s.total_revenue));
    // Whole-table figures are read less often with many users: say how old when they are not fresh.
    const figuresAge = isNum(s.store_figures_at) && isNum(s.now) ? s.now - s.store_figures_at : 0;
    el.storeFiguresAt.hidden = !(figuresAge > 2000);
    setText(el.storeFiguresAt, figuresAge > 2000 ? 'as of ' + clock(s.store_figures_at).slice(0, 8) : '');
    el.updated.textContent = isNum(s.now) ? 'updated ' + clock(s.now).slice(0, 8) : '';
    setStale(false);
    renderProcessor(s.processor, s.lag_events);
    // Errors: the latest interval's rate; p99: the latest interval that had ingest requests.
    setText(el.rate4xx, last ? rate(perSecond(last.http_4xx)) : DASH);
    setText(el.rate5xx, last ? rate(perSecond(last.http_5xx)) : DASH);
    const withP99 = series.filter((p) => p && isNum(p.ingest_p99_ms));
    setText(el.p99, withP99.length ? millis(withP99[withP99.length - 1].ingest_p99_ms) : DASH);
    const range = RANGES[s.range] || RANGES['5m'];
    setText(el.rangeLabel, range.title);

    renderTopUsers(Array.isArray(s.top_users) ? s.top_users : []);
    el.tailSampled.hidden = s.tail_sampled !== true;
    if (!state.paused) renderTail(Array.isArray(s.tail) ? s.tail : []);
    drawCharts();
  }

  // The processor tile: applying / idle, caught up / lagging: N events, last commit N s ago / none.
  function renderProcessor(p, lag) {
    let text = DASH, detail = '', kind = 'unknown';
    if (p && typeof p === 'object') {
      kind = typeof p.state === 'string' ? p.state : 'unknown';
      const ago = isNum(p.last_commit_age_seconds) ? 'last commit ' + Math.round(p.last_commit_age_seconds) + ' s ago' : '';
      if (kind === 'applying') { text = 'applying'; detail = ago; }
      else if (kind === 'idle') { text = isNum(lag) ? 'idle, caught up' : 'idle'; detail = ago; }
      else if (kind === 'lagging') { text = 'lagging: ' + int(lag) + ' events'; detail = ago; }
      else if (kind === 'none') { text = 'no processor has run'; detail = 'run eps process'; }
    }
    el.processorTile.dataset.state = kind;
    setText(el.processorState, text);
    setText(el.processorDetail, detail);
  }

  // Back to the empty page (after sign-out: nothing read with the old token stays on screen).
  function clearData() {
    state.summary = null;
    state.lastNow = 0;
    state.lastSeq = -1;
    for (const k of ['acceptedRate', 'appliedRate', 'acceptedTotal', 'appliedTotal', 'lagEvents', 'lagSeconds',
      'logSize', 'logSegments', 'users', 'totalRevenue', 'rate4xx', 'rate5xx', 'p99']) setText(el[k], DASH);
    el.updated.textContent = '';
    el.acceptedApprox.hidden = true;
    setText(el.acceptedDetail, '');
    setStale(false);
    renderProcessor(null);
    renderTopUsers([]);
    el.tail.replaceChildren();
    el.tailEmpty.hidden = false;
    el.tailSampled.hidden = true;
    state.searchId++;
    el.searchResult.replaceChildren();
    drawCharts();
  }

  function renderTopUsers(users) {
    const rows = users.map((u) => {
      const tr = document.createElement('tr');
      const user = document.createElement('td');
      user.className = 'user';
      user.textContent = str(u && u.userId);
      user.title = user.textContent;
      const revenue = document.createElement('td');
      revenue.className = 'revenue';
      revenue.textContent = str(u && u.revenue);
      tr.append(user, revenue);
      return tr;
    });
    el.topUsers.replaceChildren(...rows);
    el.topUsersEmpty.hidden = rows.length > 0;
  }

  // Adds the events not shown yet (by seq), newest first, keeping at most TAIL_MAX.
  function renderTail(events) {
    const valid = events.filter((e) => e && isNum(e.seq));
    if (!valid.length) { el.tailEmpty.hidden = el.tail.children.length > 0; return; }
    const maxSeq = valid.reduce((m, e) => Math.max(m, e.seq), -1);
    if (maxSeq < state.lastSeq) {
      // The server restarted (seq counts from 0 again): start the list afresh.
      el.tail.replaceChildren();
      state.lastSeq = -1;
    }
    const fresh = valid.filter((e) => e.seq > state.lastSeq).sort((a, b) => b.seq - a.seq);
    if (fresh.length) {
      const frag = document.createDocumentFragment();
      for (const e of fresh.slice(0, TAIL_MAX)) frag.append(tailItem(e));
      el.tail.prepend(frag);
      state.lastSeq = maxSeq;
      while (el.tail.children.length > TAIL_MAX) el.tail.lastElementChild.remove();
    }
    el.tailEmpty.hidden = el.tail.children.length > 0;
  }

  function tailItem(e) {
    const li = document.createElement('li');
    li.className = 'new';
    li.dataset.seq = String(e.seq);
    const span = (cls, text) => {
      const n = document.createElement('span');
      n.className = cls;
      n.textContent = text;
      return n;
    };
    const time = document.createElement('time');
    time.className = 'time';
    time.textContent = clock(e.ts);
    if (isNum(e.ts)) time.dateTime = new Date(e.ts).toISOString();
    const user = span('user', str(e.userId));
    user.title = user.textContent;
    const name = span('name', str(e.name));
    if (e.name === 'add_revenue') name.classList.add('add');
    else if (e.name === 'subtract_revenue') name.classList.add('sub');
    li.append(time, ' ', user, ' ', name, ' ', span('value', str(e.value)));
    li.addEventListener('animationend', () => li.classList.remove('new'), { once: true });
    return li;
  }

  el.tailPause.addEventListener('click', () => {
    state.paused = !state.paused;
    el.tailPause.textContent = state.paused ? 'Resume' : 'Pause';
    el.tailPause.setAttribute('aria-pressed', String(state.paused));
    // Resuming shows the latest summary's events at once rather than a second later.
    if (!state.paused && state.summary && Array.isArray(state.summary.tail)) renderTail(state.summary.tail);
  });

  // ---- the charts: accepted/s and applied/s, 4xx/s and 5xx/s, ingest p99 (ms), over the range
  const COLORS = { accepted: '#1f6feb', applied: '#d9730d', http4xx: '#9a6700', http5xx: '#c62828', p99: '#6639ba',
    grid: '#e6e9ed', axis: '#5f6b78', text: '#5f6b78' };
  const CHARTS = [
    { canvas: () => el.chart, name: 'Events per second', unit: '/s', perSecond: true,
      lines: [{ field: 'accepted', color: COLORS.accepted, width: 2.5, label: 'accepted/s' },
        { field: 'applied', color: COLORS.applied, width: 1.5, label: 'applied/s' }] },
    { canvas: () => el.errorChart, name: 'Errors per second', unit: '/s', perSecond: true,
      lines: [{ field: 'http_4xx', color: COLORS.http4xx, width: 2, label: '4xx/s' },
        { field: 'http_5xx', color: COLORS.http5xx, width: 1.5, label: '5xx/s' }] },
    { canvas: () => el.latencyChart, name: 'Ingest p99 latency', unit: ' ms', perSecond: false,
      lines: [{ field: 'ingest_p99_ms', color: COLORS.p99, width: 2, label: 'p99 ms' }] },
  ];

  // A "nice" tick step (1, 2 or 5 times a power of ten) for about `ticks` ticks up to `max`.
  function niceStep(max, ticks) {
    const raw = max / ticks;
    const pow = Math.pow(10, Math.floor(Math.log10(raw)));
    const f = raw / pow;
    return (f <= 1 ? 1 : f <= 2 ? 2 : f <= 5 ? 5 : 10) * pow;
  }

  function compact(v) {
    if (v >= 1e9) return +(v / 1e9).toFixed(1) + 'G';
    if (v >= 1e6) return +(v / 1e6).toFixed(1) + 'M';
    if (v >= 1e4) return +(v / 1e3).toFixed(1) + 'k';
    return String(+v.toFixed(2));
  }

  function drawCharts() {
    for (const chart of CHARTS) drawChart(chart);
  }

  function drawChart(chart) {
    const canvas = chart.canvas();
    const rect = canvas.getBoundingClientRect();
    const w = Math.max(1, Math.floor(rect.width));
    const h = Math.max(1, Math.floor(rect.height));
    const dpr = window.devicePixelRatio || 1;
    // Backing store in device pixels; drawing in CSS pixels.
    if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
      canvas.width = Math.round(w * dpr);
      canvas.height = Math.round(h * dpr);
    }
    const ctx = canvas.getContext('2d');
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, h);
    ctx.font = '11px system-ui, -apple-system, "Segoe UI", Roboto, sans-serif';

    const s = state.summary;
    const range = RANGES[s && s.range] || RANGES[state.range] || RANGES['5m'];
    const step = s && isNum(s.step_seconds) && s.step_seconds > 0 ? s.step_seconds : 1;
    // Counts per interval become rates per second.
    const value = (p, field) => (isNum(p[field]) ? (chart.perSecond ? p[field] / step : p[field]) : null);
    const series = s && Array.isArray(s.series) ? s.series.filter((p) => p && isNum(p.t)) : [];
    const now = s && isNum(s.now) ? s.now : series.length ? series[series.length - 1].t : Date.now();
    const span = range.span;
    const t0 = now - span;

    let max = 0;
    for (const p of series) {
      if (p.t < t0) continue;
      for (const l of chart.lines) { const v = value(p, l.field); if (v !== null) max = Math.max(max, v); }
    }
    const floor = chart.perSecond ? 4 : 1;
    const yStep = niceStep(Math.max(max, floor), 4);
    const yMax = Math.ceil(Math.max(max, floor) / yStep) * yStep;

    // Plot area: room on the left for the widest y label, below for the time labels.
    let labelW = 0;
    for (let v = 0; v <= yMax + yStep / 2; v += yStep) labelW = Math.max(labelW, ctx.measureText(compact(v)).width);
    const left = Math.ceil(labelW) + 10;
    const right = w - 8;
    const top = 8;
    const bottom = h - 20;
    if (right - left < 20 || bottom - top < 20) return;
    const x = (t) => left + ((t - t0) / span) * (right - left);
    const y = (v) => bottom - (v / yMax) * (bottom - top);

    // Horizontal grid lines and y labels.
    ctx.lineWidth = 1;
    ctx.textAlign = 'right';
    ctx.textBaseline = 'middle';
    for (let v = 0; v <= yMax + yStep / 2; v += yStep) {
      const yy = Math.round(y(v)) + 0.5;
      ctx.strokeStyle = v === 0 ? COLORS.axis : COLORS.grid;
      ctx.beginPath(); ctx.moveTo(left, yy); ctx.lineTo(right, yy); ctx.stroke();
      ctx.fillStyle = COLORS.text;
      ctx.fillText(compact(v), left - 6, yy);
    }

    // Time labels relative to the summary's time, with a grid line each.
    ctx.textBaseline = 'top';
    const labels = range.ticks.map((n) => ({ t: now - n * range.unit, text: '\u2212' + range.label(n) })).concat([{ t: now, text: 'now' }]);
    labels.forEach((label, i) => {
      const xx = x(label.t);
      ctx.textAlign = i === 0 ? 'left' : i === labels.length - 1 ? 'right' : 'center';
      ctx.fillStyle = COLORS.text;
      ctx.fillText(label.text, xx, bottom + 5);
      if (i > 0 && i < labels.length - 1) {
        ctx.strokeStyle = COLORS.grid;
        ctx.beginPath(); ctx.moveTo(Math.round(xx) + 0.5, top); ctx.lineTo(Math.round(xx) + 0.5, bottom); ctx.stroke();
      }
    });

    if (!series.length) {
      ctx.textAlign = 'center';
      ctx.textBaseline = 'middle';
      ctx.fillStyle = COLORS.text;
      ctx.fillText(state.token ? 'waiting for data\u2026' : 'no data: enter the token', (left + right) / 2, (top + bottom) / 2);
      canvas.setAttribute('aria-label', chart.name + ' chart, ' + range.title + ': no data yet');
      return;
    }

    // One line per field; a null value (database unreachable, no request) breaks the line.
    const line = (field, color, width) => {
      ctx.strokeStyle = color;
      ctx.lineWidth = width;
      ctx.lineJoin = 'round';
      ctx.beginPath();
      let pen = false;
      for (const p of series) {
        const v = value(p, field);
        if (p.t < t0 || v === null) { pen = false; continue; }
        const px = x(p.t), py = y(v);
        if (pen) ctx.lineTo(px, py); else ctx.moveTo(px, py);
        pen = true;
      }
      ctx.stroke();
    };
    ctx.save();
    ctx.beginPath(); ctx.rect(left, top - 2, right - left + 2, bottom - top + 4); ctx.clip();
    // The first line drawn wider underneath, the next narrower on top: both stay visible when they coincide.
    for (const l of chart.lines) line(l.field, l.color, l.width);
    ctx.restore();

    const last = series[series.length - 1];
    canvas.setAttribute('aria-label', chart.name + ', ' + range.title + '; latest: ' +
      chart.lines.map((l) => rate(value(last, l.field)) + ' ' + l.label).join(', '));
  }

  // Redraw when a canvas changes size (window resize, layout change) or the pixel ratio changes (zoom).
  const resized = new ResizeObserver(() => drawCharts());
  for (const chart of CHARTS) resized.observe(chart.canvas());
  (function watchPixelRatio() {
    if (!window.matchMedia) return;
    const mq = matchMedia('(resolution: ' + (window.devicePixelRatio || 1) + 'dppx)');
    mq.addEventListener('change', () => { drawCharts(); watchPixelRatio(); }, { once: true });
  })();

  // ---- search: one user's revenue
  el.searchForm.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const userId = el.searchInput.value;
    const out = el.searchResult;
    const id = ++state.searchId;
    const show = (...nodes) => { if (id === state.searchId) out.replaceChildren(...nodes); };
    const span = (cls, text) => { const n = document.createElement('span'); n.className = cls; n.textContent = text; return n; };
    out.classList.remove('error');
    if (userId === '') { show(); return; }
    if (!state.token) { out.classList.add('error'); show('Enter the server\u2019s token first.'); return; }
    // "." and ".." would be resolved away as path segments by the URL parser.
    if (userId === '.' || userId === '..') { out.classList.add('error'); show('This id cannot be looked up from a browser.'); return; }
    show(span('muted', 'looking up\u2026'));
    try {
      const res = await api('/userEvents/' + encodeURIComponent(userId), { signal: AbortSignal.timeout(REQUEST_TIMEOUT_MS) });
      if (id !== state.searchId) return;
      if (res.status === 200) {
        const body = await res.json();
        show(span('user', str(body.userId != null ? body.userId : userId)), ': ', span('revenue', str(body.revenue)));
      } else if (res.status === 404) {
        show(span('user', userId), ': ', span('none', 'no events'));
      } else {
        const msg = await errorText(res);
        out.classList.add('error');
        show(res.status === 400 ? (msg || 'invalid user id') : 'HTTP ' + res.status + (msg ? ': ' + msg : ''));
      }
    } catch (e) {
      if (e instanceof AuthError) { show(); return; }
      out.classList.add('error');
      show('Lookup failed: ' + (e && e.name === 'TimeoutError' ? 'no answer in time' : e && e.message ? e.message : e));
    }
  });

  // ---- start
  drawCharts();
  const stored = loadToken();
  if (stored) start(stored);
  else { setStatus('idle'); showTokenForm(); }
})();
