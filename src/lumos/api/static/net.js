// Lumos viewer, the server side of the page: the keys this browser keeps (owner key, session
// tokens), HTTP calls (the token only ever in an Authorization header), and the banner shown
// while the server cannot be reached, with its automatic retry (backoff) and "Retry now".

const $ = (id) => document.getElementById(id);

// What the page does when the server answers again, and how it announces (set by app.js).
export const hooks = { onBack: () => {}, announce: () => {} };

const server = { offline: false, delay: 1000, timer: null };

export const keys = {
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


export class ApiError extends Error {
  constructor(message, status, offline = false) {
    super(message);
    this.status = status;
    this.offline = offline;
  }
}

const OFFLINE = "Cannot reach the Lumos server.";

export async function request(method, path, { body, token, owner = true } = {}) {
  const headers = {};
  if (owner) headers["X-Lumos-Owner"] = keys.owner();
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (token) headers.Authorization = `Bearer ${token}`;
  let res;
  try {
    res = await fetch(path, {
      method,
      headers,
      cache: "no-store",
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch {
    reportOffline();
    throw new ApiError(OFFLINE, 0, true);
  }
  if (server.offline) backOnline();
  if (!res.ok) {
    const data = await res.json().catch(() => null);
    throw new ApiError((data && data.error) || `${res.status} ${res.statusText}`, res.status);
  }
  return res;
}

export async function api(method, path, body, token) {
  const res = await request(method, path, { body, token });
  return res.status === 204 ? null : res.json();
}

// -- reachability ------------------------------------------------------------------------

function reportOffline() {
  if (!server.offline) {
    server.offline = true;
    server.delay = 1000;
    hooks.announce("Lost contact with the Lumos server; retrying.");
    scheduleProbe();
  }
  $("offline").hidden = false;
}

function scheduleProbe() {
  clearTimeout(server.timer);
  const seconds = Math.round(server.delay / 1000);
  $("offline-text").textContent =
    `${OFFLINE} It may be restarting, or this device may be offline. ` +
    `Trying again in ${seconds} s.`;
  server.timer = setTimeout(probe, server.delay);
  server.delay = Math.min(server.delay * 2, 30000);
}

export async function probe() {
  clearTimeout(server.timer);
  $("offline-text").textContent = `${OFFLINE} Trying again now...`;
  try {
    await fetch("/api/config", { cache: "no-store" }); // any answer means it is reachable
  } catch {
    if (server.offline) scheduleProbe();
    else reportOffline();
    return;
  }
  backOnline();
}

function backOnline() {
  if (!server.offline) return;
  server.offline = false;
  clearTimeout(server.timer);
  $("offline").hidden = true;
  hooks.announce("Connected to the Lumos server again.");
  hooks.onBack();
}
