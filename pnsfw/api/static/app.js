// pnsfw audit page: plain JS, no build step. Talks to the JSON API of the same server.
// The query, page, toggles and mode live in the URL (?id=3&k=12&page=1&safe=1&dedup=1&dsim=0.95, ?text=...,
// ?mode=review), so a link restores the same view and Back goes to the previous query. Keys: ? lists them.
"use strict";

const $ = (id) => document.getElementById(id);
const DSIM = 0.95;  // hide-duplicates: hits at least this similar to a shown one are folded into it (server side)
const state = { threshold: null, nsfwClasses: [], classes: [], labelClasses: [], result: null, view: {}, items: {}, file: null };

function reviewer() { return (localStorage.getItem("pnsfw-reviewer") || "").trim() || null; }

// Save a person's label (or take it back: name null); who gave it goes into the store's audit trail.
async function saveLabel(id, name) {
  const by = reviewer();
  if (name === null) return api("/v1/labels/" + id + (by ? "?by=" + encodeURIComponent(by) : ""), { method: "DELETE" });
  return api("/v1/labels", jsonBody(Object.assign({ id: id, label: name }, by ? { by: by } : {})));
}

function headers(extra) {
  const h = Object.assign({}, extra || {});
  const token = localStorage.getItem("pnsfw-token");
  if (token) h["Authorization"] = "Bearer " + token;
  return h;
}

async function api(path, options) {
  const response = await fetch(path, Object.assign({}, options, { headers: headers((options || {}).headers) }));
  if (response.status === 401) { $("token-box").hidden = false; }
  const body = (response.headers.get("content-type") || "").includes("json") ? await response.json() : null;
  if (!response.ok) {
    const detail = body && body.detail ? (typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail)) : response.statusText;
    throw new Error(response.status + " " + detail);
  }
  return body;
}

function jsonBody(data) {
  return { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(data) };
}

function pct(p) { return (100 * p).toFixed(1) + "%"; }
function setStatus(text, isError) { $("status").textContent = text; $("status").className = isError ? "error" : "muted"; }
function overThreshold(p) { return p !== null && p !== undefined && state.threshold !== null && p >= state.threshold; }

function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}

// ---- the view <-> the URL

function viewFromUrl() {
  const q = new URLSearchParams(location.search);
  const int = (name, fallback) => { const v = parseInt(q.get(name), 10); return Number.isFinite(v) ? v : fallback; };
  return {
    mode: q.get("mode") === "review" ? "review" : "audit",
    id: q.has("id") ? int("id", null) : null,
    text: q.get("text"),
    k: Math.max(1, Math.min(200, int("k", 12))),
    page: Math.max(0, int("page", 0)),
    safe: q.get("safe") === "1",
    dedup: q.get("dedup") === "1",
    dsim: (() => { const v = parseFloat(q.get("dsim")); return v >= 0.5 && v <= 1 ? v : DSIM; })(),
  };
}

function urlOf(view) {
  const q = new URLSearchParams();
  if (view.mode === "review") q.set("mode", "review");
  if (view.id !== null && view.id !== undefined) q.set("id", view.id);
  else if (view.text) q.set("text", view.text);
  if (view.k !== 12) q.set("k", view.k);
  if (view.page) q.set("page", view.page);
  if (view.safe) q.set("safe", "1");
  if (view.dedup) q.set("dedup", "1");
  if (view.dedup && view.dsim !== DSIM) q.set("dsim", view.dsim);
  const s = q.toString();
  return location.pathname + (s ? "?" + s : "");
}

// A new query is a new history entry (Back returns to the previous one); toggles replace the current entry.
function go(changes, push) {
  const view = Object.assign({}, state.view, changes);
  const url = urlOf(view);
  if (url !== location.pathname + location.search) history[push ? "pushState" : "replaceState"](null, "", url);
  show(view);
}

// Fields typed into while the page first loads (the store's stats still on their way) keep what was typed: the
// first show, which fills the fields from the URL, then leaves them as they are.
const TYPED_FIELDS = ["id", "text", "k", "dsim"];

