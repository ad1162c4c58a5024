// Loads /dashboard in headless Chromium (Debian's /usr/bin/chromium, or $CHROMIUM) against a running server that has
// traffic, waits for its charts and event list to fill from live data, runs the heatmap probe, takes a full-page
// screenshot, and measures in that PNG whether each drawn region holds a picture (not one flat colour).
// Usage: node dashboard.mjs BASE_URL SCREENSHOT.png [PROMPT] [MAX_TOKENS] [RAG_MODE] [THRESHOLD]
// Prints one JSON object on stdout: {dom, regions, probe, errors}. Exits 1 when a wait times out.
import { chromium } from 'playwright-core';
import { PNG } from 'pngjs';
import { existsSync, readFileSync } from 'node:fs';

const [base, screenshot, prompt = 'What is Quantum?', maxTokens = '24', ragMode = 'latent', threshold = ''] = process.argv.slice(2);
const executablePath = process.env.CHROMIUM || '/usr/bin/chromium';
if (!existsSync(executablePath)) {
  console.error(`no Chromium at ${executablePath} (Debian: apt-get install chromium; or set CHROMIUM)`);
  process.exit(2);
}
const WAIT = { timeout: 90_000, polling: 250 };
const CHARTS = ['chart-throughput', 'chart-latency', 'chart-queue', 'chart-rag'];

const browser = await chromium.launch({ executablePath, args: ['--no-sandbox', '--disable-dev-shm-usage', '--disable-gpu'] });
try {
  const page = await browser.newPage({ viewport: { width: 1400, height: 1000 } });
  const errors = [];
  page.on('pageerror', e => errors.push(`page error: ${e.message}`));
  page.on('console', m => { if (m.type() === 'error') errors.push(`console: ${m.text()}`); });
  page.on('response', r => { if (r.status() >= 400) errors.push(`HTTP ${r.status()} ${r.url()}`); });
  await page.goto(new URL('/dashboard', base).href);

  // Live data: every chart has several points and nonzero values, and the event list has rows.
  await page.waitForFunction(ids => ids.every(id => {
    const d = document.getElementById(id).dataset;
    return Number(d.points) >= 4 && Number(d.nonEmpty) > 0;
  }), CHARTS, WAIT);
  await page.waitForFunction(() => Number(document.getElementById('events').dataset.count) > 0, null, WAIT);

  // The heatmap probe: a request typed into the form.
  await page.fill('#probe-text', prompt);
  await page.fill('#probe-max', maxTokens);
  await page.selectOption('#probe-mode', ragMode);
  await page.fill('#probe-threshold', threshold);
  const probeResponse = page.waitForResponse(r => r.url().endsWith('/generate') && r.request().method() === 'POST', { timeout: 120_000 });
  await page.click('#probe-run');
  const probe = await (await probeResponse).json();
  await page.waitForFunction(() => Number(document.getElementById('heatmap').dataset.tokens) > 0, null, WAIT);
  await page.waitForTimeout(300);

  const dom = await page.evaluate(ids => {
    const rect = el => { const r = el.getBoundingClientRect(); return { x: r.left + scrollX, y: r.top + scrollY, width: r.width, height: r.height }; };
    const charts = Object.fromEntries(ids.map(id => {
      const el = document.getElementById(id);
      return [id, { points: Number(el.dataset.points), nonEmpty: Number(el.dataset.nonEmpty), canvases: el.querySelectorAll('canvas').length,
        legend: [...el.querySelectorAll('.u-legend .u-label')].map(l => l.textContent), rect: rect(el.querySelector('.u-over')) }];
    }));
    const table = document.getElementById('events');
    const events = [...table.tBodies[0].rows].map(r => ({
      time: r.cells[0].textContent, requestId: r.cells[1].textContent, query: r.cells[2].textContent,
      snippets: r.cells[3].querySelectorAll('div').length, layers: r.cells[4].textContent, entropy: r.cells[5].textContent,
      retrieval: r.cells[6].textContent, mode: r.cells[7].textContent, result: r.cells[8].textContent,
    }));
    const heat = document.getElementById('heatmap');
    return {
      cards: Object.fromEntries([...document.querySelectorAll('.card')].map(c => [c.querySelector('.label').textContent, c.querySelector('.value').textContent])),
      model: document.getElementById('model').textContent,
      charts, events, eventsRect: rect(table),
      heatmap: { tokens: Number(heat.dataset.tokens), layers: Number(heat.dataset.layers), triggers: Number(heat.dataset.triggers), rect: rect(heat) },
      probeStatus: document.getElementById('probe-status').textContent,
    };
  }, CHARTS);

  await page.screenshot({ path: screenshot, fullPage: true });
  const png = PNG.sync.read(readFileSync(screenshot));
  const scale = png.width / 1400;
  // Share of a region's pixels that differ from its most common colour, how many colours it has, and the share of
  // saturated pixels (a plot's axes, grid and text are grey; its data lines and the heatmap's cells are coloured).
  const region = r => {
    const counts = new Map();
    let saturated = 0;
    const x0 = Math.floor(r.x * scale), y0 = Math.floor(r.y * scale), x1 = Math.min(png.width, Math.ceil((r.x + r.width) * scale)), y1 = Math.min(png.height, Math.ceil((r.y + r.height) * scale));
    let n = 0;
    for (let y = y0; y < y1; y++) for (let x = x0; x < x1; x++) {
      const i = (y * png.width + x) * 4, key = (png.data[i] << 16) | (png.data[i + 1] << 8) | png.data[i + 2];
      counts.set(key, (counts.get(key) || 0) + 1); n++;
      const r = png.data[i], g = png.data[i + 1], b = png.data[i + 2];
      if (Math.max(r, g, b) - Math.min(r, g, b) > 60) saturated++;
    }
    const background = Math.max(0, ...counts.values());
    return { pixels: n, colours: counts.size, nonBackground: n ? 1 - background / n : 0, saturated: n ? saturated / n : 0 };
  };
  const regions = Object.fromEntries([
    ...CHARTS.map(id => [id, region(dom.charts[id].rect)]),
    ['events', region(dom.eventsRect)],
    ['heatmap', region(dom.heatmap.rect)],
  ]);
  process.stdout.write(JSON.stringify({ dom, regions, probe, errors, screenshot: { width: png.width, height: png.height } }));
} finally {
  await browser.close();
}
