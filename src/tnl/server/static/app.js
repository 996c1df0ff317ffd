// The tnl chat page: streams replies from /v1/chat/completions (OpenAI SSE) and keeps the turns.
// Model text only ever reaches the page through textContent / text nodes, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "tnl.apiKey";
// A line starting with ``` (optionally followed by a language name) opens or closes a code block.
const FENCE = /^ {0,3}```[^\n]*(?:\n|$)/m;

let history = [];       // the conversation after the system prompt: {role, content}, ...
let controller = null;  // AbortController of the reply being streamed, null when idle

function render(el, text) {
  const nodes = [];
  let inCode = false;
  for (let rest = text; ;) {
    const fence = FENCE.exec(rest);
    const part = fence ? rest.slice(0, fence.index) : rest;
    if (inCode) {  // an unclosed fence (a reply still streaming) is code up to the end
      const pre = document.createElement("pre");
      const code = document.createElement("code");
      code.textContent = part.replace(/\n$/, "");
      pre.append(code);
      nodes.push(pre);
    } else if (part) {
      nodes.push(document.createTextNode(part));
    }
    if (!fence) break;
    rest = rest.slice(fence.index + fence[0].length);
    inCode = !inCode;
  }
  el.replaceChildren(...nodes);
}

function nearBottom() {
  const m = $("messages");
  return m.scrollHeight - m.scrollTop - m.clientHeight < 80;
}

function addBubble(role, text) {
  const el = document.createElement("div");
  el.className = "msg " + role;
  el.setAttribute("aria-label", role === "user" ? "You" : "Assistant");
  render(el, text);
  $("messages").append(el);
  $("messages").scrollTop = $("messages").scrollHeight;
  return el;
}

// Calls draw() once in the next animation frame however often schedule() is called before it;
// flush() draws now if a frame is still pending (a hidden tab runs no frames until shown).
function framePainter(draw) {
  let pending = 0;
  const run = () => {
    pending = 0;
    draw();
  };
  return {
    schedule() {
      if (!pending) pending = requestAnimationFrame(run);
    },
    flush() {
      if (pending) {
        cancelAnimationFrame(pending);
        run();
      }
    },
  };
}

function addNote(after, text) {
  const note = document.createElement("div");
  note.className = "note";
  note.textContent = text;
  after.after(note);
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
}

function hideError() {
  $("error").hidden = true;
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

// fetch with the API key; a refusal or an unreachable server becomes an Error in plain words.
async function api(path, options = {}) {
  const headers = { ...options.headers };
  const key = $("api-key").value.trim();
  if (key) headers.Authorization = "Bearer " + key;
  let res;
  try {
    res = await fetch(path, { ...options, headers });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new Error(`Cannot reach the server at ${location.origin}. Is tnl still running?`);
  }
  if (res.ok) return res;
  let message = `HTTP ${res.status} ${res.statusText}`;
  try {
    message = (await res.json()).error.message || message;
  } catch {
    // not OpenAI error JSON (a proxy's error page, say): keep the status line
  }
  if (res.status === 401) {
    $("settings").open = true;
    throw new Error(`This server needs an API key (${message}). Enter it under Settings.`);
  }
  throw new Error(`The server could not answer: ${message}`);
}

// POST the chat and call onText(delta) for each piece of the reply until `data: [DONE]`.
async function streamReply(body, signal, onText) {
  const res = await api("/v1/chat/completions", {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body), signal,
  });
  const reader = res.body.getReader();
  const decoder = new TextDecoder();  // with stream: true it holds back a character split across reads
  let buffer = "";
  let data = [];  // the data: lines of the event being read
  for (;;) {
    let chunk;
    try {
      chunk = await reader.read();
    } catch (e) {
      if (e.name === "AbortError") throw e;
      throw new Error("The connection to the server was lost before the reply was complete.");
    }
    buffer += decoder.decode(chunk.value, { stream: !chunk.done });
    const lines = buffer.split(/\r?\n/);
    buffer = chunk.done ? "" : lines.pop();
    for (const line of lines) {
      if (line.startsWith("data:")) {
        data.push(line.slice(line.startsWith("data: ") ? 6 : 5));
      } else if (line === "" && data.length) {  // a blank line ends an event
        const payload = data.join("\n");
        data = [];
        if (payload === "[DONE]") return;
        const event = JSON.parse(payload);
        if (event.error) throw new Error(`The server stopped the reply: ${event.error.message}`);
        const delta = event.choices?.[0]?.delta?.content;
        if (delta) onText(delta);
      }
    }
    if (chunk.done) throw new Error("The server closed the connection before the reply was complete.");
  }
}

function samplingFields() {
  const fields = {};
  const temperature = $("temperature").valueAsNumber;
  const maxTokens = $("max-tokens").valueAsNumber;
  if (!Number.isNaN(temperature)) fields.temperature = temperature;
  if (!Number.isNaN(maxTokens)) fields.max_tokens = maxTokens;  // the server checks the range
  return fields;
}

async function send() {
  const text = $("input").value;
  if (!text.trim() || controller) return;
  hideError();
  const system = $("system").value.trim();
  const user = { role: "user", content: text };
  const reply = { role: "assistant", content: "" };
  const body = {
    messages: [...(system ? [{ role: "system", content: system }] : []), ...history, user],
    stream: true,
    ...samplingFields(),
  };
  const userEl = addBubble("user", text);
  const replyEl = addBubble("assistant", "");
  $("input").value = "";
  history.push(user, reply);
  controller = new AbortController();
  // Tokens can arrive far faster than frames: the reply is drawn at most once per frame, so a
  // long fast stream costs one render per frame, not one per token, and the page (its Stop
  // button too) stays responsive.
  const painter = framePainter(() => {
    const stick = nearBottom();
    render(replyEl, reply.content);
    if (stick) $("messages").scrollTop = $("messages").scrollHeight;
  });
  setBusy(true);
  try {
    await streamReply(body, controller.signal, (delta) => {
      reply.content += delta;
      painter.schedule();
    });
  } catch (e) {
    if (e.name === "AbortError") {
      addNote(replyEl, "stopped");  // the partial reply stays in the conversation
    } else if (reply.content) {
      addNote(replyEl, "cut short");
      showError(e.message);
    } else {  // nothing came back: take the turn back so it can be edited and sent again
      history.splice(history.indexOf(user), 2);
      userEl.remove();
      replyEl.remove();
      if (!$("input").value) $("input").value = text;
      showError(e.message);
    }
  } finally {
    painter.flush();  // the last tokens are on the page before the note or the next turn
    controller = null;
    setBusy(false);
  }
}

function newChat() {
  if (controller) controller.abort();
  history = [];
  $("messages").replaceChildren();
  hideError();
  $("input").focus();
}

async function loadModelName() {
  $("model").textContent = "connecting…";
  hideError();
  try {
    const models = await (await api("/v1/models")).json();
    $("model").textContent = "model: " + models.data[0].id;
  } catch (e) {
    $("model").textContent = "model: unknown";
    showError(e.message);
  }
}

function saveApiKey() {
  const key = $("api-key").value.trim();
  try {
    if (key) localStorage.setItem(KEY_STORE, key);
    else localStorage.removeItem(KEY_STORE);
  } catch {
    // storage disabled (private mode): the key still works until the page is closed
  }
  loadModelName();
}

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  send();
});
$("input").addEventListener("keydown", (e) => {
  // isComposing: Enter that picks a candidate in a Chinese / Japanese input method must not send
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    send();
  }
});
$("stop").addEventListener("click", () => controller && controller.abort());
$("new-chat").addEventListener("click", newChat);
$("api-key").addEventListener("change", saveApiKey);

try {
  $("api-key").value = localStorage.getItem(KEY_STORE) || "";
} catch {
  // storage disabled: start without a key
}
loadModelName();
$("input").focus();
