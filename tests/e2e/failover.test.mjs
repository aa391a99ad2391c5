// Providers failing under a live answer: an upstream that drops mid-stream, or an agent killed with
// SIGKILL mid-answer, hands the answer to another provider, which continues it from the tokens
// already sent (x_gpustream.failover), each provider paid its own tokens; an agent killed with
// SIGKILL before the first token is replaced silently; with nobody left the stream ends with an
// in-band error; a request the backends refuse (HTTP 400) gets their 400.

import assert from 'node:assert/strict';

import {
  OpenAI, balance_changes, job_id_of, platform_fee_micros, read_sse, scenario, upstream_text, wait_for,
} from './harness.mjs';

const model = 'e2e-model';
const tokens = 16;
const drop_after = 5;

async function stream_chat(server, api_key) {
  const stream = await server.openai(api_key).chat.completions.create({
    model, messages: [{ role: 'user', content: 'Tell me a long story.' }], stream: true,
    stream_options: { include_usage: true },
  });
  const chunks = [];
  for await (const chunk of stream) chunks.push(chunk);
  return chunks;
}

const text_of = (chunks) => chunks.map((chunk) => chunk.choices[0]?.delta?.content ?? '').join('');

/// A provider's offer of `model` (its prices), from GET /admin/providers.
async function offer_of(server, provider_id) {
  const offer = (await server.provider_entry(provider_id))?.models.find((m) => m.model === model);
  assert.ok(offer, `provider ${provider_id} offers ${model}`);
  return offer;
}

/// Checks the bill of a premium job that provider `a` began with `a_tokens` tokens and provider
/// `b` finished, all `tokens` of it, against domain/pricing.hpp's settle_job: A is paid its tokens
/// at its own output price (rounded down), B the prompt and the rest at its prices, the whole is
/// rounded up once, and each part pays the platform its fee (rounded down). The ledger, from
/// `before` (a snapshot taken before the answer), moved exactly that.
async function check_failover_bill(server, job_id, { user, before, a, b, a_tokens }) {
  const [job] = await server.billed_jobs([job_id]);
  assert.equal(job.provider_id, b.provider.id, 'the job is recorded as finished by B');
  assert.equal(job.completion_tokens, tokens, 'every token is billed, once');
  const divisor = 1_000_000n * 100n;  // micro-USD per million tokens, times the standard tier's 100 %
  const a_exact = BigInt(a_tokens) * BigInt(a.offer.output_price_micros_per_mtok) * 100n;
  const b_exact = (BigInt(job.prompt_tokens_billed) * BigInt(b.offer.input_price_micros_per_mtok) +
                   BigInt(tokens - a_tokens) * BigInt(b.offer.output_price_micros_per_mtok)) * 100n;
  const gross = Number((a_exact + b_exact + divisor - 1n) / divisor);
  const a_gross = Number(a_exact / divisor);
  const b_gross = gross - a_gross;
  const a_fee = platform_fee_micros(a_gross);
  const b_fee = platform_fee_micros(b_gross);
  assert.equal(job.gross_micros, gross, `the price of ${job_id}: ${JSON.stringify(job)}`);
  assert.equal(job.platform_fee_micros, a_fee + b_fee, `the fee of ${job_id}`);
  const after = await server.accounts();
  assert.equal(after.total_micros, 0);
  const expected = Object.fromEntries(Object.entries({
    [`user-${user.id}`]: -gross,
    [`provider-${a.provider.id}`]: a_gross - a_fee,
    [`provider-${b.provider.id}`]: b_gross - b_fee,
    platform: a_fee + b_fee,
  }).filter(([, change]) => change !== 0));
  assert.deepEqual(balance_changes(before, after), expected, 'each provider paid its own tokens');
  return job;
}

