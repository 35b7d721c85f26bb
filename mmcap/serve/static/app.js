// The page of `mmcap serve`: send an image to POST /caption (with attention), show the caption,
// the beam alternatives and, for the word under the pointer, its attention over the image.
"use strict";
const $ = (id) => document.getElementById(id);
const SIZE = 320;
let result = null, image = null, pinned = null;

function jet(v) { // v in [0, 1] -> [r, g, b], the colormap of the Show, Attend and Tell figures
  const c = (x) => Math.round(255 * Math.min(1, Math.max(0, x)));
  return [c(1.5 - Math.abs(4 * v - 3)), c(1.5 - Math.abs(4 * v - 2)), c(1.5 - Math.abs(4 * v - 1))];
}

function drawPicture() { // the centred square, as the model crops it
  const ctx = $("picture").getContext("2d");
  const side = Math.min(image.width, image.height);
  ctx.drawImage(image, (image.width - side) / 2, (image.height - side) / 2, side, side, 0, 0, SIZE, SIZE);
}

function drawHeatmap(index) {
  const overlay = $("heatmap"), ctx = overlay.getContext("2d");
  ctx.clearRect(0, 0, SIZE, SIZE);
  document.querySelectorAll(".word").forEach((el, i) => el.classList.toggle("active", i === index));
  if (index === null) { delete overlay.dataset.word; return; }
  const grid = result.attention[index], h = grid.length, w = grid[0].length;
  const top = Math.max(...grid.flat()) || 1;
  const small = document.createElement("canvas");
  small.width = w; small.height = h;
  const cells = small.getContext("2d").createImageData(w, h);
  grid.flat().forEach((v, i) => { cells.data.set([...jet(v / top), 255], 4 * i); });
  small.getContext("2d").putImageData(cells, 0, 0);
  ctx.globalAlpha = 0.55;
  ctx.imageSmoothingEnabled = true; // bilinear upsampling of the grid, as plot_attention does
  ctx.drawImage(small, 0, 0, SIZE, SIZE);
  overlay.dataset.word = String(index);
}

function showResult() {
  const caption = $("caption");
  caption.replaceChildren();
  result.words.forEach((word, i) => {
    const el = document.createElement("span");
    el.className = "word" + (word ? "" : " end");
    el.textContent = word || "⏎ end";
    el.addEventListener("mouseenter", () => drawHeatmap(i));
    el.addEventListener("mouseleave", () => drawHeatmap(pinned));
    el.addEventListener("click", () => {
      pinned = pinned === i ? null : i;
      document.querySelectorAll(".word").forEach((w, j) => w.classList.toggle("pinned", j === pinned));
      drawHeatmap(pinned);
    });
    caption.append(el);
  });
  $("logprob").textContent = result.log_prob.toFixed(2);
  showAlternatives();
  $("result").hidden = false;
  drawPicture();
  drawHeatmap(null);
}

// Beam search ranks its finished captions by a length-normalised score, not by the raw
// log-probability (a sum over tokens, so it favours short captions): transformers' convention,
// score = log-prob / tokens ** length_penalty. Each row shows the score that ranks it, when the
// server sends it, beside the raw log-probability, each labelled.
function figure(label, value, title, cls) {
  const el = document.createElement("span");
  el.className = cls;
  el.title = title;
  el.append(label + " ", Object.assign(document.createElement("b"), { textContent: value }));
  return el;
}

function showAlternatives() {
  const alts = result.alternatives || [{ caption: result.caption, log_prob: result.log_prob, tokens: result.tokens }];
  const ranked = alts.some((alt) => alt.score !== undefined);
  const penalty = result.length_penalty !== undefined ? result.length_penalty : "length_penalty";
  $("ranking").textContent = !result.alternatives
    ? "one caption (no beam search): its log-probability"
    : ranked
      ? `best first by score = log-prob ÷ tokens^${penalty}; log-prob is the raw sum over the caption's tokens`
      : "best first by log-prob ÷ tokens^length_penalty (length-normalised), not by the raw log-prob shown";
  const list = $("alternatives");
  list.replaceChildren();
  for (const alt of alts) {
    const li = document.createElement("li");
    const shown = [];
    if (alt.score !== undefined) {
      shown.push(figure("score", alt.score.toFixed(3), "the ranking score: log-prob / tokens^length_penalty", "score"));
    }
    shown.push(figure("log-prob", alt.log_prob.toFixed(2), "the model's log-probability of the caption's tokens, end included", "lp"));
    if (alt.tokens !== undefined) {
      shown.push(figure("tokens", String(alt.tokens), "generated tokens, end included", "tokens"));
    }
    const figures = document.createElement("span");
    figures.className = "figures";
    shown.forEach((el, i) => figures.append(...(i ? [" · ", el] : [el])));
    li.append(alt.caption || "(empty)", " ", figures);
    list.append(li);
  }
}

async function caption(file) {
  if (!file) return;
  $("error").hidden = true;
  $("status").textContent = "captioning…";
  pinned = null;
  const form = new FormData();
  form.append("image", file);
  form.append("num_beams", $("beams").value);
  form.append("attention", "true");
  try {
    const response = await fetch("/caption", { method: "POST", body: form });
    const body = await response.json();
    if (!response.ok) throw new Error(`${response.status} ${body.error}${body.detail ? ": " + body.detail : ""}`);
    image = await createImageBitmap(file);
    result = body;
    showResult();
    $("status").textContent = "";
  } catch (e) {
    $("status").textContent = "";
    $("error").textContent = e.message;
    $("error").hidden = false;
  }
}

let current = null;
function take(file) { current = file; caption(file); }
$("file").addEventListener("change", (e) => take(e.target.files[0]));
$("beams").addEventListener("change", () => caption(current));
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); take(e.dataTransfer.files[0]); });
document.addEventListener("paste", (e) => {
  const item = [...e.clipboardData.items].find((i) => i.type.startsWith("image/"));
  if (item) take(item.getAsFile());
});
