// Health: roles (up, restarts, heartbeat), per-camera flow and latency, the console's own numbers.
import { api, el } from "./api.js";

const fmt = (v, digits = 0) => (typeof v === "number" && Number.isFinite(v) ? v.toFixed(digits) : "–");

export async function render(root) {
  const roles = el("tbody");
  const cams = el("tbody");
  const own = el("p", { class: "muted" });
  root.replaceChildren(el("h1", {}, "Health"),
    el("section", { class: "card" }, el("h2", {}, "Roles"), el("table", { id: "roles" },
      el("thead", {}, el("tr", {}, ["Role", "Up", "PID", "Restarts", "Heartbeat age (s)", "State"].map((h) => el("th", {}, h)))), roles)),
    el("section", { class: "card" }, el("h2", {}, "Cameras"), el("table", { id: "flow" },
      el("thead", {}, el("tr", {}, ["Camera", "Captured", "Dropped", "Processed", "Published", "Re-sent", "Lost",
        "In flight", "Gaps", "Alerts", "Latency p50 / p99 (ms)", "Batch p50 / p99 (ms)", "GPU memory (MB)"]
        .map((h) => el("th", {}, h)))), cams)),
    own);

  async function refresh() {
    const { stats, stats_error: problem, console: mine } = await api("/api/health");
    roles.replaceChildren(...Object.entries(stats.roles || {}).map(([name, r]) => el("tr", { class: r.up ? "" : "down" },
      el("td", {}, name), el("td", {}, r.up ? "yes" : "NO"), el("td", {}, r.pid ?? "–"), el("td", {}, r.restarts),
      el("td", {}, fmt(r.heartbeat_age_s, 1)),
      el("td", { class: "state" }, Object.entries(r.state || {}).filter(([k]) => !k.endsWith("_at")).map(([k, v]) => `${k}=${typeof v === "number" ? fmt(v, 1) : v}`).join(" ")))));
    const gpu = Object.values(stats.roles || {}).map((r) => r.state?.gpu_memory_mb).filter((v) => typeof v === "number");
    // Lost: frames a worker had taken that ended with no result (the reasons show on hover).
    const reasons = (c) => Object.entries(c.lost_reasons || {}).filter(([, n]) => n).map(([r, n]) => `${n} ${r}`).join(", ");
    cams.replaceChildren(...Object.entries(stats.cameras || {}).map(([id, c]) => el("tr", { class: c.lost ? "down" : "" },
      el("td", {}, id), el("td", {}, fmt(c.captured)), el("td", {}, fmt(c.dropped)), el("td", {}, fmt(c.processed)),
      el("td", {}, fmt(c.published)), el("td", {}, fmt(c.resent)),
      el("td", { class: "lost", title: reasons(c) || "none lost" }, fmt(c.lost)), el("td", {}, fmt(c.in_flight)),
      el("td", {}, fmt(c.gaps)), el("td", {}, fmt(c.alerts)),
      el("td", {}, `${fmt(c.latency_ms_p50)} / ${fmt(c.latency_ms_p99)}`),
      el("td", {}, `${fmt(c.inference_ms_p50)} / ${fmt(c.inference_ms_p99)}`),
      el("td", {}, gpu.length ? gpu.map((v) => fmt(v)).join(", ") : "CPU"))));
    own.textContent = `${problem ? `Supervisor stats unavailable (${problem}). ` : ""}Console: ${mine.viewers} live viewer(s), ${mine.event_clients} event client(s), ${mine.frames_received} frames received.`;
  }
  await refresh();
  setInterval(() => refresh().catch(() => {}), 2000);
}
