// Calls to the JSON API. Every failure comes back as words a person can act on.

async function call(path, options = {}) {
  let response;
  try {
    response = await fetch(path, { headers: { Accept: "application/json" }, ...options });
  } catch {
    return { ok: false, status: 0, message: "could not reach the server; check the connection" };
  }
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null;
  }
  if (!response.ok) {
    const message = body?.error?.message
      || `the server answered ${response.status} ${response.statusText}`.trim();
    return { ok: false, status: response.status, message, code: body?.error?.code };
  }
  return { ok: true, status: response.status, body };
}

/** Ask for a cancel, pause or resume; the answer carries the job as stored. */
export function control(jobId, action) {
  return call(`/api/jobs/${encodeURIComponent(jobId)}/${action}`, {
    method: "POST",
    headers: { Accept: "application/json", "Content-Type": "application/json" },
    body: "{}",
  });
}

/** End a job `cancelled` at once, without its worker's answer ("Close anyway"). */
export function forceCancel(jobId) {
  return call(`/api/jobs/${encodeURIComponent(jobId)}/cancel`, {
    method: "POST",
    headers: { Accept: "application/json", "Content-Type": "application/json" },
    body: JSON.stringify({ force: true }),
  });
}

/** The newest jobs, for polling when the stream is unavailable. */
export function listJobs(limit = 200) {
  return call(`/api/jobs?limit=${limit}`);
}

export function getJob(jobId) {
  return call(`/api/jobs/${encodeURIComponent(jobId)}`);
}

/** Every stored log line of a job, read page by page from its JSON history. */
export async function logHistory(jobId, maxPages = 20) {
  const lines = [];
  let after = 0;
  for (let page = 0; page < maxPages; page++) {
    const r = await call(
      `/api/jobs/${encodeURIComponent(jobId)}/events?after=${after}&limit=1000`);
    if (!r.ok) return { ok: false, message: r.message, lines };
    const events = r.body.events || [];
    for (const ev of events) if (ev.type === "log") lines.push(ev);
    if (events.length < 1000) return { ok: true, lines };
    after = events[events.length - 1].id;
  }
  return { ok: true, lines, truncated: true };
}
