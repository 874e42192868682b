// Review mode (?mode=review): the server's review queue, one item at a time; one key per label, u undoes,
// s skips, space shows a blurred image, ? lists the keys. Labels are saved in the store at once (POST /v1/labels),
// with the reviewer's name; the latest rows of the store's log (who, when) are shown below, and can be exported.
"use strict";

const review = { queue: [], at: 0, undo: [], undoQueued: 0, done: 0, keys: {}, classes: [], loading: null, labelled: 0,
  remaining: 0 };

function keyFor(classes) {  // 1..9 always; also the first letter of a class when no other class shares it
  const keys = {};
  classes.forEach((name, i) => { if (i < 9) keys[String(i + 1)] = name; });
  const initials = classes.map((c) => c[0].toLowerCase());
  classes.forEach((name, i) => {
    const k = initials[i];
    if (initials.indexOf(k) === initials.lastIndexOf(k) && !"us".includes(k) && !/[0-9]/.test(k)) keys[k] = name;
  });
  return keys;
}

async function loadQueue() {
  $("review-progress").textContent = "Loading the review queue…";
  const queue = await api("/v1/review?n=50");
  review.queue = queue.items;
  review.at = 0;
  review.classes = queue.classes;
  review.keys = keyFor(queue.classes);
  review.labelled = queue.labelled;
  review.remaining = queue.remaining;
  review.threshold = queue.threshold;
  state.threshold = queue.threshold;
  renderKeys();
  renderItem();
}

function renderKeys() {
  const byClass = {};
  for (const [key, name] of Object.entries(review.keys)) (byClass[name] = byClass[name] || []).push(key);
  $("review-keys").replaceChildren(...review.classes.map((name) => {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "label-button";
    button.dataset.label = name;
    button.innerHTML = escapeHtml(name) + " " + (byClass[name] || []).map((k) => "<kbd>" + escapeHtml(k) + "</kbd>").join(" ");
    button.addEventListener("click", () => label(name));
    return button;
  }));
}

function current() { return review.queue[review.at]; }

function renderProgress() {
  const left = Math.max(0, review.remaining - review.done);
  $("review-progress").textContent = review.done + " labelled this session · " + (review.labelled + review.done) +
    " labelled in the store · " + left + " unlabelled items left · item " + Math.min(review.at + 1, review.queue.length) + " of " + review.queue.length + " in this batch";
  $("undo").disabled = !review.undo.length;
}

function renderItem() {
  renderProgress();
  const item = current();
  if (!item) {
    $("review-item").replaceChildren();
    $("review-status").textContent = review.queue.length ? "Batch done: loading the next one…" : "Nothing left to review.";
    if (review.queue.length) loadQueue().catch((err) => { $("review-status").textContent = err.message; });
    return;
  }
  const v = item.verdict;
  const meta = document.createElement("div");
  meta.className = "meta";
  const known = item.metadata && item.metadata.label ? " · training label <b>" + escapeHtml(item.metadata.label) + "</b>" : "";
  meta.innerHTML = "<div class=query-title>item #" + item.id + "</div>" +
    "<div><span id=review-badge class='" + (v.nsfw ? "score high" : "score") + "'>" + (v.nsfw ? "NSFW" : "SFW") + " · p_nsfw " + v.p_nsfw.toFixed(3) + "</span>" +
    " (threshold " + v.threshold.toFixed(3) + ", top class " + escapeHtml(v.label) + ")" + known + "</div>" +
    "<div>" + item.agreement.agree + " of " + item.agreement.k + " labelled neighbours agree</div>" +
    "<div>" + item.reasons.map((r) => "<span class=reason>" + escapeHtml(r) + "</span>").join("") + "</div>" +
    "<div class=uri>" + escapeHtml(item.uri) + "</div>" +
    "<div class=caption>" + escapeHtml(captionOf(item.metadata) || "") + "</div>";
  const frame = thumbFrame(item.id, v.p_nsfw);
  $("review-item").replaceChildren(frame, meta);
  $("review-item").dataset.id = item.id;
  $("review-status").textContent = "";
}

async function label(name) {
  const item = current();
  if (!item || review.busy) return;
  review.busy = true;
  try {
    await saveLabel(item.id, name);
    review.undo.push({ index: review.at, item: item, label: name });
    review.done += 1;
    logLine("#" + item.id + " → " + name);
    review.at += 1;
    renderItem();
    loadTrail();
  } catch (err) { review.undoQueued = 0; $("review-status").textContent = err.message; }  // not the label before
  finally { saved(); }
}

// A u pressed while a label is being saved undoes once that save is done (the label it would undo may be that one).
function saved() {
  review.busy = false;
  if (review.undoQueued) { review.undoQueued -= 1; undoLast(); }
}

async function undoLast() {
  if (review.busy) { review.undoQueued += 1; return; }
  const last = review.undo.pop();
  if (!last) return;
  review.busy = true;
  try {
    await saveLabel(last.item.id, null);
    review.done -= 1;
    if (review.queue[last.index] && review.queue[last.index].id === last.item.id) review.at = last.index;
    else { review.queue.splice(review.at, 0, last.item); }
    logLine("undone: #" + last.item.id + " (" + last.label + ")");
    renderItem();
    loadTrail();
  } catch (err) { review.undo.push(last); review.undoQueued = 0; $("review-status").textContent = err.message; }
  finally { saved(); }
}

function skip() { if (current()) { review.at += 1; renderItem(); } }

function logLine(text) {
  const li = document.createElement("li");
  li.textContent = text;
  $("review-log").prepend(li);
  while ($("review-log").children.length > 12) $("review-log").lastChild.remove();
}

