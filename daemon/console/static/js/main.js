// The page shell: who is logged in, navigation, the alert cue (sound + counter), then the page module.
import { api, onEvent, toast } from "./api.js";
import { cue, isMuted, setMuted } from "./sound.js";

const pages = {
  live: () => import("./live.js"),
  camera: () => import("./camera.js"),
  alerts: () => import("./alerts.js"),
  review: () => import("./review.js"),
  health: () => import("./health.js"),
  trends: () => import("./trends.js"),
  thresholds: () => import("./thresholds.js"),
};

function pageOf(path) {
  if (path.startsWith("/cameras/")) return ["camera", decodeURIComponent(path.split("/")[2] || "")];
  if (path.startsWith("/review")) return ["review", path.split("/")[2] || ""];
  const name = path.replace(/^\//, "") || "live";
  return [pages[name] ? name : "live", ""];
}

async function start() {
  const me = await api("/api/me");
  document.body.dataset.role = me.role;
  document.getElementById("who").textContent = `${me.user} (${me.role})`;
  document.getElementById("logout").addEventListener("click", async () => {
    await fetch("/api/logout", { method: "POST" });
    location.assign("/login");
  });
  const mute = document.getElementById("mute");
  const showMute = () => { mute.textContent = isMuted() ? "Sound off" : "Sound on"; mute.setAttribute("aria-pressed", String(isMuted())); };
  mute.addEventListener("click", () => { setMuted(!isMuted()); showMute(); });
  showMute();

  const [name, arg] = pageOf(location.pathname);
  for (const link of document.querySelectorAll("nav a")) {
    if (link.dataset.page === name || (name === "camera" && link.dataset.page === "live")) link.classList.add("active");
  }
  const counter = document.getElementById("unacked");
  const unacked = await api("/api/alerts?state=unacked&limit=1000");
  let count = unacked.alerts.length;
  const showCount = () => { counter.textContent = String(count); counter.hidden = count === 0; };
  showCount();
  onEvent("alert", (alert) => {
    if (!alert.ack) count += 1;
    showCount();
    cue();
    if (name !== "alerts") toast(`Alert: ${alert.class} on ${alert.camera}`);
  });
  onEvent("ack", (ack) => { if (ack.old === null) { count = Math.max(0, count - 1); showCount(); } });

  const module = await pages[name]();
  await module.render(document.getElementById("page"), arg, me);
}

start().catch((err) => {
  if (err.status !== 401) document.getElementById("page").textContent = `Could not load the console: ${err.message}`;
});
