// One question before an action that cannot be undone, in the page's own <dialog>.
// The safe answer has the focus, and Escape means no.

const dialog = () => document.getElementById("confirm");

/** Ask; answers true only when the person chose `yes`. */
export function confirmAction({ title, text, yes, no }) {
  const d = dialog();
  if (!d || typeof d.showModal !== "function") {
    return Promise.resolve(window.confirm(`${title}\n\n${text}`));
  }
  if (d.open) d.close("no");
  d.querySelector("#confirm-h").textContent = title;
  d.querySelector("#confirm-text").textContent = text;
  d.querySelector("#confirm-yes").textContent = yes;
  d.querySelector("#confirm-no").textContent = no;
  d.returnValue = "";
  const opener = document.activeElement;
  return new Promise((resolve) => {
    d.addEventListener("close", () => {
      if (opener && document.contains(opener)) opener.focus({ preventScroll: true });
      resolve(d.returnValue === "yes");
    }, { once: true });
    d.showModal();
    d.querySelector("#confirm-no").focus();
  });
}
