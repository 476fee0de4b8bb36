// The live page's script (GET /page.js), loaded by page.html; src/http/page.rs says what the
// page reads and calls. One closure, in sections: settings, text-only DOM helpers, fetching and
// actions (the admin token), views (the #fragment router), then each view: the overview (tree,
// queues, events, in-flight, charts), tasks (search and detail), dead letters, nodes.
"use strict";
(() => {
  // ---- Settings ---------------------------------------------------------------------------
  const POLL_MS = 1000;          // /actors, /queues and /health
  const FETCH_TIMEOUT_MS = 4000;
  const FEED_MAX = 150;          // events kept on the page
  const FEED_FLUSH_MS = 250;     // events are added in batches, at most this often
  const DETAIL_ROWS = 5;         // in-flight tasks / agents listed under a tree node
  const INFLIGHT_ROWS = 25;      // rows of the in-flight table
  const HISTORY_MS = 5000;       // /stats/history (the node samples every 5 s)
  const TASK_REFRESH_MS = 2000;  // an open task that has not ended
  const DLQ_REFRESH_MS = 3000;   // the dead letters on screen
  const NODES_REFRESH_MS = 2000; // /nodes while shown (every 10 s for the count otherwise)
  const SEARCH_LIMIT = 100;      // tasks asked of one search (the node answers at most 200)
  const TRACE_LIMIT = 50;        // tasks of one trace listed
  const DLQ_PAGE = 50;           // dead letters per page
  const REQUEUE_ALL = 10000;     // the most one "Requeue all" moves (the route's cap)
  const TOKEN_KEY = "rt.adminToken";
  const FINAL = new Set(["succeeded", "dead"]);
  // Every message of /events has an `event:` field, so onmessage never fires: listen per kind
  // (docs/http-api.md, "Live events").
  const KINDS = [
    "sent", "started", "succeeded", "retried", "deferred", "dead", "recovered",
    "actor_exited", "actor_restarted", "actor_start_failed", "actor_gave_up",
    "breaker_opened", "breaker_half_opened", "breaker_closed",
    "resource_misconfigured", "resource_restored",
    "pool_agent_starting", "pool_agent_idle", "pool_agent_assigned", "pool_agent_draining",
    "pool_agent_exited", "pool_agent_failed", "pool_backoff", "pool_fatal", "pool_reset",
  ];
  const ROUTINE = new Set(["sent", "started", "succeeded"]);
  const TASK_KINDS = new Set(["sent", "started", "succeeded", "retried", "deferred", "dead", "recovered"]);

  // ---- DOM helpers: text only -------------------------------------------------------------
  const $ = (id) => document.getElementById(id);
  /** An element with attributes (set with setAttribute) and children (strings become text nodes). */
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    setAttrs(node, attrs);
    append(node, children);
    return node;
  }
  /** An SVG element, the same way. */
  function svgEl(tag, attrs, ...children) {
    const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
    setAttrs(node, attrs);
    append(node, children);
    return node;
  }
  function setAttrs(node, attrs) {
    if (!attrs) return;
    for (const [k, v] of Object.entries(attrs)) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") node.setAttribute("class", String(v));
      else node.setAttribute(k, v === true ? "" : String(v));
    }
  }
  function append(node, children) {
    for (const c of children.flat()) {
      if (c === null || c === undefined || c === false) continue;
      node.appendChild(c instanceof Node ? c : document.createTextNode(String(c)));
    }
  }
  /** Replaces the children of `node` (text and elements built by `el`). */
  function setChildren(node, ...children) {
    node.replaceChildren();
    append(node, children);
  }
  function setText(node, text) {
    const t = String(text);
    if (node.textContent !== t) node.textContent = t;
  }
  function badge(text, tone) { return el("span", { class: "badge b-" + tone }, text); }
  /** Summary parts joined by a muted separator. */
  function joined(parts) {
    const out = [];
    for (const p of parts.filter((p) => p !== null && p !== undefined && p !== "")) {
      if (out.length) out.push(el("span", { class: "sep", "aria-hidden": "true" }, " · "));
      out.push(p);
    }
    return out;
  }
  function th(text, cls) { return el("th", { scope: "col", class: cls || null }, text); }
  /** A button that runs `onClick` (its `data-action` names it for tests and styles). */
  function button(label, action, onClick, attrs) {
    const b = el("button", { type: "button", class: "small", "data-action": action, ...(attrs || {}) }, label);
    b.addEventListener("click", (e) => { e.stopPropagation(); onClick(b); });
    return b;
  }

  // ---- Formatting -------------------------------------------------------------------------
  function duration(ms) {
    if (ms === null || ms === undefined || !isFinite(ms)) return "–";
    if (ms < 1000) return Math.round(ms) + " ms";
    const s = ms / 1000;
    if (s < 60) return s.toFixed(1) + " s";
    const m = Math.floor(s / 60), h = Math.floor(m / 60), d = Math.floor(h / 24);
    if (m < 60) return m + "m " + String(Math.floor(s % 60)).padStart(2, "0") + "s";
    if (h < 24) return h + "h " + String(m % 60).padStart(2, "0") + "m";
    return d + "d " + (h % 24) + "h";
  }
  const num = (n) => (typeof n === "number" ? n.toLocaleString("en-US") : "–");
  /** The page counts attempts from 1; an envelope's and an event's `attempt` count from 0. */
  const attemptNo = (attempt) => (typeof attempt === "number" ? num(attempt + 1) : "–");
  const shortId = (id) => (typeof id === "string" && id.length > 8 ? id.slice(0, 8) + "…" : String(id ?? "–"));
  const clock = (at) => (typeof at === "string" && at.length >= 19 ? at.slice(11, 23) : String(at ?? ""));
  const stamp = (at) => (typeof at === "string" && at.length >= 19 ? at.slice(0, 10) + " " + at.slice(11, 19) : String(at ?? "–"));
  const ago = (at) => { const t = Date.parse(at); return isFinite(t) ? duration(Math.max(0, Date.now() - t)) : "–"; };
  /** Pretty JSON of a value from the node, as text. */
  const pretty = (value) => JSON.stringify(value, null, 2);
  const STATUS_TONE = { running: "ok", starting: "info", restarting: "warn", stopping: "warn", stopped: "idle", failed: "bad" };
  const BREAKER_TONE = { closed: "ok", half_open: "warn", open: "bad" };
  const POOL_TONE = { ok: "ok", backoff: "warn", fatal: "bad" };
  const AGENT_TONE = { idle: "ok", starting: "info", assigned: "info", draining: "warn", exited: "idle", failed: "bad" };
  /** The states a task can be revoked in (`POST /tasks/{id}/revoke`): it has not ended. */
  const REVOCABLE = ["queued", "scheduled", "retrying", "running"];
  const TASK_TONE = { queued: "idle", scheduled: "info", running: "info", retrying: "warn", succeeded: "ok", dead: "bad" };
  const taskBadge = (state) => badge(state || "unknown", TASK_TONE[state] || "idle");
  /** The page's address of a task, a search, the dead letters of a queue. */
  const taskHref = (id) => "#/task/" + encodeURIComponent(id);
  const searchHref = (params) => "#/tasks?" + new URLSearchParams(params).toString();
  const dlqHref = (queue) => "#/dlq/" + encodeURIComponent(queue);
  const taskLink = (id, text) => el("a", { href: taskHref(id), class: "mono", title: id }, text ?? shortId(id));

  // ---- Fetching ---------------------------------------------------------------------------
  async function getJson(path) {
    const ctl = new AbortController();
    const timer = setTimeout(() => ctl.abort(), FETCH_TIMEOUT_MS);
    try {
      const res = await fetch(path, { signal: ctl.signal, cache: "no-store", headers: { Accept: "application/json" } });
      const body = await res.json();
      return { status: res.status, body };
    } finally {
      clearTimeout(timer);
    }
  }
  const path = (...parts) => "/" + parts.map((p) => encodeURIComponent(p)).join("/");

  // ---- Notices ----------------------------------------------------------------------------
  /** Says what an action did (or why not) in the live region under the header. */
  function notify(text, tone, link) {
    const n = $("notice");
    n.className = "notice" + (tone ? " " + tone : "");
    setChildren(n, text, link ? el("a", { href: link.href }, link.text) : null);
    n.hidden = false;
  }

  // ---- The admin token and actions --------------------------------------------------------
  // Kept in this tab's sessionStorage (gone when the tab closes), sent as a bearer token with
  // every mutating call. The node only says whether it wants one by answering 401.
  const token = {
    get() { try { return sessionStorage.getItem(TOKEN_KEY) || ""; } catch (_) { return ""; } },
    set(value) { try { sessionStorage.setItem(TOKEN_KEY, value); } catch (_) { /* storage off */ } showToken(); },
    forget() { try { sessionStorage.removeItem(TOKEN_KEY); } catch (_) { /* storage off */ } showToken(); },
  };
  function showToken() {
    const held = token.get() !== "";
    const s = $("token-state");
    s.className = "badge " + (held ? "b-ok" : "b-idle");
    setText(s, held ? "set (this tab)" : "not set");
    $("token-forget").hidden = !held;
    setText($("token-set"), held ? "Change…" : "Set token…");
  }

  /** Opens a modal dialog; `wire(finish)` hooks its buttons up (and returns how to unhook
   * them); resolves with the value `finish` is called with (Escape: false). */
  function modal(dialog, focus, wire) {
    return new Promise((resolve) => {
      let done = false;
      let unwire = () => {};
      const onCancel = (e) => { e.preventDefault(); finish(false); };
      function finish(value) {
        if (done) return;
        done = true;
        dialog.removeEventListener("cancel", onCancel);
        unwire();
        if (dialog.open) dialog.close();
        resolve(value);
      }
      dialog.addEventListener("cancel", onCancel);
      unwire = wire(finish);
      dialog.showModal();
      focus.focus();
    });
  }

  /** Asks for the admin token (`why`: the refusal that brought the dialog up); resolves true
   * when one was saved. */
  function askToken(why) {
    const dialog = $("token-dialog"), input = $("token-input"), form = $("token-form");
    const reason = $("token-why");
    reason.hidden = !why;
    setText(reason, why || "");
    input.value = "";
    return modal(dialog, input, (finish) => {
      const onSubmit = (e) => {
        e.preventDefault();
        if (!input.value) { input.focus(); return; }
        token.set(input.value);
        finish(true);
      };
      const onCancel = () => finish(false);
      form.addEventListener("submit", onSubmit);
      $("token-cancel").addEventListener("click", onCancel);
      return () => {
        form.removeEventListener("submit", onSubmit);
        $("token-cancel").removeEventListener("click", onCancel);
      };
    });
  }

  /** Asks before an action that cannot be undone; resolves true to go on. */
  function confirmAction(heading, text, ok) {
    const dialog = $("confirm-dialog"), form = $("confirm-form");
    setText($("confirm-heading"), heading);
    setText($("confirm-text"), text);
    setText($("confirm-ok"), ok);
    return modal(dialog, $("confirm-cancel"), (finish) => {
      const onSubmit = (e) => { e.preventDefault(); finish(true); };
      const onCancel = () => finish(false);
      form.addEventListener("submit", onSubmit);
      $("confirm-cancel").addEventListener("click", onCancel);
      return () => {
        form.removeEventListener("submit", onSubmit);
        $("confirm-cancel").removeEventListener("click", onCancel);
      };
    });
  }

  /**
   * Calls a mutating route with the admin token; `what` names the action in the notices.
   * A 401 says so and asks for the token (then tries once more with it); any other error is
   * shown with the node's message. `json`, when given, is sent as the request's JSON body.
   * Resolves with the JSON answer, or null when not done.
   */
  async function act(what, method, url, json) {
    for (let attempt = 0; attempt < 2; attempt++) {
      const held = token.get();
      const headers = { Accept: "application/json" };
      if (held) headers.Authorization = "Bearer " + held;
      const init = { method, headers, cache: "no-store" };
      if (json !== undefined) {
        headers["Content-Type"] = "application/json";
        init.body = JSON.stringify(json);
      }
      let res, body;
      try {
        res = await fetch(url, init);
        body = await res.json().catch(() => ({}));
      } catch (err) {
        notify(what + ": not done, the node cannot be reached (" + String((err && err.message) || err) + ")", "bad");
        return null;
      }
      if (res.status === 401) {
        const why = held
          ? what + ": refused (401): the node did not accept the admin token this tab held."
          : what + ": refused (401): this node needs its admin token for that.";
        if (held) token.forget();
        notify(why, "bad");
        if (attempt === 0 && await askToken(why)) continue;
        notify(why + " Not done.", "bad");
        return null;
      }
      if (!res.ok) {
        notify(what + ": not done (" + res.status + "): " + String((body && body.error) || res.statusText), "bad");
        return null;
      }
      return body;
    }
    return null;
  }

  $("token-set").addEventListener("click", async () => {
    if (await askToken(null)) notify("Admin token saved for this tab.", "ok");
  });
  $("token-forget").addEventListener("click", () => {
    token.forget();
    notify("Admin token forgotten.", null);
  });
  // ---- The tree ---------------------------------------------------------------------------
  const treeRoot = $("tree");
  const items = new Map();        // path → { li, row, parts…, group, detail }
  const collapsed = new Set();    // paths the user collapsed
  const lastRestarts = new Map(); // path → restarts seen, to flag a change
  let focusedPath = null;         // the one treeitem with tabindex=0 (roving tabindex)
  let rowIds = 0;

  function makeItem(node) {
    const rowId = "row-" + (++rowIds);
    const li = el("li", { role: "treeitem", tabindex: "-1", "aria-labelledby": rowId });
    li.dataset.path = node.path;
    const twisty = el("span", { class: "twisty", "aria-hidden": "true" });
    const name = el("span", { class: "name" });
    const kind = el("span", { class: "kind" });
    const status = el("span", { class: "badge" });
    const restarts = el("span", { class: "meta restarts", "data-field": "restarts" });
    const uptime = el("span", { class: "meta uptime" });
    const summary = el("span", { class: "summary" });
    const row = el("div", { class: "row", id: rowId }, twisty, name, kind, status, restarts, uptime, summary);
    const error = el("div", { class: "note", hidden: true });
    const degraded = el("div", { class: "note warn", hidden: true });
    const detail = el("div", { class: "detail", hidden: true });
    const group = el("ul", { role: "group" });
    li.append(row, degraded, error, detail, group);
    row.addEventListener("click", () => {
      focusItem(li);
      toggle(li);
    });
    li.addEventListener("focus", (e) => { if (e.target === li) setFocusPath(li.dataset.path); });
    return { li, row, twisty, name, kind, status, restarts, uptime, summary, error, degraded, detail, group };
  }

  /** Renders `nodes` into `ul` (level = aria-level), reusing the elements of known paths. */
  function renderLevel(ul, nodes, level, seen) {
    let i = 0;
    for (const node of nodes) {
      seen.add(node.path);
      let item = items.get(node.path);
      if (!item) { item = makeItem(node); items.set(node.path, item); }
      if (ul.children[i] !== item.li) ul.insertBefore(item.li, ul.children[i] || null);
      updateItem(item, node, level);
      renderLevel(item.group, node.children || [], level + 1, seen);
      i++;
    }
    while (ul.children.length > i) ul.removeChild(ul.lastChild);
  }

  function updateItem(item, node, level) {
    const { li } = item;
    li.setAttribute("aria-level", String(level));
    setText(item.name, node.name);
    setText(item.kind, node.kind);
    item.status.className = "badge b-" + (STATUS_TONE[node.status] || "idle");
    setText(item.status, node.status);
    const r = node.restarts ?? 0;
    setText(item.restarts, r === 1 ? "1 restart" : r + " restarts");
    li.dataset.restarts = String(r);
    li.dataset.status = node.status;
    const before = lastRestarts.get(node.path);
    if (before !== undefined && r > before) item.restarts.classList.add("bumped");
    lastRestarts.set(node.path, r);
    setText(item.uptime, node.status === "running" && typeof node.uptime_secs === "number" ? "up " + duration(node.uptime_secs * 1000) : "");
    setChildren(item.summary, summarize(node));

    item.error.hidden = !node.last_error;
    if (node.last_error) setText(item.error, "last error: " + node.last_error);
    item.degraded.hidden = !node.degraded;
    if (node.degraded) setText(item.degraded, "degraded: " + node.degraded);

    const detail = details(node);
    const hasChildren = (node.children || []).length > 0;
    const expandable = hasChildren || detail !== null;
    const expanded = expandable && !collapsed.has(node.path);
    if (expandable) li.setAttribute("aria-expanded", String(expanded));
    else li.removeAttribute("aria-expanded");
    setText(item.twisty, expandable ? (expanded ? "▾" : "▸") : "");
    item.group.hidden = !expanded || !hasChildren;
    item.detail.hidden = !expanded || detail === null;
    if (detail === null) item.detail.replaceChildren();
    else if (expanded) setChildren(item.detail, detail);
  }

  /** One line about the kind-specific snapshot. */
  function summarize(node) {
    const s = node.snapshot;
    if (node.kind === "supervisor") {
      const n = (node.children || []).length;
      return n ? [n === 1 ? "1 child" : n + " children"] : [];
    }
    if (!s || typeof s !== "object") return [];
    switch (node.kind) {
      case "consumer": {
        const running = Array.isArray(s.running) ? s.running.length : 0;
        const o = s.outcomes || {};
        return joined([
          el("span", null, "running " + running + "/" + num(s.concurrency), bar(running, s.concurrency)),
          "waiting " + num(s.waiting),
          "succeeded " + num(o.succeeded),
          "retried " + num(o.retried),
          "dead " + num(o.dead),
          s.draining ? badge("draining", "warn") : null,
        ]);
      }
      case "pool": {
        const c = s.counts || {};
        const states = ["idle", "starting", "assigned", "draining", "failed"]
          .filter((k) => k === "idle" || c[k] > 0)
          .map((k) => k + " " + num(c[k]));
        return joined([
          badge(s.health || "?", POOL_TONE[s.health] || "idle"),
          ...states,
          "max " + num(s.max),
          s.waiting_claims > 0 ? "waiting claims " + num(s.waiting_claims) : null,
          s.reason ? s.reason : null,
        ]);
      }
      case "broker": {
        const b = s.broker || {};
        return joined([
          [b.kind, b.connection].filter(Boolean).join(" "),
          "leases " + num(s.leases_held),
          "recovered " + num(s.recovered),
          s.leases_lost > 0 ? "leases lost " + num(s.leases_lost) : null,
        ]);
      }
      case "heartbeat":
        return joined([
          "lag " + (typeof s.lag_ms === "number" ? s.lag_ms.toFixed(1) : "–") + " ms",
          "max " + (typeof s.max_lag_ms === "number" ? s.max_lag_ms.toFixed(1) : "–") + " ms",
          "beats " + num(s.beats),
        ]);
      case "openai": {
        const c = s.calls || {}, l = s.limits || {};
        return joined([
          "in flight " + num(c.in_flight),
          "waiting " + num(c.waiting),
          l.requests_per_minute ? num(l.requests_per_minute) + " req/min" : null,
          l.tokens_per_minute ? num(l.tokens_per_minute) + " tok/min" : null,
          s.rate_limited_429 > 0 ? "429s " + num(s.rate_limited_429) : null,
          s.api_key_set === false ? badge("no API key", "bad") : null,
          s.auth && s.auth.misconfigured ? badge("misconfigured " + num(s.auth.status), "bad") : null,
        ]);
      }
    }
    if (s.breaker && typeof s.breaker === "object") {
      const b = s.breaker;
      const backlog = s.replay && typeof s.replay.backlog === "number" ? s.replay.backlog : 0;
      return joined([
        s.auth && s.auth.misconfigured ? badge("misconfigured " + num(s.auth.status), "bad") : null,
        el("span", null, "breaker ", badge(String(b.state).replace("_", "-"), BREAKER_TONE[b.state] || "idle")),
        b.state === "open" && typeof b.time_until_half_open_ms === "number" ? "half-open in " + duration(b.time_until_half_open_ms) : null,
        "failures " + num(b.consecutive_failures) + (b.policy ? "/" + num(b.policy.failure_threshold) : ""),
        "rejected " + num(b.rejected),
        backlog > 0 ? "replay backlog " + num(backlog) : null,
      ]);
    }
    return [];
  }

  function bar(value, max) {
    if (typeof max !== "number" || max <= 0) return null;
    const pct = Math.max(0, Math.min(100, (100 * value) / max));
    const outer = el("span", { class: "bar", "aria-hidden": "true" });
    const inner = el("span");
    inner.style.width = pct.toFixed(0) + "%";
    outer.appendChild(inner);
    return outer;
  }

  /** What a node shows when expanded besides its children, or null. */
  function details(node) {
    const s = node.snapshot;
    if (!s || typeof s !== "object") return null;
    if (node.kind === "consumer") {
      const running = (Array.isArray(s.running) ? s.running.slice() : []).sort((a, b) => (b.elapsed_ms || 0) - (a.elapsed_ms || 0));
      if (!running.length) return el("p", { class: "empty" }, "no task running");
      const rows = running.slice(0, DETAIL_ROWS).map((t) =>
        el("tr", null,
          el("td", { title: t.task }, t.task),
          el("td", { class: "mono", title: t.id }, shortId(t.id)),
          el("td", { class: "num" }, attemptNo(t.attempt)),
          el("td", { class: "num" }, duration(t.elapsed_ms)),
          el("td", { class: "num" }, duration(t.deadline_in_ms))));
      const more = running.length > DETAIL_ROWS ? " (the " + DETAIL_ROWS + " longest shown)" : "";
      return el("table", { class: "data running" },
        el("caption", null, running.length + " running" + more),
        el("thead", null, el("tr", null, th("task"), th("id"), th("attempt", "num"), th("elapsed", "num"), th("deadline in", "num"))),
        el("tbody", null, rows));
    }
    if (node.kind === "pool" && Array.isArray(s.agents)) {
      if (!s.agents.length) return el("p", { class: "empty" }, "no agent alive");
      const rows = s.agents.slice(0, DETAIL_ROWS).map((a) =>
        el("tr", null,
          el("td", { title: a.id }, a.id),
          el("td", { class: "num" }, String(a.pid ?? "–")),
          el("td", null, badge(a.state, AGENT_TONE[a.state] || "idle")),
          el("td", { class: "num" }, duration((a.age_secs ?? NaN) * 1000)),
          el("td", { class: "num" }, a.rss_mb === null || a.rss_mb === undefined ? "–" : num(a.rss_mb) + " MB")));
      const more = s.agents.length > DETAIL_ROWS ? " (first " + DETAIL_ROWS + " shown)" : "";
      return el("table", { class: "data agents" },
        el("caption", null, s.agents.length + (s.agents.length === 1 ? " agent" : " agents") + more),
        el("thead", null, el("tr", null, th("agent"), th("pid", "num"), th("state"), th("age", "num"), th("RSS", "num"))),
        el("tbody", null, rows));
    }
    if (s.auth && typeof s.auth === "object" && s.auth.misconfigured && s.auth.reason) {
      return el("p", { class: "note" }, "misconfigured: " + s.auth.reason);
    }
    if (s.breaker && typeof s.breaker === "object" && s.breaker.state !== "closed" && s.breaker.last_reason) {
      return el("p", { class: "note" }, "breaker " + String(s.breaker.state).replace("_", "-") + ": " + s.breaker.last_reason);
    }
    return null;
  }

  // Keyboard: the WAI-ARIA tree pattern with a roving tabindex.
  function visibleItems() {
    return Array.from(treeRoot.querySelectorAll('[role="treeitem"]')).filter((li) => {
      for (let g = li.parentElement; g && g !== treeRoot; g = g.parentElement) if (g.hidden) return false;
      return true;
    });
  }
  function setFocusPath(path) {
    focusedPath = path;
    for (const { li } of items.values()) li.tabIndex = li.dataset.path === path ? 0 : -1;
  }
  function focusItem(li) {
    if (!li) return;
    setFocusPath(li.dataset.path);
    li.focus();
  }
  function toggle(li, open) {
    if (!li.hasAttribute("aria-expanded")) return;
    const path = li.dataset.path;
    const willOpen = open === undefined ? collapsed.has(path) : open;
    if (willOpen) collapsed.delete(path); else collapsed.add(path);
    if (lastTree) renderTree(lastTree);
  }
  treeRoot.addEventListener("keydown", (e) => {
    const li = e.target.closest('[role="treeitem"]');
    if (!li || e.altKey || e.ctrlKey || e.metaKey) return;
    const list = visibleItems();
    const at = list.indexOf(li);
    const expanded = li.getAttribute("aria-expanded");
    let handled = true;
    switch (e.key) {
      case "ArrowDown": focusItem(list[at + 1]); break;
      case "ArrowUp": focusItem(list[at - 1]); break;
      case "Home": focusItem(list[0]); break;
      case "End": focusItem(list[list.length - 1]); break;
      case "ArrowRight":
        if (expanded === "false") toggle(li, true);
        else if (expanded === "true") { const first = li.querySelector(':scope > ul > [role="treeitem"]'); if (first) focusItem(first); }
        break;
      case "ArrowLeft":
        if (expanded === "true") toggle(li, false);
        else focusItem(li.parentElement.closest('[role="treeitem"]'));
        break;
      case "Enter": case " ": toggle(li); break;
      default: handled = false;
    }
    if (handled) e.preventDefault();
  });

  let lastTree = null;
  let rootStartedAt = null;
  function renderTree(nodes) {
    lastTree = nodes;
    const seen = new Set();
    renderLevel(treeRoot, nodes, 1, seen);
    for (const path of Array.from(items.keys())) if (!seen.has(path)) { items.delete(path); lastRestarts.delete(path); }
    $("tree-empty").hidden = seen.size > 0;
    if (!seen.size) setText($("tree-empty"), "The node lists no actor.");
    setText($("tree-count"), seen.size + (seen.size === 1 ? " actor" : " actors"));
    if (!focusedPath || !items.has(focusedPath)) {
      const first = treeRoot.querySelector('[role="treeitem"]');
      if (first) setFocusPath(first.dataset.path);
    }
    // A node restarted (memory:// restarts its event ids): open the feed from the new stream.
    const root = nodes[0];
    if (root && root.started_at) {
      if (rootStartedAt !== null && root.started_at !== rootStartedAt) events.restart();
      rootStartedAt = root.started_at;
    }
  }

  // ---- Queues and in-flight tasks ---------------------------------------------------------
  function consumers(nodes, out = []) {
    for (const n of nodes) {
      if (n.kind === "consumer" && n.snapshot && typeof n.snapshot === "object") out.push(n);
      consumers(n.children || [], out);
    }
    return out;
  }

  /** The queues of the node as `GET /queues` last answered (name → depths), for every view. */
  let lastQueues = {};
  let queuesLoaded = false;
  // One row per queue, kept across updates so that its buttons stay under the pointer.
  const queueRows = new Map();

  function queueRow(name) {
    let row = queueRows.get(name);
    if (row) return row;
    const link = el("a", { href: dlqHref(name), title: "dead letters of " + name }, name);
    const cells = [0, 1, 2, 3, 4].map(() => el("td", { class: "num" }));
    const purge = button("Purge…", "purge-queue", () => purgeQueue(name), {
      class: "small danger purge", "aria-label": "Purge queue " + name,
    });
    const act = el("td", { class: "act" }, purge);
    const tr = el("tr", { "data-queue": name }, el("th", { scope: "row", title: name }, link), ...cells, act);
    row = { tr, cells, act, error: el("td", { colspan: "5" }) };
    queueRows.set(name, row);
    return row;
  }

  function renderQueues(queues, nodes) {
    const byQueue = new Map(consumers(nodes).map((c) => [c.snapshot.queue || c.name, c.snapshot]));
    const tbody = $("queues").tBodies[0];
    const names = Object.keys(queues || {});
    const trs = names.map((name) => {
      const q = queues[name];
      const row = queueRow(name);
      if (q.error) {
        // This queue's depth could not be read; the others still show.
        row.tr.className = "hot";
        row.error.title = q.error;
        setText(row.error, "cannot read: " + q.error);
        row.tr.replaceChildren(row.tr.firstChild, row.error, row.act);
        return row.tr;
      }
      if (row.tr.children[1] !== row.cells[0]) row.tr.replaceChildren(row.tr.firstChild, ...row.cells, row.act);
      const snap = byQueue.get(name);
      const running = snap && Array.isArray(snap.running) ? snap.running.length : 0;
      row.tr.className = q.dead > 0 ? "hot" : "";
      const [ready, delayed, inFlight, dead, run] = row.cells;
      setText(ready, num(q.ready));
      setText(delayed, num(q.delayed));
      setText(inFlight, num(q.in_flight));
      setText(dead, num(q.dead));
      setChildren(run, running + " / " + num(q.concurrency), bar(running, q.concurrency));
      return row.tr;
    });
    for (const name of Array.from(queueRows.keys())) if (!(name in (queues || {}))) queueRows.delete(name);
    if (!trs.length) {
      setChildren(tbody, el("tr", null, el("td", { colspan: "7", class: "empty" }, "no queue configured")));
      return;
    }
    trs.forEach((tr, i) => { if (tbody.children[i] !== tr) tbody.insertBefore(tr, tbody.children[i] || null); });
    while (tbody.children.length > trs.length) tbody.removeChild(tbody.lastChild);
  }

  async function purgeQueue(name) {
    const q = lastQueues[name] || {};
    const sure = await confirmAction(
      "Purge queue " + name + "?",
      "Every ready and delayed entry of " + name + " is removed (now " + num(q.ready) + " ready, " +
        num(q.delayed) + " delayed). Running tasks finish; dead letters stay. This cannot be undone.",
      "Purge " + name);
    if (!sure) return;
    const done = await act("Purge " + name, "POST", path("queues", name, "purge"));
    if (done) {
      const p = done.purged || {};
      notify("Purged " + name + ": " + num(p.ready) + " ready and " + num(p.delayed) + " delayed entries removed.", "ok");
      pollSoon();
    }
  }

  function renderInflight(nodes) {
    const all = [];
    for (const c of consumers(nodes)) {
      for (const t of Array.isArray(c.snapshot.running) ? c.snapshot.running : []) all.push({ queue: c.snapshot.queue || c.name, ...t });
    }
    all.sort((a, b) => (b.elapsed_ms || 0) - (a.elapsed_ms || 0));
    const rows = all.slice(0, INFLIGHT_ROWS).map((t) =>
      el("tr", null,
        el("td", { title: t.queue }, t.queue),
        el("td", { title: t.task }, t.task),
        el("td", null, taskLink(t.id)),
        el("td", { class: "num" }, attemptNo(t.attempt)),
        el("td", { class: "num" }, duration(t.elapsed_ms)),
        el("td", { class: "num" }, duration(t.deadline_in_ms))));
    setChildren($("inflight").tBodies[0], rows);
    $("inflight").hidden = all.length === 0;
    $("inflight-empty").hidden = all.length > 0;
    setText($("inflight-count"), all.length ? all.length + " on this node" + (all.length > INFLIGHT_ROWS ? ", the " + INFLIGHT_ROWS + " longest shown" : "") : "");
  }

  /** What every view shows from the queues: the dead-letter count in the navigation, the
   * queue pickers of the search and the dead letters. */
  function queuesChanged(queues) {
    lastQueues = queues || {};
    const first = !queuesLoaded;
    queuesLoaded = true;
    let dead = 0;
    for (const q of Object.values(lastQueues)) dead += typeof q.dead === "number" ? q.dead : 0;
    const total = $("dead-total");
    total.className = "count" + (dead > 0 ? " hot" : "");
    setText(total, dead > 0 ? num(dead) : "");
    fillQueueSelect(document.querySelector('#search select[name="queue"]'), "any");
    fillQueueSelect($("chart-queue"), "all queues");
    if (currentView === "dlq") {
      // Opened at #/dlq before the queues were known: pick one now.
      if (first && !dlqView.queue) dlqView.enter(null);
      else renderQueuePick();
    }
  }
  function fillQueueSelect(select, anyLabel) {
    const names = Object.keys(lastQueues);
    const have = Array.from(select.options).slice(1).map((o) => o.value);
    if (have.join("\n") === names.join("\n")) return;
    const value = select.value;
    setChildren(select, el("option", { value: "" }, anyLabel), names.map((n) => el("option", { value: n }, n)));
    select.value = names.includes(value) ? value : "";
  }

  // ---- Polling ----------------------------------------------------------------------------
  let lastOk = 0;
  let reachable = null;
  let pollTimer = null;
  function setConn(ok, why) {
    if (ok === reachable) return;
    reachable = ok;
    setText($("conn"), ok ? "connected" : "cannot reach the node (" + why + "); retrying");
  }

  /** /queues and /health always; the tree only while the overview shows. */
  async function poll() {
    clearTimeout(pollTimer);
    try {
      const tree = currentView === "overview";
      const [queues, health, actors] = await Promise.all([
        getJson("/queues"), getJson("/health"), tree ? getJson("/actors") : Promise.resolve(null)]);
      if (actors) {
        if (actors.status !== 200 || !Array.isArray(actors.body)) throw new Error("/actors answered " + actors.status);
        renderTree(actors.body);
        renderInflight(actors.body);
      }
      if (queues.status === 200) {
        queuesChanged(queues.body.queues);
        if (actors) renderQueues(queues.body.queues, actors.body);
      } else if (queues.status >= 500) {
        throw new Error("/queues answered " + queues.status);
      }
      renderHealth(health);
      lastOk = Date.now();
      setConn(true);
    } catch (err) {
      setConn(false, err && err.name === "AbortError" ? "timed out" : String((err && err.message) || err));
      const h = $("health");
      h.className = "badge b-idle";
      setText(h, "unknown");
    } finally {
      pollTimer = setTimeout(poll, POLL_MS);
    }
  }
  /** Polls at once (after an action), not at the next tick. */
  function pollSoon() { clearTimeout(pollTimer); pollTimer = setTimeout(poll, 50); }

  function renderHealth(health) {
    const h = $("health");
    const ok = health.status === 200;
    h.className = "badge " + (ok ? "b-ok" : "b-bad");
    setText(h, ok ? "ok" : "unhealthy");
    const problems = (!ok && health.body && Array.isArray(health.body.problems)) ? health.body.problems : [];
    const ul = $("problems");
    ul.hidden = problems.length === 0;
    setChildren(ul, problems.map((p) => el("li", null, p)));
  }

  setInterval(() => {
    setText($("updated"), lastOk ? "updated " + duration(Date.now() - lastOk) + " ago" : "");
  }, 500);

  // ---- Events -----------------------------------------------------------------------------
  const feed = $("feed");
  const pending = [];        // received, not yet on the page
  let paused = false;
  let received = 0;

  function category(kind) {
    if (TASK_KINDS.has(kind)) return "task";
    if (kind.startsWith("actor_")) return "actor";
    if (kind.startsWith("breaker_") || kind.startsWith("resource_")) return "breaker";
    if (kind.startsWith("pool_")) return "pool";
    return "other";
  }
  function tone(kind) {
    if (["dead", "actor_exited", "actor_start_failed", "actor_gave_up", "breaker_opened", "resource_misconfigured", "pool_agent_failed", "pool_fatal"].includes(kind)) return "bad";
    if (["retried", "deferred", "recovered", "breaker_half_opened", "pool_backoff", "pool_agent_draining"].includes(kind)) return "warn";
    if (["succeeded", "actor_restarted", "breaker_closed", "resource_restored", "pool_agent_idle", "pool_reset"].includes(kind)) return "ok";
    if (["started", "pool_agent_assigned", "pool_agent_starting"].includes(kind)) return "info";
    return "idle";
  }
  function shown(kind) {
    const f = $("filter").value;
    if (f === "notable") return !ROUTINE.has(kind);
    if (f === "actors") return !TASK_KINDS.has(kind);
    return true;
  }

  function eventItem(ev) {
    const d = ev.detail && typeof ev.detail === "object" ? ev.detail : {};
    let what, why = null;
    switch (category(ev.kind)) {
      case "task":
        what = [[ev.queue, ev.task].filter(Boolean).join(" · ")];
        if (ev.task_id) what.push(" · ", taskLink(ev.task_id));
        if (typeof d.attempt === "number" && ev.kind !== "sent") what.push(" · attempt " + (d.attempt + 1));
        why = d.error || d.reason || null;
        break;
      case "actor":
        what = String(d.path ?? "?") + (d.kind ? " (" + d.kind + ")" : "");
        if (ev.kind === "actor_restarted" && typeof d.restarts === "number") what += " · restarts " + d.restarts;
        why = d.reason || d.error || null;
        break;
      case "breaker":
        what = String(d.resource ?? "?") + (d.from && d.to ? " · " + d.from + " → " + d.to : "");
        if (typeof d.open_for_ms === "number") what += " · open for " + duration(d.open_for_ms);
        if (typeof d.status === "number") what += " · " + d.status;
        why = d.reason || null;
        break;
      case "pool":
        what = [d.pool, d.agent, d.pid !== undefined && d.pid !== null ? "pid " + d.pid : null].filter(Boolean).join(" · ");
        if (typeof d.failures === "number") what += " · failures " + d.failures;
        why = d.reason || null;
        break;
      default:
        what = JSON.stringify(d);
    }
    const li = el("li", { "data-kind": ev.kind, "data-id": ev.id },
      el("time", { datetime: ev.at }, clock(ev.at)),
      el("span", { class: "kindcell" }, badge(ev.kind, tone(ev.kind))),
      el("span", { class: "what" }, what,
        why ? el("span", { class: "why" + (tone(ev.kind) === "bad" ? " bad" : "") }, String(why)) : null));
    return li;
  }

  function flush() {
    if (paused || !pending.length) return;
    const batch = pending.splice(0, pending.length).filter((ev) => shown(ev.kind)).slice(-FEED_MAX);
    if (!batch.length) return;
    const frag = document.createDocumentFragment();
    for (let i = batch.length - 1; i >= 0; i--) frag.appendChild(eventItem(batch[i]));
    feed.insertBefore(frag, feed.firstChild);         // newest first
    while (feed.children.length > FEED_MAX) feed.removeChild(feed.lastChild);
  }
  setInterval(flush, FEED_FLUSH_MS);

  function updateCount() {
    setText($("events-count"), received + " received" + (paused && pending.length ? ", " + pending.length + " held while paused" : ""));
  }

  const events = {
    source: null,
    lastId: null,
    retry: null,
    open(query) {
      const es = new EventSource("/events" + query);
      this.source = es;
      const onEvent = (m) => {
        let ev;
        try { ev = JSON.parse(m.data); } catch (_) { return; }
        if (!ev || typeof ev.kind !== "string") return;
        this.lastId = m.lastEventId || ev.id || this.lastId;
        received++;
        pending.push(ev);
        if (ev.task_id) taskView.eventSeen(ev.task_id);
        if (pending.length > FEED_MAX * 4) pending.splice(0, pending.length - FEED_MAX * 4);
        updateCount();
      };
      for (const kind of KINDS) es.addEventListener(kind, onEvent);
      es.onopen = () => setEventsState("live", "ok");
      es.onerror = () => {
        if (es.readyState === EventSource.CLOSED) {
          // A refusal (e.g. 503 when the node serves too many streams) is not retried by the
          // browser: try again later from where this one stopped — unless the node has events
          // off ([events] enabled = false answers 404).
          clearTimeout(this.retry);
          const retryLater = () => {
            setEventsState("retrying", "bad");
            this.retry = setTimeout(() => this.open(this.lastId ? "?after=" + encodeURIComponent(this.lastId) : "?last=50"), 5000);
          };
          fetch("/events?follow=false&last=0").then(
            (r) => (r.status === 404 ? setEventsState("off on this node", "warn") : retryLater()),
            retryLater,
          );
        } else {
          setEventsState("reconnecting", "warn");
        }
      };
    },
    restart() {
      if (this.source) this.source.close();
      clearTimeout(this.retry);
      this.lastId = null;
      this.open("?last=50");
    },
  };
  function setEventsState(text, t) {
    const s = $("events-state");
    s.className = "badge b-" + t;
    setText(s, text);
  }

  $("pause").addEventListener("click", () => {
    paused = !paused;
    $("pause").setAttribute("aria-pressed", String(paused));
    setText($("pause"), paused ? "Resume feed" : "Pause feed");
    updateCount();
    if (!paused) flush();
  });
  $("filter").addEventListener("change", () => {
    for (const li of Array.from(feed.children)) li.hidden = !shown(li.dataset.kind);
  });

  // ---- Charts: the last minutes (GET /stats/history) --------------------------------------
  // Small line charts drawn as inline SVG (no library): throughput, wait, run time, backlog,
  // for every queue together or one. The x axis is the last `keep × every` (15 minutes).
  const CHART_H = 96, PAD_TOP = 10, PAD_BOTTOM = 14;
  let history = null;
  let historyTimer = null;

  async function loadHistory() {
    clearTimeout(historyTimer);
    try {
      const got = await getJson("/stats/history");
      if (got.status === 200 && Array.isArray(got.body.samples)) {
        history = got.body;
        drawCharts();
      }
    } catch (_) {
      // The header already says when the node cannot be reached.
    } finally {
      if (currentView === "overview") historyTimer = setTimeout(loadHistory, HISTORY_MS);
    }
  }

  /** A nice upper bound for an axis (1, 2 or 5 × a power of ten), at least `floor`. */
  function niceMax(value, floor) {
    const v = Math.max(value, floor);
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 5, 10]) if (m * p >= v) return m * p;
    return 10 * p;
  }

  /** Draws `series` ([{label, tone, values}], values per sample, null = no data) into the
   * figure `id`; `fmt` writes one value, `now` the caption's current reading. */
  function drawChart(id, samples, series, fmt, now) {
    const fig = $(id);
    const caption = fig.querySelector("figcaption .now");
    while (fig.children.length > 1) fig.removeChild(fig.lastChild); // all but the caption
    if (!samples.length) {
      setText(caption, "");
      fig.appendChild(el("p", { class: "chart-empty" }, "no sample yet (one every " + Math.round((history ? history.every_ms : 5000) / 1000) + " s)"));
      return;
    }
    const width = Math.max(160, Math.round(fig.clientWidth - 16) || 260);
    // The last `keep × every`, or less while the node has not sampled that long yet.
    const every = history.every_ms || 5000;
    const end = Date.parse(samples[samples.length - 1].at);
    const first = Date.parse(samples[0].at) - (samples[0].interval_ms || every);
    const span = Math.min((history.keep || 180) * every, Math.max(end - first, 2 * every));
    const start = end - span;
    const spanText = span >= 120000 ? Math.round(span / 60000) + " min" : Math.round(span / 1000) + " s";
    const x = (at) => Math.round(((Date.parse(at) - start) / span) * (width - 2)) + 1;
    let top = 0;
    for (const s of series) for (const v of s.values) if (typeof v === "number" && isFinite(v)) top = Math.max(top, v);
    const max = niceMax(top, fmt.floor || 1);
    const y = (v) => Math.round(PAD_TOP + (1 - v / max) * (CHART_H - PAD_TOP - PAD_BOTTOM));
    const svg = svgEl("svg", { viewBox: "0 0 " + width + " " + CHART_H, role: "img" },
      svgEl("line", { class: "grid-line", x1: 0, x2: width, y1: y(max), y2: y(max) }),
      svgEl("line", { class: "grid-line", x1: 0, x2: width, y1: y(max / 2), y2: y(max / 2) }),
      svgEl("line", { class: "grid-line", x1: 0, x2: width, y1: y(0), y2: y(0) }),
      svgEl("text", { class: "axis-label", x: 2, y: y(max) - 2 }, fmt.axis(max)),
      svgEl("text", { class: "axis-label", x: 2, y: CHART_H - 2 }, "−" + spanText),
      svgEl("text", { class: "axis-label", x: width - 2, y: CHART_H - 2, "text-anchor": "end" }, "now"));
    for (const s of series) {
      // One polyline per run of samples with data.
      let run = [];
      const flushRun = () => {
        if (run.length === 1) run.push([run[0][0] + 1, run[0][1]]);
        if (run.length) svg.appendChild(svgEl("polyline", { class: "series " + s.tone, points: run.map((p) => p.join(",")).join(" ") }));
        run = [];
      };
      s.values.forEach((v, i) => {
        if (typeof v === "number" && isFinite(v)) run.push([x(samples[i].at), y(Math.min(v, max))]);
        else flushRun();
      });
      flushRun();
    }
    const latest = series.map((s) => s.label + " " + fmt.value(s.values[s.values.length - 1]));
    svg.setAttribute("aria-label", fig.querySelector("figcaption span").textContent + ", last " + spanText +
      ": now " + latest.join(", ") + "; axis up to " + fmt.axis(max));
    fig.appendChild(svg);
    fig.appendChild(el("div", { class: "legend", "aria-hidden": "true" },
      series.map((s) => el("span", null, el("span", { class: "key " + s.tone }), s.label))));
    setText(caption, now);
  }

  function drawCharts() {
    if (!history || currentView !== "overview") return;
    const queue = $("chart-queue").value;
    const samples = history.samples;
    const pick = (s) => (queue ? s.queues[queue] : s.all) || null;
    const perSecond = (field) => samples.map((s) => {
      const q = pick(s);
      return q && s.interval_ms > 0 ? q[field] / (s.interval_ms / 1000) : null;
    });
    const timing = (kind, field) => samples.map((s) => { const q = pick(s); return q ? q[kind][field] : null; });
    const depth = (field) => samples.map((s) => { const q = pick(s); return q && q.depth ? q.depth[field] : null; });
    const rate = { floor: 1, axis: (v) => (v < 10 ? v.toFixed(1) : num(Math.round(v))) + "/s", value: (v) => (typeof v === "number" ? v.toFixed(1) + "/s" : "–") };
    const ms = { floor: 10, axis: (v) => duration(v), value: (v) => (typeof v === "number" ? duration(v) : "–") };
    const count = { floor: 10, axis: (v) => num(v), value: (v) => (typeof v === "number" ? num(v) : "–") };
    const last = (values) => values[values.length - 1];
    const ok = perSecond("succeeded"), retried = perSecond("retried"), dead = perSecond("dead");
    drawChart("chart-throughput", samples, [
      { label: "succeeded", tone: "s-ok", values: ok },
      { label: "retried", tone: "s-warn", values: retried },
      { label: "dead", tone: "s-bad", values: dead },
    ], rate, rate.value(last(ok)) + " ok");
    const waitP95 = timing("wait", "p95_ms"), waitMean = timing("wait", "mean_ms");
    drawChart("chart-wait", samples, [
      { label: "p95", tone: "s-bad", values: waitP95 },
      { label: "mean", tone: "s-info", values: waitMean },
    ], ms, "p95 " + ms.value(last(waitP95)));
    const runP95 = timing("run", "p95_ms"), runMean = timing("run", "mean_ms");
    drawChart("chart-run", samples, [
      { label: "p95", tone: "s-bad", values: runP95 },
      { label: "mean", tone: "s-info", values: runMean },
    ], ms, "p95 " + ms.value(last(runP95)));
    const ready = depth("ready"), delayed = depth("delayed"), deadDepth = depth("dead");
    drawChart("chart-depth", samples, [
      { label: "ready", tone: "s-info", values: ready },
      { label: "delayed", tone: "s-muted", values: delayed },
      { label: "dead", tone: "s-bad", values: deadDepth },
    ], count, count.value(last(ready)) + " ready");
  }
  $("chart-queue").addEventListener("change", drawCharts);
  window.addEventListener("resize", () => { clearTimeout(drawCharts.timer); drawCharts.timer = setTimeout(drawCharts, 150); });

  // ---- Tasks: search (GET /tasks) ---------------------------------------------------------
  const searchForm = $("search");
  const SEARCH_FIELDS = ["id", "task", "queue", "state", "trace"];
  let searchSeq = 0;

  /** A row of a task list (search results, tasks of a trace); a click opens the task. */
  function taskRow(t, last) {
    const tr = el("tr", { "data-id": t.id },
      el("td", null, taskLink(t.id)),
      el("td", { title: t.task || "" }, t.task || "–"),
      el("td", { title: t.queue || "" }, t.queue || "–"),
      el("td", null, taskBadge(t.state)),
      el("td", { class: "num" }, num(t.attempts)),
      el("td", { title: t.updated_at || "" }, clock(t.updated_at)),
      last);
    tr.addEventListener("click", (e) => { if (!e.target.closest("a, button")) location.hash = taskHref(t.id); });
    return tr;
  }

  /** What a search looked at (the events stream is capped: say how far back it went). */
  function coverage(body) {
    if (body.events === "off") {
      return "Events are off on this node ([events] enabled = false): only an exact id finds a task, by its record.";
    }
    const back = body.oldest ? " (back to " + stamp(body.oldest) + " UTC)" : "";
    return "Looked at the newest " + num(body.scanned) + " events" + back + (body.complete
      ? ": everything the events stream still holds."
      : ". Older tasks may be further back, or gone from the capped stream; an exact id still finds a task by its record.");
  }

  const tasksView = {
    enter(params) {
      for (const f of SEARCH_FIELDS) {
        const input = searchForm.elements[f];
        const value = params.get(f) || "";
        if (input.tagName === "SELECT" && value && !Array.from(input.options).some((o) => o.value === value)) {
          input.appendChild(el("option", { value }, value));
        }
        input.value = value;
      }
      runSearch(params);
    },
    leave() { searchSeq++; },
  };

  searchForm.addEventListener("submit", (e) => {
    e.preventDefault();
    const params = {};
    for (const f of SEARCH_FIELDS) {
      const v = searchForm.elements[f].value.trim();
      if (v) params[f] = v;
    }
    const href = searchHref(params);
    if (location.hash === href) runSearch(new URLSearchParams(params));
    else location.hash = href;
  });
  $("search-clear").addEventListener("click", () => {
    if (location.hash === "#/tasks") tasksView.enter(new URLSearchParams());
    else location.hash = "#/tasks";
  });

  async function runSearch(params) {
    const seq = ++searchSeq;
    const query = new URLSearchParams();
    for (const f of SEARCH_FIELDS) if (params.get(f)) query.set(f, params.get(f));
    query.set("limit", String(SEARCH_LIMIT));
    setText($("results-coverage"), "Searching…");
    let got;
    try {
      got = await getJson("/tasks?" + query.toString());
    } catch (err) {
      got = { status: 0, body: { error: "the node cannot be reached" } };
    }
    if (seq !== searchSeq) return; // a newer search, or another view
    const empty = $("results-empty");
    if (got.status !== 200) {
      setChildren($("results").tBodies[0]);
      empty.hidden = false;
      setText(empty, "The search failed: " + String((got.body && got.body.error) || got.status));
      setText($("results-coverage"), "");
      return;
    }
    const tasks = Array.isArray(got.body.tasks) ? got.body.tasks : [];
    setChildren($("results").tBodies[0], tasks.map((t) =>
      taskRow(t, el("td", { title: t.error || "" }, t.error || ""))));
    empty.hidden = tasks.length > 0;
    setText(empty, "No task found.");
    setText($("results-coverage"), (tasks.length ? num(tasks.length) + (tasks.length === 1 ? " task" : " tasks") +
      (tasks.length >= SEARCH_LIMIT ? " (the first " + SEARCH_LIMIT + ")" : "") + ", the most recently active first. " : "") +
      coverage(got.body));
  }

  // ---- Tasks: one task (GET /tasks/{id}, /tasks/{id}/timeline) ----------------------------
  const taskView = {
    id: null,
    timer: null,
    seq: 0,
    trace: undefined,   // the trace whose tasks are listed
    lastState: null,
    enter(id) {
      this.id = id;
      this.trace = undefined;
      this.lastState = null;
      setText($("task-id"), id);
      setText($("task-heading"), "Task");
      const s = $("task-state");
      s.className = "badge b-idle";
      setText(s, "…");
      for (const part of ["task-fields", "task-actions", "task-envelope", "timeline", "timeline-sub"]) $(part).replaceChildren();
      setText($("task-outcome"), "");
      setChildren($("trace-tasks").tBodies[0]);
      $("trace-empty").hidden = true;
      this.load();
    },
    leave() {
      clearTimeout(this.timer);
      this.id = null;
      this.seq++;
    },
    /** An event about `taskId` arrived on the feed: refresh soon if it is the one shown. */
    eventSeen(taskId) {
      if (taskId !== this.id) return;
      clearTimeout(this.timer);
      this.timer = setTimeout(() => this.load(), 300);
    },
    async load() {
      const id = this.id, seq = ++this.seq;
      clearTimeout(this.timer);
      if (id === null) return;
      let record, timeline;
      try {
        [record, timeline] = await Promise.all([getJson(path("tasks", id)), getJson(path("tasks", id, "timeline"))]);
      } catch (err) {
        if (seq === this.seq) this.timer = setTimeout(() => this.load(), TASK_REFRESH_MS);
        return;
      }
      if (seq !== this.seq) return;
      const t = {
        id,
        // GET /tasks/{id} is the authority on the state when it answers; the timeline's state
        // (from the newest event and the record) stands in while it has none.
        record: record.status === 200 ? record.body : null,
        timeline: timeline.status === 200 ? timeline.body : null,
      };
      t.state = (t.record && t.record.state) || (t.timeline && t.timeline.state) || null;
      renderTask(t);
      if (t.timeline && t.timeline.trace_id !== this.trace) {
        this.trace = t.timeline.trace_id;
        loadTrace(id, this.trace);
      } else if (t.state !== this.lastState && this.trace) {
        loadTrace(id, this.trace);
      }
      this.lastState = t.state;
      if (!FINAL.has(t.state)) this.timer = setTimeout(() => this.load(), TASK_REFRESH_MS);
    },
  };

  function field(dl, name, ...value) {
    dl.appendChild(el("dt", null, name));
    dl.appendChild(el("dd", { "data-field": name }, ...value));
  }

  function renderTask(t) {
    const tl = t.timeline || {};
    const r = t.record;
    const events = Array.isArray(tl.events) ? tl.events : [];
    const letter = tl.dead_letter || null;
    const known = r || events.length || letter;
    setText($("task-heading"), (r && r.task) || tl.task || "Task");
    const s = $("task-state");
    s.className = "badge b-" + (TASK_TONE[t.state] || "idle");
    setText(s, t.state || (known ? "unknown" : "not found"));
    s.dataset.state = t.state || "";

    const dl = $("task-fields");
    dl.replaceChildren();
    field(dl, "task", (r && r.task) || tl.task || "–");
    field(dl, "queue", (r && r.queue) || tl.queue || "–");
    field(dl, "state", taskBadge(t.state || "unknown"));
    field(dl, "attempts", num(Math.max((r && r.attempts) || 0, tl.attempts || 0)));
    const sent = events.find((e) => e.kind === "sent");
    field(dl, "enqueued", sent ? stamp(sent.at) + " UTC" : "–");
    const updated = (r && r.updated_at) || (events.length ? events[events.length - 1].at : null);
    field(dl, "updated", updated ? stamp(updated) + " UTC (" + ago(updated) + " ago)" : "–");
    field(dl, "trace id", tl.trace_id ? el("a", { href: searchHref({ trace: tl.trace_id }), class: "mono" }, tl.trace_id) : "–");
    field(dl, "parent", tl.parent_id ? taskLink(tl.parent_id, tl.parent_id) : "–");
    if (letter) field(dl, "dead letter", el("span", { class: "mono" }, letter.entry), " in ", el("a", { href: dlqHref(tl.queue) }, tl.queue));

    const outcome = $("task-outcome");
    const error = (r && r.error) || (letter && letter.reason) || null;
    if (r && r.state === "succeeded") {
      setText($("task-outcome-heading"), "Result");
      outcome.className = "json";
      setText(outcome, pretty(r.result ?? null));
    } else if (error) {
      setText($("task-outcome-heading"), "Error");
      outcome.className = "json bad";
      setText(outcome, error);
    } else {
      setText($("task-outcome-heading"), "Result");
      outcome.className = "json";
      setText(outcome, known ? "(none yet: the task has not finished)" : "(nothing known of this task)");
    }

    const envelope = $("task-envelope");
    if (letter && (letter.envelope || letter.raw)) {
      setChildren(envelope,
        el("pre", { class: "json" }, letter.envelope ? pretty(letter.envelope) : letter.raw),
        el("p", { class: "hint" }, "From its dead letter " + letter.entry + " (died " + stamp(letter.at) + " UTC after " +
          num(letter.attempts) + (letter.attempts === 1 ? " attempt" : " attempts") + ")."));
    } else {
      setChildren(envelope, el("p", { class: "empty" }, t.state === "dead"
        ? "Its dead letter is not among the oldest dead letters of its queue the node looks through (or it was deleted or requeued)."
        : "The runtime keeps a task's envelope while the task waits in its queue and once it is dead-lettered; the page shows it from the dead letter."));
    }

    setChildren($("task-actions"), taskActions(t));

    const list = $("timeline");
    setChildren(list, events.map(timelineItem));
    if (!events.length) list.appendChild(el("li", { class: "empty" }, "No event of this task among those scanned."));
    setText($("timeline-sub"), num(events.length) + (events.length === 1 ? " event" : " events") +
      (tl.scanned !== undefined ? "; looked at the newest " + num(tl.scanned) + " events" + (tl.complete ? "" : ", not back to its enqueue") : ""));
  }

  /**
   * The buttons of a task's detail: revoke a task that has not ended (queued or scheduled: it
   * never runs; running: cancelled, soft then hard, when "terminate" is ticked), retry
   * (requeue) or delete its dead letter. Each button is an `act()` call on the node's route,
   * then `taskView.load()`.
   */
  function taskActions(t) {
    const tl = t.timeline || {};
    const letter = tl.dead_letter;
    const out = [];
    if (REVOCABLE.includes(t.state)) {
      const running = t.state === "running";
      out.push(button(running ? "Terminate…" : "Revoke…", "revoke-task", async (b) => {
        const sure = await confirmAction(running ? "Terminate this running task?" : "Revoke this task?",
          running
            ? "Task " + t.id + " is cancelled where it runs: its soft time limit fires now, then the hard one after the queue's grace. It is dead-lettered as revoked and its link_error runs."
            : "Task " + t.id + " never runs: it is dead-lettered as revoked when a node takes it, and its link_error runs.",
          running ? "Terminate" : "Revoke");
        if (!sure) return;
        b.disabled = true;
        const done = await act("Revoke task " + shortId(t.id), "POST", path("tasks", t.id, "revoke"), { terminate: running });
        if (done) notify("Revoked task " + t.id + " (it was " + done.was + ").", "ok");
        b.disabled = false;
        taskView.load();
        pollSoon();
      }, { class: "small danger" }));
    }
    if (letter && tl.queue) {
      out.push(button("Retry", "retry-task", async (b) => {
        b.disabled = true;
        const done = await act("Retry task " + shortId(t.id), "POST", path("dlq", tl.queue, letter.entry, "requeue"));
        if (done) notify("Requeued task " + t.id + " from its dead letter: it runs again from attempt 0.", "ok");
        b.disabled = false;
        taskView.load();
        pollSoon();
      }, { class: "small primary", disabled: !letter.envelope, title: letter.envelope ? null : "not a valid envelope: it cannot run" }));
      out.push(" ", button("Delete dead letter…", "delete-letter", async () => {
        const sure = await confirmAction("Delete this dead letter?", "Dead letter " + letter.entry + " of " + tl.queue +
          " is removed for good; the task's record stays until it expires.", "Delete");
        if (!sure) return;
        if (await act("Delete dead letter " + letter.entry, "DELETE", path("dlq", tl.queue, letter.entry))) {
          notify("Deleted dead letter " + letter.entry + " of " + tl.queue + ".", "ok");
        }
        taskView.load();
        pollSoon();
      }, { class: "small danger" }));
    }
    return out;
  }

  function timelineItem(ev) {
    const d = ev.detail && typeof ev.detail === "object" ? ev.detail : {};
    const facts = [];
    if (typeof d.attempt === "number" && ev.kind !== "sent") facts.push("attempt " + (d.attempt + 1));
    if (d.consumer) facts.push("on " + d.consumer);
    if (ev.kind === "sent" && d.eta) facts.push("eta " + stamp(d.eta));
    if (ev.kind === "deferred" && d.until) facts.push("until " + stamp(d.until));
    if (typeof d.deliveries === "number") facts.push("delivered " + d.deliveries + "×");
    const why = d.error || d.reason || null;
    const t = tone(ev.kind);
    return el("li", { class: "t-" + t, "data-kind": ev.kind },
      el("time", { datetime: ev.at }, stamp(ev.at)),
      badge(ev.kind, t),
      facts.length ? " " + facts.join(" · ") : null,
      why ? el("span", { class: "why" + (t === "bad" ? " bad" : "") }, String(why)) : null);
  }

  async function loadTrace(id, trace) {
    const tbody = $("trace-tasks").tBodies[0];
    const empty = $("trace-empty");
    if (!trace) {
      setChildren(tbody);
      empty.hidden = false;
      setText(empty, "Its trace is not known (its enqueue is older than the events scanned).");
      return;
    }
    let got;
    try {
      got = await getJson("/tasks?" + new URLSearchParams({ trace, limit: String(TRACE_LIMIT) }).toString());
    } catch (_) {
      return;
    }
    if (taskView.id !== id) return;
    const tasks = got.status === 200 && Array.isArray(got.body.tasks) ? got.body.tasks : [];
    setChildren(tbody, tasks.map((t) => {
      const tr = taskRow(t, el("td", null, t.parent_id ? taskLink(t.parent_id) : "–"));
      if (t.id === id) tr.setAttribute("aria-current", "true");
      return tr;
    }));
    empty.hidden = tasks.length > 0;
    setText(empty, "No task of this trace among the events scanned.");
  }

  // ---- Dead letters (GET /dlq/{queue}) ----------------------------------------------------
  const dlqView = {
    queue: null,
    after: null,        // the page shown starts after this entry (null: the first page)
    next: null,
    timer: null,
    seq: 0,
    rows: new Map(),    // entry → its <tr> (kept across refreshes: a dead letter never changes)
    open: new Set(),    // entries whose envelope is shown
    enter(queue) {
      if (!queue) {
        // The first queue with dead letters, else the first queue.
        const names = Object.keys(lastQueues);
        const pick = names.find((n) => lastQueues[n].dead > 0) || names[0];
        if (pick) { location.replace(dlqHref(pick)); return; }
      }
      if (queue !== this.queue) { this.rows.clear(); this.open.clear(); this.after = null; }
      this.queue = queue || null;
      renderQueuePick();
      this.load();
    },
    leave() {
      clearTimeout(this.timer);
      this.seq++;
    },
    async load() {
      const queue = this.queue, seq = ++this.seq;
      clearTimeout(this.timer);
      setText($("dlq-sub"), queue ? "of " + queue + ", oldest first" : "");
      $("dlq-requeue-all").disabled = $("dlq-purge").disabled = !queue;
      if (!queue) {
        setChildren($("letters").tBodies[0]);
        $("letters-empty").hidden = false;
        setText($("letters-empty"), queuesLoaded ? "No queue is configured." : "Loading the queues…");
        return;
      }
      const query = new URLSearchParams({ limit: String(DLQ_PAGE) });
      if (this.after) query.set("after", this.after);
      let got;
      try {
        got = await getJson(path("dlq", queue) + "?" + query.toString());
      } catch (_) {
        got = null;
      }
      if (seq !== this.seq) return;
      if (got && got.status === 200) renderLetters(queue, got.body);
      else if (got) notify("Dead letters of " + queue + ": " + String((got.body && got.body.error) || got.status), "bad");
      this.timer = setTimeout(() => this.load(), DLQ_REFRESH_MS);
    },
  };

  function renderQueuePick() {
    const nav = $("dlq-queues");
    const names = Object.keys(lastQueues);
    const links = names.map((name) => {
      const dead = lastQueues[name].dead;
      return el("a", { href: dlqHref(name), "aria-current": name === dlqView.queue ? "true" : null, "data-queue": name },
        name, el("span", { class: "n" + (dead > 0 ? " hot" : "") }, typeof dead === "number" ? num(dead) : "?"));
    });
    // Rebuilt only when something changed, so a click is never lost to a refresh.
    const text = links.map((a) => a.textContent + (a.getAttribute("aria-current") || "")).join("|");
    if (nav.dataset.text !== text) { nav.dataset.text = text; setChildren(nav, links); }
  }

  function renderLetters(queue, body) {
    const letters = Array.isArray(body.dead_letters) ? body.dead_letters : [];
    const tbody = $("letters").tBodies[0];
    const keep = new Set(letters.map((l) => l.entry));
    for (const entry of Array.from(dlqView.rows.keys())) if (!keep.has(entry)) dlqView.rows.delete(entry);
    const trs = [];
    for (const letter of letters) {
      let row = dlqView.rows.get(letter.entry);
      if (!row) { row = letterRow(queue, letter); dlqView.rows.set(letter.entry, row); }
      trs.push(row.tr);
      row.more.hidden = !dlqView.open.has(letter.entry);
      trs.push(row.more);
    }
    trs.forEach((tr, i) => { if (tbody.children[i] !== tr) tbody.insertBefore(tr, tbody.children[i] || null); });
    while (tbody.children.length > trs.length) tbody.removeChild(tbody.lastChild);
    const empty = $("letters-empty");
    empty.hidden = letters.length > 0;
    setText(empty, dlqView.after ? "No dead letter on this page." : "No dead letter in " + queue + ".");
    dlqView.next = body.next || null;
    $("dlq-next").hidden = !dlqView.next;
    $("dlq-first").hidden = !dlqView.after;
  }

  function letterRow(queue, letter) {
    const env = letter.envelope;
    const retry = button("Retry", "retry", async (b) => {
      b.disabled = true;
      const done = await act("Retry dead letter " + letter.entry, "POST", path("dlq", queue, letter.entry, "requeue"));
      b.disabled = false;
      if (done) {
        notify("Requeued task " + done.requeued + " (dead letter " + letter.entry + " of " + queue + "): it runs again from attempt 0.", "ok",
          { href: taskHref(done.requeued), text: "Open the task" });
      }
      dlqView.load();
      pollSoon();
    }, { disabled: !env, title: env ? "requeue this task: it runs again from attempt 0" : "not a valid envelope: it cannot run" });
    const remove = button("Delete", "delete", async () => {
      const sure = await confirmAction("Delete dead letter " + letter.entry + "?",
        "This dead letter of " + queue + (env ? " (task " + env.task + ", " + env.id + ")" : "") +
        " is removed for good. The task's record stays until it expires.", "Delete");
      if (!sure) return;
      if (await act("Delete dead letter " + letter.entry, "DELETE", path("dlq", queue, letter.entry))) {
        notify("Deleted dead letter " + letter.entry + " of " + queue + ".", "ok");
      }
      dlqView.load();
      pollSoon();
    }, { class: "small danger" });
    const show = button("Envelope", "envelope", (b) => {
      const open = !dlqView.open.has(letter.entry);
      if (open) dlqView.open.add(letter.entry); else dlqView.open.delete(letter.entry);
      b.setAttribute("aria-expanded", String(open));
      row.more.hidden = !open;
    }, { "aria-expanded": "false" });
    const tr = el("tr", { "data-entry": letter.entry },
      el("td", { class: "mono", title: letter.entry }, letter.entry),
      el("td", { title: letter.at }, clock(letter.at)),
      el("td", { title: env ? env.task : "" }, env ? env.task : el("em", null, "malformed")),
      el("td", null, env ? taskLink(env.id) : "–"),
      el("td", { class: "num" }, num(letter.attempts)),
      el("td", { title: letter.reason }, letter.reason),
      el("td", { class: "actions" }, show, retry, remove));
    const more = el("tr", { class: "envelope-row", hidden: true },
      el("td", { colspan: "7" }, el("pre", { class: "json" }, env ? pretty(env) : String(letter.raw ?? ""))));
    const row = { tr, more };
    return row;
  }

  $("dlq-next").addEventListener("click", () => { dlqView.after = dlqView.next; dlqView.load(); });
  $("dlq-first").addEventListener("click", () => { dlqView.after = null; dlqView.load(); });
  $("dlq-requeue-all").addEventListener("click", async () => {
    const queue = dlqView.queue;
    const dead = (lastQueues[queue] || {}).dead;
    const sure = await confirmAction("Requeue the dead letters of " + queue + "?",
      "Up to " + num(REQUEUE_ALL) + " of its " + num(dead) + " dead letters go back to the queue and run again from attempt 0 " +
      "(malformed ones stay).", "Requeue");
    if (!sure) return;
    const done = await act("Requeue the dead letters of " + queue, "POST", path("dlq", queue, "requeue") + "?limit=" + REQUEUE_ALL);
    if (done) notify("Requeued " + num(done.requeued) + " dead letters of " + queue + ".", "ok");
    dlqView.after = null;
    dlqView.load();
    pollSoon();
  });
  $("dlq-purge").addEventListener("click", async () => {
    const queue = dlqView.queue;
    const dead = (lastQueues[queue] || {}).dead;
    const sure = await confirmAction("Delete every dead letter of " + queue + "?",
      "All " + num(dead) + " dead letters of " + queue + " are removed for good (their tasks' records stay until they expire).",
      "Delete all");
    if (!sure) return;
    const done = await act("Delete the dead letters of " + queue, "POST", path("dlq", queue, "purge"));
    if (done) notify("Deleted " + num(done.purged) + " dead letters of " + queue + ".", "ok");
    dlqView.after = null;
    dlqView.load();
    pollSoon();
  });

  // ---- Nodes (GET /nodes) -----------------------------------------------------------------
  let nodesTimer = null;
  async function loadNodes() {
    clearTimeout(nodesTimer);
    let got = null;
    try { got = await getJson("/nodes"); } catch (_) { /* the header says so */ }
    if (got && got.status === 200 && Array.isArray(got.body.nodes)) renderNodes(got.body.nodes);
    nodesTimer = setTimeout(loadNodes, currentView === "nodes" ? NODES_REFRESH_MS : 10 * NODES_REFRESH_MS);
  }
  function renderNodes(nodes) {
    setText($("nodes-count"), nodes.length ? num(nodes.length) : "");
    setChildren($("nodes").tBodies[0], nodes.map((n) => {
      const held = Object.entries(n.in_flight || {}).filter(([, k]) => k > 0).map(([q, k]) => q + " " + num(k));
      return el("tr", { "data-node": n.name },
        el("th", { scope: "row", title: n.name }, n.name),
        el("td", { title: (n.queues || []).join(", ") }, (n.queues || []).join(", ")),
        el("td", { title: held.join(", ") }, held.length ? held.join(", ") : "nothing"),
        el("td", { title: n.started_at }, stamp(n.started_at)),
        el("td", { class: "num" }, ago(n.started_at)),
        el("td", { class: "num" }, ago(n.last_seen) + " ago"));
    }));
    const empty = $("nodes-empty");
    empty.hidden = nodes.length > 0;
    setText(empty, "No node has a presence record.");
  }

  // ---- Views: the #fragment says which ----------------------------------------------------
  // #/ (or an anchor of the overview, as the skip links) → overview; #/tasks?… → search;
  // #/task/ID → one task; #/dlq/QUEUE → dead letters; #/nodes → nodes.
  let currentView = "overview";
  const overviewView = {
    enter() { poll(); loadHistory(); },
    leave() { clearTimeout(historyTimer); },
  };
  const nodesView = { enter() { loadNodes(); }, leave() {} };
  const VIEWS = { overview: overviewView, tasks: tasksView, task: taskView, dlq: dlqView, nodes: nodesView };
  const NAV = { task: "tasks" };

  function parseHash() {
    const hash = location.hash;
    if (!hash.startsWith("#/")) return { name: "overview", arg: "", params: new URLSearchParams() };
    const [where, query] = hash.slice(2).split(/\?(.*)/s);
    const [name, ...rest] = where.split("/");
    let arg = rest.join("/");
    try { arg = decodeURIComponent(arg); } catch (_) { /* keep it as written */ }
    return { name: VIEWS[name] ? name : "overview", arg, params: new URLSearchParams(query || "") };
  }

  function route() {
    const { name, arg, params } = parseHash();
    const previous = currentView;
    if (VIEWS[previous] && previous !== name) VIEWS[previous].leave();
    else if (previous === name) VIEWS[name].leave();
    currentView = name;
    for (const view of document.querySelectorAll(".view")) view.hidden = view.id !== "view-" + name;
    for (const a of document.querySelectorAll("nav.views a")) {
      if (a.dataset.view === (NAV[name] || name)) a.setAttribute("aria-current", "page");
      else a.removeAttribute("aria-current");
    }
    VIEWS[name].enter(name === "tasks" ? params : arg);
  }
  window.addEventListener("hashchange", route);
  // The skip links lead into the overview: show it first if another view is on screen.
  for (const skip of document.querySelectorAll("a.skip")) {
    skip.addEventListener("click", (e) => {
      if (currentView === "overview") return;
      e.preventDefault();
      const target = skip.getAttribute("href");
      location.hash = target;
      const node = document.querySelector(target);
      if (node) node.focus();
    });
  }

  // ---- Start ------------------------------------------------------------------------------
  setText($("node-host"), location.host);
  showToken();
  events.open("?last=50");
  route();
  if (currentView !== "overview") poll();
  loadNodes();
  // Every listener is in place (tests wait for this before they click).
  document.documentElement.dataset.ready = "true";
})();
