// Lumos viewer: create a session, watch its frames stream in over a WebSocket, extend it,
// download it as mp4, and reopen earlier sessions whose tokens this browser keeps.
"use strict";

const $ = (id) => document.getElementById(id);

const keys = {
  owner() {
    let key = localStorage.getItem("lumos.owner");
    if (!key || !/^[A-Za-z0-9_-]{16,128}$/.test(key)) {
      const bytes = crypto.getRandomValues(new Uint8Array(24));
      key = Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
      localStorage.setItem("lumos.owner", key);
    }
    return key;
  },
  tokens() {
    try {
      const value = JSON.parse(localStorage.getItem("lumos.tokens") || "{}");
      return value && typeof value === "object" ? value : {};
    } catch {
      return {};
    }
  },
  save(id, token) {
    const all = this.tokens();
    all[id] = token;
    localStorage.setItem("lumos.tokens", JSON.stringify(all));
  },
  drop(id) {
    const all = this.tokens();
    delete all[id];
    localStorage.setItem("lumos.tokens", JSON.stringify(all));
  },
};

// The open session and its stream.
const view = {
  id: null,
  token: null,
  status: "idle",
  frames: [], // object URLs, index = seq
  shown: -1,
  live: true,
  socket: null,
  retries: 0,
  timer: null,
  player: null,
};

function showError(message) {
  const el = $("error");
  el.textContent = message || "";
  el.hidden = !message;
}

async function api(method, path, body, token) {
  const headers = { "X-Lumos-Owner": keys.owner() };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (token) headers.Authorization = `Bearer ${token}`;
  const res = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  let data = null;
  if (res.status !== 204) data = await res.json().catch(() => null);
  if (!res.ok) {
    const err = new Error((data && data.error) || `${res.status} ${res.statusText}`);
    err.status = res.status;
    throw err;
  }
  return data;
}

function numberOrNull(id) {
  const raw = $(id).value.trim();
  return raw === "" ? null : Number(raw);
}

function readFileBase64(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result));
    reader.onerror = () => reject(new Error("could not read the image file"));
    reader.readAsDataURL(file);
  });
}

function pngUrl(b64) {
  const bin = atob(b64);
  const bytes = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
  return URL.createObjectURL(new Blob([bytes], { type: "image/png" }));
}

// -- rendering ----------------------------------------------------------------------------

function setStatus(status, error) {
  view.status = status || "idle";
  const el = $("status");
  el.textContent = error ? `${view.status}: ${error}` : view.status;
  el.className = `status ${view.status}`;
  $("extend").disabled = !view.id || view.status === "running";
}

function show(seq) {
  if (seq < 0 || seq >= view.frames.length) return;
  view.shown = seq;
  $("frame").src = view.frames[seq];
  $("frame-index").textContent = String(seq);
  for (const thumb of $("filmstrip").children) {
    thumb.classList.toggle("current", Number(thumb.dataset.seq) === seq);
  }
}

function addFrame(seq, b64) {
  if (seq !== view.frames.length) return; // the server sends each frame once, in order
  const url = pngUrl(b64);
  view.frames.push(url);
  const thumb = document.createElement("img");
  thumb.src = url;
  thumb.dataset.seq = String(seq);
  thumb.alt = `frame ${seq}`;
  thumb.title = `frame ${seq}`;
  thumb.addEventListener("click", () => {
    view.live = false;
    stopPlayer();
    show(seq);
  });
  $("filmstrip").appendChild(thumb);
  $("frame-count").textContent = String(view.frames.length);
  $("play").disabled = false;
  $("live").disabled = false;
  if (view.live && !view.player) show(seq);
  thumb.scrollIntoView({ block: "nearest", inline: "end" });
}

function stopPlayer() {
  if (view.player) clearInterval(view.player);
  view.player = null;
  $("play").textContent = "Play";
}

function togglePlay() {
  if (view.player) {
    stopPlayer();
    return;
  }
  view.live = false;
  let seq = 0;
  $("play").textContent = "Pause";
  view.player = setInterval(() => {
    if (!view.frames.length) return;
    show(seq % view.frames.length);
    seq += 1;
  }, 125);
}

// -- streaming ----------------------------------------------------------------------------

function connect() {
  clearTimeout(view.timer);
  if (!view.id) return;
  const id = view.id;
  const from = view.frames.length;
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const url =
    `${scheme}://${location.host}/api/sessions/${encodeURIComponent(id)}/stream` +
    `?token=${encodeURIComponent(view.token)}&from=${from}`;
  const socket = new WebSocket(url);
  view.socket = socket;
  $("connection").textContent = `connecting (from frame ${from})...`;
  socket.onmessage = (event) => {
    if (view.socket !== socket) return;
    view.retries = 0;
    const msg = JSON.parse(event.data);
    if (msg.type === "frame") {
      addFrame(msg.seq, msg.png);
      $("connection").textContent = "live";
    } else if (msg.type === "state") {
      setStatus(msg.status, msg.error);
      $("connection").textContent = "live";
      if (msg.status !== "running") loadSessions();
    } else if (msg.type === "error") {
      showError(msg.error);
    }
  };
  socket.onclose = (event) => {
    if (view.socket !== socket) return;
    view.socket = null;
    if ([4400, 4401, 4403, 4404].includes(event.code)) {
      $("connection").textContent = `stream closed: ${event.reason || event.code}`;
      return; // refused (bad token, unknown session): retrying will not help
    }
    const delay = Math.min(5000, 250 * 2 ** view.retries);
    view.retries += 1;
    $("connection").textContent = `disconnected; reconnecting in ${(delay / 1000).toFixed(1)} s`;
    view.timer = setTimeout(() => {
      if (view.id === id) connect();
    }, delay);
  };
}

