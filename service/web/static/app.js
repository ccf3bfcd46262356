// wildreid review: drop zones, upload checks, zoom, confirmations and keyboard shortcuts. Plain JavaScript,
// served by the service itself; every page works without it (forms post as usual).
"use strict";

function megabytes(bytes) { return (bytes / 1048576).toFixed(1) + " MB"; }

// ---- photos: drag and drop onto the file input, and the server's limits checked before an upload
function uploadProblem(form, files) {
  const maxFile = Number(form.dataset.maxFile), maxRequest = Number(form.dataset.maxRequest);
  const maxCount = Number(form.dataset.maxCount);
  if (files.length > maxCount) return `${files.length} photos chosen; this server takes at most ${maxCount} at once`;
  let total = 0;
  for (const file of files) {
    if (file.size > maxFile) return `${file.name} is ${megabytes(file.size)}; the limit is ${megabytes(maxFile)} a photo`;
    total += file.size;
  }
  if (total > maxRequest * 0.98) return `the photos are ${megabytes(total)} together; the limit is ${megabytes(maxRequest)}`;
  return null;
}

function setUpUpload(form) {
  const input = form.querySelector("input[type=file]"), zone = form.querySelector(".drop");
  const chosen = form.querySelector(".chosen"), problem = form.querySelector(".upload-problem");
  const show = () => {
    chosen.textContent = Array.from(input.files).map((f) => f.name).join(", ");
    const text = uploadProblem(form, input.files);
    problem.hidden = !text;
    problem.textContent = text || "";
  };
  input.addEventListener("change", show);
  for (const kind of ["dragenter", "dragover"]) {
    zone.addEventListener(kind, (event) => { event.preventDefault(); zone.classList.add("over"); });
  }
  for (const kind of ["dragleave", "drop"]) zone.addEventListener(kind, () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    input.files = event.dataTransfer.files;
    show();
  });
  form.addEventListener("submit", (event) => {
    const text = uploadProblem(form, input.files);
    if (text) { event.preventDefault(); problem.hidden = false; problem.textContent = text; return; }
    form.querySelector("button[type=submit]").disabled = true;  // one upload at a time
  });
}

// ---- zoom: a thumbnail opens large, beside the query when it is a candidate's photo
function zoom(first, second) {
  const dialog = document.getElementById("zoom"), pair = dialog.querySelector(".pair");
  pair.replaceChildren();
  for (const src of [first, second].filter(Boolean)) {
    const img = document.createElement("img");
    img.src = src;
    img.alt = "";
    pair.append(img);
  }
  dialog.showModal();
}

document.addEventListener("click", (event) => {
  const target = event.target.closest("[data-zoom]");
  if (target) { event.preventDefault(); zoom(target.dataset.zoom, target.dataset.zoomWith); }
});

document.addEventListener("submit", (event) => {
  const message = event.target.dataset.confirm;
  if (message && !window.confirm(message)) event.preventDefault();
});

// ---- reviewing an encounter from the keyboard
const review = { animal: null, candidate: 0 };

function openAnimals() { return Array.from(document.querySelectorAll(".animal:not(.done)")); }
function allAnimals() { return Array.from(document.querySelectorAll(".animal")); }
function candidates() { return review.animal ? Array.from(review.animal.querySelectorAll(".candidate")) : []; }

function selectAnimal(animal) {
  review.animal = animal;
  review.candidate = 0;
  if (animal) { animal.focus({ preventScroll: true }); animal.scrollIntoView({ block: "start", behavior: "smooth" }); }
  selectCandidate(0);
}

function selectCandidate(index) {
  const list = candidates();
  list.forEach((item) => item.classList.remove("selected"));
  if (!list.length) return;
  review.candidate = Math.max(0, Math.min(index, list.length - 1));
  list[review.candidate].classList.add("selected");
  list[review.candidate].scrollIntoView({ block: "nearest" });
}

function press(selector) {
  const button = review.animal && review.animal.querySelector(selector);
  if (button) button.click();
}

function candidateButton(key) {
  const item = candidates()[review.candidate];
  const button = item && item.querySelector(`button[data-key="${key}"]`);
  if (button) button.click();
}

function onKey(event) {
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  const field = event.target.closest("input, textarea, select");
  if (field) {
    if (event.key === "Escape") field.blur();
    return;
  }
  if (!review.animal) return;
  const key = event.key;
  if (/^[1-9]$/.test(key)) selectCandidate(Number(key) - 1);
  else if (key === "ArrowDown" || key === "j") selectCandidate(review.candidate + 1);
  else if (key === "ArrowUp" || key === "k") selectCandidate(review.candidate - 1);
  else if (key === "c") candidateButton("c");
  else if (key === "r") candidateButton("r");
  else if (key === "s") press('button[data-key="s"]');
  else if (key === "m") press('button[data-key="m"]');
  else if (key === "n") { const name = review.animal.querySelector('input[data-key="n"]'); if (name) name.focus(); }
  else if (key === "z") { const item = candidates()[review.candidate]; const img = item && item.querySelector("[data-zoom-with]"); if (img) img.click(); }
  else if (key === "]" || key === "[") {
    const list = allAnimals(), at = list.indexOf(review.animal);
    const next = list[at + (key === "]" ? 1 : -1)];
    if (next) selectAnimal(next);
  } else return;
  event.preventDefault();
}

document.addEventListener("DOMContentLoaded", () => {
  for (const form of document.querySelectorAll("form[data-max-file]")) setUpUpload(form);
  const animals = allAnimals();
  if (!animals.length) return;
  const wanted = location.hash && document.querySelector(location.hash);
  const open = openAnimals();
  // after a verdict the page comes back at that animal: go on with the next one still open
  const start = wanted && wanted.classList.contains("done") ? open.find((a) => animals.indexOf(a) > animals.indexOf(wanted)) || open[0]
    : wanted || open[0] || animals[0];
  selectAnimal(start || animals[0]);
  for (const animal of animals) animal.addEventListener("click", () => { if (review.animal !== animal) { review.animal = animal; } });
  document.addEventListener("keydown", onKey);
});