scenario('an upstream dropping mid-stream fails over to another provider that continues the answer', async (world) => {
  const server = await world.serve();
  // A drops its stream after 5 tokens; B answers normally, and a continuation as a model continues
  // its own text (--continuation resume: from tok<words of the prefix>). A is cheaper, so with
  // both idle and equally healthy the default policy gives A the job first (domain/selection.hpp:
  // ties by price).
  const upstream_a = await world.upstream({ models: model, tokens, drop_after_tokens: drop_after }, 'upstream-a');
  const upstream_b = await world.upstream({ models: model, tokens, continuation: 'resume' }, 'upstream-b');
  const provider_a = await server.create_provider('provider-a');
  const provider_b = await server.create_provider('provider-b');
  world.provider(server, provider_a.token, upstream_a, { name: 'provider-a', args: ['--price-per-mtok', '1000000'] });
  world.provider(server, provider_b.token, upstream_b, { name: 'provider-b', args: ['--price-per-mtok', '3000000'] });
  const user = await server.create_user('premium', 10_000_000);
  await server.wait_model(user.api_key, model, 2);
  const a = { provider: provider_a, offer: await offer_of(server, provider_a.id) };
  const b = { provider: provider_b, offer: await offer_of(server, provider_b.id) };
  const before = await server.accounts();

  const chunks = await stream_chat(server, user.api_key);
  // B continues after A's 5 tokens, given them as the assistant prefix: the client gets the whole
  // answer once, in order, only if B was told exactly what A sent.
  assert.equal(text_of(chunks), upstream_text(tokens), 'A\'s 5 tokens, then B\'s continuation of them');
  const stats_b = await upstream_b.stats();
  assert.equal(stats_b.continued, 1, 'B was asked to continue the assistant prefix (vLLM\'s continue_final_message)');
  assert.equal(stats_b.last_continued_from, drop_after, 'the prefix B continued is the tokens A sent');
  assert.equal(stats_b.completed, 1);
  assert.equal((await upstream_a.stats()).dropped, 1);
  const last = chunks.at(-1);
  assert.equal(chunks.filter((chunk) => chunk.choices[0]?.finish_reason).at(-1).choices[0].finish_reason, 'stop');
  assert.equal(last.x_gpustream.failover, 1, `x_gpustream.failover counts the change: ${JSON.stringify(last.x_gpustream)}`);
  assert.equal(last.x_gpustream.provider_id, provider_b.id, 'B finished the answer');
  assert.equal(last.usage.completion_tokens, tokens, 'usage counts every token the client got');
  await check_failover_bill(server, job_id_of(last.id), { user, before, a, b, a_tokens: drop_after });
});

scenario('a provider killed before its first token is replaced without the client noticing', async (world) => {
  const server = await world.serve();
  // A's first token would come long after the scenario: the kill always comes first.
  const slow = await world.upstream({ models: model, tokens, first_token_ms: 600_000 }, 'upstream-slow');
  const quick = await world.upstream({ models: model, tokens }, 'upstream-quick');
  const provider_a = await server.create_provider('provider-a');
  const provider_b = await server.create_provider('provider-b');
  const agent_a = world.provider(server, provider_a.token, slow, { name: 'provider-a' });
  const user = await server.create_user('premium', 10_000_000);
  await server.wait_model(user.api_key, model, 1);

  // Only A is online: it takes the job and waits for its first token.
  const answer = stream_chat(server, user.api_key);
  answer.catch(() => {});  // awaited below; this keeps an early rejection from going unhandled
  await wait_for('the job to reach A\'s upstream', async () => (await slow.stats()).active === 1);
  // B comes online, then A is killed with SIGKILL before its first token.
  world.provider(server, provider_b.token, quick, { name: 'provider-b' });
  await server.wait_model(user.api_key, model, 2);
  await agent_a.stop('SIGKILL');

  const chunks = await answer;
  assert.equal(text_of(chunks), upstream_text(tokens), 'the whole answer, from B');
  const last = chunks.at(-1);
  assert.equal(last.x_gpustream.provider_id, provider_b.id);
  assert.equal(last.x_gpustream.failover, 0, 'no token came from A, so nothing was continued');
  assert.equal(last.usage.completion_tokens, tokens);
  await server.wait_provider_offline(provider_a.id);
  assert.equal((await quick.stats()).completed, 1);
});

