// conveyor dashboard: renders the JSON API under /api/ and follows live
// progress from /events (server-sent events).
//
// Job data is untrusted (payloads, ids, messages come from producers):
// every value reaches the page as a text node or an attribute set through
// the DOM, never as HTML.
"use strict";

const FINAL = new Set(["completed", "failed", "cancelled"]);
const SPARK = "▁▂▃▄▅▆▇█";
const RECENT_FINISHED = 30;

// ------------------------------------------------------------ DOM helpers

/** An element: attrs are properties ("class" and "data-*" as attributes), children are nodes or text. */
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null) continue;
    if (k === "class" || k.startsWith("data-")) node.setAttribute(k, String(v));
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node[k] = v;
  }
  for (const c of children) {
    if (c === undefined || c === null) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function jobLink(id) {
  return el("a", { href: "#/jobs/" + encodeURIComponent(id), class: "mono" }, id);
}

function statusCell(status) {
  return el("span", { class: "status status-" + String(status).replace(/[^a-z]/g, "") }, status);
}

function flash(text, isError) {
  const box = document.getElementById("flash");
  box.replaceChildren(el("p", { class: isError ? "error" : "" }, text));
  setTimeout(() => { if (box.firstChild && box.firstChild.textContent === text) box.replaceChildren(); }, 6000);
}

function fmtAge(ms) {
  if (ms === null || ms === undefined) return "-";
  if (ms < 1000) return ms + " ms";
  if (ms < 120000) return (ms / 1000).toFixed(1) + " s";
  return Math.round(ms / 60000) + " min";
}

function duration(from, to) {
  if (!from) return null;
  const a = Date.parse(from), b = to ? Date.parse(to) : Date.now();
  return isNaN(a) || isNaN(b) ? null : Math.max(0, b - a);
}

function spark(values) {
  const max = Math.max(1, ...values);
  return values.map((v) => (v === 0 ? "·" : SPARK[Math.min(7, Math.floor((v / max) * 7.999))])).join("");
}

// ------------------------------------------------------------ API

function token() { return sessionStorage.getItem("conveyor-token") || ""; }

async function api(path, options) {
  const res = await fetch(path, options);
  let body = null;
  try { body = await res.json(); } catch (_) { body = null; }
  if (!res.ok) throw new Error((body && body.error) || res.status + " " + res.statusText);
  return body;
}

async function act(path, payload) {
  const headers = { "Content-Type": "application/json" };
  if (token()) headers.Authorization = "Bearer " + token();
  try {
    const out = await api(path, { method: "POST", headers, body: JSON.stringify(payload || {}) });
    flash(out.message || "done", false);
    route();
  } catch (e) {
    flash(e.message, true);
  }
}

// ------------------------------------------------------------ live progress

/** Latest accepted message per job id, and whether the stream is up. */
const live = new Map();
let snapshotDone = false;
let buffered = [];

/**
 * Whether `ev` is newer than what the page shows for its job: per job the
 * last (attempt, seq), as `conveyor watch` does; a final status always counts.
 */
function accept(ev) {
  const last = live.get(ev.job_id);
  if (!last) return true;
  if (FINAL.has(ev.status)) return true;
  // After the end, only a later run of the same id (enqueued again, or
  // revived from the dead list, with fresh attempts); a snapshot read
  // before the end is older.
  if (FINAL.has(last.status)) return ev.event === "job_started" && String(ev.ts) > String(last.ts);
  if (ev.attempt !== last.attempt) return ev.attempt > last.attempt;
  // A new delivery of the same attempt (requeued at shutdown) starts over at seq 1.
  if (ev.event === "job_started") return true;
  return ev.seq > last.seq;
}

function apply(ev) {
  if (!ev || typeof ev.job_id !== "string" || !accept(ev)) return;
  ev.seen = Date.now();
  live.set(ev.job_id, ev);
  // Keep the finished ones for a while, the newest few.
  const finished = [...live.values()].filter((e) => FINAL.has(e.status)).sort((a, b) => b.seen - a.seen);
  for (const old of finished.slice(RECENT_FINISHED)) live.delete(old.job_id);
  renderLive();
}

async function loadSnapshot() {
  snapshotDone = false;
  buffered = [];
  try {
    const snap = await api("/api/live");
    for (const ev of snap.jobs) apply(ev);
  } catch (e) {
    flash("live snapshot: " + e.message, true);
  }
  snapshotDone = true;
  for (const ev of buffered) apply(ev);
  buffered = [];
}

function connectEvents() {
  const state = document.getElementById("live-state");
  const source = new EventSource("/events");
  source.onopen = () => {
    state.dataset.state = "live";
    state.textContent = "live";
    // A page that opens late or reconnects reads the snapshot first;
    // messages arriving meanwhile wait in `buffered`.
    loadSnapshot();
  };
  source.onerror = () => {
    state.dataset.state = "reconnecting";
    state.textContent = "reconnecting…";
  };
  source.onmessage = (m) => {
    let ev;
    try { ev = JSON.parse(m.data); } catch (_) { return; }
    if (snapshotDone) apply(ev); else buffered.push(ev);
  };
  source.addEventListener("resync", () => loadSnapshot());
}

function liveRow(ev) {
  const stage = ev.stage ? `${(ev.stage_index ?? 0) + 1}/${ev.stages_total} ${ev.stage}` : "";
  const pct = Math.max(0, Math.min(100, Number(ev.progress) || 0));
  return el("div", { class: "job", "data-job-id": ev.job_id, "data-progress": pct.toFixed(1), "data-status": ev.status },
    jobLink(ev.job_id),
    el("span", {}, ev.type, " ", el("span", { class: "muted" }, ev.queue)),
    statusCell(ev.status),
    el("span", {}, el("progress", { max: 100, value: pct }), " ", el("span", { class: "muted" }, stage, ev.message ? " — " + ev.message : "")),
    el("span", { class: "num" }, pct.toFixed(0) + "%"));
}

function renderLive() {
  const box = document.getElementById("live");
  if (!box) return;
  const rows = [...live.values()].sort((a, b) =>
    (FINAL.has(a.status) - FINAL.has(b.status)) || String(a.job_id).localeCompare(String(b.job_id)));
  box.replaceChildren(...(rows.length ? rows.map(liveRow) : [el("p", { class: "muted" }, "No job running.")]));
}

// ------------------------------------------------------------ views

const view = () => document.getElementById("view");
let refreshTimer = null;

// Stage pools of each queue (depth of the pool list, daemons serving it),
// when a pool other than "default" is in use or jobs wait in a pool list.
function poolsTable(queues) {
  const rows = queues.flatMap((q) => (q.pools || []).map((p) => ({ queue: q.name, ...p })));
  if (!rows.some((p) => p.name !== "default" || p.depth > 0)) return el("span", {});
  return el("table", { id: "pools" },
    el("tr", {}, ...["queue", "pool", "waiting", "daemons"].map((h, i) => el("th", { class: i === 2 ? "num" : "" }, h))),
    ...rows.map((p) => el("tr", {},
      el("td", {}, p.queue), el("td", { class: "mono" }, p.name),
      el("td", { class: "num" }, p.depth),
      el("td", { class: p.workers.length ? "" : "error" },
        p.workers.length ? p.workers.join(", ") : "none: nothing runs its stages"))));
}

async function overview() {
  const liveBox = el("div", { id: "live" });
  const queues = el("div", {}, el("p", { class: "muted" }, "loading…"));
  const workers = el("div", {}, el("p", { class: "muted" }, "loading…"));
  view().replaceChildren(
    el("section", {}, el("h2", {}, "Live jobs"), liveBox),
    el("section", {}, el("h2", {}, "Queues"), queues),
    el("section", {}, el("h2", {}, "Workers"), workers));
  renderLive();
  const refresh = async () => {
    try {
      const q = await api("/api/queues");
      const t = q.throughput;
      queues.replaceChildren(el("table", {},
        el("tr", {}, ...["queue", "pending", "active", "scheduled", "dead"].map((h, i) => el("th", { class: i ? "num" : "" }, h)),
          el("th", {}, `completed / min, last ${t.minutes.length} min`)),
        ...q.queues.map((r) => el("tr", {},
          el("td", {}, el("a", { href: "#/jobs?queue=" + encodeURIComponent(r.name) }, r.name)),
          el("td", { class: "num" }, r.pending), el("td", { class: "num" }, r.active),
          el("td", { class: "num" }, r.scheduled),
          el("td", { class: "num" }, el("a", { href: "#/dead?queue=" + encodeURIComponent(r.name) }, r.dead)),
          el("td", { class: "spark", title: (t.by_queue[r.name] || []).join(" ") }, spark(t.by_queue[r.name] || t.minutes.map(() => 0)))))),
        el("p", { class: "muted" }, `All queues: ${t.completed.reduce((a, b) => a + b, 0)} completed, ${t.failed.reduce((a, b) => a + b, 0)} failed in ${t.minutes.length} min (this host's SQLite).`),
        poolsTable(q.queues));
      const w = await api("/api/workers");
      workers.replaceChildren(w.workers.length ? el("table", {},
        el("tr", {}, ...["worker", "host", "heartbeat", "running", "completed", "failed", "queues", "version"].map((h) => el("th", {}, h))),
        ...w.workers.map((r) => el("tr", {},
          el("td", { class: "mono" }, r.id), el("td", {}, r.host), el("td", {}, fmtAge(r.heartbeat_age_ms) + " ago"),
          el("td", { class: "num" }, r.running), el("td", { class: "num" }, r.completed), el("td", { class: "num" }, r.failed),
          el("td", {}, r.queues.join(", ")), el("td", {}, r.version)))) : el("p", { class: "muted" }, "No live worker."));
    } catch (e) {
      queues.replaceChildren(el("p", { class: "error" }, e.message));
    }
  };
  await refresh();
  refreshTimer = setInterval(refresh, 3000);
}

async function jobs(params) {
  const form = el("form", { class: "filters" },
    el("select", { name: "status" }, ...["", "pending", "scheduled", "running", "retrying", "completed", "failed", "cancelled", "handed_over"].map((s) =>
      el("option", { value: s, selected: params.get("status") === s }, s || "any status"))),
    el("input", { name: "type", placeholder: "type", value: params.get("type") || "" }),
    el("input", { name: "queue", placeholder: "queue", value: params.get("queue") || "" }),
    el("input", { name: "q", placeholder: "id contains…", value: params.get("q") || "" }),
    el("button", { type: "submit" }, "Filter"));
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    const p = new URLSearchParams();
    for (const [k, v] of new FormData(form)) if (v) p.set(k, v);
    location.hash = "#/jobs?" + p.toString();
  });
  const table = el("div", {}, el("p", { class: "muted" }, "loading…"));
  view().replaceChildren(el("section", {}, el("h2", {}, "Jobs"), form, table));
  const page = Math.max(1, Number(params.get("page")) || 1);
  const query = new URLSearchParams(params);
  query.set("page", page);
  try {
    const r = await api("/api/jobs?" + query.toString());
    const pager = el("p", { class: "muted" }, `${r.total_capped ? "more than " : ""}${r.total} job(s); page ${r.page}`);
    if (page > 1) { const p = new URLSearchParams(params); p.set("page", page - 1); pager.append(" ", el("a", { href: "#/jobs?" + p }, "← newer")); }
    if (page * r.limit < r.total || (r.total_capped && r.jobs.length === r.limit)) { const p = new URLSearchParams(params); p.set("page", page + 1); pager.append(" ", el("a", { href: "#/jobs?" + p }, "older →")); }
    table.replaceChildren(el("table", {},
      el("tr", {}, ...["id", "type", "queue", "status", "progress", "attempt", "updated", "detail"].map((h) => el("th", {}, h))),
      ...r.jobs.map((j) => el("tr", { "data-job-id": j.id },
        el("td", {}, jobLink(j.id)), el("td", {}, j.type), el("td", {}, j.queue), el("td", {}, statusCell(j.status)),
        el("td", { class: "num" }, j.progress === undefined ? "-" : Math.round(j.progress) + "%"), el("td", { class: "num" }, j.attempt),
        el("td", { class: "muted" }, j.due_at ? "due " + j.due_at : j.updated_at || ""), el("td", {}, j.error || (j.stage ? (j.status === "handed_over" ? "handed on to stage " : "stage ") + j.stage : ""))))), pager);
  } catch (e) {
    table.replaceChildren(el("p", { class: "error" }, e.message));
  }
}

