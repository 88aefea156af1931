// Node EventSource (npm `eventsource`) for tests/test_interop_browser.py.
//
//   node sse_reader.mjs URL
//
// Prints one JSON line per thing that happens, with `t` in ms since the epoch:
//   {"kind":"open", ...}                       a 200 text/event-stream answer
//   {"kind":"event","type":T,"id":I,"data":D}  every dispatched event, named or not
//   {"kind":"error","readyState":R,"code":C,"message":M}
//   {"kind":"exit"}                            nothing left to wait for (closed for good)
// and exits when it is closed for good or its stdin ends (the test closes it).
// TLS: trust a test certificate with NODE_EXTRA_CA_CERTS.
import { EventSource } from "eventsource";

const TYPES = ["snapshot", "created", "progress", "log", "status", "finished"];

const url = process.argv[2];
if (!url) {
  process.stderr.write("usage: node sse_reader.mjs URL\n");
  process.exit(64);
}

function emit(record) {
  process.stdout.write(JSON.stringify({ ...record, t: Date.now() }) + "\n");
}

const es = new EventSource(url);
es.addEventListener("open", () => emit({ kind: "open", readyState: es.readyState }));
es.addEventListener("error", (e) =>
  emit({ kind: "error", readyState: es.readyState, code: e.code ?? null,
         message: e.message ?? null }));
// "message" catches frames without an event: name (there should be none)
for (const type of [...TYPES, "message"]) {
  es.addEventListener(type, (e) =>
    emit({ kind: "event", type: e.type, id: e.lastEventId, data: e.data }));
}

process.stdin.resume();
process.stdin.on("end", () => {
  es.close();
  process.exit(0);
});
// closed for good (a non-200 answer, a 204): nothing will happen any more
const watch = setInterval(() => {
  if (es.readyState === es.CLOSED) {
    clearInterval(watch);
    emit({ kind: "exit" });
    process.exit(0);
  }
}, 50);
