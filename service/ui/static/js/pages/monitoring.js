// #/adapters/{id}/monitoring: the plain-language flags, each drift signal's reference and current
// distributions, and live accuracy (from feedback) against validation over time.
import { api } from "../api.js";
import { distribution, lineChart } from "../charts.js";
import { badge, fmt, h, pct } from "../dom.js";

export async function monitoringPage(ctx, id) {
  const report = await api(`/v1/adapters/${encodeURIComponent(id)}/monitoring`, { signal: ctx.signal });
  const drift = report.drift || {};
  const live = report.live_accuracy || {};
  const parts = [
    h("div", { class: "card" },
      h("div", { class: "row" }, h("h1", {}, `${report.name}: monitoring`),
        report.live_version ? badge(`live v${report.live_version}`, "ok") : badge("no live version", "warn"),
        h("a", { href: `#/adapters/${encodeURIComponent(report.adapter)}` }, "Versions and curves")),
      h("h2", {}, "Flags"),
      report.flags.length
        ? h("ul", { class: "flags", id: "flags" }, report.flags.map((f) => h("li", {}, f)))
        : h("p", { class: "muted", id: "flags" }, "Nothing to report."),
      h("p", {}, `Overfitting: ${(report.overfitting || {}).verdict || "–"}`,
        report.forgetting && report.forgetting.verdict ? ` · forgetting: ${report.forgetting.verdict}` : "")),
  ];

  const signals = drift.signals || {};
  const driftCard = h("div", { class: "card", id: "drift" },
    h("h2", {}, "Drift"),
    h("p", {}, `Status: ${drift.status || "–"}`, drift.window_rows !== undefined ? ` · ${drift.window_rows} live rows in the window` : "",
      drift.drifting ? " · " : "", drift.drifting ? badge("drifting", "bad") : ""));
  const grid = h("div", { class: "grid" });
  for (const [name, signal] of Object.entries(signals)) {
    const score = signal.psi !== undefined ? `PSI ${fmt(signal.psi, 3)} (raw ${fmt(signal.psi_raw, 3)}, noise ${fmt(signal.psi_noise, 3)})`
      : `MMD² ${fmt(signal.mmd2, 4)}, p = ${fmt(signal.p_value, 3)}`;
    if (signal.reference && signal.current) {
      const card = distribution(name, signal.reference, signal.current, signal.edges);
      card.append(h("p", { class: "muted" }, score, signal.drifted ? " · drifted" : ""));
      grid.append(card);
    } else {
      grid.append(h("div", { class: "card", "data-signal": name }, h("h3", {}, name), h("p", {}, score)));
    }
  }
  driftCard.append(Object.keys(signals).length ? grid : h("p", { class: "muted" }, "No drift scores yet: they need live traffic."));
  parts.push(driftCard);

  const liveCard = h("div", { class: "card", id: "live-accuracy" }, h("h2", {}, "Live accuracy"),
    live.items
      ? h("p", {}, `${pct(live.accuracy)} on ${live.items} labelled items`,
        live.validation_accuracy !== undefined ? ` · validation ${pct(live.validation_accuracy)} · gap ${pct(live.gap)}` : "")
      : h("p", { class: "muted" }, "No feedback yet (POST /v1/adapters/{adapter}/feedback with true labels)."));
  parts.push(liveCard);
  ctx.view.replaceChildren(...parts);
  const series = live.series || [];
  if (series.length) {
    const xs = series.map((_, i) => i + 1);
    const lines = [{ label: "live accuracy", values: series.map((p) => p.accuracy) }];
    if (live.validation_accuracy !== undefined) {
      lines.push({ label: "validation accuracy", values: series.map(() => live.validation_accuracy), dash: [6, 4] });
    }
    lineChart(liveCard, { title: "Live accuracy over time (runs of feedback, oldest first)", x: xs,
                          series: lines, xLabel: "run", yLabel: "accuracy" });
    liveCard.append(h("p", { class: "muted" }, `From ${series[0].from.slice(0, 16).replace("T", " ")} to ${series[series.length - 1].to.slice(0, 16).replace("T", " ")} UTC`));
  }
}
