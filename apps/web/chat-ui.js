// The chat page parts shared by index.html (server mode) and inbrowser.html (in-browser mode).
export const $ = (id) => document.getElementById(id);

// The sampling inputs start empty: /web-config.json fills them with ondevice's one set of defaults
// (SamplingDefaults, ondevice/runtime/sampling.py), so the pages carry no numbers of their own. Only empty inputs
// are filled, so a value typed (or set from the query string) stays.
export const SAMPLING_INPUTS = ["temperature", "repeat_penalty", "max_tokens"];

export function applySampling(sampling) {
  for (const name of SAMPLING_INPUTS) {
    if ($(name).value === "" && sampling && sampling[name] !== undefined) $(name).value = sampling[name];
  }
}

// {name: number} for the sampling inputs that hold a number; an empty one is left out (the default applies).
export function samplingValues() {
  const values = {};
  for (const name of SAMPLING_INPUTS) {
    if ($(name).value.trim() !== "" && Number.isFinite(Number($(name).value))) values[name] = Number($(name).value);
  }
  return values;
}

// A message bubble in the log (role: user, assistant or error).
export function bubble(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  $("log").appendChild(div);
  $("log").scrollTop = $("log").scrollHeight;
  return div;
}

export function addMeta(out, text) {
  const meta = document.createElement("div");
  meta.className = "meta";
  meta.textContent = text;
  out.appendChild(meta);
}

// Turn the reply bubble into an error (keeping what was streamed) and drop the unanswered user message.
export function failReply(out, reply, messages, error) {
  out.className = "msg error";
  out.textContent = (reply ? reply + "\n\n" : "") + "Error: " + error.message;
  messages.pop();
  $("status").textContent = "error";
}

// The composer: Enter sends, Shift+Enter is a new line, the button is Send or Stop, New chat clears the log.
// busy() says whether a reply is running (the button then calls stop()); send(text) starts one.
export function wireComposer({ busy, stop, send, messages }) {
  $("form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    if (busy()) { stop(); return; }
    const text = $("prompt").value.trim();
    if (!text) return;
    $("prompt").value = "";
    send(text);
  });
  $("prompt").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("form").requestSubmit(); }
  });
  $("reset").addEventListener("click", () => { messages.length = 0; $("log").textContent = ""; });
}