function setField(name, value) {
  if (!$(name).dataset.typed) $(name).value = value;
}

function firstShown() {
  TYPED_FIELDS.forEach((name) => delete $(name).dataset.typed);
  document.body.dataset.ready = "true";
}

function show(view) {
  state.view = view;
  setField("id", view.id !== null ? view.id : "");
  setField("text", view.text || "");
  setField("k", view.k);
  $("safe").checked = view.safe;
  $("dedup").checked = view.dedup;
  setField("dsim", view.dsim);
  document.querySelectorAll("#modes .mode").forEach((a) => a.classList.toggle("active", a.dataset.mode === view.mode));
  $("audit").hidden = view.mode !== "audit";
  $("review").hidden = view.mode !== "review";
  document.title = view.mode === "review" ? "pnsfw review" : "pnsfw audit";
  if (view.mode === "review") { if (window.startReview) window.startReview(); return; }
  if (view.id !== null) searchJson({ id: view.id });
  else if (view.text) searchJson({ text: view.text });
  else if (!$("preview").hidden && state.file) searchFile(state.file);
  else idle();
}

function idle() {
  clearResult("Upload an image, or search by id or text.");
  $("status").className = "muted";
}

// ---- store, model

async function loadStats() {
  try {
    const stats = await api("/v1/stats");
    const model = stats.model;
    state.threshold = model ? model.threshold : null;
    state.nsfwClasses = model ? model.nsfw_classes : [];
    state.classes = model ? model.classes : [];
    state.stats = stats;
    state.labelClasses = await api("/v1/labels/classes").then((c) => c.classes || []).catch(() => []);
    $("store-info").textContent = stats.vectors.toLocaleString() + " vectors" +
      (model ? " · model " + model.name + " (threshold " + model.threshold.toFixed(3) + ")" : " · no classifier");
    return stats;
  } catch (err) { setStatus(err.message, true); return null; }
}

// ---- the verdict, explained

function showVerdict(verdict) {
  $("verdict").hidden = !verdict;
  if (!verdict) return;
  state.threshold = verdict.threshold;
  $("badge").textContent = verdict.nsfw ? "NSFW" : "SFW";
  $("badge").className = verdict.nsfw ? "nsfw" : "sfw";
  $("p-nsfw").textContent = "p_nsfw " + verdict.p_nsfw.toFixed(3);
  $("verdict-detail").textContent = "threshold " + verdict.threshold.toFixed(3) + " · model " + verdict.model + " · top class " + verdict.label;
  const nsfw = new Set(state.nsfwClasses);
  const rows = Object.entries(verdict.probabilities).map(([name, p]) =>
    "<tr" + (nsfw.has(name) ? " class=nsfw-class" : "") + "><td>" + escapeHtml(name) + (nsfw.has(name) ? " <small>NSFW class</small>" : "") +
    "</td><td class=bar-cell><span class=bar style='width:" + Math.round(100 * p) + "%'></span></td><td>" + pct(p) + "</td></tr>");
  $("probs").innerHTML = rows.join("");
  $("verdict-explain").textContent = explainVerdict(verdict, nsfw);
}

function explainVerdict(verdict, nsfw) {
  const parts = Object.entries(verdict.probabilities).filter(([name]) => nsfw.has(name));
  const sum = parts.length ? parts.map(([name, p]) => name + " " + p.toFixed(3)).join(" + ") + " = " : "";
  const cmp = verdict.nsfw ? "≥" : "<";
  let text = "p_nsfw is the sum of the probabilities of the NSFW classes: " + sum + verdict.p_nsfw.toFixed(3) +
    ", " + cmp + " the threshold " + verdict.threshold.toFixed(3) + ", so the verdict is " + (verdict.nsfw ? "NSFW" : "SFW") + ".";
  if (nsfw.has(verdict.label) !== verdict.nsfw) {
    text += " The top class (" + verdict.label + ") is only the single most probable class; the verdict follows the sum.";
  }
  return text;
}

