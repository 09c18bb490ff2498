// SVG plots drawn by the page: a histogram of binned counts and line charts.

const NS = "http://www.w3.org/2000/svg";

function s(tag, attrs = {}, text) {
  const el = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  if (text !== undefined) el.textContent = text;
  return el;
}

const nice = (x) => (Math.abs(x) >= 100 || x === 0 ? x.toFixed(0) : Math.abs(x) >= 1 ? x.toFixed(2) : x.toPrecision(2));

function frame(width, height, m) {
  const svg = s("svg", { class: "plot", width, height, viewBox: `0 0 ${width} ${height}`, role: "img" });
  svg.append(s("line", { class: "axis", x1: m.l, y1: height - m.b, x2: width - m.r, y2: height - m.b }));
  svg.append(s("line", { class: "axis", x1: m.l, y1: m.t, x2: m.l, y2: height - m.b }));
  return svg;
}

// counts[i] over bins with edges[i]..edges[i+1]; `label` names the plot (aria + title).
export function histogram(counts, edges, { width = 420, height = 180, xlabel = "", label = "histogram",
                                          logY = false, xfmt = nice } = {}) {
  const m = { l: 40, r: 10, t: 10, b: 34 };
  const svg = frame(width, height, m);
  svg.setAttribute("aria-label", label);
  svg.classList.add("histogram");
  const tr = (c) => (logY ? Math.log10(1 + c) : c);
  const top = Math.max(1e-9, ...counts.map(tr));
  const w = (width - m.l - m.r) / Math.max(1, counts.length);
  const ph = height - m.t - m.b;
  counts.forEach((c, i) => {
    const bh = (tr(c) / top) * ph;
    const r = s("rect", { class: "binbar", x: m.l + i * w + 0.5, y: height - m.b - bh,
                          width: Math.max(1, w - 1), height: bh });
    r.append(s("title", {}, `${xfmt(edges[i])} – ${xfmt(edges[i + 1])}: ${c}`));
    svg.append(r);
  });
  const ticks = [0, Math.floor(counts.length / 2), counts.length];
  for (const t of ticks) {
    svg.append(s("text", { x: m.l + t * w, y: height - m.b + 12, "text-anchor": "middle" }, xfmt(edges[t])));
  }
  svg.append(s("text", { x: (width + m.l) / 2, y: height - 4, "text-anchor": "middle" }, xlabel));
  const maxCount = Math.max(0, ...counts);
  svg.append(s("text", { x: m.l - 4, y: m.t + 8, "text-anchor": "end" }, String(maxCount)));
  svg.append(s("text", { x: m.l - 4, y: height - m.b, "text-anchor": "end" }, "0"));
  if (logY) svg.append(s("text", { x: m.l + 4, y: m.t + 8 }, "log scale"));
  return svg;
}

// points: [{x, y}] → a line chart.
export function lineChart(points, { width = 360, height = 170, xlabel = "", ylabel = "", label = "chart" } = {}) {
  const m = { l: 46, r: 10, t: 18, b: 32 };
  const svg = frame(width, height, m);
  svg.setAttribute("aria-label", label);
  svg.classList.add("linechart");
  if (!points.length) return svg;
  const xs = points.map((p) => p.x);
  const ys = points.map((p) => p.y);
  const [x0, x1] = [Math.min(...xs), Math.max(...xs)];
  let [y0, y1] = [Math.min(...ys), Math.max(...ys)];
  if (y0 === y1) [y0, y1] = [y0 - 1, y1 + 1];
  const px = (x) => m.l + ((x - x0) / (x1 - x0 || 1)) * (width - m.l - m.r);
  const py = (y) => height - m.b - ((y - y0) / (y1 - y0)) * (height - m.t - m.b);
  const d = points.map((p, i) => `${i ? "L" : "M"}${px(p.x).toFixed(1)},${py(p.y).toFixed(1)}`).join("");
  svg.append(s("path", { class: "curve", d }));
  svg.append(s("text", { x: m.l, y: 12 }, ylabel));
  svg.append(s("text", { x: m.l - 4, y: m.t + 4, "text-anchor": "end" }, nice(y1)));
  svg.append(s("text", { x: m.l - 4, y: height - m.b, "text-anchor": "end" }, nice(y0)));
  svg.append(s("text", { x: m.l, y: height - m.b + 12, "text-anchor": "start" }, nice(x0)));
  svg.append(s("text", { x: width - m.r, y: height - m.b + 12, "text-anchor": "end" }, nice(x1)));
  svg.append(s("text", { x: (width + m.l) / 2, y: height - 4, "text-anchor": "middle" }, xlabel));
  return svg;
}
