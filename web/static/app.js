// The study page: upload, one large slice view (window/level, zoom, pan, full screen, Grad-CAM) with the
// slice's probabilities and a strip chart beside it, the series of the upload, summary, downloads. Plain
// JavaScript on the JSON API (web/app.py); no build step, nothing fetched from elsewhere: works offline.
//
// One state, one truth: a slice step asks for the slice's pixels first and only then shows, together, the
// image (or an "image unavailable" state in the view), its number, its probabilities and the chart's
// marker. Slice numbers on the page are 1-based positions along z, as in every download (slice_number).
//
// Where the pixels come from (web/app.py hu_png): the server keeps the series' files in memory and serves
// each slice at its source resolution as HU (hu.png: red and green bytes = HU + 32768); window/level runs
// here, for any centre/width, on every drag without a request. When the server kept no files, the view
// rebuilds an approximate HU image from the cached 8-bit windows (image.png): each pixel from the narrowest
// window it does not saturate.
"use strict";

const COLORS = {epidural: "#d62728", intraparenchymal: "#1f77b4", intraventricular: "#2ca02c",
                subarachnoid: "#9467bd", subdural: "#ff7f0e", any: null /* the text colour */};
const DASHES = {epidural: [9, 4], intraparenchymal: [], intraventricular: [2, 3], subarachnoid: [12, 3, 2, 3],
                subdural: [5, 2, 1, 2], any: []};
const PRESETS = [{name: "brain", c: 40, w: 80}, {name: "subdural", c: 80, w: 200}, {name: "bone", c: 600, w: 2800}];
// the words for the server's file reasons (ich.dicom.REASONS, ich.study): the API keeps the codes for programs
const REASON_WORDS = {
  not_a_file: "not a regular file", too_large: "too large for one CT slice", not_dicom: "not a DICOM file",
  unreadable: "a damaged DICOM file", truncated: "a file cut short", not_ct: "not a CT image",
  missing_uid: "missing its DICOM identifiers", unsafe_id: "DICOM identifiers that cannot be used",
  duplicate_id: "a second copy of a slice", missing_position: "missing the slice's position",
  missing_rescale: "missing the values that give Hounsfield units", no_pixel_data: "no image in it",
  pixel_decode_failed: "an image that cannot be decoded", bad_shape: "not one grayscale image",
  unsupported_syntax: "a compression this server does not read", no_labels: "no labels",
  other_series: "another series", other_plane: "another plane than the rest of its series"};
const DOWNLOAD_SUFFIX = {csv: ".csv", kaggle_csv: "_kaggle.csv", json: ".json", sr: "_sr.dcm"};
const $ = (id) => document.getElementById(id);
const state = {files: [], study: null, seriesParam: null, row: 0, target: 0, shown: null, level: null, zoom: 1,
               panX: 0, panY: 0, cache: new Map(), hover: null, gone: false, view: null};

// ---- plain words ----------------------------------------------------------------------------
function reasonWords(code) { return REASON_WORDS[code] || String(code).replace(/_/g, " "); }
function plainText(text) {  // a server sentence, with any file-reason code in words
  return String(text || "").replace(/\b([a-z]+(?:_[a-z]+)+)\b/g, (m) => (m in REASON_WORDS ? reasonWords(m) : m));
}

// ---- theme, help ------------------------------------------------------------------------------
function setTheme(light) {
  document.documentElement.dataset.theme = light ? "light" : "dark";
  $("theme").setAttribute("aria-pressed", light ? "true" : "false");
  try { localStorage.setItem("ich.theme", light ? "light" : "dark"); } catch (err) { /* private mode */ }
  if (state.study) { renderLegend(); drawChart(); }
}
$("theme").addEventListener("click", () => setTheme(document.documentElement.dataset.theme !== "light"));
$("theme").setAttribute("aria-pressed", document.documentElement.dataset.theme === "light" ? "true" : "false");

let helpReturn = null;
function showHelp(on) {
  if (on) { helpReturn = document.activeElement; $("help").hidden = false; $("help-close").focus(); }
  else { $("help").hidden = true; if (helpReturn && helpReturn.focus) helpReturn.focus(); }
}
$("help-open").addEventListener("click", () => showHelp(true));
$("help-close").addEventListener("click", () => showHelp(false));
$("help").addEventListener("click", (e) => { if (e.target === $("help")) showHelp(false); });

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
$("analyze").addEventListener("click", () => analyze());

// An error in a sentence (what happened) and a second one (what to do); extra: a node after them.
function showError(what, todo, extra) {
  const box = $("error");
  box.innerHTML = "";
  if (!what) { box.hidden = true; return; }
  for (const text of [what, todo]) if (text) { const p = document.createElement("p"); p.textContent = text; box.append(p); }
  if (extra) box.append(extra);
  box.hidden = false;
}

