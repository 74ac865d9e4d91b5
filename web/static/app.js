// The study page: upload, a slice viewer (window/level, zoom, pan, full screen, Grad-CAM) beside a strip
// chart, summary, series, downloads. Plain JavaScript on the JSON API (web/app.py); no build step, nothing
// fetched from elsewhere: the page works offline.
//
// Where the viewer's pixels come from (a decision, see web/app.py hu_png): the server keeps the chosen
// series' files in memory and serves each slice at its source resolution as HU (hu.png: red and green
// bytes = HU + 32768). Window/level runs here, on those HU, for any centre/width and on every drag without a
// request. When the server kept no files (a series over models.study.SOURCE_BYTES), the viewer rebuilds an
// approximate HU image from the cached 8-bit windows (image.png, the network's input size): each pixel from
// the narrowest window it does not saturate, so W/L still works within the windows' combined range.
"use strict";

const COLORS = {epidural: "#d62728", intraparenchymal: "#1f77b4", intraventricular: "#2ca02c",
                subarachnoid: "#9467bd", subdural: "#ff7f0e", any: null /* the text colour */};
const DASHES = {epidural: [9, 4], intraparenchymal: [], intraventricular: [2, 3], subarachnoid: [12, 3, 2, 3],
                subdural: [5, 2, 1, 2], any: []};
const PRESETS = [{name: "brain", c: 40, w: 80}, {name: "subdural", c: 80, w: 200}, {name: "bone", c: 600, w: 2800}];
const $ = (id) => document.getElementById(id);
const state = {files: [], study: null, row: 0, views: [], active: 0, zoom: 1, panX: 0, panY: 0, cache: new Map(),
               hover: null};

// ---- upload -------------------------------------------------------------------------------
function setFiles(list, dropped) {
  state.files = Array.from(list);
  $("analyze").disabled = state.files.length === 0;
  const names = state.files.map((f) => f.name);
  const shown = names.slice(0, 6).join(", ") + (names.length > 6 ? `, and ${names.length - 6} more` : "");
  $("chosen").hidden = !names.length;
  $("chosen").textContent = names.length ? `${dropped ? "Dropped" : "Chosen"}: ${shown}` : "";
  $("status").textContent = names.length ? `${names.length} file(s) ready: press Analyze` : "";
}
$("files").addEventListener("change", (e) => setFiles(e.target.files, false));
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault(); drop.classList.remove("over");
  try { $("files").files = e.dataTransfer.files; } catch (err) { /* older browsers: the list below says it */ }
  setFiles(e.dataTransfer.files, true);
});
$("analyze").addEventListener("click", () => analyze(null));

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function plainError(status, body) {
  const said = body && typeof body.error === "string" ? body.error : "";
  if (status === 413) return `The upload is too large. ${said} Upload one study (one series is enough).`;
  if (status === 503) return `The server is busy with other studies. ${said}`;
  if (status >= 500) return `The server could not analyse this study. ${said}`;
  if (said) return `This upload could not be analysed: ${said}`;
  return `The server answered ${status}: upload one .zip or the DICOM files of one head-CT study.`;
}

function setStale(message) {
  const stale = !!message && !!state.study;
  $("results").classList.toggle("stale", stale);
  $("stale").hidden = !stale;
  $("stale").textContent = stale ? message : "";
}

function analyze(seriesIndex) {
  if (!state.files.length) return;
  const form = new FormData();
  for (const f of state.files) form.append("files", f, f.name);
  const xhr = new XMLHttpRequest();
  xhr.open("POST", "/api/studies" + (seriesIndex === null ? "" : `?series=${seriesIndex}`));
  xhr.responseType = "json";
  const bar = $("progress");
  bar.hidden = false; bar.value = 0; bar.classList.remove("failed"); showError("");
  setStale(state.study ? `Analysing a new upload: the results below are still those of the previous study (${state.study.tag}).` : "");
  $("analyze").disabled = true;
  $("status").textContent = "uploading…";
  xhr.upload.onprogress = (e) => { if (e.lengthComputable) bar.value = (90 * e.loaded) / e.total; };
  xhr.upload.onload = () => { bar.value = 90; $("status").textContent = "running the models…"; };
  const failed = (message) => {
    $("analyze").disabled = false;
    bar.value = 0; bar.hidden = true;
    $("status").textContent = "the upload failed";
    showError(message);
    setStale(state.study ? `The last upload failed: the results below belong to the previous study (${state.study.tag}).` : "");
  };
  xhr.onload = () => {
    if (xhr.status === 201 && xhr.response) {
      $("analyze").disabled = false;
      bar.value = 100;
      $("status").textContent = "done";
      show(xhr.response);
    } else {
      failed(plainError(xhr.status, xhr.response));
    }
  };
  xhr.onerror = () => failed("The upload did not reach the server (connection lost?). Try again.");
  xhr.send(form);
}

