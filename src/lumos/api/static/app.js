// Lumos viewer: create a session, watch its frames stream in over a WebSocket, extend it (once, or
// continuously in Live mode), stop it, download it as mp4, and reopen earlier sessions whose
// tokens this browser keeps. The session token travels only in an Authorization header or in the
// WebSocket's first message, never in a URL or in the page. Keys, HTTP calls and the offline
// banner are in net.js.
import { api, hooks, keys, probe, request } from "./net.js";

const $ = (id) => document.getElementById(id);

const THUMBS = 40; // thumbnails kept in the strip (older ones are removed)
const KEEP = 64; // frame images kept in memory as blob URLs (older ones are revoked)
const LIVE_CHUNK = 4; // frames asked for per extend in Live mode
const FPS_WINDOW = 30; // frames/s is measured over the last this many frames
const REFUSED = [4400, 4401, 4403, 4404, 4410]; // stream close codes a retry cannot fix
const STATUS_TEXT = { queued: "queued", running: "running", done: "done", idle: "done", failed: "failed" };

// The open session and its stream.
const view = {
  id: null,
  token: null,
  gen: 0, // bumped by open(): async results for an older session are dropped
  status: "none", // queued | running | done | failed | none
  serverFrames: 0, // n_frames in the last state seen
  target: null,
  prompts: [],
  received: 0, // frames received = the next seq expected
  urls: new Map(), // seq -> blob URL, oldest first (at most KEEP, plus the strip and the shown one)
  shown: -1,
  follow: true, // show each new frame as it arrives
  player: null,
  socket: null,
  retries: 0,
  timer: null,
  live: false,
  liveBusy: false,
  promptNow: false, // Enter was pressed while an extend was on its way (with the old prompt)
  liveRound: 0, // extends Live mode has made (a pending retry of an older round is dropped)
  times: [], // arrival times of the last FPS_WINDOW frames (ms)
};

// The server's limits (from /api/config).
const server = { limits: null };

const busy = () => view.status === "queued" || view.status === "running";

function showError(message) {
  const el = $("error");
  el.textContent = message || "";
  el.hidden = !message;
}

function announce(message) {
  $("announce").textContent = message;
}

// An error for the person: offline is told by the banner, everything else here.
function reportError(err) {
  if (!err.offline) showError(err.message);
}

