// Training curves from a version's (or a running job's) per-epoch history.
import { lineChart } from "../charts.js";

export const QUALITY = { classification: "val_macro_f1", multilabel: "val_micro_f1",
                         regression: "val_r2", generation: "val_token_accuracy" };

// Runs of a history: each fold of a cross-validated run, the final fit, or the one run.
export function runs(history) {
  const out = new Map();
  for (const record of history || []) {
    if (record.partial) continue; // mid-epoch validations (eval_every_steps)
    const name = record.fold ? `fold ${record.fold}` : record.final_fit ? "final fit" : "";
    if (!out.has(name)) out.set(name, []);
    out.get(name).push(record);
  }
  return out;
}

function seriesFor(history, keys) {
  const groups = runs(history);
  const xs = [...new Set([...groups.values()].flat().map((r) => r.epoch))].sort((a, b) => a - b);
  const series = [];
  for (const [name, records] of groups) {
    for (const [key, label] of keys) {
      const column = xs.map((x) => {
        const r = records.find((rec) => rec.epoch === x);
        return r && typeof r[key] === "number" ? r[key] : null;
      });
      if (column.some((v) => v !== null)) {
        series.push({ label: name ? `${label} (${name})` : label, values: column });
      }
    }
  }
  return { xs, series };
}

// The loss chart and the quality chart, with the restored epoch marked; returns updaters.
export function curves(container, { history, task, restored }) {
  const marker = restored ? { x: restored, label: `restored epoch ${restored}` } : null;
  const lossKeys = [["train_loss", "train loss"], ["val_loss", "validation loss"]];
  const quality = QUALITY[task] || "val_accuracy";
  const qualityKeys = [[quality, quality.replace("val_", "validation ")]];
  const loss = seriesFor(history, lossKeys);
  const good = seriesFor(history, qualityKeys);
  const lossChart = lineChart(container, { title: "Loss per epoch", x: loss.xs, series: loss.series, marker });
  const qualityChart = good.series.length
    ? lineChart(container, { title: `${quality} per epoch`, x: good.xs, series: good.series, marker })
    : null;
  lossChart.element.dataset.points = String(loss.xs.length);
  return {
    update(newHistory) {
      const l = seriesFor(newHistory, lossKeys);
      if (l.series.length === loss.series.length) lossChart.update(l.xs, l.series);
      const g = seriesFor(newHistory, qualityKeys);
      if (qualityChart && g.series.length === good.series.length) qualityChart.update(g.xs, g.series);
      return l.series.length === loss.series.length && (!qualityChart || g.series.length === good.series.length);
    },
  };
}
