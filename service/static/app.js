// OAML demo: a client of the public API only. The API key lives in this page's memory, never in storage.
"use strict";

const $ = (selector) => document.querySelector(selector);
let apiKey = "";
$("#key").addEventListener("input", (event) => { apiKey = event.target.value; });

function showError(problem) {
  const box = $("#error");
  box.textContent = problem ? `${problem.code || "ERROR"}: ${problem.detail || problem.message || problem}` : "";
  box.hidden = !problem;
}

async function call(method, path, body) {
  showError(null);
  const headers = apiKey ? { "X-API-Key": apiKey } : {};
  if (body && !(body instanceof FormData)) {  // a JSON body (merge, move)
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(body);
  }
  const response = await fetch(path, { method, headers, body });
  const type = response.headers.get("content-type") || "";
  const payload = type.includes("json") ? await response.json() : await response.blob();
  if (!response.ok) {
    showError(type.includes("json") ? payload : { code: response.status, detail: response.statusText });
    throw new Error(`${method} ${path}: ${response.status}`);
  }
  return payload;
}

function cell(text) { const td = document.createElement("td"); td.textContent = text; return td; }
function row(...cells) { const tr = document.createElement("tr"); cells.forEach((c) => tr.append(cell(c))); return tr; }
function fixed(x, digits = 3) { return x === null || x === undefined ? "-" : Number(x).toFixed(digits); }

// tabs
document.querySelectorAll("nav button").forEach((button) => button.addEventListener("click", () => {
  document.querySelectorAll("nav button, .tab").forEach((el) => el.classList.remove("active"));
  button.classList.add("active");
  $(`#${button.dataset.tab}`).classList.add("active");
  if (button.dataset.tab === "gallery") loadGallery();
}));

// drop zones: dropping files fills the input; a preview shows single images
document.querySelectorAll(".drop").forEach((zone) => {
  const input = zone.querySelector("input");
  const preview = zone.querySelector("img");
  const show = () => { if (preview && input.files[0]) preview.src = URL.createObjectURL(input.files[0]); };
  input.addEventListener("change", show);
  zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    input.files = event.dataTransfer.files;
    show();
  });
});

// verify and explain
$("#verify-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = new FormData(event.target);
  form.append("picture", "true");
  const r = await call("POST", "/explain", form);
  const decision = $("#verify-decision");
  decision.textContent = r.match ? "Same person (match)" : "Not the same person (no match)";
  decision.className = `decision ${r.match ? "match" : "nomatch"}`;
  $("#verify-picture").src = r.picture;
  const table = $("#verify-numbers");
  table.replaceChildren(
    row("fused score", `${fixed(r.score, 2)} (threshold ${fixed(r.threshold, 2)}, ${r.threshold_preset || "custom"})`),
    row("probability", `${fixed(r.probability)} (a match needs more than ${fixed(r.threshold_probability)})`),
    row("AdaFace cosine", fixed(r.scores.adaface)),
    row("QAConv", fixed(r.scores.qaconv, 2)),
    row("visibility", `${fixed(r.face_a.visibility, 2)} / ${fixed(r.face_b.visibility, 2)}`),
    row("model", r.model_version),
  );
  $("#verify-result").hidden = false;
});

// enrol
$("#enrol-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const r = await call("POST", "/gallery", new FormData(event.target));
  const box = $("#enrol-result");
  const list = document.createElement("table");
  list.append(row("photo", "result"));
  r.faces.forEach((f) => list.append(row(f.filename || `#${f.image_index}`, `enrolled (quality ${fixed(f.quality.standardised, 2)})`)));
  r.rejected.forEach((f) => list.append(row(f.filename || `#${f.image_index}`, `rejected: ${f.code}, ${f.reason}`)));
  const title = document.createElement("p");
  title.textContent = `${r.subject}: ${r.faces.length} face(s) enrolled, ${r.total_faces} in all`;
  box.replaceChildren(title, list);
  box.hidden = false;
});