const ONE_STUDY = "Upload one .zip, or the DICOM files of one head-CT study.";
function uploadError(status, body) {
  const said = plainText(body && typeof body.error === "string" ? body.error : "");
  const sentence = (s) => (s ? s.charAt(0).toUpperCase() + s.slice(1) + (/[.!?]$/.test(s) ? "" : ".") : "");
  if (status === 413) return [`The upload is too large. ${sentence(said)}`, "Upload one study; one series is enough."];
  if (status === 503) return ["The server is busy with other studies.", "Try again in a minute."];
  if (status === 408) return ["The upload stalled before it ended.", "Check the connection and try again."];
  if (status >= 500) return ["The server could not analyse this study.",
                             "Try again; if it fails again, the files may not be a head CT the model can read."];
  if (status === 0) return ["The upload did not reach the server (is it running, is the connection up?).", "Try again."];
  return [`This upload could not be used: ${said || `the server answered ${status}`}${/[.!?]$/.test(said) ? "" : "."}`,
          ONE_STUDY];
}

function setStale(message) {
  const stale = !!message && !!state.study;
  $("results").classList.toggle("stale", stale);
  $("stale").hidden = !stale;
  $("stale").textContent = stale ? message : "";
}

function analyze() {
  if (!state.files.length) return;
  const zips = state.files.filter((f) => /\.zip$/i.test(f.name));
  if (state.files.length > 1 && zips.length) {  // the server reads one zip, or loose DICOM files: say so now
    showError(`These are ${state.files.length} files, ${zips.length} of them zip files: the server reads one study at a time.`,
              "Upload one .zip (one study), or the DICOM files of one study without a zip.");
    return;
  }
  const form = new FormData();
  for (const f of state.files) form.append("files", f, f.name);
  const xhr = new XMLHttpRequest();
  xhr.open("POST", "/api/studies");
  xhr.responseType = "json";
  const bar = $("progress");
  bar.hidden = false; bar.value = 0; showError("");
  setStale(state.study ? `Analysing a new upload: the results below are still those of the previous study (${state.study.tag}).` : "");
  $("analyze").disabled = true;
  $("status").textContent = "uploading…";
  xhr.upload.onprogress = (e) => { if (e.lengthComputable) bar.value = (90 * e.loaded) / e.total; };
  xhr.upload.onload = () => { bar.value = 90; $("status").textContent = "running the models…"; };
  const failed = (what, todo) => {
    $("analyze").disabled = false;
    bar.value = 0; bar.hidden = true;
    $("status").textContent = "the upload failed";
    let back = null;
    if (state.study) {  // the old results go: what is on screen is never mistaken for this upload's
      const previous = {id: state.study.id, tag: state.study.tag, series: state.seriesParam};
      closeResults();
      back = document.createElement("p");
      const a = document.createElement("a");
      a.href = resultUrl(previous.id, previous.series);
      a.textContent = `open the previous result (${previous.tag}) again`;
      back.append("The previous results were closed; ", a, ".");
    }
    showError(what, todo, back);
  };
  xhr.onload = () => {
    if (xhr.status === 201 && xhr.response) {
      $("analyze").disabled = false;
      bar.value = 100;
      $("status").textContent = "done";
      show(xhr.response, {series: null});
    } else {
      failed(...uploadError(xhr.status, xhr.response));
    }
  };
  xhr.onerror = () => failed(...uploadError(0, null));
  xhr.send(form);
}

function closeResults() {
  state.study = null; state.gone = false;
  setStale("");
  $("results").hidden = true;
  $("upload").classList.remove("compact");
  history.replaceState(null, "", location.pathname);
  document.title = "ICH study viewer — research use only";
}

// ---- the URL: ?result=ID[&series=K]#slice=N&window=NAME|wl=C,W&t=T -----------------------------
function resultUrl(id, series) {
  return `?result=${encodeURIComponent(id)}` + (series === null || series === undefined ? "" : `&series=${series}`);
}
function viewHash() {
  const l = state.level, parts = [`slice=${state.row + 1}`];
  parts.push(l.name === "custom" ? `wl=${Math.round(l.c)},${Math.round(l.w)}` : `window=${encodeURIComponent(l.name)}`);
  parts.push(`t=${threshold()}`);
  return "#" + parts.join("&");
}
let urlTimer = null;
function saveUrl() {  // replaceState at most every 150 ms: browsers throttle a flood of them
  if (urlTimer) return;
  urlTimer = setTimeout(() => {
    urlTimer = null;
    if (!state.study) return;
    const url = resultUrl(state.study.id, state.seriesParam) + viewHash();
    history.replaceState(null, "", url);
    $("permalink").href = url;
  }, 150);
}
function readHash() {
  const h = new URLSearchParams(location.hash.slice(1));
  const out = {};
  if (h.has("slice")) out.slice = parseInt(h.get("slice"), 10);
  if (h.has("window")) out.window = h.get("window");
  if (h.has("wl")) { const [c, w] = h.get("wl").split(",").map(Number); if (Number.isFinite(c) && w > 0) out.wl = {c, w}; }
  if (h.has("t")) out.t = Number(h.get("t"));
  return out;
}

