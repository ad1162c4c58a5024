// The dashboard: polls the server's own APIs (/metrics, /rag_events, /get_model_info, /get_server_info) at modest rates,
// keeps a bounded window of points, and draws it with uPlot; the heatmap probe sends one /generate request with
// return_router_entropy and draws its layers x tokens entropies on a canvas. Plain script, no build step.
'use strict';

const METRICS_EVERY_MS = 2000;
const EVENTS_EVERY_MS = 3000;
const WINDOW_POINTS = 180;          // 6 minutes at one point per 2 s
const EVENT_ROWS = 20;
const FETCH_TIMEOUT_MS = 10000;

const $ = id => document.getElementById(id);
const model = { layers: 0, experts: 8, threshold: null };

async function fetchWithTimeout(url, init = {}, timeout = FETCH_TIMEOUT_MS) {
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), timeout);
  try {
    return await fetch(url, { ...init, signal: abort.signal, cache: 'no-store' });
  } finally {
    clearTimeout(timer);
  }
}

// Runs task every `every` ms, never two at once, skipping while the tab is hidden.
function poll(task, every) {
  const tick = async () => {
    if (!document.hidden) {
      try { await task(); } catch (e) { setStatus(false, e.message); }
    }
    setTimeout(tick, every);
  };
  tick();
}

function setStatus(ok, message) {
  $('status').dataset.state = ok ? 'ok' : 'down';
  $('status').title = message || '';
  if (ok) $('updated').textContent = 'updated ' + new Date().toLocaleTimeString();
  else $('updated').textContent = 'server unreachable: ' + message;
}

// ---- Prometheus text format: name{labels} value lines into {name: [{labels, value}]} ----

