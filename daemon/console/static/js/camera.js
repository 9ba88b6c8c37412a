// Camera view: one camera large, a mask layer with opacity and per-class toggles, its last alerts.
import { api, el, onEvent, when, score } from "./api.js";
import { badge, facts, presenceBars } from "./scores.js";

const PALETTE = [[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
  [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212]];

export async function render(root, cameraId) {
  const { cameras } = await api("/api/cameras");
  const camera = cameras.find((c) => c.id === cameraId);
  if (!camera) {
    root.replaceChildren(el("h1", {}, "No such camera"), el("p", {}, `There is no camera "${cameraId}". `), el("a", { href: "/live" }, "Back to the live wall"));
    return;
  }
  const enc = encodeURIComponent(camera.id);
  const enabled = new Set(camera.classes);
  const opacity = el("input", { type: "range", min: "0", max: "100", value: "40", id: "opacity", "aria-label": "mask opacity" });
  const toggles = camera.classes.map((name, i) => {
    const box = el("input", { type: "checkbox", checked: true, dataset: { cls: name } });
    box.addEventListener("change", () => { if (box.checked) enabled.add(name); else enabled.delete(name); drawMask(); });
    const swatch = el("span", { class: "swatch" });
    swatch.style.background = `rgb(${PALETTE[i % PALETTE.length].join(",")})`;
    return el("label", { class: "toggle" }, box, swatch, name);
  });
  const image = el("img", { class: "live big", alt: `camera ${camera.id}`, src: `/api/cameras/${enc}/live.mjpeg` });
  const canvas = el("canvas", { class: "mask-layer" });
  const side = el("div", { class: "slot-status" });
  const alertList = el("ul", { class: "alert-list" });
  root.replaceChildren(
    el("h1", {}, `Camera ${camera.id} `, el("span", { class: "slot-badge" })),
    el("div", { class: "camera-view" },
      el("div", { class: "stage" }, image, canvas),
      el("aside", { class: "card" },
        el("h2", {}, "Mask layer"), el("label", {}, "Opacity ", opacity), el("div", { class: "toggles" }, toggles),
        el("h2", {}, "Now"), side,
        el("h2", {}, "Last alerts"), alertList)));

  let labels = null;
  async function loadMask() {
    const response = await fetch(`/api/cameras/${enc}/mask.png`, { cache: "no-store" });
    if (!response.ok) return;
    const bitmap = await createImageBitmap(await response.blob());
    const off = new OffscreenCanvas(bitmap.width, bitmap.height);
    const ctx = off.getContext("2d");
    ctx.drawImage(bitmap, 0, 0);
    labels = ctx.getImageData(0, 0, bitmap.width, bitmap.height);
    drawMask();
  }
  function drawMask() {
    if (!labels) return;
    canvas.width = labels.width;
    canvas.height = labels.height;
    const out = new ImageData(labels.width, labels.height);
    const alpha = Math.round(Number(opacity.value) * 2.55);
    for (let i = 0; i < labels.data.length; i += 4) {
      const k = labels.data[i];
      if (k === 0 || !enabled.has(camera.classes[k - 1])) continue;
      const [r, g, b] = PALETTE[(k - 1) % PALETTE.length];
      out.data[i] = r; out.data[i + 1] = g; out.data[i + 2] = b; out.data[i + 3] = alpha;
    }
    canvas.getContext("2d").putImageData(out, 0, 0);
  }
  opacity.addEventListener("input", drawMask);

  async function loadAlerts() {
    const { alerts } = await api(`/api/alerts?camera=${enc}&limit=10`);
    alertList.replaceChildren(...alerts.map((a) => el("li", {},
      el("strong", {}, a.class), ` ${score(a.classes[a.class]?.presence)} at ${when(a.capture_ts)} `,
      a.recording_id ? el("a", { href: `/review/${a.recording_id}` }, "recording") : "",
      a.ack ? el("span", { class: "muted" }, ` acked by ${a.ack.user}`) : "")));
  }
  async function refresh() {
    const { cameras: all } = await api("/api/cameras");
    const now = all.find((c) => c.id === camera.id);
    if (!now) return;
    root.querySelector(".slot-badge").replaceChildren(badge(now));
    side.replaceChildren(facts(now), presenceBars(now.classes, now.presence, now.thresholds, now.flagged));
  }
  onEvent("alert", (a) => { if (a.camera === camera.id) loadAlerts(); });
  await Promise.all([refresh(), loadAlerts(), loadMask()]);
  setInterval(() => refresh().catch(() => {}), 1000);
  setInterval(() => loadMask().catch(() => {}), 1000);
}
