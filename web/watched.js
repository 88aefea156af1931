// The jobs a person marked to hear about: kept in this browser, by job id.

const KEY = "progress-sse.watched";
const MAX = 500; // ids kept; the oldest marks are let go first

export class Watched {
  constructor() {
    let ids = [];
    try {
      ids = JSON.parse(localStorage.getItem(KEY) || "[]");
    } catch {
      ids = [];
    }
    this.ids = new Set(Array.isArray(ids) ? ids.filter((id) => typeof id === "string") : []);
    this.extra = new Set(); // watched for this visit only: the job opened by link
  }

  has(id) {
    return this.ids.has(id) || this.extra.has(id);
  }

  /** Watch for this visit without remembering it (the one-job view). */
  watchNow(id) {
    this.extra.add(id);
  }

  toggle(id) {
    if (this.ids.has(id)) this.ids.delete(id);
    else this.ids.add(id);
    const kept = [...this.ids].slice(-MAX);
    this.ids = new Set(kept);
    localStorage.setItem(KEY, JSON.stringify(kept));
    return this.ids.has(id);
  }

  get size() {
    return this.ids.size;
  }
}