// ---- a result by link, recent results ------------------------------------------------------
async function openLinked() {
  const id = new URLSearchParams(location.search).get("result");
  if (!id) return;
  $("status").textContent = "loading the result…";
  try {
    const r = await fetch(`/api/studies/${encodeURIComponent(id)}`);
    const body = await r.json().catch(() => null);
    if (!r.ok) throw new Error((body && body.error) || `the server answered ${r.status}`);
    $("status").textContent = "";
    show(body);
  } catch (err) {
    $("status").textContent = "";
    showError(`This link's result is not on the server any more: ${err.message}`);
    forgetRecent(id);
    loadRecent();
    history.replaceState(null, "", location.pathname);
  }
}

// The recent results are this browser's own (localStorage: id, tag, slice count, time; no patient data),
// not a server-wide list: a result's random id is what lets one read it, so the server lists none.
const RECENT = "ich.recent";
function recentList() {
  try { return JSON.parse(localStorage.getItem(RECENT) || "[]").filter((s) => s && typeof s.id === "string"); }
  catch (err) { return []; }
}
function saveRecent(list) {
  try { localStorage.setItem(RECENT, JSON.stringify(list.slice(0, 8))); } catch (err) { /* private mode */ }
}
function remember(study) {
  saveRecent([{id: study.id, tag: study.tag, n_slices: study.slices.length, created: study.created},
              ...recentList().filter((s) => s.id !== study.id)]);
}
function forgetRecent(id) { saveRecent(recentList().filter((s) => s.id !== id)); }

function loadRecent() {
  const list = recentList();
  const ul = $("recent");
  ul.innerHTML = "";
  for (const s of list) {
    const li = document.createElement("li");
    const a = document.createElement("a");
    a.href = `?result=${encodeURIComponent(s.id)}`;
    const when = s.created ? new Date(s.created * 1000).toLocaleString() : "";
    a.textContent = `${s.tag} · ${s.n_slices} slices · ${when}`;
    if (state.study && s.id === state.study.id) a.setAttribute("aria-current", "page");
    li.append(a); ul.append(li);
  }
  $("recent-box").hidden = list.length === 0;
}

// ---- results ------------------------------------------------------------------------------
function show(study) {
  state.study = study;
  remember(study);
  loadRecent();
  state.cache = new Map();
  state.shown = null;
  state.row = maxRow("any");
  setStale("");
  $("results").hidden = false;
  history.replaceState(null, "", `?result=${encodeURIComponent(study.id)}`);
  $("permalink").href = `?result=${encodeURIComponent(study.id)}`;
  $("patient").hidden = true; $("patient").textContent = "";
  $("show-patient").setAttribute("aria-expanded", "false"); $("show-patient").textContent = "Show patient";
  const t = study.timings_s;
  $("timings").textContent = Object.entries(t).map(([k, v]) => `${k} ${v.toFixed(2)} s`).join(" · ");
  renderHead(); renderSeries(); renderSkipped(); renderLegend(); renderViews(); renderSummary(); renderDownloads();
  const select = $("cam-label");
  select.innerHTML = "";
  for (const label of study.labels) select.add(new Option(label, label));
  select.value = "any";
  goTo(state.row);
}

function renderHead() {
  const h = state.study.study || {};
  const parts = [];
  if (h.study_date) parts.push(`study ${h.study_date}`);
  if (h.series_description) parts.push(h.series_description);
  if (h.slice_thickness_mm) parts.push(`${h.slice_thickness_mm} mm slices`);
  parts.push(`${state.study.slices.length} slices`);
  if (h.source_size) parts.push(`${h.source_size[0]}×${h.source_size[1]} px`);
  parts.push(`result ${state.study.tag}`);
  $("study-info").textContent = parts.join(" · ");
}

$("show-patient").addEventListener("click", async () => {
  const box = $("patient"), button = $("show-patient");
  if (!box.hidden) {
    box.hidden = true; box.textContent = ""; button.textContent = "Show patient";
    button.setAttribute("aria-expanded", "false");
    return;
  }
  const r = await fetch(`/api/studies/${state.study.id}/patient`);
  const p = r.ok ? await r.json() : {};
  box.textContent = `patient ${p.patient_name || "(no name)"}, ID ${p.patient_id || "(none)"}`;
  box.hidden = false; button.textContent = "Hide patient"; button.setAttribute("aria-expanded", "true");
});

