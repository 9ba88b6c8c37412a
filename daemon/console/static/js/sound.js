// The audible alert cue: a short two-tone beep made with WebAudio (no sound file); muting is remembered.
let context = null;

function unlock() {
  // Browsers only allow audio after a user gesture: create the context on the first one.
  if (!context && window.AudioContext) context = new AudioContext();
}
document.addEventListener("pointerdown", unlock, { once: true });
document.addEventListener("keydown", unlock, { once: true });

export function isMuted() {
  return localStorage.getItem("iseg-muted") === "1";
}

export function setMuted(muted) {
  localStorage.setItem("iseg-muted", muted ? "1" : "0");
}

export function cue() {
  document.body.classList.remove("flash");
  void document.body.offsetWidth;
  document.body.classList.add("flash");
  if (isMuted() || !context || context.state !== "running") return;
  const now = context.currentTime;
  for (const [offset, freq] of [[0, 880], [0.18, 660]]) {
    const osc = context.createOscillator();
    const gain = context.createGain();
    osc.frequency.value = freq;
    gain.gain.setValueAtTime(0.2, now + offset);
    gain.gain.exponentialRampToValueAtTime(0.001, now + offset + 0.15);
    osc.connect(gain).connect(context.destination);
    osc.start(now + offset);
    osc.stop(now + offset + 0.16);
  }
}
