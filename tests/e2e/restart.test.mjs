// The server killed with SIGKILL and restarted on the same data folder (sync durability): every
// acknowledged money movement is still there, `gpustream replay --verify` passes, and the provider
// agent reconnects by itself and serves again. Also: SIGTERM stops serve cleanly.

import assert from 'node:assert/strict';

import {
  balance_changes, gross_micros, job_id_of, one_provider_world, platform_fee_micros, read_sse, scenario, upstream_text,
  wait_for,
} from './harness.mjs';

const tokens = 8;
const jobs = 3;
const credit_micros = 5_000_000;

scenario('a server killed with SIGKILL restarts with no acknowledged money lost', async (world) => {
  const { server, provider, model } = await one_provider_world(world, { upstream_options: { tokens } });
  const user = await server.create_user('premium', credit_micros);
  const initial = await server.accounts();
  assert.equal(initial.balances[`user-${user.id}`], credit_micros);
  const client = server.openai(user.api_key);
  const job_ids = [];
  for (let i = 0; i < jobs; ++i) {
    const answer = await client.chat.completions.create({ model, messages: [{ role: 'user', content: `job ${i}` }] });
    assert.equal(answer.choices[0].message.content, upstream_text(tokens));
    job_ids.push(job_id_of(answer.id));
  }
  // A job's money is recorded a moment after its answer: the snapshot waits for every answered
  // job's, so that it is what the server acknowledged, and each is priced as domain/pricing.hpp says.
  const billed = await server.billed_jobs(job_ids);
  const offer = (await server.provider_entry(provider.id)).models.find((m) => m.model === model);
  let spent = 0;
  let fees = 0;
  for (const job of billed) {
    assert.equal(job.completion_tokens, tokens, `${job.id} bills its tokens`);
    assert.equal(job.gross_micros, gross_micros(job.prompt_tokens_billed, tokens, offer), `price of ${job.id}`);
    assert.equal(job.platform_fee_micros, platform_fee_micros(job.gross_micros), `fee of ${job.id}`);
    spent += job.gross_micros;
    fees += job.platform_fee_micros;
  }
  const before = await server.accounts();
  assert.equal(before.total_micros, 0);
  assert.deepEqual(balance_changes(initial, before), {
    [`user-${user.id}`]: -spent,
    [`provider-${provider.id}`]: spent - fees,
    platform: fees,
  }, 'the ledger holds every answered job\'s money before the kill');

  await server.child.stop('SIGKILL');
  assert.equal(server.child.exit_signal, 'SIGKILL');

  // Restarted on the same data and the same port, so the agent finds it again.
  const restarted = await world.serve({ data_dir: server.data_dir, http: `127.0.0.1:${server.port}`, name: 'serve-restarted' });
  const after = await restarted.accounts();
  assert.deepEqual(after, before, 'the ledger after the restart equals the acknowledged one');
  assert.equal(after.balances[`user-${user.id}`], credit_micros - spent, 'every answered job\'s charge survived');
  const billed_again = await restarted.billed_jobs(job_ids);
  assert.deepEqual(billed_again.map((job) => job.gross_micros), billed.map((job) => job.gross_micros),
    'each job\'s bill survived the restart');
  const user_again = restarted.user_client(user.api_key);
  assert.ok((await user_again.get('/v1/models')).data, 'the API key still works');

  // The agent reconnects (capped backoff) and serves again.
  await restarted.wait_model(user.api_key, model, 1);
  const again = await restarted.openai(user.api_key).chat.completions.create({
    model, messages: [{ role: 'user', content: 'after the restart' }],
  });
  assert.equal(again.choices[0].message.content, upstream_text(tokens));
  assert.equal((await restarted.accounts()).total_micros, 0);

  // Killed again, the log verifies: CRCs, gapless positions, every aggregate's invariants, the
  // ledger.
  await restarted.child.stop('SIGKILL');
  const replay = await world.run(['replay', '--data', server.data_dir, '--verify'], 'replay');
  assert.equal(replay.code, 0, `replay --verify passes:\n${replay.output}`);
});

