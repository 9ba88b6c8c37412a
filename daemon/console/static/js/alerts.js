// Alerts: filterable list that grows live (SSE), with acknowledge (operators) and links to recordings.
import { api, el, onEvent, score, toast, when } from "./api.js";

export async function render(root, _arg, me) {
  const params = new URLSearchParams(location.search);
  const { cameras } = await api("/api/cameras");
  const form = el("form", { class: "filters card", id: "filters" },
    el("label", {}, "Camera ", el("select", { name: "camera" }, el("option", { value: "" }, "all"),
      cameras.map((c) => el("option", { value: c.id }, c.id)))),
    el("label", {}, "Class ", el("select", { name: "cls" }, el("option", { value: "" }, "all"),
      [...new Set(cameras.flatMap((c) => c.classes))].map((c) => el("option", { value: c }, c)))),
    el("label", {}, "From ", el("input", { type: "datetime-local", name: "from" })),
    el("label", {}, "To ", el("input", { type: "datetime-local", name: "to" })),
    el("label", {}, "State ", el("select", { name: "state" }, el("option", { value: "" }, "all"),
      el("option", { value: "unacked" }, "unacknowledged"), el("option", { value: "acked" }, "acknowledged"))),
    el("button", { type: "submit" }, "Apply"));
  for (const [key, value] of params) if (form.elements[key]) form.elements[key].value = value;
  const table = el("table", { class: "alerts", id: "alerts-table" },
    el("thead", {}, el("tr", {}, ["#", "Time", "Camera", "Class", "Presence / threshold", "Recording", "Acknowledged", ""].map((h) => el("th", {}, h)))),
    el("tbody"));
  root.replaceChildren(el("h1", {}, "Alerts"), form, table);
  const body = table.tBodies[0];

  function filters() {
    const out = new URLSearchParams();
    for (const key of ["camera", "cls", "state"]) if (form.elements[key].value) out.set(key, form.elements[key].value);
    for (const key of ["from", "to"]) {
      const value = form.elements[key].value;
      if (value) out.set(key, String(new Date(value).getTime() / 1000));
    }
    return out;
  }
  function matches(alert) {
    const f = filters();
    if (f.get("camera") && alert.camera !== f.get("camera")) return false;
    if (f.get("cls") && alert.class !== f.get("cls")) return false;
    if (f.get("state") === "acked" && !alert.ack) return false;
    if (f.get("to") && alert.capture_ts > Number(f.get("to"))) return false;
    return !(f.get("from") && alert.capture_ts < Number(f.get("from")));
  }
  function ackCell(alert) {
    if (alert.ack) return el("span", {}, `${alert.ack.user}, ${when(alert.ack.ts)}`);
    if (me.role === "viewer") return el("span", { class: "muted" }, "no");
    return el("button", { type: "button", class: "ack", onclick: async () => {
      try {
        const done = await api(`/api/alerts/${alert.id}/ack`, { json: {} });
        alert.ack = { user: done.user, ts: done.ts };
        replaceRow(alert);
      } catch (err) { toast(err.message); }
    } }, "Acknowledge");
  }
  function row(alert, fresh = false) {
    const info = alert.classes?.[alert.class] || {};
    return el("tr", { class: `${alert.ack ? "acked" : "unacked"}${fresh ? " fresh" : ""}`, dataset: { id: alert.id } },
      el("td", {}, alert.id), el("td", {}, when(alert.capture_ts)),
      el("td", {}, el("a", { href: `/cameras/${encodeURIComponent(alert.camera)}` }, alert.camera)),
      el("td", {}, alert.class), el("td", {}, `${score(info.presence)} / ${score(info.threshold)}`),
      el("td", {}, alert.recording_id ? el("a", { href: `/review/${alert.recording_id}` }, `#${alert.recording_id}`) : "–"),
      el("td", { class: "ack-cell" }, ackCell(alert)), el("td"));
  }
  function replaceRow(alert) {
    const old = body.querySelector(`tr[data-id="${alert.id}"]`);
    if (old) old.replaceWith(row(alert));
  }
  async function load() {
    const query = filters();
    history.replaceState(null, "", `/alerts${query.toString() ? `?${query}` : ""}`);
    query.set("limit", "200");
    const { alerts } = await api(`/api/alerts?${query}`);
    body.replaceChildren(...alerts.map((a) => row(a)));
  }
  form.addEventListener("submit", (event) => { event.preventDefault(); load(); });
  onEvent("alert", (alert) => {
    if (!matches(alert) || filters().get("state") === "acked") return;
    if (!body.querySelector(`tr[data-id="${alert.id}"]`)) body.prepend(row(alert, true));
    if (!alert.recording_id) {
      // The recorder indexes the frame a moment after the alert is stored: fetch the link then.
      setTimeout(async () => {
        const { alerts } = await api(`/api/alerts?since=${alert.id - 1}&limit=1`);
        const tr = body.querySelector(`tr[data-id="${alert.id}"]`);
        if (alerts.length && alerts[0].recording_id && tr) tr.replaceWith(row(alerts[0], tr.classList.contains("fresh")));
      }, 3000);
    }
  });
  onEvent("ack", (ack) => {
    const tr = body.querySelector(`tr[data-id="${ack.id}"]`);
    if (tr) {
      tr.classList.replace("unacked", "acked");
      tr.querySelector(".ack-cell").replaceChildren(el("span", {}, `${ack.user}, ${when(ack.ts)}`));
    }
  });
  await load();
}
