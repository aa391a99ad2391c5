// Ads end to end: a free user asking about a campaign's keyword gets exactly one "Sponsored:" chunk
// after the model's unchanged text and x_gpustream.ad; a premium user never does; the click URL
// redirects to the advertiser and is recorded once; the ledger shows the money moved and still sums
// to zero.

import assert from 'node:assert/strict';

import {
  balance_changes, gross_micros, job_id_of, one_provider_world, platform_fee_micros, scenario, upstream_text,
} from './harness.mjs';

const tokens = 10;
const cpm_bid_micros = 5_000_000;  // 5,000 micro-USD per impression at most
const budget_micros = 1_000_000;

const campaign_body = {
  advertiser: 'Pizza Planet',
  title: 'Pizza Planet',
  text: 'Hot pizza delivered in 20 minutes',
  url: 'https://pizza.example/order?from=gpustream',
  keywords: ['pizza', 'delivery'],
  categories: ['food'],
  cpm_bid_micros,
  budget_micros,
  daily_budget_micros: budget_micros,
  frequency_cap_per_day: 10,
};

const prompt = [{ role: 'user', content: 'Where can I order a good pizza tonight?' }];

async function streamed(client, model) {
  const stream = await client.chat.completions.create({
    model, messages: prompt, stream: true, stream_options: { include_usage: true },
  });
  const chunks = [];
  for await (const chunk of stream) chunks.push(chunk);
  return chunks;
}

