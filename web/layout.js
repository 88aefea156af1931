// Where each card goes, so the page stays still while jobs arrive and move on.
//
// Active: queued, running, paused and cancelling jobs in the order they were created, so
// a new job joins at the end and a change of status moves no card. Stalled: jobs whose
// worker went quiet, apart, out of the way. Recent: finished jobs, newest first, a page
// of RECENT_PAGE at a time ("Show more").

import { TERMINAL } from "./format.js";

export const RECENT_PAGE = 20;

export function groupOf(job) {
  if (TERMINAL.has(job.status)) return "recent";
  return job.stalled ? "stalled" : "active";
}

const byCreation = (a, b) => a.job.created_at - b.job.created_at
  || (a.id < b.id ? -1 : a.id > b.id ? 1 : 0);
const byFinish = (a, b) => (b.job.finished_at || 0) - (a.job.finished_at || 0)
  || byCreation(b, a);

/** The cards to show in each group, in order; `recentTotal` counts the matching finished. */
export function layout(cards, matches, recentLimit) {
  const groups = { active: [], stalled: [], recent: [] };
  for (const card of cards) {
    if (matches(card.job)) groups[groupOf(card.job)].push(card);
  }
  groups.active.sort(byCreation);
  groups.stalled.sort(byCreation);
  groups.recent.sort(byFinish);
  const recentTotal = groups.recent.length;
  groups.recent = groups.recent.slice(0, recentLimit);
  return { ...groups, recentTotal };
}

/** Put exactly `list` in `container`, in order, touching only the nodes that move. */
export function arrange(container, list) {
  const wanted = new Set(list.map((card) => card.el));
  for (const node of [...container.children]) if (!wanted.has(node)) node.remove();
  let node = container.firstElementChild;
  for (const card of list) {
    if (card.el === node) node = node.nextElementSibling;
    else container.insertBefore(card.el, node);
  }
}