async function jobDetail(id) {
  const box = el("section", {}, el("h2", {}, "Job ", el("span", { class: "mono" }, id)));
  view().replaceChildren(box);
  let r;
  try { r = await api("/api/jobs/" + encodeURIComponent(id)); } catch (e) { box.append(el("p", { class: "error" }, e.message)); return; }
  const rec = r.record || {};
  const ev = r.live;
  // The host of a daemon still registered (none for one that is gone).
  const hostOf = (w) => (w && r.hosts && r.hosts[w]) || "";
  const rows = [["status", statusCell(r.status)], ["type", rec.type || r.type], ["queue", rec.queue || r.queue],
    ["progress", Math.round(ev ? ev.progress : rec.progress || 0) + "%"],
    ["attempt", (rec.attempt ?? "-") + (rec.max_attempts ? " of " + rec.max_attempts : "")],
    ["worker", rec.worker_id], ["host", hostOf(rec.worker_id)], ["created", rec.created_at], ["finished", rec.finished_at], ["due", r.due_at], ["error", rec.error]];
  box.append(el("table", {}, ...rows.filter(([, v]) => v !== undefined && v !== null && v !== "")
    .map(([k, v]) => el("tr", {}, el("th", {}, k), el("td", {}, v)))));
  box.append(el("div", { class: "actions" },
    FINAL.has(r.status) ? null : el("button", { onclick: () => act("/api/jobs/" + encodeURIComponent(id) + "/cancel") }, "Cancel"),
    r.dead ? el("button", { onclick: () => act("/api/jobs/" + encodeURIComponent(id) + "/retry") }, "Retry (from dead)") : null));
  const stages = rec.stages || [];
  const t0 = Math.min(...stages.map((s) => Date.parse(s.started_at)).filter((x) => !isNaN(x)));
  const t1 = Math.max(...stages.map((s) => Date.parse(s.finished_at || s.started_at)).filter((x) => !isNaN(x)));
  const span = Math.max(1, t1 - t0);
  box.append(el("h2", {}, "Stages"), el("table", { class: "timeline" },
    el("tr", {}, ...["stage", "status", "worker", "pool", "host", "timeline", "duration", "result", "error"].map((h) => el("th", {}, h))),
    ...stages.map((s) => {
      const d = duration(s.started_at, s.finished_at);
      const seg = el("div", { class: "seg " + (s.status === "failed" ? "failed" : "") });
      const start = Date.parse(s.started_at);
      if (!isNaN(start) && isFinite(t0)) {
        seg.style.left = (((start - t0) / span) * 100).toFixed(2) + "%";
        seg.style.width = (((d || 0) / span) * 100).toFixed(2) + "%";
      }
      return el("tr", {}, el("td", {}, s.name), el("td", {}, statusCell(s.status)),
        el("td", { class: "mono" }, s.worker_id || ""),
        el("td", { class: "mono" }, s.pool || ""),
        el("td", { class: "mono" }, hostOf(s.worker_id)),
        el("td", { class: "tl" }, el("div", { class: "track" }, seg)),
        el("td", { class: "num" }, d === null ? "-" : (d / 1000).toFixed(2) + " s"),
        el("td", {}, s.result === null ? "" : el("pre", {}, JSON.stringify(s.result, null, 2))),
        el("td", {}, s.error || ""));
    })));
  // Each enqueue of the id and each revival from the dead list is a run (an epoch).
  const runs = [...new Set((rec.attempts || []).map((a) => a.epoch))].sort((a, b) => a - b);
  box.append(el("h2", {}, "Attempts"), el("table", {},
    el("tr", {}, ...["#", "worker", "status", "started", "finished", "error"].map((h) => el("th", {}, h))),
    ...(rec.attempts || []).map((a) => el("tr", {}, el("td", {}, a.attempt + (runs.length > 1 ? ` (run ${runs.indexOf(a.epoch) + 1})` : "")),
      el("td", { class: "mono" }, a.worker_id), el("td", {}, statusCell(a.status)), el("td", {}, a.started_at),
      el("td", {}, a.finished_at || ""), el("td", {}, a.error || "")))));
  box.append(el("h2", {}, "Payload"), el("pre", {}, JSON.stringify(rec.payload ?? null, null, 2)));
}