// ---- cards

async function loadThumb(img, id) {
  try {
    const response = await fetch("/v1/items/" + id + "/thumb", { headers: headers() });
    if (!response.ok) { img.alt = "no image (" + response.status + ")"; return; }
    img.src = URL.createObjectURL(await response.blob());
  } catch (err) { img.alt = "no image"; }
}

function itemMeta(id) {  // metadata of a store item (uri, sha256, caption...), fetched once per page load
  if (!state.items[id]) state.items[id] = api("/v1/items/" + id).catch(() => null);
  return state.items[id];
}

function shortUri(uri) {  // the end of a long path is what tells items apart
  const parts = String(uri).split(/[/\\]/);
  return parts.length > 3 ? "…/" + parts.slice(-2).join("/") : String(uri);
}

function captionOf(meta) {
  if (!meta) return null;
  for (const key of ["caption", "text", "title", "alt"]) if (typeof meta[key] === "string" && meta[key]) return meta[key];
  return null;
}

function thumbFrame(id, p) {
  const img = document.createElement("img");
  img.className = "thumb";
  img.alt = "item " + id;
  const frame = document.createElement("div");
  frame.className = "frame";  // keeps the blur inside the thumbnail's square
  if (overThreshold(p)) { img.classList.add("blurred"); frame.classList.add("veiled"); img.title = "above the threshold: click to show"; }
  img.addEventListener("click", () => { img.classList.toggle("blurred"); frame.classList.toggle("veiled"); });
  loadThumb(img, id);
  frame.append(img);
  return frame;
}

function card(hit) {
  const div = document.createElement("div");
  div.className = "card";
  div.dataset.id = hit.id;
  div.dataset.p = hit.p_nsfw === null ? "" : hit.p_nsfw;
  div.dataset.sim = hit.similarity;
  const high = overThreshold(hit.p_nsfw);
  const meta = document.createElement("div");
  meta.className = "meta";
  const score = hit.p_nsfw === null ? "no score" : "p_nsfw " + hit.p_nsfw.toFixed(3);
  meta.innerHTML = "<a href='" + escapeHtml(urlOf(Object.assign({}, state.view, { id: hit.id, text: null, page: 0 }))) + "' class=id>#" + hit.id + "</a> · sim " + hit.similarity.toFixed(3) +
    "<br><span class='score" + (high ? " high" : "") + "'>" + score + "</span>" +
    (hit.label ? " · label <b>" + escapeHtml(hit.label) + "</b>" : "") +
    "<div class=uri title='" + escapeHtml(hit.uri) + "'>" + escapeHtml(shortUri(hit.uri)) + "</div><div class=caption></div>";
  meta.querySelector(".id").addEventListener("click", (e) => { e.preventDefault(); go({ id: hit.id, text: null, page: 0 }, true); });
  if (hit.duplicates && hit.duplicates.length) meta.append(duplicatesOf(hit));
  div.append(thumbFrame(hit.id, hit.p_nsfw), meta);
  itemMeta(hit.id).then((item) => {
    const caption = captionOf(item);
    if (caption) meta.querySelector(".caption").textContent = caption;
  });
  return div;
}

function duplicatesOf(hit) {  // the hits folded into this one by hide-duplicates, as links
  const box = document.createElement("details");
  box.className = "dups";
  const n = hit.duplicates.length;
  box.innerHTML = "<summary>+" + n + " duplicate" + (n > 1 ? "s" : "") + "</summary>" + hit.duplicates.map((d) =>
    "<a href='" + escapeHtml(urlOf(Object.assign({}, state.view, { id: d.id, text: null, page: 0 }))) + "' data-id=" + d.id + ">#" + d.id + "</a> <small>" + d.similarity.toFixed(4) + "</small>").join(" ");
  box.querySelectorAll("a").forEach((a) => a.addEventListener("click", (e) => { e.preventDefault(); go({ id: parseInt(a.dataset.id, 10), text: null, page: 0 }, true); }));
  return box;
}