function renderSeries() {
  const ul = $("series");
  ul.innerHTML = "";
  for (const s of state.study.series) {
    const li = document.createElement("li");
    const thumb = document.createElement(s.thumbnail ? "img" : "span");
    thumb.className = "thumb";
    if (s.thumbnail) {
      thumb.src = `/api/studies/${state.study.id}/series/${s.index}/thumbnail.png`;
      thumb.alt = `series ${s.index + 1}, middle slice`;
    } else {
      thumb.textContent = "–";
      thumb.title = "no picture";
    }
    const text = document.createElement("span");
    const desc = s.description;
    text.textContent = `series ${s.index + 1}${desc ? ` (${desc})` : ""}: ${s.n_files} files, ${s.axial ? "axial" : "not axial"}`;
    li.append(thumb, text);
    if (s.chosen) { li.classList.add("chosen"); text.textContent += " (shown)"; }
    else {
      const b = document.createElement("button");
      b.textContent = "analyze this series";
      b.dataset.series = s.index;
      b.disabled = !state.files.length;
      if (!state.files.length) b.title = "choose the study's files again first: the server keeps no upload";
      b.addEventListener("click", () => analyze(s.index));
      li.append(" ", b);
      if (!s.axial) li.append(" (not axial: the models were trained on axial slices)");
    }
    ul.append(li);
  }
}

function renderSkipped() {
  const rows = state.study.skipped;
  $("skipped-title").textContent = `${rows.length} file(s) not used, each with its reason`;
  const tbody = $("skipped").querySelector("tbody");
  tbody.innerHTML = "";
  for (const r of rows) {
    const tr = tbody.insertRow();
    for (const v of [r.file, r.reason, r.detail || ""]) tr.insertCell().textContent = v;
  }
}

function color(label) { return COLORS[label] || getComputedStyle(document.body).color; }

function swatch(label) {
  const dash = DASHES[label].length ? `stroke-dasharray="${DASHES[label].join(" ")}"` : "";
  return `<svg width="26" height="8" aria-hidden="true"><line x1="0" y1="4" x2="26" y2="4" stroke="${color(label)}" ` +
         `stroke-width="${label === "any" ? 3 : 2}" ${dash}/></svg>`;
}

function renderLegend() {
  $("legend").innerHTML = state.study.labels.map((l) => `<span>${swatch(l)}${l}</span>`).join("");
}

function maxRow(label) {
  const s = state.study.slices;
  let best = 0;
  s.forEach((r, i) => { if (r[label] > s[best][label]) best = i; });
  return best;
}

function ranges(label, threshold) {
  const out = [];
  let start = null;
  state.study.slices.forEach((r, i) => {
    if (r[label] >= threshold && start === null) start = i;
    if (r[label] < threshold && start !== null) { out.push([start, i - 1]); start = null; }
  });
  if (start !== null) out.push([start, state.study.slices.length - 1]);
  return out;
}

function threshold() {
  const t = parseFloat($("threshold").value);
  return Number.isNaN(t) ? 0.5 : Math.max(0, Math.min(1, t));
}

function downloadThreshold() {  // what the download endpoints accept: a number in (0, 1)
  const t = Number($("threshold").value);
  return $("threshold").value.trim() !== "" && t > 0 && t < 1 ? t : null;
}

function jumpButton(row, text) {
  const b = document.createElement("button");
  b.type = "button"; b.className = "link"; b.textContent = text;
  b.title = `go to slice ${row + 1}`;
  b.addEventListener("click", () => goTo(row));
  return b;
}

function renderSummary() {
  const cut = threshold();
  const tbody = $("summary").querySelector("tbody");
  tbody.innerHTML = "";
  const runs = $("runs").querySelector("tbody");
  runs.innerHTML = "";
  for (const label of state.study.labels) {
    const row = maxRow(label);
    const tr = tbody.insertRow();
    tr.dataset.label = label;
    tr.insertCell().textContent = label;
    tr.insertCell().textContent = state.study.slices[row][label].toFixed(3);
    tr.insertCell().append(jumpButton(row, `${row + 1}`));
    const r = ranges(label, cut);
    tr.insertCell().textContent = r.length ? r.map(([a, b]) => (a === b ? `${a + 1}` : `${a + 1}–${b + 1}`)).join(", ") : "none";
    for (const [a, b] of r) {
      let peak = a;
      for (let i = a; i <= b; i++) if (state.study.slices[i][label] > state.study.slices[peak][label]) peak = i;
      const x = runs.insertRow();
      x.dataset.label = label;
      x.insertCell().textContent = label;
      x.insertCell().textContent = a === b ? `${a + 1}` : `${a + 1}–${b + 1}`;
      x.insertCell().textContent = `${b - a + 1}`;
      x.insertCell().append(jumpButton(peak, `${state.study.slices[peak][label].toFixed(3)} at slice ${peak + 1}`));
    }
  }
  if (!runs.rows.length) runs.insertRow().insertCell().textContent = "no slice at or above the threshold";
  const m = state.study.model;
  const folds = Object.entries(m.folds).map(([e, k]) => `${e} (${k} folds)`).join(", ");
  $("model").textContent = `Model: ${folds}; stage two "${m.stage_two}"` +
    (m.oof_score === null ? "" : `; out-of-fold weighted log loss ${m.oof_score.toFixed(4)} (lower is better)`) + ".";
  renderDownloads();
  drawChart();
}
$("threshold").addEventListener("input", () => { if (state.study) renderSummary(); });