scenario('replay --verify passes on a store whose server was killed mid-answer', async (world) => {
  const { server, model } = await one_provider_world(world, {
    upstream_options: { tokens: 400, token_interval_us: 5_000 },
  });
  const user = await server.create_user('premium', credit_micros);
  const before = await server.accounts();
  const stream = await server.openai(user.api_key).chat.completions.create({
    model, messages: [{ role: 'user', content: 'a long answer' }], stream: true,
  });
  let received = 0;
  let response_id;
  const reading = (async () => {
    try {
      for await (const chunk of stream) {
        response_id ??= chunk.id;
        if (chunk.choices[0]?.delta?.content) received += 1;
      }
    } catch {
      // The server dies under the stream: the SDK reports the broken connection.
    }
  })();
  await wait_for('a few tokens to arrive', () => received >= 10);
  await server.child.stop('SIGKILL');
  await reading;
  assert.ok(received < 400, `the answer was cut by the kill: ${received} tokens`);
  const replay = await world.run(['replay', '--data', server.data_dir, '--verify'], 'replay');
  assert.equal(replay.code, 0, `replay --verify passes:\n${replay.output}`);

  // The job was live when the server died; the restart ends it (node.cpp, fail_jobs_left_live):
  // failed as the platform's fault, billing nothing.
  const restarted = await world.serve({ data_dir: server.data_dir, name: 'serve-restarted' });
  const job_id = job_id_of(response_id);
  const [job] = await restarted.wait_jobs([job_id], 'failed');
  assert.equal(job.failure_reason, 'internal');
  assert.equal(job.gross_micros, 0, 'a failed job bills nothing');
  const after = await restarted.accounts();
  assert.equal(after.total_micros, 0);
  assert.equal(before.balances[`user-${user.id}`] - after.balances[`user-${user.id}`], job.gross_micros,
    'the user paid what the job\'s record says it billed');
  assert.deepEqual(balance_changes(before, after), {}, 'no money was lost or invented by the kill');
});

scenario('serve stops cleanly on SIGTERM while a provider is connected', async (world) => {
  const { server, agent } = await one_provider_world(world);
  const lines_before_sigterm = agent.line_count;
  await server.child.stop('SIGTERM', { timeout_ms: 10_000 });
  assert.equal(server.child.exit_code, 0, 'serve exits with 0 on SIGTERM');
  // The agent sees the coordinator go (a line printed after the SIGTERM), then tries to come back:
  // a later attempt finds nothing listening, and the agent, still running, waits for the next.
  const down = await agent.wait_line(/link down/, { from_index: lines_before_sigterm });
  await agent.wait_line(/link down kind=connect_failed/, { from_index: down.line_index + 1 });
  assert.equal(agent.exited, false, 'the agent keeps running to reconnect');
  const replay = await world.run(['replay', '--data', server.data_dir, '--verify'], 'replay');
  assert.equal(replay.code, 0, `replay --verify passes:\n${replay.output}`);
});

scenario('on SIGTERM serve lets answers finish for --drain-s, then cuts them short billing what was sent', async (world) => {
  // 2,000 tokens 5 ms apart: 10 s, longer than the 2 s the node lets it run once told to stop.
  const { server, provider, model } = await one_provider_world(world, {
    serve_args: ['--drain-s', '2'], upstream_options: { tokens: 2_000, token_interval_us: 5_000 },
  });
  const user = await server.create_user('premium', credit_micros);
  const before = await server.accounts();
  const offer = (await server.provider_entry(provider.id)).models.find((m) => m.model === model);
  const body = {
    model, messages: [{ role: 'user', content: 'a long answer' }], stream: true, stream_options: { include_usage: true },
  };
  const response = await server.user_client(user.api_key).request('POST', '/v1/chat/completions', { body });
  assert.equal(response.status, 200, 'the answer streams');
  const stopped_at = Date.now();
  const reading = read_sse(response);
  const stopping = server.child.stop('SIGTERM', { timeout_ms: 15_000 });
  // While the answer may finish, a load balancer's health check sees the node going, and a new
  // completion is refused with a reason.
  const health = await wait_for('/healthz answering 503 while serve drains', async () => {
    const answer = await fetch(`${server.base_url}/healthz`);
    return answer.status === 503 ? answer.json() : null;
  });
  assert.equal(health.status, 'draining', JSON.stringify(health));
  const refused = await server.user_client(user.api_key).request('POST', '/v1/chat/completions', { body });
  assert.equal(refused.status, 503);
  assert.equal((await refused.json()).error?.code, 'server_shutting_down');
  const [events] = await Promise.all([reading, stopping]);
  assert.equal(server.child.exit_code, 0, 'serve exits with 0');
  const stop_ms = Date.now() - stopped_at;
  assert.ok(stop_ms < 8_000, `it stopped after its 2 s wait, not at the answer's end: ${stop_ms} ms`);

  assert.equal(events.at(-1), '[DONE]');
  const chunks = events.slice(0, -1);
  const last = chunks.at(-1);
  assert.equal(last.choices[0].finish_reason, 'error', JSON.stringify(last));
  assert.equal(last.error?.code, 'server_shutting_down', JSON.stringify(last));
  const received = chunks.filter((chunk) => chunk.choices[0]?.delta?.content).length;
  assert.ok(received > 0 && received < 2_000, `cut short: ${received} tokens`);
  assert.equal(last.usage?.completion_tokens, received, 'the usage billed is what the client got');
  console.log(`SIGTERM mid-answer: ${received} tokens relayed and billed; serve stopped in ${stop_ms} ms`);

  // The job is cancelled (not failed) and billed for those tokens, and nothing else moved.
  const restarted = await world.serve({ data_dir: server.data_dir, name: 'serve-restarted' });
  const [job] = await restarted.wait_jobs([job_id_of(last.id)], 'cancelled', (j) => j.gross_micros > 0);
  assert.equal(job.completion_tokens, received);
  assert.equal(job.gross_micros, gross_micros(job.prompt_tokens_billed, received, offer));
  const after = await restarted.accounts();
  assert.deepEqual(balance_changes(before, after), {
    [`user-${user.id}`]: -job.gross_micros,
    [`provider-${provider.id}`]: job.gross_micros - job.platform_fee_micros,
    platform: job.platform_fee_micros,
  });
  await restarted.child.stop('SIGTERM', { timeout_ms: 15_000 });
  const replay = await world.run(['replay', '--data', server.data_dir, '--verify'], 'replay');
  assert.equal(replay.code, 0, `replay --verify passes:\n${replay.output}`);
});

