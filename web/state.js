// The page's state: every job by id, replaced by the job each event carries.

import { TERMINAL } from "./format.js";

const MAX_LOG_LINES = 1000; // per job
const MAX_SEEN_IDS = 50000; // the received-id record tests read; older ids are dropped
export const MAX_FINISHED = 200; // finished jobs kept on the page; older ones are let go

export class JobState {
  constructor() {
    this.jobs = new Map(); // id -> job JSON, as the server last described it
    this.seenAt = new Map(); // id -> performance.now() when that description arrived
    this.logs = new Map(); // id -> Map(event id -> log event), live lines and loaded history
    this.lastId = 0; // the newest event id applied (the stream's resume point)
    this.seenIds = []; // event ids received, duplicates included (tests read it)
    this.seenIdsDropped = 0;
    this.snapshotIds = [];
    this.duplicates = 0;
    this.loaded = false; // a snapshot or a poll has answered
    this.changed = new Set(); // ids whose card needs drawing
    this.finishedNow = []; // jobs seen to finish since the last drain, for notifications
  }

  /** Replace everything with a snapshot (a fresh connection, or `reset` after a long gap). */
  snapshot(data) {
    this.snapshotIds.push(data.id);
    const before = new Set(this.jobs.keys());
    if (data.reset) this.logs.clear();
    const fresh = new Map();
    for (const job of data.jobs || []) fresh.set(job.id, job);
    for (const id of before) if (!fresh.has(id)) this.remove(id);
    for (const job of fresh.values()) this.put(job);
    this.lastId = data.id;
    this.loaded = true;
  }

  /** Apply one live event; false when it repeats one already applied. */
  apply(event) {
    if (this.seenIds.length >= MAX_SEEN_IDS) {
      const drop = MAX_SEEN_IDS / 2;
      this.seenIds.splice(0, drop);
      this.seenIdsDropped += drop;
    }
    this.seenIds.push(event.id);
    if (event.id <= this.lastId) {
      this.duplicates += 1;
      return false;
    }
    this.lastId = event.id;
    if (event.type === "log") this.addLog(event.job_id, [event]);
    if (event.job) this.put(event.job);
    return true;
  }

  /** Merge jobs read by polling or from an action's answer: only newer states win. */
  merge(jobs) {
    for (const job of jobs) {
      const known = this.jobs.get(job.id);
      if (!known || job.updated_at > known.updated_at) {
        this.put(job);
      }
    }
    this.loaded = true;
  }

  put(job) {
    const known = this.jobs.get(job.id);
    if (known && !TERMINAL.has(known.status) && TERMINAL.has(job.status)) {
      this.finishedNow.push(job);
    }
    this.jobs.set(job.id, job);
    this.seenAt.set(job.id, performance.now());
    this.changed.add(job.id);
  }

  remove(id) {
    this.jobs.delete(id);
    this.seenAt.delete(id);
    this.logs.delete(id);
    this.changed.add(id);
  }

  /** Let go of the oldest finished jobs beyond `max`, except `keep`. */
  prune(max = MAX_FINISHED, keep = null) {
    const finished = [];
    for (const job of this.jobs.values()) {
      if (TERMINAL.has(job.status) && job.id !== keep) finished.push(job);
    }
    if (finished.length <= max) return;
    finished.sort((a, b) => (b.finished_at || 0) - (a.finished_at || 0));
    for (const job of finished.slice(max)) this.remove(job.id);
  }

  addLog(jobId, events) {
    let lines = this.logs.get(jobId);
    if (!lines) {
      lines = new Map();
      this.logs.set(jobId, lines);
    }
    for (const ev of events) lines.set(ev.id, ev);
    if (lines.size > MAX_LOG_LINES) {
      const ids = [...lines.keys()].sort((a, b) => a - b);
      for (const id of ids.slice(0, lines.size - MAX_LOG_LINES)) lines.delete(id);
    }
  }

  /** Log lines of a job in id order. */
  logOf(jobId) {
    const lines = this.logs.get(jobId);
    return lines ? [...lines.values()].sort((a, b) => a.id - b.id) : [];
  }

  /** Seconds since the job's description arrived, to run its clocks between events. */
  age(jobId) {
    const at = this.seenAt.get(jobId);
    return at === undefined ? 0 : (performance.now() - at) / 1000;
  }

  /** Jobs that finished since the last call. */
  drainFinished() {
    const out = this.finishedNow;
    this.finishedNow = [];
    return out;
  }

  drainChanged() {
    const out = this.changed;
    this.changed = new Set();
    return out;
  }
}
