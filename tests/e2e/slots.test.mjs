// A provider's free slots are used at once: a queued request goes to a provider as soon as one of
// its jobs ends, even when the provider's last heartbeat said all its slots were busy. (The
// heartbeat's load is the agent's own count of busy slots, which the scheduler keeps itself and
// more freshly; taken as the GPU's load it used to shut out a provider at 80 % until the load of a
// later heartbeat fell below that.)

import assert from 'node:assert/strict';

import { one_provider_world, scenario, wait_for } from './harness.mjs';

const slots = 5;
/// Answers that never end by themselves: their first token at once, the next one 10 minutes
/// later. They are still streaming when the queued request is served, unless it waits for them
/// (and then it fails: the scenario ends first), and are cut off at the end.
const tokens_total = 4;
const token_interval_us = 600_000_000;

/// Starts a streamed answer and reads it in the background; `state.first_token` resolves at its
/// first token and rejects when the stream fails or ends before one, `state.done` resolves when
/// it ends (or rejects with the abort or the failure).
function start_stream(client, model, abort) {
  const state = { ended: false, settled: false };
  let token_arrived;
  let no_token;
  state.first_token = new Promise((resolve, reject) => {
    token_arrived = resolve;
    no_token = reject;
  });
  // Awaited where it matters; this keeps a failure nobody waits on from going unhandled.
  state.first_token.catch(() => {});
  state.done = (async () => {
    const stream = await client.chat.completions.create(
      { model, messages: [{ role: 'user', content: 'Count.' }], stream: true },
      abort ? { signal: abort.signal } : {});
    for await (const chunk of stream) {
      if (chunk.choices[0]?.delta?.content) token_arrived();
    }
    state.ended = true;
  })();
  state.done.then(() => { state.settled = true; }, () => { state.settled = true; });
  // Once settled, first_token ignores these: they matter only for a stream without a token.
  state.done.then(() => no_token(new Error('the stream ended before its first token')),
                  (error) => no_token(new Error(`the stream failed before its first token: ${error.message}`)));
  return state;
}

/// Heartbeats 5 s apart: the queued request must not wait for the next one.
const heartbeat_ms = 5_000;
/// The longest from a slot freeing to the queued request's first token: far less than a heartbeat
/// interval (it takes milliseconds), with room for a loaded machine.
const first_token_ms_max = 2_500;

scenario('a queued request takes a slot as soon as one frees, whatever the last heartbeat said', async (world) => {
  const { server, upstream, provider, model } = await one_provider_world(world, {
    serve_args: ['--heartbeat-ms', String(heartbeat_ms)],
    upstream_options: { tokens: tokens_total, token_interval_us },
    provider_args: ['--max-concurrency', String(slots)],
  });
  const user = await server.create_user('premium', 100_000_000);
  const client = server.openai(user.api_key);

  const abort = new AbortController();
  const first = start_stream(client, model, abort);
  const others = [];
  const aborts = [];
  for (let i = 1; i < slots; ++i) {
    aborts.push(new AbortController());
    others.push(start_stream(client, model, aborts.at(-1)));
  }
  await Promise.all([first, ...others].map((s) => s.first_token));

  // A heartbeat has reported every slot busy.
  await wait_for('a heartbeat reporting all slots busy', async () => {
    const entry = await server.provider_entry(provider.id);
    return entry?.live?.active_jobs === slots && entry.live.load_percent === 100 ? entry : null;
  });

  aborts.push(new AbortController());
  const queued = start_stream(client, model, aborts.at(-1));
  // It waits in the scheduler's queue: the backend has only the five.
  await wait_for('the sixth request queued', async () => {
    const metrics = await (await fetch(`${server.base_url}/metrics`)).text();
    return /^gpustream_queue_depth 1$/m.test(metrics);
  });
  assert.equal((await upstream.stats()).requests, slots, 'the sixth request did not reach the backend');
  const aborted_at = performance.now();
  abort.abort();
  await first.done.catch(() => {});  // the abort ends it
  await queued.first_token;
  const waited_ms = performance.now() - aborted_at;
  console.log(`the queued request's first token came ${waited_ms.toFixed(1)} ms after a slot freed`);
  assert.ok(waited_ms < first_token_ms_max,
    `the queued request waited ${waited_ms.toFixed(1)} ms for the freed slot (heartbeats are ${heartbeat_ms} ms apart)`);
  const stats = await upstream.stats();
  assert.equal(stats.requests, slots + 1);
  assert.equal(stats.active, slots, 'five answers at once, never six');
  assert.deepEqual(others.map((s) => s.settled), others.map(() => false),
    'the queued request got its first token while the other answers were still streaming');
  for (const a of aborts) a.abort();
  await Promise.all([queued.done, ...others.map((s) => s.done)].map((done) => done.catch(() => {})));
});
