// The study page: upload, series, strip chart, slice viewer with Grad-CAM, summary, downloads.
// Plain JavaScript on the JSON API (web/app.py); no build step.
"use strict";

const COLORS = {epidural: "#d62728", intraparenchymal: "#1f77b4", intraventricular: "#2ca02c",
                subarachnoid: "#9467bd", subdural: "#ff7f0e", any: "#111111"};
const $ = (id) => document.getElementById(id);
const state = {files: [], study: null, row: 0};

// ---- upload -------------------------------------------------------------------------------
function setFiles(list) {
  state.files = Array.from(list);
  $("analyze").disabled = state.files.length === 0;
  $("status").textContent = state.files.length ? `${state.files.length} file(s) chosen` : "";
}
$("files").addEventListener("change", (e) => setFiles(e.target.files));
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); setFiles(e.dataTransfer.files); });
$("analyze").addEventListener("click", () => analyze(null));

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function analyze(seriesIndex) {
  if (!state.files.length) return;
  const form = new FormData();
  for (const f of state.files) form.append("files", f, f.name);
  const xhr = new XMLHttpRequest();
  xhr.open("POST", "/api/studies" + (seriesIndex === null ? "" : `?series=${seriesIndex}`));
  xhr.responseType = "json";
  const bar = $("progress");
  bar.hidden = false; bar.value = 0; showError("");
  $("analyze").disabled = true;
  $("status").textContent = "uploading…";
  xhr.upload.onprogress = (e) => {
    if (e.lengthComputable) bar.value = (100 * e.loaded) / e.total;
  };
  xhr.upload.onload = () => { bar.value = 100; $("status").textContent = "running the models…"; };
  xhr.onload = () => {
    $("analyze").disabled = false;
    if (xhr.status === 201 && xhr.response) {
      $("status").textContent = "done";
      show(xhr.response);
    } else {
      $("status").textContent = "";
      showError((xhr.response && xhr.response.error) || `the server answered ${xhr.status}`);
    }
  };
  xhr.onerror = () => { $("analyze").disabled = false; showError("the upload failed (connection lost?)"); };
  xhr.send(form);
}

// ---- results ------------------------------------------------------------------------------
function show(study) {
  state.study = study;
  state.row = maxRow("any");
  $("results").hidden = false;
  const t = study.timings_s;
  $("timings").textContent = Object.entries(t).map(([k, v]) => `${k} ${v.toFixed(2)} s`).join(" · ");
  renderSeries(); renderSkipped(); renderLegend(); renderViews(); renderSummary(); renderDownloads();
  const select = $("cam-label");
  select.innerHTML = "";
  for (const label of study.labels) select.add(new Option(label, label));
  select.value = "any";
  goTo(state.row);
}

