// Elements built with textContent only: data from the API is never parsed as HTML.
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else if (name === "dataset") Object.assign(el.dataset, value);
    else if (value === true) el.setAttribute(name, "");
    else el.setAttribute(name, String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

export function fmt(value, digits = 4) {
  if (value === undefined || value === null) return "–";
  if (typeof value === "number") return Number.isInteger(value) ? String(value) : value.toFixed(digits);
  return String(value);
}

export function pct(value) {
  return value === undefined || value === null ? "–" : `${(value * 100).toFixed(1)}%`;
}

export function table(columns, rows, attrs = {}) {
  return h("table", attrs,
    h("thead", {}, h("tr", {}, columns.map((c) => h("th", { class: c.num ? "num" : c.cls }, c.label)))),
    h("tbody", {}, rows.map((row) => h("tr", row.attrs || {},
      columns.map((c) => h("td", { class: c.num ? "num" : c.cls }, c.cell(row)))))));
}

export function badge(text, kind = "") {
  return h("span", { class: `badge ${kind}` }, text);
}

export function statusBadge(status) {
  const kind = { ready: "ok", succeeded: "ok", training: "warn", running: "warn", queued: "warn",
                 failed: "bad", cancelled: "bad" }[status] || "";
  return badge(status, kind);
}

export function errorText(error) {
  return h("p", { class: "error", role: "alert" }, error.message || String(error));
}
