// The llmbus demo page: N concurrent POST requests, each read as a stream of server-sent events.
// The SSE endpoints are POST, so this uses fetch() with a streaming body reader, not EventSource.
"use strict";

const $ = (selector, root = document) => root.querySelector(selector);
const params = new URLSearchParams(location.search);
// Jaeger's UI: `?jaeger=URL`, else port 16686 on this host (compose.yml's Jaeger).
const JAEGER = (params.get("jaeger") || `${location.protocol}//${location.hostname}:16686`).replace(/\/$/, "");
const FALLBACK_MODELS = ["llama3.2:1b"];
// Embedding models cannot chat: by name (nomic-embed-text, multilingual-e5-small, bge-m3,
// all-minilm) or by the family the inventory reports (nomic-bert, bert).
const EMBEDDING = /embed|minilm|bge|gte-|(^|[-_.])e5([-_.:]|$)|bert/i;
function canChat(model) {
  const names = typeof model === "string" ? [model] : [model.id, ...(model.hosts || []).map((h) => h.family)];
  return !names.some((name) => name && EMBEDDING.test(name));
}

const state = { tasks: new Map(), runs: new Set() };

// With LLMBUS_AUTH=on the API wants a key: `?key=KEY` once, kept in this browser's localStorage.
if (params.get("key")) localStorage.setItem("llmbus_key", params.get("key"));
const auth = () => {
  const key = localStorage.getItem("llmbus_key");
  return key ? { authorization: `Bearer ${key}` } : {};
};

async function getJSON(url) {
  const response = await fetch(url, { headers: { accept: "application/json", ...auth() } });
  if (!response.ok) throw new Error(`${url}: ${response.status}`);
  return response.json();
}

// Chat models from whatever inventory the edge offers; the task defaults otherwise.
async function discoverModels() {
  try {
    const body = await getJSON("/v1/models");
    const list = body.data || body.models || [];
    const names = list
      .filter(canChat)
      .map((m) => (typeof m === "string" ? m : m.id || m.model || m.name))
      .filter(Boolean);
    if (names.length) return [...new Set(names)];
  } catch (_) { /* no inventory route: fall back */ }
  const defaults = [...state.tasks.values()].map((t) => t.model);
  return [...new Set([...defaults, ...FALLBACK_MODELS])];
}

async function init() {
  try {
    const { tasks } = await getJSON("/v1/tasks");
    for (const task of tasks) state.tasks.set(task.name, task);
  } catch (error) {
    showFormError(`Could not list tasks: ${error.message}`);
  }
  const models = await discoverModels();
  const modelGroup = $("#models");
  const names = $("#model-names");
  for (const name of models) {
    if (name === "auto") continue;
    modelGroup.append(new Option(name, `model:${name}`));
    names.append(new Option(name));
  }
  for (const task of state.tasks.values()) {
    const option = new Option(`${task.name}: ${task.description}`, `task:${task.name}`);
    $("#tasks").append(option);
  }
  const wanted = params.get("target");
  if (wanted && [...$("#target").options].some((o) => o.value === wanted)) $("#target").value = wanted;
  else if (models.length) $("#target").value = `model:${models.find((m) => m !== "auto") || "auto"}`;
  if (params.get("count")) $("#count").value = params.get("count");
  $("#target").addEventListener("change", renderTarget);
  $("#controls").addEventListener("submit", (event) => { event.preventDefault(); runAll(); });
  $("#cancel-all").addEventListener("click", () => { for (const run of state.runs) run.cancel(); });
  renderTarget();
  document.body.dataset.ready = "true";
}

function currentTarget() {
  const [kind, ...rest] = $("#target").value.split(":");
  return { kind, name: rest.join(":") };
}

// The prompt box carries the task's first required text input; the other inputs get fields
// generated from the task's input schema.
function promptField(task) {
  const props = task.input_schema.properties || {};
  const required = task.input_schema.required || [];
  return required.find((k) => props[k] && props[k].type === "string") || Object.keys(props)[0];
}