function reviewKeys() {
  const byClass = {};
  for (const [key, name] of Object.entries(review.keys)) (byClass[name] = byClass[name] || []).push(key);
  return review.classes.map((name) => [(byClass[name] || []).join(" / "), "label " + name])
    .concat([["u", "undo the last label"], ["s", "skip"], ["space", "show a blurred image"], ["?", "this help"], ["Esc", "close"]]);
}

function onKey(e) {
  if (state.view.mode !== "review" || e.ctrlKey || e.metaKey || e.altKey) return;
  if (e.target && ["INPUT", "TEXTAREA"].includes(e.target.tagName)) return;
  const key = e.key.toLowerCase();
  if (e.key === "?") { e.preventDefault(); window.toggleHelp(reviewKeys()); }
  else if (review.keys[key]) { e.preventDefault(); label(review.keys[key]); }
  else if (key === "u") { e.preventDefault(); undoLast(); }
  else if (key === "s") { e.preventDefault(); skip(); }
  else if (key === " ") {
    const img = document.querySelector("#review-item .thumb");
    if (img) { e.preventDefault(); img.click(); }
  }
}

// ---- the audit trail: the newest rows of the store's labels log, and CSV exports

function when(at) { return at ? new Date(at * 1000).toISOString().replace("T", " ").slice(0, 19) + " UTC" : ""; }

async function loadTrail() {
  try {
    const data = await api("/v1/labels?history=true&last=15");
    $("trail-table").innerHTML = "<tr><th>when</th><th>item</th><th>label</th><th>by</th><th>source</th></tr>" +
      data.labels.reverse().map((r) => "<tr><td>" + when(r.at) + "</td><td>#" + r.id + "</td><td>" +
        (r.label === null ? "<i>taken back</i>" : escapeHtml(r.label)) + "</td><td>" + escapeHtml(r.by || "") + "</td><td>" +
        escapeHtml(r.source) + "</td></tr>").join("");
  } catch (err) { $("trail-table").textContent = err.message; }
}

async function exportLabels(history) {
  const response = await fetch("/v1/labels?format=csv" + (history ? "&history=true" : ""), { headers: headers() });
  if (!response.ok) { $("review-status").textContent = "export failed: " + response.status; return; }
  const a = document.createElement("a");
  a.href = URL.createObjectURL(await response.blob());
  a.download = history ? "labels-log.csv" : "labels.csv";
  document.body.append(a);
  a.click();
  a.remove();
}

$("export").addEventListener("click", () => exportLabels(false));
$("export-history").addEventListener("click", () => exportLabels(true));

window.startReview = function () {
  if (!review.loading) review.loading = loadQueue().catch((err) => { $("review-progress").textContent = err.message; review.loading = null; });
};

$("undo").addEventListener("click", undoLast);
$("skip").addEventListener("click", skip);
document.addEventListener("keydown", onKey);

// ---- the model: headline metrics, and after a retrain the delta against the model it replaced

function better(d) { return d.delta === null ? 0 : d.metric === "fpr" ? -d.delta : d.delta; }  // fpr: lower is better
function fmt(v) { return v === null || v === undefined ? "n/a" : Number(v).toFixed(4); }

function modelPanel(m) {
  const r = m.retrain;
  let html = "<h2>model " + escapeHtml(m.name) + "</h2><p class=muted>" + (m.labels || 0) + " labels · evaluated on the " +
    escapeHtml(m.evaluated_on || "?") + " split · threshold " + fmt(m.threshold) + "</p>";
  if (!r) {
    html += "<table id=model-metrics><tr><th>metric</th><th>value</th></tr>" +
      ["pr_auc", "roc_auc", "precision", "recall", "f1"].map((k) => "<tr><td>" + k + "</td><td>" + fmt(m.metrics[k]) + "</td></tr>").join("") + "</table>";
    return html;
  }
  const v = r.verdicts;
  html += "<p>Retrained: beside the model it replaced (both on " + escapeHtml(r.delta_basis || "the same rows") + ")</p>" +
    "<table id=model-delta><tr><th>metric</th><th>previous</th><th>new</th><th>delta</th></tr>" +
    r.delta.map((d) => "<tr><td>" + escapeHtml(d.metric) + "</td><td>" + fmt(d.previous) + "</td><td>" + fmt(d.new) + "</td><td class='" +
      (better(d) > 0 ? "up" : better(d) < 0 ? "down" : "") + "'>" + (d.delta === null ? "n/a" : (d.delta >= 0 ? "+" : "") + d.delta.toFixed(4)) + "</td></tr>").join("") +
    "</table><p id=verdicts-changed><b>" + v.changed.toLocaleString() + "</b> of " + v.compared.toLocaleString() +
    " verdicts changed (" + v.to_nsfw.toLocaleString() + " to NSFW, " + v.to_sfw.toLocaleString() + " to SFW)</p>";
  return html;
}

async function loadModels() {
  try {
    const data = await api("/v1/models");
    const shown = data.models.filter((m) => !m.error && (m.name === data.served || m.retrain));
    $("model-panel").innerHTML = shown.map(modelPanel).join("");
    $("model-panel").hidden = !shown.length;
  } catch (err) { $("model-panel").hidden = true; }
}

const startQueue = window.startReview;
window.startReview = function () { loadModels(); loadTrail(); startQueue(); };

$("help-button").addEventListener("click", () => {
  if (state.view.mode === "review") window.toggleHelp(reviewKeys());
  else window.toggleHelp(AUDIT_KEYS);
});
