// A client that goes away mid-stream: the upstream request is cancelled within 100 ms of the
// client's abort (measured at the upstream, by polling its /stats; the median of three aborts, each
// within 1 s), the job ends cancelled, and the user pays only for the tokens produced before the
// cancel. A client of a whole (unstreamed) answer that leaves gets its upstream request cancelled
// within 1 s, long before the next token (2 s) could have told the gateway.

import assert from 'node:assert/strict';

import { balance_changes, gross_micros, job_id_of, one_provider_world, scenario, wait_for } from './harness.mjs';

const tokens_total = 200;
/// Far longer than any cancel may take: a cancel that waited for the next token (or anything the
/// upstream sends) would take about this long, and fail cancel_ms_hard_max.
const token_interval_us = 2_000_000;
const tokens_before_abort = 2;
/// The longest time from the client's abort to the upstream seeing its request closed, for the
/// median of the aborts. A loaded machine (2 cores, ctest -j2) only ever adds delay to the
/// measurement, never removes it: the median lets one of three meet a hiccup (one of 262 ms was
/// seen beside others of 10 to 16 ms under ctest -j2 with another session reading files).
const cancel_ms_max = 100;
/// The longest any single cancel may take, whatever the load: beyond it the cancel was not
/// immediate but waited for something (a token, a timeout).
const cancel_ms_hard_max = 1000;
/// Aborted streams per run; every one must be cancelled within cancel_ms_hard_max, recorded and
/// billed correctly.
const aborts = 3;

/// How long the measurement waits for a cancel before it gives up: longer than
/// cancel_ms_hard_max, so that a slow cancel is reported with its figure.
const cancel_wait_ms = 2_000;

/// Polls the upstream every 2 ms until it counts cancellation number `cancelled_before + 1`, and
/// returns the ms from `aborted_at` (performance.now()) to the first answer that showed it.
async function time_cancel(upstream, aborted_at, cancelled_before) {
  const seen_at = await wait_for('the upstream to count the cancelled request', async () => {
    const stats = await upstream.stats();
    return stats.cancelled === cancelled_before + 1 ? performance.now() : null;
  }, { interval_ms: 2, timeout_ms: cancel_wait_ms });
  const cancel_ms = seen_at - aborted_at;
  console.log(`upstream request cancelled ${cancel_ms.toFixed(1)} ms after the client's abort`);
  return cancel_ms;
}

/// Streams a chat answer, aborts it after `tokens_before_abort` tokens and times how long the
/// upstream takes to count the cancellation. Returns the job id and the time in ms.
async function abort_one(server, upstream, api_key, model, cancelled_before) {
  const abort = new AbortController();
  const stream = await server.openai(api_key).chat.completions.create(
    { model, messages: [{ role: 'user', content: 'Count slowly.' }], stream: true,
      stream_options: { include_usage: true } },
    { signal: abort.signal });
  let received = 0;
  let response_id;
  let aborted_at;
  for await (const chunk of stream) {
    response_id = chunk.id;
    if (chunk.choices[0]?.delta?.content) received += 1;
    if (received === tokens_before_abort) {
      aborted_at = performance.now();
      abort.abort();
      console.log(`client aborted at ${new Date().toISOString()}`);
      break;
    }
  }
  assert.equal(received, tokens_before_abort, 'the client aborted mid-stream');
  return { job_id: job_id_of(response_id), cancel_ms: await time_cancel(upstream, aborted_at, cancelled_before) };
}

