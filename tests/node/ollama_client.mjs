// The official `ollama` npm client (ollama-js) against the edge's /ollama, one scenario a run:
// `node ollama_client.mjs <scenario> <edge url>` prints what the client returned as one JSON line,
// for tests/test_js_clients.py to check.
import { Ollama } from "ollama";

const [scenario, edge] = process.argv.slice(2);
const ollama = new Ollama({ host: `${edge}/ollama` });
const MODEL = "llama3.2:1b";
const ASK = [{ role: "user", content: "Why is the sky blue?" }];

async function failure(call) {
  try {
    return { returned: await call() };
  } catch (err) {
    return { name: err.name, error: err.error ?? null, status_code: err.status_code ?? null, message: err.message };
  }
}

async function collect(stream) {
  const parts = [];
  for await (const part of stream) parts.push(part);
  return parts;
}

const scenarios = {
  async chat() {
    const whole = await ollama.chat({ model: MODEL, messages: ASK, stream: false });
    const parts = await collect(await ollama.chat({ model: MODEL, messages: ASK, stream: true }));
    return { whole, parts };
  },

  async generate() {
    const whole = await ollama.generate({ model: MODEL, prompt: "Once upon a time" });
    const parts = await collect(await ollama.generate({ model: MODEL, prompt: "Once upon a time", stream: true }));
    return { whole, parts };
  },

  async embed() {
    const one = await ollama.embed({ model: "nomic-embed-text", input: "a green stone" });
    const many = await ollama.embed({ model: "nomic-embed-text", input: ["a", "b"], dimensions: 16 });
    return { one, many };
  },

  async models() {
    const listed = await ollama.list();
    const shown = await ollama.show({ model: MODEL });
    const missing = await failure(() => ollama.show({ model: "no-such-model:7b" }));
    return { listed, shown, missing };
  },

  async errors() {
    const unknown = await failure(() => ollama.chat({ model: "no-such-model:7b", messages: ASK }));
    // Ollama answers a stream for a model it lacks with a 404 too, before any line.
    const streamed = await failure(async () => {
      for await (const _ of await ollama.chat({ model: "no-such-model:7b", messages: ASK, stream: true }));
    });
    return { unknown, streamed };
  },

  async abort() {
    const stream = await ollama.chat({ model: MODEL, messages: [{ role: "user", content: "write an essay" }], stream: true });
    let parts = 0;
    try {
      for await (const _ of stream) {
        if (++parts === 3) stream.abort();
      }
      return { parts, error: null };
    } catch (err) {
      return { parts, error: { name: err.name, message: err.message } };
    }
  },
};

console.log(JSON.stringify(await scenarios[scenario]()));
