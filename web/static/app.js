// The search page: a photo (picker, drop or paste) or a listing ("more like this") -> POST /api/search.
// The page talks to its own server only; TorchServe's keys never reach it.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { versions: [], maxUpload: 6000000, query: null, objectUrl: null, sequence: 0 };

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function setStatus(message) {
  $("status").textContent = message;
}

// The default's option has the value "": a search sent without a version goes to TorchServe's default, whichever
// version that is by then.
function currentVersion() {
  const value = $("version").value;
  return state.versions.find((v) => (value === "" ? v.default : v.version === value)) || null;
}

function checkedCategories() {
  return Array.from(document.querySelectorAll("#category-list input:checked"), (box) => box.value);
}

function fillCategories(version) {
  const keep = new Set(checkedCategories());
  const list = $("category-list");
  list.replaceChildren();
  for (const category of version ? version.categories : []) {
    const label = document.createElement("label");
    const box = document.createElement("input");
    box.type = "checkbox";
    box.value = category;
    box.checked = keep.has(category);
    box.addEventListener("change", rerun);
    label.append(box, " " + category);
    list.append(label);
  }
  $("categories").hidden = list.children.length === 0;
}

function applyVersion() {
  const version = currentVersion();
  if (version) {
    const k = $("k");
    k.max = String(version.max_k);
    if (Number(k.value) > version.max_k) k.value = String(version.max_k);
  }
  fillCategories(version);
}

async function loadVersions() {
  try {
    const config = await (await fetch("/api/config")).json();
    state.maxUpload = config.max_upload_bytes;
    const response = await fetch("/api/versions");
    const answer = await response.json();
    if (!response.ok) throw new Error(answer.error || `HTTP ${response.status}`);
    state.versions = answer.versions;
    const select = $("version");
    const chosen = select.value;
    select.replaceChildren();
    for (const v of answer.versions) {
      select.append(new Option(v.default ? `${v.version} (default)` : v.version, v.default ? "" : v.version));
    }
    if (Array.from(select.options).some((option) => option.value === chosen)) select.value = chosen;
    $("model-line").textContent = `Model ${answer.model}: ${answer.versions.length} version(s) offered`;
    applyVersion();
  } catch (error) {
    $("model-line").textContent = "The model's versions are unavailable: searches go to the default version.";
    showError(String(error.message || error));
  }
}

function searchForm(query) {
  const form = new FormData();
  if (query.kind === "photo") form.append("image", query.file, query.file.name || "photo");
  else form.append("listing", query.id);
  if ($("k").value) form.append("k", $("k").value);
  for (const category of checkedCategories()) form.append("category", category);
  if ($("version").value) form.append("version", $("version").value);
  return form;
}

async function search(query) {
  if (query.kind === "photo" && query.file.size > state.maxUpload) {
    showError(`upload too large: ${query.file.size} bytes, over the limit of ${state.maxUpload} bytes`);
    return;
  }
  state.query = query;
  const sequence = ++state.sequence;
  showError("");
  setStatus("Searching…");
  document.body.setAttribute("aria-busy", "true");
  let response, answer;
  try {
    response = await fetch("/api/search", { method: "POST", body: searchForm(query) });
    answer = await response.json().catch(() => ({ error: `HTTP ${response.status} without a reason` }));
  } catch (error) {
    response = { ok: false };
    answer = { error: `the search failed: ${error.message || error}` };
  }
  if (sequence !== state.sequence) return; // a newer search has started
  document.body.removeAttribute("aria-busy");
  if (!response.ok) {
    clearResults();
    setStatus("");
    showError(answer.error || `HTTP ${response.status}`);
    return;
  }
  render(query, answer);
  const shown = state.versions.find((v) => v.default);
  if (!$("version").value && shown && shown.version !== answer.model_version) loadVersions(); // the default moved
}

function rerun() {
  if (state.query) search(state.query);
}

function clearResults() {
  $("query").hidden = true;
  $("results-title").hidden = true;
  $("results").replaceChildren();
}

function formatDistance(value) {
  return value !== 0 && Math.abs(value) < 1e-4 ? value.toExponential(1) : value.toFixed(4);
}

function percent(value) {
  return `${Math.round(value * 100)}%`;
}

function render(query, answer) {
  const image = $("query-image");
  if (query.kind === "photo") {
    if (state.objectUrl) URL.revokeObjectURL(state.objectUrl);
    state.objectUrl = URL.createObjectURL(query.file);
    image.src = state.objectUrl;
    image.alt = `Your photo${query.file.name ? ": " + query.file.name : ""}`;
    $("query-title").textContent = "Your photo";
    $("prediction").textContent = `Predicted category: ${answer.category} (${percent(answer.confidence)} confidence)`;
  } else {
    const listing = answer.listing || { id: query.id, category: answer.category };
    image.src = listing.image_url || "";
    image.alt = `Listing ${listing.id}, ${listing.category}`;
    $("query-title").textContent = `More like ${listing.id}`;
    $("prediction").textContent = `Listing category: ${listing.category}`;
  }
  $("answered-by").textContent = `Answered by ${answer.model} version ${answer.model_version}`;
  $("query").hidden = false;

  const tiles = answer.neighbours.map((item) => tile(item));
  $("results").replaceChildren(...tiles);
  $("results-title").hidden = tiles.length === 0;
  setStatus(`${tiles.length} similar listing(s), answered by version ${answer.model_version}`);
}

function tile(item) {
  const li = document.createElement("li");
  const button = document.createElement("button");
  button.type = "button";
  button.className = "tile";
  button.dataset.id = item.id;
  button.setAttribute("aria-label", `More like ${item.id}, ${item.category}, distance ${formatDistance(item.distance)}`);
  const img = document.createElement("img");
  img.src = item.image_url;
  img.alt = `${item.id}, ${item.category}`;
  img.addEventListener("load", () => img.classList.toggle("small", img.naturalWidth < 96));
  const id = document.createElement("span");
  id.className = "tile-id";
  id.textContent = item.id;
  const category = document.createElement("span");
  category.className = "tile-category";
  category.textContent = item.category;
  const distance = document.createElement("span");
  distance.className = "tile-distance";
  distance.textContent = `distance ${formatDistance(item.distance)}`;
  button.append(img, id, category, distance);
  button.addEventListener("click", () => search({ kind: "listing", id: item.id }));
  li.append(button);
  return li;
}

function searchFile(file) {
  if (file) search({ kind: "photo", file });
}

function setUp() {
  const queryImage = $("query-image");
  queryImage.addEventListener("load", () => queryImage.classList.toggle("small", queryImage.naturalWidth < 96));
  $("photo").addEventListener("change", (event) => {
    searchFile(event.target.files[0]);
    event.target.value = ""; // the same file can be chosen again
  });
  // A photo dropped anywhere on the page is searched (rather than opened by the browser).
  const zone = $("drop-zone");
  document.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("dragging");
  });
  document.addEventListener("dragleave", (event) => {
    if (!event.relatedTarget) zone.classList.remove("dragging");
  });
  document.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("dragging");
    searchFile(event.dataTransfer ? event.dataTransfer.files[0] : null);
  });
  document.addEventListener("paste", (event) => {
    const file = Array.from(event.clipboardData ? event.clipboardData.files : [])[0];
    if (file) {
      event.preventDefault();
      searchFile(file);
    }
  });
  $("search-form").addEventListener("submit", (event) => event.preventDefault());
  $("version").addEventListener("change", () => {
    applyVersion();
    rerun();
  });
  $("k").addEventListener("change", rerun);
  loadVersions();
}

setUp();
