// One job's card: built once from the template, then updated in place, so the bar's
// transition runs and keyboard focus stays where it was.

import {
  STATUS_LABELS, TERMINAL, clock, count, duration, ordinal, percent, spokenDuration,
} from "./format.js";

let serial = 0;

const PENDING_LABELS = {
  cancel: "Cancelling…", force: "Closing…", pause: "Pausing…", resume: "Resuming…",
};

export class JobCard {
  /** template: the <template> element; onAction(card, action): cancel, force (close
   * anyway), pause, resume, details or watch. */
  constructor(template, job, onAction) {
    serial += 1;
    this.id = job.id;
    this.el = template.content.firstElementChild.cloneNode(true);
    this.el.dataset.jobId = job.id;
    const q = (sel) => this.el.querySelector(sel);
    this.ref = {
      link: q(".job-link"), kind: q(".kind"), badge: q(".status-badge"),
      stalledBadge: q(".stalled-badge"), bar: q(".bar"), fill: q(".fill"), ticks: q(".ticks"),
      stages: q(".stages"), message: q(".message"), stalledNote: q(".stalled-note"),
      percent: q(".f-percent dd"), items: q(".f-items"), queue: q(".f-queue"),
      elapsed: q(".f-elapsed"), remaining: q(".f-remaining"), finished: q(".f-finished"),
      error: q(".action-error"),
      pause: q(".act-pause"), cancel: q(".act-cancel"), force: q(".act-force"),
      detailsBtn: q(".act-details"), watch: q(".act-watch"),
      details: q(".details"), outcome: q(".outcome"), jobError: q(".job-error"),
      result: q(".result"),
      resultBody: q(".result-body"), logStatus: q(".log-status"), log: q(".log"),
      jobId: q(".job-id code"),
    };
    const r = this.ref;
    r.details.id = `details-${serial}`;
    r.detailsBtn.setAttribute("aria-controls", r.details.id);
    r.jobId.textContent = job.id;
    r.link.href = `/?job=${encodeURIComponent(job.id)}`;
    r.pause.addEventListener("click", () => this.request(onAction, this.pauseAction()));
    r.cancel.addEventListener("click", () => this.request(onAction, "cancel"));
    r.force.addEventListener("click", () => this.request(onAction, "force"));
    r.watch.addEventListener("click", () => onAction(this, "watch"));
    r.detailsBtn.addEventListener("click", () => onAction(this, "details"));
    this.job = job;
    this.shown = 0; // the bar's position: it never moves back within one attempt
    this.attempt = job.attempt;
    this.pending = null;
    this.expanded = false;
    this.stageKeys = "";
    this.logIds = new Set();
    this.logMax = 0;
    this.queuePosition = null;
    this.watched = false;
    this.live = true; // false while the page has no connection: no countdown then
  }

  get terminal() {
    return TERMINAL.has(this.job.status);
  }

  pauseAction() {
    return this.job.pause_requested || this.job.status === "paused" ? "resume" : "pause";
  }

  request(onAction, action) {
    if (this.pending || this.terminal) return;
    if (action === "cancel" && this.job.status === "cancelling") return;
    if (action === "force" && this.ref.force.hidden) return;
    onAction(this, action);
  }

  setPending(action) {
    this.pending = action;
    this.draw();
  }

  showError(message) {
    this.ref.error.hidden = !message;
    this.ref.error.textContent = message || "";
  }

  setWatched(on) {
    this.watched = on;
    this.drawWatch();
  }

  drawWatch() {
    const w = this.ref.watch;
    w.hidden = this.terminal;
    w.setAttribute("aria-pressed", String(this.watched));
    w.title = this.watched ? "Watching: you are notified when this job finishes (with "
      + "Notify me on); click to stop" : "Watch: notify me when this job finishes";
    w.setAttribute("aria-label",
      `${this.watched ? "Watching" : "Watch"} ${this.job.title || this.job.id}`);
  }

  update(job, age, queuePosition) {
    if (job.attempt !== this.attempt) {
      this.attempt = job.attempt; // a new attempt starts again from zero
      this.shown = 0;
    }
    this.job = job;
    this.queuePosition = queuePosition;
    this.draw();
    this.tick(age);
  }

