// Chat and completions through the official OpenAI SDK and curl, served by a real provider agent
// in front of the deterministic test upstream: the text is the upstream's tokens exactly, usage
// comes in the last chunk and counts them, the models list shows the model with its context length.

import assert from 'node:assert/strict';

import { gross_micros, job_id_of, one_provider_world, scenario, upstream_text, wait_for } from './harness.mjs';

const tokens = 12;
const context_length = 4096;

scenario('chat and completions through the OpenAI SDK and curl', async (world) => {
  // The upstream refuses a third concurrent stream: the agent's probe finds that out and
  // advertises 2, although its --max-concurrency says 8. (20 ms per token, so that the probe's
  // streams overlap for about 240 ms, whatever a loaded machine's stalls.)
  const { server, provider, model } = await one_provider_world(world, {
    upstream_options: { tokens, context_length, max_concurrent: 2, token_interval_us: 20_000 },
    provider_args: ['--max-concurrency', '8'],
    probe: true,
    model: 'e2e-org/e2e-model',  // named as on Hugging Face: the SDK sends it as one encoded segment
  });
  const advertised = (await server.provider_entry(provider.id)).models.find((m) => m.model === model);
  assert.equal(advertised.max_concurrency, 2, 'the probe found the concurrency the backend sustains');
  const user = await server.create_user('premium', 10_000_000);
  const client = server.openai(user.api_key);

  // The models list, as the SDK reads it.
  const models = [];
  for await (const entry of client.models.list()) models.push(entry);
  const listed = models.find((entry) => entry.id === model);
  assert.ok(listed, `GET /v1/models lists ${model}: ${JSON.stringify(models)}`);
  assert.equal(listed.x_gpustream.context_length, context_length);
  assert.equal(listed.x_gpustream.providers_online, 1);
  const retrieved = await client.models.retrieve(model);  // GET /v1/models/e2e-org%2Fe2e-model
  assert.equal(retrieved.id, model);
  assert.equal(retrieved.x_gpustream.context_length, context_length);

  // Streamed chat with usage in the last chunk.
  // 15 words, as the test upstream counts tokens; the node estimates 39 (88 bytes at 3 a token,
  // and 9 for the message and the request).
  const messages = [{ role: 'user', content: 'Say something deterministic about the weather, the sea and the mountains in a few words.' }];
  const stream = await client.chat.completions.create({
    model, messages, stream: true, stream_options: { include_usage: true },
  });
  const chunks = [];
  for await (const chunk of stream) chunks.push(chunk);
  assert.ok(chunks.length >= tokens + 1, `one chunk per token at least, got ${chunks.length}`);
  const streamed_text = chunks.map((chunk) => chunk.choices[0]?.delta?.content ?? '').join('');
  assert.equal(streamed_text, upstream_text(tokens));
  const last = chunks.at(-1);
  assert.ok(last.usage, 'usage is in the last chunk');
  assert.equal(last.usage.completion_tokens, tokens);
  // The backend's count of the prompt, below the node's estimate, is what is billed and reported.
  assert.equal(last.usage.prompt_tokens, 15, 'the backend counted the prompt');
  assert.equal(last.usage.total_tokens, last.usage.prompt_tokens + tokens);
  for (const chunk of chunks.slice(0, -1)) assert.ok(!chunk.usage, 'usage only in the last chunk');
  assert.equal(last.x_gpustream.provider_id, provider.id);
  assert.equal(last.x_gpustream.failover, 0);
  assert.equal(last.x_gpustream.ad, undefined, 'premium answers carry no ad');
  const finish = chunks.map((chunk) => chunk.choices[0]?.finish_reason).filter(Boolean);
  assert.deepEqual(finish, ['stop']);
  assert.ok(chunks.every((chunk) => chunk.id === chunks[0].id), 'one id for every chunk of an answer');
  assert.ok(chunks.every((chunk) => chunk.model === model));

  // Non-streamed chat.
  const whole = await client.chat.completions.create({ model, messages });
  assert.equal(whole.object, 'chat.completion');
  assert.equal(whole.choices[0].message.role, 'assistant');
  assert.equal(whole.choices[0].message.content, upstream_text(tokens));
  assert.equal(whole.choices[0].finish_reason, 'stop');
  assert.equal(whole.usage.completion_tokens, tokens);
  assert.equal(whole.x_gpustream.provider_id, provider.id);
  assert.equal(whole.x_gpustream.quality, 'standard', 'the tier the job ran at, which the request left out');

  // max_tokens shorter than the answer: cut, and said so.
  const cut = await client.chat.completions.create({ model, messages, max_tokens: 5 });
  assert.equal(cut.choices[0].message.content, upstream_text(5));
  assert.equal(cut.choices[0].finish_reason, 'length');
  assert.equal(cut.usage.completion_tokens, 5);

  // /v1/completions, streamed and not.
  const completion = await client.completions.create({ model, prompt: 'Once upon a time', max_tokens: 8 });
  assert.equal(completion.object, 'text_completion');
  assert.equal(completion.choices[0].text, upstream_text(8));
  assert.equal(completion.usage.completion_tokens, 8);
  const completion_stream = await client.completions.create({
    model, prompt: 'Once upon a time', stream: true, stream_options: { include_usage: true },
  });
  const completion_chunks = [];
  for await (const chunk of completion_stream) completion_chunks.push(chunk);
  assert.equal(completion_chunks.map((chunk) => chunk.choices[0]?.text ?? '').join(''), upstream_text(tokens));
  assert.equal(completion_chunks.at(-1).usage.completion_tokens, tokens);

  // The money: each answer billed to the premium user at the provider's price, nothing else moved.
  const answered = [last.id, whole.id, cut.id, completion.id, completion_chunks.at(-1).id].map(job_id_of);
  const billed = await server.billed_jobs(answered);
  const offer = (await server.provider_entry(provider.id)).models.find((m) => m.model === model);
  assert.ok(offer, 'the provider advertises the model with its prices');
  for (const job of billed) {
    assert.equal(job.gross_micros, gross_micros(job.prompt_tokens_billed, job.completion_tokens, offer), `price of ${job.id}`);
    assert.ok(job.prompt_tokens_billed <= job.prompt_tokens, `never more than the estimate: ${JSON.stringify(job)}`);
  }
  const streamed_job = billed.find((job) => job.id === job_id_of(last.id));
  assert.equal(streamed_job.prompt_tokens_billed, last.usage.prompt_tokens);
  assert.ok(streamed_job.prompt_tokens > streamed_job.prompt_tokens_billed, 'the estimate was higher');
  const accounts = await server.accounts();
  assert.equal(accounts.total_micros, 0, 'the ledger sums to zero');
  const spent = billed.reduce((sum, job) => sum + job.gross_micros, 0);
  assert.ok(spent > 0, 'the answers cost something');
  assert.equal(accounts.balances[`user-${user.id}`], 10_000_000 - spent);
});

