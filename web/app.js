// The dashboard: state from one stream, drawn as cards, with filters and controls.

import * as api from "./api.js";
import { JobCard } from "./card.js";
import { confirmAction } from "./confirm.js";
import { Connection, POLL_MS } from "./connection.js";
import { TERMINAL, clock, percent } from "./format.js";
import { RECENT_PAGE, arrange, layout } from "./layout.js";
import { Notifier } from "./notify.js";
import { drawSignIn } from "./signin.js";
import { JobState } from "./state.js";
import { Watched } from "./watched.js";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const focusJob = params.get("job"); // the view of one job, by link
const filters = { status: params.get("status") || "", kind: params.get("kind") || "" };

const state = new JobState();
const cards = new Map();
const template = $("card-template");
const watched = new Watched();
if (focusJob) watched.watchNow(focusJob); // opened by link: this is the job being watched

let scheduled = false;
let recentLimit = RECENT_PAGE;

const notifier = new Notifier($("notify"), (job) => {
  const card = cards.get(job.id);
  if (!card) return;
  if (!card.expanded) toggleDetails(card);
  card.el.scrollIntoView({ block: "center" });
  card.ref.detailsBtn.focus({ preventScroll: true });
}, watched);

const conn = new Connection({
  streamUrl: focusJob ? `/api/events?job=${encodeURIComponent(focusJob)}` : "/api/events",
  resumeId: () => state.lastId,
  poll: pollJobs,
  onSnapshot: (data) => {
    state.snapshot(data);
    afterChange();
  },
  onEvent: (event) => {
    if (state.apply(event)) afterChange();
  },
  onChange: drawConnection,
});

// what the tests (and a curious person in the console) can read
window.__progressSse = {
  state,
  get seenIds() { return state.seenIds.slice(); },
  get snapshotIds() { return state.snapshotIds.slice(); },
  get lastId() { return state.lastId; },
  get connection() { return conn.state; },
  get readyState() { return conn.readyState; },
};

async function pollJobs() {
  const r = focusJob ? await api.getJob(focusJob) : await api.listJobs();
  if (!r.ok) {
    if (focusJob && r.status === 404) {
      state.loaded = true;
      afterChange();
      return;
    }
    throw Object.assign(new Error(r.message), { status: r.status });
  }
  state.merge(focusJob ? [r.body.job] : r.body.jobs);
  afterChange();
}

function afterChange() {
  for (const job of state.drainFinished()) notifier.finished(job);
  schedule();
}

function schedule() {
  if (scheduled) return;
  scheduled = true;
  requestAnimationFrame(render);
}

// ---------------------------------------------------------------- drawing

function render() {
  scheduled = false;
  state.prune(undefined, focusJob);
  const positions = queuePositions();
  for (const id of state.drainChanged()) {
    const job = state.jobs.get(id);
    let card = cards.get(id);
    if (!job) {
      if (card) {
        card.el.remove();
        cards.delete(id);
      }
      continue;
    }
    if (!card) {
      card = new JobCard(template, job, onAction);
      cards.set(id, card);
      card.setWatched(watched.has(id));
      card.setLive(conn.live, 0);
      if (focusJob === id) toggleDetails(card);
    }
    card.update(job, state.age(id), positions.get(id));
    if (card.expanded) card.renderLog(state.logOf(id));
  }
  // queue positions move when another job leaves the queue
  for (const [id, pos] of positions) {
    const card = cards.get(id);
    if (card && card.queuePosition !== pos) card.update(card.job, state.age(id), pos);
  }
  drawFilters();
  drawPage();
  if (focusJob && state.jobs.get(focusJob) && TERMINAL.has(state.jobs.get(focusJob).status)
      && conn.state !== "closed") {
    conn.close(); // nothing more will happen to this job: stop streaming
  }
}

/** The server's queue position when it gives one, else counted from what this page knows. */
function queuePositions() {
  const byQueue = new Map();
  for (const job of state.jobs.values()) {
    if (job.status !== "queued") continue;
    if (!byQueue.has(job.queue)) byQueue.set(job.queue, []);
    byQueue.get(job.queue).push(job);
  }
  const out = new Map();
  for (const jobs of byQueue.values()) {
    jobs.sort((a, b) => a.created_at - b.created_at);
    jobs.forEach((job, i) => out.set(job.id, job.queue_position ?? i + 1));
  }
  return out;
}

