// serve-edge's chat page: a conversation streamed from POST /v1/chat/completions.
//
// Each request asks for the `handoff_stream` extension: every streamed chunk then carries, per token
// in it, its text piece, its source (edge, cloud, corrected, ensembled), its KL and whether P checked
// it. The final chunk's `handoff` field holds the generation's summary (check points, handoffs, ...).
// Plain JS, no build step, nothing fetched but this server's own endpoints.
"use strict";

const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";
// Shown under "Policy settings", in this order, when /health reports them.
const POLICY_FIELDS = [
  "threshold", "check_interval", "handback_tokens", "aggregation", "top_k", "trigger",
  "lookahead_windows", "seed_tokens", "agree_tokens", "skip", "budget", "divergence",
];
const PLOT = { left: 30, right: 296, top: 6, bottom: 118 };

const state = {
  model: null,
  threshold: null,
  messages: [], // the conversation so far, re-sent with every request
  controller: null, // aborts the running request
  turn: null, // the answer being streamed
};

// -- server settings ------------------------------------------------------------------------------

async function loadHealth() {
  try {
    const response = await fetch("/health");
    const health = await response.json();
    state.model = health.model;
    const config = health.policy_config || {};
    state.threshold = typeof config.threshold === "number" ? config.threshold : null;
    const base = (path) => String(path).split("/").pop(); // a GGUF path: its file name
    const cloud = health.cloud && health.cloud.model ? base(health.cloud.model) : "none";
    const edge = base(health.edge_model);
    const alias = health.model === health.edge_model ? "" : `model ${health.model} · `;
    $("server-line").textContent =
      `${alias}edge ${edge} · cloud ${cloud} · mode ${health.mode} · policy ${health.policy}`;
    const rows = [["mode", health.mode], ["policy", health.policy], ["edge", edge],
      ["cloud", cloud]];
    if (health.cloud && health.cloud.backend) rows.push(["cloud backend", health.cloud.backend]);
    for (const name of POLICY_FIELDS) {
      if (name in config) rows.push([name, config[name]]);
    }
    rows.push(["n_ctx", health.n_ctx], ["max_queue", health.max_queue]);
    const list = $("policy-settings");
    list.replaceChildren();
    for (const [name, value] of rows) {
      const dt = document.createElement("dt");
      const dd = document.createElement("dd");
      dt.textContent = name;
      dd.textContent = value === null || value === undefined ? "–" : String(value);
      list.append(dt, dd);
    }
    drawPlot();
  } catch (error) {
    $("server-line").textContent = `cannot reach the server: ${error}`;
  }
}

// -- server-sent events ---------------------------------------------------------------------------

// Splits a text stream into the data of its events (blank-line separated; comments such as pings
// and fields other than data are dropped).
class SSEParser {
  constructor() {
    this.buffer = "";
    this.data = [];
  }

  push(text) {
    this.buffer += text;
    const events = [];
    let newline;
    while ((newline = this.buffer.search(/\r\n|\r|\n/)) >= 0) {
      const line = this.buffer.slice(0, newline);
      const width = this.buffer.startsWith("\r\n", newline) ? 2 : 1;
      this.buffer = this.buffer.slice(newline + width);
      if (line === "") {
        if (this.data.length) events.push(this.data.join("\n"));
        this.data = [];
      } else if (line.startsWith("data:")) {
        this.data.push(line.slice(line.startsWith("data: ") ? 6 : 5));
      }
    }
    return events;
  }
}

// -- one answer -----------------------------------------------------------------------------------

class Turn {
  constructor(element) {
    this.element = element;
    this.body = element.querySelector(".body");
    this.started = performance.now();
    this.tokens = 0;
    this.byClass = { edge: 0, cloud: 0, corrected: 0, ensembled: 0, unchecked: 0 };
    this.points = []; // [token index, kl, class] where P checked the token
    this.content = ""; // the answer's text as the deltas carry it
    this.covered = 0; // of it, characters the tokens' pieces have shown
    this.summary = null;
  }