scenario('a second SIGTERM while serve drains stops it at once, and the next start closes what it left', async (world) => {
  const { server, model } = await one_provider_world(world, {
    serve_args: ['--drain-s', '600'], upstream_options: { tokens: 2_000, token_interval_us: 5_000 },
  });
  const user = await server.create_user('premium', credit_micros);
  const body = { model, messages: [{ role: 'user', content: 'a long answer' }], stream: true };
  const response = await server.user_client(user.api_key).request('POST', '/v1/chat/completions', { body });
  assert.equal(response.status, 200, 'the answer streams');
  const reading = read_sse(response).catch(() => null);  // cut off by the stop
  server.child.process.kill('SIGTERM');
  await wait_for('/healthz answering 503 while serve drains', async () =>
    (await fetch(`${server.base_url}/healthz`)).status === 503);
  const stopped_at = Date.now();
  const { signal } = await server.child.stop('SIGTERM', { timeout_ms: 15_000 });
  assert.equal(signal, 'SIGTERM', 'the second signal ended it by its default action');
  console.log(`second SIGTERM: serve stopped in ${Date.now() - stopped_at} ms of its 600 s drain`);
  await reading;
  const restarted = await world.serve({ data_dir: server.data_dir, name: 'serve-restarted' });
  await restarted.child.stop('SIGTERM', { timeout_ms: 15_000 });
  assert.equal(restarted.child.exit_code, 0);
  const replay = await world.run(['replay', '--data', server.data_dir, '--verify'], 'replay');
  assert.equal(replay.code, 0, `replay --verify passes:\n${replay.output}`);
});

scenario('what serve acknowledged right before a SIGKILL is there after the restart', async (world) => {
  // No wait for the money to settle this time: the kill comes at once after the last answers,
  // several of them completing together (their ends and bills recorded in the same moments).
  const concurrent = 6;
  const { server, model } = await one_provider_world(world, { upstream_options: { tokens } });
  const user = await server.create_user('premium', credit_micros);
  const client = server.openai(user.api_key);
  const answers = await Promise.all(Array.from({ length: concurrent }, (_, i) => client.chat.completions.create({
    model, messages: [{ role: 'user', content: `just before the kill ${i}` }],
  })));
  for (const answer of answers) assert.equal(answer.choices[0].message.content, upstream_text(tokens));
  const credited = await server.create_user('premium', 1_234_567);
  await server.child.stop('SIGKILL');

  const restarted = await world.serve({ data_dir: server.data_dir, name: 'serve-restarted' });
  // The user created last, with its credit, and every answered job, billed once (at the start, if
  // its bill was not recorded before the kill).
  const billed = await restarted.billed_jobs(answers.map((answer) => job_id_of(answer.id)));
  assert.equal(billed.length, concurrent);
  let spent = 0;
  for (const job of billed) {
    assert.equal(job.completion_tokens, tokens, `${job.id} bills its tokens`);
    spent += job.gross_micros;
  }
  const accounts = await restarted.accounts();
  assert.equal(accounts.balances[`user-${credited.id}`], 1_234_567, 'the acknowledged credit survived');
  assert.equal(accounts.balances[`user-${user.id}`], credit_micros - spent, 'each answer is billed once');
  assert.equal(accounts.total_micros, 0);
  assert.ok((await restarted.user_client(credited.api_key).get('/v1/models')).data, 'its API key works');
  await restarted.child.stop('SIGTERM', { timeout_ms: 15_000 });
  const replay = await world.run(['replay', '--data', server.data_dir, '--verify'], 'replay');
  assert.equal(replay.code, 0, `replay --verify passes:\n${replay.output}`);
});
