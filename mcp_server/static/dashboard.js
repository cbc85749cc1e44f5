// The live dashboard: jobs seeded from GET /v1/jobs and kept live by the
// /v1/events feed (resuming by itself), stats and a throughput chart, queue
// lanes, workers alive, recent failures, a job page (#/jobs/<id>) and the probe.
// Plain ES modules, no build step, nothing from a CDN.
//
// The chart's past: `stats` events are made live, never stored, so the feed
// cannot replay them. The page subscribes from an event id ten minutes back
// (a feed id is its Redis stream id, whose first part is a time in ms), and
// the replayed job events' `done` + `failed` counters, bucketed by their ids'
// times, give the texts/s of those minutes. Interactive requests publish no
// feed events, so the past counts jobs' texts only.

import { Feed, getJSON, send, session } from "./api.js";
import { RateChart, formatRate } from "./chart.js";
import { setUpProbe } from "./probe.js";

const TERMINAL = new Set(["completed", "failed", "cancelled"]);
const MAX_ROWS = 100;
const HISTORY_MS = 600000;
const BUCKET_MS = 10000;
const loadedAt = Date.now();
const RATE_WINDOW_MS = 20000;
const $ = (id) => document.getElementById(id);

const jobs = new Map();   // id -> job status object, plus `samples` for its rate
const failures = [];      // newest first: {id, reason, at}
const chart = new RateChart($("chart"));

function made(job) { return (job.done || 0) + (job.failed || 0); }

function observe(job, atMs = Date.now()) {
  const samples = job.samples || (job.samples = []);
  samples.push([atMs, made(job)]);
  while (samples.length > 2 && samples[0][0] < atMs - RATE_WINDOW_MS) samples.shift();
}

function jobRate(job) {
  const s = job.samples || [];
  if (s.length < 2 || TERMINAL.has(job.status)) return null;
  const [t0, n0] = s[0], [t1, n1] = s[s.length - 1];
  return t1 > t0 ? ((n1 - n0) * 1000) / (t1 - t0) : null;
}

function duration(seconds) {
  if (seconds === null || !isFinite(seconds)) return "–";
  if (seconds < 60) return `${Math.ceil(seconds)}s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)}m${String(Math.round(seconds % 60)).padStart(2, "0")}s`;
  return `${Math.floor(seconds / 3600)}h${String(Math.floor((seconds % 3600) / 60)).padStart(2, "0")}m`;
}

function cell(tr, className) {
  const td = document.createElement("td");
  if (className) td.className = className;
  tr.append(td);
  return td;
}

function link(href, text) {
  const a = document.createElement("a");
  a.href = href;
  a.textContent = text;
  if (!href.startsWith("#")) { a.target = "_blank"; a.rel = "noopener"; }
  return a;
}

function copyButton(text) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "copy";
  button.textContent = "copy";
  button.title = "copy the full job id";
  button.addEventListener("click", async () => {
    try { await navigator.clipboard.writeText(text); button.textContent = "copied"; } catch { button.textContent = "select it"; }
    setTimeout(() => { button.textContent = "copy"; }, 1500);
  });
  return button;
}

function progressBar() {
  const wrap = document.createElement("div");
  wrap.className = "progress";
  wrap.append(document.createElement("div"), document.createElement("span"));
  return wrap;
}

function setProgress(wrap, job) {
  const pct = job.total ? Math.floor((100 * made(job)) / job.total) : 0;
  wrap.firstChild.style.width = `${pct}%`;
  wrap.lastChild.textContent = `${pct}%`;
  wrap.dataset.pct = String(pct);
}

function jobRow(job) {
  let tr = document.getElementById(`job-${job.id}`);
  if (tr) return tr;
  tr = document.createElement("tr");
  tr.id = `job-${job.id}`;
  tr.dataset.id = job.id;
  const code = document.createElement("code");
  code.className = "jobid";
  code.textContent = job.id;
  cell(tr).append(code, copyButton(job.id));
  const status = document.createElement("span");
  status.className = "status";
  cell(tr).append(status);
  cell(tr).append(progressBar());
  for (const name of ["done", "failed", "total", "rate", "eta"]) cell(tr, `num ${name}`);
  const links = cell(tr, "links");
  links.append(link(`#/jobs/${job.id}`, "page"), link(`/v1/jobs/${job.id}/results`, "results"),
               link(`/v1/jobs/${job.id}/events`, "events"));
  return tr;
}

