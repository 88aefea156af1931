// With authentication on and no valid token, say how to sign in (instead of "offline").
//
// The service sends a browser whose ?access_token= it refused back to this page with
// ?signin=rejected (not a valid token) or ?signin=scope (no `read` scope); only those
// fixed words are read from the address, never text to show.

const PROBLEMS = {
  rejected: "The token in that link was not accepted: it has expired, or it was not "
    + "signed with this service's secret. Mint a new one.",
  scope: "The token in that link lacks the read scope, which the dashboard needs. "
    + "Mint one with --scope read,create (or read).",
};

let tidied = false;

/** Show or hide the sign-in panel for the connection's state. */
export function drawSignIn(conn, params) {
  const $ = (id) => document.getElementById(id);
  const reason = params.get("signin");
  const signedOut = conn.state === "signed-out";
  const problem = PROBLEMS[reason] || (signedOut && conn.authStatus === 403 ? PROBLEMS.scope
    : "");
  $("signin").hidden = !signedOut;
  $("signin-problem").hidden = !problem;
  $("signin-problem").textContent = problem;
  if (!tidied) {
    tidied = true;
    const origin = `${location.protocol}//${location.host || "localhost:8000"}`;
    $("signin-link").textContent = `${origin}/?access_token=TOKEN`;
  }
  if (!signedOut && reason && conn.live && conn.state !== "connecting") {
    // signed in after all (an older cookie): the note about the link has done its work
    const url = new URL(location.href);
    url.searchParams.delete("signin");
    history.replaceState(null, "", url);
    params.delete("signin");
  }
}