scenario('free answers carry one ad, premium answers none, and the money adds up', async (world) => {
  const { server, provider, model } = await one_provider_world(world, { upstream_options: { tokens } });
  const campaign = await server.admin.post('/admin/campaigns', campaign_body);
  assert.match(campaign.id, /\S/);
  const free_user = await server.create_user('free');
  const premium_user = await server.create_user('premium', 10_000_000);
  const before = await server.accounts();
  assert.equal(before.total_micros, 0);
  assert.equal(before.balances[`campaign-${campaign.id}`], budget_micros, 'the budget sits in the campaign escrow');

  // Free tier, streamed: the model's text, then one ad chunk, then the usage chunk naming the ad.
  const chunks = await streamed(server.openai(free_user.api_key), model);
  const pieces = chunks.map((chunk) => chunk.choices[0]?.delta?.content ?? '');
  const ad_indexes = pieces.flatMap((piece, index) => (piece.includes('Sponsored:') ? [index] : []));
  assert.equal(ad_indexes.length, 1, `exactly one ad chunk in ${JSON.stringify(pieces)}`);
  const ad_index = ad_indexes[0];
  assert.equal(pieces.slice(0, ad_index).join(''), upstream_text(tokens), "the model's text comes first, unchanged");
  assert.equal(pieces.slice(ad_index + 1).join(''), '', 'nothing after the ad');
  const last = chunks.at(-1);
  const ad = last.x_gpustream?.ad;
  assert.ok(ad, `x_gpustream.ad in the last chunk: ${JSON.stringify(last)}`);
  assert.equal(ad.campaign_id, campaign.id);
  assert.equal(ad.title, campaign_body.title);
  assert.equal(ad.text, campaign_body.text);
  assert.equal(ad.url, `${server.base_url}/a/c/${ad.impression_id}`);
  assert.equal(pieces[ad_index], `\n\nSponsored: ${campaign_body.title} \u2014 ${campaign_body.text}  ${ad.url}`);
  assert.equal(last.usage.completion_tokens, tokens, 'the ad is not counted as completion tokens');

  // Free tier, not streamed: the ad follows the text in the message and is described the same way.
  const whole = await server.openai(free_user.api_key).chat.completions.create({ model, messages: prompt });
  const whole_ad = whole.x_gpustream?.ad;
  assert.ok(whole_ad, `x_gpustream.ad in the body: ${JSON.stringify(whole)}`);
  assert.equal(whole.choices[0].message.content,
    `${upstream_text(tokens)}\n\nSponsored: ${campaign_body.title} \u2014 ${campaign_body.text}  ${whole_ad.url}`);
  assert.notEqual(whole_ad.impression_id, ad.impression_id, 'each answer is its own impression');

  // Premium: the same prompt, never an ad.
  const premium_chunks = await streamed(server.openai(premium_user.api_key), model);
  const premium_text = premium_chunks.map((chunk) => chunk.choices[0]?.delta?.content ?? '').join('');
  assert.equal(premium_text, upstream_text(tokens));
  assert.ok(premium_chunks.every((chunk) => chunk.x_gpustream?.ad === undefined), 'no ad for premium');
  const premium_whole = await server.openai(premium_user.api_key).chat.completions.create({ model, messages: prompt });
  assert.equal(premium_whole.choices[0].message.content, upstream_text(tokens));
  assert.equal(premium_whole.x_gpustream.ad, undefined);

  // The click URL records the click and sends the browser to the advertiser; a second click of the
  // same impression is sent there too, and not counted again (checked in the log below).
  for (let i = 0; i < 2; ++i) {
    const click = await fetch(ad.url, { redirect: 'manual' });
    assert.equal(click.status, 302, `click ${i}`);
    assert.equal(click.headers.get('location'), campaign_body.url);
    await click.text();
  }
  const unknown = await fetch(`${server.base_url}/a/c/no-such-impression`, { redirect: 'manual' });
  assert.equal(unknown.status, 404);
  // A browser fetching the other answer's link ahead of a click (a link hovered) records nothing
  // (counted in the log below); the browser follows it anew when clicked.
  const prefetched = await fetch(whole_ad.url, { redirect: 'manual', headers: { purpose: 'prefetch' } });
  assert.equal(prefetched.status, 503);
  await prefetched.text();

  // The money. Per job (from /admin/jobs): the free ones paid by the subsidy, the premium ones by
  // the user; the provider earns gross - fee, the platform the fee and the ad's price, the
  // campaign's escrow pays the ad.
  const ids = [last.id, whole.id, premium_chunks.at(-1).id, premium_whole.id].map(job_id_of);
  const jobs = await server.billed_jobs(ids);
  const after = await server.accounts();
  assert.equal(after.total_micros, 0, 'all balances sum to zero');
  assert.equal(Object.values(after.balances).reduce((sum, balance) => sum + balance, 0), 0);
  const offer = (await server.provider_entry(provider.id)).models.find((m) => m.model === model);
  let subsidy = 0, user = 0, provider_net = 0, platform = 0, ads = 0;
  for (const [index, job] of jobs.entries()) {
    const free = index < 2;
    assert.equal(job.premium, !free);
    assert.equal(job.gross_micros, gross_micros(job.prompt_tokens_billed, job.completion_tokens, offer));
    assert.equal(job.platform_fee_micros, platform_fee_micros(job.gross_micros));
    if (free) {
      assert.ok(job.ad_micros > 0, `the impression of ${job.id} has a price`);
      assert.ok(job.ad_micros <= cpm_bid_micros / 1000, 'an impression costs at most the CPM bid / 1000');
      subsidy += job.gross_micros;
    } else {
      assert.equal(job.ad_micros, 0);
      user += job.gross_micros;
    }
    provider_net += job.gross_micros - job.platform_fee_micros;
    platform += job.platform_fee_micros + job.ad_micros;
    ads += job.ad_micros;
  }
  const changes = balance_changes(before, after);
  const expected = {
    [`campaign-${campaign.id}`]: -ads,
    platform,
    [`provider-${provider.id}`]: provider_net,
    subsidy: -subsidy,
    [`user-${premium_user.id}`]: -user,
  };
  assert.deepEqual(changes, expected);

  // The click was recorded, once. Neither the admin API nor /metrics counts clicks (the ad
  // server's counts stay inside it), so the log tells: `gpustream replay` reads it once serve has
  // stopped (SIGTERM: all it acknowledged is in the log). A 302 alone proves nothing: an
  // impression the campaign does not know is sent to the advertiser too, uncounted.
  await server.child.stop('SIGTERM', { timeout_ms: 10_000 });
  assert.equal(server.child.exit_code, 0, 'serve exits with 0 on SIGTERM');
  const replay = await world.run(['replay', '--data', server.data_dir, '--verify', '--json'], 'replay');
  assert.equal(replay.code, 0, `replay --verify passes:\n${replay.output}`);
  const counts = JSON.parse(replay.stdout).events_per_type;
  assert.equal(counts.impression_recorded, 2, `two free answers, two impressions: ${JSON.stringify(counts)}`);
  assert.equal(counts.ad_clicked, 1, `one click recorded for two clicks of one impression and a prefetch of the other: ${JSON.stringify(counts)}`);
});
