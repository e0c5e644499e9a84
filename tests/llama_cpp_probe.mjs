// Asks llama.cpp itself (node-llama-cpp's prebuilt binaries, CPU) about a GGUF file.
// Reads one JSON request on stdin, writes one JSON answer on stdout:
//   {"model": PATH, "tokenize": [TEXT...], "next": [IDS...], "score": [[IDS...]...],
//    "greedy": {"prompt": [IDS...], "n": N}, "threads": N}
// -> {"tokenize": [[IDS...]...], "next": [LOGPROB per vocab id],
//     "score": [[LOGPROB of ids[i+1]...]...] (each sequence in a fresh context),
//     "greedy": [IDS...], "vocab": N, "context": N}
// Every key is optional. The KV cache is float32 so an f32 model is computed in float32 throughout.
// node-llama-cpp lives outside the tree (.node/, installed by `make test`): its entry point's file URL
// comes in NODE_LLAMA_CPP, as an ES module can't be found through NODE_PATH.
const { getLlama, LlamaLogLevel } = await import(process.env.NODE_LLAMA_CPP ?? "node-llama-cpp");

const chunks = [];
for await (const chunk of process.stdin) chunks.push(chunk);
const request = JSON.parse(Buffer.concat(chunks).toString("utf8"));

const llama = await getLlama({ gpu: false, build: "never", logLevel: LlamaLogLevel.error });
const model = await llama.loadModel({ modelPath: request.model, gpuLayers: 0 });
const vocab = model.fileInfo.metadata.tokenizer.ggml.tokens.length;
const contextSize = model.trainContextSize;
const answer = { vocab, context: contextSize };

if (request.tokenize) {
  answer.tokenize = request.tokenize.map((text) => Array.from(model.tokenize(text, true)));
}

function fits(ids) {
  // Past its context a GPT-2 has no position embeddings: refuse rather than let llama.cpp shift.
  if (ids.length > contextSize) throw new Error(`${ids.length} tokens > context ${contextSize}`);
  return ids;
}

async function withSequence(run) {
  const context = await model.createContext({
    contextSize,
    batchSize: contextSize,
    sequences: 1,
    threads: request.threads ?? 2,
    flashAttention: false,
    experimentalKvCacheKeyType: "F32",
    experimentalKvCacheValueType: "F32",
  });
  try {
    return await run(context.getSequence());
  } finally {
    await context.dispose();
  }
}

function logprobs(probabilities) {
  const row = new Array(vocab).fill(-Infinity);
  for (const [token, p] of probabilities) row[token] = Math.log(p);
  return row;
}

const wantAll = { generateNext: { probabilities: true } };

if (request.next) {
  answer.next = await withSequence(async (sequence) => {
    const ids = fits(request.next);
    const input = ids.map((id, i) => (i === ids.length - 1 ? [id, wantAll] : id));
    const out = await sequence.controlledEvaluate(input);
    return logprobs(out[ids.length - 1].next.probabilities);
  });
}

if (request.score) {
  answer.score = [];
  for (const ids of request.score.map(fits)) {
    answer.score.push(
      await withSequence(async (sequence) => {
        const input = ids.map((id, i) => (i < ids.length - 1 ? [id, wantAll] : id));
        const out = await sequence.controlledEvaluate(input);
        return ids.slice(1).map((id, i) => Math.log(out[i].next.probabilities.get(id) ?? 0));
      }),
    );
  }
}

if (request.greedy) {
  answer.greedy = await withSequence(async (sequence) => {
    const greedy = { generateNext: { token: true, options: { temperature: 0 } } };
    if (request.greedy.prompt.length + request.greedy.n > contextSize) fits({ length: Infinity });
    let input = request.greedy.prompt.map((id, i, all) => (i === all.length - 1 ? [id, greedy] : id));
    const generated = [];
    while (generated.length < request.greedy.n) {
      const out = await sequence.controlledEvaluate(input);
      const token = out[input.length - 1].next.token;
      generated.push(token);
      input = [[token, greedy]];
    }
    return generated;
  });
}

await model.dispose();
await llama.dispose();
process.stdout.write(JSON.stringify(answer) + "\n");
