// Trends: defect rate per class per hour or shift with p-chart control limits, pass/fail counts per shift.
import { api, el } from "./api.js";

const SVG = "http://www.w3.org/2000/svg";
const pct = (v) => (typeof v === "number" ? `${(v * 100).toFixed(2)}%` : "–");

function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  node.append(...children);
  return node;
}

// Defect rate per period (dots, red when out of control) between its lower and upper control limits.
function chart(rows) {
  const width = 640, height = 160, pad = 28;
  const top = Math.max(0.01, ...rows.map((r) => Math.max(r.ucl, r.defect_rate || 0))) * 1.1;
  const x = (i) => pad + (rows.length < 2 ? (width - 2 * pad) / 2 : (i * (width - 2 * pad)) / (rows.length - 1));
  const y = (v) => height - pad - (v / top) * (height - 2 * pad);
  const line = (key) => svg("polyline", { points: rows.map((r, i) => `${x(i)},${y(r[key])}`).join(" "), class: `limit-line ${key}` });
  const dots = rows.map((r, i) => svg("circle", { cx: x(i), cy: y(r.defect_rate || 0), r: 3.5,
    class: r.out_of_control ? "dot out" : "dot" }, svg("title", {}, `${r.period}: ${pct(r.defect_rate)} (limits ${pct(r.lcl)}–${pct(r.ucl)})`)));
  return svg("svg", { viewBox: `0 0 ${width} ${height}`, class: "pchart", role: "img", "aria-label": "defect rate with control limits" },
    svg("line", { x1: pad, y1: height - pad, x2: width - pad, y2: height - pad, class: "axis" }),
    svg("text", { x: 2, y: y(top / 1.1) + 4, class: "tick" }, pct(top / 1.1)),
    line("ucl"), line("lcl"), line("center"), ...dots);
}

export async function render(root) {
  const { cameras } = await api("/api/cameras");
  const camera = el("select", { id: "trend-camera" }, el("option", { value: "" }, "all cameras"),
    cameras.map((c) => el("option", { value: c.id }, c.id)));
  const since = el("select", { id: "trend-since" }, ["8h", "24h", "7d", "30d"].map((v) => el("option", { value: v, selected: v === "24h" }, v)));
  const by = el("select", { id: "trend-by" }, el("option", { value: "hour" }, "per hour"), el("option", { value: "shift" }, "per shift"));
  const body = el("div", { id: "trends" });
  root.replaceChildren(el("h1", {}, "Trends"), el("div", { class: "filters" }, camera, since, by), body);

  async function refresh() {
    const query = new URLSearchParams({ since: since.value, by: by.value });
    if (camera.value) query.set("camera", camera.value);
    const data = await api(`/api/stats?${query}`);
    const groups = new Map();
    for (const row of data.rows) {
      const key = `${row.camera} / ${row.class}`;
      if (!groups.has(key)) groups.set(key, []);
      groups.get(key).push(row);
    }
    if (!groups.size) {
      body.replaceChildren(el("p", { class: "muted" }, "No statistics in this window yet."));
      return;
    }
    body.replaceChildren(...[...groups].map(([key, rows]) => el("section", { class: "card trend", dataset: { series: key } },
      el("h2", {}, key), chart(rows),
      el("table", {}, el("thead", {}, el("tr", {}, [by.value === "shift" ? "Shift" : "Hour", "Frames", "Pass", "Fail",
        "Alerts", "Confirmed", "False alarms", "Defect rate", "Control limits"].map((h) => el("th", {}, h)))),
      el("tbody", {}, rows.map((r) => el("tr", { class: r.out_of_control ? "out-of-control" : "" },
        el("td", {}, r.period), el("td", {}, r.frames), el("td", { class: "pass" }, r.frames - r.flagged),
        el("td", { class: "fail" }, r.flagged), el("td", {}, r.alerts), el("td", {}, r.confirmed), el("td", {}, r.false_alarms),
        el("td", {}, pct(r.defect_rate)), el("td", {}, `${pct(r.lcl)} – ${pct(r.ucl)}${r.out_of_control ? " OUT" : ""}`))))))));
  }
  for (const control of [camera, since, by]) control.addEventListener("change", () => refresh().catch(() => {}));
  await refresh();
}
