// The stepserve chat playground: no framework, no build step, nothing fetched but this server.
// Model output only ever reaches the page as text nodes (plain text, or markdown parsed here
// into elements whose text is set with textContent): never as HTML.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const KEY_STORE = "stepserve.apiKey"; // sessionStorage: this tab only, gone when it closes
  const state = { messages: [], controller: null };

  // -- API key -------------------------------------------------------------------------------

  const apiKey = () => sessionStorage.getItem(KEY_STORE) || "";

  function requestHeaders() {
    const headers = { "Content-Type": "application/json" };
    if (apiKey()) headers.Authorization = "Bearer " + apiKey();
    return headers;
  }

  // Shows the key dialog; resolves to true once the user gave a key.
  function askForKey(message) {
    return new Promise((resolve) => {
      const dialog = $("key-dialog");
      $("key-error").textContent = message;
      $("api-key").value = "";
      dialog.addEventListener("close", () => {
        const key = $("api-key").value.trim();
        if (key) sessionStorage.setItem(KEY_STORE, key);
        resolve(Boolean(key));
      }, { once: true });
      dialog.showModal();
    });
  }

  // fetch with the key; a 401 asks for a key and tries again.
  async function apiFetch(path, options = {}) {
    for (;;) {
      const response = await fetch(path, { ...options, headers: requestHeaders() });
      if (response.status !== 401) return response;
      const refused = apiKey() !== "";
      sessionStorage.removeItem(KEY_STORE);
      if (!(await askForKey(refused ? "The server refused that key; try another." : ""))) return response;
    }
  }

  // -- rendering -----------------------------------------------------------------------------

  const el = (tag, text) => {
    const node = document.createElement(tag);
    if (text !== undefined) node.textContent = text;
    return node;
  };

  const LIST_ITEM = /^\s*([-*+]|\d+[.)])\s+/;
  const INLINE = /(`[^`]+`)|(\*\*[^*]+\*\*)|(\*[^*\s][^*]*\*)|(\[[^\]]+\]\(https?:\/\/[^\s)]+\))/;

  function inline(text) {
    const out = [];
    while (text) {
      const m = text.match(INLINE);
      if (!m) { out.push(document.createTextNode(text)); break; }
      if (m.index) out.push(document.createTextNode(text.slice(0, m.index)));
      const token = m[0];
      if (m[1]) out.push(el("code", token.slice(1, -1)));
      else if (m[2]) { const b = el("strong"); b.append(...inline(token.slice(2, -2))); out.push(b); }
      else if (m[3]) { const i = el("em"); i.append(...inline(token.slice(1, -1))); out.push(i); }
      else out.push(link(token));
      text = text.slice(m.index + token.length);
    }
    return out;
  }

  function link(token) {
    const [, label, href] = token.match(/^\[([^\]]+)\]\((.+)\)$/);
    const a = el("a", label);
    a.href = href; // the pattern admits http(s) URLs only
    a.rel = "noopener noreferrer nofollow";
    a.target = "_blank";
    return a;
  }

  function codeBlock(lines, i, nodes) {
    const code = [];
    for (i += 1; i < lines.length && !/^\s*```\s*$/.test(lines[i]); i += 1) code.push(lines[i]);
    const pre = el("pre");
    pre.append(el("code", code.join("\n")));
    nodes.push(pre);
    return i + 1;
  }

  // A list runs on across blank lines between its items ("1. a", "", "2. b" is one list).
  function list(lines, i, nodes) {
    const number = lines[i].match(/^\s*(\d+)/);
    const node = el(number ? "ol" : "ul");
    if (number) node.start = Number(number[1]);
    while (i < lines.length) {
      if (LIST_ITEM.test(lines[i])) {
        const item = el("li");
        item.append(...inline(lines[i].replace(LIST_ITEM, "")));
        node.append(item);
        i += 1;
        continue;
      }
      let next = i;
      while (next < lines.length && !lines[next].trim()) next += 1;
      if (next === i || next === lines.length || !LIST_ITEM.test(lines[next])) break;
      i = next;
    }
    nodes.push(node);
    return i;
  }

  const startsBlock = (line) => /^\s*```/.test(line) || /^#{1,6}\s/.test(line) || LIST_ITEM.test(line);

  function paragraph(lines, i, nodes) {
    const p = el("p");
    for (let first = true; i < lines.length && lines[i].trim() && (first || !startsBlock(lines[i])); i += 1, first = false) {
      if (!first) p.append(el("br"));
      p.append(...inline(lines[i]));
    }
    nodes.push(p);
    return i;
  }

  // A small markdown subset: fenced code, headings, lists, paragraphs, `code`, **bold**, *em*, links.
  function markdown(text) {
    const nodes = [];
    const lines = text.split("\n");
    let i = 0;
    while (i < lines.length) {
      const line = lines[i];
      const heading = line.match(/^(#{1,6})\s+(.*)$/);
      if (/^\s*```/.test(line)) i = codeBlock(lines, i, nodes);
      else if (heading) {
        const h = el("h" + Math.min(heading[1].length + 2, 6));
        h.append(...inline(heading[2]));
        nodes.push(h);
        i += 1;
      } else if (LIST_ITEM.test(line)) i = list(lines, i, nodes);
      else if (!line.trim()) i += 1;
      else i = paragraph(lines, i, nodes);
    }
    return nodes;
  }

  function renderContent(node, text) {
    const plain = $("render").value === "text";
    node.className = plain ? "content plain" : "content";
    if (plain) node.textContent = text;
    else node.replaceChildren(...markdown(text));
  }

  function addView(message) {
    const root = el("div");
    root.className = "message " + message.role;
    const content = el("div");
    const stats = el("div");
    stats.className = "stats";
    // A reasoning model's thinking (--reasoning-parser), folded above its answer.
    const thinking = el("details");
    thinking.className = "thinking";
    thinking.hidden = true;
    thinking.append(el("summary", "thinking"), el("div"));
    root.append(el("div", message.role), thinking, content, stats);
    root.firstChild.className = "role";
    $("messages").append(root);
    message.view = { root, content, stats, thinking };
    renderContent(content, message.content);
    root.scrollIntoView({ block: "end" });
    return message.view;
  }

  function rerenderAll() {
    for (const message of state.messages) renderContent(message.view.content, message.content);
  }

  // -- sending -------------------------------------------------------------------------------

  function numberField(id) {
    const value = $(id).value.trim();
    return value === "" ? undefined : Number(value);
  }

  function requestBody() {
    const system = $("system").value.trim();
    const history = state.messages.filter((m) => m.sent).map((m) => ({ role: m.role, content: m.content }));
    const stop = $("stop").value.split("\n").filter((s) => s !== "");
    const body = {
      model: $("model").value,
      messages: system ? [{ role: "system", content: system }, ...history] : history,
      stream: true,
      stream_options: { include_usage: true },
      temperature: numberField("temperature"),
      top_p: numberField("top_p"),
      max_tokens: numberField("max_tokens"),
    };
    if (stop.length) body.stop = stop;
    return body;
  }

  // Live figures under an answer: tokens, decode speed after the first token, time to first token.
  function showStats(reply, timing, tokens, note) {
    const parts = note ? [note] : [];
    const now = performance.now();
    if (timing.first !== null) {
      parts.push(`${tokens} tokens`);
      if (tokens > 1 && now > timing.first) parts.push(`${((tokens - 1) * 1000 / (now - timing.first)).toFixed(1)} tok/s`);
      parts.push(`TTFT ${Math.round(timing.first - timing.start)} ms`);
    }
    reply.view.stats.textContent = parts.join(" · ");
  }

  function handleEvent(event, reply, timing) {
    for (const line of event.split("\n")) {
      if (!line.startsWith("data:")) continue;
      const payload = line.slice(5).trim();
      if (payload === "[DONE]") return;
      const chunk = JSON.parse(payload);
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) timing.usage = chunk.usage;
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
      if (delta && delta.reasoning_content) {
        if (timing.first === null) timing.first = performance.now();
        timing.chunks += 1;
        reply.reasoning = (reply.reasoning || "") + delta.reasoning_content;
        reply.view.thinking.hidden = false;
        reply.view.thinking.lastChild.textContent = reply.reasoning;
      }
      if (delta && delta.content) {
        if (timing.first === null) timing.first = performance.now();
        timing.chunks += 1;
        reply.content += delta.content;
      }
    }
  }

  async function readStream(response, reply, timing) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        handleEvent(buffer.slice(0, cut), reply, timing);
        buffer = buffer.slice(cut + 2);
      }
      renderContent(reply.view.content, reply.content);
      showStats(reply, timing, timing.chunks, "");
      reply.view.root.scrollIntoView({ block: "end" });
    }
  }

  async function errorMessage(response) {
    const body = await response.json().catch(() => null);
    return (body && body.error && body.error.message) || `HTTP ${response.status}`;
  }

  function setBusy(busy) {
    $("send").disabled = busy;
    $("stop-button").disabled = !busy;
  }

  function finish(reply, timing, outcome, note) {
    reply.view.root.dataset.state = outcome;
    reply.sent = outcome !== "error" && reply.content !== "";
    const tokens = timing.usage ? timing.usage.completion_tokens : timing.chunks;
    renderContent(reply.view.content, reply.content);
    showStats(reply, timing, tokens, note);
    state.controller = null;
    setBusy(false);
  }

  async function send(text) {
    const user = { role: "user", content: text, sent: true };
    state.messages.push(user);
    addView(user);
    const body = requestBody();
    const reply = { role: "assistant", content: "", sent: false };
    state.messages.push(reply);
    addView(reply).root.dataset.state = "streaming";
    const timing = { start: performance.now(), first: null, chunks: 0, usage: null };
    state.controller = new AbortController();
    setBusy(true);
    try {
      const response = await apiFetch("/v1/chat/completions", { method: "POST", body: JSON.stringify(body), signal: state.controller.signal });
      if (!response.ok) throw new Error(await errorMessage(response));
      await readStream(response, reply, timing);
      finish(reply, timing, "done", "");
    } catch (error) {
      if (error.name === "AbortError") finish(reply, timing, "stopped", "stopped");
      else {
        reply.view.root.classList.add("error");
        finish(reply, timing, "error", "error: " + error.message);
      }
    }
  }

  // -- set-up --------------------------------------------------------------------------------

  async function loadModels() {
    const status = $("server-status");
    try {
      const response = await apiFetch("/v1/models");
      if (!response.ok) throw new Error(await errorMessage(response));
      const models = (await response.json()).data;
      $("model").replaceChildren(...models.map((m) => { const o = el("option", m.id); o.value = m.id; return o; }));
      const first = models[0];
      status.textContent = first && first.max_model_len ? `context: ${first.max_model_len} tokens` : "";
      document.body.dataset.ready = "true";
    } catch (error) {
      status.textContent = "could not list models: " + error.message;
      status.className = "error";
    }
  }

  function clearConversation() {
    if (state.controller) state.controller.abort();
    state.messages = [];
    $("messages").replaceChildren();
  }

  function wire() {
    $("composer").addEventListener("submit", (event) => {
      event.preventDefault();
      const text = $("prompt").value.trim();
      if (!text || state.controller) return;
      $("prompt").value = "";
      send(text);
    });
    $("prompt").addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); $("composer").requestSubmit(); }
    });
    $("stop-button").addEventListener("click", () => state.controller && state.controller.abort());
    $("clear").addEventListener("click", clearConversation);
    $("render").addEventListener("change", rerenderAll);
    loadModels();
  }

  wire();
})();