function sessionPath(suffix = "") {
  return `/api/sessions/${encodeURIComponent(view.id)}${suffix}`;
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

function currentPrompt() {
  const last = view.prompts[view.prompts.length - 1];
  return last ? String(last[1]) : "";
}

function setState(state) {
  const before = view.status;
  view.status = STATUS_TEXT[state.status] || String(state.status || "none");
  view.serverFrames = Number(state.n_frames || 0);
  view.target = state.target === null || state.target === undefined ? null : Number(state.target);
  if (Array.isArray(state.prompts)) view.prompts = state.prompts;
  const el = $("status");
  el.textContent = view.id ? view.status : "no session";
  el.className = `status ${view.id ? view.status : "none"}`;
  el.title = state.error || "";
  $("current-prompt").textContent = currentPrompt();
  if (view.id && view.status !== before) {
    let text = `Session ${view.status}`;
    if (view.status === "done") text += `: ${view.serverFrames} frames`;
    if (view.status === "failed") text += `: ${state.error || "unknown error"}`;
    // Live mode goes queued -> running -> done every few frames: say only that it is on
    if (!view.live || view.status === "failed") announce(text);
    if (view.status === "failed") {
      showError(`The generation failed: ${state.error || "unknown error"}`);
      setLive(false);
    }
  }
  renderButtons();
  if (view.live && !busy()) liveStep();
}

function renderButtons() {
  const has = Boolean(view.id);
  $("extend").disabled = !has || busy() || view.live;
  $("stop").disabled = !has || !(busy() || view.live);
  $("live").disabled = !has;
  $("download").disabled = !has || view.received === 0;
  $("save-frame").disabled = !has || view.shown < 0;
  $("play").disabled = view.received === 0;
  $("latest").disabled = view.received === 0;
  $("seek").disabled = view.received === 0;
}

function markCurrent(seq) {
  const strip = $("filmstrip");
  let current = null;
  for (const thumb of strip.children) {
    const on = Number(thumb.dataset.seq) === seq;
    thumb.classList.toggle("current", on);
    if (on) thumb.setAttribute("aria-current", "true");
    else thumb.removeAttribute("aria-current");
    thumb.tabIndex = -1;
    if (on) current = thumb;
  }
  // one tab stop for the whole strip (arrow keys move inside it)
  const stop = current || strip.lastElementChild;
  if (stop) stop.tabIndex = 0;
}

async function show(seq) {
  if (seq < 0 || seq >= view.received) return;
  view.shown = seq;
  $("frame-index").textContent = String(seq);
  $("seek").value = String(seq);
  markCurrent(seq);
  renderButtons();
  let url = view.urls.get(seq);
  if (!url) {
    // an older frame no longer kept in memory: fetch it (bearer header, never ?token=)
    const gen = view.gen;
    let blob;
    try {
      blob = await (await request("GET", sessionPath(`/frames/${seq}.png`), { token: view.token })).blob();
    } catch (err) {
      reportError(err);
      return;
    }
    if (gen !== view.gen) return;
    url = view.urls.get(seq);
    if (!url) {
      url = URL.createObjectURL(blob);
      view.urls.set(seq, url);
      trimFrames();
    }
    if (view.shown !== seq) return;
  }
  $("frame").src = url;
  $("frame").alt = `frame ${seq}`;
}

// Revoke the oldest blob URLs past KEEP, except those the strip or the main view shows.
function trimFrames() {
  if (view.urls.size <= KEEP) return;
  const firstThumb = view.received - THUMBS;
  for (const [seq, url] of view.urls) {
    if (view.urls.size <= KEEP) break;
    if (seq === view.shown || seq >= firstThumb) continue;
    URL.revokeObjectURL(url);
    view.urls.delete(seq);
  }
}

function makeThumb(seq, url) {
  const thumb = document.createElement("button");
  thumb.type = "button";
  thumb.className = "thumb";
  thumb.dataset.seq = String(seq);
  thumb.tabIndex = -1;
  thumb.setAttribute("aria-label", `frame ${seq}`);
  thumb.title = `frame ${seq}`;
  const img = document.createElement("img");
  img.src = url;
  img.alt = "";
  thumb.appendChild(img);
  return thumb;
}

function addFrame(seq, b64) {
  if (seq !== view.received) return; // the server sends each frame once, in order
  const url = pngUrl(b64);
  view.urls.set(seq, url);
  view.received += 1;
  const strip = $("filmstrip");
  const keepFocus = strip.contains(document.activeElement);
  strip.appendChild(makeThumb(seq, url));
  while (strip.children.length > THUMBS) {
    const oldest = strip.firstElementChild;
    if (keepFocus && oldest === document.activeElement) oldest.nextElementSibling.focus();
    oldest.remove();
  }
  trimFrames();
  const now = performance.now();
  view.times.push(now);
  if (view.times.length > FPS_WINDOW) view.times.shift();
  if (view.times.length >= 2) {
    const span = (view.times[view.times.length - 1] - view.times[0]) / 1000;
    $("fps").textContent = span > 0 ? ((view.times.length - 1) / span).toFixed(1) : "-";
  }
  $("frame-count").textContent = String(view.received);
  $("seek").max = String(view.received - 1);
  if (view.follow && !view.player) show(seq);
  else markCurrent(view.shown);
  renderButtons();
  strip.scrollLeft = strip.scrollWidth;
  // the last frame of this extend: in Live mode ask for the next one without waiting for the state
  if (view.live && view.target !== null && view.received >= view.target) liveStep(true);
}

function stopPlayer() {
  if (view.player) clearTimeout(view.player.timer);
  view.player = null;
  $("play").textContent = "Play";
}

function togglePlay() {
  if (view.player) {
    stopPlayer();
    return;
  }
  view.follow = false;
  const player = { seq: 0, timer: null };
  view.player = player;
  $("play").textContent = "Pause";
  const step = async () => {
    if (view.player !== player || !view.received) return;
    await show(player.seq % view.received);
    player.seq += 1;
    if (view.player === player) player.timer = setTimeout(step, 125);
  };
  step();
}

function onStripKey(event) {
  const thumb = event.target.closest(".thumb");
  if (!thumb) return;
  const strip = $("filmstrip");
  let next = null;
  if (event.key === "ArrowLeft") next = thumb.previousElementSibling;
  else if (event.key === "ArrowRight") next = thumb.nextElementSibling;
  else if (event.key === "Home") next = strip.firstElementChild;
  else if (event.key === "End") next = strip.lastElementChild;
  else return;
  event.preventDefault();
  if (next) {
    next.focus();
    selectFrame(Number(next.dataset.seq));
  }
}

function selectFrame(seq) {
  view.follow = false;
  stopPlayer();
  show(seq);
}

// -- streaming ----------------------------------------------------------------------------

function connect() {
  clearTimeout(view.timer);
  if (view.socket) {
    const old = view.socket;
    view.socket = null;
    old.close();
  }
  if (!view.id) return;
  const id = view.id;
  const token = view.token;
  const from = view.received;
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const url = `${scheme}://${location.host}${sessionPath("/stream")}?from=${from}`;
  const socket = new WebSocket(url);
  view.socket = socket;
  $("connection").textContent = `connecting (from frame ${from})...`;
  socket.onopen = () => socket.send(JSON.stringify({ type: "auth", token }));
  socket.onmessage = (event) => {
    if (view.socket !== socket) return;
    view.retries = 0;
    const msg = JSON.parse(event.data);
    if (msg.type === "frame") {
      addFrame(msg.seq, msg.png);
      $("connection").textContent = "live";
    } else if (msg.type === "state") {
      setState(msg);
      $("connection").textContent = "live";
      if (!busy() && !view.live) loadSessions();
    } else if (msg.type === "error") {
      showError(msg.error);
    }
  };
  socket.onclose = (event) => {
    if (view.socket !== socket) return;
    view.socket = null;
    if (REFUSED.includes(event.code)) {
      $("connection").textContent = `stream closed: ${event.reason || event.code}`;
      return; // refused (bad token, unknown session): retrying will not help
    }
    const delay = Math.min(5000, 250 * 2 ** view.retries);
    view.retries += 1;
    $("connection").textContent = `disconnected; reconnecting in ${(delay / 1000).toFixed(1)} s`;
    if (view.retries >= 2) probe(); // shows the offline banner if the server is gone
    view.timer = setTimeout(() => {
      if (view.id === id) connect();
    }, delay);
  };
}

function open(id, token, state) {
  view.gen += 1;
  if (view.socket) {
    const old = view.socket;
    view.socket = null;
    old.close();
  }
  clearTimeout(view.timer);
  stopPlayer();
  view.live = false;
  renderLive();
  for (const url of view.urls.values()) URL.revokeObjectURL(url);
  Object.assign(view, {
    id,
    token,
    urls: new Map(),
    received: 0,
    shown: -1,
    follow: true,
    retries: 0,
    status: "none",
    prompts: [],
    target: null,
    times: [],
    promptNow: false,
  });
  $("filmstrip").replaceChildren();
  $("frame").removeAttribute("src");
  $("frame-count").textContent = "0";
  $("frame-index").textContent = "-";
  $("fps").textContent = "-";
  $("seek").max = "0";
  $("session-id").textContent = id || "none";
  setState(state || { status: "none" });
  if (id) connect();
  else $("connection").textContent = "";
}

// -- live mode ------------------------------------------------------------------------------

function renderLive() {
  const button = $("live");
  button.setAttribute("aria-pressed", String(view.live));
  button.classList.toggle("on", view.live);
  button.textContent = view.live ? "Live: on" : "Live";
  $("live-info").hidden = !view.live;
}

function setLive(on) {
  if (view.live === on) return;
  view.live = on;
  renderLive();
  renderButtons();
  if (!view.id) return;
  announce(on ? "Live mode on: the video keeps growing until Stop." : "Live mode off.");
  if (on) {
    view.follow = true;
    stopPlayer();
    view.times = [];
    liveStep();
  }
}

// Ask for the next chunk (the prompt box applies from it on). force: the last frame of the
// previous chunk has arrived, so try before the state says so (the server answers 409 if early).
async function liveStep(force = false, tries = 0) {
  if (!view.live || view.liveBusy || !view.id || (busy() && !force)) return;
  const limits = server.limits || {};
  const have = Math.max(view.received, view.serverFrames);
  const room = (limits.max_frames_per_session || Infinity) - have;
  if (room <= 0) {
    setLive(false);
    showError(`This session holds at most ${limits.max_frames_per_session} frames; Live stopped.`);
    return;
  }
  const body = { frames: Math.min(LIVE_CHUNK, limits.max_frames_per_request || LIVE_CHUNK, room) };
  const typed = $("extend-prompt").value.trim();
  if (typed && typed !== currentPrompt()) body.prompt = typed;
  const gen = view.gen;
  view.liveBusy = true;
  let retry = 0; // ms until the next try, 0: none
  let drop = false; // cancel the chunk just asked for
  try {
    const state = await api("POST", sessionPath("/extend"), body, view.token);
    if (gen !== view.gen) return;
    view.liveRound += 1;
    setState(state);
    // Stop was pressed while this extend was on its way, or Enter with a new prompt (then the
    // cancel's state, done, starts the next extend, which carries it)
    const typedNow = $("extend-prompt").value.trim();
    drop = !view.live || (view.promptNow && typedNow !== currentPrompt());
    view.promptNow = false;
  } catch (err) {
    if (gen !== view.gen) return;
    if (err.status === 409) retry = tries < 20 ? 100 : 0;
    else if (err.status === 429) retry = 2000; // the cluster is busy: keep trying, more slowly
    else if (!err.offline) {
      setLive(false);
      showError(err.message);
    }
  } finally {
    if (gen === view.gen) view.liveBusy = false;
  }
  if (drop) await cancel();
  if (retry) {
    const round = view.liveRound;
    setTimeout(() => {
      if (view.liveRound === round) liveStep(force, tries + 1); // else a later try got there
    }, retry);
  }
}

async function cancel() {
  if (!view.id) return;
  const gen = view.gen;
  try {
    const state = await api("POST", sessionPath("/cancel"), undefined, view.token);
    if (gen === view.gen) setState(state);
  } catch (err) {
    reportError(err);
  }
}

// Enter in the prompt box during Live mode: the new prompt applies from the very next frame
// (the frame in progress is dropped: cancel, and the next extend carries the prompt).
async function promptNow(event) {
  if (event.key !== "Enter" || !view.live) return;
  event.preventDefault();
  const typed = $("extend-prompt").value.trim();
  if (!typed || typed === currentPrompt()) return;
  if (view.liveBusy) view.promptNow = true; // the extend on its way: cancelled when it lands
  else if (busy()) await cancel(); // its state (done) starts the next extend, with the new prompt
  else liveStep();
}

async function stop() {
  const wasBusy = busy();
  setLive(false);
  if (wasBusy) {
    await cancel();
    announce(`Stopped: ${view.serverFrames} frames kept.`);
  }
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
    reportError(err);
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
    const state = await api("POST", sessionPath("/extend"), body, view.token);
    view.follow = true;
    stopPlayer();
    setState(state);
    if (!view.socket) connect();
  } catch (err) {
    reportError(err);
    renderButtons();
  }
}

