// #/adapters: the tenant's adapters, a page at a time, with search; a new-adapter form.
import { api, session } from "../api.js";
import { badge, fmt, h, statusBadge, table } from "../dom.js";
import { headline, trainForm } from "./common.js";

const PAGE = 25;
const history = []; // cursors of the pages before this one

export async function adaptersPage(ctx, params) {
  const q = params.get("q") || "";
  const cursor = params.get("cursor");
  if (!cursor) history.length = 0;
  const query = new URLSearchParams({ view: "summary", limit: String(PAGE) });
  if (q) query.set("q", q);
  if (cursor) query.set("cursor", cursor);
  const page = await api(`/v1/adapters?${query}`, { signal: ctx.signal });

  const search = h("input", { type: "search", name: "q", value: q, placeholder: "Search by name",
                              "aria-label": "Search adapters" });
  const searchForm = h("form", { class: "row", role: "search" }, search,
                       h("button", { type: "submit", class: "secondary" }, "Search"));
  searchForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const next = new URLSearchParams();
    if (search.value.trim()) next.set("q", search.value.trim());
    ctx.go(`#/adapters${next.size ? `?${next}` : ""}`);
  });
  const link = (c) => {
    const p = new URLSearchParams();
    if (q) p.set("q", q);
    if (c) p.set("cursor", c);
    return `#/adapters${p.size ? `?${p}` : ""}`;
  };
  const previous = h("button", { class: "secondary", disabled: !cursor, onclick: () => {
    ctx.go(link(history.pop() || null));
  } }, "Previous");
  const next = h("button", { class: "secondary", disabled: !page.next_cursor, onclick: () => {
    history.push(cursor);
    ctx.go(link(page.next_cursor));
  } }, "Next");

  const rows = page.adapters.map((a) => ({ ...a, attrs: { "data-adapter": a.name } }));
  const list = rows.length
    ? table([
      { label: "Name", cell: (a) => h("a", { href: `#/adapters/${encodeURIComponent(a.id)}` }, a.name) },
      { label: "Task", cell: (a) => a.task, cls: "hide-narrow" },
      { label: "Status", cell: (a) => statusBadge(a.status) },
      { label: "Live", cell: (a) => (a.live_version ? `v${a.live_version}` : "–"), num: true },
      { label: "Headline", cell: (a) => {
        const [name, value] = headline(a.live_metrics);
        return name ? `${name.replace("val_", "")} ${fmt(value, 3)}` : "–";
      } },
      { label: "Drift", cell: (a) => (a.drifting ? badge("drifting", "bad") : badge("ok", "ok")) },
      { label: "Versions", cell: (a) => a.version_count, num: true, cls: "hide-narrow" },
    ], rows, { id: "adapters" })
    : h("p", { class: "muted", id: "no-adapters" }, q ? `No adapter matches "${q}".` : "No adapters yet.");

  ctx.view.replaceChildren(
    h("h1", {}, "Adapters"),
    h("div", { class: "card" }, searchForm, list,
      h("div", { class: "row" }, previous, next,
        h("span", { class: "muted" }, `${page.adapters.length} on this page`))),
    session.can("train") ? h("div", { class: "card" }, h("h2", {}, "New adapter"),
      trainForm({ onJob: (job) => ctx.go(`#/jobs/${encodeURIComponent(job.id)}`) })) : null);
}
