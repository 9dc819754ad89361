// The chat page of `dllama-mpi api`: plain JS, no dependencies, talks to this server's own
// OpenAI-compatible endpoints. Everything the model (or the user) writes is put on the page with
// textContent, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "dllama-mpi.api-key";
const SETTINGS_STORE = "dllama-mpi.settings";

const state = {
  model: null,          // id from /v1/models
  context: null,        // its context length
  key: localStorage.getItem(KEY_STORE) || "",
  history: [],          // [{role, content}] of the conversation shown
  controller: null,     // AbortController of the answer being streamed
  keyWaiters: null,     // pending promise callbacks while the key dialog is open
};

// ---------------------------------------------------------------------------------------------
// the API key: asked once, kept in this browser

function askKey(refused) {
  if (!state.keyWaiters) {
    state.keyWaiters = [];
    $("key-error").hidden = !refused;
    $("key-input").value = "";
    $("key-dialog").showModal();
    $("key-input").focus();
  }
  return new Promise((resolve) => state.keyWaiters.push(resolve));
}

function onKeySubmit(ev) {
  ev.preventDefault();
  const key = $("key-input").value.trim();
  if (!key) return;
  state.key = key;
  localStorage.setItem(KEY_STORE, key);
  $("forget-key").hidden = false;
  $("key-dialog").close();
  const waiters = state.keyWaiters || [];
  state.keyWaiters = null;
  waiters.forEach((resolve) => resolve(key));
}

// fetch with the key; a 401 opens the key dialog and retries with the new key
async function api(path, init = {}) {
  for (let refused = !!state.key; ; refused = true) {
    const headers = { "Content-Type": "application/json" };
    if (state.key) headers.Authorization = "Bearer " + state.key;
    const r = await fetch(path, { ...init, headers });
    if (r.status !== 401) return r;
    await askKey(refused);
  }
}

async function errorText(r) {
  try {
    const j = await r.json();
    if (j.error && j.error.message) return j.error.message;
  } catch (_) { /* not JSON */ }
  return `HTTP ${r.status}`;
}

// ---------------------------------------------------------------------------------------------
// settings

function loadSettings() {
  try {
    const s = JSON.parse(localStorage.getItem(SETTINGS_STORE) || "{}");
    if (typeof s.system === "string") $("system").value = s.system;
    if (s.temperature !== undefined) $("temperature").value = s.temperature;
    if (s.maxTokens !== undefined) $("max-tokens").value = s.maxTokens;
    if (s.settingsOpen === false) toggleSettings(false);
  } catch (_) { /* ignore a damaged entry */ }
}

function saveSettings() {
  localStorage.setItem(SETTINGS_STORE, JSON.stringify({
    system: $("system").value, temperature: $("temperature").value, maxTokens: $("max-tokens").value,
    settingsOpen: !document.body.classList.contains("settings-closed"),
  }));
}

function toggleSettings(open) {
  const closed = open === undefined ? !document.body.classList.contains("settings-closed") : !open;
  document.body.classList.toggle("settings-closed", closed);
  $("settings-toggle").setAttribute("aria-expanded", String(!closed));
}

function readNumber(id, lo, hi, fallback, integer) {
  const v = Number($(id).value);
  if ($(id).value === "" || !Number.isFinite(v)) return fallback;
  const x = Math.min(hi, Math.max(lo, integer ? Math.round(v) : v));
  return x;
}

// ---------------------------------------------------------------------------------------------
// the transcript

function addMessage(role, text) {
  $("empty").hidden = true;
  const msg = document.createElement("div");
  msg.className = "msg " + role;
  const who = document.createElement("div");
  who.className = "role";
  who.textContent = role === "user" ? "You" : "Assistant";
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;
  msg.append(who, body);
  if (role === "assistant") {
    const meta = document.createElement("div");
    meta.className = "meta";
    const stats = document.createElement("span");
    stats.className = "stats";
    const copy = document.createElement("button");
    copy.type = "button";
    copy.className = "copy ghost small";
    copy.textContent = "Copy";
    copy.addEventListener("click", () => copyText(body.textContent, copy));
    meta.append(stats, copy);
    msg.append(meta);
  }
  $("messages").append(msg);
  scrollDown(true);
  return msg;
}

function nearBottom() {
  const m = $("messages");
  return m.scrollHeight - m.scrollTop - m.clientHeight < 80;
}

function scrollDown(force) {
  const m = $("messages");
  if (force || nearBottom()) m.scrollTop = m.scrollHeight;
}

async function copyText(text, button) {
  let ok = false;
  try {
    await navigator.clipboard.writeText(text);
    ok = true;
  } catch (_) {   // no clipboard API (plain http from another host): the old way
    const ta = document.createElement("textarea");
    ta.value = text;
    ta.setAttribute("readonly", "");
    ta.style.position = "fixed";
    ta.style.opacity = "0";
    document.body.append(ta);
    ta.select();
    try { ok = document.execCommand("copy"); } catch (_) { ok = false; }
    ta.remove();
  }
  button.textContent = ok ? "Copied" : "Copy failed";
  button.classList.toggle("done", ok);
  setTimeout(() => { button.textContent = "Copy"; button.classList.remove("done"); }, 1500);
}

function setStatus(text) {
  $("status").textContent = text;
}

function setBusy(busy) {
  document.body.classList.toggle("busy", busy);
  $("send").hidden = busy;
  $("stop").hidden = !busy;
}

// ---------------------------------------------------------------------------------------------
// one question, one streamed answer

function fmtRate(tokens, ms) {
  return tokens > 0 && ms > 0 ? (1000 * tokens / ms).toFixed(1) + " tok/s" : "– tok/s";
}