function renderDownloads() {
  const t = downloadThreshold();
  $("threshold").setAttribute("aria-invalid", t === null ? "true" : "false");
  $("threshold-note").textContent = t === null ? "downloads need a threshold between 0 and 1 (both excluded)" : "";
  for (const a of document.querySelectorAll("#downloads a[data-kind]")) {
    if (t === null) { a.removeAttribute("href"); a.setAttribute("aria-disabled", "true"); continue; }
    a.removeAttribute("aria-disabled");
    a.href = `/api/studies/${state.study.id}/download/${a.dataset.kind}?threshold=${t}`;
  }
  $("chart-png").download = `${state.study.tag}_chart.png`;
}

// ---- chart ----------------------------------------------------------------------------------
function chartBox(w, h, legend) {
  return {left: 34, right: 10, top: legend ? 34 : 8, bottom: legend ? 72 : 32, w, h};
}
function xOf(i, box) {
  const n = Math.max(state.study.slices.length - 1, 1);
  return box.left + ((box.w - box.left - box.right) * i) / n;
}
function rowAt(x, box) {
  const n = state.study.slices.length;
  const frac = (x - box.left) / (box.w - box.left - box.right);
  return Math.max(0, Math.min(n - 1, Math.round(frac * Math.max(n - 1, 1))));
}
function tickStep(n, px) {
  for (const s of [1, 2, 5, 10, 20, 25, 50, 100, 200, 500]) if ((px * s) / Math.max(n - 1, 1) >= 36) return s;
  return 1000;
}

// One drawing for the page and the PNG: legend (and notice) only in the PNG, which stands alone.
function paintChart(g, w, h, {legend = false, scale = 1} = {}) {
  const style = getComputedStyle(document.body);
  const fg = style.color, bg = style.getPropertyValue("--card").trim() || "#fff";
  const grid = style.getPropertyValue("--grid").trim() || "#ddd", muted = style.getPropertyValue("--muted").trim() || "#666";
  const box = chartBox(w / scale, h / scale, legend);
  const plotH = box.h - box.top - box.bottom;
  const y = (p) => box.top + plotH * (1 - p);
  const s = state.study.slices, n = s.length, cut = threshold();
  g.save(); g.scale(scale, scale);
  g.fillStyle = bg; g.fillRect(0, 0, box.w, box.h);
  // runs of "any" at or above the threshold, shaded
  g.fillStyle = "rgba(214, 39, 40, 0.14)";
  const half = (box.w - box.left - box.right) / Math.max(n - 1, 1) / 2;
  for (const [a, b] of ranges("any", cut)) {
    g.fillRect(Math.max(box.left, xOf(a, box) - half), box.top, xOf(b, box) - xOf(a, box) + 2 * half, plotH);
  }
  g.font = "11px system-ui, sans-serif"; g.lineWidth = 1; g.strokeStyle = grid; g.fillStyle = muted;
  for (const p of [0, 0.25, 0.5, 0.75, 1]) {
    g.beginPath(); g.moveTo(box.left, y(p)); g.lineTo(box.w - box.right, y(p)); g.stroke();
    g.fillText(p.toFixed(2).replace(/^0/, ""), 2, y(p) + 4);
  }
  // slice-number ticks
  const step = tickStep(n, box.w - box.left - box.right);
  g.textAlign = "center";
  for (let i = 0; i < n; i++) {
    const number = i + 1;
    if (number !== 1 && (number % step !== 0 || number - 1 < step * 0.75)) continue;
    g.beginPath(); g.moveTo(xOf(i, box), box.top + plotH); g.lineTo(xOf(i, box), box.top + plotH + 4); g.stroke();
    g.fillText(`${number}`, xOf(i, box), box.top + plotH + 15);
  }
  g.textAlign = "left";
  g.fillText("slice (inferior → superior)", box.left, box.top + plotH + 28);
  g.setLineDash([5, 4]); g.strokeStyle = muted;
  g.beginPath(); g.moveTo(box.left, y(cut)); g.lineTo(box.w - box.right, y(cut)); g.stroke();
  for (const label of state.study.labels) {
    g.strokeStyle = color(label); g.lineWidth = label === "any" ? 2.5 : 1.6;
    g.setLineDash(DASHES[label]);
    g.beginPath();
    s.forEach((r, i) => (i ? g.lineTo(xOf(i, box), y(r[label])) : g.moveTo(xOf(i, box), y(r[label]))));
    g.stroke();
  }
  g.setLineDash([]);
  g.strokeStyle = fg; g.lineWidth = 1.5;
  g.beginPath(); g.moveTo(xOf(state.row, box), box.top); g.lineTo(xOf(state.row, box), box.top + plotH); g.stroke();
  if (state.hover !== null && !legend) {
    g.strokeStyle = muted; g.setLineDash([2, 2]);
    g.beginPath(); g.moveTo(xOf(state.hover, box), box.top); g.lineTo(xOf(state.hover, box), box.top + plotH); g.stroke();
    g.setLineDash([]);
  }
  if (legend) {
    let x = box.left;
    g.font = "12px system-ui, sans-serif";
    for (const label of state.study.labels) {
      g.strokeStyle = color(label); g.lineWidth = label === "any" ? 3 : 2; g.setLineDash(DASHES[label]);
      g.beginPath(); g.moveTo(x, 16); g.lineTo(x + 26, 16); g.stroke(); g.setLineDash([]);
      g.fillStyle = fg; g.fillText(label, x + 30, 20);
      x += 40 + g.measureText(label).width;
    }
    g.fillStyle = muted;
    g.fillText(`threshold ${cut} (dashed grey); shaded: "any" at or above it · ${state.study.tag}`, box.left, box.h - 22);
    g.fillStyle = "#c00"; g.font = "bold 12px system-ui, sans-serif";
    g.fillText(window.ICH.notice, box.left, box.h - 6);
  }
  g.restore();
  return box;
}