  addTokens(detail) {
    const fragment = document.createDocumentFragment();
    detail.sources.forEach((source, i) => {
      const unchecked = detail.unchecked ? detail.unchecked[i] : null;
      const cls = source === "edge" && unchecked ? "unchecked" : source;
      const kl = detail.kl ? detail.kl[i] : null;
      const piece = detail.pieces ? detail.pieces[i] : "";
      const span = document.createElement("span");
      span.className = `tok ${cls}`;
      span.textContent = piece;
      span.title = `${cls}${unchecked ? ` (${unchecked})` : ""}` +
        (kl === null || kl === undefined ? "" : ` · KL ${kl.toFixed(3)}`);
      fragment.append(span);
      this.covered += piece.length;
      if (kl !== null && kl !== undefined) this.points.push([this.tokens, kl, cls]);
      this.tokens += 1;
      this.byClass[cls] = (this.byClass[cls] || 0) + 1;
    });
    this.body.append(fragment);
  }

  // Text the deltas carried that no token's piece showed (an unfinished character at the end).
  finishText() {
    if (this.content.length > this.covered) {
      this.body.append(document.createTextNode(this.content.slice(this.covered)));
      this.covered = this.content.length;
    }
  }

  cloudShare() {
    return this.tokens ? (this.byClass.cloud + this.byClass.corrected) / this.tokens : null;
  }
}

function addMessage(role, text) {
  $("empty-hint")?.remove();
  const element = document.createElement("div");
  element.className = `msg ${role}`;
  const label = document.createElement("span");
  label.className = "role";
  label.textContent = role === "user" ? "you" : "assistant";
  const body = document.createElement("span");
  body.className = "body";
  body.textContent = text;
  element.append(label, body);
  $("conversation").append(element);
  element.scrollIntoView({ block: "end" });
  return element;
}

// -- the live line and the plot -------------------------------------------------------------------

function fmt(value, digits = 0) {
  return value === null || value === undefined || !Number.isFinite(value) ? "–" : value.toFixed(digits);
}

function updateLive() {
  const turn = state.turn;
  if (!turn) return;
  const summary = turn.summary;
  let rate = null;
  if (summary && summary.seconds > 0) {
    rate = turn.tokens / summary.seconds;
  } else if (turn.tokens) {
    rate = turn.tokens / ((performance.now() - turn.started) / 1000);
  }
  $("stat-tokens").textContent = String(turn.tokens);
  const share = turn.cloudShare();
  $("stat-cloud-share").textContent = share === null ? "–" : `${Math.round(100 * share)}%`;
  $("stat-check-points").textContent = summary ? String(summary.check_points) : "…";
  $("stat-handoffs").textContent = summary ? String(summary.handoffs) : "…";
  $("stat-tps").textContent = fmt(rate, 1);
}

function svg(name, attributes) {
  const element = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, String(value));
  return element;
}

function drawPlot() {
  const points = state.turn ? state.turn.points : [];
  const n = Math.max(state.turn ? state.turn.tokens : 0, 10);
  // Up to 5 tau: what happens around the threshold stays visible; larger values sit on the top edge.
  const largest = Math.max(0, ...points.map((p) => p[1]));
  const tau = state.threshold || 0.05;
  const maxKL = Math.max(2 * tau, Math.min(largest, 5 * tau));
  const clipped = largest > maxKL;
  const x = (i) => PLOT.left + ((PLOT.right - PLOT.left) * (i + 0.5)) / n;
  const y = (kl) => PLOT.bottom - ((PLOT.bottom - PLOT.top) * Math.min(kl, maxKL)) / maxKL;

  const axes = $("kl-axes");
  axes.replaceChildren(
    svg("line", { x1: PLOT.left, x2: PLOT.right, y1: PLOT.bottom, y2: PLOT.bottom }),
    svg("line", { x1: PLOT.left, x2: PLOT.left, y1: PLOT.top, y2: PLOT.bottom }),
  );
  for (const [value, label] of [[0, "0"], [maxKL, `${clipped ? "≥" : ""}${+maxKL.toPrecision(2)}`]]) {
    const text = svg("text", { x: PLOT.left - 3, y: y(value) + 3, "text-anchor": "end" });
    text.textContent = label;
    axes.append(text);
  }
  const caption = svg("text", { x: (PLOT.left + PLOT.right) / 2, y: PLOT.bottom + 10, "text-anchor": "middle" });
  caption.textContent = `token (${state.turn ? state.turn.tokens : 0})`;
  axes.append(caption);

  const threshold = $("kl-threshold");
  const label = $("kl-threshold-label");
  if (state.threshold !== null) {
    const ty = y(state.threshold);
    threshold.setAttribute("y1", ty);
    threshold.setAttribute("y2", ty);
    threshold.setAttribute("visibility", "visible");
    label.setAttribute("y", ty - 2);
    label.setAttribute("visibility", "visible");
    label.textContent = `τ ${state.threshold}`;
  }

  $("kl-line").setAttribute("points", points.map(([i, kl]) => `${x(i).toFixed(1)},${y(kl).toFixed(1)}`).join(" "));
  const dots = $("kl-points");
  dots.replaceChildren(...points.map(([i, kl, cls]) => {
    const dot = svg("circle", { cx: x(i).toFixed(1), cy: y(kl).toFixed(1), r: 1.8, class: cls });
    const title = svg("title", {});
    title.textContent = `token ${i}: KL ${kl.toFixed(3)} (${cls})`;
    dot.append(title);
    return dot;
  }));
}