async function dead(params) {
  const queue = params.get("queue") || "";
  const box = el("section", {}, el("h2", {}, "Dead jobs" + (queue ? " on " + queue : "")));
  view().replaceChildren(box);
  let r;
  try { r = await api("/api/dead?" + new URLSearchParams(queue ? { queue } : {})); } catch (e) { box.append(el("p", { class: "error" }, e.message)); return; }
  const picked = () => [...box.querySelectorAll("input[type=checkbox]:checked")].map((c) => c.value);
  const target = queue ? { queue } : {};
  box.append(el("div", { class: "actions" },
    el("button", { onclick: () => act("/api/dead/retry", { ...target, ids: picked() }) }, "Retry selected"),
    el("button", { onclick: () => act("/api/dead/purge", { ...target, ids: picked() }) }, "Purge selected"),
    el("button", { onclick: () => confirm("Retry every dead job shown?") && act("/api/dead/retry", { ...target, all: true }) }, "Retry all"),
    el("button", { onclick: () => confirm("Delete every dead job shown?") && act("/api/dead/purge", { ...target, all: true }) }, "Purge all")));
  box.append(r.entries.length ? el("table", {},
    el("tr", {}, ...["", "queue", "id", "type", "failed at", "attempt", "error"].map((h) => el("th", {}, h))),
    ...r.entries.map((d) => el("tr", { "data-job-id": d.id || "" },
      el("td", {}, d.id ? el("input", { type: "checkbox", value: d.id }) : null),
      el("td", {}, d.queue), el("td", {}, d.id ? jobLink(d.id) : el("span", { class: "muted" }, "(raw message)")),
      el("td", {}, d.type || ""), el("td", {}, d.failed_at || ""), el("td", { class: "num" }, d.attempt ?? ""),
      el("td", {}, d.error || "")))) : el("p", { class: "muted" }, "The dead list is empty."));
}

// ------------------------------------------------------------ routing

function route() {
  if (refreshTimer) { clearInterval(refreshTimer); refreshTimer = null; }
  const hash = location.hash.replace(/^#/, "") || "/";
  const [path, query] = hash.split("?");
  const params = new URLSearchParams(query || "");
  if (path.startsWith("/jobs/")) return jobDetail(decodeURIComponent(path.slice(6)));
  if (path === "/jobs") return jobs(params);
  if (path === "/dead") return dead(params);
  return overview();
}

document.addEventListener("DOMContentLoaded", () => {
  const input = document.getElementById("token");
  input.value = token();
  document.getElementById("token-form").addEventListener("submit", (e) => {
    e.preventDefault();
    sessionStorage.setItem("conveyor-token", input.value);
    flash(input.value ? "Token set for this tab." : "Token cleared.", false);
  });
  window.addEventListener("hashchange", route);
  route();
  connectEvents();
});
