// The search page: a photo (chosen, dropped or pasted) or a catalogue item in, a grid of hits out.
// It only calls this gateway's HTTP/JSON API (see /openapi.json); nothing is loaded from elsewhere.
"use strict";

const KEY_STORAGE = "cbir.apiKey";
const $ = (id) => document.getElementById(id);
const state = { sample: [], labels: new Set(), blobUrls: [], searchId: 0, queryUrl: null, info: null };

function apiKey() {
  return localStorage.getItem(KEY_STORAGE) || "";
}

function authHeaders() {
  const key = apiKey();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

// Turns any answer of the API into either its JSON or an Error carrying a message for people.
async function call(path, options = {}) {
  let response;
  try {
    response = await fetch(path, { ...options, headers: { ...authHeaders(), ...(options.headers || {}) } });
  } catch (err) {
    throw Object.assign(new Error("Cannot reach the search service. Is the gateway running?"), { status: 0 });
  }
  const text = await response.text();
  let body = null;
  try {
    body = text ? JSON.parse(text) : null;
  } catch (err) {
    body = null;
  }
  if (response.ok) return body;
  const status = body && body.status ? body.status : "";
  const message = body && body.message ? body.message : `HTTP ${response.status}`;
  throw Object.assign(new Error(explain(response.status, status, message)), { status: response.status, code: status });
}

function explain(httpStatus, status, message) {
  if (httpStatus === 413 || status === "RESOURCE_EXHAUSTED") return `This image is too large. ${message}`;
  if (httpStatus === 401) return `This gateway needs an API key (${message}).`;
  if (httpStatus === 403) return `Your API key may not do this: ${message}`;
  if (httpStatus === 503 || status === "UNAVAILABLE") return `The search service is unavailable right now; try again in a moment. ${message}`;
  if (httpStatus === 504) return `The search took too long. ${message}`;
  if (status === "INVALID_ARGUMENT" && /image/i.test(message)) return `This file is not an image the service can read. ${message}`;
  return message;
}

function showError(err) {
  const box = $("error");
  box.textContent = err.message;
  box.hidden = false;
  if (err.status === 401) openKeyDialog();
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

// ------------------------------------------------------------------ thumbnails

function releaseBlobs() {
  state.blobUrls.forEach((url) => URL.revokeObjectURL(url));
  state.blobUrls = [];
}

function imagePath(id) {
  return `/v1/items/${encodeURIComponent(id)}/image`;
}

// Without a key the browser loads (and caches) thumbnails itself; with one, <img> cannot send the
// header, so the image is fetched and shown from a blob.
function setThumbnail(img, id, placeholder) {
  img.addEventListener("error", () => placeholder.classList.add("shown"), { once: true });
  if (!apiKey()) {
    img.src = imagePath(id);
    return;
  }
  fetch(imagePath(id), { headers: authHeaders() })
    .then((r) => (r.ok ? r.blob() : Promise.reject(new Error(String(r.status)))))
    .then((blob) => {
      const url = URL.createObjectURL(blob);
      state.blobUrls.push(url);
      img.src = url;
    })
    .catch(() => placeholder.classList.add("shown"));
}

function card(item, score) {
  const li = document.createElement("li");
  li.className = "hit";
  li.dataset.id = item.id;
  const button = document.createElement("button");
  button.type = "button";
  button.title = `More like ${item.id}`;
  const frame = document.createElement("div");
  frame.className = "thumb";
  const img = document.createElement("img");
  img.alt = item.label ? `${item.label} ${item.id}` : item.id;
  img.loading = "lazy";
  img.decoding = "async";
  const placeholder = document.createElement("span");
  placeholder.className = "placeholder";
  placeholder.textContent = (item.label || item.id).slice(0, 2).toUpperCase();
  frame.append(placeholder, img);
  setThumbnail(img, item.id, placeholder);
  const info = document.createElement("div");
  info.className = "info";
  if (score !== undefined) {
    const bar = document.createElement("div");
    bar.className = "score";
    const fill = document.createElement("span");
    fill.style.width = `${Math.max(0, Math.min(1, score)) * 100}%`;
    const value = document.createElement("b");
    value.className = "score-value";
    value.textContent = score.toFixed(3);
    bar.append(fill);
    info.append(value, bar);
  }
  const label = document.createElement("span");
  label.className = "label";
  label.textContent = item.label || "no label";
  const id = document.createElement("span");
  id.className = "id";
  id.textContent = item.id;
  id.title = item.id;
  info.append(label, id);
  button.append(frame, info);
  button.addEventListener("click", () => moreLikeThis(item));
  li.append(button);
  return li;
}

function remember(items) {
  for (const item of items) if (item.label) state.labels.add(item.label);
  const list = $("labels");
  list.replaceChildren(
    ...[...state.labels].sort().map((label) => Object.assign(document.createElement("option"), { value: label }))
  );
}

function render(title, entries, meta) {
  releaseBlobs();
  $("results-title").textContent = title;
  $("results-meta").textContent = meta || "";
  $("results").replaceChildren(...entries.map(([item, score]) => card(item, score)));
  $("empty").hidden = entries.length > 0;
  document.body.dataset.state = "results";
}

// ------------------------------------------------------------------ searches

function searchFields() {
  const k = parseInt($("k").value, 10);
  const label = $("label").value.trim();
  return { k: Number.isFinite(k) ? k : 0, label };
}

function describe(response, started) {
  const g = response.generation || {};
  const space = g.space || {};
  const ms = Math.round(performance.now() - started);
  return `${(response.hits || []).length} hits · ${ms} ms · generation ${g.name || "?"} · model ${space.modelName || "?"} v${space.modelVersion || "?"}`;
}

async function runSearch(title, request) {
  const id = ++state.searchId;
  clearError();
  document.body.dataset.state = "searching";
  $("results-meta").textContent = "searching…";
  const started = performance.now();
  try {
    const response = await request();
    if (id !== state.searchId) return; // a newer search was started meanwhile
    const hits = response.hits || [];
    remember(hits);
    render(title, hits.map((h) => [h, h.score || 0]), describe(response, started));
    showServing(response.generation);
  } catch (err) {
    if (id !== state.searchId) return;
    render("No results", [], "");
    $("empty").hidden = true;
    document.body.dataset.state = "error";
    showError(err);
  } finally {
    // How many searches have finished: lets a script (the browser test) wait for this one.
    if (id === state.searchId) document.body.dataset.completed = String(id);
  }
}

function setQueryImage(url, caption) {
  const img = $("query-image");
  if (state.queryUrl && state.queryUrl !== url) URL.revokeObjectURL(state.queryUrl);
  state.queryUrl = url && url.startsWith("blob:") ? url : null;
  const showHint = (hint) => {
    img.hidden = hint;
    $("drop-hint").hidden = !hint;
  };
  img.onerror = () => showHint(true); // e.g. a file the browser cannot show either
  if (url) {
    img.src = url;
    showHint(false);
  } else {
    img.removeAttribute("src");
    showHint(true);
  }
  $("query-caption").textContent = caption;
}

function searchFile(file) {
  if (!file) return;
  setQueryImage(URL.createObjectURL(file), `${file.name || "pasted image"} · ${formatBytes(file.size)}`);
  const { k, label } = searchFields();
  const form = new FormData();
  form.append("image", file, file.name || "pasted");
  if (k) form.append("k", String(k));
  if (label) form.append("label", label);
  runSearch("Most similar items", () => call("/v1/search:upload", { method: "POST", body: form }));
}

function moreLikeThis(item) {
  const { k, label } = searchFields();
  const query = { itemId: item.id, k };
  if (label) query.filter = { labels: [label] };
  const thumb = document.querySelector(`.hit[data-id="${CSS.escape(item.id)}"] img`);
  const src = thumb && thumb.complete && thumb.naturalWidth ? thumb.src : "";
  // The thumbnail's blob (with an API key) now belongs to the query image, not to the grid.
  state.blobUrls = state.blobUrls.filter((url) => url !== src);
  setQueryImage(src, `More like ${item.id}${item.label ? ` (${item.label})` : ""}`);
  window.scrollTo({ top: 0, behavior: "smooth" });
  runSearch(`More like ${item.id}`, () =>
    call("/v1/search", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(query) })
  );
}

async function loadSample() {
  clearError();
  try {
    const answer = await call("/v1/items:sample?n=12");
    state.sample = (answer && answer.items) || [];
    remember(state.sample);
    if (!$("results").children.length || $("results-title").textContent.startsWith("Random")) {
      render("Random catalogue items", state.sample.map((item) => [item, undefined]), "pick one to see more like it");
    }
  } catch (err) {
    if ($("results-title").textContent.startsWith("Random")) render("No catalogue items to show", [], "");
    $("empty").hidden = true;
    showError(err);
  }
}

async function randomItem() {
  if (!state.sample.length) await loadSample();
  const item = state.sample.shift();
  if (item) moreLikeThis(item);
  if (state.sample.length < 2) loadSample();
}

// ------------------------------------------------------------------ serving info, key

// The generation that answered; the item count is the last serving info's while it is the same one.
function showServing(generation, info) {
  if (!generation) return;
  if (info) state.info = info;
  const known = state.info && state.info.generation && state.info.generation.name === generation.name;
  const space = generation.space || {};
  const count = known ? ` · ${Number(state.info.itemCount).toLocaleString()} items` : "";
  const el = $("serving-info");
  el.textContent = `model ${space.modelName || "?"} v${space.modelVersion || "?"} · generation ${generation.name || "?"}${count}`;
  el.classList.remove("down");
}

async function loadServingInfo() {
  const el = $("serving-info");
  try {
    const info = await call("/v1/serving-info");
    showServing(info.generation, info);
    return true;
  } catch (err) {
    el.classList.add("down");
    el.textContent = err.status === 503 ? "service unavailable" : err.status === 401 ? "API key needed" : err.status === 403 ? "connected" : "not connected";
    if (err.status === 401) openKeyDialog();
    if (err.status === 503) showError(err);
    return err.status === 403;
  }
}

function openKeyDialog() {
  const dialog = $("key-dialog");
  if (dialog.open) return;
  $("key-input").value = apiKey();
  dialog.showModal();
}

function setupKeyDialog() {
  $("key-btn").addEventListener("click", openKeyDialog);
  $("key-dialog").addEventListener("close", async () => {
    const action = $("key-dialog").returnValue;
    if (action === "save") localStorage.setItem(KEY_STORAGE, $("key-input").value.trim());
    if (action === "clear") localStorage.removeItem(KEY_STORAGE);
    if (action === "save" || action === "clear") {
      clearError();
      if (await loadServingInfo()) loadSample();
    }
  });
}

// ------------------------------------------------------------------ input: choose, drop, paste

function formatBytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(0)} KB`;
  return `${(n / 1024 / 1024).toFixed(1)} MB`;
}

function setupInput() {
  const zone = $("drop-zone");
  const input = $("file-input");
  const choose = () => input.click();
  zone.addEventListener("click", choose);
  zone.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") {
      e.preventDefault();
      choose();
    }
  });
  $("choose-btn").addEventListener("click", choose);
  input.addEventListener("change", () => {
    searchFile(input.files[0]);
    input.value = "";
  });
  ["dragenter", "dragover"].forEach((type) =>
    zone.addEventListener(type, (e) => {
      e.preventDefault();
      zone.classList.add("over");
    })
  );
  ["dragleave", "drop"].forEach((type) => zone.addEventListener(type, () => zone.classList.remove("over")));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    searchFile(e.dataTransfer.files[0]);
  });
  document.addEventListener("paste", (e) => {
    const file = [...(e.clipboardData ? e.clipboardData.files : [])][0];
    if (file) {
      e.preventDefault();
      searchFile(file);
    }
  });
  $("random-btn").addEventListener("click", randomItem);
}

document.addEventListener("DOMContentLoaded", async () => {
  setupInput();
  setupKeyDialog();
  if (await loadServingInfo()) await loadSample();
  document.body.dataset.ready = "true";
});