function drawChart() {
  if (!state.study) return;
  const c = $("chart");
  const ratio = window.devicePixelRatio || 1;
  const w = Math.max(200, c.clientWidth), h = Math.max(100, c.clientHeight);
  if (c.width !== Math.round(w * ratio) || c.height !== Math.round(h * ratio)) {
    c.width = Math.round(w * ratio); c.height = Math.round(h * ratio);
  }
  state.chartBox = paintChart(c.getContext("2d"), c.width, c.height, {scale: ratio});
}
window.addEventListener("resize", drawChart);

function chartRow(e) {
  const rect = $("chart").getBoundingClientRect();
  return rowAt(e.clientX - rect.left, state.chartBox);
}
function readout(row, e) {
  const r = state.study.slices[row], box = $("readout");
  box.hidden = false;
  box.textContent = `slice ${row + 1}: ` + state.study.labels.map((l) => `${l} ${r[l].toFixed(2)}`).join(" · ");
  const rect = $("chart").getBoundingClientRect();
  const x = e.clientX - rect.left;
  box.style.left = `${Math.max(0, Math.min(rect.width - box.offsetWidth, x + 12))}px`;
}
const chart = $("chart");
chart.addEventListener("pointerdown", (e) => {
  if (!state.study) return;
  try { chart.setPointerCapture(e.pointerId); } catch (err) { /* a pointer the browser no longer tracks */ }
  state.scrubbing = true;
  goTo(chartRow(e));
});
chart.addEventListener("pointermove", (e) => {
  if (!state.study) return;
  const row = chartRow(e);
  if (state.scrubbing) goTo(row);
  state.hover = row;
  readout(row, e);
  drawChart();
});
const endScrub = () => { state.scrubbing = false; };
chart.addEventListener("pointerup", endScrub);
chart.addEventListener("pointercancel", endScrub);
chart.addEventListener("pointerleave", () => { state.hover = null; $("readout").hidden = true; drawChart(); });
$("chart-png").addEventListener("click", (e) => {
  if (!state.study) { e.preventDefault(); return; }
  const c = document.createElement("canvas");
  c.width = 1200; c.height = 440;
  paintChart(c.getContext("2d"), c.width, c.height, {legend: true});
  e.currentTarget.href = c.toDataURL("image/png");
  e.currentTarget.download = `${state.study.tag}_chart.png`;
});

// ---- slice viewer -------------------------------------------------------------------------
// One view per window; each has its own window/level (a drag on it, or a preset for the active view);
// zoom and pan are shared, so the views stay aligned.
function defaultLevels() {
  if (state.study.source_images) return PRESETS.map((p) => ({...p}));
  return (state.study.window_levels || []).map((w) => ({name: w.name, c: w.center, w: w.width}));
}

