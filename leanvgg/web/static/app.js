"use strict";
// The dashboard: follow the variants' states, upload an image, stream /api/compare/stream's
// rows into the table, then draw the charts.
// Everything from the server is inserted as text, never as HTML.

const $ = (id) => document.getElementById(id);
const charts = {};
const COLORS = ["#2f6fde", "#e07a1f", "#2a9d61", "#b33dc6", "#d64545", "#5b6b82", "#0f9fb0",
  "#c9a227", "#7a4fd6", "#8c564b"];

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

async function readError(response) {
  try {
    const body = await response.json();
    if (body.error) return body.error;
  } catch (_) { /* not JSON: fall through */ }
  return `The server answered ${response.status} ${response.statusText}.`;
}

// Each variant's state (queued, building, compiling, ready, failed) until all have settled.
async function pollVariants() {
  const pill = $("status");
  let settled = false;
  try {
    const response = await fetch("/api/variants");
    const info = await response.json();
    showStates(info.variants);
    if (info.weights !== null) showWeights(info);
    const ready = info.variants.filter((v) => v.state === "ready").length;
    pill.dataset.state = info.status === "warming up" ? (ready ? "partial" : "warming") : info.status;
    pill.textContent = {
      ready: "ready",
      degraded: "ready (some variants failed)",
      failed: "failed",
    }[info.status] || (ready ? `ready: ${ready} of ${info.variants.length} variants`
                             : "warming up…");
    // honest progress: variants answer on Inductor while their runtime choice is measured
    const pending = info.pending_choice || [];
    if (pending.length) pill.textContent += ` · measuring runtimes: ${pending.join(", ")}`;
    else if (info.builder_process) pill.textContent += " · building in the background";
    if (info.status === "failed") showError(info.error || "The baseline failed to load.");
    settled = ["ready", "degraded", "failed"].includes(info.status) && !info.builder_process
      && !pending.length;
  } catch (_) {
    pill.textContent = "server unreachable, retrying…";
  }
  if (!settled) setTimeout(pollVariants, 1000);
}

function showStates(variants) {
  const list = $("states");
  list.replaceChildren();
  for (const v of variants) {
    const item = document.createElement("li");
    item.dataset.state = v.state;
    item.dataset.variant = v.name;
    item.textContent = `${v.name}: ${v.state}`;
    if (v.reason) item.title = v.reason;
    list.appendChild(item);
  }
}

function showWeights(info) {
  const model = $("model");  // the model's identity; names are shown as text, never as HTML
  if (info.model) {
    const m = info.model;
    model.textContent = `Model: ${m.arch}, ${m.classes} classes (labels: ${m.labels}), `
      + `${m.input_size} px, weights ${m.weights}` + (info.labels_note ? `. ${info.labels_note}` : "");
    model.hidden = false;
  }
  const banner = $("weights-banner");
  banner.hidden = info.predictions_meaningful;
  if (!info.predictions_meaningful) {
    banner.textContent = "Random weights: sizes and timings are real; predictions are meaningless.";
  }
}

async function upload(file) {
  if (!file) return;
  showError("");
  const preview = $("preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  $("drop-text").hidden = true;
  const form = new FormData();
  form.append("image", file);
  $("busy").hidden = false;
  $("busy-text").textContent = "Running every variant…";
  const started = performance.now();
  try {
    // Rows arrive as NDJSON lines, each as soon as its variant has run.
    const url = $("throughput").checked ? "/api/compare/stream?batch=8" : "/api/compare/stream";
    const response = await fetch(url, { method: "POST", body: form });
    if (!response.ok) {
      showError(await readError(response));
      return;
    }
    for await (const event of ndjson(response)) {
      if (event.event === "start") {
        $("table").tBodies[0].replaceChildren();
        $("results").hidden = false;
        $("provenance").textContent = event.not_ready && Object.keys(event.not_ready).length
          ? `Not ready yet, left out: ${Object.entries(event.not_ready)
            .map(([name, state]) => `${name} (${state})`).join(", ")}.` : "";
      } else if (event.event === "row") {
        addRow(event.row, null);
      } else if (event.event === "done") {
        render(event.result, (performance.now() - started) / 1000);
      } else if (event.event === "error") {
        showError(event.error);
      }
    }
  } catch (err) {
    showError(`The request failed: ${err.message}`);
  } finally {
    $("busy").hidden = true;
  }
}

async function* ndjson(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffered = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffered += decoder.decode(value, { stream: true });
    let newline;
    while ((newline = buffered.indexOf("\n")) >= 0) {
      const line = buffered.slice(0, newline);
      buffered = buffered.slice(newline + 1);
      if (line.trim()) yield JSON.parse(line);
    }
  }
  if (buffered.trim()) yield JSON.parse(buffered);
}