// ---- a result by link, recent results ------------------------------------------------------
async function openLinked() {
  const q = new URLSearchParams(location.search);
  const id = q.get("result");
  if (!id) return;
  const series = q.has("series") ? parseInt(q.get("series"), 10) : null;
  $("status").textContent = "loading the result…";
  try {
    const r = await fetch(`/api/studies/${encodeURIComponent(id)}` + (series === null ? "" : `?series=${series}`));
    const body = await r.json().catch(() => null);
    $("status").textContent = "";
    if (!r.ok) {
      forgetRecent(id); loadRecent();
      history.replaceState(null, "", location.pathname);
      showError(r.status === 404 ? "This link's result is no longer on the server: it keeps the last few studies in memory only."
                                 : `This link's result could not be opened: ${plainText(body && body.error) || r.status}.`,
                "Upload the study again to see it.");
      return;
    }
    show(body, {series, view: readHash()});
  } catch (err) {
    $("status").textContent = "";
    showError("The server could not be reached.", "Check that it is running, then reload this page.");
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
    a.href = resultUrl(s.id, null);
    const when = s.created ? new Date(s.created * 1000).toLocaleString() : "";
    a.textContent = `${s.tag} · ${s.n_slices} slices · ${when}`;
    if (state.study && s.id === state.study.id) a.setAttribute("aria-current", "page");
    li.append(a); ul.append(li);
  }
  $("recent-box").hidden = list.length === 0;
}

// ---- results ------------------------------------------------------------------------------
function api(path, params = {}) {  // a URL of this result, for the shown series
  const q = new URLSearchParams(params);
  if (state.seriesParam !== null) q.set("series", state.seriesParam);
  const s = q.toString();
  return `/api/studies/${encodeURIComponent(state.study.id)}${path}${s ? `?${s}` : ""}`;
}

// opts.series: the series asked for (null: the server's choice); opts.view: {slice, window, wl, t} to restore
function show(study, opts = {}) {
  state.study = study;
  state.seriesParam = opts.series === undefined ? null : opts.series;
  state.gone = false;
  remember(study);
  loadRecent();
  state.cache = new Map();
  state.shown = null;
  setStale("");
  $("gone").hidden = true; $("results").classList.remove("gone-state");
  $("results").hidden = false;
  $("upload").classList.add("compact");
  $("patient").hidden = true; $("patient").textContent = "";
  $("show-patient").setAttribute("aria-expanded", "false"); $("show-patient").textContent = "Show patient";
  const t = study.timings_s || {};
  $("timings").textContent = Object.entries(t).map(([k, v]) => `${k} ${v.toFixed(2)} s`).join(" · ");
  const view = opts.view || {};
  if (view.t > 0 && view.t < 1) $("threshold").value = `${view.t}`;
  document.title = `${study.tag} — ICH study viewer — research use only`;
  const n = study.slices.length;
  const wanted = Number.isInteger(view.slice) && view.slice >= 1 && view.slice <= n ? view.slice - 1 : maxRow("any");
  state.row = wanted; state.target = wanted;
  const select = $("cam-label");
  select.innerHTML = "";
  for (const label of study.labels) select.add(new Option(label, label));
  select.value = "any";
  renderHead(); renderSeries(); renderSkipped(); renderLegend(); renderView(view); renderSummary();
  goTo(wanted);
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
  const r = await fetch(`/api/studies/${encodeURIComponent(state.study.id)}/patient`);
  if (r.status === 404) { checkGone(); return; }
  const p = r.ok ? await r.json() : {};
  box.textContent = `patient ${p.patient_name || "(no name)"}, ID ${p.patient_id || "(none)"}`;
  box.hidden = false; button.textContent = "Hide patient"; button.setAttribute("aria-expanded", "true");
});

// The shown series: the one asked for, else the server's choice.
function shownSeries() {
  const list = state.study.series || [];
  const index = state.study.series_index !== undefined ? state.study.series_index : state.seriesParam;
  return list.find((s) => (index === null ? s.chosen : s.index === index)) || null;
}

