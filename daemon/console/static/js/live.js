// Live wall: every camera's newest overlay (MJPEG), its status badge, rates and presence per class.
import { api, el } from "./api.js";
import { badge, facts, healthBadge, presenceBars } from "./scores.js";

export async function render(root) {
  root.replaceChildren(el("h1", {}, "Live wall"));
  const grid = el("div", { class: "wall" });
  root.append(grid);
  const cards = new Map();

  async function refresh() {
    const { cameras } = await api("/api/cameras");
    for (const camera of cameras) {
      let card = cards.get(camera.id);
      if (!card) {
        const link = `/cameras/${encodeURIComponent(camera.id)}`;
        card = el("section", { class: "card cam", dataset: { camera: camera.id } },
          el("header", {}, el("a", { href: link, class: "cam-name" }, camera.id), el("span", { class: "slot-badge" }), el("span", { class: "slot-health" })),
          el("a", { href: link }, el("img", { class: "live", alt: `camera ${camera.id}`,
            src: `/api/cameras/${encodeURIComponent(camera.id)}/live.mjpeg` })),
          el("div", { class: "slot-facts" }), el("div", { class: "slot-bars" }));
        cards.set(camera.id, card);
        grid.append(card);
      }
      card.querySelector(".slot-badge").replaceChildren(badge(camera));
      card.querySelector(".slot-health").replaceChildren(healthBadge(camera.health));
      card.querySelector(".slot-facts").replaceChildren(facts(camera));
      card.querySelector(".slot-bars").replaceChildren(presenceBars(camera.classes, camera.presence, camera.thresholds, camera.flagged));
    }
  }
  await refresh();
  setInterval(() => refresh().catch(() => {}), 1000);
}