const fmt = {
  mb: (v) => v.toFixed(1),
  int: (v) => v.toLocaleString("en-US"),
  gmacs: (v) => (v / 1e9).toFixed(2),
  ms: (v) => v.toFixed(1),
  x: (v) => (v === null ? "—" : `${v.toFixed(2)}×`),
  pct: (v) => (v === null ? "—" : `${(100 * v).toFixed(1)}%`),
};

// Columns after the name and the top-3: how to read a value, how to print it, and whether lower
// is better (null: no "best").
// A latency from this request's passes is shown with its count; a p90 needs passes to have one.
const passes = (n) => `${n} pass${n === 1 ? "" : "es"}`;
const fromRequest = (v) => v.latency_source === "request";
const COLUMNS = [
  // (the count is added by addRow, in a span that wraps as a whole under the figure)
  { get: (v) => v.latency_ms.median, show: fmt.ms, lower: true },
  { get: (v) => (fromRequest(v) && v.latency_ms.count < 10 ? null : v.latency_ms.p90),
    show: (ms) => (ms === null ? "—" : fmt.ms(ms)), lower: true },
  // null where the baseline's latency and this variant's are not of the same kind
  { get: (v) => v.speedup, show: fmt.x, lower: false },
  { get: (v) => v.image_ms, show: fmt.ms, lower: null },
  { get: (v) => v.size_mb, show: fmt.mb, lower: true },
  { get: (v) => v.params, show: fmt.int, lower: true },
  { get: (v) => v.macs, show: fmt.gmacs, lower: true },
  { get: (v) => v.input_size, show: String, lower: null },
  // accuracy from the latest `leanvgg evaluate` of these very weights on the runtime that runs
  // them here; "—" when none was measured there
  { get: (v) => (v.accuracy ? v.accuracy.top1 : null), show: fmt.pct, lower: false },
  // one-off preparation (calibration when built, compilation once, loading at start)
  { get: oneOff, show: (s) => (s === null ? "—" : s.toFixed(1)), lower: null },
  // the offline scenario, when asked for: images per second at batch 8
  { get: (v) => (v.throughput ? v.throughput.images_per_s : null),
    show: (s) => (s === null ? "—" : s.toFixed(1)), lower: false },
];

function oneOff(variant) {
  const costs = Object.values(variant.preparation_s);
  return costs.length ? costs.reduce((a, b) => a + b, 0) : null;
}