function renderTarget() {
  const target = currentTarget();
  const fields = $("#task-fields");
  fields.replaceChildren();
  const task = target.kind === "task" ? state.tasks.get(target.name) : null;
  $("#task-inputs").hidden = true;
  $("#model-row").hidden = !task;
  $("#prompt-label").textContent = task ? `Prompt (input “${promptField(task)}”)` : "Prompt";
  if (!task) return;
  if ($("#prompt").dataset.example !== task.name && task.name === "badge") {
    $("#prompt").value = "Python for Data Analysis (6 weeks). Learners load, clean and reshape tabular data " +
      "with pandas, plot distributions with matplotlib, and present a reproducible analysis notebook " +
      "on an open data set as the final project.";
    $("#prompt").dataset.example = task.name;
  }
  const main = promptField(task);
  const props = task.input_schema.properties || {};
  const required = new Set(task.input_schema.required || []);
  for (const [name, schema] of Object.entries(props)) {
    if (name === main) continue;
    const id = `input-${name}`;
    const row = document.createElement("div");
    row.className = "row";
    const label = document.createElement("label");
    label.htmlFor = id;
    label.textContent = `${name}${required.has(name) ? " (required)" : ""}`;
    let control;
    if (schema.type === "object" || schema.type === "array") {
      control = document.createElement("textarea");
      control.rows = 4;
      control.dataset.json = "true";
      const example = (schema.examples && schema.examples[0]) || schema.default;
      control.value = example === undefined ? "" : JSON.stringify(example, null, 2);
    } else {
      control = document.createElement("input");
      control.type = schema.type === "integer" || schema.type === "number" ? "number" : "text";
      if (schema.minimum !== undefined) control.min = schema.minimum;
      if (schema.maximum !== undefined) control.max = schema.maximum;
      if (schema.default !== undefined && schema.default !== "") control.value = schema.default;
    }
    control.id = id;
    control.name = name;
    control.required = required.has(name);
    control.dataset.type = schema.type || "string";
    if (schema.description) {
      const help = document.createElement("p");
      help.className = "help";
      help.id = `${id}-help`;
      help.textContent = schema.description;
      control.setAttribute("aria-describedby", help.id);
      row.append(label, control, help);
    } else {
      row.append(label, control);
    }
    fields.append(row);
    $("#task-inputs").hidden = false;
  }
}

function taskInput(task) {
  const input = { [promptField(task)]: $("#prompt").value };
  for (const control of $("#task-fields").querySelectorAll("input, textarea")) {
    if (control.value === "") continue;
    if (control.dataset.json) input[control.name] = JSON.parse(control.value);
    else if (control.dataset.type === "integer" || control.dataset.type === "number") input[control.name] = Number(control.value);
    else input[control.name] = control.value;
  }
  return input;
}

function showFormError(message) {
  const box = $("#form-error");
  box.textContent = message;
  box.hidden = !message;
}

function runAll() {
  showFormError("");
  const count = Math.max(1, Math.min(8, Number($("#count").value) || 1));
  const target = currentTarget();
  let url, body;
  try {
    if (target.kind === "task") {
      const task = state.tasks.get(target.name);
      url = `/v1/tasks/${encodeURIComponent(task.name)}`;
      body = { input: taskInput(task), stream: true };
      if ($("#model").value.trim()) body.model = $("#model").value.trim();
    } else {
      url = "/v1/chat";
      body = { model: target.name, messages: [{ role: "user", content: $("#prompt").value }], stream: true };
    }
  } catch (error) {
    showFormError(`Task inputs: ${error.message}`);
    return;
  }
  for (const run of state.runs) run.cancel();
  const panes = $("#panes");
  panes.replaceChildren();
  for (let i = 0; i < count; i++) {
    const run = new Run(i + 1, url, body);
    panes.append(run.pane);
    state.runs.add(run);
    run.start().finally(() => {
      state.runs.delete(run);
      $("#cancel-all").disabled = state.runs.size === 0;
    });
  }
  $("#cancel-all").disabled = false;
}

// One request and its pane.
class Run {
  constructor(index, url, body) {
    this.url = url;
    this.body = body;
    this.controller = new AbortController();
    this.pane = $("#pane-template").content.firstElementChild.cloneNode(true);
    this.pane.id = `pane-${index}`;
    this.pane.setAttribute("aria-labelledby", `pane-${index}-title`);
    const title = $(".title", this.pane);
    title.id = `pane-${index}-title`;
    title.textContent = `Request ${index}`;
    const cancel = $(".cancel", this.pane);
    cancel.setAttribute("aria-label", `Cancel request ${index}`);
    cancel.addEventListener("click", () => this.cancel());
    this.text = document.createTextNode("");
    $(".text", this.pane).append(this.text);
    this.tokens = 0;
    this.firstTokenAt = null;
    this.finished = false;
    this.frame = 0;
  }

  setState(name, label = name) {
    this.pane.dataset.state = name;
    $(".state", this.pane).textContent = label;
    if (["done", "error", "cancelled"].includes(name)) {
      this.finished = true;
      $(".cancel", this.pane).disabled = true;
    }
  }