function renderSeries() {
  const list = state.study.series || [];
  const box = $("series-box"), ul = $("series-list");
  ul.innerHTML = "";
  box.hidden = list.length < 2;
  const shown = shownSeries();
  for (const s of list) {
    const li = document.createElement("li");
    const usable = s.usable !== undefined ? s.usable : s.axial;
    const count = s.has_result && s.n_slices ? `${s.n_slices} slices` : `${s.n_files} files`;
    const text = `Series ${s.index + 1}${s.description ? ` (${s.description})` : ""} · ${count}`;
    if (s.has_result) {
      const b = document.createElement("button");
      b.type = "button"; b.dataset.series = s.index; b.textContent = text;
      b.setAttribute("aria-pressed", s === shown ? "true" : "false");
      b.addEventListener("click", () => { if (s !== shownSeries()) loadSeries(s.index); });
      li.append(b);
    } else {
      const span = document.createElement("span");
      span.className = "unusable";
      span.dataset.series = s.index;
      const why = s.reason || (usable ? "not analysed (upload this series on its own to see it)" : "not axial: the models read axial slices");
      span.textContent = `${text}${s === shown ? " (shown)" : ""}: ${plainText(why)}`;
      li.append(span);
    }
    ul.append(li);
  }
  const chosen = list.find((s) => s.chosen);
  const parts = [];
  if (shown) parts.push(`Shown: series ${shown.index + 1}.`);
  if (chosen) parts.push(`Chosen by the server: series ${chosen.index + 1}${chosen.why_chosen ? `, ${plainText(chosen.why_chosen)}` : ", the axial series with the most slices"}.`);
  if (list.some((s) => s.has_result && s !== shown)) parts.push("Switching shows another series' results at once, without uploading again.");
  $("series-why").textContent = parts.join(" ");
}

async function loadSeries(index) {
  const id = state.study.id;
  $("series-why").textContent = `Loading series ${index + 1}…`;
  let r;
  try { r = await fetch(`/api/studies/${encodeURIComponent(id)}?series=${index}`); }
  catch (err) { $("series-why").textContent = "The server could not be reached: try again."; return; }
  const body = await r.json().catch(() => null);
  if (!r.ok) {
    if (r.status === 404 && await checkGone()) return;
    $("series-why").textContent = `Series ${index + 1} has no result: ${plainText(body && body.error) || r.status}.`;
    return;
  }
  const chosen = (body.series || []).find((s) => s.chosen);
  show(body, {series: chosen && chosen.index === index ? null : index, view: {window: state.level.name, t: threshold()}});
}

function renderSkipped() {
  const rows = state.study.skipped || [];
  $("skipped-box").hidden = rows.length === 0;
  $("skipped-none").hidden = rows.length !== 0;
  $("skipped-title").textContent = `${rows.length} file(s) not used, each with the reason`;
  const tbody = $("skipped").querySelector("tbody");
  tbody.innerHTML = "";
  for (const r of rows) {
    const tr = tbody.insertRow();
    for (const v of [r.file, reasonWords(r.reason), plainText(r.detail || "")]) tr.insertCell().textContent = v;
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

function ranges(label, cut) {
  const out = [];
  let start = null;
  state.study.slices.forEach((r, i) => {
    if (r[label] >= cut && start === null) start = i;
    if (r[label] < cut && start !== null) { out.push([start, i - 1]); start = null; }
  });
  if (start !== null) out.push([start, state.study.slices.length - 1]);
  return out;
}

// The threshold: a number in (0, 1), as the downloads take it; the field allows 0.01 to 0.99.
function threshold() {
  const t = parseFloat($("threshold").value);
  return Number.isNaN(t) ? 0.5 : Math.max(0.01, Math.min(0.99, t));
}
function downloadThreshold() {
  const t = Number($("threshold").value);
  return $("threshold").value.trim() !== "" && t >= 0.01 && t <= 0.99 ? t : null;
}
const fixed = (p) => p.toFixed(3);

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
    tr.insertCell().textContent = fixed(state.study.slices[row][label]);
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
      x.insertCell().append(jumpButton(peak, `${fixed(state.study.slices[peak][label])} at slice ${peak + 1}`));
    }
  }
  if (!runs.rows.length) {
    const cell = runs.insertRow().insertCell();
    cell.colSpan = 4; cell.textContent = `no slice at or above the threshold ${cut}`;
  }
  const m = state.study.model;
  const folds = Object.entries(m.folds || {}).map(([e, k]) => `${e} (${k} folds)`).join(", ");
  $("model").textContent = `Model: ${folds}; stage two "${m.stage_two}"` +
    (m.oof_score === null || m.oof_score === undefined ? "" : `; out-of-fold weighted log loss ${m.oof_score.toFixed(4)} (lower is better)`) + ".";
  renderDownloads();
  renderProbs();
  drawChart();
}
$("threshold").addEventListener("input", () => { if (state.study) { renderSummary(); saveUrl(); } });

