// Line charts with uPlot (vendored, global `uPlot`), and distribution bars as plain elements.
import { h } from "./dom.js";

const COLORS = ["#2f6fde", "#e4572e", "#17a398", "#9b5de5", "#f4a259", "#5c6b73", "#d62246"];

// A line chart in `container`: x values, series [{label, values}], an optional vertical marker
// ({x, label}: the restored epoch). Returns {chart, update(x, series)} for live data.
export function lineChart(container, { title, x, series, marker, xLabel = "epoch", yLabel = "" }) {
  const box = h("div", { class: "chart", "data-chart": title });
  container.append(box);
  const width = () => Math.max(280, box.clientWidth || container.clientWidth || 600);
  const markerPlugin = {
    hooks: {
      draw: [(u) => {
        if (!marker || marker.x === null || marker.x === undefined) return;
        const left = u.valToPos(marker.x, "x", true);
        const { ctx } = u;
        ctx.save();
        ctx.strokeStyle = "#b54708";
        ctx.setLineDash([6, 4]);
        ctx.lineWidth = 1.5 * devicePixelRatio;
        ctx.beginPath();
        ctx.moveTo(left, u.bbox.top);
        ctx.lineTo(left, u.bbox.top + u.bbox.height);
        ctx.stroke();
        ctx.fillStyle = "#b54708";
        ctx.font = `${12 * devicePixelRatio}px system-ui`;
        ctx.fillText(marker.label, left + 4 * devicePixelRatio, u.bbox.top + 14 * devicePixelRatio);
        ctx.restore();
      }],
    },
  };
  const options = {
    title, width: width(), height: 220, plugins: [markerPlugin],
    scales: { x: { time: false } },
    // Whole epochs (and runs) on the x axis, never 1.25.
    axes: [{ label: xLabel, incrs: [1, 2, 5, 10, 20, 50, 100, 200] }, { label: yLabel }],
    series: [{ label: xLabel }, ...series.map((s, i) => ({
      label: s.label, stroke: s.color || COLORS[i % COLORS.length], width: 2,
      dash: s.dash, points: { show: true, size: 5 }, spanGaps: true,
    }))],
  };
  const data = (xs, ss) => [xs, ...ss.map((s) => s.values)];
  const chart = new uPlot(options, data(x, series), box);
  if (marker) box.dataset.marker = String(marker.x);
  new ResizeObserver(() => chart.setSize({ width: width(), height: 220 })).observe(box);
  return {
    chart,
    element: box,
    update(xs, ss) {
      chart.setData(data(xs, ss));
      box.dataset.points = String(xs.length);
    },
  };
}

// Two distributions side by side (reference and current shares), one row per bin.
export function distribution(title, reference, current, edges) {
  const names = Array.isArray(reference) ? binNames(reference.length, edges || []) : Object.keys(reference);
  const ref = Array.isArray(reference) ? reference : names.map((n) => reference[n] || 0);
  const cur = Array.isArray(current) ? current : names.map((n) => (current || {})[n] || 0);
  const top = Math.max(1e-9, ...ref, ...cur);
  const bar = (value, cls) => {
    const el = h("div", { class: `bar ${cls}`, title: `${(value * 100).toFixed(1)}%` });
    el.style.width = `${(100 * value) / top}%`;
    return el;
  };
  return h("div", { class: "card", "data-signal": title },
    h("h3", {}, title),
    h("div", { class: "bars" },
      h("span", { class: "muted" }, "bin"), h("span", { class: "muted" }, "reference"),
      h("span", { class: "muted" }, "current"),
      names.map((name, i) => [h("span", {}, name), bar(ref[i], "ref"), bar(cur[i], "cur")])));
}

// Bins as the monitor counts them: (-inf, e0], (e0, e1], ..., (e_last, inf).
function binNames(n, edges) {
  if (n !== edges.length + 1) return Array.from({ length: n }, (_, i) => `bin ${i + 1}`);
  return Array.from({ length: n }, (_, i) => (i === 0 ? `≤ ${fmtEdge(edges[0])}`
    : i === n - 1 ? `> ${fmtEdge(edges[n - 2])}` : `${fmtEdge(edges[i - 1])}–${fmtEdge(edges[i])}`));
}

function fmtEdge(v) {
  return typeof v === "number" ? (Math.abs(v) >= 100 ? v.toFixed(0) : v.toPrecision(2)) : String(v);
}