scenario('an agent killed with SIGKILL mid-answer is continued by another provider from the tokens sent', async (world) => {
  const server = await world.serve();
  // A paces its answer (a token per 200 ms, 3 s in all), so that the client sees some of it and A's
  // agent is killed well before its end; B continues as a model continues its own text. A is
  // cheaper: it gets the job first (as in the first scenario).
  const kill_after = 4;
  const upstream_a = await world.upstream({ models: model, tokens, token_interval_us: 200_000 }, 'upstream-a');
  const upstream_b = await world.upstream({ models: model, tokens, continuation: 'resume' }, 'upstream-b');
  const provider_a = await server.create_provider('provider-a');
  const provider_b = await server.create_provider('provider-b');
  const agent_a = world.provider(server, provider_a.token, upstream_a, { name: 'provider-a', args: ['--price-per-mtok', '1000000'] });
  world.provider(server, provider_b.token, upstream_b, { name: 'provider-b', args: ['--price-per-mtok', '3000000'] });
  const user = await server.create_user('premium', 10_000_000);
  await server.wait_model(user.api_key, model, 2);
  const a = { provider: provider_a, offer: await offer_of(server, provider_a.id) };
  const b = { provider: provider_b, offer: await offer_of(server, provider_b.id) };
  const before = await server.accounts();

  const stream = await server.openai(user.api_key).chat.completions.create({
    model, messages: [{ role: 'user', content: 'Tell me a long story.' }], stream: true,
    stream_options: { include_usage: true },
  });
  const chunks = [];
  let pieces = 0;
  const reading = (async () => {
    for await (const chunk of stream) {
      chunks.push(chunk);
      if (chunk.choices[0]?.delta?.content) pieces += 1;
    }
  })();
  reading.catch(() => {});  // awaited below; this keeps an early rejection from going unhandled
  await wait_for(`${kill_after} of A's tokens to reach the client`, () => pieces >= kill_after);
  await agent_a.stop('SIGKILL');
  await reading;

  // The whole answer, once and in order: A's tokens, then B's continuation of exactly those.
  assert.equal(text_of(chunks), upstream_text(tokens));
  const stats_b = await upstream_b.stats();
  assert.equal(stats_b.requests, 1);
  assert.equal(stats_b.continued, 1, 'B was asked to continue the answer so far');
  const a_tokens = stats_b.last_continued_from;
  assert.ok(Number.isInteger(a_tokens) && a_tokens >= kill_after && a_tokens < tokens,
    `B continued after the ${a_tokens} tokens A sent, at least the ${kill_after} the client saw before the kill`);
  assert.equal(stats_b.completed, 1);
  const last = chunks.at(-1);
  assert.deepEqual(chunks.map((chunk) => chunk.choices[0]?.finish_reason).filter(Boolean), ['stop']);
  assert.equal(last.x_gpustream.failover, 1, `one change of provider: ${JSON.stringify(last.x_gpustream)}`);
  assert.equal(last.x_gpustream.provider_id, provider_b.id, 'B finished the answer');
  // A's backend saw its client, the killed agent, go; the coordinator took A offline.
  await wait_for('A\'s backend to see its request closed', async () => (await upstream_a.stats()).cancelled === 1);
  assert.equal((await upstream_a.stats()).requests, 1);
  await server.wait_provider_offline(provider_a.id);

  const job = await check_failover_bill(server, job_id_of(last.id), { user, before, a, b, a_tokens });
  assert.deepEqual(last.usage, {
    prompt_tokens: job.prompt_tokens_billed,
    completion_tokens: tokens,
    total_tokens: job.prompt_tokens_billed + tokens,
  }, 'usage is what is billed');
});

scenario('with no provider left, a stream that breaks ends with an in-band error', async (world) => {
  const server = await world.serve();
  const upstream = await world.upstream({ models: model, tokens, drop_after_tokens: drop_after });
  const provider = await server.create_provider('only-provider');
  world.provider(server, provider.token, upstream, { name: 'only-provider' });
  const user = await server.create_user('premium', 10_000_000);
  await server.wait_model(user.api_key, model, 1);
  const body = {
    model, messages: [{ role: 'user', content: 'Tell me a long story.' }], stream: true,
    stream_options: { include_usage: true },
  };

  // As raw SSE: the tokens so far, then a chunk with finish_reason "error" and an error object.
  const response = await server.user_client(user.api_key).request('POST', '/v1/chat/completions', { body });
  assert.equal(response.status, 200, 'the stream had begun when the provider failed');
  const events = await read_sse(response);
  assert.equal(events.at(-1), '[DONE]');
  const chunks = events.slice(0, -1);
  const error_chunk = chunks.at(-1);
  assert.equal(error_chunk.choices[0].finish_reason, 'error');
  assert.ok(error_chunk.error?.message, `an error object says why: ${JSON.stringify(error_chunk)}`);
  assert.deepEqual(error_chunk.usage, { prompt_tokens: 0, completion_tokens: 0, total_tokens: 0 },
    'usage is in the last chunk: a failed job bills nothing');
  assert.equal(chunks.filter((chunk) => chunk.choices[0]?.finish_reason === 'error').length, 1);
  // The provider the job failed on is not given it again (ARCHITECTURE.md: "continue on another
  // provider"; domain/selection.hpp: excluded_provider_id), so the text is its 5 tokens only.
  assert.equal(text_of(chunks), upstream_text(drop_after), 'no retry on the provider that failed the job');
  assert.equal((await upstream.stats()).requests, 1, 'one request reached the failing upstream');
  const job_id = job_id_of(error_chunk.id);
  const job = await wait_for(`job ${job_id} failed`, async () =>
    (await server.jobs('failed')).find((entry) => entry.id === job_id));
  assert.equal(job.gross_micros, 0, 'a failed job bills nothing');

  // Through the SDK the same error surfaces as an APIError while iterating.
  let text = '';
  await assert.rejects(async () => {
    const stream = await server.openai(user.api_key).chat.completions.create(body);
    for await (const chunk of stream) text += chunk.choices[0]?.delta?.content ?? '';
  }, (error) => {
    assert.ok(error instanceof OpenAI.APIError, `an APIError, got ${error}`);
    return true;
  });
  assert.equal(text, upstream_text(drop_after));
  assert.equal((await server.accounts()).total_micros, 0);
});

