// Limits as a client meets them, through the OpenAI SDK and plain HTTP: the per-key rate limit
// (429 + Retry-After), a prompt over the model's context length (400 naming both numbers), a body
// over 1 MiB (413), JSON nested too deep (400), a bad API key (401), an unknown model (404), the
// node's live jobs (429 server_busy), a request too big for the provider link (413), a free user's
// daily quota (429 insufficient_quota, not retried) and the budget of a request without max_tokens.

import assert from 'node:assert/strict';

import { OpenAI, job_id_of, one_provider_world, scenario, upstream_text, wait_for } from './harness.mjs';

const context_length = 64;

scenario('limits answer in OpenAI\'s error shape', async (world) => {
  // The smallest rate (--rate-per-minute takes 1 or more): a key's next token comes a minute after
  // its burst, long after this scenario's checks, so the 429 cannot turn into a 200 on a slow run.
  const { server, upstream, model } = await one_provider_world(world, {
    serve_args: ['--rate-per-minute', '1', '--rate-burst', '2'],
    upstream_options: { tokens: 4, context_length },
  });
  const upstream_requests = async () => (await upstream.stats()).requests;
  // Each check has its own user, so that the rate limit of one key does not blur the others.
  const new_key = async () => (await server.create_user('premium', 1_000_000)).api_key;
  const chat = { model, messages: [{ role: 'user', content: 'hi' }], max_tokens: 4 };

  // Rate limit: a burst of 2, then 429 with Retry-After, in OpenAI's shape.
  const limited = server.user_client(await new_key());
  for (let i = 0; i < 2; ++i) {
    const response = await limited.request('POST', '/v1/chat/completions', { body: chat });
    assert.equal(response.status, 200, `request ${i} of the burst: ${await response.clone().text()}`);
    await response.text();
  }
  const requests_before_refusal = await upstream_requests();
  assert.equal(requests_before_refusal, 2, 'the burst reached the backend');
  const refused = await limited.request('POST', '/v1/chat/completions', { body: chat });
  assert.equal(refused.status, 429);
  // The key's next request is allowed a minute after its burst began, a few seconds ago at most.
  const retry_after = Number(refused.headers.get('retry-after'));
  assert.ok(Number.isInteger(retry_after) && retry_after >= 40 && retry_after <= 60,
    `Retry-After is the whole seconds until the key's next request, about 60: ${refused.headers.get('retry-after')}`);
  const refusal = (await refused.json()).error;
  assert.equal(refusal.type, 'requests');
  assert.equal(refusal.code, 'rate_limit_exceeded');
  // The SDK sees the same refusal as a RateLimitError.
  const sdk_limited = server.openai(limited.token);
  await assert.rejects(sdk_limited.chat.completions.create(chat), (error) => {
    assert.ok(error instanceof OpenAI.RateLimitError, `a RateLimitError, got ${error}`);
    assert.equal(error.status, 429);
    return true;
  });
  assert.equal(await upstream_requests(), requests_before_refusal, 'a refused request never reaches the backend');
  // Another key is not limited by the first one's burst.
  const other = await server.user_client(await new_key()).request('POST', '/v1/chat/completions', { body: chat });
  assert.equal(other.status, 200);
  await other.text();

  // Context overflow: a clear 400 naming the model's context length and the request's size.
  const requests_before_overflow = await upstream_requests();
  const long_prompt = 'word '.repeat(200);
  await assert.rejects(
    server.openai(await new_key()).chat.completions.create({ model, messages: [{ role: 'user', content: long_prompt }] }),
    (error) => {
      assert.ok(error instanceof OpenAI.BadRequestError, `a BadRequestError, got ${error}`);
      assert.equal(error.status, 400);
      assert.equal(error.code, 'context_length_exceeded');
      const limit = error.message.match(/maximum context length is (\d+) tokens/);
      assert.ok(limit, `the message names the context length: ${error.message}`);
      assert.equal(Number(limit[1]), context_length);
      const asked = [...error.message.matchAll(/(\d+) tokens/g)].map((match) => Number(match[1]));
      assert.ok(asked.some((count) => count > context_length), `the message names the prompt's size: ${error.message}`);
      return true;
    });
  // max_tokens beyond the context: refused the same way, naming the total.
  const overflowing = server.user_client(await new_key());
  const over = await overflowing.request('POST', '/v1/chat/completions', { body: { ...chat, max_tokens: 1000 } });
  assert.equal(over.status, 400);
  const over_error = (await over.json()).error;
  assert.equal(over_error.code, 'context_length_exceeded');
  assert.match(over_error.message, new RegExp(`maximum context length is ${context_length} tokens`));
  assert.match(over_error.message, /1000/);
  assert.equal(await upstream_requests(), requests_before_overflow, 'a request over the context never reaches the backend');

  // A body of 1 MiB is taken; one byte more is a 413, whatever the content (JSON whitespace here).
  const padded_to = (bytes) => {
    const json = JSON.stringify(chat);
    return `${json.slice(0, -1)}${' '.repeat(bytes - json.length)}}`;
  };
  const whole_mib = await server.user_client(await new_key()).request('POST', '/v1/chat/completions', {
    body: padded_to(1024 * 1024), headers: { 'content-type': 'application/json' },
  });
  assert.equal(whole_mib.status, 200, `a body of exactly 1 MiB: ${await whole_mib.clone().text()}`);
  await whole_mib.text();
  const too_large = await server.user_client(await new_key()).request('POST', '/v1/chat/completions', {
    body: padded_to(1024 * 1024 + 1), headers: { 'content-type': 'application/json' },
  });
  assert.equal(too_large.status, 413);
  await too_large.text();

  // JSON nested 32 levels deep is taken (metadata is not read); 33 levels: 400 in OpenAI's shape.
  const nested_to = (levels) => `{"model":"${model}","messages":[{"role":"user","content":"hi"}],"max_tokens":4,` +
    `"metadata":${'['.repeat(levels - 1)}${']'.repeat(levels - 1)}}`;
  const deep_enough = await server.user_client(await new_key()).request('POST', '/v1/chat/completions', {
    body: nested_to(32), headers: { 'content-type': 'application/json' },
  });
  assert.equal(deep_enough.status, 200, `32 levels: ${await deep_enough.clone().text()}`);
  await deep_enough.text();
  const too_deep = await server.user_client(await new_key()).request('POST', '/v1/chat/completions', {
    body: nested_to(33), headers: { 'content-type': 'application/json' },
  });
  assert.equal(too_deep.status, 400);
  const deep_error = (await too_deep.json()).error;
  assert.equal(deep_error.type, 'invalid_request_error');
  assert.match(deep_error.message, /32/);

  // A bad API key: 401, as an AuthenticationError; no key at all: 401 too.
  await assert.rejects(server.openai('sk-not-a-real-key').chat.completions.create(chat), (error) => {
    assert.ok(error instanceof OpenAI.AuthenticationError, `an AuthenticationError, got ${error}`);
    assert.equal(error.status, 401);
    assert.equal(error.type, 'invalid_request_error');
    return true;
  });
  await assert.rejects(server.openai('sk-not-a-real-key').models.list(), OpenAI.AuthenticationError);
  const anonymous = await fetch(`${server.base_url}/v1/chat/completions`, {
    method: 'POST', body: JSON.stringify(chat), headers: { 'content-type': 'application/json' },
  });
  assert.equal(anonymous.status, 401);
  assert.equal((await anonymous.json()).error.type, 'invalid_request_error');

  // An unknown model: 404 model_not_found.
  await assert.rejects(
    server.openai(await new_key()).chat.completions.create({ ...chat, model: 'no-such-model' }), (error) => {
      assert.ok(error instanceof OpenAI.NotFoundError, `a NotFoundError, got ${error}`);
      assert.equal(error.status, 404);
      assert.equal(error.code, 'model_not_found');
      assert.match(error.message, /no-such-model/);
      return true;
    });
});