function cell(row, text, className) {
  const td = row.insertCell();
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

function addRow(variant, best) {
  const row = $("table").tBodies[0].insertRow();
  row.dataset.variant = variant.name;
  if (variant.name === "baseline") row.className = "baseline";
  const name = cell(row, variant.name);
  const tag = document.createElement("span");
  tag.className = "tag";
  const origin = variant.article ? "article" : "beyond the article";
  const batches = variant.batch_runtime !== variant.runtime
    ? ` (batches on ${variant.batch_runtime})` : "";
  tag.textContent = `${origin} · runs on ${variant.runtime}${batches} · ` +
    (variant.fine_tuned === false ? "not fine-tuned" : variant.description);
  const place = variant.placement;
  const medians = (label, values) => `\n${label}: ` + Object.entries(values)
    .map(([r, ms]) => `${r} ${ms.toFixed(1)}`).join(", ");
  tag.title = variant.description + `\n${place.threads} threads; runtime ${place.how}` +
    (place.medians_ms
      ? medians("measured on this machine (median ms, 1 image)", place.medians_ms) +
        (place.batch_medians_ms
          ? medians(`and per batch of ${place.batch_size}`, place.batch_medians_ms) : "")
      : "") + (place.reason ? `\n${place.reason}` : "");
  name.appendChild(tag);
  cell(row, variant.top3.map((p) => `${p.label} ${(100 * p.prob).toFixed(1)}%`).join(" · "));
  COLUMNS.forEach((col, i) => {
    const value = col.get(variant);
    const isBest = best && best[i] !== null && value === best[i];
    const td = cell(row, col.show(value, variant), isBest ? "best" : "");
    if (col.get === COLUMNS[0].get) {
      if (fromRequest(variant)) {
        const count = document.createElement("span");
        count.className = "nowrap";
        count.textContent = `(${passes(variant.latency_ms.count)})`;
        td.append(" ", count);
      }
      const p = variant.profile;
      td.title = p ? `profile: ${p.count} passes, p10–p90 ${fmt.ms(p.p10)}–${fmt.ms(p.p90)} ms, ` +
        `measured ${Math.round(p.age_s)} s ago` : `this request's ${passes(variant.latency_ms.count)} ` +
        "(no profile yet)";
    }
    if (col.get === COLUMNS[2].get && variant.speedup_note) td.title = variant.speedup_note;
    if (col.show === fmt.pct && variant.accuracy) {
      const a = variant.accuracy;
      // 95 % Wilson intervals (absent from reports made before they were recorded)
      const ci = (range) => (range ? ` (95 % CI ${fmt.pct(range[0])}–${fmt.pct(range[1])})` : "");
      td.title = `${a.dataset}, ${a.images} images, on ${a.runtime}: ` +
        `top-1 ${fmt.pct(a.top1)}${ci(a.top1_ci)}, ` +
        `top-3 ${fmt.pct(a.top3)}${ci(a.top3_ci)}, ` +
        `agrees with baseline ${fmt.pct(a.agreement)}${ci(a.agreement_ci)}`;
    }
    if (col.get === oneOff && value !== null) {
      td.title = Object.entries(variant.preparation_s)
        .map(([k, s]) => `${k.replace("_s", "")} ${s.toFixed(1)} s`).join(", ");
    }
  });
}

function render(result, seconds) {
  $("table").tBodies[0].replaceChildren();
  const best = COLUMNS.map((col) => {
    if (col.lower === null) return null;
    const values = result.results.map(col.get).filter((v) => v !== null);
    if (!values.length) return null;
    return col.lower ? Math.min(...values) : Math.max(...values);
  });
  for (const variant of result.results) addRow(variant, best);
  const m = result.machine;
  const profiled = result.results.filter((v) => v.latency_source === "profile");
  const runs = profiled.length ? Math.min(...profiled.map((v) => v.profile.count)) : 0;
  const source = profiled.length === result.results.length
    ? `Latency: each variant's profile on this machine (${runs}+ timed passes, measured apart ` +
      "from requests); this image ran each variant once for its top-3 (\"this image ms\")."
    : profiled.length
      ? `Latency: profiles for ${profiled.length} variants; the others' from this request ` +
        `(${result.runs} pass${result.runs > 1 ? "es" : ""}) until their profile is measured.`
      : `Latency: this request's ${result.runs} timed pass${result.runs > 1 ? "es" : ""} ` +
        `after ${result.warmup} warm-up.`;
  const left = Object.entries(result.not_ready || {});
  $("provenance").textContent =
    `${source} ${result.threads} threads on ${m.cpu} (${m.logical_cpus} logical CPUs), ` +
    `torch ${m.torch}. Results in ${seconds.toFixed(1)} s, of which ` +
    `${(result.queue_wait_ms / 1000).toFixed(1)} s waiting for other measurements.` +
    (left.length ? ` Not ready yet, left out: ${left.map(([n, s]) => `${n} (${s})`).join(", ")}.`
                 : "");
  showWeights(result);
  $("results").hidden = false;
  drawCharts(result.results);
}

function barChart(id, title, labels, values, unit) {
  if (charts[id]) charts[id].destroy();
  charts[id] = new Chart($(id), {
    type: "bar",
    data: { labels, datasets: [{ label: unit, data: values, backgroundColor: COLORS }] },
    options: {
      maintainAspectRatio: false, animation: false,
      plugins: { title: { display: true, text: title }, legend: { display: false } },
      scales: { y: { beginAtZero: true, title: { display: true, text: unit } } },
    },
  });
}

function drawCharts(variants) {
  const labels = variants.map((v) => v.name);
  barChart("chart-latency", "Latency (median)", labels, variants.map((v) => v.latency_ms.median), "ms");
  barChart("chart-size", "Serialized size", labels, variants.map((v) => v.size_mb), "MB");
  barChart("chart-speedup", "Speedup over baseline", labels, variants.map((v) => v.speedup), "×");
  // Latency against accuracy when every variant has been evaluated, else against size.
  const byAccuracy = variants.every((v) => v.accuracy);
  const x = byAccuracy ? (v) => 100 * v.accuracy.top1 : (v) => v.size_mb;
  if (charts.scatter) charts.scatter.destroy();
  charts.scatter = new Chart($("chart-scatter"), {
    type: "scatter",
    data: {
      datasets: variants.map((v, i) => ({
        label: v.name,
        data: [{ x: x(v), y: v.latency_ms.median }],
        backgroundColor: COLORS[i % COLORS.length],
        pointRadius: 7,
      })),
    },
    options: {
      maintainAspectRatio: false, animation: false,
      plugins: { title: { display: true, text: byAccuracy
        ? "Latency vs top-1 accuracy (lower right is better)"
        : "Latency vs size (lower left is better)" } },
      scales: {
        x: { beginAtZero: !byAccuracy, title: { display: true, text: byAccuracy ? "top-1 %" : "size MB" } },
        y: { beginAtZero: true, title: { display: true, text: "median ms" } },
      },
    },
  });
}

function setUpDrop() {
  const drop = $("drop");
  $("file").addEventListener("change", (e) => upload(e.target.files[0]));
  for (const type of ["dragenter", "dragover"]) {
    drop.addEventListener(type, (e) => { e.preventDefault(); drop.classList.add("over"); });
  }
  for (const type of ["dragleave", "drop"]) {
    drop.addEventListener(type, (e) => { e.preventDefault(); drop.classList.remove("over"); });
  }
  drop.addEventListener("drop", (e) => upload(e.dataTransfer.files[0]));
}

// The latest `leanvgg tune` search, if any: latency against accuracy, front joined.
async function loadTune() {
  const response = await fetch("/api/tune");
  if (!response.ok) return;
  const report = (await response.json()).search;
  if (!report) return;  // no search yet: the section stays hidden
  const point = (c) => ({ x: c.latency_ms.median, y: 100 * c.accuracy, c });
  const front = report.candidates.filter((c) => c.on_front)
    .sort((a, b) => a.latency_ms.median - b.latency_ms.median);
  const others = report.candidates.filter((c) => !c.on_front);
  const chosen = report.candidates.find((c) => c.chosen);
  $("tune-summary").textContent =
    `${report.candidates.length} candidates measured (${report.skipped} skipped) for ` +
    `${report.model_id}; budget: at most ${report.max_drop} points below FP32 ` +
    `(${(100 * report.baseline.accuracy).toFixed(2)}%). ` +
    (chosen ? `Chosen as "tuned": ${chosen.key}, ${chosen.latency_ms.median.toFixed(1)} ms.`
            : "No candidate is within the budget.");
  if (charts.tune) charts.tune.destroy();
  charts.tune = new Chart($("chart-tune"), {
    type: "scatter",
    data: {
      datasets: [
        { label: "Pareto front", data: front.map(point), showLine: true, borderColor: COLORS[0],
          backgroundColor: COLORS[0], pointRadius: 6 },
        { label: "other candidates", data: others.map(point), backgroundColor: "#9aa5b1",
          pointRadius: 4 },
        { label: "tuned", data: chosen ? [point(chosen)] : [], backgroundColor: COLORS[2],
          pointRadius: 10, pointStyle: "star" },
      ],
    },
    options: {
      maintainAspectRatio: false, animation: false,
      plugins: {
        title: { display: true, text: "Latency vs accuracy of every candidate (upper left is better)" },
        tooltip: { callbacks: { label: (item) => {
          const c = item.raw.c;
          return `${c.key}: ${item.raw.y.toFixed(2)}%, ${item.raw.x.toFixed(1)} ms, ` +
            `${c.size_mb.toFixed(1)} MB`;
        } } },
      },
      scales: {
        x: { beginAtZero: true, title: { display: true, text: "median ms" } },
        y: { title: { display: true, text: "top-1 %" } },
      },
    },
  });
  $("tune").hidden = false;
}

setUpDrop();
pollVariants();
loadTune();