function renderViews() {
  const views = $("views");
  views.innerHTML = "";
  state.views = [];
  state.zoom = 1; state.panX = 0; state.panY = 0;
  defaultLevels().forEach((level, i) => {
    const div = document.createElement("div");
    div.className = "view";
    div.tabIndex = 0;
    div.setAttribute("role", "group");  // a labelled group: it holds the full-screen button
    div.innerHTML = `<div class="stage"><canvas class="base"></canvas><img class="cam" alt="" hidden></div>` +
      `<span class="cap"></span><span class="pos"></span><button class="fs" type="button" aria-label="full screen" title="full screen (double-click; Esc leaves)">` +
      `<svg width="14" height="14" viewBox="0 0 14 14" aria-hidden="true"><path d="M1 5V1h4M9 1h4v4M13 9v4H9M5 13H1V9" ` +
      `fill="none" stroke="currentColor" stroke-width="2"/></svg></button>`;
    div.dataset.window = level.name;
    views.append(div);
    const view = {div, canvas: div.querySelector("canvas"), cam: div.querySelector(".cam"), level: {...level},
                  initial: {...level}, index: i};
    state.views.push(view);
    attachView(view);
    updateCaption(view);
  });
  renderPresets();
  setActive(0);
  $("source-note").textContent = state.study.source_images
    ? "Images at their source resolution, from the DICOM's HU values; window/level runs in this page."
    : "The server kept no source files for this series (too large): images are the network's input " +
      "windows, rebuilt to HU here; window/level is limited to their range.";
}

function renderPresets() {
  const box = $("presets");
  box.innerHTML = "";
  for (const p of PRESETS) {
    const b = document.createElement("button");
    b.type = "button"; b.dataset.preset = p.name;
    b.textContent = `${p.name} ${p.c}/${p.w}`;
    b.title = `window centre ${p.c} HU, width ${p.w} HU, on the active view (key ${PRESETS.indexOf(p) + 1})`;
    b.addEventListener("click", () => applyPreset(p));
    box.append(b);
  }
}

function applyPreset(p) {
  const v = state.views[state.active];
  v.level = {name: p.name, c: p.c, w: p.w};
  updateCaption(v); paint(v);
}

function setActive(i) {
  state.active = i;
  state.views.forEach((v, k) => v.div.classList.toggle("active", k === i));
}

function updateCaption(v) {
  const text = `${v.level.name} · C ${Math.round(v.level.c)} W ${Math.round(v.level.w)}`;
  v.div.querySelector(".cap").textContent = text;
  v.div.querySelector(".pos").textContent = `${state.row + 1} / ${state.study.slices.length}`;
  v.div.setAttribute("aria-label", `slice ${state.row + 1}, ${text}`);
}

function applyTransform() {
  for (const v of state.views) {
    v.div.querySelector(".stage").style.transform =
      `translate(${state.panX}px, ${state.panY}px) scale(${state.zoom})`;
  }
}
function zoomBy(f) {
  state.zoom = Math.max(1, Math.min(8, state.zoom * f));
  if (state.zoom === 1) { state.panX = 0; state.panY = 0; }
  applyTransform();
}
$("zoom-in").addEventListener("click", () => zoomBy(1.25));
$("zoom-out").addEventListener("click", () => zoomBy(0.8));
$("zoom-reset").addEventListener("click", () => { state.zoom = 1; state.panX = 0; state.panY = 0; applyTransform(); });
$("wl-reset").addEventListener("click", () => {
  for (const v of state.views) { v.level = {...v.initial}; updateCaption(v); paint(v); }
});

function toggleFull(view, on) {
  const full = on === undefined ? !view.div.classList.contains("full") : on;
  for (const v of state.views) v.div.classList.remove("full");
  document.body.classList.toggle("has-full", full);
  if (full) { view.div.classList.add("full"); view.div.focus(); }
}