scenario('curl streams a chat answer as server-sent events', async (world) => {
  const { server, model } = await one_provider_world(world, { upstream_options: { tokens } });
  const user = await server.create_user('premium', 10_000_000);
  const body = JSON.stringify({
    model, stream: true, stream_options: { include_usage: true },
    messages: [{ role: 'user', content: 'Hello from curl' }],
  });
  // Started by the world, which kills it when the scenario fails.
  const curl = world.spawn('curl', 'curl', ['-sS', '-N', '--max-time', '60', '-H', `Authorization: Bearer ${user.api_key}`,
    '-H', 'Content-Type: application/json', '-d', body, '-w', '\nHTTP %{http_code} %{content_type}\n',
    `${server.base_url}/v1/chat/completions`]);
  const { code } = await curl.exit_promise;
  const said = (which) => curl.lines.filter((entry) => entry.which === which).map((entry) => `${entry.line}\n`).join('');
  assert.equal(code, 0, `curl failed: ${said('stderr')}`);
  const output = said('stdout');
  const status = output.match(/\nHTTP (\d+) (\S+)\n$/);
  assert.ok(status, `curl wrote its status line: ${output}`);
  assert.equal(status[1], '200');
  assert.match(status[2], /^text\/event-stream/);
  const lines = output.slice(0, status.index).split('\n').filter((line) => line.length > 0);
  assert.ok(lines.every((line) => line.startsWith('data: ')), `only data lines: ${lines.join('|')}`);
  assert.equal(lines.at(-1), 'data: [DONE]');
  const chunks = lines.slice(0, -1).map((line) => JSON.parse(line.slice(6)));
  assert.equal(chunks.map((chunk) => chunk.choices[0]?.delta?.content ?? '').join(''), upstream_text(tokens));
  assert.equal(chunks.at(-1).usage.completion_tokens, tokens);
});