function open(id, token, state) {
  if (view.socket) {
    const old = view.socket;
    view.socket = null;
    old.close();
  }
  clearTimeout(view.timer);
  stopPlayer();
  for (const url of view.frames) URL.revokeObjectURL(url);
  Object.assign(view, { id, token, frames: [], shown: -1, live: true, retries: 0 });
  $("filmstrip").replaceChildren();
  $("frame").removeAttribute("src");
  $("frame-count").textContent = "0";
  $("frame-index").textContent = "-";
  const link = $("download");
  if (!id) {
    $("session-id").textContent = "none";
    link.href = "#";
    link.classList.add("disabled");
    setStatus("idle");
    return;
  }
  $("session-id").textContent = id;
  link.href = `/api/sessions/${encodeURIComponent(id)}/video.mp4?token=${encodeURIComponent(token)}`;
  link.classList.remove("disabled");
  link.setAttribute("download", `lumos-${id}.mp4`);
  setStatus(state ? state.status : "idle", state && state.error);
  connect();
}

// -- actions ------------------------------------------------------------------------------

async function generate(event) {
  event.preventDefault();
  showError("");
  const button = $("generate");
  button.disabled = true;
  try {
    const body = { prompt: $("prompt").value, frames: numberOrNull("frames") };
    for (const [field, id] of [["steps", "steps"], ["cfg", "cfg"], ["seed", "seed"]]) {
      const value = numberOrNull(id);
      if (value !== null) body[field] = value;
    }
    const file = $("image").files[0];
    if (file) body.image = await readFileBase64(file);
    const created = await api("POST", "/api/sessions", body);
    keys.save(created.id, created.token);
    open(created.id, created.token, created.state);
    loadSessions();
  } catch (err) {
    showError(err.message);
  } finally {
    button.disabled = false;
  }
}

async function extend(event) {
  event.preventDefault();
  showError("");
  if (!view.id) return;
  const body = { frames: numberOrNull("extend-frames") };
  const prompt = $("extend-prompt").value.trim();
  if (prompt) body.prompt = prompt;
  $("extend").disabled = true;
  try {
    const state = await api("POST", `/api/sessions/${encodeURIComponent(view.id)}/extend`, body, view.token);
    view.live = true;
    stopPlayer();
    setStatus(state.status, state.error);
    if (!view.socket) connect();
  } catch (err) {
    showError(err.message);
    setStatus(view.status);
  }
}

async function remove(id) {
  const token = keys.tokens()[id];
  if (!token || !confirm("Delete this session and its frames?")) return;
  try {
    await api("DELETE", `/api/sessions/${encodeURIComponent(id)}`, undefined, token);
  } catch (err) {
    if (err.status !== 404) {
      showError(err.message);
      return;
    }
  }
  keys.drop(id);
  if (view.id === id) open(null, null, null);
  loadSessions();
}

async function loadSessions() {
  let list;
  try {
    list = (await api("GET", "/api/sessions")).sessions;
  } catch (err) {
    showError(err.message);
    return;
  }
  const tokens = keys.tokens();
  const items = list.map((s) => {
    const li = document.createElement("li");
    li.dataset.id = s.id;
    const text = document.createElement("span");
    const when = s.created ? new Date(s.created * 1000).toLocaleString() : "";
    text.textContent = `${s.prompt || "(no prompt)"} - ${s.n_frames} frames, ${s.status} ${when}`;
    li.appendChild(text);
    const openButton = document.createElement("button");
    openButton.type = "button";
    openButton.className = "open";
    openButton.textContent = "Open";
    openButton.disabled = !tokens[s.id];
    openButton.title = tokens[s.id] ? "reopen and continue" : "this browser has no key for it";
    openButton.addEventListener("click", async () => {
      showError("");
      try {
        const state = await api("GET", `/api/sessions/${encodeURIComponent(s.id)}`, undefined, tokens[s.id]);
        open(s.id, tokens[s.id], state);
      } catch (err) {
        showError(err.message);
      }
    });
    li.appendChild(openButton);
    const del = document.createElement("button");
    del.type = "button";
    del.className = "delete";
    del.textContent = "Delete";
    del.disabled = !tokens[s.id];
    del.addEventListener("click", () => remove(s.id));
    li.appendChild(del);
    return li;
  });
  $("sessions").replaceChildren(...items);
}

async function loadLimits() {
  try {
    const { limits } = await api("GET", "/api/config");
    $("prompt").maxLength = limits.max_prompt_chars;
    $("extend-prompt").maxLength = limits.max_prompt_chars;
    $("frames").max = limits.max_frames_per_request;
    $("extend-frames").max = limits.max_frames_per_request;
    $("steps").min = limits.min_steps;
    $("steps").max = limits.max_steps;
    $("cfg").min = limits.min_cfg;
    $("cfg").max = limits.max_cfg;
  } catch {
    // the defaults in the page still apply
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("create-form").addEventListener("submit", generate);
  $("extend-form").addEventListener("submit", extend);
  $("refresh").addEventListener("click", loadSessions);
  $("play").addEventListener("click", togglePlay);
  $("live").addEventListener("click", () => {
    stopPlayer();
    view.live = true;
    show(view.frames.length - 1);
  });
  $("download").addEventListener("click", (event) => {
    if (!view.id) event.preventDefault();
  });
  loadLimits();
  loadSessions();
});