function parsePrometheus(text) {
  const series = new Map();
  for (const line of text.split('\n')) {
    if (!line || line.startsWith('#')) continue;
    const m = /^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)/.exec(line);
    if (!m) continue;
    const labels = {};
    if (m[2]) for (const l of m[2].matchAll(/([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) labels[l[1]] = l[2].replace(/\\(.)/g, (_, c) => c === 'n' ? '\n' : c);
    if (!series.has(m[1])) series.set(m[1], []);
    series.get(m[1]).push({ labels, value: Number(m[3]) });
  }
  return series;
}

const total = (s, name) => (s.get(name) || []).reduce((a, x) => a + x.value, 0);
const gauge = (s, name) => { const v = s.get(name); return v && v.length ? v[0].value : null; };

// Cumulative buckets [{le, count}] of an unlabelled histogram.
function buckets(s, name) {
  return (s.get(name + '_bucket') || []).map(x => ({ le: x.labels.le === '+Inf' ? Infinity : Number(x.labels.le), count: x.value }))
    .sort((a, b) => a.le - b.le);
}

// The q-quantile of the observations between two scrapes, interpolated inside its bucket (as PromQL's histogram_quantile).
function quantile(q, before, after) {
  const b = after.map((x, i) => ({ le: x.le, count: x.count - (before[i] ? before[i].count : 0) }));
  const n = b.length ? b[b.length - 1].count : 0;
  if (n <= 0) return null;
  const rank = q * n;
  let prevLe = 0, prevCount = 0;
  for (const x of b) {
    if (x.count >= rank) {
      if (x.le === Infinity) return prevLe;
      return prevLe + (x.le - prevLe) * (x.count > prevCount ? (rank - prevCount) / (x.count - prevCount) : 0);
    }
    prevLe = x.le; prevCount = x.count;
  }
  return prevLe;
}

// ---- charts ----

const palette = ['#3867d6', '#20a162', '#e67e22', '#8e44ad', '#c0392b'];

function makeChart(id, series, axes) {
  const el = $(id);
  const opts = {
    width: el.clientWidth, height: el.clientHeight - 4,
    legend: { live: false },
    cursor: { drag: { x: false, y: false } },
    scales: axes.scales,
    axes: [{}, ...axes.axes],
    series: [{}, ...series.map((s, i) => ({ stroke: palette[i % palette.length], width: 1.6, spanGaps: false, points: { show: false }, ...s }))],
  };
  const chart = new uPlot(opts, [[], ...series.map(() => [])], el);
  new ResizeObserver(() => chart.setSize({ width: el.clientWidth, height: el.clientHeight - 4 })).observe(el);
  return { chart, el, data: [[], ...series.map(() => [])] };
}

function push(c, t, values) {
  c.data[0].push(t);
  values.forEach((v, i) => c.data[i + 1].push(v));
  if (c.data[0].length > WINDOW_POINTS) c.data.forEach(col => col.shift());
  c.chart.setData(c.data);
  c.el.dataset.points = String(c.data[0].length);
  c.el.dataset.nonEmpty = String(c.data.slice(1).reduce((n, col) => n + col.filter(v => v !== null && v > 0).length, 0));
}

const ms = { values: (u, v) => v.map(x => x == null ? '' : x >= 1000 ? (x / 1000).toFixed(1) + ' s' : +x.toPrecision(2) + ' ms') };
const charts = {
  throughput: makeChart('chart-throughput',
    [{ label: 'generated tok/s', fill: 'rgba(56,103,214,.08)' }, { label: 'prompt tok/s' }, { label: 'requests/s', scale: 'r' }],
    { scales: { y: { range: (u, lo, hi) => [0, Math.max(1, hi)] }, r: { range: (u, lo, hi) => [0, Math.max(1, hi)] } }, axes: [{}, { scale: 'r', side: 1, grid: { show: false } }] }),
  latency: makeChart('chart-latency',
    [{ label: 'TTFT p50' }, { label: 'TTFT p95', dash: [4, 3] }, { label: 'ITL p50' }, { label: 'ITL p95', dash: [4, 3] }, { label: 'E2E p50' }],
    { scales: { y: { distr: 3 } }, axes: [{ ...ms, size: 60 }] }),
  queue: makeChart('chart-queue',
    [{ label: 'running', fill: 'rgba(56,103,214,.08)' }, { label: 'waiting' }, { label: 'retrieving' }, { label: 'KV cache %', scale: '%' }],
    { scales: { y: { range: (u, lo, hi) => [0, Math.max(1, hi)] }, '%': { range: [0, 100] } }, axes: [{}, { scale: '%', side: 1, grid: { show: false } }] }),
  rag: makeChart('chart-rag',
    [{ label: 'layer triggers/s' }, { label: 'retrievals/s' }, { label: 'retrieval errors/s' }, { label: 'retrieval ms', scale: 'ms' }],
    { scales: { y: { range: (u, lo, hi) => [0, Math.max(1, hi)] }, ms: { range: (u, lo, hi) => [0, Math.max(1, hi)] } }, axes: [{}, { scale: 'ms', side: 1, grid: { show: false } }] }),
};

let previous = null;   // {t, s}: the last scrape

async function pollMetrics() {
  const response = await fetchWithTimeout('/metrics');
  if (response.status === 404) { $('metrics-off').hidden = false; setStatus(true); return; }
  if (!response.ok) throw new Error('/metrics ' + response.status);
  const s = parsePrometheus(await response.text());
  const t = Date.now() / 1000;
  setStatus(true);

  const running = gauge(s, 'moe_rag_num_requests_running'), waiting = gauge(s, 'moe_rag_num_requests_waiting');
  const kv = gauge(s, 'moe_rag_kv_cache_usage_ratio');
  $('card-running').textContent = running ?? '–';
  $('card-waiting').textContent = waiting ?? '–';
  $('card-kv').textContent = kv == null ? '–' : (kv * 100).toFixed(1) + '%';
  push(charts.queue, t, [running, waiting, gauge(s, 'moe_rag_num_requests_retrieving'), kv == null ? null : kv * 100]);

  if (previous) {
    const dt = t - previous.t;
    const rate = name => Math.max(0, total(s, name) - total(previous.s, name)) / dt;
    const tokens = rate('moe_rag_generation_tokens_total'), requests = rate('moe_rag_requests_total'), triggers = rate('moe_rag_triggers_total');
    $('card-tokens').textContent = tokens.toFixed(1);
    $('card-requests').textContent = requests.toFixed(2);
    $('card-triggers').textContent = triggers.toFixed(2);
    push(charts.throughput, t, [tokens, rate('moe_rag_prompt_tokens_total'), requests]);

    const q = (p, name) => { const v = quantile(p, buckets(previous.s, name), buckets(s, name)); return v == null ? null : v * 1000; };
    const ttft = 'moe_rag_time_to_first_token_seconds', itl = 'moe_rag_inter_token_latency_seconds', e2e = 'moe_rag_e2e_request_latency_seconds';
    push(charts.latency, t, [q(0.5, ttft), q(0.95, ttft), q(0.5, itl), q(0.95, itl), q(0.5, e2e)]);

    const retrievals = rate('moe_rag_retrieval_seconds_count');
    const retrievalSeconds = total(s, 'moe_rag_retrieval_seconds_sum') - total(previous.s, 'moe_rag_retrieval_seconds_sum');
    push(charts.rag, t, [triggers, retrievals, rate('moe_rag_retrieval_errors_total'), retrievals > 0 ? retrievalSeconds * 1000 / (retrievals * dt) : null]);
  }
  previous = { t, s };
}

// ---- recent RAG events ----

function cell(text, cls) {
  const td = document.createElement('td');
  if (cls) td.className = cls;
  td.textContent = text;
  return td;
}

async function pollEvents() {
  const response = await fetchWithTimeout('/rag_events?limit=' + EVENT_ROWS);
  if (!response.ok) throw new Error('/rag_events ' + response.status);
  const { events } = await response.json();
  const body = $('events').tBodies[0];
  const rows = events.map(e => {
    const tr = document.createElement('tr');
    tr.append(cell(new Date(e.start_time).toLocaleTimeString(), 'num'), cell(e.request_id), cell(e.query, 'query'));
    const snippets = document.createElement('td');
    snippets.className = 'snippets';
    for (const s of e.snippets.slice(0, 3)) { const d = document.createElement('div'); d.textContent = s; d.title = s; snippets.append(d); }
    tr.append(snippets, cell(e.layers.join(', '), 'num'),
      cell(`${e.entropy?.toFixed(2)} > ${e.threshold?.toFixed(2)}`, 'num'),
      cell(e.cached ? 'cached' : `${e.latency_ms.toFixed(1)} ms`, 'num'), cell(e.mode),
      e.error ? cell(e.error, 'error') : cell(e.mode === 'latent' ? `injected ‖v‖=${e.injection_norm.toFixed(2)}` : 'context rebuilt', 'ok'));
    return tr;
  });
  if (rows.length) body.replaceChildren(...rows);
  $('events').dataset.count = String(rows.length);
  $('events-note').textContent = rows.length ? `newest first, the last ${rows.length}` : '';
}

// ---- router-entropy heatmap of one request ----

// A perceptual dark-blue → teal → yellow ramp (stops in the spirit of viridis), t in [0, 1].
const RAMP = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
function color(t) {
  const x = Math.min(1, Math.max(0, t)) * (RAMP.length - 1), i = Math.min(RAMP.length - 2, Math.floor(x)), f = x - i;
  const c = RAMP[i].map((v, k) => Math.round(v + (RAMP[i + 1][k] - v) * f));
  return `rgb(${c[0]},${c[1]},${c[2]})`;
}

function drawHeatmap(entropy, tokens, events, maxEntropy, threshold) {
  const canvas = $('heatmap'), layers = entropy.length ? entropy[0].length : 0, n = entropy.length;
  const cell = Math.max(14, Math.min(34, Math.floor(($('heatmap-wrap').clientWidth - 110) / Math.max(1, n))));
  const left = 34, top = 16, labelHeight = 90, legend = 70;
  const width = left + n * cell + legend, height = top + layers * cell + labelHeight;
  const dpr = window.devicePixelRatio || 1;
  canvas.width = width * dpr; canvas.height = height * dpr;
  canvas.style.width = width + 'px'; canvas.style.height = height + 'px';
  const g = canvas.getContext('2d');
  g.setTransform(dpr, 0, 0, dpr, 0, 0);
  g.fillStyle = '#fff'; g.fillRect(0, 0, width, height);
  g.font = '11px system-ui, sans-serif'; g.textBaseline = 'middle';

  for (let l = 0; l < layers; l++) {
    g.fillStyle = '#6b7385'; g.textAlign = 'right'; g.fillText('L' + l, left - 6, top + l * cell + cell / 2);
    for (let t = 0; t < n; t++) {
      g.fillStyle = color(entropy[t][l] / maxEntropy);
      g.fillRect(left + t * cell, top + l * cell, cell - 1, cell - 1);
    }
  }
  // Triggers: a marker above the token whose forward pass fired, and the layers that fired outlined.
  let marks = 0;
  for (const e of events) {
    const t = e.token_index;
    if (t < 0 || t >= n) continue;
    marks++;
    g.fillStyle = '#d63838'; g.textAlign = 'center'; g.fillText('▼', left + t * cell + cell / 2, top - 7);
    g.strokeStyle = '#d63838'; g.lineWidth = 2;
    for (const l of e.layers) if (l < layers) g.strokeRect(left + t * cell + 1, top + l * cell + 1, cell - 3, cell - 3);
  }
  // The tokens under their columns, turned to fit.
  g.fillStyle = '#1d2330'; g.textAlign = 'right';
  for (let t = 0; t < n; t++) {
    g.save();
    g.translate(left + t * cell + cell / 2, top + layers * cell + 6);
    g.rotate(-Math.PI / 3);
    const shown = tokens[t].replace(/\n/g, '⏎').replace(/ /g, '·');
    g.fillText(shown.length > 14 ? shown.slice(0, 13) + '…' : shown, 0, 0);
    g.restore();
  }
  // Colour legend: 0 .. ln E nats.
  const lx = left + n * cell + 18, lh = Math.max(40, layers * cell);
  for (let y = 0; y < lh; y++) { g.fillStyle = color(1 - y / lh); g.fillRect(lx, top + y, 12, 1); }
  g.fillStyle = '#6b7385'; g.textAlign = 'left';
  g.fillText(maxEntropy.toFixed(2), lx + 16, top + 4); g.fillText('0 nats', lx + 16, top + lh - 4);
  if (threshold != null && threshold <= maxEntropy) {
    // The trigger threshold on the colour scale.
    const y = top + lh * (1 - threshold / maxEntropy);
    g.strokeStyle = '#d63838'; g.lineWidth = 2; g.beginPath(); g.moveTo(lx - 3, y); g.lineTo(lx + 15, y); g.stroke();
    g.fillStyle = '#d63838'; g.fillText(threshold.toFixed(2), lx + 16, Math.min(top + lh - 16, Math.max(top + 16, y)));
  }

  canvas.dataset.tokens = String(n); canvas.dataset.layers = String(layers); canvas.dataset.triggers = String(marks);
  canvas.onmousemove = ev => {
    const r = canvas.getBoundingClientRect(), t = Math.floor((ev.clientX - r.left - left) / cell), l = Math.floor((ev.clientY - r.top - top) / cell);
    $('heatmap-hover').textContent = t >= 0 && t < n && l >= 0 && l < layers
      ? `token ${t} ${JSON.stringify(tokens[t])}, layer ${l}: H = ${entropy[t][l].toFixed(3)} nats` : '';
  };
}

async function probe(event) {
  event.preventDefault();
  const button = $('probe-run'), status = $('probe-status');
  button.disabled = true; status.textContent = 'generating…';
  const rag = {};
  if ($('probe-mode').value) rag.mode = $('probe-mode').value;
  if ($('probe-threshold').value !== '') rag.threshold = Number($('probe-threshold').value);
  const body = {
    text: $('probe-text').value,
    sampling_params: { max_new_tokens: Number($('probe-max').value) || 48, temperature: 0 },
    return_router_entropy: true, return_logprob: true, return_text_in_logprobs: true,
  };
  if (Object.keys(rag).length) body.rag = rag;
  try {
    const started = performance.now();
    const response = await fetchWithTimeout('/generate', { method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify(body) }, 120000);
    const result = await response.json();
    if (!response.ok) throw new Error(result.error ? result.error.message : response.status);
    const meta = result.meta_info;
    const tokens = (meta.output_token_logprobs || []).map(x => x[2] ?? String(x[1]));
    drawHeatmap(meta.output_router_entropy || [], tokens, meta.rag || [], Math.log(model.experts), rag.threshold ?? model.threshold);
    $('probe-output').textContent = result.text;
    status.textContent = `${meta.completion_tokens} tokens, ${(meta.rag || []).length} RAG events, ${((performance.now() - started) / 1000).toFixed(2)} s`;
  } catch (e) {
    status.textContent = 'failed: ' + e.message;
  } finally {
    button.disabled = false;
  }
}

async function loadInfo() {
  try {
    const [info, server] = await Promise.all([fetchWithTimeout('/get_model_info'), fetchWithTimeout('/get_server_info')]);
    if (!info.ok) throw new Error('/get_model_info ' + info.status);
    const m = await info.json();
    model.layers = m.num_moe_layers; model.experts = m.num_experts;
    let text = `${m.served_model_name} · ${m.num_moe_layers} MoE layers × ${m.num_experts} experts · ${m.device} · RAG ${m.default_rag_mode}`;
    if (server.ok) {
      const s = await server.json();
      model.threshold = s.entropy_threshold;
      if (s.entropy_threshold != null) text += ` · threshold ${s.entropy_threshold} nats`;
    }
    $('model').textContent = text;
  } catch (e) {
    $('model').textContent = 'model info unavailable (' + e.message + '); retrying';
    setTimeout(loadInfo, 5000);
  }
}

$('probe').addEventListener('submit', probe);
loadInfo();
poll(pollMetrics, METRICS_EVERY_MS);
poll(pollEvents, EVENTS_EVERY_MS);
