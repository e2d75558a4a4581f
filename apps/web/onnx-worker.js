// The in-browser model runs here, in a Web Worker, not on the page's thread: a reply can take seconds of
// WebAssembly per token batch, and on the page's thread nothing would repaint, no timer would fire, and a Stop
// click or a typed key would wait for the whole reply. The page (inbrowser.html) talks to it by messages:
//   page -> worker  {type: "load", base} | {type: "generate", messages, options} | {type: "stop"}
//   worker -> page  {type: "progress", text} | {type: "loaded", name} | {type: "piece", text}
//                   | {type: "done", result} | {type: "error", message}
import { OnnxChat } from "./onnx-chat.js";

let chat = null;
let controller = null;  // the running reply's; "stop" aborts it (generate() yields to events between tokens)

self.onmessage = async ({ data }) => {
  if (data.type === "stop") { if (controller) controller.abort(); return; }
  try {
    if (data.type === "load") {
      chat = await OnnxChat.load(data.base, (text) => self.postMessage({ type: "progress", text }));
      self.postMessage({ type: "loaded", name: chat.name });
    } else if (data.type === "generate") {
      controller = new AbortController();
      const stream = chat.generate(data.messages, { ...data.options, signal: controller.signal });
      let step;
      while (!(step = await stream.next()).done) self.postMessage({ type: "piece", text: step.value.text });
      self.postMessage({ type: "done", result: step.value });
    }
  } catch (e) {
    self.postMessage({ type: "error", message: (e && e.message) || String(e) });
  } finally {
    if (data.type === "generate") controller = null;
  }
};