scenario('an answer without max_tokens that runs past the job\'s budget completes and is billed the budget', async (world) => {
  // The backend answers 200 tokens, within its window of 256 but more than the budget the job
  // was recorded with (what the window leaves after the prompt, as the node estimates it: a token
  // per 3 bytes, more than a tokenizer counts).
  const window = 256;
  const { server, model } = await one_provider_world(world, {
    upstream_options: { tokens: 200, context_length: window },
  });
  const user = await server.create_user('premium', 1_000_000);
  const answer = await server.openai(user.api_key).chat.completions.create({
    model, messages: [{ role: 'user', content: 'word '.repeat(48) }],
  });
  assert.equal([...answer.choices[0].message.content.matchAll(/tok\d+ /g)].length, 200, 'the whole answer');
  const job = await wait_for('the job completed', async () =>
    (await server.jobs('completed')).find((entry) => entry.id === job_id_of(answer.id)));
  assert.ok(job.max_tokens > 0 && job.max_tokens < 200, `the budget is what the window leaves: ${job.max_tokens}`);
  assert.equal(job.completion_tokens, job.max_tokens, 'billed at the budget, not refused');
});

scenario('a free user over the daily token quota gets 429 insufficient_quota, which the SDK does not retry', async (world) => {
  // About 110,000 tokens of prompt (the node counts a token per 3 bytes) against the free tier's
  // 100,000 a day.
  const { server, model } = await one_provider_world(world, { upstream_options: { tokens: 4, context_length: 1_000_000 } });
  const user = await server.create_user('free');
  const body = { model, messages: [{ role: 'user', content: 'word '.repeat(66_000) }], max_tokens: 4 };
  const refused = await server.user_client(user.api_key).request('POST', '/v1/chat/completions', { body });
  assert.equal(refused.status, 429);
  assert.equal(refused.headers.get('x-should-retry'), 'false');
  assert.equal(refused.headers.get('retry-after'), null, 'no retry helps before the next UTC day');
  const error = (await refused.json()).error;
  assert.equal(error.type, 'insufficient_quota');
  assert.equal(error.code, 'insufficient_quota');
  assert.match(error.message, /daily quota of 100000/);
  // Through the SDK, with its default of 2 retries: a RateLimitError after one request, not three.
  const refusals = async () => {
    const text = await (await fetch(`${server.base_url}/metrics`)).text();
    const line = text.split('\n').find((l) => l.startsWith('gpustream_http_requests_total{') &&
      l.includes('endpoint="/v1/chat/completions"') && l.includes('status="429"'));
    return line ? Number(line.split(' ').at(-1)) : 0;
  };
  const before = await refusals();
  await assert.rejects(server.openai(user.api_key, { maxRetries: 2 }).chat.completions.create(body), (sdk_error) => {
    assert.ok(sdk_error instanceof OpenAI.RateLimitError, `a RateLimitError, got ${sdk_error}`);
    assert.equal(sdk_error.code, 'insufficient_quota');
    return true;
  });
  assert.equal(await refusals() - before, 1, 'the SDK did not retry');
});