  draw() {
    const job = this.job;
    const r = this.ref;
    const terminal = this.terminal;
    const title = job.title || job.id;
    this.el.dataset.status = job.status;
    this.el.dataset.stalled = String(Boolean(job.stalled));
    if (this.pending) this.el.dataset.pending = this.pending;
    else delete this.el.dataset.pending;

    r.link.textContent = title;
    r.kind.textContent = job.kind;
    const [badgeKey, badgeText] = this.badge();
    r.badge.textContent = badgeText;
    r.badge.dataset.tone = badgeKey;
    r.stalledBadge.hidden = !job.stalled || terminal;

    // the bar: never backwards within an attempt, whatever order states arrive in
    this.shown = Math.max(this.shown, Math.min(100, Number(job.progress) || 0));
    const pct = percent(this.shown);
    r.fill.style.width = `${this.shown}%`;
    r.bar.setAttribute("aria-valuenow", String(Math.round(this.shown * 10) / 10));
    const stage = job.stages.find((s) => s.key === job.stage);
    const stageText = stage && !terminal
      ? `, stage ${job.stages.indexOf(stage) + 1} of ${job.stages.length}: ${stage.label}` : "";
    r.bar.setAttribute("aria-valuetext", `${pct}%${stageText}`);
    r.bar.setAttribute("aria-label", `Progress of ${title}`);
    r.percent.textContent = `${pct}%`;
    this.drawStages();

    // a finished job's last progress message is stale: say how it ended instead
    let message = job.message || "";
    if (job.status === "failed" && job.error) message = job.error;
    else if (job.status === "cancelled") {
      message = job.control_reason ? `Cancelled: ${job.control_reason}` : message;
    }
    r.message.textContent = message;
    r.message.title = message;
    // an active card keeps its one line of message even when empty, so it keeps its height
    r.message.hidden = !message && terminal;
    r.message.classList.toggle("is-error", job.status === "failed" && Boolean(job.error));
    r.stalledNote.hidden = !job.stalled || terminal;
    if (job.stalled) {
      r.stalledNote.textContent = `Stalled: no word from the worker for over `
        + `${spokenDuration(job.heartbeat_timeout_s)}. It may have crashed or hung.`;
    }

    const items = job.current !== null && job.current !== undefined;
    r.items.hidden = !items;
    if (items) {
      const unit = job.meta?.unit || job.data?.unit || "";
      const of = job.total !== null && job.total !== undefined ? `/${count(job.total)}` : "";
      // "chunk 3/12" says it all; without a unit, "Items 3/12"
      r.items.querySelector("dt").className = unit ? "sr-only" : "";
      r.items.querySelector("dd").textContent = `${unit ? `${unit} ` : ""}${count(job.current)}${of}`;
    }
    r.queue.hidden = job.status !== "queued" || !this.queuePosition;
    if (this.queuePosition) {
      r.queue.querySelector("dd").textContent = `${ordinal(this.queuePosition)} in line`
        + (job.queue && job.queue !== "default" ? ` for ${job.queue}` : "");
    }
    r.finished.hidden = !terminal || !job.finished_at;
    if (terminal && job.finished_at) {
      const at = new Date(job.finished_at * 1000);
      const today = at.toDateString() === new Date().toDateString();
      r.finished.querySelector("dd").textContent = today ? clock(at)
        : `${at.toLocaleDateString()} ${clock(at)}`;
    }
    r.elapsed.querySelector("dt").textContent = terminal ? "Took" : "Elapsed";
    r.elapsed.hidden = job.started_at === null || job.started_at === undefined;
    r.remaining.hidden = terminal || (job.status === "queued" && job.eta_s === null);

    this.drawActions();
    this.drawWatch();
    this.drawOutcome();
  }

  badge() {
    const job = this.job;
    if (this.pending) return [`pending-${this.pending}`, PENDING_LABELS[this.pending]];
    if (job.status === "running" && job.pause_requested) return ["cancelling", "Pausing…"];
    if (job.status === "paused" && !job.pause_requested) return ["running", "Resuming…"];
    return [job.status, STATUS_LABELS[job.status] || job.status];
  }