// -- sending --------------------------------------------------------------------------------------

function showError(message) {
  const error = $("error");
  error.textContent = message;
  error.hidden = !message;
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  $("new-chat").disabled = busy;
}

function requestBody() {
  const body = {
    model: state.model,
    messages: state.messages,
    stream: true,
    handoff_stream: true,
  };
  const maxTokens = parseInt($("max-tokens").value, 10);
  if (maxTokens > 0) body.max_tokens = maxTokens;
  const temperature = parseFloat($("temperature").value);
  if (Number.isFinite(temperature)) body.temperature = temperature;
  return body;
}

function onChunk(turn, chunk) {
  if (chunk.error) throw new Error(chunk.error.message);
  const choice = chunk.choices && chunk.choices[0];
  if (!choice) return;
  const text = choice.delta && choice.delta.content;
  if (text) turn.content += text;
  if (choice.finish_reason) {
    turn.summary = chunk.handoff || null;
  } else if (chunk.handoff && chunk.handoff.sources) {
    turn.addTokens(chunk.handoff);
  } else if (text) {
    turn.finishText(); // a server without the extension: plain text
  }
}

async function send(text) {
  showError("");
  if (!state.model) await loadHealth();
  state.messages.push({ role: "user", content: text });
  addMessage("user", text);
  const element = addMessage("assistant", "");
  element.classList.add("streaming");
  const turn = new Turn(element);
  state.turn = turn;
  state.controller = new AbortController();
  setBusy(true);
  updateLive();
  drawPlot();

  const headers = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) headers.Authorization = `Bearer ${key}`;
  const timer = setInterval(updateLive, 250);
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers,
      body: JSON.stringify(requestBody()),
      signal: state.controller.signal,
    });
    if (!response.ok) {
      let message = `${response.status} ${response.statusText}`;
      try {
        message = (await response.json()).error.message;
      } catch (_) { /* not the OpenAI error shape */ }
      if (response.status === 401) $("api-key").focus();
      throw new Error(message);
    }
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    const parser = new SSEParser();
    let done = false;
    while (!done) {
      const { value, done: ended } = await reader.read();
      if (ended) break;
      for (const data of parser.push(value)) {
        if (data === "[DONE]") {
          done = true;
          break;
        }
        onChunk(turn, JSON.parse(data));
      }
      updateLive();
      drawPlot();
      element.scrollIntoView({ block: "end" });
    }
    turn.finishText();
    state.messages.push({ role: "assistant", content: turn.content });
    element.classList.add("done");
  } catch (error) {
    if (error.name === "AbortError") {
      // Stopped by the user: the partial answer stays in the conversation.
      turn.finishText();
      state.messages.push({ role: "assistant", content: turn.content });
      element.classList.add("done", "stopped");
    } else {
      state.messages.pop(); // the question goes unanswered: leave it out of the next request
      element.classList.add("failed");
      showError(String(error.message || error));
    }
  } finally {
    clearInterval(timer);
    element.classList.remove("streaming");
    state.controller = null;
    setBusy(false);
    updateLive();
    drawPlot();
  }
}

// -- wiring ---------------------------------------------------------------------------------------

function submit(event) {
  event.preventDefault();
  const prompt = $("prompt");
  const text = prompt.value.trim();
  if (!text || state.controller) return;
  prompt.value = "";
  send(text);
}

document.addEventListener("DOMContentLoaded", () => {
  $("composer").addEventListener("submit", submit);
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) submit(event);
  });
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("new-chat").addEventListener("click", () => {
    state.messages = [];
    state.turn = null;
    $("conversation").replaceChildren();
    showError("");
    drawPlot();
    for (const id of ["stat-cloud-share", "stat-check-points", "stat-handoffs", "stat-tps"]) {
      $(id).textContent = "–";
    }
    $("stat-tokens").textContent = "0";
  });
  loadHealth();
});