// Ollama's and LM Studio's /v1/models say nothing of a model's context window: the agent asks
// their own APIs (Ollama's /api/show here), or takes --context-length, and goes online either way.
scenario('backends that keep the context window out of /v1/models still go online with it', async (world) => {
  const ollama = await one_provider_world(world, { upstream_options: { flavor: 'ollama', context_length: 8192 } });
  const user = await ollama.server.create_user('premium', 10_000_000);
  const from_show = await ollama.server.openai(user.api_key).models.retrieve(ollama.model);
  assert.equal(from_show.x_gpustream.context_length, 8192, "Ollama's num_ctx from /api/show");

  const lm_studio = await one_provider_world(world, {
    upstream_options: { flavor: 'lmstudio', context_length: 8192 },
    provider_args: ['--context-length', '2048'],
  });
  const other = await lm_studio.server.create_user('premium', 10_000_000);
  const client = lm_studio.server.openai(other.api_key);
  const from_flag = await client.models.retrieve(lm_studio.model);
  assert.equal(from_flag.x_gpustream.context_length, 2048, '--context-length wins over what the backend says');
  // The prompt is checked against the advertised window.
  await assert.rejects(
    client.chat.completions.create({
      model: lm_studio.model, messages: [{ role: 'user', content: 'word '.repeat(3000) }], max_tokens: 10,
    }),
    (error) => error.status === 400 && /2048/.test(error.message));
});

// A reasoning model's thinking (delta.reasoning_content from llama.cpp server, vLLM, LM Studio;
// delta.reasoning from Ollama) reaches the client apart from the answer, as those servers send it,
// and is billed as the tokens it is.
scenario("a reasoning model's thinking streams as reasoning_content and is billed", async (world) => {
  const thinking = 3;
  const { server, provider, model } = await one_provider_world(world, {
    upstream_options: { tokens, reasoning_tokens: thinking },
  });
  const user = await server.create_user('premium', 10_000_000);
  const client = server.openai(user.api_key);
  const messages = [{ role: 'user', content: 'Think first.' }];

  const stream = await client.chat.completions.create({
    model, messages, stream: true, stream_options: { include_usage: true },
  });
  const chunks = [];
  for await (const chunk of stream) chunks.push(chunk);
  const delta_of = (chunk) => chunk.choices[0]?.delta ?? {};
  assert.equal(chunks.map((chunk) => delta_of(chunk).reasoning_content ?? '').join(''), upstream_text(thinking));
  assert.equal(chunks.map((chunk) => delta_of(chunk).content ?? '').join(''), upstream_text(tokens - thinking, thinking));
  const first_content = chunks.findIndex((chunk) => delta_of(chunk).content);
  const last_thought = chunks.findLastIndex((chunk) => delta_of(chunk).reasoning_content);
  assert.ok(last_thought < first_content, 'the thinking comes before the answer');
  assert.equal(delta_of(chunks[0]).role, 'assistant', 'the first chunk, a thought, carries the role');
  assert.equal(chunks.at(-1).usage.completion_tokens, tokens, 'thinking and answer are counted together');

  const whole = await client.chat.completions.create({ model, messages });
  assert.equal(whole.choices[0].message.reasoning_content, upstream_text(thinking));
  assert.equal(whole.choices[0].message.content, upstream_text(tokens - thinking, thinking));
  assert.equal(whole.usage.completion_tokens, tokens);

  const billed = await server.billed_jobs([chunks.at(-1).id, whole.id].map(job_id_of));
  const offer = (await server.provider_entry(provider.id)).models.find((m) => m.model === model);
  for (const job of billed) {
    assert.equal(job.completion_tokens, tokens, `${job.id} bills its thinking too`);
    assert.equal(job.gross_micros, gross_micros(job.prompt_tokens_billed, tokens, offer), `price of ${job.id}`);
  }
});

scenario('a backend that streams no usage keeps its provider in good standing', async (world) => {
  // Many OpenAI-compatible servers send no usage even when asked (stream_options.include_usage):
  // the agent then reports none, and the platform's own count stands. It is no token-count
  // mismatch, of which 5 would suspend the provider for a day.
  const { server, model, provider } = await one_provider_world(world, { upstream_options: { tokens, usage: 'none' } });
  const user = await server.create_user('premium', 10_000_000);
  const client = server.openai(user.api_key);
  for (let i = 0; i < 6; ++i) {
    const answer = await client.chat.completions.create({ model, messages: [{ role: 'user', content: 'hi' }] });
    assert.equal(answer.usage.completion_tokens, tokens, 'usage is the platform\'s count');
  }
  const entry = await wait_for('the six jobs scored', async () => {
    const found = await server.provider_entry(provider.id);
    return found && found.jobs.succeeded >= 6 ? found : null;
  });
  assert.equal(entry.status, 'online', JSON.stringify(entry));
  assert.equal(entry.suspended_until_at_us, null);
});
