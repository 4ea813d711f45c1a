// #/admin: tenants and their keys (admin keys only).
import { api, session } from "../api.js";
import { errorText, fmt, h, table } from "../dom.js";

export async function adminPage(ctx) {
  if (!session.can("admin")) {
    ctx.view.replaceChildren(h("div", { class: "card" }, errorText(new Error("This page needs a key with the admin scope."))));
    return;
  }
  const tenants = await api("/v1/tenants", { signal: ctx.signal });
  const keys = { keys: (await Promise.all(tenants.tenants.slice(0, 100).map((t) =>
    api(`/v1/keys?tenant_id=${encodeURIComponent(t.id)}`, { signal: ctx.signal })))).flatMap((k) => k.keys) };
  const name = h("input", { name: "tenant", required: true, placeholder: "acme", pattern: "[A-Za-z0-9][A-Za-z0-9._\\-]{0,127}" });
  const tenantStatus = h("p", { role: "status" });
  const tenantForm = h("form", { class: "row", id: "new-tenant" }, name, h("button", { type: "submit" }, "Create tenant"), tenantStatus);
  tenantForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    try {
      await api("/v1/tenants", { method: "POST", body: { name: name.value.trim() } });
      await adminPage(ctx);
    } catch (error) {
      tenantStatus.className = "error";
      tenantStatus.textContent = error.message;
    }
  });

  const secret = h("div", { id: "new-key" });
  const keyForm = (tenant) => {
    const scope = h("select", { name: "scope", "aria-label": `scope for ${tenant.name}` },
      ["predict", "train", "admin"].map((s) => h("option", { value: s }, s)));
    const form = h("form", { class: "row", "data-tenant": tenant.name }, scope, h("button", { type: "submit", class: "secondary" }, "New key"));
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      try {
        const made = await api(`/v1/tenants/${encodeURIComponent(tenant.id)}/keys`, { method: "POST", body: { scopes: [scope.value] } });
        secret.replaceChildren(h("p", {}, `New ${made.scopes.join(", ")} key for ${tenant.name}; copy it now, it is not shown again:`),
          h("p", { class: "secret" }, made.key));
      } catch (error) {
        secret.replaceChildren(errorText(error));
      }
    });
    return form;
  };
  const byTenant = new Map(tenants.tenants.map((t) => [t.id, t.name]));
  const revoke = (k) => {
    if (k.id === session.me.key_id) return h("span", { class: "muted" }, "this key");
    const button = h("button", { class: "secondary" }, "Revoke");
    button.addEventListener("click", async () => {
      button.disabled = true;
      try {
        await api(`/v1/keys/${encodeURIComponent(k.id)}`, { method: "DELETE" });
        await adminPage(ctx);
      } catch (error) {
        button.replaceWith(errorText(error));
      }
    });
    return button;
  };
  ctx.view.replaceChildren(
    h("h1", {}, "Tenants and keys"),
    h("div", { class: "card" }, h("h2", {}, "Tenants"),
      table([
        { label: "Name", cell: (t) => t.name },
        { label: "Id", cell: (t) => t.id, cls: "hide-narrow" },
        { label: "Created", cell: (t) => fmt(t.created_at).slice(0, 10), cls: "hide-narrow" },
        { label: "", cell: keyForm },
      ], tenants.tenants, { id: "tenants" }),
      tenantForm, secret),
    h("div", { class: "card" }, h("h2", {}, "Active keys"),
      table([
        { label: "Tenant", cell: (k) => byTenant.get(k.tenant_id) || k.tenant_id },
        { label: "Key", cell: (k) => `${k.prefix}…` },
        { label: "Scopes", cell: (k) => k.scopes.join(", ") },
        { label: "Created", cell: (k) => fmt(k.created_at).slice(0, 10), cls: "hide-narrow" },
        { label: "", cell: revoke },
      ], keys.keys, { id: "keys" })));
}