function renderJob(job) {
  const tbody = $("jobs");
  tbody.querySelector(".placeholder")?.remove();
  const tr = jobRow(job);
  const [, statusCell, progressCell] = tr.children;
  statusCell.firstChild.textContent = job.status;
  statusCell.firstChild.dataset.status = job.status;
  setProgress(progressCell.firstChild, job);
  tr.querySelector(".done").textContent = job.done ?? 0;
  tr.querySelector(".failed").textContent = job.failed ?? 0;
  tr.querySelector(".total").textContent = job.total ?? "";
  const rate = jobRate(job);
  tr.querySelector(".rate").textContent = rate === null ? "–" : `${formatRate(rate)}/s`;
  tr.querySelector(".eta").textContent = TERMINAL.has(job.status) ? "–"
    : duration(rate ? (job.total - made(job)) / rate : null);
  if (!tr.parentNode) placeRow(tbody, tr, job);
  if (currentJobId() === job.id) renderJobPage(job);
}

function placeRow(tbody, tr, job) {
  // Newest first, by creation time (feed events for new jobs come in order).
  const created = job.created_at || "";
  const after = [...tbody.children].find((row) => (jobs.get(row.dataset.id)?.created_at || "") < created);
  tbody.insertBefore(tr, after || null);
  while (tbody.children.length > MAX_ROWS) tbody.lastChild.remove();
}

function update(data, status) {
  const known = jobs.get(data.id);
  // The feed replays recent events on connect: never let an older event
  // take a finished job back to running, or its counts backwards.
  if (known && (TERMINAL.has(known.status) && !TERMINAL.has(status || data.status)
                || made(data) < made(known))) return;
  const job = Object.assign(known || {}, data);
  if (status) job.status = status;
  jobs.set(job.id, job);
  observe(job);
  renderJob(job);
  if (job.status === "failed" || (TERMINAL.has(job.status) && job.failed)) noteFailure(job);
}

function noteFailure(job) {
  if (failures.some((f) => f.id === job.id)) return;
  const reason = job.status === "failed" ? (job.error || "every input failed")
    : `${job.failed} of ${job.total} inputs failed`;
  failures.unshift({ id: job.id, reason });
  failures.length = Math.min(failures.length, 20);
  const list = $("failures");
  list.replaceChildren(...failures.map((f) => {
    const li = document.createElement("li");
    const anchor = link(`#/jobs/${f.id}`, "");
    const code = document.createElement("code");
    code.textContent = f.id;
    anchor.append(code);
    li.append(anchor, ` ${f.reason}`);
    return li;
  }));
}

// The throughput of the ten minutes before the page loaded, from replayed job events.
const past = { made: new Map(), buckets: new Map(), timer: null };

function notePast(data, eventId) {
  const at = Number(String(eventId || "").split("-")[0]);
  if (!at || at >= loadedAt || !data.id) return;  // live events: the stats chart them
  const now = made(data);
  // A job first seen mid-way (created before the window) counts from there.
  const before = past.made.has(data.id) ? past.made.get(data.id) : now;
  past.made.set(data.id, Math.max(now, before));
  if (now > before) {
    const bucket = Math.floor(at / BUCKET_MS);
    past.buckets.set(bucket, (past.buckets.get(bucket) || 0) + now - before);
  }
  clearTimeout(past.timer);
  past.timer = setTimeout(drawPast, 50);
}

function drawPast() {
  const points = [];
  const first = Math.floor((loadedAt - HISTORY_MS) / BUCKET_MS);
  for (let b = first; b < Math.floor(loadedAt / BUCKET_MS); b++) {
    points.push([(b + 1) * BUCKET_MS, ((past.buckets.get(b) || 0) * 1000) / BUCKET_MS]);
  }
  chart.setHistory(points);
}

// Workers commit whole batches, so texts/s between two 2-second samples jumps
// between 0 and a batch's worth; the page shows it over a sliding 10 s instead.
const totals = [];
const SMOOTH_MS = 10000;