scenario('an answer on a link replaced by a newer link of the same provider ends instead of hanging', async (world) => {
  // An agent whose connection died unnoticed links again with the same token; its old link is
  // closed as replaced, and the jobs the agent dropped with it must not wait forever.
  const server = await world.serve();
  const upstream = await world.upstream({ models: model, tokens: 500, token_interval_us: 10_000 });
  const provider = await server.create_provider('provider');
  const agent_1 = world.provider(server, provider.token, upstream, { name: 'agent-1' });
  const user = await server.create_user('premium', 10_000_000);
  await server.wait_model(user.api_key, model);
  const body = { model, messages: [{ role: 'user', content: 'Tell me a long story.' }], stream: true };
  const response = await server.user_client(user.api_key).request('POST', '/v1/chat/completions', { body });
  assert.equal(response.status, 200);
  await wait_for('the answer to be streaming', async () => (await upstream.stats()).active === 1);

  world.provider(server, provider.token, upstream, { name: 'agent-2' });
  const events = await read_sse(response);
  assert.equal(events.at(-1), '[DONE]');
  const error_chunk = events.at(-2);
  assert.equal(error_chunk.choices[0].finish_reason, 'error', `the answer ends with an error: ${JSON.stringify(error_chunk)}`);
  // The answer broke off on this provider, and an answer is never continued on the provider it
  // broke on: with no other provider the job fails, billing nothing.
  assert.match(error_chunk.error.message, /no other provider serves model/);
  const job_id = job_id_of(error_chunk.id);
  const job = await wait_for(`job ${job_id} failed`, async () =>
    (await server.jobs('failed')).find((entry) => entry.id === job_id));
  assert.equal(job.gross_micros, 0);
  // Here agent-1 is alive, a second agent with the same token: it gives up rather than take the
  // link back, which the two would do in turns for good.
  await agent_1.wait_line(/another agent linked with this provider's token/);
  const { code } = await agent_1.exit_promise;
  assert.equal(code, 3, 'turned away for good: a code a supervisor can be told not to restart on');
});

scenario('an agent that stops answering is stale after three heartbeats and its answer moves on at once', async (world) => {
  // SIGSTOP: the agent's socket stays open but nothing answers, not even the server's close frame.
  // Its jobs must not wait for a closing handshake that never ends (Beast gives up after 30 s).
  const server = await world.serve({ args: ['--heartbeat-ms', '200'] });
  const upstream_a = await world.upstream({ models: model, tokens: 200, token_interval_us: 20_000 }, 'upstream-a');
  const upstream_b = await world.upstream({ models: model, tokens }, 'upstream-b');
  const provider_a = await server.create_provider('provider-a');
  const provider_b = await server.create_provider('provider-b');
  // A is cheaper: with both idle it gets the job first (as in the first scenario).
  const agent_a = world.provider(server, provider_a.token, upstream_a, { name: 'provider-a', args: ['--price-per-mtok', '1000000'] });
  world.provider(server, provider_b.token, upstream_b, { name: 'provider-b', args: ['--price-per-mtok', '3000000'] });
  const user = await server.create_user('premium', 10_000_000);
  await server.wait_model(user.api_key, model, 2);
  const answer = stream_chat(server, user.api_key);
  answer.catch(() => {});  // awaited below; this keeps an early rejection from going unhandled
  await wait_for('the answer to be streaming from A', async () => (await upstream_a.stats()).active === 1);

  agent_a.process.kill('SIGSTOP');
  const stopped_at = performance.now();
  const chunks = await answer;
  const waited_ms = performance.now() - stopped_at;
  const last = chunks.at(-1);
  assert.equal(last.x_gpustream.provider_id, provider_b.id, `B finished the answer: ${JSON.stringify(last.x_gpustream)}`);
  assert.equal(chunks.filter((chunk) => chunk.choices[0]?.finish_reason).at(-1).choices[0].finish_reason, 'stop');
  // Stale after 3 x 200 ms of silence, seen at the next heartbeat check (200 ms); B's whole answer
  // takes a few ms more. The bound leaves a loaded machine over a second of slack, and is far below
  // the 30 s a closing handshake with a silent peer would take.
  console.log(`the answer moved on ${Math.round(waited_ms)} ms after the agent stopped`);
  assert.ok(waited_ms < 2_500, `the answer moved on ${Math.round(waited_ms)} ms after the agent stopped`);
  await server.wait_provider_offline(provider_a.id);
  assert.equal((await upstream_b.stats()).completed, 1);
  agent_a.process.kill('SIGCONT');
});

scenario('a request one backend refuses goes to another; refused by two, the client gets their 400', async (world) => {
  const server = await world.serve();
  // A refuses every request with a 400 (as a backend does with a parameter it does not take); B
  // answers. A is cheaper: with both idle it gets each job first (as in the first scenario).
  const refusing_a = await world.upstream({ models: model, tokens, fail_status: 400 }, 'upstream-a');
  const upstream_b = await world.upstream({ models: model, tokens }, 'upstream-b');
  const provider_a = await server.create_provider('provider-a');
  const provider_b = await server.create_provider('provider-b');
  world.provider(server, provider_a.token, refusing_a, { name: 'provider-a', args: ['--price-per-mtok', '1000000'] });
  const agent_b = world.provider(server, provider_b.token, upstream_b, { name: 'provider-b', args: ['--price-per-mtok', '3000000'] });
  const user = await server.create_user('premium', 10_000_000);
  await server.wait_model(user.api_key, model, 2);

  const chunks = await stream_chat(server, user.api_key);
  assert.equal(text_of(chunks), upstream_text(tokens), 'B answered the request A refused');
  assert.equal(chunks.at(-1).x_gpustream.provider_id, provider_b.id);
  assert.equal((await refusing_a.stats()).requests, 1, 'A was asked first');

  // B goes; C, refusing as A does, comes. A request both refuse is the client's to mend: a 400
  // with the backend's words, which the SDK does not retry, after two backends were asked.
  const refusing_c = await world.upstream({ models: model, tokens, fail_status: 400 }, 'upstream-c');
  const provider_c = await server.create_provider('provider-c');
  world.provider(server, provider_c.token, refusing_c, { name: 'provider-c', args: ['--price-per-mtok', '2000000'] });
  await server.wait_model(user.api_key, model, 3);
  await agent_b.stop('SIGKILL');
  await server.wait_provider_offline(provider_b.id);
  await assert.rejects(
    server.openai(user.api_key).chat.completions.create({ model, messages: [{ role: 'user', content: 'Hello?' }] }),
    (error) => {
      assert.ok(error instanceof OpenAI.BadRequestError, `a BadRequestError, got ${error}`);
      assert.equal(error.status, 400);
      assert.equal(error.code, 'upstream_rejected');
      assert.match(error.message, /backend refused the request: .*configured to fail every completion with HTTP 400/);
      return true;
    });
  const asked = (await refusing_a.stats()).requests - 1 + (await refusing_c.stats()).requests;
  assert.equal(asked, 2, 'two backends were asked, once each');
  const failed = await wait_for('the job failed', async () =>
    (await server.jobs('failed')).find((entry) => entry.failure_reason === 'upstream_error'));
  assert.equal(failed.gross_micros, 0, `job ${failed.id} bills nothing`);

  // Streamed, the same: refused before any token, the refusal is the HTTP answer (a stream's head
  // waits for its first piece), not an error chunk after a 200.
  await assert.rejects(
    server.openai(user.api_key).chat.completions.create({ model, messages: [{ role: 'user', content: 'Hello?' }], stream: true }),
    (error) => {
      assert.ok(error instanceof OpenAI.BadRequestError, `a BadRequestError, got ${error}`);
      assert.equal(error.code, 'upstream_rejected');
      return true;
    });
  assert.equal((await server.accounts()).total_micros, 0);
});