  drawStages() {
    const job = this.job;
    const r = this.ref;
    const stages = job.stages || [];
    r.stages.hidden = stages.length === 0;
    const keys = stages.map((s) => `${s.key}:${s.weight}`).join("|");
    if (keys !== this.stageKeys) {
      this.stageKeys = keys;
      const total = stages.reduce((sum, s) => sum + s.weight, 0) || 1;
      let done = 0;
      r.ticks.replaceChildren();
      r.stages.replaceChildren();
      stages.forEach((s, i) => {
        if (i > 0) {
          const tick = document.createElement("span");
          tick.className = "tick";
          tick.style.left = `${(done / total) * 100}%`;
          r.ticks.append(tick);
        }
        done += s.weight;
        const li = document.createElement("li");
        li.className = "stage";
        const mark = document.createElement("span");
        mark.className = "mark";
        mark.setAttribute("aria-hidden", "true");
        const label = document.createElement("span");
        label.className = "label";
        label.textContent = s.label;
        const extra = document.createElement("span");
        extra.className = "stage-extra";
        const said = document.createElement("span");
        said.className = "sr-only";
        li.append(mark, label, extra, said);
        r.stages.append(li);
      });
    }
    const index = stages.findIndex((s) => s.key === job.stage);
    const allDone = job.status === "succeeded";
    const terminal = this.terminal;
    [...r.stages.children].forEach((li, i) => {
      let st = "todo";
      if (allDone || (index >= 0 && i < index)) st = "done";
      else if (i === index) st = terminal ? "stopped" : "current";
      li.dataset.state = st;
      li.querySelector(".mark").textContent =
        { done: "✓", current: "●", stopped: "■", todo: "○" }[st];
      li.querySelector(".sr-only").textContent =
        { done: " (done)", current: " (in progress)", stopped: " (stopped)", todo: "" }[st];
      const sp = job.stage_progress;
      li.querySelector(".stage-extra").textContent =
        st === "current" && sp !== null && sp !== undefined ? ` ${Math.floor(sp)}%` : "";
      if (st === "current") li.setAttribute("aria-current", "step");
      else li.removeAttribute("aria-current");
    });
  }

  drawActions() {
    const job = this.job;
    const r = this.ref;
    const title = job.title || job.id;
    const terminal = this.terminal;
    const hadFocus = this.el.contains(document.activeElement)
      && [r.pause, r.cancel, r.force].includes(document.activeElement);

    const cancelling = job.status === "cancelling" || this.pending === "cancel";
    // once the service has the cancel, "Close anyway" takes the Cancel button's place
    r.cancel.hidden = terminal || (job.status === "cancelling" && !this.pending);
    r.cancel.textContent = cancelling ? "Cancelling…" : "Cancel";
    setDisabled(r.cancel, cancelling || Boolean(this.pending));
    r.cancel.setAttribute("aria-label", `${r.cancel.textContent} ${title}`);

    const action = this.pauseAction();
    r.pause.hidden = terminal || job.status === "cancelling";
    r.pause.textContent = this.pending === "pause" || this.pending === "resume"
      ? PENDING_LABELS[this.pending] : action === "resume" ? "Resume" : "Pause";
    setDisabled(r.pause, Boolean(this.pending) || cancelling);
    r.pause.setAttribute("aria-label", `${r.pause.textContent} ${title}`);

    // the worker may be gone: a person can end the job without its answer
    r.force.hidden = terminal || !(job.status === "cancelling" || job.stalled);
    r.force.textContent = this.pending === "force" ? PENDING_LABELS.force : "Close anyway";
    setDisabled(r.force, Boolean(this.pending));
    r.force.setAttribute("aria-label", `${r.force.textContent} ${title}`);

    if (hadFocus && (r.pause.hidden || r.cancel.hidden) && !this.el.contains(document.activeElement)) {
      r.detailsBtn.focus({ preventScroll: true });
    }
  }