function attachView(view) {
  const div = view.div;
  div.addEventListener("focus", () => setActive(view.index));
  div.querySelector(".fs").addEventListener("click", (e) => { e.stopPropagation(); toggleFull(view); });
  div.addEventListener("dblclick", () => toggleFull(view));
  div.addEventListener("wheel", (e) => {
    e.preventDefault();
    if (e.ctrlKey) { zoomBy(e.deltaY < 0 ? 1.15 : 1 / 1.15); return; }
    // one slice a wheel notch (deltaY 100) or 50 px of a touchpad's swipe; down = next, as in OHIF
    state.wheel = (state.wheel || 0) + (e.deltaMode === 1 ? 50 * e.deltaY : e.deltaY);
    if (Math.abs(state.wheel) >= 50) { goTo(state.row + Math.sign(state.wheel)); state.wheel = 0; }
  }, {passive: false});
  let drag = null;
  const touches = new Map();  // two fingers: pinch to zoom
  const spread = () => { const [a, b] = [...touches.values()]; return Math.hypot(a.x - b.x, a.y - b.y); };
  div.addEventListener("pointerdown", (e) => {
    if (e.target.closest(".fs")) return;
    setActive(view.index);
    div.focus({preventScroll: true});  // the keys now step slices, even if a slider had the focus
    try { div.setPointerCapture(e.pointerId); } catch (err) { /* a pointer the browser no longer tracks */ }
    if (e.pointerType === "touch") {
      touches.set(e.pointerId, {x: e.clientX, y: e.clientY});
      if (touches.size === 2) { drag = {mode: "pinch", spread: spread(), zoom: state.zoom}; e.preventDefault(); return; }
    }
    const mode = e.pointerType === "touch" ? "swipe" : (e.shiftKey || e.button === 1 || e.button === 2) ? "pan" : "wl";
    drag = {mode, x: e.clientX, y: e.clientY, level: {...view.level}, panX: state.panX, panY: state.panY, row: state.row};
    e.preventDefault();
  });
  div.addEventListener("pointermove", (e) => {
    if (touches.has(e.pointerId)) touches.set(e.pointerId, {x: e.clientX, y: e.clientY});
    if (!drag) return;
    if (drag.mode === "pinch") {
      if (touches.size === 2 && drag.spread > 0) { state.zoom = drag.zoom; zoomBy(spread() / drag.spread); }
      return;
    }
    const dx = e.clientX - drag.x, dy = e.clientY - drag.y;
    if (drag.mode === "wl") {  // right: wider; down: higher centre (OHIF's direction)
      const k = Math.max(0.5, drag.level.w / 250);
      view.level = {name: "custom", c: drag.level.c + dy * k, w: Math.max(1, drag.level.w + dx * k)};
      updateCaption(view); paint(view);
    } else if (drag.mode === "pan") {
      state.panX = drag.panX + dx; state.panY = drag.panY + dy; applyTransform();
    } else {
      goTo(drag.row - Math.trunc(dy / 16));
    }
  });
  const end = (e) => { touches.delete(e.pointerId); drag = null; };
  div.addEventListener("pointerup", end);
  div.addEventListener("pointercancel", end);
  div.addEventListener("contextmenu", (e) => e.preventDefault());
}

// Slice pixels: {w, h, hu: Int32Array} per row, cached (a few dozen slices) and prefetched around the current one.
function sliceUrl(row, window) {
  return window === undefined ? `/api/studies/${state.study.id}/slices/${row}/hu.png`
    : `/api/studies/${state.study.id}/slices/${row}/image.png?window=${encodeURIComponent(window)}`;
}
async function pixels(url) {
  const r = await fetch(url);
  if (!r.ok) throw new Error(`${r.status}`);
  const bitmap = await createImageBitmap(await r.blob(), {colorSpaceConversion: "none", premultiplyAlpha: "none"});
  const c = document.createElement("canvas");
  c.width = bitmap.width; c.height = bitmap.height;
  const g = c.getContext("2d", {willReadFrequently: true});
  g.drawImage(bitmap, 0, 0);
  return g.getImageData(0, 0, c.width, c.height);
}
async function fetchSlice(row) {
  if (state.study.source_images) {
    const d = await pixels(sliceUrl(row));
    const n = d.width * d.height, hu = new Int32Array(n), px = d.data;
    for (let i = 0; i < n; i++) hu[i] = px[4 * i] * 256 + px[4 * i + 1] - 32768;
    return {w: d.width, h: d.height, hu};
  }
  // fallback: each pixel from the narrowest cached window that it does not saturate
  const levels = state.study.window_levels;
  const images = await Promise.all(levels.map((l) => pixels(sliceUrl(row, l.name))));
  const order = levels.map((l, i) => i).sort((a, b) => levels[a].width - levels[b].width);
  const w = images[0].width, h = images[0].height, n = w * h, hu = new Int32Array(n);
  for (let i = 0; i < n; i++) {
    let value = null;
    for (const k of order) {
      const v = images[k].data[4 * i], l = levels[k];
      if (v > 0 && v < 255) { value = l.center - l.width / 2 + (v / 255) * l.width; break; }
    }
    if (value === null) {
      const k = order[order.length - 1], l = levels[k];
      value = images[k].data[4 * i] === 0 ? l.center - l.width / 2 : l.center + l.width / 2;
    }
    hu[i] = Math.round(value);
  }
  return {w, h, hu};
}
function slice(row) {
  const cache = state.cache;
  if (!cache.has(row)) {
    const p = fetchSlice(row).catch((err) => { cache.delete(row); throw err; });
    cache.set(row, p);
    if (cache.size > 48) cache.delete(cache.keys().next().value);
  }
  return cache.get(row);
}

