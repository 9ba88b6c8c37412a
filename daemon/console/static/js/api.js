// Small helpers shared by every page: JSON requests, element building, time formatting.

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export async function api(path, options = {}) {
  const init = { ...options, headers: { ...(options.headers || {}) } };
  if (options.json !== undefined) {
    init.method = init.method || "POST";
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(options.json);
  }
  const response = await fetch(path, init);
  if (response.status === 401) {
    location.assign(`/login?next=${encodeURIComponent(location.pathname + location.search)}`);
    throw new ApiError(401, "not logged in");
  }
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new ApiError(response.status, data.error || `HTTP ${response.status}`);
  return data;
}

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export function when(ts) {
  if (!ts) return "";
  return new Date(ts * 1000).toLocaleString();
}

export function score(value) {
  return typeof value === "number" ? value.toFixed(3) : "–";
}

export function toast(message) {
  const box = document.getElementById("toast");
  box.textContent = message;
  box.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { box.hidden = true; }, 4000);
}

// One EventSource for the page; listeners per event kind.
const listeners = {};
let source = null;
let lastAlertId = null;

export function onEvent(kind, callback) {
  (listeners[kind] = listeners[kind] || []).push(callback);
  if (!source) connect();
}

function connect() {
  const url = lastAlertId === null ? "/api/events" : `/api/events?since=${lastAlertId}`;
  source = new EventSource(url);
  for (const kind of ["alert", "ack", "verdict", "camera"]) {
    source.addEventListener(kind, (event) => {
      const data = JSON.parse(event.data);
      if (kind === "alert") lastAlertId = Math.max(lastAlertId || 0, data.id);
      for (const callback of listeners[kind] || []) callback(data);
    });
  }
  source.onerror = () => {
    if (source.readyState === EventSource.CLOSED) {
      source = null;
      setTimeout(connect, 2000);
    }
  };
}
