// Bastion's built-in dashboard: polls /dashboard/api/summary and draws it with uPlot.
// Each chart records how many finite points it drew in data-points (the browser test reads it).
"use strict";

// The screening tiers (suspicious, review copies dropped) are shown only to an operator: open
// the page as /dashboard#token=<metrics or admin token>. The fragment never leaves the browser;
// the token goes only in the Authorization header of the page's own data requests.
function authHeaders() {
  const match = /(?:^|[#&])token=([^&]+)/.exec(window.location.hash);
  return match ? { Authorization: "Bearer " + decodeURIComponent(match[1]) } : {};
}


const POLL_MS = 2000;
const WIDTH = 560, HEIGHT = 240;
const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04", "#db2777"];
// a verdict always has its own colour, whatever order the series come in: clean is green,
// suspicious amber, adversarial (withheld) red
const VERDICT_COLORS = { clean: "#16a34a", served: "#16a34a", suspicious: "#ca8a04",
  review_dropped: "#9333ea", adversarial: "#dc2626", withheld: "#dc2626" };
const MIN_TIME_SPAN_S = 120;  // one sample must not stretch the time axis over years
const Y_AXIS = { size: 64 };  // room for "1,234.5" without touching the plot or its neighbour
const charts = {};

function countPoints(data) {
  let n = 0;
  for (let s = 1; s < data.length; s++) for (const v of data[s]) if (v !== null && Number.isFinite(v)) n++;
  return n;
}

// a time axis spans at least MIN_TIME_SPAN_S, centred on its data
function timeRange(u, min, max) {
  if (min === null || max === null) return [min, max];
  const pad = Math.max(0, MIN_TIME_SPAN_S - (max - min)) / 2;
  return [min - pad, max + pad];
}

function draw(id, series, data, opts = {}) {
  const el = document.getElementById(id);
  const key = id + "|" + series.map(s => s.label).join(",");
  const styled = series.map((s, i) => ({
    stroke: VERDICT_COLORS[s.label] ?? COLORS[i % COLORS.length], width: 2, spanGaps: false, ...s }));
  if (!charts[key]) {
    el.replaceChildren();
    for (const k of Object.keys(charts)) if (k.startsWith(id + "|")) delete charts[k];
    const time = opts.time !== false;
    charts[key] = new uPlot({
      width: WIDTH, height: HEIGHT,
      scales: { x: time ? { time: true, range: timeRange } : { time: false }, ...(opts.scales || {}) },
      axes: opts.axes || [{}, Y_AXIS],
      series: [{}, ...styled],
    }, data, el);
  } else {
    charts[key].setData(data);
  }
  const u = charts[key];
  el.dataset.points = countPoints(data);
  el.dataset.xSpan = String((u.scales.x.max ?? 0) - (u.scales.x.min ?? 0));
  el.dataset.colors = JSON.stringify(Object.fromEntries(styled.map(s => [s.label, s.stroke])));
}

function bars(align) { return uPlot.paths.bars({ size: [0.4, 60], align }); }

function drawDistribution(id, labels, windowShares, referenceShares) {
  const x = labels.map((_, i) => i);
  draw(id, [
    { label: "window", fill: "#2563ebaa", paths: bars(-1), points: { show: false } },
    { label: "reference", fill: "#9ca3afaa", stroke: "#6b7280", paths: bars(1), points: { show: false } },
  ], [x, windowShares, referenceShares], {
    time: false,
    scales: { x: { time: false, range: [-0.6, labels.length - 0.4] }, y: { range: [0, null] } },
    // a label under every bar (the last one too), turned when they would not fit side by side
    axes: [{ splits: () => x, values: () => labels, rotate: labels.length > 8 ? -35 : 0,
             size: labels.length > 8 ? 58 : 40, gap: 4 }, Y_AXIS],
  });
  document.getElementById(id).dataset.labels = JSON.stringify(labels);
}

// The bins are the reference's quantiles (deciles): label them by reference mass, not by value,
// since confidence piles up just below 1.
function binLabels(edges) {
  const step = 100 / (edges.length + 1);
  return [...edges, null].map((_, i) => `${Math.round(i * step)}–${Math.round((i + 1) * step)}%`);
}

function cells(values) {
  const tr = document.createElement("tr");
  for (const [text, cls] of values) {
    const td = document.createElement("td");
    td.textContent = text;
    if (cls) td.className = cls;
    tr.append(td);
  }
  return tr;
}

// Incidents come only with an operator's token (a prober must not learn it was detected).
function renderIncidents(incidents) {
  document.getElementById("incidents-note").hidden = incidents !== undefined;
  const rows = (incidents || []).map(i => cells([[String(i.id)], [i.state, i.state],
    [new Date(i.opened_at * 1000).toLocaleString()], [String(i.subjects)], [String(i.entries)], [i.title]]));
  const body = document.querySelector("#incidents tbody");
  body.replaceChildren(...rows);
  body.dataset.rows = rows.length;
}

function render(summary) {
  renderIncidents(summary.incidents);
  const s = summary.series;
  draw("chart-rps", [{ label: "requests/s" }], [s.t, s.rps]);
  draw("chart-latency", [{ label: "p50 ms" }, { label: "p99 ms" }], [s.t, s.p50_ms, s.p99_ms]);
  draw("chart-errors", [{ label: "errors/s" }], [s.t, s.errors_per_s]);
  draw("chart-batch", [{ label: "rows per batch" }], [s.t, s.batch_size]);
  const verdicts = Object.keys(s.verdicts_per_s);
  draw("chart-verdicts", verdicts.map(v => ({ label: v })), [s.t, ...verdicts.map(v => s.verdicts_per_s[v])]);
  draw("chart-containment", [{ label: "throttled (429)" }, { label: "contained (403)" }],
       [s.t, s.contained_per_s.throttle, s.contained_per_s.refuse]);

  const monitored = summary.models.filter(m => m.reference);
  const status = document.getElementById("status");
  const alarms = monitored.filter(m => m.alarm);
  status.className = "badge " + (alarms.length ? "alarm" : "ok");
  status.textContent = alarms.length
    ? "drift: " + alarms.map(m => `${m.model} (${m.active.join(", ")})`).join("; ")
    : `no drift (${monitored.length} model${monitored.length === 1 ? "" : "s"} monitored)`;
  document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
  if (!monitored.length) {
    clearDrift();
    return;
  }

  const m = monitored[0];
  document.getElementById("drift-caption").textContent = `Drift scores — ${m.model} v${m.version}`;
  const stats = Object.keys(m.thresholds).filter(k => k !== "mmd_embedding");
  const history = m.history;
  draw("chart-drift", [...stats.map(k => ({ label: k })), { label: "MMD p-value" }],
    [history.map(h => h.time), ...stats.map(k => history.map(h => h.scores[k] ?? null)),
     history.map(h => h.pvalue ?? null)]);
  if (m.window) {
    const ref = m.reference;
    drawDistribution("chart-confidence", binLabels(ref.edges.confidence),
      m.window.proportions.confidence, ref.proportions.confidence);
    drawDistribution("chart-classes", ref.classes.map((_, i) => String(i)), m.window.classes, ref.classes);
  }
  const rows = monitored.flatMap(x => x.events).sort((a, b) => b.time - a.time).slice(0, 20).map(e =>
    cells([[new Date(e.time * 1000).toLocaleTimeString()], [`${e.model} v${e.version}`],
      [e.statistic], [e.kind, e.kind], [Number.isFinite(e.value) ? e.value.toPrecision(4) : "—"],
      [String(e.threshold)], [String(e.at_image)]]));
  document.querySelector("#events tbody").replaceChildren(...rows);
}

// No monitored model (any more): drift charts and events must not keep showing old data.
function clearDrift() {
  for (const id of ["chart-drift", "chart-confidence", "chart-classes"]) {
    for (const k of Object.keys(charts)) if (k.startsWith(id + "|")) delete charts[k];
    const el = document.getElementById(id);
    el.replaceChildren();
    el.dataset.points = 0;
  }
  document.querySelector("#events tbody").replaceChildren();
}

async function poll() {
  try {
    const response = await fetch("/dashboard/api/summary", { cache: "no-store", headers: authHeaders() });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    render(await response.json());
    document.body.dataset.ready = "true";
  } catch (err) {
    const status = document.getElementById("status");
    status.className = "badge alarm";
    status.textContent = "dashboard error: " + err.message;
  }
  setTimeout(poll, POLL_MS);
}

poll();