function renderDownloads() {
  const t = downloadThreshold();
  $("threshold").setAttribute("aria-invalid", t === null ? "true" : "false");
  $("threshold-note").textContent = t === null ? "downloads need a threshold between 0.01 and 0.99" : "";
  for (const a of document.querySelectorAll("#downloads a")) {
    const off = t === null || state.gone;
    if (off) a.setAttribute("aria-disabled", "true"); else a.removeAttribute("aria-disabled");
  }
}
function downloadName(kind, t, response) {  // the server's name when it gives one (the same form)
  const given = response && /filename="([^"]+)"/.exec(response.headers.get("Content-Disposition") || "");
  if (given) return given[1];
  const series = state.seriesParam === null ? "" : `_series${state.seriesParam}`;
  const cut = Math.abs(t * 100 - Math.round(t * 100)) < 1e-9 ? t.toFixed(2) : `${t}`;
  return `${state.study.tag}${series}_t${cut}${kind === "chart" ? "_chart.png" : DOWNLOAD_SUFFIX[kind]}`;
}
function saveBlob(blob, name) {
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob); a.download = name;
  document.body.append(a); a.click(); a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 10_000);
}
// Downloads are fetched here, so that an answer other than the file (a result gone from the server) says so
// on the page instead of leaving it for the server's JSON.
async function download(kind) {
  const t = downloadThreshold();
  if (t === null || state.gone) return;
  $("download-status").textContent = `preparing ${kind.replace("_", " ")}…`;
  let r;
  try { r = await fetch(api(`/download/${kind}`, {threshold: t})); }
  catch (err) { $("download-status").textContent = "The server could not be reached: try again."; return; }
  if (!r.ok) {
    const body = await r.json().catch(() => null);
    if (r.status === 404 && await checkGone()) { $("download-status").textContent = ""; return; }
    $("download-status").textContent = `This download failed: ${plainText(body && body.error) || r.status}.`;
    return;
  }
  const name = downloadName(kind, t, r);
  saveBlob(await r.blob(), name);
  $("download-status").textContent = `saved ${name}`;
}
for (const a of document.querySelectorAll("#downloads a[data-kind]")) {
  a.addEventListener("click", (e) => { e.preventDefault(); if (state.study) download(a.dataset.kind); });
}

// A request of this result answered 404: ask whether the result itself is gone; if so, say it on the page.
async function checkGone() {
  if (!state.study) return false;
  if (state.gone) return true;
  try {
    const r = await fetch(`/api/studies/${encodeURIComponent(state.study.id)}`);
    if (r.status !== 404) return false;
  } catch (err) { return false; }
  showGone();
  return true;
}
function showGone() {
  state.gone = true;
  forgetRecent(state.study.id); loadRecent();
  const box = $("gone");
  box.innerHTML = "";
  const p1 = document.createElement("p"), p2 = document.createElement("p");
  p1.textContent = "This result is no longer on the server: it keeps the last few studies in memory only, and newer uploads pushed this one out.";
  const b = document.createElement("button");
  b.type = "button"; b.textContent = "Upload the study again";
  b.addEventListener("click", () => { window.scrollTo(0, 0); $("files").focus(); });
  p2.append("Upload the study again to see its images and downloads. ", b);
  box.append(p1, p2);
  box.hidden = false;
  $("results").classList.add("gone-state");
  renderDownloads();
  if (state.shown === null || !state.cache.has(state.row)) showUnavailable(state.row, "gone");
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
  g.fillStyle = "rgba(214, 39, 40, 0.18)";  // runs of "any" at or above the threshold, shaded
  const half = (box.w - box.left - box.right) / Math.max(n - 1, 1) / 2;
  for (const [a, b] of ranges("any", cut)) {
    g.fillRect(Math.max(box.left, xOf(a, box) - half), box.top, xOf(b, box) - xOf(a, box) + 2 * half, plotH);
  }
  g.font = "11px system-ui, sans-serif"; g.lineWidth = 1; g.strokeStyle = grid; g.fillStyle = muted;
  for (const p of [0, 0.25, 0.5, 0.75, 1]) {
    g.beginPath(); g.moveTo(box.left, y(p)); g.lineTo(box.w - box.right, y(p)); g.stroke();
    g.fillText(p.toFixed(2).replace(/^0/, ""), 2, y(p) + 4);
  }
  const step = tickStep(n, box.w - box.left - box.right);  // slice numbers, 1-based as everywhere
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
  g.strokeStyle = fg; g.lineWidth = 2;
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
function sliceText(row) {
  const r = state.study.slices[row];
  return `slice ${row + 1}: ` + state.study.labels.map((l) => `${l} ${r[l].toFixed(2)}`).join(" · ");
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
  if (state.scrubbing && row !== state.target) goTo(row);
  state.hover = row;
  $("readout").textContent = sliceText(row);  // below the chart, never over it
  drawChart();
});
const endScrub = () => { state.scrubbing = false; };
chart.addEventListener("pointerup", endScrub);
chart.addEventListener("pointercancel", endScrub);
chart.addEventListener("pointerleave", () => { state.hover = null; drawChart(); });
chart.addEventListener("keydown", (e) => {  // a slider: left/right step along the series (up/down as everywhere)
  if (!state.study || e.altKey || e.ctrlKey || e.metaKey) return;
  if (e.key === "ArrowLeft" || e.key === "ArrowRight") {
    e.preventDefault(); e.stopPropagation();
    goTo(state.target + (e.key === "ArrowRight" ? 1 : -1));
  }
});
$("chart-png").addEventListener("click", (e) => {
  e.preventDefault();
  if (!state.study || downloadThreshold() === null) return;
  const c = document.createElement("canvas");
  c.width = 1200; c.height = 440;
  paintChart(c.getContext("2d"), c.width, c.height, {legend: true});
  c.toBlob((blob) => saveBlob(blob, downloadName("chart", threshold())), "image/png");
});