function paint(view) {
  const data = state.shown;
  if (!data) return;
  const c = view.canvas;
  if (c.width !== data.w || c.height !== data.h) { c.width = data.w; c.height = data.h; }
  const g = c.getContext("2d");
  const out = g.createImageData(data.w, data.h);
  const px = new Uint32Array(out.data.buffer);
  const lo = view.level.c - view.level.w / 2, scale = 255 / view.level.w;
  const lut = new Uint32Array(4096), base = -1024;  // HU -1024..3071 (to_hu's range); beyond: the ends
  for (let i = 0; i < 4096; i++) {
    const v = Math.max(0, Math.min(255, Math.round((base + i - lo) * scale)));
    lut[i] = 0xff000000 | (v << 16) | (v << 8) | v;
  }
  const hu = data.hu;
  for (let i = 0; i < hu.length; i++) {
    const k = hu[i] - base;
    px[i] = lut[k < 0 ? 0 : k > 4095 ? 4095 : k];
  }
  g.putImageData(out, 0, 0);
}

function goTo(row) {
  const n = state.study.slices.length;
  state.row = Math.max(0, Math.min(n - 1, row));
  const r = state.study.slices[state.row];
  $("slice-label").textContent = `${state.row + 1} of ${n}`;
  $("slice-probs").textContent = `z ${r.z.toFixed(1)} mm · ` +
    state.study.labels.map((l) => `${l} ${r[l].toFixed(3)}`).join(" · ");
  const wanted = state.row;
  slice(wanted).then((data) => {
    if (state.row !== wanted) return;
    state.shown = data; state.shownRow = wanted;
    for (const v of state.views) { paint(v); updateCaption(v); }
    $("views").dataset.row = `${wanted}`;
  }).catch(() => { $("source-note").textContent = `slice ${wanted + 1} could not be loaded`; });
  for (const d of [1, -1, 2, -2]) if (state.row + d >= 0 && state.row + d < n) slice(state.row + d).catch(() => {});
  updateOverlay();
  drawChart();
}

function updateOverlay() {
  const on = $("overlay-toggle").checked;
  const label = $("cam-label").value || "any";
  const opacity = $("opacity").value / 100;
  const src = `/api/studies/${state.study.id}/slices/${state.row}/cam.png?label=${encodeURIComponent(label)}`;
  $("cam-scale").hidden = !on;
  for (const view of state.views) {
    const img = view.cam;
    img.hidden = !on;
    img.style.opacity = opacity;
    if (on && img.getAttribute("src") !== src) {
      $("cam-status").textContent = "computing Grad-CAM…";
      img.onload = () => { $("cam-status").textContent = `Grad-CAM: ${label}`; };
      img.onerror = () => { $("cam-status").textContent = "Grad-CAM failed"; };
      img.src = src;
    }
  }
  if (!on) $("cam-status").textContent = "";
}
$("overlay-toggle").addEventListener("change", updateOverlay);
$("cam-label").addEventListener("change", updateOverlay);
$("opacity").addEventListener("input", updateOverlay);
$("prev").addEventListener("click", () => goTo(state.row - 1));
$("next").addEventListener("click", () => goTo(state.row + 1));

// Keys step slices unless a control that uses them has the focus (the opacity slider, the threshold, a list).
function ownsKeys(el) {
  if (!el) return false;
  if (el.isContentEditable || el.tagName === "SELECT" || el.tagName === "TEXTAREA") return true;
  return el.tagName === "INPUT" && !["checkbox", "button", "submit", "reset", "file"].includes(el.type);
}
document.addEventListener("keydown", (e) => {
  if (e.key === "Escape" && document.body.classList.contains("has-full")) { toggleFull(state.views[0], false); return; }
  if (!state.study || e.altKey || e.ctrlKey || e.metaKey || ownsKeys(document.activeElement)) return;
  const n = state.study.slices.length, page = Math.max(2, Math.round(n / 10));
  const moves = {ArrowLeft: -1, ArrowDown: -1, ArrowRight: 1, ArrowUp: 1, PageDown: -page, PageUp: page};
  if (e.key in moves) goTo(state.row + moves[e.key]);
  else if (e.key === "Home") goTo(0);
  else if (e.key === "End") goTo(n - 1);
  else if (["1", "2", "3"].includes(e.key)) applyPreset(PRESETS[Number(e.key) - 1]);  // OHIF's preset keys
  else if (e.key === "+" || e.key === "=") zoomBy(1.25);
  else if (e.key === "-") zoomBy(0.8);
  else if (e.key === "f") toggleFull(state.views[state.active]);
  else return;
  e.preventDefault();
});

loadRecent();
openLinked();
