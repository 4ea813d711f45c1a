// The console's shell: sign-in, navigation, and the #/... routes.
import { api, ApiError, session } from "./api.js";
import { errorText, h } from "./dom.js";
import { adaptersPage } from "./pages/adapters.js";
import { adapterPage } from "./pages/adapter.js";
import { monitoringPage } from "./pages/monitoring.js";
import { jobPage } from "./pages/job.js";
import { adminPage } from "./pages/admin.js";

const view = document.getElementById("view");
let leaving = new AbortController(); // aborted when the route changes (stops event streams)

const routes = [
  [/^#\/adapters\/([^/?]+)\/monitoring$/, (m, ctx) => monitoringPage(ctx, decodeURIComponent(m[1]))],
  [/^#\/adapters\/([^/?]+)(\?.*)?$/, (m, ctx) => adapterPage(ctx, decodeURIComponent(m[1]))],
  [/^#\/jobs\/([^/?]+)$/, (m, ctx) => jobPage(ctx, decodeURIComponent(m[1]))],
  [/^#\/admin$/, (m, ctx) => adminPage(ctx)],
  [/^#\/adapters(\?.*)?$/, (m, ctx) => adaptersPage(ctx, new URLSearchParams((m[1] || "").slice(1)))],
];

function signInPage(message) {
  const input = h("input", { type: "password", name: "key", autocomplete: "off", required: true,
                             "aria-label": "API key", placeholder: "ld_..." });
  const status = h("p", { class: "error", role: "alert" }, message || "");
  const form = h("form", { class: "stack", id: "signin" },
    h("label", {}, "API key", input),
    h("button", { type: "submit" }, "Sign in"),
    status,
    h("p", { class: "muted" },
      "The key stays in this tab (sessionStorage) and is sent only as an Authorization header."));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    session.set(input.value.trim());
    try {
      await loadSession();
      if (!location.hash || location.hash === "#/" || location.hash === "#/signin") location.hash = "#/adapters";
      else render();
    } catch (error) {
      session.clear();
      status.textContent = error instanceof ApiError && error.status === 401
        ? "That key is not valid (or was revoked)." : error.message;
    }
  });
  view.replaceChildren(h("div", { class: "card" }, h("h1", {}, "Sign in"), form));
  input.focus();
}

async function loadSession() {
  const base = session.base ? Promise.resolve({ base_model: session.base })
    : fetch("/readyz", { cache: "no-store" }).then((r) => r.json()).catch(() => ({}));
  const [me, ready] = await Promise.all([api("/v1/whoami"), base]);
  session.me = me;
  session.base = ready.base_model || null;
  drawHeader();
}

function drawHeader() {
  const nav = document.getElementById("nav");
  const who = document.getElementById("who");
  if (!session.me) {
    nav.replaceChildren();
    who.replaceChildren();
    return;
  }
  nav.replaceChildren(
    h("a", { href: "#/adapters" }, "Adapters"),
    session.can("admin") ? h("a", { href: "#/admin" }, "Tenants and keys") : null,
    h("a", { href: "/docs", target: "_blank", rel: "noopener" }, "API docs"));
  who.replaceChildren(
    `${session.me.tenant_name} · ${session.me.prefix}… (${session.me.scopes.join(", ")}) `,
    h("button", { class: "secondary", id: "signout", onclick: () => {
      session.clear();
      session.me = null;
      drawHeader();
      location.hash = "#/signin";
      signInPage();
    } }, "Sign out"));
}

async function render() {
  leaving.abort();
  leaving = new AbortController();
  if (!session.key()) return signInPage();
  if (!session.me) {
    try {
      await loadSession();
    } catch (error) {
      session.clear();
      return signInPage(error.status === 401 ? "Your key is no longer valid." : error.message);
    }
  }
  const hash = location.hash && location.hash !== "#/" && location.hash !== "#/signin" ? location.hash : "#/adapters";
  const ctx = { view, signal: leaving.signal, go: (to) => { location.hash = to; } };
  for (const [pattern, page] of routes) {
    const match = hash.match(pattern);
    if (match) {
      view.replaceChildren(h("p", { class: "muted" }, "Loading…"));
      try {
        await page(match, ctx);
      } catch (error) {
        if (error.name === "AbortError") return;
        if (error instanceof ApiError && error.status === 401) {
          session.clear();
          session.me = null;
          drawHeader();
          return signInPage("Your key is no longer valid.");
        }
        view.replaceChildren(h("div", { class: "card" }, errorText(error)));
      }
      document.body.dataset.page = pattern.source;
      return;
    }
  }
  view.replaceChildren(h("div", { class: "card" }, h("p", {}, "No such page. "),
                         h("a", { href: "#/adapters" }, "Adapters")));
}

window.addEventListener("hashchange", render);
render();
