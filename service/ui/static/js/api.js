// The public API, with the key from sessionStorage sent only as a Bearer header.
const KEY = "loradock.key";

export const session = {
  key: () => sessionStorage.getItem(KEY),
  set: (key) => sessionStorage.setItem(KEY, key),
  clear: () => sessionStorage.removeItem(KEY),
  me: null, // GET /v1/whoami of the signed-in key
  base: null, // GET /readyz's base_model
  can: (scope) => !!session.me && (session.me.scopes.includes("admin") ||
    session.me.scopes.includes(scope) || (scope === "predict" && session.me.scopes.includes("train"))),
};

export class ApiError extends Error {
  constructor(status, message, body) {
    super(message);
    this.status = status;
    this.body = body;
  }
}

function detail(status, body) {
  if (body && typeof body === "object") {
    if (typeof body.detail === "string") return body.detail;
    if (body.error && typeof body.error === "object") return body.error.message;
    if (typeof body.error === "string") return body.error;
  }
  return `HTTP ${status}`;
}

export async function api(path, { method = "GET", body, form, signal } = {}) {
  const headers = { Authorization: `Bearer ${session.key()}` };
  let payload;
  if (form) payload = form;
  else if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    payload = JSON.stringify(body);
  }
  const r = await fetch(path, { method, headers, body: payload, signal, cache: "no-store",
                                credentials: "omit", referrerPolicy: "no-referrer" });
  if (r.status === 204) return null;
  const type = r.headers.get("content-type") || "";
  const data = type.includes("json") ? await r.json() : await r.text();
  if (!r.ok) throw new ApiError(r.status, detail(r.status, data), data);
  return data;
}

// Server-sent events over fetch (EventSource cannot send an Authorization header).
export async function* events(path, signal) {
  const r = await fetch(path, {
    headers: { Authorization: `Bearer ${session.key()}`, Accept: "text/event-stream" },
    signal, cache: "no-store", credentials: "omit",
  });
  if (!r.ok) throw new ApiError(r.status, detail(r.status, await r.json().catch(() => null)));
  const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer = (buffer + value).replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const event = { event: "message", data: "", id: null };
      for (const line of block.split("\n")) {
        if (!line || line.startsWith(":")) continue;
        const at = line.indexOf(":");
        const field = at < 0 ? line : line.slice(0, at);
        const text = at < 0 ? "" : line.slice(at + 1).replace(/^ /, "");
        if (field === "event") event.event = text;
        else if (field === "data") event.data += (event.data ? "\n" : "") + text;
        else if (field === "id") event.id = text;
      }
      if (event.data) {
        event.json = JSON.parse(event.data);
        yield event;
      }
    }
  }
}
