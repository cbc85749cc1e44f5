// The probe panel: a query and a few candidates go through the queue as one
// interactive request (POST /v1/embeddings, like any client's), not as a job:
// a probe is no job a user submitted, so it must not join the job list or the
// feed. The page ranks the candidates by cosine similarity and draws the
// similarity of every text to every other.
//
// The server answers a request of up to its fast lane's size (32 texts by
// default) without a job; a bigger one it would queue as a job, so the probe
// takes at most MAX_CANDIDATES candidates.

import { send } from "./api.js";

const MAX_CANDIDATES = 31;

export function setUpProbe(elements) {
  elements.form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const query = elements.query.value.trim();
    const lines = elements.candidates.value.split("\n").map((s) => s.trim()).filter(Boolean);
    const candidates = lines.slice(0, MAX_CANDIDATES);
    if (!query || !candidates.length) return;
    elements.button.disabled = true;
    elements.status.textContent = "embedding…";
    try {
      const started = performance.now();
      const vectors = await embed([query, ...candidates]);
      const ms = Math.round(performance.now() - started);
      const ranked = rank(vectors, candidates);
      showRanking(elements.ranking, ranked);
      drawHeatmap(elements.heatmap, vectors);
      const left = lines.length - candidates.length;
      elements.status.textContent = `ranked ${candidates.length} candidates in ${ms} ms` +
        (left > 0 ? ` (the first ${MAX_CANDIDATES}; ${left} left out)` : "");
    } catch (error) {
      elements.status.textContent = `could not rank: ${error.message}`;
    } finally {
      elements.button.disabled = false;
    }
  });
}

async function embed(texts) {
  const reply = await send("POST", "/v1/embeddings", { input: texts });
  return reply.data.slice().sort((a, b) => a.index - b.index).map((row) => row.embedding);
}

function cosine(a, b) {
  let dot = 0, na = 0, nb = 0;
  for (let i = 0; i < a.length; i++) { dot += a[i] * b[i]; na += a[i] * a[i]; nb += b[i] * b[i]; }
  return dot / Math.max(Math.sqrt(na) * Math.sqrt(nb), 1e-12);
}

function rank(vectors, candidates) {
  const query = vectors[0];
  return candidates.map((text, i) => ({ text, index: i, score: cosine(query, vectors[i + 1]) }))
    .sort((a, b) => b.score - a.score);
}

function showRanking(list, ranked) {
  list.replaceChildren(...ranked.map((match) => {
    const li = document.createElement("li");
    li.className = "match";
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = match.score.toFixed(3);
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.style.width = `${Math.max(0, match.score) * 8}rem`;
    const text = document.createElement("span");
    text.className = "text";
    text.textContent = match.text;
    li.append(score, bar, text);
    return li;
  }));
}

function drawHeatmap(canvas, vectors) {
  const n = vectors.length;
  const size = canvas.width;
  const cell = size / n;
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, size, size);
  for (let i = 0; i < n; i++) {
    for (let j = 0; j < n; j++) {
      const s = Math.max(0, Math.min(1, cosine(vectors[i], vectors[j])));
      // white (0) to deep blue (1)
      ctx.fillStyle = `rgb(${Math.round(255 - 218 * s)}, ${Math.round(255 - 156 * s)}, ${Math.round(255 - 20 * s)})`;
      ctx.fillRect(j * cell, i * cell, Math.ceil(cell), Math.ceil(cell));
      if (cell >= 28) {
        ctx.fillStyle = s > 0.6 ? "#fff" : "#1d2330";
        ctx.font = "10px system-ui, sans-serif";
        ctx.fillText(s.toFixed(2), j * cell + 4, i * cell + cell / 2 + 3);
      }
    }
  }
  canvas.dataset.cells = String(n * n);
}
