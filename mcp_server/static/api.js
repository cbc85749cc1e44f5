// Talking to the server from the dashboard: JSON over fetch, with the session's
// CSRF token on state-changing requests (API keys on), and a reconnecting
// EventSource. Same origin only; the session cookie goes along by itself.

let csrfToken = null;

export async function session() {
  // Who is signed in; remembers the CSRF token for POST/DELETE. A server
  // without sessions (no API keys support) answers 404: no auth, no token.
  try {
    const info = await getJSON("/v1/session");
    csrfToken = info.csrf_token || null;
    return info;
  } catch {
    return { auth: false, signed_in: true };
  }
}

export async function getJSON(path) {
  const response = await fetch(path, { headers: { Accept: "application/json" }, credentials: "same-origin" });
  return answer(response);
}

export async function send(method, path, body) {
  const headers = { Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (csrfToken) headers["X-CSRF-Token"] = csrfToken;
  const response = await fetch(path, {
    method, headers, credentials: "same-origin",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  return answer(response);
}

async function answer(response) {
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = (data && data.error) || {};
    throw new Error(`${response.status} ${error.code || ""}: ${error.message || response.statusText}`);
  }
  return data;
}

// An EventSource that also comes back after the server closed it for good
// (a 5xx, a restart): the browser retries only transient drops by itself.
// It resumes after the last event id it saw, so nothing is missed or repeated;
// `after` (an event id) starts it there instead of at the server's default.
// Handlers get each event's data and its id.
export class Feed {
  constructor(path, handlers, onState, after = null) {
    this.path = path;
    this.handlers = handlers;
    this.onState = onState;
    this.lastId = after;
    this.delayMs = 500;
    this.open();
  }

  open() {
    const url = this.lastId ? `${this.path}?after=${encodeURIComponent(this.lastId)}` : this.path;
    const source = new EventSource(url);
    this.source = source;
    source.onopen = () => { this.delayMs = 500; this.onState("live"); };
    source.onerror = () => {
      this.onState("reconnecting");
      if (source.readyState === EventSource.CLOSED) {
        setTimeout(() => this.open(), this.delayMs);
        this.delayMs = Math.min(this.delayMs * 2, 10000);
      }
    };
    for (const [name, handler] of Object.entries(this.handlers)) {
      source.addEventListener(name, (event) => {
        if (event.lastEventId) this.lastId = event.lastEventId;
        handler(JSON.parse(event.data), event.lastEventId);
      });
    }
  }
}
