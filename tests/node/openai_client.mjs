// The official `openai` npm client (openai-node) against the edge's /openai/v1, one scenario a run:
// `node openai_client.mjs <scenario> <edge url>` prints what the client returned as one JSON line,
// for tests/test_js_clients.py to check.
import OpenAI from "openai";

const [scenario, edge] = process.argv.slice(2);
const client = new OpenAI({ baseURL: `${edge}/openai/v1`, apiKey: "unused", maxRetries: 0, timeout: 30_000 });
const MODEL = "llama3.2:1b";
const ASK = [{ role: "user", content: "Weather in Paris?" }];
const WEATHER = {
  type: "function",
  function: {
    name: "get_weather",
    description: "The weather in a city",
    parameters: { type: "object", properties: { city: { type: "string" } }, required: ["city"] },
  },
};

// What the SDK made of an error: its class, status and OpenAI's error object.
function thrown(err) {
  return {
    name: err.constructor.name,
    isAPIError: err instanceof OpenAI.APIError,
    isNotFound: err instanceof OpenAI.NotFoundError,
    isBadRequest: err instanceof OpenAI.BadRequestError,
    isAbort: err instanceof OpenAI.APIUserAbortError,
    status: err.status ?? null,
    error: err.error ?? null,
    code: err.code ?? null,
    type: err.type ?? null,
    param: err.param ?? null,
    message: err.message,
  };
}

async function failure(call) {
  try {
    return { returned: await call() };
  } catch (err) {
    return thrown(err);
  }
}

const scenarios = {
  async chat() {
    return await client.chat.completions.create({ model: MODEL, messages: ASK, max_tokens: 16 });
  },

  async stream() {
    const stream = await client.chat.completions.create({
      model: MODEL,
      messages: ASK,
      stream: true,
      stream_options: { include_usage: true },
    });
    const chunks = [];
    for await (const chunk of stream) chunks.push(chunk);
    const choices = chunks.flatMap((c) => c.choices);
    return {
      chunks: chunks.length,
      objects: [...new Set(chunks.map((c) => c.object))],
      ids: [...new Set(chunks.map((c) => c.id))],
      text: choices.map((c) => c.delta.content ?? "").join(""),
      roles: choices.map((c) => c.delta.role).filter(Boolean),
      finish_reasons: choices.map((c) => c.finish_reason).filter(Boolean),
      usage: chunks.at(-1).usage ?? null,
      usage_chunk_choices: chunks.at(-1).choices.length,
    };
  },

  async tools() {
    const asked = await client.chat.completions.create({
      model: MODEL,
      messages: ASK,
      tools: [WEATHER],
      tool_choice: "auto",
    });
    const call = asked.choices[0].message.tool_calls[0];
    // The stream's tool call, assembled from deltas by the SDK's own helper.
    const runner = client.chat.completions.stream({ model: MODEL, messages: ASK, tools: [WEATHER] });
    const streamed = await runner.finalChatCompletion();
    const history = [
      ...ASK,
      asked.choices[0].message,
      { role: "tool", tool_call_id: call.id, content: "sunny" },
    ];
    const final = await client.chat.completions.create({ model: MODEL, messages: history, tools: [WEATHER] });
    return { asked, streamed, final };
  },

  async models() {
    const listed = [];
    for await (const model of client.models.list()) listed.push(model);
    const retrieved = await client.models.retrieve(MODEL);
    const missing = await failure(() => client.models.retrieve("no-such-model:7b"));
    return { listed, retrieved, missing };
  },

  async embeddings() {
    const one = await client.embeddings.create({ model: "nomic-embed-text", input: "a green stone" });
    const many = await client.embeddings.create({ model: "nomic-embed-text", input: ["a", "b"], dimensions: 16 });
    // The SDK asks for base64 by default when no encoding_format is given, and decodes it.
    const explicit = await client.embeddings.create({
      model: "nomic-embed-text",
      input: "a green stone",
      encoding_format: "float",
    });
    return { one, many, explicit };
  },

  async errors() {
    const unknown = await failure(() =>
      client.chat.completions.create({ model: "no-such-model:7b", messages: ASK }),
    );
    // A stream's status tells too, before any chunk (as OpenAI's does): the SDK throws at create.
    const streamed = await failure(async () => {
      const stream = await client.chat.completions.create({ model: "no-such-model:7b", messages: ASK, stream: true });
      for await (const _ of stream);
    });
    const invalid = await failure(() =>
      client.chat.completions.create({ model: MODEL, messages: ASK, temperature: "hot" }),
    );
    return { unknown, streamed, invalid };
  },

  async abort() {
    const controller = new AbortController();
    const stream = await client.chat.completions.create(
      { model: MODEL, messages: [{ role: "user", content: "write an essay" }], stream: true },
      { signal: controller.signal },
    );
    let chunks = 0;
    try {
      for await (const _ of stream) {
        if (++chunks === 3) controller.abort();
      }
      return { chunks, error: null }; // the SDK's stream ends quietly when its own signal aborts it
    } catch (err) {
      return { chunks, error: thrown(err) };
    }
  },
};

console.log(JSON.stringify(await scenarios[scenario]()));
