"use strict";
// One page: pick or drop a photo -> POST /api/predict?preview=true -> show the photo, the 64x64 model input
// (enlarged with nearest-neighbour by CSS) and the top-5 species as bars; when the model judges the photo none of
// its species (answer.unknown), it says so instead of naming one.

const input = document.getElementById("photo-input");
const dropZone = document.getElementById("drop-zone");
const errorBox = document.getElementById("error");
const result = document.getElementById("result");
const uploaded = document.getElementById("uploaded");
const modelView = document.getElementById("model-view");
const predictions = document.getElementById("predictions");
const timing = document.getElementById("timing");
const verdict = document.getElementById("verdict");
const predictionsTitle = document.getElementById("predictions-title");

function showError(message) {
  errorBox.textContent = message;
  errorBox.hidden = false;
}

function readableLabel(label) {
  // "017.Cardinal" / "Red_winged_Blackbird" -> "Cardinal" / "Red winged Blackbird"
  return label.replace(/^\d+\./, "").replace(/_/g, " ");
}

function showPredictions(top) {
  predictions.replaceChildren(...top.map(({ label, probability }) => {
    const percent = (probability * 100).toFixed(1);
    const item = document.createElement("li");
    item.dataset.label = label;
    item.setAttribute("aria-label", `${readableLabel(label)}: ${percent} percent`);
    const name = document.createElement("span");
    name.className = "label";
    name.textContent = readableLabel(label);
    name.title = label;
    const track = document.createElement("div");
    track.className = "track";
    const fill = document.createElement("div");
    fill.className = "fill";
    fill.style.width = `${percent}%`;
    track.append(fill);
    const value = document.createElement("span");
    value.className = "value";
    value.textContent = `${percent}%`;
    item.append(name, track, value);
    return item;
  }));
}

async function classify(file) {
  errorBox.hidden = true;
  if (uploaded.src) URL.revokeObjectURL(uploaded.src);
  uploaded.src = URL.createObjectURL(file);
  modelView.removeAttribute("src");
  predictions.replaceChildren();
  timing.textContent = "Classifying…";
  const form = new FormData();
  form.append("file", file);
  let answer;
  try {
    const response = await fetch("/api/predict?top=5&preview=true", { method: "POST", body: form });
    answer = await response.json();
    if (!response.ok) throw new Error(answer.error || `HTTP ${response.status}`);
  } catch (error) {
    result.hidden = true;
    showError(`Could not classify ${file.name}: ${error.message}`);
    return;
  }
  modelView.src = answer.preview;
  verdict.hidden = !answer.unknown;
  verdict.textContent = answer.unknown ? "Not one of the species I know." : "";
  predictionsTitle.textContent = answer.unknown ? "Closest species (none is a match)" : "Most likely species";
  showPredictions(answer.top);
  timing.textContent = `${answer.model} answered in ${Math.round(answer.elapsed_ms)} ms`;
  result.hidden = false;
}

input.addEventListener("change", () => {
  if (input.files.length) classify(input.files[0]);
});

for (const type of ["dragenter", "dragover"]) {
  dropZone.addEventListener(type, (event) => {
    event.preventDefault();
    dropZone.classList.add("dragging");
  });
}
for (const type of ["dragleave", "drop"]) {
  dropZone.addEventListener(type, () => dropZone.classList.remove("dragging"));
}
dropZone.addEventListener("drop", (event) => {
  event.preventDefault();
  const file = event.dataTransfer.files[0];
  if (file) classify(file);
});

fetch("/api/health")
  .then((response) => response.json())
  .then((health) => {
    document.getElementById("model-info").textContent =
      `Model ${health.model}: ${health.classes} species, photos reduced to ${health.input_size}×${health.input_size} pixels.`;
  })
  .catch(() => showError("The server is not answering; is lowres-birds serve still running?"));
