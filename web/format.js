// Small pure helpers for text shown on the page.

/** Seconds as M:SS / MM:SS, or H:MM:SS from an hour on; null or unknown as "—". */
export function duration(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "—";
  const total = Math.max(0, Math.floor(seconds));
  const h = Math.floor(total / 3600);
  const m = Math.floor((total % 3600) / 60);
  const s = total % 60;
  const ss = String(s).padStart(2, "0");
  if (h > 0) return `${h}:${String(m).padStart(2, "0")}:${ss}`;
  return `${String(m).padStart(2, "0")}:${ss}`;
}

/** Spoken form of a duration for screen readers ("1 hour 2 minutes 5 seconds"). */
export function spokenDuration(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "unknown";
  const total = Math.max(0, Math.floor(seconds));
  const parts = [];
  const h = Math.floor(total / 3600);
  const m = Math.floor((total % 3600) / 60);
  const s = total % 60;
  if (h) parts.push(`${h} hour${h === 1 ? "" : "s"}`);
  if (m) parts.push(`${m} minute${m === 1 ? "" : "s"}`);
  if (s || !parts.length) parts.push(`${s} second${s === 1 ? "" : "s"}`);
  return parts.join(" ");
}

/** A whole percentage that reads 100 only when the job is really complete. */
export function percent(value) {
  const v = Math.max(0, Math.min(100, Number(value) || 0));
  return v >= 100 ? 100 : Math.floor(v);
}

/** A count as written: integers plainly, fractions to one decimal. */
export function count(value) {
  if (value === null || value === undefined) return "";
  return Number.isInteger(value) ? String(value) : value.toFixed(1);
}

/** Local wall-clock time, HH:MM:SS. */
export function clock(date) {
  return date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit",
                                       hour12: false });
}

/** "1st", "2nd", "3rd", "4th"… */
export function ordinal(n) {
  const rem100 = n % 100;
  if (rem100 >= 11 && rem100 <= 13) return `${n}th`;
  return `${n}${{ 1: "st", 2: "nd", 3: "rd" }[n % 10] || "th"}`;
}

export const STATUS_LABELS = {
  queued: "Queued",
  running: "Running",
  paused: "Paused",
  cancelling: "Cancelling…",
  succeeded: "Succeeded",
  failed: "Failed",
  cancelled: "Cancelled",
};

export const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
