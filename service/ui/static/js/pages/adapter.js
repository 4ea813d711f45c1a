// #/adapters/{id}: versions and their curves, the baseline, per-class and per-group tables,
// generation's base-vs-adapter figures, promote / roll back, retrain, and a try-it box.
import { api, session } from "../api.js";
import { badge, fmt, h, pct, statusBadge, table } from "../dom.js";
import { headline, trainForm } from "./common.js";
import { curves } from "./curves.js";

const COMPARED = ["val_loss", "val_accuracy", "val_macro_f1", "val_micro_f1", "val_r2", "val_mae",
                  "val_token_accuracy"];

export async function adapterPage(ctx, id) {
  const [adapter, jobs] = await Promise.all([
    api(`/v1/adapters/${encodeURIComponent(id)}`, { signal: ctx.signal }),
    api(`/v1/jobs?adapter=${encodeURIComponent(id)}&view=summary&limit=10`, { signal: ctx.signal }),
  ]);
  const chosen = new URLSearchParams(location.hash.split("?")[1] || "").get("version");
  const versions = adapter.versions;
  const shown = versions.find((v) => String(v.version) === chosen)
    || versions.find((v) => v.live) || versions[versions.length - 1];
  const base = `#/adapters/${encodeURIComponent(adapter.id)}`;

  const header = h("div", { class: "row" },
    h("h1", {}, adapter.name), statusBadge(adapter.status),
    badge(adapter.task), adapter.live_version ? badge(`live v${adapter.live_version}`, "ok") : badge("no live version", "warn"),
    h("a", { href: `${base}/monitoring` }, "Monitoring"));

  const promoteButton = (v) => {
    if (!session.can("train") || v.live || v.status !== "ready") return null;
    const back = adapter.live_version && v.version < adapter.live_version;
    const button = h("button", { class: "secondary", "data-promote": v.version }, back ? `Roll back to v${v.version}` : `Promote v${v.version}`);
    button.addEventListener("click", async () => {
      button.disabled = true;
      try {
        await api(`/v1/adapters/${encodeURIComponent(adapter.id)}/versions/${v.version}/promote`, { method: "POST" });
        await adapterPage(ctx, id);
      } catch (error) {
        button.replaceWith(h("span", { class: "error" }, error.message));
      }
    });
    return button;
  };
  const versionTable = table([
    { label: "Version", cell: (v) => h("a", { href: `${base}?version=${v.version}` }, `v${v.version}`) },
    { label: "Status", cell: (v) => statusBadge(v.status) },
    { label: "", cell: (v) => (v.live ? badge("live", "ok") : "") },
    { label: "Headline", cell: (v) => { const [n, x] = headline(v.metrics); return n ? `${n.replace("val_", "")} ${fmt(x, 3)}` : "–"; } },
    { label: "Stopped", cell: (v) => v.metrics.stop_reason || "–", cls: "hide-narrow" },
    { label: "Served", cell: (v) => v.metrics.winner || (v.report && v.report.winner) || "–", cls: "hide-narrow" },
    { label: "", cell: promoteButton },
  ], versions.map((v) => ({ ...v, attrs: { "data-version": v.version } })), { id: "versions" });

  const body = [h("div", { class: "card" }, header, versionTable)];
  if (shown) body.push(...versionDetail(adapter, shown));
  body.push(tryIt(adapter));
  if (session.can("train")) {
    body.push(h("div", { class: "card" }, h("h2", {}, "Retrain from a file"),
      trainForm({ adapter: adapter.id, onJob: (job) => ctx.go(`#/jobs/${encodeURIComponent(job.id)}`) })));
  }
  body.push(h("div", { class: "card" }, h("h2", {}, "Recent jobs"),
    jobs.jobs.length ? table([
      { label: "Job", cell: (j) => h("a", { href: `#/jobs/${encodeURIComponent(j.id)}` }, j.id) },
      { label: "Version", cell: (j) => `v${j.version}` },
      { label: "Status", cell: (j) => statusBadge(j.status) },
      { label: "Stop", cell: (j) => j.stop_reason || "–", cls: "hide-narrow" },
    ], jobs.jobs) : h("p", { class: "muted" }, "No jobs.")));
  ctx.view.replaceChildren(...body);
}

