// Review: flagged recordings as a queue with keyboard triage.
//   j / k      next / previous recording
//   c / f / u  verdict confirmed / false alarm / unsure (the note field, if filled, goes with it)
//   1 / 2 / 3  original / overlay / mask;  n  focus the note;  Esc  leave the note
import { api, el, onEvent, score, toast, when } from "./api.js";

const VERDICT_KEYS = { c: "confirmed", f: "false-alarm", u: "unsure" };
const VIEWS = ["original", "overlay", "mask"];

export async function render(root, deepId, me) {
  const params = new URLSearchParams(location.search);
  let status = params.get("status") ?? "unreviewed";
  let queue = [];
  let index = 0;
  let view = "overlay";
  let current = null;

  const statusSelect = el("select", { id: "queue-status", "aria-label": "queue" },
    ["unreviewed", "unsure", "confirmed", "false-alarm", ""].map((s) => el("option", { value: s }, s || "all")));
  statusSelect.value = status;
  const list = el("ol", { class: "queue", id: "queue" });
  const image = el("img", { class: "review-image", id: "review-image", alt: "flagged frame" });
  const viewButtons = VIEWS.map((v, i) => el("button", { type: "button", dataset: { view: v }, onclick: () => setView(v) }, `${i + 1} ${v}`));
  const strip = el("div", { class: "strip", id: "context" });
  const why = el("div", { class: "card why", id: "why" });
  const note = el("input", { id: "note", placeholder: "reason (optional; press n to type, Esc when done)", maxlength: "500" });
  const verdictButtons = Object.entries(VERDICT_KEYS).map(([key, v]) =>
    el("button", { type: "button", class: `verdict ${v}`, dataset: { verdict: v }, disabled: me.role === "viewer", onclick: () => judge(v) }, `${key} ${v}`));
  const title = el("h2", { id: "review-title" });
  root.replaceChildren(
    el("h1", {}, "Review"),
    el("div", { class: "review" },
      el("aside", { class: "card" }, el("label", {}, "Queue ", statusSelect), list),
      el("section", { class: "review-main" },
        title, el("div", { class: "views" }, viewButtons), image, strip,
        el("div", { class: "verdicts" }, note, verdictButtons),
        el("p", { class: "muted keys" }, "j/k next/previous · c confirmed · f false alarm · u unsure · 1/2/3 original/overlay/mask · n note")),
      why));

  async function loadQueue() {
    const query = new URLSearchParams({ order: "asc", limit: "500" });
    if (status) query.set("status", status);
    queue = (await api(`/api/recordings?${query}`)).recordings;
    list.replaceChildren(...queue.map((r, i) => el("li", { dataset: { id: r.id }, onclick: () => select(i) },
      `#${r.id} ${r.camera} · ${r.flagged.join(", ")} · ${r.status}`)));
  }

  function setView(v) {
    view = v;
    for (const b of viewButtons) b.classList.toggle("active", b.dataset.view === v);
    if (current) image.src = `/api/recordings/${current.id}/${v}`;
  }

  async function show(id) {
    current = await api(`/api/recordings/${id}`);
    history.replaceState(null, "", `/review/${id}${status !== "unreviewed" ? `?status=${status}` : ""}`);
    title.textContent = `Recording #${current.id} · ${current.camera} · seq ${current.seq} · ${when(current.capture_ts)} · `;
    title.append(el("span", { class: `status ${current.status}`, id: "review-status" }, current.status));
    setView(view);
    const frames = [...current.context.before.slice().reverse().map((n) => `before-${n}`), "flagged", ...current.context.after.map((n) => `after-${n}`)];
    strip.replaceChildren(...frames.map((kind) => kind === "flagged"
      ? el("figure", { class: "this" }, el("img", { src: `/api/recordings/${current.id}/overlay`, alt: "flagged frame" }), el("figcaption", {}, "flagged"))
      : el("figure", {}, el("img", { src: `/api/recordings/${current.id}/${kind}`, alt: kind }), el("figcaption", {}, kind))));
    const w = current.why;
    why.replaceChildren(el("h2", {}, "Why flagged"),
      el("table", {}, el("thead", {}, el("tr", {}, ["Class", "Presence", "Threshold", "Mask area"].map((h) => el("th", {}, h)))),
        el("tbody", {}, w.classes.map((c) => el("tr", { class: c.flagged ? "flagged" : "" },
          el("td", {}, c.class), el("td", {}, score(c.presence)), el("td", {}, score(c.threshold)),
          el("td", { title: c.area_px == null ? "" : `${c.area_px} px` }, c.area_px == null ? "–" : `${(100 * c.area_frac).toFixed(1)} %`))))),
      el("p", {}, `Alert rule: ${w.window.k} of the last ${w.window.n} frames`),
      w.window.frames.length ? el("p", { class: "window" }, "Window: ", w.window.frames.map((f) =>
        el("span", { class: `tick${f.flagged.length ? " on" : ""}`, title: `seq ${f.seq}: ${f.flagged.join(", ") || "clear"}` }, f.flagged.length ? "■" : "□"))) : "",
      el("p", {}, `Alerts: ${w.alert_ids.length ? w.alert_ids.map((a) => `#${a}`).join(", ") : "none (debounced)"}`),
      el("p", {}, `Model: ${w.model || "unknown"}`), el("p", {}, `Config version: ${w.config_version || "unknown"}`),
      current.audit.length ? el("div", {}, el("h2", {}, "History"), el("ul", {}, current.audit.map((a) =>
        el("li", {}, `${when(a.ts)} ${a.user}: ${a.old} → ${a.new}${a.note ? ` (${a.note})` : ""}`)))) : "");
    for (const li of list.children) li.classList.toggle("current", Number(li.dataset.id) === current.id);
    list.querySelector("li.current")?.scrollIntoView({ block: "nearest" });
  }

  async function select(i) {
    if (!queue.length) {
      title.textContent = "Nothing to review in this queue.";
      current = null;
      image.removeAttribute("src");
      strip.replaceChildren();
      why.replaceChildren();
      return;
    }
    index = Math.max(0, Math.min(queue.length - 1, i));
    await show(queue[index].id);
  }

  async function judge(verdict) {
    if (!current) return;
    try {
      await api(`/api/recordings/${current.id}/verdict`, { json: { verdict, note: note.value } });
    } catch (err) {
      toast(err.message);
      return;
    }
    note.value = "";
    toast(`#${current.id} marked ${verdict}`);
    const judged = current.id;
    if (status && status !== verdict) {
      queue = queue.filter((r) => r.id !== judged);
      list.querySelector(`li[data-id="${judged}"]`)?.remove();
      await select(index);
    } else {
      await show(judged);
      await select(index + 1);
    }
  }

  document.addEventListener("keydown", (event) => {
    if (event.target === note) {
      if (event.key === "Escape" || event.key === "Enter") note.blur();
      return;
    }
    if (event.ctrlKey || event.metaKey || event.altKey || event.target.tagName === "SELECT") return;
    if (event.key === "j") select(index + 1);
    else if (event.key === "k") select(index - 1);
    else if (VERDICT_KEYS[event.key] && me.role !== "viewer") judge(VERDICT_KEYS[event.key]);
    else if (["1", "2", "3"].includes(event.key)) setView(VIEWS[Number(event.key) - 1]);
    else if (event.key === "n") { event.preventDefault(); note.focus(); }
    else return;
    event.preventDefault();
  });
  statusSelect.addEventListener("change", async () => { status = statusSelect.value; await loadQueue(); await select(0); });
  onEvent("verdict", (change) => {
    const li = list.querySelector(`li[data-id="${change.id}"]`);
    if (li) li.textContent = li.textContent.replace(/[^·]+$/, ` ${change.new}`);
  });

  await loadQueue();
  const wanted = Number(deepId);
  const at = queue.findIndex((r) => r.id === wanted);
  if (wanted && at < 0) {
    try { await show(wanted); } catch (err) { title.textContent = err.message; }
  } else {
    await select(at >= 0 ? at : 0);
  }
}
