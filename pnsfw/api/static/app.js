// pnsfw audit page: plain JS, no build step. Talks to the JSON API of the same server.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { threshold: null };

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

function k() { return Math.max(1, Math.min(1000, parseInt($("k").value, 10) || 12)); }
function pct(p) { return (100 * p).toFixed(1) + "%"; }
function setStatus(text, isError) { $("status").textContent = text; $("status").className = isError ? "error" : "muted"; }

async function loadStats() {
  try {
    const stats = await api("/v1/stats");
    state.threshold = stats.model ? stats.model.threshold : null;
    $("store-info").textContent = stats.vectors.toLocaleString() + " vectors" +
      (stats.model ? " · model " + stats.model.name + " (threshold " + stats.model.threshold.toFixed(3) + ")" : " · no classifier");
  } catch (err) { setStatus(err.message, true); }
}

function showVerdict(verdict) {
  $("verdict").hidden = !verdict;
  if (!verdict) return;
  state.threshold = verdict.threshold;
  $("badge").textContent = verdict.nsfw ? "NSFW" : "SFW";
  $("badge").className = verdict.nsfw ? "nsfw" : "sfw";
  $("p-nsfw").textContent = "p_nsfw " + verdict.p_nsfw.toFixed(3);
  $("verdict-detail").textContent = "threshold " + verdict.threshold.toFixed(3) + " · model " + verdict.model + " · top class " + verdict.label;
  const rows = Object.entries(verdict.probabilities).map(([name, p]) =>
    "<tr><td>" + escapeHtml(name) + "</td><td><span class=bar style='width:" + Math.round(120 * p) + "px'></span></td><td>" + pct(p) + "</td></tr>");
  $("probs").innerHTML = rows.join("");
}

function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}

async function loadThumb(img, id) {
  try {
    const response = await fetch("/v1/items/" + id + "/thumb", { headers: headers() });
    if (!response.ok) { img.alt = "no image (" + response.status + ")"; return; }
    img.src = URL.createObjectURL(await response.blob());
  } catch (err) { img.alt = "no image"; }
}

function card(hit) {
  const div = document.createElement("div");
  div.className = "card";
  div.dataset.id = hit.id;
  const img = document.createElement("img");
  img.className = "thumb";
  img.alt = "item " + hit.id;
  const high = hit.p_nsfw !== null && state.threshold !== null && hit.p_nsfw >= state.threshold;
  if (high) { img.classList.add("blurred"); img.title = "above the threshold: click to show"; }
  img.addEventListener("click", () => img.classList.toggle("blurred"));
  loadThumb(img, hit.id);
  const meta = document.createElement("div");
  meta.className = "meta";
  const score = hit.p_nsfw === null ? "no score" : "p_nsfw " + hit.p_nsfw.toFixed(3);
  meta.innerHTML = "<a href='#' class=id>#" + hit.id + "</a> · sim " + hit.similarity.toFixed(3) +
    "<br><span class='score" + (high ? " high" : "") + "'>" + score + "</span>" +
    (hit.label ? " · label <b>" + escapeHtml(hit.label) + "</b>" : "");
  meta.querySelector(".id").addEventListener("click", (e) => { e.preventDefault(); searchJson({ id: hit.id }); });
  const frame = document.createElement("div");
  frame.className = "frame";  // keeps the blur inside the thumbnail's square
  frame.append(img);
  div.append(frame, meta);
  return div;
}

function showResult(result) {
  showVerdict(result.verdict);
  $("grid").replaceChildren(...result.hits.map(card));
  setStatus(result.hits.length + " neighbours of " + describe(result.query));
}

function describe(query) {
  if (query.kind === "id") return "item #" + query.id;
  if (query.kind === "text") return "“" + query.text + "”";
  return "the uploaded image";
}

async function explainAgreement(body) {
  $("agreement").textContent = "";
  try {
    const ex = await api("/v1/explain", body);
    $("agreement").textContent = ex.agree + " of the " + ex.k + " nearest labelled training examples agree with the verdict";
  } catch (err) { /* no classifier or no labelled examples: the grid is still shown */ }
}

async function searchFile(file) {
  $("preview").src = URL.createObjectURL(file);
  $("preview").hidden = false;
  setStatus("searching…");
  const form = new FormData();
  form.append("image", file);
  form.append("k", k());
  try {
    showResult(await api("/v1/search", { method: "POST", body: form }));
    const again = new FormData();
    again.append("image", file);
    again.append("k", 10);
    explainAgreement({ method: "POST", body: again });
  }
  catch (err) { showVerdict(null); $("grid").replaceChildren(); setStatus(err.message, true); }
}

async function searchJson(query) {
  if (query.id !== undefined) { $("preview").hidden = true; }
  setStatus("searching…");
  const body = { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(Object.assign({ k: k() }, query)) };
  try {
    const result = await api("/v1/search", body);
    showResult(result);
    if (result.verdict && query.id !== undefined) {
      explainAgreement({ method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ id: query.id, k: 10 }) });
    }
  }
  catch (err) { showVerdict(null); $("grid").replaceChildren(); setStatus(err.message, true); }
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
  $("by-id").addEventListener("submit", (e) => { e.preventDefault(); searchJson({ id: parseInt($("id").value, 10) }); });
  $("by-text").addEventListener("submit", (e) => { e.preventDefault(); if ($("text").value.trim()) searchJson({ text: $("text").value }); });
  $("token").value = localStorage.getItem("pnsfw-token") || "";
  $("token").addEventListener("change", () => { localStorage.setItem("pnsfw-token", $("token").value); loadStats(); });
  loadStats();
}

wire();
