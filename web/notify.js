// Opt-in: a browser notification and a short tone when a job the person watches finishes
// (marked with its card's Watch button, or opened by link), never for every job.

const KEY = "progress-sse.notify";

const WORDS = { succeeded: "finished", failed: "failed", cancelled: "was cancelled" };

export class Notifier {
  /** onOpen(job): a person clicked the notification of this job; watched: a Watched. */
  constructor(button, onOpen, watched) {
    this.button = button;
    this.onOpen = onOpen;
    this.watched = watched;
    this.audio = null;
    this.enabled = localStorage.getItem(KEY) === "1";
    button.addEventListener("click", () => this.toggle());
    this.draw();
  }

  get permission() {
    return typeof Notification === "undefined" ? "unsupported" : Notification.permission;
  }

  /** Turn notifications on, from inside a click (a card's Watch button). */
  async enable() {
    if (!this.enabled) await this.toggle();
  }

  async toggle() {
    this.enabled = !this.enabled;
    localStorage.setItem(KEY, this.enabled ? "1" : "0");
    if (this.enabled) {
      this.unlockAudio(); // inside the click, as browsers require
      if (this.permission === "default") {
        try {
          await Notification.requestPermission();
        } catch {
          // older browsers: callback form only; the tone still works
        }
      }
      this.tone(660);
    }
    this.draw();
  }

  draw() {
    const b = this.button;
    b.setAttribute("aria-pressed", String(this.enabled));
    const n = this.watched.size;
    const which = n === 0 ? "a job you watch (mark one with its Watch button)"
      : n === 1 ? "the job you watch" : `one of the ${n} jobs you watch`;
    if (!this.enabled) {
      b.textContent = "Notify me";
      b.title = `A notification and a short sound when ${which} finishes`;
    } else if (this.permission === "granted") {
      b.textContent = "Notifying";
      b.title = `Notifying when ${which} finishes; click to stop`;
    } else {
      b.textContent = "Sound only";
      b.title = this.permission === "denied"
        ? "Notifications are blocked in this browser's site settings; a sound plays instead"
        : "This browser shows no notifications here; a sound plays instead";
    }
  }

  unlockAudio() {
    const Ctx = window.AudioContext || window.webkitAudioContext;
    if (!Ctx) return;
    if (!this.audio) this.audio = new Ctx();
    if (this.audio.state === "suspended") this.audio.resume().catch(() => {});
  }

  tone(freq = 880) {
    if (!this.audio) this.unlockAudio();
    const ctx = this.audio;
    if (!ctx || ctx.state !== "running") return;
    const t = ctx.currentTime;
    const osc = ctx.createOscillator();
    const gain = ctx.createGain();
    osc.type = "sine";
    osc.frequency.setValueAtTime(freq, t);
    gain.gain.setValueAtTime(0.0001, t);
    gain.gain.exponentialRampToValueAtTime(0.15, t + 0.02);
    gain.gain.exponentialRampToValueAtTime(0.0001, t + 0.35);
    osc.connect(gain).connect(ctx.destination);
    osc.start(t);
    osc.stop(t + 0.4);
  }

  finished(job) {
    if (!this.enabled || !this.watched.has(job.id)) return;
    this.tone(job.status === "succeeded" ? 880 : 440);
    if (this.permission !== "granted") return;
    const title = `${job.title || job.id} ${WORDS[job.status] || job.status}`;
    const body = job.status === "failed" && job.error ? job.error : job.message || job.kind;
    try {
      const n = new Notification(title, { body, tag: job.id });
      n.onclick = () => {
        window.focus();
        n.close();
        this.onOpen(job);
      };
    } catch {
      // some mobile browsers only notify through a service worker; the tone played
    }
  }
}