function labelButtons(id, current, onSaved) {  // one button per label class (digits 1..9 press them on the page)
  const row = document.createElement("div");
  row.className = "label-row";
  state.labelClasses.forEach((name, i) => {
    const b = document.createElement("button");
    b.type = "button";
    b.dataset.label = name;
    b.className = "label-button" + (name === current ? " chosen" : "");
    b.innerHTML = escapeHtml(name) + (i < 9 ? " <kbd>" + (i + 1) + "</kbd>" : "");
    b.addEventListener("click", async () => {
      try { await saveLabel(id, name); onSaved(name); } catch (err) { setStatus(err.message, true); }
    });
    row.append(b);
  });
  const clear = document.createElement("button");  // takes a person's label back (the log keeps both rows)
  clear.type = "button";
  clear.className = "clear-label";
  clear.title = "take the label back";
  clear.textContent = "clear";
  clear.addEventListener("click", async () => {
    try { await saveLabel(id, null); onSaved(null); } catch (err) { setStatus(err.message, true); }
  });
  row.append(clear);
  return row;
}

async function showQueryItem(id) {
  const box = $("query-item");
  box.hidden = true;
  const item = await itemMeta(id);
  if (!item || state.view.id !== id) return;
  const p = item.verdict ? item.verdict.p_nsfw : item.p_nsfw;
  const meta = document.createElement("div");
  meta.className = "meta";
  const label = item.label ? "label <b>" + escapeHtml(item.label) + "</b>" : "<span class=muted>not labelled</span>";
  meta.innerHTML = "<div class=query-title>Query: item #" + id + "</div>" +
    (p !== undefined && p !== null ? "<span class='score" + (overThreshold(p) ? " high" : "") + "'>p_nsfw " + p.toFixed(3) + "</span> · " : "") +
    "<span class=own-label>" + label + "</span><div class=uri>" + escapeHtml(item.uri) + "</div><div class=caption>" + escapeHtml(captionOf(item) || "") + "</div>";
  const labelled = (name) => {
    item.label = name;
    meta.querySelector(".own-label").innerHTML = name === null ? "<span class=muted>label taken back</span>" :
      "label <b>" + escapeHtml(name) + "</b> <span class=muted>(saved)</span>";
    meta.querySelectorAll(".label-button").forEach((b) => b.classList.toggle("chosen", b.dataset.label === name));
  };
  if (state.labelClasses.length) meta.append(labelButtons(id, item.label, labelled));
  box.replaceChildren(thumbFrame(id, p), meta);
  box.dataset.id = id;
  box.hidden = false;
}

// Safe mode hides cards over the threshold (on the page); duplicates are folded by the server (dedup=1).
function applyFilters() {
  const view = state.view;
  let unsafe = 0;
  for (const div of $("grid").children) {
    const isUnsafe = view.safe && div.dataset.p !== "" && overThreshold(parseFloat(div.dataset.p));
    div.hidden = isUnsafe;
    unsafe += isUnsafe ? 1 : 0;
  }
  const notes = [];
  if (unsafe) notes.push(unsafe + " hidden by safe mode");
  if (state.dedupNote) notes.push(state.dedupNote);
  $("hidden-note").textContent = notes.join(" · ");
  $("hidden-note").hidden = !notes.length;
}

function dedupNote(result) {
  if (!result.dedup) return "";
  const own = result.query.kind === "id" ? result.hits.find((h) => h.id === result.query.id) : null;
  const copies = own && own.duplicates ? own.duplicates.length : 0;
  return result.dedup.collapsed + " duplicates folded (similarity ≥ " + result.dedup.similarity + ")" +
    (copies ? ", " + copies + " of them copies of the query" : "");
}

// ---- results and paging

// The grid is aria-busy while a search is in flight, so readers (and tests) can tell a stale grid from a fresh one.
function setBusy(busy) { if (busy) $("grid").setAttribute("aria-busy", "true"); else $("grid").removeAttribute("aria-busy"); }

