// What a provider and an operator see: GET /v1/providers/me with the provider's token shows it
// online with its earnings after serving a job; /metrics (Prometheus text) counts requests, time to
// first token and providers online.

import assert from 'node:assert/strict';

import { http_client, one_provider_world, scenario, upstream_text, wait_for } from './harness.mjs';

const tokens = 12;

/// The samples of a Prometheus text exposition: [{name, labels, value}].
function parse_metrics(text) {
  const samples = [];
  for (const line of text.split('\n')) {
    if (line === '' || line.startsWith('#')) continue;
    const match = line.match(/^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$/);
    assert.ok(match, `a well-formed sample line: ${JSON.stringify(line)}`);
    samples.push({ name: match[1], labels: match[2] ?? '', value: Number(match[3]) });
  }
  return samples;
}

scenario('the provider page shows earnings and /metrics counts the traffic', async (world) => {
  const { server, provider, model } = await one_provider_world(world, {
    upstream_options: { tokens, first_token_ms: 20 },
  });
  const me = new http_client(server.base_url, provider.token);
  const fresh = await me.get('/v1/providers/me');
  assert.equal(fresh.id, provider.id);
  assert.equal(fresh.status, 'online');
  assert.equal(fresh.earnings.earned_micros, 0);
  assert.ok(fresh.models.some((m) => m.model === model), 'the page lists the advertised model');

  const user = await server.create_user('premium', 10_000_000);
  const client = server.openai(user.api_key);
  const stream = await client.chat.completions.create({
    model, messages: [{ role: 'user', content: 'Earn something.' }], stream: true,
  });
  let text = '';
  for await (const chunk of stream) text += chunk.choices[0]?.delta?.content ?? '';
  assert.equal(text, upstream_text(tokens));

  // The job's score is recorded just after its settlement: the page shows both soon.
  const page = await wait_for('the provider page to show the job and its earnings', async () => {
    const now = await me.get('/v1/providers/me');
    return now.jobs.succeeded === 1 && now.earnings.earned_micros > 0 ? now : null;
  });
  assert.equal(page.earnings.balance_micros, page.earnings.earned_micros - page.earnings.paid_out_micros);
  assert.equal(page.jobs.failed, 0);
  const ledger = await server.accounts();
  assert.equal(page.earnings.balance_micros, ledger.balances[`provider-${provider.id}`],
    'the page shows the ledger balance');
  // Another provider's token, or none, sees nothing.
  const wrong = await new http_client(server.base_url, 'not-a-provider-token').request('GET', '/v1/providers/me');
  assert.equal(wrong.status, 401);
  const user_key = await new http_client(server.base_url, user.api_key).request('GET', '/v1/providers/me');
  assert.equal(user_key.status, 401, "a user's API key is not a provider token");

  const metrics = await fetch(`${server.base_url}/metrics`);
  assert.equal(metrics.status, 200);
  assert.match(metrics.headers.get('content-type'), /^text\/plain/);
  const samples = parse_metrics(await metrics.text());
  const find = (name, labels = '') => samples.filter((s) => s.name === name && s.labels.includes(labels));
  const chat_requests = find('gpustream_http_requests_total', 'endpoint="/v1/chat/completions"')
    .filter((s) => s.labels.includes('status="200"'));
  assert.equal(chat_requests.length, 1, 'requests counted by endpoint and status');
  assert.equal(chat_requests[0].value, 1);
  const ttft_count = find('gpustream_time_to_first_token_seconds_count');
  assert.equal(ttft_count.length, 1);
  assert.equal(ttft_count[0].value, 1, 'one first token observed');
  const buckets = find('gpustream_time_to_first_token_seconds_bucket');
  assert.ok(buckets.length > 1, 'the TTFT histogram has buckets');
  const infinite = buckets.find((s) => s.labels.includes('le="+Inf"'));
  assert.equal(infinite?.value, 1);
  // The upstream waits 20 ms before its first token: the 10 ms bucket cannot hold it.
  const small = buckets.filter((s) => { const le = s.labels.match(/le="([^"]+)"/)[1]; return le !== '+Inf' && Number(le) < 0.02; });
  assert.ok(small.every((s) => s.value === 0), `no first token faster than the upstream's 20 ms: ${JSON.stringify(small)}`);
  // The provider's share of it, from the offer: also at least the upstream's 20 ms, and no more
  // than the whole.
  const offer_count = find('gpustream_offer_to_first_token_seconds_count');
  assert.equal(offer_count.length, 1);
  assert.equal(offer_count[0].value, 1, 'one first token observed from its offer');
  const offer_small = find('gpustream_offer_to_first_token_seconds_bucket')
    .filter((s) => { const le = s.labels.match(/le="([^"]+)"/)[1]; return le !== '+Inf' && Number(le) < 0.02; });
  assert.ok(offer_small.length > 0 && offer_small.every((s) => s.value === 0), `offer to first token under 20 ms: ${JSON.stringify(offer_small)}`);
  const offer_sum = find('gpustream_offer_to_first_token_seconds_sum')[0].value;
  const ttft_sum = find('gpustream_time_to_first_token_seconds_sum')[0].value;
  assert.ok(offer_sum >= 0.02 && offer_sum <= ttft_sum, `offer to first token ${offer_sum} s within the TTFT ${ttft_sum} s`);
  // The agent's own measure of it (offer received to its backend's first token), as its done
  // frame reported it: at least the upstream's 20 ms, and no more than the round trip around it.
  const provider_count = find('gpustream_provider_ttft_seconds_count');
  assert.equal(provider_count.length, 1);
  assert.equal(provider_count[0].value, 1, 'one provider-reported first token');
  const provider_sum = find('gpustream_provider_ttft_seconds_sum')[0].value;
  assert.ok(provider_sum >= 0.02 && provider_sum <= offer_sum,
    `the agent's TTFT ${provider_sum} s within the offer's round trip ${offer_sum} s`);
  const online = find('gpustream_providers_online');
  assert.equal(online.length, 1);
  assert.equal(online[0].value, 1);
  const completion_tokens = find('gpustream_completion_tokens_total');
  assert.equal(completion_tokens[0]?.value, tokens);
  // The event store's group commit: the job's events and its settlement were appended, each
  // append in a group, and (sync durability) made durable by fsyncs.
  const store = (name) => find(`gpustream_store_${name}_total`)[0]?.value;
  assert.ok(store('groups') > 0 && store('appends') >= store('groups'), `groups ${store('groups')}, appends ${store('appends')}`);
  assert.ok(store('events_written') >= store('appends'), `events ${store('events_written')}, appends ${store('appends')}`);
  assert.ok(store('syncs') > 0, `syncs ${store('syncs')}`);
});