// identify
$("#identify-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const r = await call("POST", "/identify", new FormData(event.target));
  const box = $("#identify-result");
  const title = document.createElement("p");
  title.className = `decision ${r.match ? "match" : "nomatch"}`;
  title.textContent = r.match ? `${r.match.name || r.match.subject}` : "Unknown person: no enrolled subject passes the threshold";
  const rule = document.createElement("p");
  rule.className = "note";
  rule.textContent = `threshold ${fixed(r.threshold, 2)} (${r.threshold_preset || "custom"}): strangers matched to someone `
    + `${(100 * r.fpir).toPrecision(2)}% of the time among ${r.gallery_faces} enrolled faces; `
    + `P(nobody enrolled) ${fixed(r.probability_unknown)}`;
  const table = document.createElement("table");
  table.append(row("subject", "name", "score", "probability", "match"));
  r.candidates.forEach((c) => table.append(row(c.subject, c.name || "", fixed(c.score, 2), fixed(c.probability), c.match ? "yes" : "no")));
  box.replaceChildren(title, rule, table);
  box.hidden = false;
});

// gallery
const page = { offset: 0, limit: 20, total: 0 };
async function loadGallery() {
  const r = await call("GET", `/gallery?offset=${page.offset}&limit=${page.limit}`);
  page.total = r.total;
  $("#gallery-page").textContent = `${r.total ? page.offset + 1 : 0}-${page.offset + r.subjects.length} of ${r.total}`;
  const table = $("#gallery-list");
  table.replaceChildren(row("subject", "name", "faces", ""));
  r.subjects.forEach((s) => {
    const tr = row(s.subject, s.name || "", String(s.faces));
    const remove = document.createElement("button");
    remove.textContent = "Delete";
    remove.addEventListener("click", async () => {
      await call("DELETE", `/gallery/${encodeURIComponent(s.subject)}`);
      loadGallery();
    });
    const td = document.createElement("td");
    td.append(remove);
    tr.append(td);
    table.append(tr);
  });
}
$("#gallery-refresh").addEventListener("click", loadGallery);
$("#gallery-prev").addEventListener("click", () => { page.offset = Math.max(0, page.offset - page.limit); loadGallery(); });
$("#gallery-next").addEventListener("click", () => { if (page.offset + page.limit < page.total) { page.offset += page.limit; loadGallery(); } });

// review: suspected duplicates (merge one into the other) and subjects that look like two people
async function loadReview() {
  const form = new FormData($("#review-form"));
  const collection = form.get("collection");
  const query = `threshold=${encodeURIComponent(form.get("threshold"))}`;
  const r = await call("GET", `/collections/${encodeURIComponent(collection)}/duplicates?${query}`);
  const box = $("#review-result");
  const note = document.createElement("p");
  note.className = "note";
  note.textContent = `${r.faces} faces, ${r.probes} searched; a pair is listed above ${fixed(r.threshold, 2)} `
    + `(${r.threshold_preset || "custom"}: strangers pass it ${(100 * r.fpir).toPrecision(2)}% of the time)`;
  const pairs = document.createElement("table");
  pairs.id = "review-pairs";
  pairs.append(row("subject", "probably also", "score", ""));
  r.duplicates.forEach((d) => {
    const [keep, other] = d.subjects;
    const tr = row(keep, other, fixed(d.score, 2));
    const merge = document.createElement("button");
    merge.textContent = `Merge ${other} into ${keep}`;
    merge.addEventListener("click", async () => {
      await call("POST", `/gallery/${encodeURIComponent(keep)}/merge?collection=${encodeURIComponent(collection)}`, { from: other });
      loadReview();
    });
    const td = document.createElement("td");
    td.append(merge);
    tr.append(td);
    pairs.append(tr);
  });
  const title = document.createElement("p");
  title.textContent = r.duplicates.length ? `${r.duplicates_found} suspected duplicate(s)` : "No suspected duplicates";
  const mixedTitle = document.createElement("p");
  mixedTitle.textContent = r.mixed.length
    ? `${r.mixed_found} subject(s) whose faces may be two people (split with POST /gallery/{subject}/faces/move)`
    : `No subject looks like two people (${r.mixed_subjects_checked} checked)`;
  const mixed = document.createElement("table");
  mixed.append(row("subject", "faces", "least similar pair (score)"));
  r.mixed.forEach((m) => mixed.append(row(m.subject, String(m.faces), fixed(m.lowest_score, 2))));
  box.replaceChildren(note, title, pairs, mixedTitle, mixed);
  box.hidden = false;
}
$("#review-form").addEventListener("submit", (event) => { event.preventDefault(); loadReview(); });