function showResult(result, view) {
  setBusy(false);
  showVerdict(result.verdict);
  const start = view.page * view.k;
  const query = result.query;  // an id search lists the item itself first: the page shows it above the grid
  const all = query.kind === "id" ? result.hits.filter((h) => h.id !== query.id) : result.hits;
  const hits = all.slice(start, start + view.k);
  state.dedupNote = dedupNote(result);
  $("grid").replaceChildren(...hits.map(card));
  applyFilters();
  const more = all.length > start + view.k;
  $("pager").hidden = !view.page && !more;
  $("prev").disabled = !view.page;
  $("next").disabled = !more;
  $("page-info").textContent = "page " + (view.page + 1) + " · " + (hits.length ? (start + 1) + "–" + (start + hits.length) : "none");
  setStatus(hits.length + " neighbours of " + describe(result.query) + (view.page ? " (page " + (view.page + 1) + ")" : ""));
}

function describe(query) {
  if (query.kind === "id") return "item #" + query.id;
  if (query.kind === "text") return "“" + query.text + "”";
  return "the uploaded image";
}

function clearResult(message) {
  setBusy(false);
  showVerdict(null);
  $("grid").replaceChildren();
  $("query-item").hidden = true;
  $("pager").hidden = true;
  $("hidden-note").hidden = true;
  setStatus(message, true);
}

async function explainAgreement(body) {
  $("agreement").textContent = "";
  try {
    const ex = await api("/v1/explain", body);
    $("agreement").textContent = ex.agree + " of the " + ex.k + " nearest labelled training examples agree with the verdict";
  } catch (err) { /* no classifier or no labelled examples: the grid is still shown */ }
}

// one more: is there a next page? (and one for the item itself in an id search)
function wanted(view) { return Math.min(1000, view.k * (view.page + 1) + 2); }

async function searchFile(file) {
  state.file = file;
  $("preview").src = URL.createObjectURL(file);
  $("preview").hidden = false;
  $("query-item").hidden = true;
  state.view = Object.assign({}, state.view, { id: null, text: null, page: 0 });
  const url = urlOf(state.view);
  if (url !== location.pathname + location.search) history.pushState(null, "", url);
  setBusy(true);
  setStatus("searching…");
  const form = new FormData();
  form.append("image", file);
  form.append("k", wanted(state.view));
  if (state.view.dedup) { form.append("dedup", "1"); form.append("dedup_similarity", state.view.dsim); }
  try {
    showResult(await api("/v1/search", { method: "POST", body: form }), state.view);
    const again = new FormData();
    again.append("image", file);
    again.append("k", 10);
    explainAgreement({ method: "POST", body: again });
  } catch (err) { clearResult(err.message); }
}

async function searchJson(query) {
  const view = state.view;
  $("preview").hidden = true;
  setBusy(true);
  setStatus("searching…");
  if (query.id !== undefined) showQueryItem(query.id); else $("query-item").hidden = true;
  try {
    const dedup = view.dedup ? { dedup: true, dedup_similarity: view.dsim } : {};
    const result = await api("/v1/search", jsonBody(Object.assign({ k: wanted(view) }, dedup, query)));
    if (state.view !== view) return;  // a newer query started meanwhile
    showResult(result, view);
    $("agreement").textContent = "";
    if (result.verdict && query.id !== undefined) explainAgreement(jsonBody({ id: query.id, k: 10 }));
  } catch (err) { if (state.view === view) clearResult(err.message); }
}

// ---- keyboard (audit mode; review mode has its own keys in review.js): ? lists them

const AUDIT_KEYS = [["/", "search by text"], ["i", "search by id"], ["n / →", "next page"], ["p / ←", "previous page"],
  ["f", "safe mode on/off"], ["d", "hide duplicates on/off"], ["1…9", "label the queried item"], ["?", "this help"], ["Esc", "close"]];

