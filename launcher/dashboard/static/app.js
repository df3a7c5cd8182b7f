// lalo dashboard: polls GET api/status every second and renders it into the static shell;
// the playground, the model logs and lalo's log are streams (fetch + server-sent events, so
// the API key goes along), the charts poll GET api/history at its sampling interval.
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
  const ACTIVITY_ROWS = 50;
  const CHART_W = 320, CHART_H = 130, CHART_LEFT = 40, CHART_BOTTOM = 16, CHART_TOP = 8;
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
    template: byId("model-template"),
    panels: byId("panels"),
    pgForm: byId("playground-form"),
    pgModel: byId("pg-model"),
    pgSystem: byId("pg-system"),
    pgMessage: byId("pg-message"),
    pgMax: byId("pg-max"),
    pgTemp: byId("pg-temp"),
    pgSend: byId("pg-send"),
    pgStop: byId("pg-stop"),
    pgReply: byId("pg-reply"),
    pgTtft: byId("pg-ttft"),
    pgTps: byId("pg-tps"),
    pgTokens: byId("pg-tokens"),
    pgStatus: byId("pg-status"),
    chartsInfo: byId("charts-info"),
    chartLegend: byId("chart-legend"),
    actModel: byId("act-model"),
    actStatus: byId("act-status"),
    actRows: byId("activity-rows"),
    actInfo: byId("activity-info"),
    actNote: byId("activity-note"),
    laloLogToggle: byId("lalo-log-toggle"),
    laloLogNote: byId("lalo-log-note"),
    laloLogText: byId("lalo-log-text"),
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
    modelNames: "",          // the names the selects were filled with
    activityTotal: -1,       // requests lalo had answered when the list was last fetched
    activityLoading: false,
    history: { samples: [], last: 0, interval: 5, span: 3600, timer: 0, started: false },
    playground: null,        // AbortController of the reply being streamed
    laloLog: null,           // AbortController of lalo's log stream
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
    stopLaloLog();
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
    renderModelChoices(models);
    const total = status.activity ? status.activity.total : 0;
    if (total !== app.activityTotal) refreshActivity(total);
    if (!app.history.started) { app.history.started = true; pollHistory(); }
  }

  function renderModelChoices(models) {
    const names = models.map((m) => m.name);
    const key = names.join("\n");
    if (key === app.modelNames) return;
    app.modelNames = key;
    const fill = (select, keepFirst) => {
      const chosen = select.value;
      const options = names.map((name) => {
        const option = document.createElement("option");
        option.value = name;
        option.textContent = name;
        return option;
      });
      select.replaceChildren(...(keepFirst ? [select.options[0]] : []), ...options);
      if (chosen && (names.includes(chosen) || (keepFirst && chosen === ""))) select.value = chosen;
    };
    fill(ui.pgModel, false);
    fill(ui.actModel, true);
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

  // --- lalo's own log ----------------------------------------------------------------------

  function stopLaloLog() {
    if (app.laloLog) app.laloLog.abort();
    app.laloLog = null;
    ui.laloLogText.hidden = true;
    ui.laloLogToggle.setAttribute("aria-expanded", "false");
    ui.laloLogToggle.classList.remove("active");
  }

  async function followLaloLog() {
    const controller = new AbortController();
    app.laloLog = controller;
    ui.laloLogText.hidden = false;
    ui.laloLogText.textContent = "";
    ui.laloLogNote.hidden = true;
    ui.laloLogToggle.setAttribute("aria-expanded", "true");
    ui.laloLogToggle.classList.add("active");
    try {
      await streamEvents(`api/logs/stream?n=${LOG_LINES}`, {
        signal: controller.signal,
        onData: (text) => appendLines(ui.laloLogText, text, true),
      });
    } catch (error) {
      if (controller.signal.aborted) return;
      ui.laloLogNote.hidden = false;
      setText(ui.laloLogNote, error instanceof Forbidden
        ? `lalo's log needs an admin key: ${error.message}` : `log unavailable: ${error.message}`);
      if (error instanceof Forbidden || error instanceof Unauthorized) { stopLaloLog(); return; }
    }
    if (app.laloLog === controller) {
      setTimeout(() => { if (app.laloLog === controller) followLaloLog(); }, STREAM_RETRY);
    }
  }

  ui.laloLogToggle.addEventListener("click", () => {
    if (app.laloLog) stopLaloLog(); else followLaloLog();
  });

  // --- playground --------------------------------------------------------------------------

  function seconds(value) {
    return value < 1 ? `${Math.round(value * 1000)} ms` : `${value.toFixed(2)} s`;
  }

  ui.pgForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (app.playground) return;
    const model = ui.pgModel.value;
    const messages = [];
    if (ui.pgSystem.value.trim()) messages.push({ role: "system", content: ui.pgSystem.value });
    messages.push({ role: "user", content: ui.pgMessage.value });
    const body = {
      model, messages, stream: true, stream_options: { include_usage: true },
      max_tokens: Number(ui.pgMax.value) || 256, temperature: Number(ui.pgTemp.value),
    };
    const controller = new AbortController();
    app.playground = controller;
    ui.pgSend.disabled = true;
    ui.pgStop.disabled = false;
    ui.pgReply.textContent = "";
    ui.pgReply.dataset.state = "waiting";
    for (const el of [ui.pgTtft, ui.pgTps, ui.pgTokens]) setText(el, "—");
    ui.pgStatus.classList.remove("error");
    setText(ui.pgStatus, `Asking ${model}…`);
    const started = performance.now();
    let first = 0;
    let pieces = 0;
    let usage = null;
    let timings = null;
    try {
      await streamEvents("v1/chat/completions", {
        method: "POST", body, signal: controller.signal,
        onData: (data) => {
          if (data === "[DONE]") return;
          let chunk;
          try { chunk = JSON.parse(data); } catch (_) { return; }
          if (chunk.error) throw new ApiError(chunk.error.message || "the model failed");
          if (chunk.usage) usage = chunk.usage;
          if (chunk.timings) timings = chunk.timings;
          const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
          const text = delta && (delta.content || delta.reasoning_content);
          if (!text) return;
          if (!first) {
            first = performance.now();
            setText(ui.pgTtft, seconds((first - started) / 1000));
            ui.pgReply.dataset.state = "streaming";
            setText(ui.pgStatus, "Streaming…");
          }
          pieces += 1;
          ui.pgReply.textContent += text;
          const elapsed = (performance.now() - first) / 1000;
          if (pieces > 1 && elapsed > 0) setText(ui.pgTps, ((pieces - 1) / elapsed).toFixed(1));
          setText(ui.pgTokens, String(pieces));
        },
      });
      const tokens = usage ? usage.completion_tokens : pieces;
      setText(ui.pgTokens, String(tokens));
      if (timings && timings.predicted_per_second) setText(ui.pgTps, timings.predicted_per_second.toFixed(1));
      ui.pgReply.dataset.state = "done";
      setText(ui.pgStatus, `Done in ${seconds((performance.now() - started) / 1000)}`);
    } catch (error) {
      ui.pgReply.dataset.state = "failed";
      if (controller.signal.aborted) {
        setText(ui.pgStatus, "Stopped");
      } else {
        ui.pgStatus.classList.add("error");
        setText(ui.pgStatus, error instanceof Unauthorized ? "lalo refused the key" : error.message);
      }
    } finally {
      app.playground = null;
      ui.pgSend.disabled = false;
      ui.pgStop.disabled = true;
    }
  });

  ui.pgStop.addEventListener("click", () => { if (app.playground) app.playground.abort(); });

  // --- activity ----------------------------------------------------------------------------

  async function refreshActivity(total) {
    if (app.activityLoading) return;  // the next status poll asks again
    app.activityLoading = true;
    const params = new URLSearchParams({ n: String(ACTIVITY_ROWS) });
    if (ui.actModel.value) params.set("model", ui.actModel.value);
    if (ui.actStatus.value) params.set("status", ui.actStatus.value);
    try {
      const body = await api(`api/activity?${params}`);
      app.activityTotal = total === undefined ? body.total : total;
      ui.actNote.hidden = true;
      renderActivity(body);
    } catch (error) {
      ui.actNote.hidden = false;
      if (error instanceof Forbidden) {
        app.activityTotal = total === undefined ? app.activityTotal : total;  // asking again will not help
        setText(ui.actNote, `The request history needs an admin key: ${error.message}`);
      } else if (!(error instanceof Unauthorized)) {
        setText(ui.actNote, `activity unavailable: ${error.message}`);
      }
    } finally {
      app.activityLoading = false;
    }
  }

  function cell(text, className) {
    const td = document.createElement("td");
    td.textContent = text;
    if (className) td.className = className;
    return td;
  }

  function renderActivity(body) {
    const rows = body.requests.map((r) => {
      const tr = document.createElement("tr");
      tr.dataset.testid = "activity-row";
      tr.dataset.model = r.model;
      tr.dataset.status = String(r.status);
      tr.dataset.route = r.route;
      const when = new Date(r.time * 1000);
      tr.append(
        cell(when.toLocaleTimeString()), cell(r.model), cell(r.route, "mono"),
        cell(String(r.status), r.status >= 400 ? "status bad" : "status"),
        cell(orDash(r.prompt_tokens), "num"), cell(orDash(r.completion_tokens), "num"),
        cell(r.ttft === null ? "—" : seconds(r.ttft), "num"), cell(seconds(r.duration), "num"),
        cell(r.tokens_per_s === null ? "—" : r.tokens_per_s.toFixed(1), "num"),
        cell(r.key || "—"), cell(r.client || "—", "mono"),
      );
      tr.title = when.toLocaleString();
      return tr;
    });
    ui.actRows.replaceChildren(...rows);
    setText(ui.actInfo, `${body.total} answered since start · newest ${rows.length} shown (kept: last ${body.size})`);
  }

  for (const select of [ui.actModel, ui.actStatus]) {
    select.addEventListener("change", () => refreshActivity());
  }

  // --- charts ------------------------------------------------------------------------------

  async function pollHistory() {
    const history = app.history;
    clearTimeout(history.timer);
    try {
      const body = await api(`api/history${history.last ? `?since=${history.last}` : ""}`);
      history.interval = body.interval;
      history.span = body.span;
      if (body.samples.length) {
        history.samples.push(...body.samples);
        history.last = body.samples[body.samples.length - 1].t;
        const keep = Math.ceil(body.span / body.interval);
        if (history.samples.length > keep) history.samples.splice(0, history.samples.length - keep);
      }
      drawCharts();
    } catch (_) {
      /* lalo away or locked: the status poll says so; try again at the next interval */
    } finally {
      history.timer = setTimeout(pollHistory, Math.max(1, history.interval) * 1000);
    }
  }

  function compact(value) {
    if (value === 0) return "0";
    const abs = Math.abs(value);
    if (abs >= 1024 ** 3) return `${(value / 1024 ** 3).toFixed(1)}G`;
    if (abs >= 1024 ** 2) return `${Math.round(value / 1024 ** 2)}M`;
    if (abs >= 100) return value.toFixed(0);
    if (abs >= 1) return value.toFixed(1);
    return value.toFixed(2);
  }

  function svgEl(name, attributes) {
    const el = document.createElementNS("http://www.w3.org/2000/svg", name);
    for (const [key, value] of Object.entries(attributes)) el.setAttribute(key, String(value));
    return el;
  }

  // lines: [{ name, colour, dashed, points: [[t, value], ...] }]; draws axes and polylines
  function drawChart(svg, lines, t0, t1) {
    const values = lines.flatMap((line) => line.points.map((p) => p[1]));
    const top = Math.max(...values, 0) || 1;
    const width = CHART_W - CHART_LEFT - 4;
    const height = CHART_H - CHART_TOP - CHART_BOTTOM;
    const x = (t) => CHART_LEFT + (t1 > t0 ? ((t - t0) / (t1 - t0)) * width : width);
    const y = (v) => CHART_TOP + height - (v / top) * height;
    const children = [];
    for (const fraction of [0, 0.5, 1]) {
      const yy = y(top * fraction).toFixed(1);
      children.push(svgEl("line", { x1: CHART_LEFT, x2: CHART_W - 4, y1: yy, y2: yy, class: "grid" }));
      const label = svgEl("text", { x: CHART_LEFT - 4, y: Number(yy) + 3, class: "axis", "text-anchor": "end" });
      label.textContent = compact(top * fraction);
      children.push(label);
    }
    const minutes = Math.round((t1 - t0) / 60);
    for (const [tt, text, anchor] of [[t0, minutes ? `-${minutes} min` : "", "start"], [t1, "now", "end"]]) {
      const label = svgEl("text", { x: x(tt), y: CHART_H - 3, class: "axis", "text-anchor": anchor });
      label.textContent = text;
      children.push(label);
    }
    let count = 0;
    for (const line of lines) {
      if (!line.points.length) continue;
      count += line.points.length;
      const points = line.points.map(([t, v]) => `${x(t).toFixed(1)},${y(v).toFixed(1)}`);
      if (points.length === 1) points.unshift(`${CHART_LEFT},${y(line.points[0][1]).toFixed(1)}`);
      const poly = svgEl("polyline", { points: points.join(" "), class: "series" + (line.dashed ? " dashed" : "") });
      poly.style.stroke = line.colour;
      poly.dataset.model = line.name;
      const title = svgEl("title", {});
      title.textContent = line.name;
      poly.append(title);
      children.push(poly);
    }
    svg.setAttribute("viewBox", `0 0 ${CHART_W} ${CHART_H}`);
    svg.replaceChildren(...children);
    svg.dataset.points = String(count);
  }

  function drawCharts() {
    const samples = app.history.samples;
    const info = samples.length
      ? `every ${app.history.interval} s · ${samples.length} samples`
      : `the first sample comes within ${app.history.interval} s`;
    setText(ui.chartsInfo, info);
    if (!samples.length) return;
    const t0 = samples[0].t;
    const t1 = samples[samples.length - 1].t;
    const names = [...new Set(samples.flatMap((s) => Object.keys(s.models)))];
    const series = (key, dashed = false) => names.map((name) => ({
      name, dashed, colour: `var(--m${colourOf(name)})`,
      points: samples.filter((s) => s.models[name] && s.models[name][key] !== null)
        .map((s) => [s.t, s.models[name][key]]),
    }));
    const chart = (kind) => document.querySelector(`svg.chart[data-kind="${kind}"]`);
    drawChart(chart("rps"), series("rps"), t0, t1);
    drawChart(chart("tps"), series("tps"), t0, t1);
    drawChart(chart("latency"), [...series("p50"), ...series("p95", true)], t0, t1);
    const budget = { name: "budget", dashed: true, colour: "var(--muted)", points: samples.map((s) => [s.t, s.budget]) };
    drawChart(chart("ram"), [...series("rss"), budget], t0, t1);
    drawChart(chart("queue"), series("queue"), t0, t1);
    const legendKey = names.join("\n");
    if (ui.chartLegend.dataset.key !== legendKey) {
      ui.chartLegend.dataset.key = legendKey;
      ui.chartLegend.replaceChildren(...names.map((name) => legendItem(`m${colourOf(name)}`, name)));
    }
  }

  storeKey(app.key);
  setConnection("connecting");
  poll();
})();
