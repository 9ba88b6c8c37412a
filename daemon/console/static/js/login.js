// Login form: POST /api/login, then back to the page that sent us here.
const form = document.getElementById("login");
const errorBox = document.getElementById("error");

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  errorBox.textContent = "";
  const body = JSON.stringify({ user: form.user.value, password: form.password.value });
  const response = await fetch("/api/login", { method: "POST", headers: { "Content-Type": "application/json" }, body });
  if (response.ok) {
    const next = new URLSearchParams(location.search).get("next") || "/live";
    location.assign(next.startsWith("/") && !next.startsWith("//") ? next : "/live");
    return;
  }
  const data = await response.json().catch(() => ({}));
  errorBox.textContent = data.error || `login failed (${response.status})`;
});
