// One EventSource for the whole page, and polling when streaming is not possible.
//
// The browser reconnects an EventSource by itself (sending Last-Event-ID), so the
// error handler never opens a new one. Only when the browser has given up for good
// (readyState CLOSED, e.g. a proxy answered 502) does a successful poll open a new
// stream, resuming from the last event id the page applied.

const EVENT_TYPES = ["created", "progress", "log", "status", "finished"];
const FALLBACK_AFTER = 3; // failed stream attempts in a row before polling as well
export const POLL_MS = 3000;
const SIGNED_OUT_POLL_MS = 10000; // asking again whether a sign-in happened (another tab)
const REOPEN_MIN_MS = 3000;
const REOPEN_MAX_MS = 60000;

export class Connection {
  /**
   * streamUrl: the SSE endpoint; poll(): fetch and merge the current jobs (throws on
   * failure); resumeId(): the newest event id applied; onSnapshot/onEvent: stream data;
   * onChange(): the connection state changed.
   */
  constructor({ streamUrl, poll, resumeId, onSnapshot, onEvent, onChange }) {
    Object.assign(this, { streamUrl, poll, resumeId, onSnapshot, onEvent, onChange });
    this.state = "connecting"; // live | reconnecting | polling | offline | signed-out | closed
    this.reason = null; // why polling: "unsupported" | "stream-down"
    this.authStatus = null; // 401 (no valid token) or 403 (a token without `read`)
    this.es = null;
    this.failures = 0;
    this.lastEventAt = null;
    this.lastPollAt = null;
    this.pollTimer = null;
    this.reopenDelay = REOPEN_MIN_MS;
    this.reopenAt = 0;
    this.closed = false;
  }

  start() {
    if (typeof EventSource === "undefined") {
      this.reason = "unsupported";
      this.startPolling();
    } else {
      this.open(null);
    }
  }

  open(resumeFrom) {
    let url = this.streamUrl;
    if (resumeFrom) url += `${url.includes("?") ? "&" : "?"}last_event_id=${resumeFrom}`;
    const es = new EventSource(url);
    this.es = es;
    es.onopen = () => {
      this.failures = 0;
      this.reopenDelay = REOPEN_MIN_MS;
      this.stopPolling();
      this.set("live");
    };
    es.onerror = () => {
      if (this.es !== es || this.closed) return;
      this.failures += 1;
      if (es.readyState === EventSource.CLOSED) {
        // the browser will not retry: poll, and reopen once the server answers again
        this.es = null;
        this.reason = "stream-down";
        this.reopenAt = Date.now() + this.reopenDelay;
        this.reopenDelay = Math.min(this.reopenDelay * 2, REOPEN_MAX_MS);
        this.startPolling();
      } else if (this.failures >= FALLBACK_AFTER) {
        this.reason = "stream-down";
        this.startPolling();
      } else {
        this.set("reconnecting");
      }
    };
    es.addEventListener("snapshot", (e) => {
      this.lastEventAt = new Date();
      this.onSnapshot(JSON.parse(e.data));
      this.changed();
    });
    for (const type of EVENT_TYPES) {
      es.addEventListener(type, (e) => {
        this.lastEventAt = new Date();
        this.onEvent(JSON.parse(e.data));
        this.changed();
      });
    }
  }

  /** Stop for good: nothing more will happen to what this page shows. */
  close() {
    this.closed = true;
    if (this.es) this.es.close();
    this.es = null;
    this.stopPolling();
    this.set("closed");
  }

  /** False while the page hears nothing from the server: its clocks cannot be trusted. */
  get live() {
    return !["reconnecting", "offline", "signed-out"].includes(this.state);
  }

  get readyState() {
    return this.es ? this.es.readyState : null;
  }

  startPolling() {
    if (this.pollTimer !== null || this.closed) {
      if (this.state === "live" || this.state === "connecting") this.set("reconnecting");
      return;
    }
    this.pollTimer = 0; // running
    if (!["polling", "offline", "signed-out"].includes(this.state)) this.set("reconnecting");
    this.pollOnce();
  }

  stopPolling() {
    if (this.pollTimer) clearTimeout(this.pollTimer);
    this.pollTimer = null;
  }

  async pollOnce() {
    try {
      await this.poll();
      if (this.pollTimer === null) return; // the stream came back meanwhile
      this.lastPollAt = new Date();
      this.set("polling");
      if (!this.es && this.reason !== "unsupported" && Date.now() >= this.reopenAt) {
        this.open(this.resumeId() || null);
      }
    } catch (err) {
      if (this.pollTimer === null) return;
      // the server answered, and it wants a token: retrying the same request cannot help
      const auth = err?.status === 401 || err?.status === 403;
      this.authStatus = auth ? err.status : null;
      this.set(auth ? "signed-out" : "offline");
    }
    if (this.pollTimer !== null && !this.closed) {
      const wait = this.state === "signed-out" ? SIGNED_OUT_POLL_MS : POLL_MS;
      this.pollTimer = setTimeout(() => this.pollOnce(), wait);
    }
  }

  set(state) {
    if (this.state === "closed") return;
    this.state = state;
    this.changed();
  }

  changed() {
    this.onChange(this);
  }
}