function smoothedRate(stats, atMs = Date.now()) {
  totals.push([atMs, Number(stats.texts_total)]);
  while (totals.length > 2 && totals[1][0] <= atMs - SMOOTH_MS) totals.shift();
  if (totals.length < 2) return stats.texts_per_s;
  const [t0, n0] = totals[0], [t1, n1] = totals[totals.length - 1];
  return t1 > t0 ? Math.max(0, ((n1 - n0) * 1000) / (t1 - t0)) : stats.texts_per_s;
}

function renderStats(stats) {
  const rate = smoothedRate(stats);
  $("stat-workers").textContent = stats.workers;
  $("stat-rate").textContent = rate === null || rate === undefined ? "–" : formatRate(rate);
  $("stat-queued").textContent = stats.queued_chunks;
  $("stat-running").textContent = stats.running_chunks;
  $("stat-total").textContent = Number(stats.texts_total).toLocaleString("en");
  chart.add(rate);
  if (stats.lanes) renderLanes(stats.lanes);
  if (stats.worker_list) renderWorkers(stats.worker_list);
}

function rows(tbody, items, columns, empty) {
  if (!items.length) {
    const tr = document.createElement("tr");
    const td = cell(tr, "empty");
    td.colSpan = columns;
    td.textContent = empty;
    tbody.replaceChildren(tr);
    return [];
  }
  const built = items.map(() => document.createElement("tr"));
  tbody.replaceChildren(...built);
  return built;
}

function renderLanes(lanes) {
  const trs = rows($("lanes"), lanes, 5, "no model registered yet");
  lanes.forEach((lane, i) => {
    cell(trs[i]).textContent = lane.model;
    cell(trs[i]).textContent = lane.lane;
    cell(trs[i], "num").textContent = lane.waiting;
    cell(trs[i], "num").textContent = lane.running;
    cell(trs[i], "num").textContent = lane.lag_s ? duration(lane.lag_s) : "0";
  });
}

function renderWorkers(workers) {
  const trs = rows($("workers"), workers, 6, "no worker alive");
  workers.forEach((w, i) => {
    const name = document.createElement("code");
    name.textContent = w.id;
    cell(trs[i]).append(name);
    cell(trs[i]).textContent = w.model;
    cell(trs[i]).textContent = w.backend || "–";
    cell(trs[i]).textContent = w.host;
    cell(trs[i], "num").textContent = w.batches;
    cell(trs[i]).textContent = `${duration(w.seen_s_ago)} ago`;
  });
}

// The job page: #/jobs/<id>

