// The console's task page, live: follows GET /api/tasks/{id}/events/ (Server-Sent
// Events) and adds each audit event to the timeline, each finished step to the duration
// bars, refreshes the "why" panel from the task's diagnosis, and shows a reply growing
// as the model streams it (model_delta events). No framework, no CDN.
(function () {
  "use strict";
  var configNode = document.getElementById("task-live-config");
  if (!configNode || !window.EventSource) { return; }
  var config = JSON.parse(configNode.textContent);
  var lastSeq = config.after;
  var liveState = document.getElementById("live-state");
  var refreshTimer = null;

  function el(tag, text, className) {
    var node = document.createElement(tag);
    if (text !== undefined && text !== null) { node.textContent = String(text); }
    if (className) { node.className = className; }
    return node;
  }

  function clock(iso) {
    return iso ? iso.replace("T", " ").replace(/([+-]\d\d:\d\d|Z)$/, "") : "";
  }

  function msText(ms) {
    if (ms < 1) { return ms.toFixed(3) + " ms"; }
    if (ms < 1000) { return ms.toFixed(1) + " ms"; }
    if (ms < 60000) { return (ms / 1000).toFixed(2) + " s"; }
    return Math.floor(ms / 60000) + " min " + Math.round((ms % 60000) / 1000) + " s";
  }

  function setLive(text) {
    if (liveState) { liveState.hidden = false; liveState.textContent = text; }
  }

  function addTimelineRow(data) {
    if (!config.follow_timeline) { return; }
    var body = document.getElementById("timeline-rows");
    if (!body) { return; }
    var empty = body.querySelector(".agents-timeline-empty");
    if (empty) { empty.remove(); }
    var row = el("tr", null, "event-" + data.type + " agents-new");
    row.dataset.seq = data.seq;
    [data.seq, clock(data.created_at), data.step === null ? "" : data.step, data.type,
      data.actor, data.summary].forEach(function (value) { row.appendChild(el("td", value)); });
    body.appendChild(row);
    var heading = document.getElementById("timeline-heading");
    if (heading) {
      heading.textContent = "Audit timeline: events " + heading.dataset.first + " to " +
        data.seq + " of " + data.seq;
    }
  }

  function rescaleBars(body) {
    var rows = body.querySelectorAll("tr.agents-step");
    var longest = 0;
    rows.forEach(function (row) { longest = Math.max(longest, parseFloat(row.dataset.ms) || 0); });
    rows.forEach(function (row) {
      var ms = parseFloat(row.dataset.ms) || 0;
      var bar = row.querySelector(".agents-bar");
      var percent = longest > 0 ? Math.max(ms / longest * 100, 0.5) : 0.5;
      if (bar) { bar.style.width = percent.toFixed(2) + "%"; }
    });
  }

  function addStepBar(data) {
    var body = document.querySelector("#step-bars tbody");
    if (!body) { return; }
    var empty = body.querySelector(".agents-step-empty");
    if (empty) { empty.remove(); }
    var ms = Number(data.payload.duration_ms) || 0;
    var rows = body.querySelectorAll("tr.agents-step");
    var waited = "";
    if (rows.length) {
      var previousEnd = Date.parse(rows[rows.length - 1].dataset.ended || "");
      var started = Date.parse(data.created_at) - ms;
      if (!isNaN(previousEnd)) { waited = msText(Math.max(started - previousEnd, 0)); }
    }
    var outcome = data.payload.outcome || "";
    var row = el("tr", null, "agents-step agents-new");
    row.dataset.seq = data.seq;
    row.dataset.ms = ms;
    row.dataset.ended = data.created_at;
    row.appendChild(el("td", data.step));
    row.appendChild(el("td", outcome));
    row.appendChild(el("td", msText(ms), "agents-num"));
    var cell = el("td", null, "agents-bar-col");
    cell.appendChild(el("div", null, "agents-bar agents-bar--" + outcome));
    row.appendChild(cell);
    row.appendChild(el("td", waited, "agents-num"));
    row.appendChild(el("td", clock(data.created_at).slice(11)));
    body.appendChild(row);
    rescaleBars(body);
  }

  function setStatus(status) {
    var badge = document.getElementById("task-status");
    if (!badge) { return; }
    badge.textContent = status;
    badge.className = "agents-badge agents-badge--" + status;
  }

  function fact(id, text) {
    var node = document.querySelector("#" + id + " dd");
    if (node) { node.textContent = text; }
  }

  var FINAL = ["completed", "failed", "timed_out", "cancelled"];

  function showDiagnosis(d) {
    setStatus(d.status);
    // What the page offered for the old status no longer applies.
    if (d.status !== "suspended") {
      var decide = document.getElementById("decide");
      if (decide) { decide.hidden = true; }
    }
    if (FINAL.indexOf(d.status) >= 0) {
      document.querySelectorAll("#operate form").forEach(function (form) { form.hidden = true; });
    }
    var summary = document.getElementById("why-summary");
    if (summary) { summary.textContent = d.summary; }
    var why = document.getElementById("why");
    if (why) {
      why.className = "agents-why agents-why--" + d.status +
        (d.waiting_on ? " agents-why--wait-" + d.waiting_on.kind : "");
    }
    var w = d.waiting_on;
    fact("why-waiting-on", w ? (w.kind === "retry" || w.kind === "worker" ? w.kind + ": " : "") + w.detail + (w.since ? " (since " + clock(w.since) + ")" : "") +
      (w.until ? " until " + clock(w.until) : "") : "nothing: the task has ended");
    var e = d.last_error;
    fact("why-last-error", e ? e.message + " (" + e.type + (e.step ? ", step " + e.step : "") + ")" : "none");
    fact("why-attempt", d.attempt + " failed");
    fact("why-next-retry", d.next_retry_at ? clock(d.next_retry_at) : "none scheduled");
    var b = d.open_breaker;
    fact("why-breaker", b ? b.name + ": " + b.state + (b.forced ? ", held open by an operator" : "") : "none in the way");
  }

  // At most one fetch of the diagnosis per 250 ms; an answer older than one already
  // shown is dropped (answers can arrive out of order).
  var asked = 0;
  var shown = 0;
  function refreshWhy() {
    if (refreshTimer) { return; }
    refreshTimer = setTimeout(function () {
      refreshTimer = null;
      var ticket = ++asked;
      fetch(config.task_url, { credentials: "same-origin", headers: { Accept: "application/json" } })
        .then(function (response) { return response.ok ? response.json() : null; })
        .then(function (task) {
          if (task && task.diagnosis && ticket > shown) { shown = ticket; showDiagnosis(task.diagnosis); }
        })
        .catch(function () { /* the next event tries again */ });
    }, 250);
  }

  function onEvent(message) {
    var data = JSON.parse(message.data);
    if (data.seq <= lastSeq) { return; }
    lastSeq = data.seq;
    addTimelineRow(data);
    if (data.type === "step") { addStepBar(data); }
    if (data.type === "transition" && data.payload.to) { setStatus(data.payload.to); }
    refreshWhy();
  }

  // A reply streaming from the model ("stream": true): its pieces (model_delta, not
  // audit events) grow the panel until the reply's model_call event is recorded.
  var replyKey = null;
  function onDelta(message) {
    var d = JSON.parse(message.data);
    var panel = document.getElementById("reply-live");
    var text = document.getElementById("reply-live-text");
    if (!panel || !text) { return; }
    if (d.key !== replyKey) {
      replyKey = d.key;
      text.textContent = "";
      document.getElementById("reply-live-step").textContent = d.step;
      document.getElementById("reply-live-state").textContent = "streaming";
    }
    panel.hidden = false;
    text.textContent += d.delta;
  }

  function onReplyRecorded(message) {
    var data = JSON.parse(message.data);
    if (replyKey && data.payload && data.payload.key === replyKey) {
      document.getElementById("reply-live-state").textContent = "recorded";
    }
  }

  var source = new EventSource(config.events_url + "?last_event_id=" + lastSeq);
  source.addEventListener("model_delta", onDelta);
  source.addEventListener("model_call", onReplyRecorded);
  config.event_types.forEach(function (type) { source.addEventListener(type, onEvent); });
  source.addEventListener("end", function (message) {
    source.close();
    var data = JSON.parse(message.data);
    setLive("the task has ended: " + data.status);
    refreshWhy();
  });
  source.onopen = function () { setLive("live: following the task's events"); };
  source.onerror = function () {
    if (source.readyState === EventSource.CLOSED) { setLive("live updates stopped; reload to see more"); }
    else { setLive("live: reconnecting..."); }
  };
}());