// ---- the slice view -----------------------------------------------------------------------
// One large view in one window at a time (keys 1/2/3 or the window buttons), its own window/level by a drag.
function windows() {
  if (state.study.source_images) return PRESETS.map((p) => ({...p}));
  return (state.study.window_levels || []).map((w) => ({name: w.name, c: w.center, w: w.width}));
}

function renderView(view) {
  const div = $("main-view");
  state.view = {div, canvas: div.querySelector("canvas"), cam: div.querySelector(".cam")};
  delete $("views").dataset.row;
  state.zoom = 1; state.panX = 0; state.panY = 0; applyTransform();
  const list = windows();
  let level = list.find((w) => w.name === view.window) || list[0];
  if (view.wl) level = {name: "custom", c: view.wl.c, w: view.wl.w};
  state.level = {...level};
  const box = $("windows");
  box.innerHTML = "";
  list.forEach((p, i) => {
    const b = document.createElement("button");
    b.type = "button"; b.dataset.window = p.name;
    b.textContent = `${p.name} ${p.c}/${p.w}`;
    b.title = `window centre ${p.c} HU, width ${p.w} HU (key ${i + 1})`;
    b.setAttribute("aria-keyshortcuts", `${i + 1}`);
    b.addEventListener("click", () => setWindow(p));
    box.append(b);
  });
  updateWindowButtons();
  $("source-note").textContent = state.study.source_images
    ? "Images at their source resolution, from the DICOM's HU values; window/level runs in this page."
    : "The server kept no source files for this series (too large): images are the network's input " +
      "windows, rebuilt to HU here; window/level is limited to their range.";
}

function updateWindowButtons() {
  for (const b of $("windows").querySelectorAll("button")) {
    b.setAttribute("aria-pressed", b.dataset.window === state.level.name ? "true" : "false");
  }
}

function setWindow(p) {
  state.level = {name: p.name, c: p.c, w: p.w};
  updateWindowButtons(); updateCaption(); paint(); saveUrl();
}

function updateCaption() {
  const v = state.view, l = state.level, n = state.study.slices.length;
  const text = `${l.name} · C ${Math.round(l.c)} W ${Math.round(l.w)}`;
  v.div.querySelector(".cap").textContent = text;
  v.div.querySelector(".pos").textContent = `slice ${state.row + 1} / ${n}`;
  v.div.setAttribute("aria-label", `slice ${state.row + 1} of ${n}, ${text}`);
}

function applyTransform() {
  $("main-view").querySelector(".stage").style.transform = `translate(${state.panX}px, ${state.panY}px) scale(${state.zoom})`;
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
  const list = windows();
  setWindow(list.find((w) => w.name === state.level.name) || list[0]);
});

// Full screen: the view with the probabilities and the chart beside it (the whole workspace), not the image alone.
function toggleFull(on) {
  const ws = $("workspace");
  const full = on === undefined ? !ws.classList.contains("full") : on;
  ws.classList.toggle("full", full);
  document.body.classList.toggle("has-full", full);
  $("full").setAttribute("aria-pressed", full ? "true" : "false");
  if (full) $("main-view").focus({preventScroll: true});
  drawChart();
}
$("full").addEventListener("click", () => toggleFull());