function toggleHelp(rows) {
  const box = $("help");
  if (!box.hidden || !rows) { box.hidden = true; return; }
  box.innerHTML = "<h2>Keyboard</h2><table>" + rows.map(([k, what]) => "<tr><td><kbd>" + escapeHtml(k) + "</kbd></td><td>" + escapeHtml(what) + "</td></tr>").join("") +
    "</table><p class=muted>Esc or ? closes this.</p>";
  box.hidden = false;
}
window.toggleHelp = toggleHelp;

function auditKey(e) {
  if (e.ctrlKey || e.metaKey || e.altKey || (e.target && ["INPUT", "TEXTAREA", "SELECT"].includes(e.target.tagName))) return;
  if (e.key === "Escape") { toggleHelp(null); return; }
  if (state.view.mode !== "audit") return;
  const actions = {
    "?": () => toggleHelp(AUDIT_KEYS), "/": () => $("text").focus(), "i": () => $("id").focus(),
    "n": () => { if (!$("next").disabled && !$("pager").hidden) $("next").click(); },
    "p": () => { if (!$("prev").disabled && !$("pager").hidden) $("prev").click(); },
    "f": () => $("safe").click(), "d": () => $("dedup").click(),
  };
  actions.ArrowRight = actions.n;
  actions.ArrowLeft = actions.p;
  const digit = /^[1-9]$/.test(e.key) ? document.querySelectorAll("#query-item:not([hidden]) .label-button")[parseInt(e.key, 10) - 1] : null;
  if (digit) { e.preventDefault(); digit.click(); }
  else if (actions[e.key]) { e.preventDefault(); actions[e.key](); }
}

function wire() {
  const drop = $("drop");
  $("file").addEventListener("change", (e) => { if (e.target.files[0]) searchFile(e.target.files[0]); });
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault(); drop.classList.remove("over");
    if (e.dataTransfer.files[0]) searchFile(e.dataTransfer.files[0]);
  });
  const perPage = () => Math.max(1, Math.min(200, parseInt($("k").value, 10) || 12));
  $("by-id").addEventListener("submit", (e) => { e.preventDefault(); go({ id: parseInt($("id").value, 10), text: null, page: 0, k: perPage() }, true); });
  $("by-text").addEventListener("submit", (e) => { e.preventDefault(); if ($("text").value.trim()) go({ text: $("text").value, id: null, page: 0, k: perPage() }, true); });
  $("safe").addEventListener("change", () => { state.view.safe = $("safe").checked; history.replaceState(null, "", urlOf(state.view)); applyFilters(); });
  $("dedup").addEventListener("change", () => go({ dedup: $("dedup").checked, page: 0 }, false));
  $("dsim").addEventListener("change", () => {
    const v = parseFloat($("dsim").value);
    if (v >= 0.5 && v <= 1) go({ dsim: v, dedup: true, page: 0 }, false);
  });
  $("reviewer").value = reviewer() || "";
  $("reviewer").addEventListener("change", () => localStorage.setItem("pnsfw-reviewer", $("reviewer").value.trim()));
  document.addEventListener("keydown", auditKey);
  $("prev").addEventListener("click", () => go({ page: Math.max(0, state.view.page - 1) }, true));
  $("next").addEventListener("click", () => go({ page: state.view.page + 1 }, true));
  document.querySelectorAll("#modes .mode").forEach((a) => a.addEventListener("click", (e) => {
    e.preventDefault(); go({ mode: a.dataset.mode }, true);
  }));
  window.addEventListener("popstate", () => show(viewFromUrl()));
  $("token").value = localStorage.getItem("pnsfw-token") || "";
  $("token").addEventListener("change", () => { localStorage.setItem("pnsfw-token", $("token").value); loadStats().then(() => show(viewFromUrl())); });
  TYPED_FIELDS.forEach((name) => $(name).addEventListener("input", () => {
    if (!document.body.dataset.ready) $(name).dataset.typed = "1";
  }));
  loadStats().then(() => { show(viewFromUrl()); firstShown(); });
}

// after every script of the page has run (review.js defines startReview): a script still downloading does not stop
// the stats' answer from arriving first, and the first show would then miss review mode
if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", wire);
else wire();
