// Tests domain_verifier on hand-built logs: a sound one passes with exact counts; each invariant broken once fails naming it.

#include <gtest/gtest.h>

#include <cstdint>
#include <cstdlib>
#include <iostream>
#include <map>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "domain/verifier.hpp"

namespace gpustream::domain {
namespace {

using events::transfer_kind;

constexpr std::int64_t t0 = 1'700'000'000'000'000;
constexpr std::int64_t second_us = 1'000'000;

/// One event of a log, where the store would have put it.
struct logged {
  std::string stream;
  std::uint64_t version = 0;
  std::uint64_t position = 0;
  events::event event;
};

/// A log under construction: versions per stream and global positions are assigned as the store
/// would assign them.
struct event_log {
  std::vector<logged> entries;
  std::map<std::string, std::uint64_t> versions;

  /// Appends `event` to `stream`; returns its global position.
  std::uint64_t add(const std::string& stream, events::event event) {
    const auto version = ++versions[stream];
    entries.push_back({stream, version, entries.size() + 1, std::move(event)});
    return entries.size();
  }

  /// A transfer of its own group (the group id is the transfer id).
  std::uint64_t transfer(const std::string& id, const std::string& debit, const std::string& credit,
                         std::int64_t amount, transfer_kind kind, const std::string& group = {}) {
    return add("ledger", events::transfer_recorded{id, debit, credit, amount, kind, "ref-" + id,
                                                   group.empty() ? id : group, t0});
  }
};

/// Global position of the last event of `stream` in `log`; 0 if it has none.
std::uint64_t last_position_of(const event_log& log, const std::string& stream) {
  std::uint64_t position = 0;
  for (const auto& e : log.entries) {
    if (e.stream == stream) position = e.position;
  }
  return position;
}

/// Feeds the whole log to a verifier and finishes it.
expected<verify_counts, verify_violation> verify(const event_log& log) {
  domain_verifier verifier;
  for (const auto& e : log.entries) {
    if (auto ok = verifier.apply(e.stream, e.version, e.position, e.event); !ok) return unexpected{ok.error()};
  }
  return verifier.finish();
}

// ---- a sound log ------------------------------------------------------------------------------

void add_users(event_log& log) {
  log.add("user-ada", events::user_created{"ada", "Ada", events::user_tier::premium, t0});
  log.add("user-ada", events::api_key_issued{"ada", "k1", {1, 2, 3}, "laptop", t0 + 1});
  log.add("user-ada", events::user_credited{"ada", "dep-1", 10'000'000, t0 + 2});
  log.transfer("deposit-dep-1", "external", "user-ada", 10'000'000, transfer_kind::deposit);
  log.add("user-bob", events::user_created{"bob", "Bob", events::user_tier::free, t0 + 3});
  log.add("user-bob", events::free_tokens_used{"bob", "j9", 300, t0 + 4});
  log.add("provider-p1", events::provider_created{"p1", "carol", "carol's 4090", {7}, t0 + 5});
  log.add("provider-p1", events::provider_connected{"p1", {}, events::backend_kind::openai, "http://x", "0.1", t0 + 6});
}

/// A bill as the scheduler records it with a job's end: the transfers of group `group`, with the
/// reference event_log::transfer gives them ("ref-<transfer id>").
events::ledger_bill bill_of(const std::string& group, std::vector<events::billed_transfer> transfers) {
  for (auto& t : transfers) t.reference = "ref-" + t.transfer_id;
  return events::ledger_bill{group, std::move(transfers)};
}

events::ledger_bill j1_bill() {
  return bill_of("job-j1", {{"job-j1/usage", "user-ada", "provider-p1", 4'000, transfer_kind::usage, {}},
                            {"job-j1/fee", "provider-p1", "platform", 400, transfer_kind::platform_fee, {}}});
}

/// j1 completed and settled, j2 still queued, j3 failed.
void add_jobs(event_log& log) {
  log.add("job-j1", events::job_submitted{"j1", "ada", "llama", events::quality_tier::standard, 100, 100, 5'000,
                                          true, "", t0 + 10});
  log.add("job-j1", events::job_queued{"j1", 5, t0 + 60 * second_us, t0 + 11});
  log.add("job-j1", events::job_assigned{"j1", "p1", 1, t0 + 12});
  log.add("job-j1", events::job_started{"j1", "p1", t0 + 13});
  log.add("job-j1", events::job_completed{"j1", "p1", 100, 80, 80, 3, 10, t0 + 20, j1_bill()});
  log.transfer("job-j1/usage", "user-ada", "provider-p1", 4'000, transfer_kind::usage, "job-j1");
  log.transfer("job-j1/fee", "provider-p1", "platform", 400, transfer_kind::platform_fee, "job-j1");
  log.add("job-j2", events::job_submitted{"j2", "bob", "llama", events::quality_tier::low, 10, 10, 0, false, "",
                                          t0 + 21});
  log.add("job-j2", events::job_queued{"j2", 1, t0 + 60 * second_us, t0 + 22});
  log.add("job-j3", events::job_submitted{"j3", "bob", "llama", events::quality_tier::low, 10, 10, 0, false, "",
                                          t0 + 23});
  log.add("job-j3", events::job_queued{"j3", 1, t0 + 60 * second_us, t0 + 24});
  log.add("job-j3", events::job_failed{"j3", events::failure_reason::no_provider, "none online", t0 + 25});
}

/// CPM 2 USD: one impression costs 2,000 micro-USD. Funded 10,000; one impression of 1,800 served.
void add_campaign(event_log& log, std::int64_t funded = 10'000) {
  log.add("campaign-c1", events::campaign_created{"c1", "acme", "Rust", "Learn Rust", "https://acme.example",
                                                  {"rust"}, {}, 2'000'000, 1'000'000, 500'000, 3, t0 + 30});
  log.add("campaign-c1", events::campaign_funded{"c1", funded, t0 + 31});
  log.transfer("campaign-c1/funded-2", "external", "campaign-c1", funded, transfer_kind::deposit);
  log.add("campaign-c1", events::ad_reserved{"r1", "c1", "j2", "bob", 2'000, t0 + 32, t0 + 60 * second_us});
  log.add("campaign-c1", events::impression_recorded{"r1", "c1", "j2", "bob", 1'800, t0 + 33});
  log.transfer("ad-r1", "campaign-c1", "platform", 1'800, transfer_kind::ad_spend);
  log.add("campaign-c1", events::ad_clicked{"r1", "c1", t0 + 34});
}

/// Provider p1 earned 3,600 (4,000 usage - 400 fee); po1 pays out 3,000 and settles.
void add_payout(event_log& log) {
  log.transfer("payout-po1/request", "provider-p1", "payouts_in_flight", 3'000, transfer_kind::payout);
  log.add("payout-po1", events::payout_requested{"po1", "p1", 3'000, false, t0 + 40});
  log.transfer("payout-po1/settle", "payouts_in_flight", "external", 3'000, transfer_kind::payout);
  log.add("payout-po1", events::payout_settled{"po1", "ext-1", t0 + 41});
}

event_log sound_log() {
  event_log log;
  add_users(log);
  add_jobs(log);
  add_campaign(log);
  add_payout(log);
  return log;
}

TEST(domain_verifier, a_sound_log_passes_with_the_count_of_each_aggregate) {
  const auto log = sound_log();
  auto counts = verify(log);
  ASSERT_TRUE(counts) << describe(counts.error());
  EXPECT_EQ(counts->events, log.entries.size());
  EXPECT_EQ(counts->users, 2u);
  EXPECT_EQ(counts->providers, 1u);
  EXPECT_EQ(counts->campaigns, 1u);
  EXPECT_EQ(counts->jobs, 3u);
  EXPECT_EQ(counts->jobs_by_status[static_cast<std::size_t>(job_status::completed)], 1u);
  EXPECT_EQ(counts->jobs_by_status[static_cast<std::size_t>(job_status::queued)], 1u);
  EXPECT_EQ(counts->jobs_by_status[static_cast<std::size_t>(job_status::failed)], 1u);
  EXPECT_EQ(counts->jobs_by_status[static_cast<std::size_t>(job_status::none)], 0u);
  EXPECT_EQ(counts->payouts, 1u);
  EXPECT_EQ(counts->payouts_settled, 1u);
  EXPECT_EQ(counts->payouts_requested, 0u);
  EXPECT_EQ(counts->payouts_failed, 0u);
  EXPECT_EQ(counts->ledger_transfers, 7u);
  EXPECT_EQ(counts->ledger_groups, 6u);
  // external, user-ada, provider-p1, platform, campaign-c1, payouts_in_flight
  EXPECT_EQ(counts->ledger_accounts, 6u);
}

TEST(domain_verifier, an_empty_log_passes_with_zero_counts) {
  domain_verifier verifier;
  auto counts = verifier.finish();
  ASSERT_TRUE(counts) << describe(counts.error());
  EXPECT_EQ(*counts, verify_counts{});
}

// ---- naming the first violation ----------------------------------------------------------------

/// Verifies `log`, expecting `broken` at `stream`, `version` and `position` with every one of
/// `words` in the message.
void expect_violation(const event_log& log, invariant broken, const std::string& stream, std::uint64_t version,
                      std::uint64_t position, const std::vector<std::string>& words) {
  auto counts = verify(log);
  ASSERT_FALSE(counts) << "the verifier accepted a log that breaks " << to_string(broken);
  const auto& v = counts.error();
  EXPECT_EQ(v.broken, broken) << describe(v);
  EXPECT_EQ(v.stream, stream) << describe(v);
  EXPECT_EQ(v.version, version) << describe(v);
  EXPECT_EQ(v.position, position) << describe(v);
  for (const auto& word : words) EXPECT_NE(v.message.find(word), std::string::npos) << word << " in: " << describe(v);
}

TEST(domain_verifier_ledger, a_negative_user_balance_is_named_at_the_group_that_caused_it) {
  auto log = sound_log();
  // Ada deposited 10 USD and spent 4,000 micro-USD: 12 USD more takes her below zero.
  const auto position = log.transfer("job-j9/usage", "user-ada", "provider-p1", 12'000'000, transfer_kind::usage);
  const auto version = log.versions["ledger"];
  log.transfer("deposit-dep-2", "external", "user-ada", 5, transfer_kind::deposit);  // the next group
  expect_violation(log, invariant::ledger, "ledger", version, position,
                   {"user-ada", "-2004000 micro-USD", "never go negative", "job-j9/usage"});
}

TEST(domain_verifier_ledger, a_negative_balance_in_the_last_group_is_found_at_the_end) {
  auto log = sound_log();
  const auto position = log.transfer("ad-r9", "campaign-c1", "platform", 8'201, transfer_kind::ad_spend);
  // Funded 10,000, spent 1,800 before: 8,201 more leaves -1.
  expect_violation(log, invariant::ledger, "ledger", log.versions["ledger"], position,
                   {"campaign-c1", "-1 micro-USD"});
}

TEST(domain_verifier_ledger, a_transfer_id_applied_twice_is_named_with_both_groups) {
  auto log = sound_log();
  const auto position = log.transfer("deposit-dep-1", "external", "user-ada", 10'000'000, transfer_kind::deposit,
                                     "deposit-dep-1-again");
  expect_violation(log, invariant::ledger, "ledger", log.versions["ledger"], position,
                   {"\"deposit-dep-1\"", "applied twice", "deposit-dep-1-again"});
}

TEST(domain_verifier_ledger, a_group_split_by_other_groups_is_refused) {
  auto log = sound_log();
  const auto position = log.transfer("deposit-dep-3", "external", "user-ada", 1, transfer_kind::deposit, "job-j1");
  expect_violation(log, invariant::ledger, "ledger", log.versions["ledger"], position,
                   {"\"job-j1\"", "appears again"});
}

TEST(domain_verifier_ledger, a_route_the_ledger_does_not_allow_is_refused) {
  auto log = sound_log();
  // Usage paid by the platform is no route: only users pay for usage.
  const auto position = log.transfer("odd", "platform", "provider-p1", 10, transfer_kind::usage);
  expect_violation(log, invariant::ledger, "ledger", log.versions["ledger"], position, {"\"odd\""});
}

TEST(domain_verifier_payout, a_payout_larger_than_the_earnings_breaks_the_ledger) {
  auto log = sound_log();
  // p1 earned 3,600 and was paid 3,000: a request of 1,000 more takes its balance to -400.
  const auto position =
      log.transfer("payout-po2/request", "provider-p1", "payouts_in_flight", 1'000, transfer_kind::payout);
  log.add("payout-po2", events::payout_requested{"po2", "p1", 1'000, false, t0 + 50});
  expect_violation(log, invariant::ledger, "ledger", log.versions["ledger"], position,
                   {"provider-p1", "-400 micro-USD"});
}

TEST(domain_verifier_payout, a_payout_that_disagrees_with_its_ledger_movement_is_named_at_the_end) {
  auto log = sound_log();
  log.transfer("payout-po2/request", "provider-p1", "payouts_in_flight", 500, transfer_kind::payout);
  log.add("payout-po2", events::payout_requested{"po2", "p1", 600, false, t0 + 50});  // the ledger moved 500
  expect_violation(log, invariant::payouts_match_ledger, "ledger", log.versions["ledger"], log.entries.size() - 1,
                   {"\"po2\"", "600 micro-USD", "500 micro-USD"});
}

TEST(domain_verifier_payout, a_ledger_payout_movement_without_its_payout_is_named_at_the_end) {
  auto log = sound_log();
  const auto position =
      log.transfer("payout-po3/request", "provider-p1", "payouts_in_flight", 100, transfer_kind::payout);
  expect_violation(log, invariant::payouts_match_ledger, "ledger", log.versions["ledger"], position,
                   {"payout-po3/request", "never recorded"});
}

TEST(domain_verifier_payout, settling_a_settled_payout_does_not_apply) {
  auto log = sound_log();
  const auto position = log.add("payout-po1", events::payout_settled{"po1", "ext-2", t0 + 50});
  expect_violation(log, invariant::payout_lifecycle, "payout-po1", 3, position, {"payout_settled", "settled"});
}

TEST(domain_verifier_payout, a_payout_stream_must_open_with_its_request) {
  auto log = sound_log();
  const auto position = log.add("payout-po4", events::payout_failed{"po4", "bank said no", t0 + 50});
  expect_violation(log, invariant::payout_lifecycle, "payout-po4", 1, position, {"payout_requested"});
}

TEST(domain_verifier_campaign, reservations_beyond_the_funding_break_the_budget_at_once) {
  event_log log;
  add_users(log);
  add_jobs(log);
  add_campaign(log, 4'000);  // two impressions' worth; the first reservation became spend of 1,800
  log.add("campaign-c1", events::ad_reserved{"r2", "c1", "j2", "bob", 2'000, t0 + 40, t0 + 60 * second_us});
  const auto position =
      log.add("campaign-c1", events::ad_reserved{"r3", "c1", "j2", "ada", 2'000, t0 + 41, t0 + 60 * second_us});
  log.add("campaign-c1", events::campaign_paused{"c1", "later events are not reached", t0 + 42});
  expect_violation(log, invariant::campaign_budget, "campaign-c1", 7, position,
                   {"\"c1\"", "spent 1800 micro-USD", "reserved 4000 micro-USD", "funded 4000 micro-USD"});
}

TEST(domain_verifier_campaign, an_impression_charging_more_than_its_reservation_held_is_refused) {
  auto log = sound_log();
  log.add("campaign-c1", events::ad_reserved{"r2", "c1", "j2", "bob", 1'500, t0 + 40, t0 + 60 * second_us});
  const auto position = log.add("campaign-c1", events::impression_recorded{"r2", "c1", "j2", "bob", 1'600, t0 + 41});
  expect_violation(log, invariant::campaign_budget, "campaign-c1", 7, position,
                   {"\"r2\"", "1600 micro-USD", "1500 micro-USD"});
}

TEST(domain_verifier_campaign, ledger_ad_spend_beyond_the_budget_is_named_at_the_end) {
  auto log = sound_log();
  // The escrow holds enough (a deposit beyond the campaign's own record), but the budget is 1 USD.
  log.transfer("campaign-c1/funded-extra", "external", "campaign-c1", 2'000'000, transfer_kind::deposit);
  log.transfer("ad-big", "campaign-c1", "platform", 1'000'000, transfer_kind::ad_spend);
  expect_violation(log, invariant::campaign_budget, "campaign-c1", log.versions["campaign-c1"],
                   last_position_of(log, "campaign-c1"), {"1001800 micro-USD", "budget 1000000 micro-USD"});
}

TEST(domain_verifier_campaign, an_inconsistent_campaign_is_named_at_the_end) {
  auto log = sound_log();
  // Marked exhausted while 8,200 of funding are left: enough for four more impressions.
  const auto position = log.add("campaign-c1", events::campaign_exhausted{"c1", 1'800, t0 + 40});
  expect_violation(log, invariant::campaign_consistency, "campaign-c1", 6, position, {"\"c1\"", "exhausted"});
}

TEST(domain_verifier_campaign, an_impression_without_a_reservation_does_not_apply) {
  auto log = sound_log();
  const auto position = log.add("campaign-c1", events::impression_recorded{"r7", "c1", "j2", "bob", 1'000, t0 + 40});
  expect_violation(log, invariant::aggregate_lifecycle, "campaign-c1", 6, position, {"\"r7\"", "no outstanding"});
}

TEST(domain_verifier_campaign, a_void_of_a_clicked_or_unknown_impression_does_not_apply) {
  {
    auto log = sound_log();
    const auto position = log.add("campaign-c1", events::impression_voided{"r1", "c1", "not settled", t0 + 40});
    expect_violation(log, invariant::aggregate_lifecycle, "campaign-c1", 6, position, {"\"r1\"", "was clicked"});
  }
  {
    auto log = sound_log();
    const auto position = log.add("campaign-c1", events::impression_voided{"r7", "c1", "not settled", t0 + 40});
    expect_violation(log, invariant::aggregate_lifecycle, "campaign-c1", 6, position, {"\"r7\"", "unknown"});
  }
  {
    // A served, unclicked impression voided passes, and gives its spend back.
    auto log = sound_log();
    log.add("campaign-c1", events::ad_reserved{"r2", "c1", "j2", "bob", 2'000, t0 + 40, t0 + 60 * second_us});
    log.add("campaign-c1", events::impression_recorded{"r2", "c1", "j2", "bob", 1'500, t0 + 41});
    log.add("campaign-c1", events::impression_voided{"r2", "c1", "not settled", t0 + 42});
    domain_verifier verifier;
    for (const auto& e : log.entries) ASSERT_TRUE(verifier.apply(e.stream, e.version, e.position, e.event));
    const auto* state = std::get<const campaign_state*>(verifier.state_of("campaign-c1"));
    EXPECT_EQ(state->spent_micros, 1'800);
    EXPECT_EQ(state->impressions_total, 1u);
    const auto counts = verifier.finish();
    EXPECT_TRUE(counts) << describe(counts.error());
  }
}

TEST(domain_verifier_job, an_event_after_a_terminal_state_is_refused) {
  auto log = sound_log();
  const auto position = log.add("job-j3", events::job_cancelled{"j3", events::cancelled_by::client, 0, t0 + 50});
  expect_violation(log, invariant::job_lifecycle, "job-j3", 4, position, {"job_cancelled", "failed"});
}

TEST(domain_verifier_job, a_completion_after_completion_is_refused) {
  auto log = sound_log();
  const auto position = log.add("job-j1", events::job_completed{"j1", "p1", 100, 80, 80, 3, 10, t0 + 50});
  expect_violation(log, invariant::job_lifecycle, "job-j1", 6, position, {"job_completed", "completed"});
}

TEST(domain_verifier_job, a_transition_the_lifecycle_does_not_allow_is_refused) {
  auto log = sound_log();
  // j2 is queued: it cannot start without an assignment.
  const auto position = log.add("job-j2", events::job_started{"j2", "p1", t0 + 50});
  expect_violation(log, invariant::job_lifecycle, "job-j2", 3, position, {"job_started", "queued"});
}

TEST(domain_verifier_job, a_job_stream_must_open_with_its_submission) {
  auto log = sound_log();
  const auto position = log.add("job-j8", events::job_queued{"j8", 1, t0 + 60 * second_us, t0 + 50});
  expect_violation(log, invariant::job_lifecycle, "job-j8", 1, position, {"job_submitted"});
}

TEST(domain_verifier_job, a_job_left_in_an_impossible_state_is_named) {
  auto log = sound_log();
  log.add("job-j4", events::job_submitted{"j4", "ada", "llama", events::quality_tier::low, 10, 50, 0, false, "",
                                          t0 + 50});
  log.add("job-j4", events::job_queued{"j4", 1, t0 + 60 * second_us, t0 + 51});
  log.add("job-j4", events::job_assigned{"j4", "p1", 1, t0 + 52});
  log.add("job-j4", events::job_started{"j4", "p1", t0 + 53});
  // 70 completion tokens for a job that allowed 50.
  const auto position = log.add("job-j4", events::job_completed{"j4", "p1", 10, 70, 70, 3, 10, t0 + 54});
  expect_violation(log, invariant::job_consistency, "job-j4", 5, position, {"\"j4\"", "70", "max_tokens 50"});
}

TEST(domain_verifier_job, a_streaming_job_without_a_first_token_is_named) {
  auto log = sound_log();
  log.add("job-j5", events::job_submitted{"j5", "ada", "llama", events::quality_tier::low, 10, 50, 0, false, "",
                                          t0 + 50});
  log.add("job-j5", events::job_queued{"j5", 1, t0 + 60 * second_us, t0 + 51});
  log.add("job-j5", events::job_assigned{"j5", "p1", 1, t0 + 52});
  const auto position = log.add("job-j5", events::job_started{"j5", "p1", 0});
  expect_violation(log, invariant::job_consistency, "job-j5", 4, position, {"\"j5\"", "no first token"});
}

/// Job `id` of ada's, completed on p1 with `bill` recorded; returns the completion's position.
std::uint64_t add_billed_job(event_log& log, const std::string& id, events::ledger_bill bill) {
  const std::string stream = "job-" + id;
  log.add(stream, events::job_submitted{id, "ada", "llama", events::quality_tier::low, 10, 50, 0, true, "", t0 + 50});
  log.add(stream, events::job_queued{id, 1, t0 + 60 * second_us, t0 + 51});
  log.add(stream, events::job_assigned{id, "p1", 1, t0 + 52});
  log.add(stream, events::job_started{id, "p1", t0 + 53});
  return log.add(stream, events::job_completed{id, "p1", 10, 20, 20, 3, 10, t0 + 54, std::move(bill)});
}

events::ledger_bill j6_bill() {
  return bill_of("job-j6", {{"job-j6/usage", "user-ada", "provider-p1", 700, transfer_kind::usage, {}},
                            {"job-j6/fee", "provider-p1", "platform", 70, transfer_kind::platform_fee, {}}});
}

TEST(domain_verifier_bill, a_bill_applied_as_recorded_passes_and_one_not_yet_applied_is_counted) {
  auto log = sound_log();
  add_billed_job(log, "j6", j6_bill());
  log.transfer("job-j6/usage", "user-ada", "provider-p1", 700, transfer_kind::usage, "job-j6");
  log.transfer("job-j6/fee", "provider-p1", "platform", 70, transfer_kind::platform_fee, "job-j6");
  auto settled = verify(log);
  ASSERT_TRUE(settled) << describe(settled.error());
  EXPECT_EQ(settled->job_bills_unsettled, 0u);

  // A stop between the job's end and its ledger group: nothing is wrong yet, serve settles it.
  auto stopped = sound_log();
  add_billed_job(stopped, "j6", j6_bill());
  auto pending = verify(stopped);
  ASSERT_TRUE(pending) << describe(pending.error());
  EXPECT_EQ(pending->job_bills_unsettled, 1u);
}

TEST(domain_verifier_bill, a_transfer_moving_another_amount_than_the_bill_is_named) {
  auto log = sound_log();
  add_billed_job(log, "j6", j6_bill());
  const auto position = log.transfer("job-j6/usage", "user-ada", "provider-p1", 701, transfer_kind::usage, "job-j6");
  const auto version = log.versions["ledger"];
  log.transfer("job-j6/fee", "provider-p1", "platform", 70, transfer_kind::platform_fee, "job-j6");
  expect_violation(log, invariant::job_bill, "ledger", version, position, {"\"job-j6/usage\"", "701 micro-USD", "700 micro-USD"});
}

TEST(domain_verifier_bill, a_transfer_of_the_group_that_the_bill_does_not_name_is_refused) {
  auto log = sound_log();
  add_billed_job(log, "j6", j6_bill());
  log.transfer("job-j6/usage", "user-ada", "provider-p1", 700, transfer_kind::usage, "job-j6");
  log.transfer("job-j6/fee", "provider-p1", "platform", 70, transfer_kind::platform_fee, "job-j6");
  const auto position = log.transfer("job-j6/extra", "user-ada", "provider-p1", 5, transfer_kind::usage, "job-j6");
  expect_violation(log, invariant::job_bill, "ledger", log.versions["ledger"], position,
                   {"\"job-j6/extra\"", "not in the bill"});
}

TEST(domain_verifier_bill, a_group_that_applies_part_of_the_bill_is_named_at_the_end) {
  auto log = sound_log();
  add_billed_job(log, "j6", j6_bill());
  const auto position = log.transfer("job-j6/usage", "user-ada", "provider-p1", 700, transfer_kind::usage, "job-j6");
  const auto version = log.versions["ledger"];
  log.transfer("deposit-dep-2", "external", "user-ada", 5, transfer_kind::deposit);  // the next group
  expect_violation(log, invariant::job_bill, "ledger", version, position, {"\"job-j6\"", "lacks", "\"job-j6/fee\""});
}

TEST(domain_verifier_bill, a_group_moving_money_for_a_job_that_failed_is_named) {
  auto log = sound_log();
  log.add("job-j7", events::job_submitted{"j7", "ada", "llama", events::quality_tier::low, 10, 50, 0, true, "",
                                          t0 + 50});
  log.add("job-j7", events::job_queued{"j7", 1, t0 + 60 * second_us, t0 + 51});
  log.add("job-j7", events::job_failed{"j7", events::failure_reason::no_provider, "nobody", t0 + 52});
  ASSERT_TRUE(verify(log));
  const auto position = log.transfer("job-j7/usage", "user-ada", "provider-p1", 700, transfer_kind::usage, "job-j7");
  expect_violation(log, invariant::job_bill, "ledger", log.versions["ledger"], position,
                   {"\"job-j7/usage\"", "job that failed", "bills nothing"});
}

TEST(domain_verifier_bill, a_provider_paid_outside_the_group_of_a_job_that_ended_is_named) {
  // j2 is still queued; j-none never was; "bonus" is no job's group at all.
  for (const std::string group : {"job-j2", "job-j-none", "bonus"}) {
    auto log = sound_log();
    const auto position = log.transfer(group + "/usage", "user-ada", "provider-p1", 700, transfer_kind::usage, group);
    expect_violation(log, invariant::job_bill, "ledger", log.versions["ledger"], position,
                     {"\"" + group + "/usage\"", "pays for a job", "\"" + group + "\" is no job that ended"});
  }
}

TEST(domain_verifier_bill, a_bill_naming_another_jobs_group_is_refused) {
  auto log = sound_log();
  auto bill = j6_bill();
  bill.group_id = "job-j1";
  const auto completed = add_billed_job(log, "j6", bill);
  expect_violation(log, invariant::job_bill, "job-j6", 5, completed, {"\"job-j1\"", "not its own"});
}

TEST(domain_verifier_bill, a_bill_that_does_not_fit_its_job_is_named) {
  // j6 is ada's premium job, run on p1 alone. Each bill is applied as recorded, so only the check
  // of the bill against its job can tell.
  struct bad_case {
    events::billed_transfer transfer;
    std::vector<std::string> words;
  };
  const std::vector<bad_case> cases{
      {{"job-j6/usage", "user-bob", "provider-p1", 700, transfer_kind::usage, {}}, {"charges \"user-bob\"", "\"ada\""}},
      {{"job-j6/usage", "user-ada", "provider-p2", 700, transfer_kind::usage, {}}, {"\"provider-p2\"", "never ran on"}},
      {{"job-j6/subsidy", "subsidy", "provider-p1", 700, transfer_kind::free_tier_subsidy, {}}, {"premium job", "subsidy"}},
      {{"job-j6/fee", "provider-p2", "platform", 70, transfer_kind::platform_fee, {}}, {"fee from \"provider-p2\""}},
      {{"job-j6/ad", "campaign-c1", "platform", 5, transfer_kind::ad_spend, {}}, {"ad on a premium job"}},
      {{"job-j6/deposit", "external", "user-ada", 5, transfer_kind::deposit, {}}, {"is a deposit"}},
  };
  for (const auto& c : cases) {
    auto log = sound_log();
    const auto completed = add_billed_job(log, "j6", bill_of("job-j6", {c.transfer}));
    const auto& t = c.transfer;
    log.transfer(t.transfer_id, t.debit_account, t.credit_account, t.amount_micros, t.kind, "job-j6");
    auto words = c.words;
    words.push_back("\"" + t.transfer_id + "\"");
    expect_violation(log, invariant::job_bill, "job-j6", 5, completed, words);
  }
}

TEST(domain_verifier_bill, an_ad_billed_must_be_an_impression_of_its_job_recorded_at_its_price) {
  // j8, bob's free job on p1, was shown campaign c1's impression r8 (1,500 micro-USD) as it ended.
  const auto free_job_with_ad = [](event_log& log, const events::billed_transfer& ad) {
    log.add("campaign-c1", events::ad_reserved{"r8", "c1", "j8", "bob", 2'000, t0 + 45, t0 + 60 * second_us});
    log.add("campaign-c1", events::impression_recorded{"r8", "c1", "j8", "bob", 1'500, t0 + 46});
    const std::string stream = "job-j8";
    log.add(stream, events::job_submitted{"j8", "bob", "llama", events::quality_tier::low, 10, 50, 0, false, "", t0 + 50});
    log.add(stream, events::job_queued{"j8", 1, t0 + 60 * second_us, t0 + 51});
    log.add(stream, events::job_assigned{"j8", "p1", 1, t0 + 52});
    log.add(stream, events::job_started{"j8", "p1", t0 + 53});
    const events::ledger_bill bill{"job-j8",
                                   {{"job-j8/subsidy", "subsidy", "provider-p1", 30, transfer_kind::free_tier_subsidy, "j8"},
                                    {"job-j8/fee", "provider-p1", "platform", 3, transfer_kind::platform_fee, "j8"},
                                    ad}};
    return log.add(stream, events::job_completed{"j8", "p1", 10, 20, 20, 3, 10, t0 + 54, bill});
  };
  {
    auto log = sound_log();
    free_job_with_ad(log, {"job-j8/ad_spend", "campaign-c1", "platform", 1'500, transfer_kind::ad_spend, "r8"});
    auto verified = verify(log);
    ASSERT_TRUE(verified) << describe(verified.error());
  }
  struct bad_case {
    events::billed_transfer ad;
    std::vector<std::string> words;
  };
  const std::vector<bad_case> cases{
      {{"job-j8/ad_spend", "campaign-c1", "platform", 1'500, transfer_kind::ad_spend, "r9"},
       {"impression \"r9\"", "has not recorded"}},
      {{"job-j8/ad_spend", "campaign-c1", "platform", 1'800, transfer_kind::ad_spend, "r1"},
       {"impression \"r1\" of job \"j2\"", "not of this job"}},
      {{"job-j8/ad_spend", "campaign-c1", "platform", 1'600, transfer_kind::ad_spend, "r8"},
       {"1600 micro-USD", "recorded at 1500 micro-USD"}},
      {{"job-j8/ad_spend", "campaign-c2", "platform", 1'500, transfer_kind::ad_spend, "r8"}, {"no campaign"}},
  };
  for (const auto& c : cases) {
    auto log = sound_log();
    const auto completed = free_job_with_ad(log, c.ad);
    expect_violation(log, invariant::job_bill, "job-j8", 5, completed, c.words);
  }
}

/// Job `id` of bob's (free tier), completed on p1 after 10 prompt (of which `prompt_tokens_billed`
/// billed; 0: all) and 20 completion tokens with `free_tokens` recorded; returns the completion's
/// position.
std::uint64_t add_free_job(event_log& log, const std::string& id, std::uint32_t free_tokens, bool premium = false,
                           std::uint32_t prompt_tokens_billed = 0) {
  const std::string stream = "job-" + id;
  log.add(stream, events::job_submitted{id, "bob", "llama", events::quality_tier::low, 10, 50, 0, premium, "", t0 + 50});
  log.add(stream, events::job_queued{id, 1, t0 + 60 * second_us, t0 + 51});
  log.add(stream, events::job_assigned{id, "p1", 1, t0 + 52});
  log.add(stream, events::job_started{id, "p1", t0 + 53});
  return log.add(stream, events::job_completed{id, "p1", 10, 20, 20, 3, 10, t0 + 54, {}, free_tokens,
                                               prompt_tokens_billed});
}

TEST(domain_verifier_free_usage, usage_recorded_as_the_end_says_passes_and_usage_not_yet_recorded_is_counted) {
  auto log = sound_log();
  add_free_job(log, "j7", 30);
  log.add("user-bob", events::free_tokens_used{"bob", "j7", 30, t0 + 55});
  auto recorded = verify(log);
  ASSERT_TRUE(recorded) << describe(recorded.error());
  EXPECT_EQ(recorded->free_usage_unrecorded, 0u);

  // A stop between the job's end and its usage: nothing is wrong yet, serve records it.
  auto stopped = sound_log();
  add_free_job(stopped, "j7", 30);
  auto pending = verify(stopped);
  ASSERT_TRUE(pending) << describe(pending.error());
  EXPECT_EQ(pending->free_usage_unrecorded, 1u);
}

TEST(domain_verifier_free_usage, usage_of_other_tokens_than_the_end_counts_is_named) {
  auto log = sound_log();
  add_free_job(log, "j7", 30);
  const auto position = log.add("user-bob", events::free_tokens_used{"bob", "j7", 31, t0 + 55});
  expect_violation(log, invariant::free_usage, "user-bob", log.versions["user-bob"], position,
                   {"31 free tokens of job \"j7\"", "its end counts 30"});
}

TEST(domain_verifier_free_usage, an_end_counting_other_tokens_than_its_prompt_and_completion_is_named) {
  auto log = sound_log();
  const auto position = add_free_job(log, "j7", 29);
  expect_violation(log, invariant::free_usage, "job-j7", 5, position, {"counts 29 free tokens", "are 30"});
}

TEST(domain_verifier_free_usage, an_end_billing_the_backends_smaller_count_of_the_prompt_counts_that) {
  // Submitted with 10 prompt tokens (the estimate); the backend counted 7: 7 + 20 are counted.
  auto log = sound_log();
  add_free_job(log, "j8", 27, false, 7);
  log.add("user-bob", events::free_tokens_used{"bob", "j8", 27, t0 + 55});
  auto verified = verify(log);
  ASSERT_TRUE(verified) << describe(verified.error());

  auto wrong = sound_log();
  const auto position = add_free_job(wrong, "j8", 30, false, 7);
  expect_violation(wrong, invariant::free_usage, "job-j8", 5, position, {"counts 30 free tokens", "are 27"});
}

TEST(domain_verifier_free_usage, an_end_billing_more_of_the_prompt_than_was_estimated_is_named) {
  auto log = sound_log();
  const auto position = add_free_job(log, "j9", 0, true, 11);
  expect_violation(log, invariant::job_consistency, "job-j9", 5, position, {"billed 11 prompt tokens of its 10"});
}

TEST(domain_verifier_free_usage, a_premium_end_counting_free_tokens_is_named) {
  auto log = sound_log();
  const auto position = add_free_job(log, "j7", 30, true);
  expect_violation(log, invariant::free_usage, "job-j7", 5, position, {"premium job \"j7\"", "counts none"});
}

TEST(domain_verifier_stream, an_event_in_a_stream_of_another_kind_is_refused) {
  auto log = sound_log();
  const auto position = log.add("user-ada", events::job_submitted{"ada", "ada", "llama", events::quality_tier::low,
                                                                  10, 10, 0, false, "", t0 + 50});
  expect_violation(log, invariant::stream_kind, "user-ada", 4, position, {"job_submitted", "job stream", "user stream"});
}

TEST(domain_verifier_stream, a_ledger_event_outside_the_ledger_is_refused) {
  auto log = sound_log();
  const auto position = log.add("payout-po1", events::transfer_recorded{"x", "external", "user-ada", 1,
                                                                        transfer_kind::deposit, "", "x", t0});
  expect_violation(log, invariant::stream_kind, "payout-po1", 3, position, {"transfer_recorded", "ledger stream"});
}

TEST(domain_verifier_stream, an_unknown_stream_prefix_is_refused) {
  auto log = sound_log();
  const auto position = log.add("other-1", events::user_created{"1", "x", events::user_tier::free, t0});
  expect_violation(log, invariant::stream_kind, "other-1", 1, position, {"\"other-1\"", "no known kind"});
}

TEST(domain_verifier_stream, an_event_naming_another_aggregate_is_refused) {
  auto log = sound_log();
  const auto position = log.add("user-ada", events::user_credited{"bob", "dep-9", 5, t0 + 50});
  expect_violation(log, invariant::stream_kind, "user-ada", 4, position, {"\"bob\"", "\"ada\""});
}

TEST(domain_verifier_stream, a_version_gap_is_refused) {
  auto log = sound_log();
  log.add("user-bob", events::user_tier_changed{"bob", events::user_tier::premium, t0 + 50});
  log.entries.back().version = 4;  // 3 was skipped
  expect_violation(log, invariant::log_order, "user-bob", 4, log.entries.size(), {"version 4 follows version 2"});
}

TEST(domain_verifier_stream, a_position_that_does_not_increase_is_refused) {
  auto log = sound_log();
  log.add("user-bob", events::user_tier_changed{"bob", events::user_tier::premium, t0 + 50});
  log.entries.back().position = 3;
  expect_violation(log, invariant::log_order, "user-bob", 3, 3, {"position 3"});
}

TEST(domain_verifier_lifecycle, a_user_stream_must_open_with_its_creation) {
  event_log log;
  const auto position = log.add("user-eve", events::user_credited{"eve", "dep-1", 5, t0});
  expect_violation(log, invariant::aggregate_lifecycle, "user-eve", 1, position, {"user_credited", "user_created"});
}

TEST(domain_verifier_lifecycle, a_second_creation_is_refused) {
  auto log = sound_log();
  const auto position = log.add("provider-p1", events::provider_created{"p1", "carol", "again", {7}, t0 + 50});
  expect_violation(log, invariant::aggregate_lifecycle, "provider-p1", 3, position, {"provider_created again"});
}

TEST(domain_verifier_lifecycle, revoking_a_key_never_issued_does_not_apply) {
  auto log = sound_log();
  const auto position = log.add("user-ada", events::api_key_revoked{"ada", "k9", "lost", t0 + 50});
  expect_violation(log, invariant::aggregate_lifecycle, "user-ada", 4, position, {"\"k9\"", "never issued"});
}

TEST(domain_verifier_lifecycle, crediting_a_deposit_twice_does_not_apply) {
  auto log = sound_log();
  const auto position = log.add("user-ada", events::user_credited{"ada", "dep-1", 10'000'000, t0 + 50});
  expect_violation(log, invariant::aggregate_lifecycle, "user-ada", 4, position, {"\"dep-1\"", "credited before"});
}

// ---- the verifier itself -------------------------------------------------------------------------

TEST(domain_verifier, stops_at_the_first_violation_and_repeats_it) {
  auto log = sound_log();
  log.add("other-1", events::user_created{"1", "x", events::user_tier::free, t0});
  domain_verifier verifier;
  verify_violation first;
  for (const auto& e : log.entries) {
    auto ok = verifier.apply(e.stream, e.version, e.position, e.event);
    if (!ok) {
      first = ok.error();
      break;
    }
  }
  EXPECT_EQ(first.stream, "other-1");
  // A sound event afterwards changes nothing: the first violation stands.
  auto again = verifier.apply("user-zed", 1, 1'000, events::user_created{"zed", "z", events::user_tier::free, t0});
  ASSERT_FALSE(again);
  EXPECT_EQ(again.error().stream, "other-1");
  auto finished = verifier.finish();
  ASSERT_FALSE(finished);
  EXPECT_EQ(finished.error().stream, "other-1");
}

TEST(domain_verifier, state_of_is_the_state_at_the_version_just_applied) {
  domain_verifier verifier;
  ASSERT_TRUE(verifier.apply("job-j1", 1, 1,
                             events::job_submitted{"j1", "ada", "m", events::quality_tier::low, 1, 1, 0, false, "", t0}));
  ASSERT_TRUE(verifier.apply("job-j1", 2, 2, events::job_queued{"j1", 1, t0 + second_us, t0}));
  const auto* queued = std::get<const job_state*>(verifier.state_of("job-j1"));
  EXPECT_EQ(queued->status, job_status::queued);
  ASSERT_TRUE(verifier.apply("job-j1", 3, 3, events::job_failed{"j1", events::failure_reason::internal, "", t0}));
  // Right after the terminal event the state is still readable (a snapshot may be taken there) ...
  const auto* failed = std::get<const job_state*>(verifier.state_of("job-j1"));
  EXPECT_EQ(failed->status, job_status::failed);
  EXPECT_EQ(verifier.version_of("job-j1"), 3u);
  // ... and once the next event is applied, the ended job is reduced to its status.
  ASSERT_TRUE(verifier.apply("user-ada", 1, 4, events::user_created{"ada", "A", events::user_tier::free, t0}));
  EXPECT_TRUE(std::holds_alternative<std::monostate>(verifier.state_of("job-j1")));
  EXPECT_EQ(verifier.version_of("job-j1"), 3u);
  EXPECT_TRUE(std::holds_alternative<const user_state*>(verifier.state_of("user-ada")));
  EXPECT_TRUE(std::holds_alternative<std::monostate>(verifier.state_of("user-nobody")));
  EXPECT_TRUE(std::holds_alternative<std::monostate>(verifier.state_of("ledger")));
  EXPECT_EQ(verifier.version_of("user-nobody"), 0u);
  auto counts = verifier.finish();
  ASSERT_TRUE(counts) << describe(counts.error());
  EXPECT_EQ(counts->jobs_by_status[static_cast<std::size_t>(job_status::failed)], 1u);
}

TEST(domain_verifier, the_rebuilt_ledger_equals_the_ledger_evolved_directly) {
  const auto log = sound_log();
  domain_verifier verifier;
  ledger::state direct;
  for (const auto& e : log.entries) {
    ASSERT_TRUE(verifier.apply(e.stream, e.version, e.position, e.event));
    if (e.stream == "ledger") direct = ledger::evolve(std::move(direct), e.event);
  }
  const auto* rebuilt = std::get<const ledger::state*>(verifier.state_of("ledger"));
  EXPECT_EQ(*rebuilt, direct);
}

TEST(classify_stream, knows_each_prefix_and_the_ledger) {
  const std::vector<std::pair<std::string, stream_kind>> known{
      {"user-a", stream_kind::user},         {"provider-p", stream_kind::provider}, {"job-j-1", stream_kind::job},
      {"campaign-c", stream_kind::campaign}, {"payout-x", stream_kind::payout},     {"ledger", stream_kind::ledger}};
  for (const auto& [stream, kind] : known) {
    auto name = classify_stream(stream);
    ASSERT_TRUE(name) << stream;
    EXPECT_EQ(name->kind, kind) << stream;
  }
  EXPECT_EQ(classify_stream("job-j-1")->id, "j-1");
  for (const std::string bad : {"user-", "ledger-1", "users-a", "", "Job-1"}) {
    auto name = classify_stream(bad);
    ASSERT_FALSE(name) << bad;
    EXPECT_EQ(name.error().code, errc::invalid_argument);
  }
}

TEST(stream_kind_of, matches_the_stream_each_event_type_lives_in) {
  EXPECT_EQ(stream_kind_of(events::free_tokens_used{}), stream_kind::user);
  EXPECT_EQ(stream_kind_of(events::suspicion_recorded{}), stream_kind::provider);
  EXPECT_EQ(stream_kind_of(events::job_cancelled{}), stream_kind::job);
  EXPECT_EQ(stream_kind_of(events::ad_reservation_released{}), stream_kind::campaign);
  EXPECT_EQ(stream_kind_of(events::transfer_recorded{}), stream_kind::ledger);
  EXPECT_EQ(stream_kind_of(events::payout_failed{}), stream_kind::payout);
}

TEST(describe, names_the_invariant_stream_version_and_position) {
  const verify_violation v{invariant::campaign_budget, "campaign-c1", 7, 42, "spent too much"};
  EXPECT_EQ(describe(v),
            "invariant campaign_budget violated in stream \"campaign-c1\" at version 7 (position 42): spent too much");
}

// ---- a seeded property: random sound logs pass, and one corrupted amount is caught -------------

std::uint64_t seed_from_env() {
  if (const char* text = std::getenv("GPUSTREAM_SEED")) return std::strtoull(text, nullptr, 10);
  return std::random_device{}();
}

/// Deposits for `users` users, then jobs that each end and bill a random part of what their user
/// has left, with the platform's fee; the provider is paid out part of its earnings.
event_log random_sound_log(std::mt19937_64& random, int users, int jobs) {
  event_log log;
  log.add("provider-p", events::provider_created{"p", "o", "gpu", {1}, t0});
  std::vector<std::int64_t> left(static_cast<std::size_t>(users));
  for (int u = 0; u < users; ++u) {
    const auto id = "u" + std::to_string(u);
    log.add("user-" + id, events::user_created{id, id, events::user_tier::premium, t0});
    left[static_cast<std::size_t>(u)] = std::uniform_int_distribution<std::int64_t>(1, 1'000'000)(random);
    log.transfer("deposit-" + id, "external", "user-" + id, left[static_cast<std::size_t>(u)], transfer_kind::deposit);
  }
  std::int64_t earned = 0;
  for (int j = 0; j < jobs; ++j) {
    const auto u = std::uniform_int_distribution<int>(0, users - 1)(random);
    auto& balance = left[static_cast<std::size_t>(u)];
    if (balance < 10) continue;
    const auto price = std::uniform_int_distribution<std::int64_t>(10, balance)(random);
    balance -= price;
    const auto id = std::to_string(j);
    const auto group = "job-" + id;
    // The job's end, recorded before its settlement moves the money (no bill: an older build's).
    log.add(group, events::job_submitted{id, "u" + std::to_string(u), "llama", events::quality_tier::low, 10, 50, 0,
                                         true, "", t0 + 50});
    log.add(group, events::job_queued{id, 1, t0 + 60 * second_us, t0 + 51});
    log.add(group, events::job_assigned{id, "p", 1, t0 + 52});
    log.add(group, events::job_started{id, "p", t0 + 53});
    log.add(group, events::job_completed{id, "p", 10, 20, 20, 3, 10, t0 + 54});
    log.transfer(group + "/usage", "user-u" + std::to_string(u), "provider-p", price, transfer_kind::usage, group);
    log.transfer(group + "/fee", "provider-p", "platform", price / 10, transfer_kind::platform_fee, group);
    earned += price - price / 10;
  }
  if (earned > 0) {
    const auto amount = std::uniform_int_distribution<std::int64_t>(1, earned)(random);
    log.transfer("payout-x/request", "provider-p", "payouts_in_flight", amount, transfer_kind::payout);
    log.add("payout-x", events::payout_requested{"x", "p", amount, true, t0});
  }
  return log;
}

TEST(domain_verifier_property, random_sound_logs_pass_and_an_inflated_usage_is_caught) {
  const auto seed = seed_from_env();
  SCOPED_TRACE("GPUSTREAM_SEED=" + std::to_string(seed));
  std::cout << "GPUSTREAM_SEED=" << seed << "\n";
  std::mt19937_64 random(seed);
  for (int round = 0; round < 50; ++round) {
    auto log = random_sound_log(random, 1 + round % 7, 5 + round);
    auto counts = verify(log);
    ASSERT_TRUE(counts) << "round " << round << ": " << describe(counts.error());
    EXPECT_EQ(counts->users, static_cast<std::uint64_t>(1 + round % 7));

    // Inflate one usage transfer by more than its user ever deposited: that user goes negative.
    std::vector<std::size_t> usages;
    for (std::size_t i = 0; i < log.entries.size(); ++i) {
      const auto* t = std::get_if<events::transfer_recorded>(&log.entries[i].event);
      if (t != nullptr && t->kind == transfer_kind::usage) usages.push_back(i);
    }
    if (usages.empty()) continue;
    const auto victim = usages[std::uniform_int_distribution<std::size_t>(0, usages.size() - 1)(random)];
    auto& inflated = std::get<events::transfer_recorded>(log.entries[victim].event);
    inflated.amount_micros += 1'000'001;
    auto broken = verify(log);
    ASSERT_FALSE(broken) << "round " << round << ": an inflated usage passed";
    EXPECT_EQ(broken.error().broken, invariant::ledger) << describe(broken.error());
    EXPECT_NE(broken.error().message.find(inflated.debit_account), std::string::npos) << describe(broken.error());
    EXPECT_LE(broken.error().position, log.entries[victim].position + 1) << describe(broken.error());
  }
}

}  // namespace
}  // namespace gpustream::domain