scenario('a request without max_tokens to a model with a large context gets the API\'s bound as its budget', async (world) => {
  // 200,000 tokens of context leave more than any max_tokens the API accepts (131,072): the
  // budget is that bound, not a refusal of a max_tokens the client never sent.
  const { server, model } = await one_provider_world(world, { upstream_options: { tokens: 8, context_length: 200_000 } });
  const user = await server.create_user('premium', 1_000_000);
  const answer = await server.openai(user.api_key).chat.completions.create({
    model, messages: [{ role: 'user', content: 'hi' }],
  });
  assert.equal(answer.choices[0].message.content, upstream_text(8));
  const job = await wait_for('the job completed', async () =>
    (await server.jobs('completed')).find((entry) => entry.id === job_id_of(answer.id)));
  assert.equal(job.max_tokens, 131_072);
});

scenario('browsers may call the API from the configured origin only (CORS)', async (world) => {
  const allowed = 'https://app.example';
  const { server, model } = await one_provider_world(world, { serve_args: ['--cors-origin', allowed] });
  const client = server.user_client((await server.create_user('premium', 1_000_000)).api_key);
  const preflight = (origin) => client.request('OPTIONS', '/v1/chat/completions', {
    token: null,
    headers: { origin, 'access-control-request-method': 'POST', 'access-control-request-headers': 'authorization,content-type' },
  });

  const ok = await preflight(allowed);
  assert.equal(ok.status, 204);
  assert.equal(ok.headers.get('access-control-allow-origin'), allowed);
  assert.match(ok.headers.get('access-control-allow-headers'), /Authorization/);
  assert.match(ok.headers.get('access-control-allow-methods'), /POST/);
  const other = await preflight('https://elsewhere.example');
  assert.equal(other.headers.get('access-control-allow-origin'), null, 'another origin is not allowed');

  const chat = await client.request('POST', '/v1/chat/completions', {
    headers: { origin: allowed }, body: { model, messages: [{ role: 'user', content: 'hi' }], max_tokens: 4 },
  });
  assert.equal(chat.status, 200);
  assert.equal(chat.headers.get('access-control-allow-origin'), allowed);
  await chat.text();
  const foreign = await client.request('GET', '/v1/models', { headers: { origin: 'https://elsewhere.example' } });
  assert.equal(foreign.headers.get('access-control-allow-origin'), null);
  assert.equal(foreign.headers.get('vary'), 'Origin');
  // Without an Origin the answer still says it varies by one, for shared caches.
  const plain = await client.request('GET', '/v1/models');
  assert.equal(plain.status, 200);
  assert.equal(plain.headers.get('vary'), 'Origin');
  // A body over the server's limit is refused by the server itself, still readable by the page
  // (a 413 it can show, not an opaque network error its SDK retries) and counted.
  const huge = await client.request('POST', '/v1/chat/completions', {
    headers: { origin: allowed, 'content-type': 'application/json' }, body: 'x'.repeat(2 * 1024 * 1024),
  });
  assert.equal(huge.status, 413);
  assert.equal(huge.headers.get('access-control-allow-origin'), allowed);
  await huge.text();
  const metrics = await (await fetch(`${server.base_url}/metrics`)).text();
  assert.match(metrics, /gpustream_http_requests_total\{endpoint="\/v1\/chat\/completions",status="413"\} 1/);
});