function currentJobId() {
  const match = location.hash.match(/^#\/jobs\/([0-9a-f]{32})$/);
  return match ? match[1] : null;
}

function renderJobPage(job) {
  $("jp-id").textContent = job.id;
  const pct = job.total ? Math.floor((100 * made(job)) / job.total) : 0;
  $("jp-bar").style.width = `${pct}%`;
  $("jp-pct").textContent = `${pct}% (${made(job)} of ${job.total})`;
  const fields = $("jp-fields");
  fields.replaceChildren();
  const rate = jobRate(job);
  for (const [name, value] of [["status", job.status], ["model", job.model], ["dimensions", job.dimensions],
    ["done", job.done], ["failed", job.failed], ["rate", rate === null ? "–" : `${formatRate(rate)} texts/s`],
    ["created", job.created_at], ["started", job.started_at], ["finished", job.finished_at], ["error", job.error]]) {
    if (value === undefined || value === null) continue;
    const dt = document.createElement("dt");
    dt.textContent = name;
    const dd = document.createElement("dd");
    dd.textContent = value;
    fields.append(dt, dd);
  }
  $("jp-cancel").hidden = TERMINAL.has(job.status);
}

async function showJobPage(jobId) {
  $("overview").hidden = true;
  $("jobpage").hidden = false;
  $("jp-links").replaceChildren(link(`/v1/jobs/${jobId}`, "status JSON"), " ",
    link(`/v1/jobs/${jobId}/results`, "results"), " ", link(`/v1/jobs/${jobId}/events`, "events"));
  $("jp-copy").onclick = () => navigator.clipboard.writeText(jobId).catch(() => {});
  $("jp-cancel").onclick = async () => update(await send("DELETE", `/v1/jobs/${jobId}`));
  try {
    const job = await getJSON(`/v1/jobs/${jobId}`);
    update(job);
    renderJobPage(jobs.get(jobId));
    await showSample(jobId);
  } catch (error) {
    $("jp-fields").replaceChildren(document.createTextNode(String(error.message)));
  }
}

const TEXT_SHOWN = 120;

async function sampleTexts(jobId) {
  // The texts are a courtesy: expired or unreadable inputs leave the column empty.
  try {
    const page = await getJSON(`/v1/jobs/${jobId}/inputs?limit=10`);
    return new Map(page.inputs.map((input) => [input.index, input.text]));
  } catch {
    return new Map();
  }
}

async function showSample(jobId) {
  const [page, texts] = await Promise.all([
    getJSON(`/v1/jobs/${jobId}/results?limit=10`), sampleTexts(jobId),
  ]);
  const tbody = $("jp-results");
  tbody.replaceChildren(...page.results.map((row) => {
    const tr = document.createElement("tr");
    cell(tr, "num").textContent = row.index;
    cell(tr).textContent = row.id ?? "";
    const text = texts.get(row.index) ?? "";
    const td = cell(tr, "text");
    // textContent, never innerHTML: the texts are whatever the submitter sent.
    td.textContent = text.length > TEXT_SHOWN ? `${text.slice(0, TEXT_SHOWN)}…` : text;
    if (text) td.title = text;
    const vector = row.embedding || [];
    const code = document.createElement("code");
    code.textContent = vector.length ? `[${vector.slice(0, 8).map((x) => x.toFixed(4)).join(", ")}, …] (${vector.length})` : "";
    cell(tr).append(code);
    cell(tr, "num").textContent = vector.length ? Math.sqrt(vector.reduce((s, x) => s + x * x, 0)).toFixed(3) : "";
    cell(tr).textContent = row.truncated ? "yes" : "";
    cell(tr).textContent = row.error || "";
    return tr;
  }));
  if (!page.results.length) {
    const tr = document.createElement("tr");
    const td = cell(tr, "empty");
    td.colSpan = 7;
    td.textContent = "no results yet";
    tbody.replaceChildren(tr);
  }
}

function route() {
  const jobId = currentJobId();
  if (jobId) { showJobPage(jobId); return; }
  $("overview").hidden = false;
  $("jobpage").hidden = true;
}

async function seedJobs() {
  // Jobs older than the feed's replay, and cancelled ones, come from the list.
  const page = await getJSON(`/v1/jobs?limit=${MAX_ROWS}`);
  for (const job of page.jobs.slice().reverse()) update(job);
  $("jobs-note").textContent = page.next_cursor ? `the newest ${MAX_ROWS}, then live` : "";
}

async function main() {
  const me = await session();
  // /metrics answers admins only once keys are set: no dead link for anyone else.
  if (me.auth && !me.admin) $("metrics-link").hidden = true;
  if (me.auth) {
    const button = $("signout");
    button.hidden = false;
    button.addEventListener("click", async () => { await send("DELETE", "/v1/session"); location.reload(); });
  }
  await seedJobs().catch((error) => { $("jobs-note").textContent = `(no job list: ${error.message})`; });
  const conn = $("conn");
  drawPast();  // no job event in the window: ten quiet minutes, not an empty chart
  const lifecycle = (status) => (data, eventId) => { notePast(data, eventId); update(data, status); };
  new Feed("/v1/events", {
    "stats": renderStats,
    "job.created": lifecycle(null),
    "job.progress": lifecycle("running"),
    "job.completed": lifecycle("completed"),
    "job.failed": lifecycle("failed"),
    "job.cancelled": lifecycle("cancelled"),
  }, (state) => { conn.dataset.state = state; conn.textContent = state; },
  `${loadedAt - HISTORY_MS}-0`);
  setUpProbe({ form: $("probe-form"), query: $("probe-query"), candidates: $("probe-candidates"),
               button: $("probe-run"), status: $("probe-status"), ranking: $("probe-ranking"),
               heatmap: $("probe-heatmap") });
  window.addEventListener("hashchange", route);
  route();
  setInterval(() => { for (const job of jobs.values()) if (!TERMINAL.has(job.status)) renderJob(job); }, 2000);
}

main();