(function attachView() {
  const div = $("main-view");
  div.addEventListener("dblclick", () => toggleFull());
  div.addEventListener("wheel", (e) => {
    if (!state.study) return;
    e.preventDefault();
    if (e.ctrlKey) { zoomBy(e.deltaY < 0 ? 1.15 : 1 / 1.15); return; }
    // one slice a wheel notch (deltaY 100) or 50 px of a touchpad's swipe; down = next, as in OHIF
    state.wheel = (state.wheel || 0) + (e.deltaMode === 1 ? 50 * e.deltaY : e.deltaY);
    if (Math.abs(state.wheel) >= 50) { goTo(state.target + Math.sign(state.wheel)); state.wheel = 0; }
  }, {passive: false});
  let drag = null;
  const touches = new Map();  // two fingers: pinch to zoom
  const spread = () => { const [a, b] = [...touches.values()]; return Math.hypot(a.x - b.x, a.y - b.y); };
  div.addEventListener("pointerdown", (e) => {
    if (!state.study) return;
    div.focus({preventScroll: true});  // the keys now step slices, even if a slider had the focus
    try { div.setPointerCapture(e.pointerId); } catch (err) { /* a pointer the browser no longer tracks */ }
    if (e.pointerType === "touch") {
      touches.set(e.pointerId, {x: e.clientX, y: e.clientY});
      if (touches.size === 2) { drag = {mode: "pinch", spread: spread(), zoom: state.zoom}; e.preventDefault(); return; }
    }
    const mode = e.pointerType === "touch" ? "swipe" : (e.shiftKey || e.button === 1 || e.button === 2) ? "pan" : "wl";
    drag = {mode, x: e.clientX, y: e.clientY, level: {...state.level}, panX: state.panX, panY: state.panY, row: state.target};
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
      state.level = {name: "custom", c: drag.level.c + dy * k, w: Math.max(1, drag.level.w + dx * k)};
      updateWindowButtons(); updateCaption(); paint(); saveUrl();
    } else if (drag.mode === "pan") {
      state.panX = drag.panX + dx; state.panY = drag.panY + dy; applyTransform();
    } else {
      // a one-finger drag: down = next slices, as the wheel and the arrow keys; the series spans the view's
      // height, at 8 to 24 px a slice, so the slices follow the finger without racing past
      const n = state.study.slices.length;
      const step = Math.max(8, Math.min(24, div.clientHeight / n));
      const row = drag.row + Math.trunc(dy / step);
      if (row !== state.target) goTo(row);
    }
  });
  const end = (e) => { touches.delete(e.pointerId); drag = null; };
  div.addEventListener("pointerup", end);
  div.addEventListener("pointercancel", end);
  div.addEventListener("contextmenu", (e) => e.preventDefault());
})();