function renderSeries() {
  const ul = $("series");
  ul.innerHTML = "";
  for (const s of state.study.series) {
    const li = document.createElement("li");
    li.textContent = `series ${s.index + 1}: ${s.n_files} files, ${s.axial ? "axial" : "not axial"}`;
    if (s.chosen) { li.classList.add("chosen"); li.textContent += " (shown)"; }
    else {
      const b = document.createElement("button");
      b.textContent = "analyze this series";
      b.dataset.series = s.index;
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

function renderLegend() {
  $("legend").innerHTML = state.study.labels
    .map((l) => `<span><i style="background:${COLORS[l]}"></i>${l}</span>`).join("");
}

function renderViews() {
  const views = $("views");
  views.innerHTML = "";
  for (const w of state.study.windows) {
    const div = document.createElement("div");
    div.className = "view";
    div.innerHTML = `<img class="base" alt="${w} window"><img class="cam" alt="" hidden><span class="cap">${w}</span>`;
    div.dataset.window = w;
    views.append(div);
  }
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

function renderSummary() {
  const cut = threshold();
  const tbody = $("summary").querySelector("tbody");
  tbody.innerHTML = "";
  for (const label of state.study.labels) {
    const row = maxRow(label);
    const tr = tbody.insertRow();
    tr.dataset.label = label;
    tr.insertCell().textContent = label;
    tr.insertCell().textContent = state.study.slices[row][label].toFixed(3);
    tr.insertCell().textContent = row + 1;
    const r = ranges(label, cut);
    tr.insertCell().textContent = r.length ? r.map(([a, b]) => (a === b ? `${a + 1}` : `${a + 1}–${b + 1}`)).join(", ") : "none";
  }
  const m = state.study.model;
  const folds = Object.entries(m.folds).map(([e, k]) => `${e} (${k} folds)`).join(", ");
  $("model").textContent = `Model: ${folds}; stage two "${m.stage_two}"` +
    (m.oof_score === null ? "" : `; out-of-fold weighted log loss ${m.oof_score.toFixed(4)} (lower is better)`) + ".";
  drawChart();
}
$("threshold").addEventListener("input", renderSummary);

function renderDownloads() {
  for (const a of document.querySelectorAll("#downloads a[data-kind]")) {
    a.href = `/api/studies/${state.study.id}/download/${a.dataset.kind}`;
  }
}

// ---- chart ----------------------------------------------------------------------------------
const PAD = {left: 40, right: 10, top: 10, bottom: 44};
function xOf(i, w) {
  const n = Math.max(state.study.slices.length - 1, 1);
  return PAD.left + ((w - PAD.left - PAD.right) * i) / n;
}
function drawChart() {
  const c = $("chart"), g = c.getContext("2d");
  const w = c.width, h = c.height, plotH = h - PAD.top - PAD.bottom;
  const y = (p) => PAD.top + plotH * (1 - p);
  g.fillStyle = "#fff"; g.fillRect(0, 0, w, h);
  g.strokeStyle = "#ddd"; g.fillStyle = "#666"; g.font = "11px sans-serif"; g.lineWidth = 1;
  for (const p of [0, 0.25, 0.5, 0.75, 1]) {
    g.beginPath(); g.moveTo(PAD.left, y(p)); g.lineTo(w - PAD.right, y(p)); g.stroke();
    g.fillText(p.toFixed(2), 4, y(p) + 4);
  }
  g.setLineDash([5, 4]); g.strokeStyle = "#999";
  g.beginPath(); g.moveTo(PAD.left, y(threshold())); g.lineTo(w - PAD.right, y(threshold())); g.stroke();
  g.setLineDash([]);
  const s = state.study.slices;
  for (const label of state.study.labels) {
    g.strokeStyle = COLORS[label]; g.lineWidth = label === "any" ? 2.5 : 1.6;
    g.beginPath();
    s.forEach((r, i) => (i ? g.lineTo(xOf(i, w), y(r[label])) : g.moveTo(xOf(i, w), y(r[label]))));
    g.stroke();
  }
  g.strokeStyle = "#000"; g.lineWidth = 1;
  g.beginPath(); g.moveTo(xOf(state.row, w), PAD.top); g.lineTo(xOf(state.row, w), PAD.top + plotH); g.stroke();
  g.fillStyle = "#666";
  g.fillText(`slice 1 … ${s.length} (inferior → superior)`, PAD.left, h - PAD.bottom + 16);
  g.fillStyle = "#a00"; g.font = "bold 12px sans-serif";
  g.fillText(window.ICH.notice, PAD.left, h - 8);
}
$("chart").addEventListener("click", (e) => {
  const c = $("chart"), rect = c.getBoundingClientRect();
  const x = ((e.clientX - rect.left) * c.width) / rect.width;
  const n = state.study.slices.length;
  const frac = (x - PAD.left) / (c.width - PAD.left - PAD.right);
  goTo(Math.round(frac * Math.max(n - 1, 1)));
});
$("chart-png").addEventListener("click", (e) => { e.currentTarget.href = $("chart").toDataURL("image/png"); });

// ---- slice viewer -------------------------------------------------------------------------
function goTo(row) {
  const n = state.study.slices.length;
  state.row = Math.max(0, Math.min(n - 1, row));
  const r = state.study.slices[state.row];
  $("slice-label").textContent = `${state.row + 1} of ${n}`;
  $("slice-probs").textContent = `z ${r.z.toFixed(1)} mm · ` +
    state.study.labels.map((l) => `${l} ${r[l].toFixed(3)}`).join(" · ");
  for (const v of document.querySelectorAll("#views .view")) {
    v.querySelector(".base").src = `/api/studies/${state.study.id}/slices/${state.row}/image.png?window=${encodeURIComponent(v.dataset.window)}`;
  }
  updateOverlay();
  drawChart();
}

function updateOverlay() {
  const on = $("overlay-toggle").checked;
  const label = $("cam-label").value || "any";
  const opacity = $("opacity").value / 100;
  const src = `/api/studies/${state.study.id}/slices/${state.row}/cam.png?label=${encodeURIComponent(label)}`;
  for (const img of document.querySelectorAll("#views .cam")) {
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
document.addEventListener("keydown", (e) => {
  if (!state.study || ["INPUT", "SELECT", "TEXTAREA"].includes(document.activeElement.tagName) &&
      document.activeElement.type !== "range" && document.activeElement.type !== "checkbox") return;
  if (e.key === "ArrowLeft" || e.key === "ArrowDown") { goTo(state.row - 1); e.preventDefault(); }
  if (e.key === "ArrowRight" || e.key === "ArrowUp") { goTo(state.row + 1); e.preventDefault(); }
});
