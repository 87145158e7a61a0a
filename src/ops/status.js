// Keeps the status page live from /events (Server-Sent Events). It writes text only
// (textContent), never markup: nothing an agent's name or error says can become HTML.
"use strict";
(function () {
  const STATES = ["connected", "connecting", "backing_off", "failed", "pending"];
  const body = document.body;
  const filter = body.dataset.filter || "";
  const rows = document.querySelector("#agents tbody");
  const live = document.getElementById("live");
  // Every agent's state as the stream reports it, for the counts; the rendered rows start it.
  const states = new Map();
  for (const row of rows.rows) {
    states.set(row.id.slice("agent-".length), row.dataset.state);
  }
  let total = Number(body.dataset.total) || 0;

  function counts() {
    const tally = Object.fromEntries(STATES.map((s) => [s, 0]));
    for (const state of states.values()) {
      if (state in tally) tally[state] += 1;
    }
    // Agents neither rendered nor reported yet (a filtered page) keep their server count.
    const known = states.size;
    if (filter === "" || known >= total) {
      tally.pending += Math.max(0, total - known);
      for (const state of STATES) {
        document.getElementById("count-" + state).textContent = tally[state];
      }
    }
  }

  function cell(text, small) {
    const td = document.createElement("td");
    td.textContent = text;
    if (small) {
      const s = document.createElement("small");
      s.textContent = small;
      td.append(" ", s);
    }
    return td;
  }

  function newRow(change) {
    const tr = document.createElement("tr");
    tr.id = "agent-" + change.agent_id;
    const url = document.createElement("code");
    url.textContent = change.url;
    const urlCell = document.createElement("td");
    urlCell.append(url);
    const stateCell = document.createElement("td");
    stateCell.append(document.createElement("span"));
    tr.append(
      cell(change.project_path || ""),
      cell(change.agent_name || "", "#" + change.agent_id),
      urlCell,
      stateCell,
      cell(""),
      cell(""),
      cell("")
    );
    tr.cells[4].className = "error";
    tr.cells[5].className = "since";
    tr.cells[6].className = "replica";
    rows.append(tr);
    return tr;
  }

  function apply(change) {
    const id = String(change.agent_id);
    // A new agent, on a page that lists them all.
    if (!states.has(id) && filter === "" && states.size >= total) total += 1;
    states.set(id, change.state);
    let tr = document.getElementById("agent-" + id);
    if (!tr) {
      if (filter !== "" && filter !== change.state) return;
      tr = newRow(change);
    }
    const before = tr.dataset.state;
    tr.dataset.state = change.state;
    const badge = tr.cells[3].firstElementChild;
    badge.className = "state " + change.state;
    badge.textContent = change.state.replace("_", " ");
    const error = tr.cells[4];
    error.textContent = change.last_error;
    if (change.last_error && change.last_error_at) {
      const at = document.createElement("small");
      at.textContent = "(" + change.last_error_at + ")";
      error.append(" ", at);
    }
    tr.cells[5].textContent = change.connected_since || "";
    tr.cells[6].textContent = change.replica;
    if (before !== change.state) {
      tr.classList.remove("changed");
      void tr.offsetWidth;
      tr.classList.add("changed");
    }
  }

  if (!window.EventSource) return;
  const source = new EventSource("/events");
  source.addEventListener("open", () => {
    live.className = "on";
    live.textContent = "live";
  });
  source.addEventListener("error", () => {
    live.className = "off";
    live.textContent = "reconnecting…";
  });
  source.addEventListener("state", (message) => {
    apply(JSON.parse(message.data));
    counts();
  });
})();
