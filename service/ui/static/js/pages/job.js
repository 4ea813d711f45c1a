// #/jobs/{id}: a job's progress and curves, live over its event stream.
import { api, events, session } from "../api.js";
import { fmt, h, statusBadge } from "../dom.js";
import { curves } from "./curves.js";

export async function jobPage(ctx, id) {
  const job = await api(`/v1/jobs/${encodeURIComponent(id)}`, { signal: ctx.signal });
  const adapter = await api(`/v1/adapters/${encodeURIComponent(job.adapter_id)}`, { signal: ctx.signal });
  const history = [...job.history];
  const status = h("span", { id: "job-status" }, statusBadge(job.status));
  const bar = h("div");
  const progressText = h("span", { class: "muted", id: "job-progress" });
  const epochs = h("span", { id: "job-epochs", "data-count": history.length }, `${history.length} epochs so far`);
  const result = h("div", { id: "job-result" });
  const cancel = session.can("train") && !["succeeded", "failed", "cancelled"].includes(job.status)
    ? h("button", { class: "secondary", id: "cancel" }, "Cancel") : null;
  if (cancel) {
    cancel.addEventListener("click", async () => {
      cancel.disabled = true;
      await api(`/v1/jobs/${encodeURIComponent(id)}/cancel`, { method: "POST" }).catch((e) => { progressText.textContent = e.message; });
    });
  }
  const chartCard = h("div", { class: "card", id: "live-curves" }, h("h2", {}, "Curves"));
  ctx.view.replaceChildren(
    h("div", { class: "card" },
      h("div", { class: "row" }, h("h1", {}, `Job ${job.id}`), status, cancel),
      h("p", {}, "Adapter ", h("a", { href: `#/adapters/${encodeURIComponent(adapter.id)}` }, adapter.name),
        `, version ${job.version} (${job.kind})`),
      h("div", { class: "progress" }, bar), h("p", {}, progressText, " · ", epochs), result),
    chartCard);
  let chart = curves(chartCard, { history, task: adapter.task, restored: null });

  const showProgress = (p) => {
    if (!p) return;
    const fraction = p.steps ? p.step / p.steps : p.epochs ? (p.epoch || 0) / p.epochs : null;
    if (fraction !== null) bar.style.width = `${Math.min(100, 100 * fraction)}%`;
    progressText.textContent = [p.fold ? `fold ${p.fold}/${p.folds}` : null, p.final_fit ? "final fit" : null,
      p.epoch !== undefined ? `epoch ${fmt(p.epoch, 1)}/${p.epochs ?? "?"}` : null,
      p.loss !== undefined ? `loss ${fmt(p.loss, 4)}` : null].filter(Boolean).join(" · ");
  };
  showProgress(job.progress);
  const redraw = () => {
    epochs.textContent = `${history.length} epochs so far`;
    epochs.dataset.count = String(history.length);
    if (!chart.update(history)) { // a new run (a fold) appeared: draw afresh
      chartCard.querySelectorAll(".chart").forEach((el) => el.remove());
      chart = curves(chartCard, { history, task: adapter.task, restored: null });
    }
  };
  if (["succeeded", "failed", "cancelled"].includes(job.status)) return finish(job, adapter);

  for await (const event of events(`/v1/jobs/${encodeURIComponent(id)}/events`, ctx.signal)) {
    if (event.event === "status") status.replaceChildren(statusBadge(event.json.status));
    else if (event.event === "progress") showProgress(event.json);
    else if (event.event === "epoch") {
      history.push(event.json);
      redraw();
    } else if (event.event === "end") {
      return finish(event.json);
    } else if (event.event === "error") {
      result.replaceChildren(h("p", { class: "error" }, event.json.detail));
      return undefined;
    }
  }
  return undefined;

  async function finish(final, known = null) {
    status.replaceChildren(statusBadge(final.status));
    if (cancel) cancel.remove();
    if (final.status === "succeeded") bar.style.width = "100%";
    // An adapter read after the job ended already has its version; else read it again.
    const fresh = known || await api(`/v1/adapters/${encodeURIComponent(adapter.id)}`, { signal: ctx.signal });
    const version = fresh.versions.find((v) => v.version === final.version);
    const best = version && version.metrics ? version.metrics.best_epoch : null;
    chartCard.querySelectorAll(".chart").forEach((el) => el.remove());
    chart = curves(chartCard, { history: version ? version.history : history, task: adapter.task, restored: best || null });
    result.replaceChildren(
      h("p", { id: "job-final" }, `Finished: ${final.status}`, final.stop_reason ? ` (${final.stop_reason})` : "",
        best ? `, restored epoch ${best}` : "", final.error ? ` — ${final.error}` : ""),
      h("a", { href: `#/adapters/${encodeURIComponent(adapter.id)}?version=${final.version}` }, "See the version"));
  }
}