  note(message) {
    const note = $(".note", this.pane);
    note.textContent = message;
    note.hidden = !message;
  }

  cancel() {
    if (this.finished) return;
    this.controller.abort();  // the edge sees the hang-up and cancels the request upstream
    this.setState("cancelled");
  }

  async start() {
    this.startedAt = performance.now();
    this.setState("waiting", "connecting");
    let response;
    try {
      response = await fetch(this.url, {
        method: "POST",
        headers: { "content-type": "application/json", accept: "text/event-stream", ...auth() },
        body: JSON.stringify(this.body),
        signal: this.controller.signal,
      });
    } catch (error) {
      if (!this.finished) this.fail("network", error.message);
      return;
    }
    this.showTrace(response.headers);
    this.pane.dataset.requestId = response.headers.get("x-request-id") || "";
    if (!response.ok) {
      let detail = { code: String(response.status), message: response.statusText };
      try { detail = (await response.json()).error || detail; } catch (_) { /* not JSON */ }
      this.fail(detail.code, detail.message);
      return;
    }
    this.setState("streaming");
    try {
      await this.read(response.body.getReader());
      if (!this.finished) this.fail("incomplete", "the stream ended without a done or error event");
    } catch (error) {
      if (!this.finished) this.fail("network", error.message);
    }
  }

  async read(reader) {
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        let type = "message";
        const data = [];
        for (const line of block.split("\n")) {
          if (line.startsWith("event:")) type = line.slice(6).trim();
          else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
        }
        if (data.length) this.onEvent(type, JSON.parse(data.join("\n")));
      }
    }
  }

  onEvent(type, data) {
    switch (type) {
      case "start":
        $(".model", this.pane).textContent = data.model;
        break;
      case "routed":
        $(".model", this.pane).textContent = `${data.model} (routed: ${data.route}, ${data.method})`;
        $(".model", this.pane).title = data.why || "";
        break;
      case "token":
        if (this.firstTokenAt === null) {
          this.firstTokenAt = performance.now();
          $(".ttft", this.pane).textContent = `${Math.round(this.firstTokenAt - this.startedAt)} ms`;
        }
        this.tokens += 1;
        this.text.appendData(data.text);
        this.scheduleStats();
        break;
      case "restart":
      case "retry":
        this.text.data = "";
        this.note(type === "retry" ? `Retrying: ${data.reason}` : `Restarted: ${data.reason}`);
        break;
      case "done":
        this.showStats(data.timings && data.timings.tokens_per_s);
        if (data.output !== undefined) {
          const details = $(".output", this.pane);
          $(".json", this.pane).textContent = JSON.stringify(data.output, null, 2);
          details.hidden = false;
          details.open = true;
        }
        this.setState("done");
        break;
      case "error":
        this.fail(data.code, data.message);
        break;
      default:
        break;  // event types this page does not know yet are ignored
    }
  }

  // Stats are redrawn at most once per frame, however fast tokens arrive.
  scheduleStats() {
    if (this.frame) return;
    this.frame = requestAnimationFrame(() => { this.frame = 0; this.showStats(); });
  }

  showStats(serverRate) {
    $(".tokens", this.pane).textContent = String(this.tokens);
    if (serverRate) {
      $(".tps", this.pane).textContent = serverRate.toFixed(1);
    } else if (this.firstTokenAt !== null && this.tokens > 1) {
      const seconds = (performance.now() - this.firstTokenAt) / 1000;
      $(".tps", this.pane).textContent = seconds > 0 ? ((this.tokens - 1) / seconds).toFixed(1) : "-";
    }
  }

  showTrace(headers) {
    // W3C traceparent: 00-<32 hex trace id>-<16 hex span id>-<flags>
    const parent = headers.get("traceparent");
    const traceId = headers.get("x-trace-id") || (parent && parent.split("-")[1]);
    if (!traceId) return;
    const link = document.createElement("a");
    link.href = `${JAEGER}/trace/${traceId}`;
    link.target = "_blank";
    link.rel = "noopener";
    link.textContent = traceId.slice(0, 12) + "…";
    link.setAttribute("aria-label", `Trace ${traceId} in Jaeger`);
    $(".trace", this.pane).replaceChildren(link);
  }

  fail(code, message) {
    this.showStats();
    this.note(`${code}: ${message}`);
    this.setState(code === "cancelled" ? "cancelled" : "error", code === "cancelled" ? "cancelled" : `error: ${code}`);
  }
}

init();