// Fetch with the bearer header and hand the file to the browser through a blob URL.
async function download(path, filename) {
  showError("");
  let blob;
  try {
    blob = await (await request("GET", path, { token: view.token })).blob();
  } catch (err) {
    reportError(err);
    return;
  }
  const url = URL.createObjectURL(blob);
  const link = document.createElement("a");
  link.href = url;
  link.download = filename;
  link.hidden = true;
  document.body.appendChild(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60000);
}

async function remove(id) {
  const token = keys.tokens()[id];
  if (!token || !confirm("Delete this session and its frames?")) return;
  try {
    await api("DELETE", `/api/sessions/${encodeURIComponent(id)}`, undefined, token);
  } catch (err) {
    if (err.status !== 404) {
      reportError(err);
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
    reportError(err);
    return;
  }
  const tokens = keys.tokens();
  const items = list.map((s) => {
    const li = document.createElement("li");
    li.dataset.id = s.id;
    const text = document.createElement("span");
    const when = s.created ? new Date(s.created * 1000).toLocaleString() : "";
    const status = STATUS_TEXT[s.status] || s.status;
    text.textContent = `${s.prompt || "(no prompt)"} - ${s.n_frames} frames, ${status} ${when}`;
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
        const path = `/api/sessions/${encodeURIComponent(s.id)}`;
        open(s.id, tokens[s.id], await api("GET", path, undefined, tokens[s.id]));
      } catch (err) {
        reportError(err);
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

async function loadConfig() {
  let config;
  try {
    config = await api("GET", "/api/config");
  } catch (err) {
    reportError(err);
    return; // the defaults in the page still apply
  }
  const { limits } = config;
  server.limits = limits;
  $("prompt").maxLength = limits.max_prompt_chars;
  $("extend-prompt").maxLength = limits.max_prompt_chars;
  $("frames").max = limits.max_frames_per_request;
  $("extend-frames").max = limits.max_frames_per_request;
  $("steps").min = limits.min_steps;
  $("steps").max = limits.max_steps;
  $("cfg").min = limits.min_cfg;
  $("cfg").max = limits.max_cfg;
  const name = String(config.model_name || config.model || "bundled");
  $("model-name").textContent = name;
  $("random-model-name").textContent = name;
  $("random-warning").hidden = !config.random_weights;
}

// The server answers again: reload what the page shows and resume the stream and Live mode.
hooks.announce = announce;
hooks.onBack = () => {
  loadConfig();
  loadSessions();
  if (view.id && !view.socket) connect();
  if (view.live) liveStep();
};

document.addEventListener("DOMContentLoaded", () => {
  $("create-form").addEventListener("submit", generate);
  $("extend-form").addEventListener("submit", extend);
  $("extend-prompt").addEventListener("keydown", promptNow);
  $("refresh").addEventListener("click", loadSessions);
  $("retry").addEventListener("click", probe);
  $("play").addEventListener("click", togglePlay);
  $("latest").addEventListener("click", () => {
    stopPlayer();
    view.follow = true;
    show(view.received - 1);
  });
  $("live").addEventListener("click", () => setLive(!view.live));
  $("stop").addEventListener("click", stop);
  $("seek").addEventListener("input", () => selectFrame(Number($("seek").value)));
  $("filmstrip").addEventListener("click", (event) => {
    const thumb = event.target.closest(".thumb");
    if (thumb) selectFrame(Number(thumb.dataset.seq));
  });
  $("filmstrip").addEventListener("keydown", onStripKey);
  $("download").addEventListener("click", () => {
    if (view.id) download(sessionPath("/video.mp4"), `lumos-${view.id}.mp4`);
  });
  $("save-frame").addEventListener("click", () => {
    if (view.id && view.shown >= 0) {
      download(sessionPath(`/frames/${view.shown}.png`), `lumos-${view.id}-frame-${view.shown}.png`);
    }
  });
  loadConfig();
  loadSessions();
});