async function send() {
  const text = $("input").value;
  if (!text.trim() || state.controller) return;
  $("input").value = "";
  autoGrow();
  addMessage("user", text);
  state.history.push({ role: "user", content: text });
  const msg = addMessage("assistant", "");
  const body = msg.querySelector(".text");
  const stats = msg.querySelector(".stats");
  msg.dataset.state = "waiting";
  stats.textContent = "evaluating the prompt…";

  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...state.history);
  const request = {
    model: state.model || undefined, messages, stream: true, stream_options: { include_usage: true },
    temperature: readNumber("temperature", 0, 2, 0.7, false),
    max_tokens: readNumber("max-tokens", 1, state.context || 1e9, 512, true),
  };

  const controller = state.controller = new AbortController();
  setBusy(true);
  const t0 = performance.now();
  let answer = "", pieces = 0, tFirst = 0, tLast = 0, usage = null, finish = null, outcome = "done";
  const live = () => {
    const n = pieces;
    stats.textContent = `${n} token${n === 1 ? "" : "s"} · ${fmtRate(n - 1, tLast - tFirst)}`;
    setStatus(`Generating… ${stats.textContent}`);
  };
  try {
    const r = await api("/v1/chat/completions", {
      method: "POST", body: JSON.stringify(request), signal: controller.signal,
    });
    if (!r.ok) throw new Error(await errorText(r));
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true }).replace(/\r/g, "");
      let end;
      while ((end = buf.indexOf("\n\n")) >= 0) {   // one SSE event per blank-line-terminated block
        const event = buf.slice(0, end);
        buf = buf.slice(end + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") continue;
          const j = JSON.parse(data);
          if (j.error) throw new Error(j.error.message || "the server reported an error");
          if (j.usage) usage = j.usage;
          const choice = j.choices && j.choices[0];
          if (!choice) continue;
          const piece = choice.delta && choice.delta.content;
          if (piece) {
            const now = performance.now();
            if (!pieces) { tFirst = now; msg.dataset.state = "streaming"; }
            tLast = now;
            pieces += 1;
            answer += piece;
            const follow = nearBottom();
            body.textContent = answer;
            if (follow) scrollDown(true);
            live();
          }
          if (choice.finish_reason) finish = choice.finish_reason;
        }
      }
    }
  } catch (e) {
    if (e.name === "AbortError") {
      outcome = "stopped";
    } else {
      outcome = "error";
      const err = document.createElement("div");
      err.className = "error";
      err.textContent = e.message || String(e);
      msg.append(err);
    }
  } finally {
    state.controller = null;
    setBusy(false);
  }

  msg.dataset.state = outcome;
  const n = usage ? usage.completion_tokens : pieces;   // the usage counts tokens without text too
  const parts = [`${n} token${n === 1 ? "" : "s"}`, fmtRate(pieces - 1, tLast - tFirst)];
  if (usage) {
    const cached = usage.prompt_tokens_details ? usage.prompt_tokens_details.cached_tokens : 0;
    parts.push(`prompt ${usage.prompt_tokens}` + (cached ? ` (${cached} cached)` : ""));
  }
  if (outcome === "stopped") parts.push("stopped");
  else if (finish === "length") parts.push("hit max tokens");
  parts.push(((performance.now() - t0) / 1000).toFixed(1) + " s");
  stats.textContent = outcome === "error" ? "failed" : parts.join(" · ");
  setStatus(outcome === "error" ? "" : `Last answer: ${stats.textContent}`);
  if (answer) {
    state.history.push({ role: "assistant", content: answer });
  } else {
    state.history.pop();   // nothing came back: the question is not part of the conversation
    if (outcome === "stopped") body.textContent = "(stopped before the first token)";
  }
  $("input").focus();
}

function stop() {
  if (state.controller) state.controller.abort();   // the server stops the generation when we hang up
}

function newChat() {
  stop();
  state.history = [];
  for (const m of [...$("messages").querySelectorAll(".msg")]) m.remove();
  $("empty").hidden = false;
  setStatus("");
  $("input").focus();
}

function autoGrow() {
  const ta = $("input");
  ta.style.height = "auto";
  ta.style.height = Math.min(ta.scrollHeight, 220) + "px";
}

// ---------------------------------------------------------------------------------------------

async function loadModel() {
  try {
    const r = await api("/v1/models");
    if (!r.ok) throw new Error(await errorText(r));
    const card = (await r.json()).data[0];
    state.model = card.id;
    state.context = card.context_length || null;
    $("model").textContent = card.id;
    $("model").title = state.context ? `${card.id}, context ${state.context} tokens` : card.id;
    document.title = `${card.id} · dllama-mpi`;
    document.body.dataset.ready = "1";
  } catch (e) {
    $("model").textContent = "server unreachable";
    setStatus(`Could not reach the server: ${e.message || e}`);
  }
}

function init() {
  loadSettings();
  $("forget-key").hidden = !state.key;
  $("form").addEventListener("submit", (ev) => { ev.preventDefault(); send(); });
  $("input").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
      ev.preventDefault();
      send();
    } else if (ev.key === "Escape") {
      stop();
    }
  });
  $("input").addEventListener("input", autoGrow);
  $("stop").addEventListener("click", stop);
  $("new-chat").addEventListener("click", newChat);
  $("settings-toggle").addEventListener("click", () => { toggleSettings(); saveSettings(); });
  for (const id of ["system", "temperature", "max-tokens"]) $(id).addEventListener("change", saveSettings);
  $("key-form").addEventListener("submit", onKeySubmit);
  $("key-dialog").addEventListener("cancel", (ev) => ev.preventDefault());   // the page needs a key
  $("forget-key").addEventListener("click", () => {
    localStorage.removeItem(KEY_STORE);
    state.key = "";
    $("forget-key").hidden = true;
  });
  loadModel();
  $("input").focus();
}

init();