  drawOutcome() {
    const job = this.job;
    const r = this.ref;
    r.jobError.textContent = job.error ? `Error: ${job.error}` : "";
    // a failed job's error is its card's message (shown in full when expanded)
    r.jobError.hidden = !job.error || job.status === "failed";
    const hasResult = job.result !== null && job.result !== undefined;
    r.result.hidden = !hasResult;
    if (hasResult) {
      r.resultBody.textContent = typeof job.result === "string"
        ? job.result : JSON.stringify(job.result, null, 2);
    }
    r.outcome.hidden = r.jobError.hidden && r.result.hidden;
  }

  /** Run the clocks between events: `age` is seconds since this state arrived. */
  tick(age) {
    const job = this.job;
    const r = this.ref;
    const moving = job.status === "running" || job.status === "cancelling";
    const ticking = !TERMINAL.has(job.status) && job.started_at;
    const elapsed = job.elapsed_s === null ? null : job.elapsed_s + (ticking ? age : 0);
    setDuration(r.elapsed.querySelector("dd"), elapsed);
    let left = job.eta_s;
    if (left !== null && left !== undefined && moving && !job.stalled) left = Math.max(0, left - age);
    // without a connection the page cannot know how the job goes: no countdown to 00:00
    if (!this.live && !this.terminal) {
      setDuration(r.remaining.querySelector("dd"), null, "unknown while disconnected");
    } else {
      setDuration(r.remaining.querySelector("dd"), left);
    }
  }

  /** The page's connection came or went. */
  setLive(live, age) {
    if (live === this.live) return;
    this.live = live;
    this.el.dataset.live = String(live);
    this.tick(age);
  }

  setExpanded(open) {
    this.expanded = open;
    this.ref.details.hidden = !open;
    this.ref.detailsBtn.setAttribute("aria-expanded", String(open));
    this.ref.detailsBtn.textContent = open ? "Hide details" : "Details";
    this.el.classList.toggle("expanded", open);
  }

  setLogStatus(text) {
    this.ref.logStatus.textContent = text;
    this.ref.logStatus.hidden = !text;
  }

  /** Show log lines (id order); appends when it can, redraws when older lines arrive. */
  renderLog(lines) {
    const r = this.ref;
    const fresh = lines.filter((ev) => !this.logIds.has(ev.id));
    if (!fresh.length) return;
    if (fresh[0].id < this.logMax) {
      r.log.replaceChildren();
      this.logIds.clear();
      this.logMax = 0;
      return this.renderLog(lines);
    }
    const items = fresh.map((ev) => {
      this.logIds.add(ev.id);
      this.logMax = Math.max(this.logMax, ev.id);
      const li = document.createElement("li");
      li.className = "log-line";
      li.dataset.level = ev.level;
      li.dataset.eventId = String(ev.id);
      const time = document.createElement("time");
      time.dateTime = ev.ts;
      time.textContent = clock(new Date(ev.ts));
      const level = document.createElement("span");
      level.className = "level";
      level.textContent = ev.level;
      const msg = document.createElement("span");
      msg.className = "log-message";
      msg.textContent = ev.message;
      li.append(time, level, msg);
      return li;
    });
    r.log.append(...items);
    this.setLogStatus("");
  }
}

function setDuration(dd, seconds, why = "unknown") {
  const known = seconds !== null && seconds !== undefined && Number.isFinite(seconds);
  if (!known && dd.dataset.unknown === "true" && dd.title === why) return;
  dd.dataset.unknown = String(!known);
  if (known) {
    dd.textContent = duration(seconds);
    dd.removeAttribute("title");
    return;
  }
  const dash = document.createElement("span");
  dash.setAttribute("aria-hidden", "true");
  dash.textContent = "—";
  const said = document.createElement("span");
  said.className = "sr-only";
  said.textContent = why;
  dd.replaceChildren(dash, said);
  dd.title = why;
}

function setDisabled(button, disabled) {
  // aria-disabled keeps the button focusable, so keyboard users do not lose their place
  if (disabled) button.setAttribute("aria-disabled", "true");
  else button.removeAttribute("aria-disabled");
}
