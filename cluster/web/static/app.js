// The status page: tables from /ui/state, refreshed whenever the event
// stream (/ui/events, server-sent events) says something happened. Text
// from the cluster goes in with textContent only, never as HTML.
"use strict";

const maxEvents = 100;
let state = null;
let refreshing = null;

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function stateCell(s) {
  const td = el("td");
  td.appendChild(el("span", s, "state state-" + s));
  return td;
}

function duration(ms) {
  if (ms < 0) ms = 0;
  const s = Math.floor(ms / 1000), d = Math.floor(s / 86400), h = Math.floor(s % 86400 / 3600),
    m = Math.floor(s % 3600 / 60), r = s % 60;
  if (d > 0) return d + "d " + h + "h";
  if (h > 0) return h + "h " + m + "m";
  if (m > 0) return m + "m " + r + "s";
  return r + "s";
}

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i === 0 ? n : n.toFixed(1)) + " " + units[i];
}

function fill(id, rows) {
  const tbody = document.querySelector("#" + id + " tbody");
  tbody.replaceChildren(...rows);
}

function render() {
  const st = state;
  document.getElementById("node").textContent = "· " + st.node + (st.leader ? " (leader " + st.leader + ")" : " (no leader)");
  fill("nodes", st.nodes.map(n => {
    const tr = el("tr");
    tr.dataset.node = n.name;
    tr.dataset.status = n.status;
    tr.append(el("th", n.name), stateCell(n.status),
      el("td", n.load.num_cpu ? n.load.cpu_load1.toFixed(2) + " / " + n.load.num_cpu + " CPU" : "–", "num"),
      el("td", n.load.mem_free ? bytes(n.load.mem_free) : "–", "num"),
      el("td", n.eligible ? "yes" : "no"),
      el("td", drainText(n.drain)), el("td", n.workloads, "num"));
    tr.firstChild.scope = "row";
    return tr;
  }));
  const now = Date.now();
  fill("workloads", st.workloads.map(w => {
    const tr = el("tr");
    tr.dataset.workload = w.id;
    tr.dataset.state = w.state;
    const up = w.state === "running" && w.started_at ? duration(now - Date.parse(w.started_at)) : "–";
    const upCell = el("td", up, "num uptime");
    if (w.state === "running" && w.started_at) upCell.dataset.since = w.started_at;
    tr.append(el("th", w.id), el("td", w.name), stateCell(w.state), el("td", w.node || w.desired_node || "–"),
      el("td", w.pid || "–", "num"), el("td", w.vip || "–"), upCell, el("td", w.restarts, "num"));
    tr.firstChild.scope = "row";
    return tr;
  }));
  document.getElementById("no-workloads").hidden = st.workloads.length > 0;
  fill("migrations", st.migrations.map(m => {
    const tr = el("tr");
    tr.dataset.migration = m.id;
    tr.append(el("th", m.id), el("td", m.workload + (m.name ? " (" + m.name + ")" : "")), el("td", m.source), el("td", m.target),
      stateCell(m.state), el("td", duration(now - Date.parse(m.planned_at)) + " ago", "num"));
    tr.firstChild.scope = "row";
    return tr;
  }));
  document.getElementById("no-migrations").hidden = st.migrations.length > 0;
  fill("checkpoints", st.checkpoints.map(c => {
    const tr = el("tr");
    tr.dataset.checkpoint = c.workload;
    tr.append(el("th", c.workload), el("td", c.seq, "num"), el("td", c.node),
      el("td", duration(now - Date.parse(c.at)) + " ago", "num"), el("td", bytes(c.size), "num"),
      el("td", (c.holders || []).join(", ") || "–"));
    tr.firstChild.scope = "row";
    return tr;
  }));
  document.getElementById("no-checkpoints").hidden = st.checkpoints.length > 0;
}

function drainText(d) {
  if (!d) return "–";
  if (d.completed_at) return "done: moved " + d.moved;
  return "draining: moved " + d.moved + ", in flight " + d.in_flight + ", remaining " + d.remaining;
}

// Uptimes tick between refreshes.
setInterval(() => {
  const now = Date.now();
  document.querySelectorAll("td.uptime[data-since]").forEach(td => {
    td.textContent = duration(now - Date.parse(td.dataset.since));
  });
}, 1000);

function setStatus(text, cls) {
  const s = document.getElementById("status");
  s.textContent = text;
  s.className = cls || "";
}

async function refresh() {
  try {
    const r = await fetch("/ui/state", { credentials: "same-origin", cache: "no-store" });
    if (r.status === 401) {
      setStatus("not signed in: open the URL pclusterd printed (it carries the access token)", "down");
      return;
    }
    if (!r.ok) throw new Error("state: " + r.status);
    state = await r.json();
    render();
  } catch (e) {
    setStatus("cannot reach pclusterd: " + e.message, "down");
  }
}

// Refreshes are coalesced: a burst of events makes one or two requests.
function scheduleRefresh() {
  if (refreshing) return;
  refreshing = setTimeout(async () => { await refresh(); refreshing = null; }, 150);
}

function addEvent(ev) {
  const list = document.getElementById("events");
  const li = el("li");
  li.dataset.type = ev.type;
  if (ev.workload) li.dataset.workload = ev.workload;
  const t = el("time", new Date(ev.time).toLocaleTimeString());
  t.dateTime = ev.time;
  li.append(t, document.createTextNode(ev.message));
  list.prepend(li);
  while (list.children.length > maxEvents) list.lastChild.remove();
}

function follow() {
  // The last maxEvents kept events first (index=0), then new ones; the
  // browser resumes after the last one it saw (Last-Event-ID) on its own.
  const es = new EventSource("/ui/events?index=0");
  es.onopen = () => { setStatus("live", "live"); scheduleRefresh(); };
  es.onmessage = m => { addEvent(JSON.parse(m.data)); scheduleRefresh(); };
  es.addEventListener("gone", m => {
    // The node no longer keeps where this page was: start over.
    es.close();
    document.getElementById("events").replaceChildren();
    setStatus(m.data, "down");
    setTimeout(follow, 1000);
  });
  es.onerror = () => setStatus("reconnecting…", "down");
}

refresh();
follow();
