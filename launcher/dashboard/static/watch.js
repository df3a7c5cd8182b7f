// lalo dashboard, the try-and-watch panels: the playground (a streamed chat completion), the
// activity list, the charts of the last hour (SVG of our own) and lalo's own log. Built on
// what app.js shares as window.lalo; everything from the server is written as text.
"use strict";

(function () {
  const {
    api, streamEvents, setText, orDash, seconds, colourOf, legendItem, appendLines,
    Unauthorized, ApiError, Forbidden, LOG_LINES, STREAM_RETRY,
  } = window.lalo;
  const ACTIVITY_ROWS = 50;
  const CHART_W = 320, CHART_H = 130, CHART_LEFT = 40, CHART_BOTTOM = 16, CHART_TOP = 8;
  const byId = (id) => document.getElementById(id);

  const ui = {
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
    modelNames: "",          // the names the selects were filled with
    activityTotal: -1,       // requests lalo had answered when the list was last fetched
    activityLoading: false,
    history: { samples: [], last: 0, interval: 5, span: 3600, timer: 0, started: false },
    playground: null,        // AbortController of the reply being streamed
    laloLog: null,           // AbortController of lalo's log stream
  };

  window.lalo.onStatus((status) => {
    renderModelChoices(status.models || []);
    const total = status.activity ? status.activity.total : 0;
    if (total !== app.activityTotal) refreshActivity(total);
    if (!app.history.started) { app.history.started = true; pollHistory(); }
  });
  window.lalo.onLock(() => stopLaloLog());
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden && app.history.started) pollHistory();
  });

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
      if (document.hidden) return;  // a background tab reads nothing; caught up when shown
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
})();