scenario('a client abort cancels the upstream request at once and bills the tokens produced', async (world) => {
  const { server, upstream, provider, model } = await one_provider_world(world, {
    upstream_options: { tokens: tokens_total, token_interval_us },
  });
  const user = await server.create_user('premium', 10_000_000);
  const before = await server.accounts();

  const runs = [];
  for (let i = 0; i < aborts; ++i) runs.push(await abort_one(server, upstream, user.api_key, model, i));
  const figures = runs.map((run) => run.cancel_ms.toFixed(1)).join(', ');
  console.log(`upstream requests cancelled ${figures} ms after the client's aborts`);
  for (const run of runs) {
    assert.ok(run.cancel_ms <= cancel_ms_hard_max, `cancelled ${figures} ms after the aborts: one took more than ${cancel_ms_hard_max} ms`);
  }
  const median = runs.map((run) => run.cancel_ms).sort((a, b) => a - b)[Math.floor(aborts / 2)];
  assert.ok(median <= cancel_ms_max,
    `cancelled ${figures} ms after the aborts: the median, ${median.toFixed(1)} ms, is more than ${cancel_ms_max} ms`);
  const stats = await upstream.stats();
  assert.equal(stats.requests, aborts);
  assert.equal(stats.cancelled, aborts);
  assert.equal(stats.active, 0);
  assert.equal(stats.completed, 0, 'no answer ran to its end');

  // Each job ends cancelled, with the tokens produced before its cancel: the client's 2, and no
  // more than the upstream sends in the time its cancel took (one token per 2 s).
  const offer = (await server.provider_entry(provider.id)).models.find((m) => m.model === model);
  let price_total = 0;
  let fee_total = 0;
  for (const { job_id, cancel_ms } of runs) {
    // The client's 2, the next token and one more possibly in flight to it, and one per token
    // interval the cancel took.
    const produced_max = tokens_before_abort + 2 + Math.ceil(cancel_ms / (token_interval_us / 1000));
    const job = await wait_for(`job ${job_id} in GET /admin/jobs?state=cancelled`, async () =>
      (await server.jobs('cancelled')).find((entry) => entry.id === job_id));
    assert.ok(job.completion_tokens >= tokens_before_abort,
      `at least the ${tokens_before_abort} tokens the client saw are counted: ${job.completion_tokens}`);
    assert.ok(job.completion_tokens <= produced_max,
      `no more than the tokens produced in the ${cancel_ms.toFixed(1)} ms before the cancel are counted: ` +
      `${job.completion_tokens} > ${produced_max}`);
    // Billed: the prompt and those tokens at the provider's price, nothing more.
    const price = gross_micros(job.prompt_tokens_billed, job.completion_tokens, offer);
    assert.equal(job.gross_micros, price);
    assert.ok(price < gross_micros(job.prompt_tokens_billed, tokens_total, offer), 'less than the whole answer would cost');
    price_total += price;
    fee_total += job.platform_fee_micros;
  }
  const after = await wait_for('the cancelled jobs to be settled in the ledger', async () => {
    const accounts = await server.accounts();
    const spent = before.balances[`user-${user.id}`] - accounts.balances[`user-${user.id}`];
    return spent === price_total ? accounts : null;
  });
  assert.equal(after.total_micros, 0);
  const changes = balance_changes(before, after);
  assert.equal(changes[`user-${user.id}`], -price_total);
  assert.equal(changes[`provider-${provider.id}`], price_total - fee_total);
  assert.equal(changes.platform, fee_total);
});

scenario('a client that leaves before its whole answer has its upstream request cancelled at once and is counted as 499', async (world) => {
  const { server, upstream, model } = await one_provider_world(world, {
    upstream_options: { tokens: tokens_total, token_interval_us },
  });
  const user = await server.create_user('premium', 10_000_000);
  const abort = new AbortController();
  const body = { model, messages: [{ role: 'user', content: 'Count slowly.' }] };  // not streamed
  const answer = server.user_client(user.api_key).request('POST', '/v1/chat/completions', { body, signal: abort.signal });
  await wait_for('the answer under way at the upstream', async () => (await upstream.stats()).active === 1);
  const aborted_at = performance.now();
  abort.abort();
  const rejected = assert.rejects(answer, { name: 'AbortError' });  // awaited below: handled from now on
  const cancel_ms = await time_cancel(upstream, aborted_at, 0);
  assert.ok(cancel_ms <= cancel_ms_hard_max, `cancelled ${cancel_ms.toFixed(1)} ms after the abort`);
  await rejected;
  const counted = /^gpustream_http_requests_total\{endpoint="\/v1\/chat\/completions",status="499"\} 1$/m;
  const metrics = await wait_for('the request counted as 499', async () => {
    const text = await (await fetch(`${server.base_url}/metrics`)).text();
    return counted.test(text) ? text : null;
  });
  assert.doesNotMatch(metrics, /^gpustream_http_requests_total\{endpoint="\/v1\/chat\/completions",status="200"\}/m,
    'its answer never started');
});