scenario('a free request without max_tokens gets the free default, not a hold of the whole context', async (world) => {
  // Held against the day's quota (100,000 tokens) before it runs, the 131,072 a large context
  // would leave was more than the quota: the request was refused with insufficient_quota.
  const { server, model } = await one_provider_world(world, { upstream_options: { tokens: 5000, context_length: 200_000 } });
  const user = await server.create_user('free', 0);
  const answer = await server.openai(user.api_key).chat.completions.create({
    model, messages: [{ role: 'user', content: 'hi' }],
  });
  // The backend was told: it stopped at 4,096 of its 5,000 tokens.
  assert.equal(answer.choices[0].finish_reason, 'length');
  assert.ok(answer.choices[0].message.content.startsWith(upstream_text(4096)));
  assert.ok(!answer.choices[0].message.content.includes('tok4096 '), 'no token past the default');
  const job = await wait_for('the job completed', async () =>
    (await server.jobs('completed')).find((entry) => entry.id === job_id_of(answer.id)));
  assert.equal(job.max_tokens, 4096);
  assert.equal(job.completion_tokens, 4096);
});

scenario('a node at --live-jobs-max answers 429 server_busy; a request too big for the provider link 413', async (world) => {
  // The upstream's second token comes long after the scenario, so a job stays live until its
  // client leaves (a stream's head goes out with its first token); its context is large, so only
  // the link's frame bounds the request.
  const { server, model } = await one_provider_world(world, {
    serve_args: ['--live-jobs-max', '1'],
    upstream_options: { tokens: 4, token_interval_us: 600_000_000, context_length: 10_000_000 },
  });
  const client = server.user_client((await server.create_user('premium', 1_000_000)).api_key);
  const chat = { model, messages: [{ role: 'user', content: 'hi' }], max_tokens: 4, stream: true };

  // One live job: its stream has begun (its first token) and waits for the second.
  const first = new AbortController();
  const held = await client.request('POST', '/v1/chat/completions', { body: chat, signal: first.signal });
  assert.equal(held.status, 200);

  const refused = await client.request('POST', '/v1/chat/completions', { body: chat });
  assert.equal(refused.status, 429);
  assert.equal(refused.headers.get('retry-after'), '1');
  const refusal = (await refused.json()).error;
  assert.equal(refusal.code, 'server_busy');
  assert.match(refusal.message, /live_jobs_max/);

  // The client leaving frees the place.
  first.abort();
  await wait_for('the node to take a job again', async () => {
    const controller = new AbortController();
    const next = await client.request('POST', '/v1/chat/completions', { body: chat, signal: controller.signal });
    controller.abort();
    return next.status === 200;
  });

  // The request goes to a provider in one link frame (1 MiB, of which 4 KiB are kept for the
  // frame itself), a quarter of which stays free for a failover's answer so far. JSON writes a control character as six bytes: 150,000 of them are
  // within the prompt limit (512 KiB of text) and the body limit (1 MiB), but the request as sent
  // to the provider (about 900,000 bytes) is not.
  const big = await client.request('POST', '/v1/chat/completions', {
    body: { ...chat, stream: false, messages: [{ role: 'user', content: '\u0001'.repeat(150_000) }] },
  });
  assert.equal(big.status, 413);
  const too_big = (await big.json()).error;
  assert.equal(too_big.code, 'request_too_large');
  assert.equal(too_big.param, 'messages');
  assert.match(too_big.message, /at most 783360 are accepted/);
  const big_completion = await client.request('POST', '/v1/completions', {
    body: { model, prompt: '\u0001'.repeat(150_000), max_tokens: 4 },
  });
  assert.equal(big_completion.status, 413);
  const completion_too_big = (await big_completion.json()).error;
  assert.equal(completion_too_big.code, 'request_too_large');
  assert.equal(completion_too_big.param, 'prompt');
});