/** Put the cards in their groups (see layout.js); answers what is shown. */
function place() {
  const groups = layout(cards.values(), matches, recentLimit);
  const focused = document.activeElement;
  arrange($("active"), groups.active);
  arrange($("stalled"), groups.stalled);
  arrange($("recent"), groups.recent);
  if (focused && focused !== document.activeElement && document.contains(focused)) {
    focused.focus({ preventScroll: true }); // moving a card must not lose the keyboard's place
  }
  return groups;
}

function matches(job) {
  const s = filters.status;
  if (filters.kind && job.kind !== filters.kind) return false;
  if (!s) return true;
  if (s === "active") return !TERMINAL.has(job.status);
  if (s === "finished") return TERMINAL.has(job.status);
  if (s === "stalled") return Boolean(job.stalled) && !TERMINAL.has(job.status);
  return job.status === s;
}

function drawFilters() {
  const select = $("filter-kind");
  const kinds = new Set([...state.jobs.values()].map((j) => j.kind));
  if (filters.kind) kinds.add(filters.kind);
  const have = new Set([...select.options].map((o) => o.value));
  for (const kind of [...kinds].sort()) {
    if (have.has(kind)) continue;
    const option = document.createElement("option");
    option.value = kind;
    option.textContent = kind;
    const after = [...select.options].slice(1).find((o) => o.value > kind);
    select.insertBefore(option, after || null);
  }
  select.value = filters.kind;
  $("filter-status").value = filters.status;
}

function drawPage() {
  const groups = place();
  const shownActive = groups.active.length;
  const shownStalled = groups.stalled.length;
  const shownRecent = groups.recentTotal;
  const total = cards.size;
  const empty = state.loaded && total === 0 && !focusJob;
  drawSignIn(conn, params);
  const missing = state.loaded && focusJob && !state.jobs.has(focusJob);
  $("empty").hidden = !empty;
  $("missing").hidden = !missing;
  if (missing) {
    $("missing").textContent = `No job with id “${focusJob}” (yet). `
      + "If it is created, it appears here.";
  }
  const signedOut = conn.state === "signed-out";
  $("filters").hidden = Boolean(focusJob) || empty || (signedOut && !state.loaded);
  $("notify").hidden = signedOut;
  $("job-nav").hidden = !focusJob;
  const filtering = Boolean(filters.status || filters.kind);
  const others = (n) => shownActive + shownStalled + shownRecent - n > 0;
  $("active-section").hidden = empty || !state.loaded || (focusJob && !shownActive)
    || (filtering && !shownActive && others(shownActive));
  $("stalled-section").hidden = empty || !state.loaded || !shownStalled;
  $("recent-section").hidden = empty || !state.loaded || (focusJob && !shownRecent)
    || (filtering && !shownRecent && others(shownRecent));
  $("active-count").textContent = shownActive ? `(${shownActive})` : "";
  $("stalled-count").textContent = shownStalled ? `(${shownStalled})` : "";
  $("recent-count").textContent = shownRecent ? `(${shownRecent})` : "";
  const more = $("recent-more");
  const hiddenRecent = shownRecent - groups.recent.length;
  more.hidden = hiddenRecent <= 0;
  more.textContent = `Show ${Math.min(RECENT_PAGE, hiddenRecent)} more`
    + ` (${groups.recent.length} of ${shownRecent} shown)`;
  $("active-none").hidden = shownActive > 0;
  $("active-none").textContent = filtering ? "No active job matches these filters."
    : "Nothing running right now.";
  $("recent-none").hidden = shownRecent > 0;
  $("recent-none").textContent = filtering ? "No finished job matches these filters."
    : "No finished jobs yet.";
  $("filter-summary").textContent = filtering && total
    ? `Showing ${shownActive + shownStalled + shownRecent} of ${total} jobs.` : "";

  if (focusJob) {
    const job = state.jobs.get(focusJob);
    document.title = job ? `${percent(job.progress)}% ${job.title || job.id} · progress-sse`
      : "progress-sse";
  } else {
    const running = [...state.jobs.values()].filter((j) => j.status === "running").length;
    document.title = running ? `(${running} running) progress-sse` : "progress-sse";
  }
}

