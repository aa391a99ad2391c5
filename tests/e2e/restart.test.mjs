// The server killed with SIGKILL and restarted on the same data folder (sync durability): every
// acknowledged money movement is still there, `gpustream replay --verify` passes, and the provider
// agent reconnects by itself and serves again. Also: SIGTERM stops serve cleanly.

import assert from 'node:assert/strict';

import { job_id_of, one_provider_world, scenario, upstream_text, wait_for } from './harness.mjs';

const tokens = 8;
const jobs = 3;

scenario('a server killed with SIGKILL restarts with no acknowledged money lost', async (world) => {
  const { server, model } = await one_provider_world(world, { upstream_options: { tokens } });
  const user = await server.create_user('premium', 5_000_000);
  const client = server.openai(user.api_key);
  const job_ids = [];
  for (let i = 0; i < jobs; ++i) {
    const answer = await client.chat.completions.create({ model, messages: [{ role: 'user', content: `job ${i}` }] });
    assert.equal(answer.choices[0].message.content, upstream_text(tokens));
    job_ids.push(job_id_of(answer.id));
  }
  const before = await server.accounts();
  assert.equal(before.total_micros, 0);
  assert.ok(before.balances[`user-${user.id}`] < 5_000_000, 'the jobs were paid for');
  await server.wait_jobs(job_ids, 'completed');

  await server.child.stop('SIGKILL');
  assert.equal(server.child.exit_signal, 'SIGKILL');

  // Restarted on the same data and the same port, so the agent finds it again.
  const restarted = await world.serve({ data_dir: server.data_dir, http: `127.0.0.1:${server.port}`, name: 'serve-restarted' });
  const after = await restarted.accounts();
  assert.deepEqual(after, before, 'the ledger after the restart equals the acknowledged one');
  await restarted.wait_jobs(job_ids, 'completed');
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
  const user = await server.create_user('premium', 5_000_000);
  const stream = await server.openai(user.api_key).chat.completions.create({
    model, messages: [{ role: 'user', content: 'a long answer' }], stream: true,
  });
  let received = 0;
  const reading = (async () => {
    try {
      for await (const chunk of stream) if (chunk.choices[0]?.delta?.content) received += 1;
    } catch {
      // The server dies under the stream: the SDK reports the broken connection.
    }
  })();
  await wait_for('a few tokens to arrive', () => received >= 10);
  await server.child.stop('SIGKILL');
  await reading;
  const replay = await world.run(['replay', '--data', server.data_dir, '--verify'], 'replay');
  assert.equal(replay.code, 0, `replay --verify passes:\n${replay.output}`);
  const restarted = await world.serve({ data_dir: server.data_dir, name: 'serve-restarted' });
  assert.equal((await restarted.accounts()).total_micros, 0);
});

scenario('serve stops cleanly on SIGTERM while a provider is connected', async (world) => {
  const { server, agent } = await one_provider_world(world);
  await server.child.stop('SIGTERM', { timeout_ms: 10_000 });
  assert.equal(server.child.exit_code, 0, 'serve exits with 0 on SIGTERM');
  // The agent sees the coordinator go and keeps trying to come back.
  await agent.wait_line(/link down/);
  assert.equal(agent.exited, false, 'the agent keeps running to reconnect');
  const replay = await world.run(['replay', '--data', server.data_dir, '--verify'], 'replay');
  assert.equal(replay.code, 0, `replay --verify passes:\n${replay.output}`);
});
