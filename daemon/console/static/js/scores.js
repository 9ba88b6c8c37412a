// Presence-vs-threshold bars shared by the live wall and the camera view.
import { el, score } from "./api.js";

export function presenceBars(classes, presence, thresholds, flagged) {
  return el("div", { class: "bars" }, classes.map((name) => {
    const value = presence[name];
    const limit = thresholds[name];
    const pct = (v) => `${Math.max(0, Math.min(100, (v || 0) * 100)).toFixed(1)}%`;
    const bar = el("div", { class: "bar" }, el("div", { class: "fill" }), el("div", { class: "limit" }));
    bar.firstChild.style.width = pct(value);
    bar.lastChild.style.left = pct(limit);
    return el("div", { class: `bar-row${flagged.includes(name) ? " flagged" : ""}`, dataset: { cls: name } },
      el("span", { class: "cls" }, name), bar, el("span", { class: "num" }, `${score(value)} / ${score(limit)}`));
  }));
}

export function badge(camera) {
  return el("span", { class: `badge ${camera.status}`, dataset: { status: camera.status } }, camera.status);
}

export function facts(camera) {
  const age = camera.last_frame_age_s === null ? "no frame yet" : `${camera.last_frame_age_s.toFixed(1)} s ago`;
  return el("div", { class: "facts" },
    el("span", {}, `last frame ${age}`),
    el("span", {}, `${camera.fps.toFixed(1)} frames/s`),
    el("span", {}, `${camera.dropped} dropped`));
}

// Camera health (frozen, defocus, exposure, presence drift, inspection unreliable) as a badge; its reason as a tooltip.
export function healthBadge(health) {
  const state = health ? health.state : "unknown";
  return el("span", { class: `health ${state}`, dataset: { health: state }, title: health ? health.reason || "ok" : "no health report" },
    state === "ok" ? "inspection ok" : state.replace("_", " "));
}