function versionDetail(adapter, v) {
  const m = v.metrics || {};
  const chartCard = h("div", { class: "card", id: "curves" },
    h("h2", {}, `Version ${v.version}: training curves`),
    h("p", { class: "muted" }, [
      m.stop_reason ? `stopped: ${m.stop_reason}` : null,
      m.best_epoch ? ` · restored epoch ${m.best_epoch} of ${m.epochs_run ?? "?"}` : null,
      v.report && v.report.validation ? ` · validation: ${v.report.validation}` : null,
    ].filter(Boolean).join("")));
  const out = [chartCard];
  requestAnimationFrame(() => curves(chartCard, { history: v.history, task: adapter.task, restored: m.best_epoch || null }));

  const baseline = v.baseline || {};
  const compared = COMPARED.filter((k) => typeof m[k] === "number" || typeof baseline[k] === "number");
  const generation = adapter.task === "generation";
  out.push(h("div", { class: "card", id: "baseline" },
    h("h2", {}, generation ? "Adapter against the base model" : "LoRA against the linear probe"),
    table([
      { label: "Metric", cell: (k) => k },
      { label: generation ? "adapter" : "LoRA", cell: (k) => fmt(m[k]), num: true },
      { label: generation ? "base" : "probe", cell: (k) => fmt(baseline[k]), num: true },
    ], compared),
    h("p", {}, `Served: ${m.winner || (v.report && v.report.winner) || "–"}. `,
      h("span", { class: "muted" }, (v.report && v.report.winner_reason) || ""))));

  if (generation && (m.reference_perplexity || m.base_reference_perplexity)) {
    const change = m.reference_perplexity && m.base_reference_perplexity
      ? m.reference_perplexity / m.base_reference_perplexity - 1 : null;
    out.push(h("div", { class: "card", id: "forgetting" }, h("h2", {}, "Forgetting"),
      h("p", {}, `Perplexity of the reference text: base ${fmt(m.base_reference_perplexity, 2)}, adapter ${fmt(m.reference_perplexity, 2)}`,
        change !== null ? ` (${change >= 0 ? "+" : ""}${(change * 100).toFixed(1)}%)` : "")));
  }
  if (m.per_class && Object.keys(m.per_class).length) {
    const labels = Object.keys(m.per_class);
    const cols = [...new Set(labels.flatMap((l) => Object.keys(m.per_class[l])))];
    out.push(h("div", { class: "card", id: "per-class" }, h("h2", {}, "Per class"),
      table([{ label: "Class", cell: (l) => l },
        ...cols.map((c) => ({ label: c, cell: (l) => fmt(m.per_class[l][c], 3), num: true }))], labels)));
  }
  if (m.per_group && Object.keys(m.per_group).length) {
    const groups = Object.keys(m.per_group);
    const value = (g) => m.per_group[g];
    const cols = [...new Set(groups.flatMap((g) => (typeof value(g) === "object" ? Object.keys(value(g)) : ["value"])))];
    out.push(h("div", { class: "card", id: "per-group" }, h("h2", {}, "Per group"),
      m.group_gap !== undefined ? h("p", {}, `Largest gap between groups: ${pct(m.group_gap)}`) : null,
      table([{ label: "Group", cell: (g) => g },
        ...cols.map((c) => ({ label: c, cell: (g) => fmt(typeof value(g) === "object" ? value(g)[c] : value(g), 3), num: true }))], groups)));
  }
  return out;
}

function tryIt(adapter) {
  const generation = adapter.task === "generation";
  const input = h("textarea", { name: "text", placeholder: generation ? "Ask something" : "A text to predict", required: true });
  const output = h("div", { id: "try-output", role: "status" });
  const button = h("button", { type: "submit" }, generation ? "Send" : "Predict");
  const form = h("form", { class: "stack", id: "try-it" }, input, button);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    button.disabled = true;
    output.replaceChildren(h("p", { class: "muted" }, "…"));
    try {
      if (generation) {
        const answer = await api("/v1/chat/completions", { method: "POST", body: {
          model: adapter.name, max_tokens: 128, messages: [{ role: "user", content: input.value }] } });
        output.replaceChildren(h("p", { class: "answer" }, answer.choices[0].message.content));
      } else {
        const answer = await api(`/v1/adapters/${encodeURIComponent(adapter.id)}/predict`, { method: "POST", body: { inputs: [input.value] } });
        const p = answer.predictions[0];
        const scores = p.scores || {};
        output.replaceChildren(
          h("p", { class: "answer" }, `v${answer.version}: `, h("strong", {}, p.label ?? (p.labels ? p.labels.join(", ") : fmt(p.value)))),
          Object.keys(scores).length ? table([{ label: "Class", cell: (k) => k }, { label: "Score", cell: (k) => fmt(scores[k], 3), num: true }],
            Object.keys(scores).sort((a, b) => scores[b] - scores[a])) : null);
      }
    } catch (error) {
      output.replaceChildren(h("p", { class: "error" }, error.message));
    } finally {
      button.disabled = false;
    }
  });
  return h("div", { class: "card" }, h("h2", {}, "Try it"), form, output);
}