// Slice pixels: {w, h, hu: Int32Array} per row, cached (a few dozen slices) and prefetched around the current one.
function sliceUrl(row, window) {
  return window === undefined ? api(`/slices/${row}/hu.png`) : api(`/slices/${row}/image.png`, {window});
}
async function pixels(url) {
  const r = await fetch(url);
  if (!r.ok) { const err = new Error(`${r.status}`); err.status = r.status; throw err; }
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

function paint() {
  const data = state.shown, c = state.view && state.view.canvas;
  if (!data || !c) return;
  if (c.width !== data.w || c.height !== data.h) { c.width = data.w; c.height = data.h; }
  const g = c.getContext("2d");
  const out = g.createImageData(data.w, data.h);
  const px = new Uint32Array(out.data.buffer);
  const lo = state.level.c - state.level.w / 2, scale = 255 / state.level.w;
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

function showUnavailable(row, why) {
  const box = $("main-view").querySelector(".unavailable");
  const c = state.view.canvas;
  c.getContext("2d").clearRect(0, 0, c.width, c.height);
  box.querySelector("p").textContent = why === "gone"
    ? `Image unavailable: slice ${row + 1} cannot be shown, because this result is no longer on the server. Upload the study again.`
    : `Image unavailable: slice ${row + 1} could not be loaded (${why}). Its probabilities are beside it; try the slice again or go on.`;
  box.hidden = false;
}

// The probabilities of the shown slice, beside the image.
function renderProbs() {  // its rows are made once per study and updated in place on each step
  if (!state.study) return;
  const r = state.study.slices[state.row], cut = threshold(), tbody = $("slice-probs").querySelector("tbody");
  if (tbody.rows.length !== state.study.labels.length) {
    tbody.innerHTML = "";
    for (const label of state.study.labels) {
      const tr = tbody.insertRow();
      tr.dataset.label = label;
      tr.insertCell().textContent = label;
      tr.insertCell();
      const bar = document.createElement("span");
      bar.className = "bar";
      tr.insertCell().append(bar);
    }
  }
  state.study.labels.forEach((label, i) => {
    const tr = tbody.rows[i];
    tr.classList.toggle("hot", r[label] >= cut);
    tr.cells[1].textContent = fixed(r[label]);
    tr.cells[2].firstChild.style.width = `${Math.round(100 * r[label])}%`;
  });
}

// Show one slice: its image (or "image unavailable") and, in the same step, its number, probabilities and
// the chart's marker. data: its pixels, or null with err.
function commit(row, data, err) {
  const n = state.study.slices.length, r = state.study.slices[row];
  state.row = row; state.shown = data;
  $("slice-label").textContent = `${row + 1} of ${n}`;
  const meta = [`z ${r.z.toFixed(1)} mm`];
  if (r.instance_number !== undefined && r.instance_number !== null) meta.push(`DICOM instance ${r.instance_number}`);
  $("slice-meta").textContent = meta.join(" · ");
  renderProbs();
  const c = $("chart");
  c.setAttribute("aria-valuemax", `${n}`); c.setAttribute("aria-valuenow", `${row + 1}`);
  c.setAttribute("aria-valuetext", sliceText(row));
  updateCaption();
  if (data) { $("main-view").querySelector(".unavailable").hidden = true; paint(); }
  else showUnavailable(row, state.gone ? "gone" : (err && err.status ? `the server answered ${err.status}` : "no answer from the server"));
  $("views").dataset.row = `${row}`;
  $("views").dataset.state = data ? "image" : "unavailable";
  updateOverlay();
  drawChart();
  saveUrl();
  if (!data && err && err.status === 404) checkGone();
}

function goTo(row) {
  if (!state.study) return;
  const n = state.study.slices.length;
  const wanted = Math.max(0, Math.min(n - 1, row));
  state.target = wanted;
  const study = state.study, current = () => state.study === study && state.target === wanted;
  slice(wanted).then((data) => { if (current()) commit(wanted, data, null); },
                     (err) => { if (current()) commit(wanted, null, err); });
  if (!state.gone) for (const d of [1, -1, 2, -2]) if (wanted + d >= 0 && wanted + d < n) slice(wanted + d).catch(() => {});
}

function updateOverlay() {
  const on = $("overlay-toggle").checked;
  const label = $("cam-label").value || "any";
  const opacity = $("opacity").value / 100;
  const img = state.view.cam;
  $("cam-scale").hidden = !on;
  img.style.opacity = opacity;
  const src = api(`/slices/${state.row}/cam.png`, {label});
  img.hidden = !on || state.shown === null;
  if (on && img.getAttribute("src") !== src && state.shown !== null) {
    $("cam-status").textContent = "computing Grad-CAM…";
    img.onload = () => { $("cam-status").textContent = `Grad-CAM: ${label}`; };
    img.onerror = () => { $("cam-status").textContent = "Grad-CAM unavailable for this slice"; img.hidden = true; checkGone(); };
    img.src = src;
  }
  if (!on) $("cam-status").textContent = "";
}
$("overlay-toggle").addEventListener("change", () => state.study && updateOverlay());
$("cam-label").addEventListener("change", () => state.study && updateOverlay());
$("opacity").addEventListener("input", () => state.study && updateOverlay());
$("prev").addEventListener("click", () => goTo(state.target - 1));
$("next").addEventListener("click", () => goTo(state.target + 1));

// Keys step slices unless a control that uses them has the focus (the opacity slider, the threshold, a list).
function ownsKeys(el) {
  if (!el) return false;
  if (el.isContentEditable || el.tagName === "SELECT" || el.tagName === "TEXTAREA") return true;
  return el.tagName === "INPUT" && !["checkbox", "button", "submit", "reset", "file"].includes(el.type);
}
document.addEventListener("keydown", (e) => {
  if (!$("help").hidden) {
    if (e.key === "Escape" || e.key === "?") { e.preventDefault(); showHelp(false); }
    return;
  }
  if (e.key === "Escape" && $("workspace").classList.contains("full")) { toggleFull(false); return; }
  if (e.altKey || e.ctrlKey || e.metaKey || ownsKeys(document.activeElement)) return;
  if (e.key === "?") { e.preventDefault(); showHelp(true); return; }
  if (!state.study) return;
  const n = state.study.slices.length, page = Math.max(2, Math.round(n / 10));
  const moves = {ArrowDown: 1, ArrowUp: -1, PageDown: page, PageUp: -page};  // OHIF: down = next image
  const list = windows();
  if (e.key in moves) goTo(state.target + moves[e.key]);
  else if (e.key === "Home") goTo(0);
  else if (e.key === "End") goTo(n - 1);
  else if (/^[1-9]$/.test(e.key) && Number(e.key) <= list.length) setWindow(list[Number(e.key) - 1]);
  else if (e.key === "+" || e.key === "=") zoomBy(1.25);
  else if (e.key === "-") zoomBy(0.8);
  else if (e.key === "f" || e.key === "F") toggleFull();
  else return;
  e.preventDefault();
});

loadRecent();
openLinked();
