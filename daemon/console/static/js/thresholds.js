// Thresholds: each camera/class's threshold and where it comes from; for one, the presence histogram of
// all frames vs confirmed vs false-alarm frames with the what-if curve, and Apply (operators and admins).
import { api, el, score, toast, when } from "./api.js";

const SVG = "http://www.w3.org/2000/svg";

function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  node.append(...children);
  return node;
}

// Bars: share of all frames per bin (log scale), confirmed and false-alarm frames as marks;
// line: share of frames that would flag at each candidate threshold; dashed: the threshold now.
function plot(data, candidate) {
  const width = 640, height = 200, pad = 24;
  const bins = data.histograms.bins;
  const x = (v) => pad + v * (width - 2 * pad);
  const y = (v) => height - pad - v * (height - 2 * pad);
  const total = Math.max(1, data.frames);
  const log = (n) => (n > 0 ? Math.log10(1 + n) / Math.log10(1 + total) : 0);
  const bars = data.histograms.all.map((n, i) => svg("rect", { x: x(i / bins), y: y(log(n)), width: Math.max(1, (width - 2 * pad) / bins - 1),
    height: y(0) - y(log(n)), class: "bin" }, svg("title", {}, `${(i / bins).toFixed(2)}–${((i + 1) / bins).toFixed(2)}: ${n} frames`)));
  const marks = (key, cls) => data.histograms[key].flatMap((n, i) => (n ? [svg("circle", { cx: x((i + 0.5) / bins), cy: y(0) - 6, r: 4, class: cls },
    svg("title", {}, `${n} ${key.replace("_", " ")} frame(s) at ${(i / bins).toFixed(2)}`))] : []));
  const curve = svg("polyline", { class: "whatif-curve", points: data.rows.map((r) => `${x(r.threshold)},${y(r.flagged_rate || 0)}`).join(" ") });
  const now = svg("line", { x1: x(data.current.value), x2: x(data.current.value), y1: pad, y2: y(0), class: "current" });
  const pick = svg("line", { x1: x(candidate), x2: x(candidate), y1: pad, y2: y(0), class: "candidate" });
  return svg("svg", { viewBox: `0 0 ${width} ${height}`, class: "whatif-plot", role: "img", "aria-label": "presence histogram and what-if curve" },
    svg("line", { x1: pad, y1: y(0), x2: width - pad, y2: y(0), class: "axis" }),
    ...[0, 0.25, 0.5, 0.75, 1].map((t) => svg("text", { x: x(t) - 8, y: height - 6, class: "tick" }, t.toFixed(2))),
    ...bars, curve, now, pick, ...marks("confirmed", "confirmed"), ...marks("false_alarm", "false-alarm"));
}

export async function render(root, _arg, me) {
  const list = el("tbody");
  const detail = el("section", { class: "card", id: "whatif" }, el("p", { class: "muted" }, "Choose a threshold to see what other values would have done."));
  root.replaceChildren(el("h1", {}, "Thresholds"),
    el("section", { class: "card" }, el("table", { id: "thresholds" }, el("thead", {}, el("tr", {},
      ["Camera", "Class", "Threshold", "Source", "Default", "Override"].map((h) => el("th", {}, h)))), list)), detail);
  const mayChange = me.role === "operator" || me.role === "admin";

  async function refresh() {
    const data = await api("/api/thresholds");
    list.replaceChildren(...data.thresholds.map((t) => el("tr", { dataset: { camera: t.camera, cls: t.class } },
      el("td", {}, t.camera), el("td", {}, el("a", { href: "#", class: "pick", onclick: (e) => { e.preventDefault(); open(t); } }, t.class)),
      el("td", { class: "value" }, score(t.value)), el("td", { class: "source" }, t.source),
      el("td", {}, `${score(t.default)} (${t.default_source})`),
      el("td", {}, t.override ? `by ${t.override.user}, ${when(t.override.ts)}${t.override.reason ? `: ${t.override.reason}` : ""}` : "–"))));
    return data;
  }

  async function open(t) {
    detail.replaceChildren(el("p", { class: "muted" }, `Replaying ${t.camera}/${t.class}…`));
    const data = await api(`/api/thresholds/${encodeURIComponent(t.camera)}/${encodeURIComponent(t.class)}/whatif?range=0:1:0.01`);
    const value = el("input", { id: "new-value", type: "number", min: 0, max: 1, step: 0.01, value: data.current.value.toFixed(2) });
    const reason = el("input", { id: "new-reason", type: "text", maxlength: 500, placeholder: "reason (kept in the audit)" });
    const chart = el("div", { class: "plot" });
    const facts = el("p", { id: "whatif-facts" });
    const show = () => {
      const candidate = Math.min(1, Math.max(0, Number(value.value) || 0));
      const row = data.rows.reduce((best, r) => (Math.abs(r.threshold - candidate) < Math.abs(best.threshold - candidate) ? r : best), data.rows[0]);
      chart.replaceChildren(plot(data, candidate));
      facts.textContent = `At ${row.threshold.toFixed(2)}: ${row.frames_flagged} of ${data.frames} frames would flag `
        + `(${Object.entries(row.per_shift).map(([s, n]) => `${s} ${n}`).join(", ") || "no shifts"}), about ${row.alerts} alert(s), `
        + `${row.confirmed_missed} confirmed defect(s) missed, ${row.false_alarms_avoided} false alarm(s) avoided. `
        + `Now ${data.current.value.toFixed(3)} (${data.current.source}); ${data.actual_alerts} alert(s) raised.`;
    };
    value.addEventListener("input", show);
    const apply = el("button", { id: "apply", type: "button", hidden: !mayChange, onclick: async () => {
      try {
        const change = await api(`/api/thresholds/${encodeURIComponent(t.camera)}/${encodeURIComponent(t.class)}`,
          { method: "PUT", json: { value: Number(value.value), reason: reason.value } });
        toast(`${t.camera}/${t.class}: ${change.old.toFixed(3)} → ${change.new.toFixed(3)}; workers apply it within 2 s`);
        data.current = { value: change.new, source: change.new_source };
        show();
        await refresh();
      } catch (err) {
        toast(err.message);
      }
    } }, "Apply");
    detail.replaceChildren(el("h2", {}, `${t.camera} / ${t.class}`), chart, facts,
      el("p", { class: "muted" }, `Alerts: ${data.method.alerts}.`),
      el("div", { class: "filters" }, el("label", {}, "New threshold ", value), reason, apply));
    show();
  }
  await refresh();
}