const CONNECTION_TEXT = {
  connecting: () => "Connecting…",
  live: (c) => (c.lastEventAt ? `Live · last event ${clock(c.lastEventAt)}` : "Live"),
  reconnecting: (c) => `Reconnecting…${c.lastEventAt ? ` · last event ${clock(c.lastEventAt)}` : ""}`,
  polling: (c) => `${c.reason === "unsupported" ? "No live stream in this browser"
    : "Live stream unavailable"}; refreshing every ${POLL_MS / 1000} s`
    + `${c.lastPollAt ? ` · updated ${clock(c.lastPollAt)}` : ""}`,
  offline: (c) => `Offline; retrying${c.lastEventAt ? ` · last event ${clock(c.lastEventAt)}` : ""}`,
  "signed-out": (c) => (c.authStatus === 403 ? "Signed in without the read scope"
    : "Not signed in"),
  closed: () => "Job finished · no more updates",
};

function drawConnection(c) {
  const box = $("connection");
  box.dataset.state = c.state;
  box.querySelector(".conn-text").textContent = CONNECTION_TEXT[c.state](c);
  for (const card of cards.values()) card.setLive(c.live, state.age(card.id));
  if (state.loaded || c.state === "signed-out") drawPage();
}

// ---------------------------------------------------------------- actions

const QUESTIONS = {
  cancel: (job, title) => ({
    title: `Cancel “${title}”?`,
    text: job.status === "queued" ? "It has not started; it will not run."
      : "Its worker is asked to stop at its next check. Work it has not saved may be "
        + "lost, and a cancelled job does not resume.",
    yes: "Cancel job",
    no: "Keep the job",
  }),
  force: (job, title) => ({
    title: `Close “${title}” anyway?`,
    text: (job.stalled ? "Its worker has gone quiet; it may have crashed. "
      : "Its worker has not answered the cancel. ")
      + "The job is recorded as cancelled now, without waiting for the worker.",
    yes: "Close anyway",
    no: "Keep waiting",
  }),
};

async function onAction(card, action) {
  if (action === "details") {
    toggleDetails(card);
    return;
  }
  if (action === "watch") {
    const on = watched.toggle(card.id);
    card.setWatched(on);
    if (on) notifier.enable(); // inside the click: the browser may ask for permission
    notifier.draw();
    return;
  }
  if (QUESTIONS[action]) {
    const ok = await confirmAction(QUESTIONS[action](card.job, card.job.title || card.id));
    if (!ok) return;
  }
  card.showError(null);
  card.setPending(action);
  const r = action === "force" ? await api.forceCancel(card.id)
    : await api.control(card.id, action);
  card.setPending(null);
  if (r.ok && r.body?.job) {
    state.merge([r.body.job]);
  } else if (!r.ok) {
    card.showError(`Could not ${action === "force" ? "close" : action}: ${r.message}.`);
  }
  state.changed.add(card.id);
  afterChange();
}

async function toggleDetails(card) {
  card.setExpanded(!card.expanded);
  if (!card.expanded || card.logLoaded) return;
  card.logLoaded = true;
  card.setLogStatus("Loading the log…");
  const r = await api.logHistory(card.id);
  state.addLog(card.id, r.lines);
  card.renderLog(state.logOf(card.id));
  if (!r.ok) {
    card.logLoaded = false;
    card.setLogStatus(`Could not load the log: ${r.message}.`);
  } else if (!state.logOf(card.id).length) {
    card.setLogStatus("No log lines yet.");
  } else if (r.truncated) {
    card.setLogStatus("Showing the first part of a long log.");
  }
}

// ---------------------------------------------------------------- wiring

function onFilter() {
  filters.status = $("filter-status").value;
  filters.kind = $("filter-kind").value;
  const url = new URL(location.href);
  for (const [k, v] of Object.entries(filters)) {
    if (v) url.searchParams.set(k, v);
    else url.searchParams.delete(k);
  }
  history.replaceState(null, "", url);
  drawPage();
}

function setUpEmptyState() {
  const host = location.host || "localhost:8000";
  const origin = `${location.protocol}//${host}`;
  $("empty-create").textContent = `curl -d kind=demo -d title=hello ${origin}/api/jobs`;
  $("empty-progress").textContent =
    `curl -d progress=40 -d message=working ${origin}/api/jobs/JOB_ID/progress`;
}

function tick() {
  for (const card of cards.values()) {
    if (!card.terminal) card.tick(state.age(card.id));
  }
}

$("filter-status").addEventListener("change", onFilter);
$("filter-kind").addEventListener("change", onFilter);
$("filters").addEventListener("submit", (e) => e.preventDefault());
$("recent-more").addEventListener("click", () => {
  recentLimit += RECENT_PAGE;
  drawPage();
});
document.body.classList.toggle("job-view", Boolean(focusJob));
setUpEmptyState();
setInterval(tick, 1000);
conn.start();
drawConnection(conn);
