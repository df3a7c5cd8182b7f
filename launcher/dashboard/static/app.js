// lalo dashboard: polls GET api/status every second and renders it into the static shell;
// a model's log is a stream (fetch + server-sent events, so the API key goes along).
// watch.js adds the playground, activity, charts and lalo's log through window.lalo.
// No framework and no network beyond lalo itself. Everything the server sends is written
// with textContent / attributes, never parsed as HTML.
"use strict";

(function () {
  const POLL_INTERVAL = 1000;     // ms between status polls (the issue asks for < 2 s)
  const REQUEST_TIMEOUT = 4000;   // ms before a silent lalo counts as a lost connection
  const ACTION_TIMEOUT = 600000;  // ms an admin action may take (a load waits for the model)
  const LOG_LINES = 200;           // backlog a log stream starts with
  const LOG_KEEP = 2000;           // lines a log view keeps
  const STREAM_RETRY = 2000;       // ms before a broken log stream is opened again
  const LOCKED_STATUS_EVERY = 10; // polls between key checks while the key prompt waits
  const KEY_STORAGE = "lalo.apiKey";
  const PALETTE_SIZE = 8;         // --m0 .. --m7 in style.css
  const VERBS = {
    load: ["Loading", "Loaded"],
    unload: ["Unloading", "Unloaded"],
    restart: ["Restarting", "Restarted"],
  };

  const byId = (id) => document.getElementById(id);
  const field = (root, id) => root.querySelector(`[data-testid="${id}"]`);

  const ui = {
    version: field(document, "version"),
    healthLine: field(document, "health-line"),
    connection: byId("connection"),
    forgetKey: byId("forget-key"),
    keyPrompt: byId("key-prompt"),
    keyForm: byId("key-form"),
    keyInput: byId("key-input"),
    keyError: byId("key-error"),
    overview: byId("overview"),
    ramBar: byId("ram-bar"),
    ramLegend: byId("ram-legend"),
    models: byId("models"),
    peers: byId("peers"),
    template: byId("model-template"),
    panels: byId("panels"),
  };

  const app = {
    key: readKey(),
    cards: new Map(),      // model name -> card element
    colours: new Map(),    // model name -> palette index, stable across polls
    timer: 0,
    polling: false,
    pollAgain: false,
    locked: false,
    lockedPolls: 0,
    hooks: { status: [], lock: [] },  // watch.js: called with each status, and on lock
  };

  class Unauthorized extends Error {}
  class ApiError extends Error {}
  class Forbidden extends ApiError {}  // 403: this key's role may not do that

  // --- storage and HTTP --------------------------------------------------------------------

  function readKey() {
    try { return localStorage.getItem(KEY_STORAGE) || ""; } catch (_) { return ""; }
  }

  function storeKey(key) {
    app.key = key;
    try {
      if (key) localStorage.setItem(KEY_STORAGE, key); else localStorage.removeItem(KEY_STORAGE);
    } catch (_) { /* storage disabled (private mode): the key lives until the tab closes */ }
    ui.forgetKey.hidden = !key;
  }

  async function api(path, { method = "GET", timeout = REQUEST_TIMEOUT, auth = true } = {}) {
    const controller = new AbortController();
    const timer = setTimeout(() => controller.abort(), timeout);
    const headers = { Accept: "application/json" };
    if (auth && app.key) headers.Authorization = "Bearer " + app.key;
    let response;
    try {
      response = await fetch(path, { method, headers, cache: "no-store", signal: controller.signal });
    } finally {
      clearTimeout(timer);
    }
    if (response.status === 401) throw new Unauthorized("API key required");
    let body = null;
    try { body = await response.json(); } catch (_) { body = null; }
    if (!response.ok) {
      const message = body && body.error && body.error.message;
      throw new (response.status === 403 ? Forbidden : ApiError)(message || `HTTP ${response.status}`);
    }
    return body;
  }

  // A server-sent event stream read with fetch (EventSource cannot send the API key):
  // calls onData with each event's data, returns when the stream ends.
  async function streamEvents(path, { method = "GET", body, signal, onData }) {
    const headers = { Accept: "text/event-stream" };
    if (app.key) headers.Authorization = "Bearer " + app.key;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const response = await fetch(path, {
      method, headers, signal, cache: "no-store",
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    if (response.status === 401) throw new Unauthorized("API key required");
    if (!response.ok) {
      let message = "";
      try { const error = await response.json(); message = error.error && error.error.message; } catch (_) { /* not JSON */ }
      throw new (response.status === 403 ? Forbidden : ApiError)(message || `HTTP ${response.status}`);
    }
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value.replace(/\r\n?/g, "\n");
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const data = event.split("\n").filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(line.startsWith("data: ") ? 6 : 5));
        if (data.length) onData(data.join("\n"));  // comments (": loading") carry no data
      }
    }
  }

  // --- formatting --------------------------------------------------------------------------

  function bytes(n) {
    if (n === null || n === undefined) return "—";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let value = n;
    let unit = 0;
    while (value >= 1024 && unit < units.length - 1) { value /= 1024; unit += 1; }
    return `${value.toFixed(value >= 100 || unit === 0 ? 0 : 1)} ${units[unit]}`;
  }

  function duration(seconds) {
    if (seconds === null || seconds === undefined) return "—";
    const s = Math.floor(seconds);
    const pad = (v) => String(v).padStart(2, "0");
    if (s < 60) return `${s} s`;
    if (s < 3600) return `${Math.floor(s / 60)} m ${pad(s % 60)} s`;
    if (s < 86400) return `${Math.floor(s / 3600)} h ${pad(Math.floor(s / 60) % 60)} m`;
    return `${Math.floor(s / 86400)} d ${Math.floor(s / 3600) % 24} h`;
  }

  const orDash = (value) => (value === null || value === undefined ? "—" : String(value));

  function setText(el, text) {
    if (el.textContent !== text) el.textContent = text;
  }

  // --- connection and key ------------------------------------------------------------------

  function setConnection(kind, detail) {
    const labels = {
      live: "Live",
      lost: "Connection to lalo lost — retrying",
      connecting: "Connecting to lalo…",
    };
    ui.connection.dataset.state = kind;
    setText(ui.connection, labels[kind]);
    ui.connection.title = detail || "";
    document.body.classList.toggle("stale", kind === "lost");
  }

  function lock(message) {
    const wasLocked = app.locked;
    app.locked = true;
    ui.overview.hidden = true;
    ui.models.hidden = true;
    for (const card of app.cards.values()) { stopLogStream(card); card.remove(); }
    app.cards.clear();
    ui.panels.hidden = true;
    for (const hook of app.hooks.lock) hook();
    ui.keyPrompt.hidden = false;
    if (message !== undefined) setText(ui.keyError, message);
    if (!wasLocked) ui.keyInput.focus();
    document.title = "lalo · locked";
  }

  function unlock() {
    if (!app.locked) return;
    app.locked = false;
    ui.keyPrompt.hidden = true;
    setText(ui.keyError, "");
  }

  ui.keyForm.addEventListener("submit", (event) => {
    event.preventDefault();
    storeKey(ui.keyInput.value.trim());
    ui.keyInput.value = "";
    setText(ui.keyError, "Checking…");
    poll();
  });

  ui.forgetKey.addEventListener("click", () => {
    storeKey("");
    poll();
  });

  // --- polling -----------------------------------------------------------------------------

  async function poll() {
    if (app.polling) { app.pollAgain = true; return; }
    app.polling = true;
    clearTimeout(app.timer);
    try {
      // locked and no key to try: the health line only, and now and then whether lalo
      // still wants a key (it may have restarted without one)
      app.lockedPolls = app.locked && !app.key ? (app.lockedPolls + 1) % LOCKED_STATUS_EVERY : 0;
      if (app.lockedPolls !== 0) {
        setConnection(await renderHealth() ? "live" : "lost");
        return;
      }
      const status = await api("api/status");
      setConnection("live");
      unlock();
      render(status);
    } catch (error) {
      if (error instanceof Unauthorized) {
        setConnection("live");
        const refused = app.key !== "";
        if (refused) storeKey("");  // never keep resending a key lalo refuses
        lock(refused ? "lalo refused that key. Enter another." : undefined);
        await renderHealth();
      } else {
        setConnection("lost", String(error && error.message));
      }
    } finally {
      app.polling = false;
      const delay = app.pollAgain ? 0 : POLL_INTERVAL;
      app.pollAgain = false;
      app.timer = setTimeout(poll, delay);
    }
  }

  async function renderHealth() {
    // GET /health never needs a key: the one line a locked page may show
    try {
      const health = await api("health", { auth: false });
      setText(ui.version, `v${health.version}`);
      setText(ui.healthLine, `${health.models_ready} of ${health.models} models ready`);
      delete ui.healthLine.dataset.health;
      return true;
    } catch (_) {
      return false;
    }
  }

  // --- rendering ---------------------------------------------------------------------------

  function displayState(model) {
    // a crashed model waiting out its backoff is `failed` with a restart scheduled
    if (model.state === "failed" && model.restart_in_s !== null && model.restart_in_s !== undefined) {
      return "restarting";
    }
    return model.state;
  }

  function render(status) {
    const models = status.models || [];
    const counts = {};
    for (const model of models) {
      const shown = displayState(model);
      counts[shown] = (counts[shown] || 0) + 1;
    }
    const ready = counts.ready || 0;
    setText(ui.version, `v${status.version}`);
    const sleeping = counts.sleeping ? ` (${counts.sleeping} sleeping)` : "";
    setText(ui.healthLine, `${ready} of ${models.length} models ready${sleeping}`);
    const busy = counts.starting || counts.restarting || counts.stopping;
    ui.healthLine.dataset.health = counts.failed ? "failed" : busy ? "busy" : "ok";
    document.title = (counts.failed ? `⚠ ${counts.failed} failed · ` : "") +
      `lalo · ${ready}/${models.length} ready`;
    ui.overview.hidden = false;
    ui.models.hidden = false;
    ui.panels.hidden = false;
    renderOverview(status, counts);
    renderRam(status);
    renderModels(models);
    for (const hook of app.hooks.status) hook(status);
    renderPeers(status.peers || []);
  }

  // Other lalos / OpenAI servers whose models this one serves (GET api/status "peers").
  function renderPeers(peers) {
    ui.peers.hidden = peers.length === 0;
    const rows = peers.map((peer) => {
      const row = document.createElement("tr");
      row.dataset.testid = "peer";
      const check = peer.state === "up" ? `${peer.latency_ms} ms` : (peer.last_error || "");
      for (const text of [peer.name, peer.url, peer.state, peer.models.join(", "), check,
                          String(peer.requests)]) {
        const cell = document.createElement("td");
        cell.textContent = text;
        row.append(cell);
      }
      row.children[2].className = `peer-${peer.state}`;
      return row;
    });
    field(ui.peers, "peer-rows").replaceChildren(...rows);
  }

  function setStat(id, value, detail) {
    setText(field(ui.overview, id), value);
    setText(field(ui.overview, id + "-detail"), detail || "");
  }

  function renderOverview(status, counts) {
    const { total, available, budget } = status.ram;
    setStat("uptime", duration(status.uptime_s), status.pid ? `pid ${status.pid}` : "");
    const cpu = status.cpu || {};
    const load = cpu.load || null;
    setStat("cpu", load ? load[0].toFixed(2) : "n/a",
      (load ? `5 min ${load[1].toFixed(2)} · 15 min ${load[2].toFixed(2)}` : "") +
      (cpu.count ? ` · ${cpu.count} cores` : ""));
    field(ui.overview, "cpu").classList.toggle("over", Boolean(load && cpu.count && load[0] > cpu.count));
    setStat("ram-total", bytes(total), "");
    setStat("ram-available", bytes(available), `${Math.round((available / total) * 100)} % of total`);
    setStat("ram-budget", bytes(budget), status.ram.budget_source || "");
    const order = ["ready", "sleeping", "starting", "restarting", "stopping", "stopped", "failed"];
    const parts = order.filter((s) => counts[s]).map((s) => `${counts[s]} ${s}`);
    setStat("models-summary", parts.join(" · ") || "none configured",
      status.max_loaded ? `at most ${status.max_loaded} loaded` : "");
  }

  function colourOf(name) {
    if (!app.colours.has(name)) app.colours.set(name, app.colours.size % PALETTE_SIZE);
    return app.colours.get(name);
  }

  function segment(className, size, total, label) {
    const el = document.createElement("div");
    el.className = "ram-seg " + className;
    el.style.width = `${Math.max(0, (size / total) * 100)}%`;
    el.title = label;
    return el;
  }

  function legendItem(className, text) {
    const item = document.createElement("li");
    const swatch = document.createElement("span");
    swatch.className = "swatch " + className;
    swatch.setAttribute("aria-hidden", "true");
    item.append(swatch, document.createTextNode(text));
    return item;
  }

  function renderRam(status) {
    // layout: [other processes][model][model]...[free]; the budget outline starts where the
    // models start, so it ends where lalo stops loading more models.
    const { total, available, budget } = status.ram;
    const held = status.models.filter((m) => m.rss);
    const ours = held.reduce((sum, m) => sum + m.rss, 0);
    const other = Math.max(0, total - available - ours);
    const segments = [segment("other", other, total, `other processes: ${bytes(other)}`)];
    const legend = [legendItem("other", `other processes ${bytes(other)}`)];
    for (const model of held) {
      const colour = `m${colourOf(model.name)}`;
      const seg = segment(colour, model.rss, total, `${model.name}: ${bytes(model.rss)}`);
      seg.dataset.testid = "ram-segment";
      seg.dataset.model = model.name;
      segments.push(seg);
      legend.push(legendItem(colour, `${model.name} ${bytes(model.rss)}`));
    }
    const outline = document.createElement("div");
    outline.className = "ram-budget";
    outline.style.left = `${(other / total) * 100}%`;
    outline.style.width = `${Math.min(budget, total - other) / total * 100}%`;
    outline.title = `model budget: ${bytes(budget)}`;
    segments.push(outline);
    legend.push(legendItem("free", `free ${bytes(available)}`));
    legend.push(legendItem("budget", `model budget ${bytes(budget)}`));
    ui.ramBar.replaceChildren(...segments);
    ui.ramLegend.replaceChildren(...legend);
    ui.ramBar.setAttribute("aria-label",
      `RAM: ${bytes(total)} total, ${bytes(ours)} used by models, ${bytes(other)} by other ` +
      `processes, ${bytes(available)} available, model budget ${bytes(budget)}`);
  }

  function renderModels(models) {
    const names = new Set(models.map((m) => m.name));
    for (const [name, card] of app.cards) {
      if (!names.has(name)) { card.remove(); app.cards.delete(name); }
    }
    models.forEach((model, index) => {
      const card = app.cards.get(model.name) || createCard(model.name);
      // move only when out of place: moving a node would take focus from its buttons
      if (ui.models.children[index] !== card) ui.models.insertBefore(card, ui.models.children[index] || null);
      updateCard(card, model);
    });
  }

  function createCard(name) {
    const card = ui.template.content.firstElementChild.cloneNode(true);
    card.dataset.model = name;
    card.setAttribute("aria-label", `Model ${name}`);
    setText(field(card, "name"), name);
    for (const button of card.querySelectorAll("[data-action]")) {
      const action = button.dataset.action;
      button.setAttribute("aria-label", `${button.textContent} ${name}`);
      button.addEventListener("click", () => runAction(card, name, action));
    }
    const toggle = field(card, "logs-toggle");
    toggle.setAttribute("aria-label", `Logs of ${name}`);
    toggle.addEventListener("click", () => toggleLogs(card, name));
    const log = field(card, "log");
    log.setAttribute("aria-label", `Log of ${name}`);
    log.addEventListener("scroll", () => {
      // scrolling up to read stops following; scrolling back to the end resumes it
      field(card, "logs-follow").checked = log.scrollHeight - log.scrollTop - log.clientHeight < 8;
    });
    app.cards.set(name, card);
    return card;
  }

  function stateLabel(model, shown) {
    if (shown === "restarting") {
      return `restarting in ${Math.max(0, Math.ceil(model.restart_in_s))} s`;
    }
    return shown;
  }

  function updateCard(card, model) {
    const shown = displayState(model);
    card.dataset.state = shown;
    const badge = field(card, "state");
    badge.dataset.state = shown;
    setText(badge, stateLabel(model, shown));

    const tags = (model.aliases || []).map((alias) => ["alias", alias]);
    if (model.preload) tags.push(["flag", "preload"]);
    if (model.synthetic) tags.push(["flag", "random weights"]);
    const tagKey = JSON.stringify(tags);
    const tagList = field(card, "aliases");
    if (tagList.dataset.key !== tagKey) {
      tagList.dataset.key = tagKey;
      tagList.replaceChildren(...tags.map(([kind, text]) => {
        const li = document.createElement("li");
        li.className = "tag " + kind;
        li.textContent = text;
        return li;
      }));
    }

    const errorBox = field(card, "last-error-box");
    errorBox.hidden = !model.last_error;
    errorBox.classList.toggle("current", shown === "failed" || shown === "restarting");
    setText(field(card, "last-error"), model.last_error || "");

    setText(field(card, "engine"), orDash(model.engine));
    setText(field(card, "port"), orDash(model.port));
    setText(field(card, "pid"), orDash(model.pid));
    setText(field(card, "model-uptime"), duration(model.uptime_s));
    const loadTime = model.load_seconds;
    setText(field(card, "load-time"),
      loadTime === null || loadTime === undefined ? "—" : `${loadTime.toFixed(1)} s`);
    const ram = field(card, "ram");
    const estimate = model.ram_estimate ? `est. ${bytes(model.ram_estimate)}` : "no estimate";
    setText(ram, `${model.rss ? bytes(model.rss) : "—"} / ${estimate}`);
    ram.classList.toggle("over", Boolean(model.rss && model.ram_estimate && model.rss > model.ram_estimate));
    ram.title = [
      model.rss_peak ? `peak ${bytes(model.rss_peak)}` : "",
      model.ram_measured ? `measured peak on record ${bytes(model.ram_measured)}` : "",
      // what the estimate was made for (a quantized KV cache shrinks it)
      model.ctx_size ? `estimated at ctx ${model.ctx_size}, ${model.parallel} slot(s), KV ${model.kv_cache}` : "",
    ].filter(Boolean).join("; ");
    // failures: runs that ended before `stable_after`; at `max_failures` the model stays failed
    const failures = model.failures ? ` · ${model.failures} recent failure${model.failures > 1 ? "s" : ""}` : "";
    const restarts = String(model.restarts) + failures;
    setText(field(card, "restarts"), restarts);
    const busy = [model.in_flight ? `${model.in_flight} running` : "", model.queued ? `${model.queued} queued` : ""];
    setText(field(card, "requests"), [String(model.requests), ...busy].filter(Boolean).join(" · "));
    const tps = model.tokens_per_s;
    setText(field(card, "tokens-per-s"), tps === null || tps === undefined ? "—" : `${tps.toFixed(1)}`);
    drawSparkline(field(card, "sparkline"), model.tokens_per_s_history || []);
    updateButtons(card, shown);
  }

  function drawSparkline(svg, values) {
    const key = values.join(",");
    if (svg.dataset.key === key) return;
    svg.dataset.key = key;
    svg.dataset.points = String(values.length);
    const line = svg.querySelector("polyline");
    if (!values.length) { line.setAttribute("points", ""); return; }
    const max = Math.max(...values) || 1;
    const y = (v) => (22 - (v / max) * 20).toFixed(1);
    const step = values.length > 1 ? 100 / (values.length - 1) : 100;
    const points = values.map((v, i) => `${(i * step).toFixed(1)},${y(v)}`);
    if (values.length === 1) points.unshift(`0,${y(values[0])}`);
    line.setAttribute("points", points.join(" "));
  }

  // which buttons make sense in each state; `failed` has no load (it would be refused)
  const ENABLED = {
    ready: ["unload", "restart"],
    sleeping: ["unload", "restart"], // weights freed by the server; the next request wakes it
    starting: ["unload", "restart"],
    restarting: ["unload", "restart"],
    stopped: ["load"],
    stopping: [],
    failed: ["unload", "restart"],
  };
  const PRIMARY = { stopped: "load", failed: "restart" };

  function updateButtons(card, shown) {
    const pending = card.dataset.pending;
    for (const button of card.querySelectorAll("[data-action]")) {
      const action = button.dataset.action;
      button.disabled = Boolean(pending) || !(ENABLED[shown] || []).includes(action);
      button.classList.toggle("primary", PRIMARY[shown] === action);
    }
  }

  // --- actions and logs --------------------------------------------------------------------

  async function runAction(card, name, action) {
    const status = field(card, "action-status");
    const [doing, done] = VERBS[action];
    card.dataset.pending = action;
    updateButtons(card, card.dataset.state);
    status.classList.remove("error");
    setText(status, `${doing}…`);
    try {
      await api(`api/models/${encodeURIComponent(name)}/${action}`, { method: "POST", timeout: ACTION_TIMEOUT });
      setText(status, done);
      setTimeout(() => { if (status.textContent === done) setText(status, ""); }, 5000);
    } catch (error) {
      if (error instanceof Unauthorized) {
        setText(status, "");  // the poll below shows the key prompt
      } else if (error instanceof Forbidden) {
        status.classList.add("error");
        setText(status, `Not allowed: ${error.message}`);
      } else {
        status.classList.add("error");
        setText(status, error instanceof ApiError ? error.message : `lalo did not answer (${error.message})`);
      }
    } finally {
      delete card.dataset.pending;
      updateButtons(card, card.dataset.state);
      poll();
    }
  }

  function toggleLogs(card, name) {
    const panel = field(card, "logs");
    const toggle = field(card, "logs-toggle");
    panel.hidden = !panel.hidden;
    card.classList.toggle("logs-open", !panel.hidden);  // a log wants the full width
    toggle.setAttribute("aria-expanded", String(!panel.hidden));
    toggle.classList.toggle("active", !panel.hidden);
    if (panel.hidden) {
      stopLogStream(card);
    } else {
      field(card, "logs-follow").checked = true;
      followLog(card, name);
    }
  }

  function stopLogStream(card) {
    if (card.logStream) card.logStream.abort();
    card.logStream = null;
  }

  // Append lines to a <pre>, keeping the last LOG_KEEP; scrolls to the end when following.
  function appendLines(pre, text, follow) {
    const lines = (pre.textContent ? pre.textContent + "\n" : "") + text;
    const all = lines.split("\n");
    pre.textContent = all.length > LOG_KEEP ? all.slice(-LOG_KEEP).join("\n") : lines;
    pre.dataset.lines = String(Math.min(all.length, LOG_KEEP));
    if (follow) pre.scrollTop = pre.scrollHeight;
  }

  async function followLog(card, name) {
    stopLogStream(card);
    const controller = new AbortController();
    card.logStream = controller;
    const log = field(card, "log");
    const info = field(card, "logs-info");
    log.textContent = "";
    setText(info, "connecting…");
    try {
      await streamEvents(`api/models/${encodeURIComponent(name)}/logs/stream?n=${LOG_LINES}`, {
        signal: controller.signal,
        onData: (text) => {
          appendLines(log, text, field(card, "logs-follow").checked);
          setText(info, `following · ${log.dataset.lines} lines`);
        },
      });
    } catch (error) {
      if (controller.signal.aborted) return;
      if (error instanceof Forbidden || error instanceof Unauthorized) {
        setText(info, `log unavailable: ${error.message}`);
        return;
      }
      setText(info, `log stream interrupted (${error.message}); reconnecting`);
    }
    if (card.logStream === controller && !controller.signal.aborted) {
      setTimeout(() => { if (card.logStream === controller) followLog(card, name); }, STREAM_RETRY);
    }
  }

  function seconds(value) {
    return value < 1 ? `${Math.round(value * 1000)} ms` : `${value.toFixed(2)} s`;
  }

  // what watch.js uses
  window.lalo = {
    app, api, streamEvents, setText, orDash, seconds, colourOf, legendItem, appendLines,
    Unauthorized, ApiError, Forbidden, LOG_LINES, STREAM_RETRY,
    onStatus: (hook) => app.hooks.status.push(hook),
    onLock: (hook) => app.hooks.lock.push(hook),
  };

  storeKey(app.key);
  setConnection("connecting");
  poll();
})();
