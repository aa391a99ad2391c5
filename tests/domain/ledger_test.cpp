// The ledger: account names, routes, all-or-nothing groups, idempotency, limits, invariant checks,
// the verifier, and a seeded property test of deposits, jobs and payouts through decide+evolve.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <iostream>
#include <limits>
#include <map>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "domain/ledger.hpp"
#include "domain/payout.hpp"
#include "domain/pricing.hpp"

namespace gpustream::domain {
namespace {

using events::transfer_kind;
using events::transfer_recorded;

constexpr std::int64_t int64_max = std::numeric_limits<std::int64_t>::max();

/// A ledger with its log: decide, then evolve what was decided.
struct book {
  ledger::state state;
  std::vector<events::event> log;
  std::int64_t now_us = 1'700'000'000'000'000;

  decision run(const record_transfers& command) {
    auto decided = ledger::decide(state, command, ++now_us);
    if (decided) {
      for (const auto& event : *decided) {
        state = ledger::evolve(std::move(state), event);
        log.push_back(event);
      }
    }
    return decided;
  }

  std::int64_t balance(std::string_view account) const { return balance_micros(state, account); }
};

transfer make_transfer(std::string id, std::string debit, std::string credit, std::int64_t amount,
                       transfer_kind kind) {
  return transfer{std::move(id), std::move(debit), std::move(credit), amount, kind, "ref"};
}

record_transfers one_transfer(std::string id, std::string debit, std::string credit,
                              std::int64_t amount, transfer_kind kind) {
  return record_transfers{id, {make_transfer(id, std::move(debit), std::move(credit), amount, kind)}};
}

bool contains(const std::string& text, std::string_view part) {
  return text.find(part) != std::string::npos;
}

void expect_refused(const decision& d, errc code, std::initializer_list<std::string_view> parts) {
  ASSERT_FALSE(d.has_value());
  EXPECT_EQ(d.error().code, code) << d.error().message;
  for (auto part : parts) EXPECT_TRUE(contains(d.error().message, part)) << d.error().message;
}

// ---------------------------------------------------------------------------------------------
// Accounts and routes.

TEST(ledger_accounts, classify_every_kind_and_derive_the_negative_flag) {
  struct row {
    std::string name;
    account_kind kind;
    std::string_view owner;
    bool negative_allowed;
  };
  const row rows[] = {
      {"user-7", account_kind::user, "7", false},
      {"provider-gpu-1", account_kind::provider, "gpu-1", false},
      {"campaign-c", account_kind::campaign, "c", false},
      {"payouts_in_flight", account_kind::payouts_in_flight, "", false},
      {"platform", account_kind::platform, "", true},
      {"subsidy", account_kind::subsidy, "", true},
      {"external", account_kind::external, "", true},
  };
  for (const auto& r : rows) {
    const auto info = classify_account(r.name);
    ASSERT_TRUE(info.has_value()) << r.name;
    EXPECT_EQ(info->kind, r.kind) << r.name;
    EXPECT_EQ(info->owner_id, r.owner) << r.name;
    EXPECT_EQ(may_go_negative(info->kind), r.negative_allowed) << r.name;
  }
  EXPECT_EQ(user_account("7"), "user-7");
  EXPECT_EQ(provider_account("p"), "provider-p");
  EXPECT_EQ(campaign_account("c"), "campaign-c");
}

TEST(ledger_accounts, refuse_unknown_names_missing_ids_and_long_names) {
  for (std::string_view bad : {"bank", "", "user-", "provider-", "campaign-", "User-1", "platforms"}) {
    const auto info = classify_account(bad);
    ASSERT_FALSE(info.has_value()) << bad;
    EXPECT_EQ(info.error().code, errc::invalid_argument);
  }
  EXPECT_TRUE(contains(classify_account("bank").error().message, "\"bank\""));
  EXPECT_TRUE(contains(classify_account("user-").error().message, "lacks the id"));
  const std::string longest = "user-" + std::string(ledger_id_length_max - 5, 'x');
  EXPECT_TRUE(classify_account(longest).has_value());
  const auto too_long = classify_account(longest + "x");
  ASSERT_FALSE(too_long.has_value());
  EXPECT_TRUE(contains(too_long.error().message, "ledger_id_length_max"));
}

TEST(ledger_accounts, routes_allow_exactly_the_documented_movements) {
  using k = account_kind;
  using t = transfer_kind;
  const std::vector<std::tuple<t, k, k>> allowed = {
      {t::usage, k::user, k::provider},
      {t::platform_fee, k::provider, k::platform},
      {t::free_tier_subsidy, k::subsidy, k::provider},
      {t::ad_spend, k::campaign, k::platform},
      {t::deposit, k::external, k::user},
      {t::deposit, k::external, k::campaign},
      {t::payout, k::provider, k::payouts_in_flight},
      {t::payout, k::payouts_in_flight, k::external},
      {t::payout, k::payouts_in_flight, k::provider},
  };
  int allowed_count = 0;
  for (int kind = 0; kind <= static_cast<int>(t::payout); ++kind) {
    for (int debit = 0; debit <= static_cast<int>(k::payouts_in_flight); ++debit) {
      for (int credit = 0; credit <= static_cast<int>(k::payouts_in_flight); ++credit) {
        const std::tuple<t, k, k> route{static_cast<t>(kind), static_cast<k>(debit),
                                        static_cast<k>(credit)};
        const bool listed = std::find(allowed.begin(), allowed.end(), route) != allowed.end();
        EXPECT_EQ(route_allowed(std::get<0>(route), std::get<1>(route), std::get<2>(route)), listed)
            << kind << " " << debit << " " << credit;
        allowed_count += listed ? 1 : 0;
      }
    }
  }
  EXPECT_EQ(allowed_count, 9);
}

// ---------------------------------------------------------------------------------------------
// Deciding groups.

TEST(ledger_decide, a_deposit_becomes_one_event_with_the_group_and_time) {
  book b;
  const auto d = b.run(user_deposit("d1", "u1", 5'000'000));
  ASSERT_TRUE(d.has_value()) << d.error().message;
  ASSERT_EQ(d->size(), 1u);
  const auto& t = std::get<transfer_recorded>(d->front());
  EXPECT_EQ(t.transfer_id, "deposit-d1");
  EXPECT_EQ(t.linked_group_id, "deposit-d1");
  EXPECT_EQ(t.debit_account, "external");
  EXPECT_EQ(t.credit_account, "user-u1");
  EXPECT_EQ(t.amount_micros, 5'000'000);
  EXPECT_EQ(t.kind, transfer_kind::deposit);
  EXPECT_EQ(t.reference, "d1");
  EXPECT_EQ(t.recorded_at_us, b.now_us);
  EXPECT_EQ(b.balance("user-u1"), 5'000'000);
  EXPECT_EQ(b.balance("external"), -5'000'000);
  EXPECT_EQ(b.state.balance_total_micros, 0);

  const auto campaign = campaign_deposit("f1", "c9", 3);
  ASSERT_EQ(campaign.transfers.size(), 1u);
  EXPECT_EQ(campaign.transfers[0].credit_account, "campaign-c9");
}

TEST(ledger_decide, retrying_an_applied_group_decides_nothing) {
  book b;
  ASSERT_TRUE(b.run(user_deposit("d1", "u1", 100)).has_value());
  const auto again = b.run(user_deposit("d1", "u1", 100));
  ASSERT_TRUE(again.has_value()) << again.error().message;
  EXPECT_TRUE(again->empty());
  EXPECT_EQ(b.balance("user-u1"), 100);
}

TEST(ledger_decide, an_applied_id_with_other_content_is_already_exists) {
  book b;
  ASSERT_TRUE(b.run(user_deposit("d1", "u1", 100)).has_value());
  expect_refused(b.run(user_deposit("d1", "u1", 101)), errc::already_exists,
                 {"\"deposit-d1\"", "100 micro-USD"});
  auto other_group = user_deposit("d1", "u1", 100);
  other_group.group_id = "another";
  expect_refused(b.run(other_group), errc::already_exists, {"\"deposit-d1\""});
  EXPECT_EQ(b.balance("user-u1"), 100);
}

TEST(ledger_decide, a_partly_applied_group_is_invalid_state) {
  book b;
  ASSERT_TRUE(b.run(user_deposit("d1", "u1", 100)).has_value());
  auto grown = user_deposit("d1", "u1", 100);
  grown.transfers.push_back(make_transfer("deposit-d1/extra", "external", "user-u1", 5,
                                          transfer_kind::deposit));
  grown.transfers.back().reference = "d1";
  expect_refused(b.run(grown), errc::invalid_state,
                 {"partly applied", "\"deposit-d1\"", "\"deposit-d1/extra\""});
  EXPECT_EQ(b.balance("user-u1"), 100);
}

TEST(ledger_decide, a_retry_listing_part_of_an_applied_group_is_already_exists) {
  // Applied with two transfers; a retry that lists only the first would read as carried out while
  // the ledger moved the second as well.
  book b;
  auto whole = user_deposit("d1", "u1", 100);
  whole.transfers.push_back(make_transfer("deposit-d1/extra", "external", "user-u1", 5, transfer_kind::deposit));
  whole.transfers.back().reference = "d1";
  ASSERT_TRUE(b.run(whole).has_value());
  expect_refused(b.run(user_deposit("d1", "u1", 100)), errc::already_exists,
                 {"\"deposit-d1\"", "applied with 2 transfers", "not the 1"});
  const auto again = b.run(whole);
  ASSERT_TRUE(again.has_value()) << again.error().message;
  EXPECT_TRUE(again->empty());
  EXPECT_EQ(b.balance("user-u1"), 105);
}

TEST(ledger_decide, a_reused_group_id_is_already_exists) {
  book b;
  ASSERT_TRUE(b.run(user_deposit("d1", "u1", 100)).has_value());
  auto reuse = one_transfer("fresh", "external", "user-u1", 7, transfer_kind::deposit);
  reuse.group_id = "deposit-d1";
  expect_refused(b.run(reuse), errc::already_exists, {"\"deposit-d1\"", "already used"});
}

TEST(ledger_decide, malformed_transfers_are_invalid_argument) {
  book b;
  ASSERT_TRUE(b.run(user_deposit("d1", "u1", 100)).has_value());
  const std::string long_id(ledger_id_length_max + 1, 'i');
  struct bad_case {
    record_transfers command;
    std::string_view expected_part;
  };
  std::vector<bad_case> cases = {
      {one_transfer("t", "user-u1", "provider-p", 0, transfer_kind::usage), "must be positive"},
      {one_transfer("t", "user-u1", "provider-p", -5, transfer_kind::usage), "-5 micro-USD"},
      {one_transfer("t", "user-u1", "user-u1", 5, transfer_kind::usage), "same account"},
      {one_transfer("t", "user-u1", "bank", 5, transfer_kind::usage), "unknown account \"bank\""},
      {one_transfer("t", "user-u1", "platform", 5, transfer_kind::usage), "may not move money"},
      {one_transfer("t", "external", "provider-p", 5, transfer_kind::deposit),
       "may not move money"},
      {record_transfers{"g", {make_transfer("", "user-u1", "provider-p", 5, transfer_kind::usage)}},
       "empty transfer id"},
      {one_transfer(long_id, "user-u1", "provider-p", 5, transfer_kind::usage),
       "ledger_id_length_max"},
      {record_transfers{"", {make_transfer("t", "user-u1", "provider-p", 5, transfer_kind::usage)}},
       "non-empty group id"},
      {record_transfers{long_id, {make_transfer("t", "user-u1", "provider-p", 5,
                                                transfer_kind::usage)}},
       "ledger_id_length_max"},
      {record_transfers{"g", {}}, "no transfers"},
      {record_transfers{"g",
                        {make_transfer("t", "user-u1", "provider-p", 5, transfer_kind::usage),
                         make_transfer("t", "user-u1", "provider-p", 5, transfer_kind::usage)}},
       "twice"},
  };
  auto long_reference = one_transfer("t", "user-u1", "provider-p", 5, transfer_kind::usage);
  long_reference.transfers[0].reference = long_id;
  cases.push_back({long_reference, "reference"});
  for (const auto& c : cases) {
    SCOPED_TRACE(std::string(c.expected_part));
    expect_refused(b.run(c.command), errc::invalid_argument, {c.expected_part});
  }
  EXPECT_EQ(b.log.size(), 1u);
  EXPECT_EQ(b.balance("user-u1"), 100);
}

TEST(ledger_decide, transfers_per_group_max_is_the_largest_group) {
  book b;
  record_transfers group{"big", {}};
  for (std::size_t i = 0; i < transfers_per_group_max; ++i) {
    group.transfers.push_back(make_transfer("big/" + std::to_string(i), "external", "user-u1", 1,
                                            transfer_kind::deposit));
  }
  auto too_big = group;
  too_big.group_id = "bigger";
  for (auto& t : too_big.transfers) t.transfer_id = "bigger/" + t.transfer_id;
  too_big.transfers.push_back(make_transfer("bigger/last", "external", "user-u1", 1,
                                            transfer_kind::deposit));
  expect_refused(b.run(too_big), errc::limit_exceeded,
                 {"transfers_per_group_max", std::to_string(transfers_per_group_max + 1)});
  const auto d = b.run(group);
  ASSERT_TRUE(d.has_value()) << d.error().message;
  EXPECT_EQ(d->size(), transfers_per_group_max);
  EXPECT_EQ(b.balance("user-u1"), static_cast<std::int64_t>(transfers_per_group_max));
}

TEST(ledger_decide, insufficient_funds_names_account_balance_and_amount_and_applies_nothing) {
  book b;
  ASSERT_TRUE(b.run(user_deposit("d1", "u1", 5)).has_value());
  expect_refused(b.run(one_transfer("job-1/usage", "user-u1", "provider-p", 10,
                                    transfer_kind::usage)),
                 errc::insufficient_funds, {"\"user-u1\"", "5 micro-USD", "10 micro-USD",
                                            "\"job-1/usage\""});
  // The second transfer of a group sees the first: 3 + 3 > 5, so neither is applied.
  record_transfers group{"job-2", {make_transfer("job-2/a", "user-u1", "provider-p", 3,
                                                 transfer_kind::usage),
                                   make_transfer("job-2/b", "user-u1", "provider-q", 3,
                                                 transfer_kind::usage)}};
  expect_refused(b.run(group), errc::insufficient_funds, {"\"user-u1\"", "2 micro-USD", "\"job-2/b\""});
  EXPECT_EQ(b.balance("user-u1"), 5);
  EXPECT_EQ(b.balance("provider-p"), 0);
  EXPECT_EQ(b.log.size(), 1u);
  // Exactly the balance is fine.
  ASSERT_TRUE(b.run(one_transfer("job-3/usage", "user-u1", "provider-p", 5, transfer_kind::usage))
                  .has_value());
  EXPECT_EQ(b.balance("user-u1"), 0);
}

TEST(ledger_decide, checks_balances_in_group_order) {
  book b;
  // The provider pays its fee out of the money the same group brings in: in this order it works,
  // in the other order the provider would dip below zero first.
  ASSERT_TRUE(b.run(user_deposit("d1", "u1", 100)).has_value());
  record_transfers good{"job-1", {make_transfer("job-1/usage", "user-u1", "provider-p", 100,
                                                transfer_kind::usage),
                                  make_transfer("job-1/platform_fee", "provider-p", "platform", 10,
                                                transfer_kind::platform_fee)}};
  record_transfers reversed{"job-2", {good.transfers[1], good.transfers[0]}};
  for (auto& t : reversed.transfers) t.transfer_id = "job-2/" + t.transfer_id.substr(6);
  expect_refused(b.run(reversed), errc::insufficient_funds, {"\"provider-p\"", "\"job-2/platform_fee\""});
  ASSERT_TRUE(b.run(good).has_value());
  EXPECT_EQ(b.balance("provider-p"), 90);
  EXPECT_EQ(b.balance("platform"), 10);
}

TEST(ledger_decide, platform_subsidy_and_external_may_go_negative) {
  book b;
  ASSERT_TRUE(b.run(one_transfer("s", "subsidy", "provider-p", 50, transfer_kind::free_tier_subsidy))
                  .has_value());
  EXPECT_EQ(b.balance("subsidy"), -50);
  EXPECT_EQ(b.balance("external"), 0);
  ASSERT_TRUE(b.run(user_deposit("d", "u", 7)).has_value());
  EXPECT_EQ(b.balance("external"), -7);
}

TEST(ledger_decide, a_balance_that_would_overflow_is_limit_exceeded) {
  book b;
  ASSERT_TRUE(b.run(user_deposit("d1", "u1", int64_max)).has_value());
  EXPECT_EQ(b.balance("external"), -int64_max);
  expect_refused(b.run(user_deposit("d2", "u2", 2)), errc::limit_exceeded, {"\"external\"", "overflow"});
  ASSERT_TRUE(b.run(one_transfer("use", "user-u1", "provider-p", int64_max, transfer_kind::usage))
                  .has_value());
  expect_refused(b.run(one_transfer("more", "subsidy", "provider-p", 1,
                                    transfer_kind::free_tier_subsidy)),
                 errc::limit_exceeded, {"\"provider-p\"", "overflow"});
  EXPECT_TRUE(check_ledger(b.state).has_value());
}

// ---------------------------------------------------------------------------------------------
// Evolve.

TEST(ledger_evolve, ignores_other_events_repeated_ids_and_transfers_that_cannot_apply) {
  book b;
  ASSERT_TRUE(b.run(user_deposit("d1", "u1", 100)).has_value());
  const auto before = b.state;
  auto same = ledger::evolve(b.state, b.log.front());
  EXPECT_EQ(same, before);
  same = ledger::evolve(same, events::event{events::payout_failed{"x", "r", 1}});
  EXPECT_EQ(same, before);
  transfer_recorded zero{"z", "external", "user-u1", 0, transfer_kind::deposit, "", "g", 1};
  EXPECT_EQ(ledger::evolve(same, events::event{zero}), before);
  transfer_recorded self{"s", "user-u1", "user-u1", 5, transfer_kind::deposit, "", "g", 1};
  EXPECT_EQ(ledger::evolve(same, events::event{self}), before);
  transfer_recorded overflow{"o", "user-u2", "user-u1", int64_max, transfer_kind::usage, "", "g", 1};
  EXPECT_EQ(ledger::evolve(same, events::event{overflow}), before);
}

TEST(ledger_evolve, keeps_provider_earnings_and_payouts_apart) {
  book b;
  ASSERT_TRUE(b.run(user_deposit("d1", "u1", 1000)).has_value());
  ASSERT_TRUE(b.run(record_transfers{"job-1", {make_transfer("job-1/usage", "user-u1", "provider-p",
                                                             1000, transfer_kind::usage),
                                               make_transfer("job-1/fee", "provider-p", "platform",
                                                             100, transfer_kind::platform_fee)}})
                  .has_value());
  ASSERT_TRUE(b.run(payout_request_transfers("po1", "p", 600)).has_value());
  ASSERT_TRUE(b.run(payout_fail_transfers("po1", "p", 600)).has_value());
  ASSERT_TRUE(b.run(payout_request_transfers("po2", "p", 500)).has_value());
  ASSERT_TRUE(b.run(payout_settle_transfers("po2", 500)).has_value());
  const auto& totals = b.state.providers.at("provider-p");
  EXPECT_EQ(totals.earned_micros, 900);
  EXPECT_EQ(totals.paid_out_micros, 500);
  EXPECT_EQ(b.balance("provider-p"), 400);
  EXPECT_EQ(b.balance("payouts_in_flight"), 0);
  EXPECT_EQ(b.balance("external"), -500);
  EXPECT_EQ(b.state.group_sizes.at("job-1"), 2u);
  EXPECT_TRUE(check_ledger(b.state).has_value());
}

// ---------------------------------------------------------------------------------------------
// Invariant checks on states that decide would never produce.

ledger::state sound_state() {
  book b;
  EXPECT_TRUE(b.run(user_deposit("d1", "u1", 100)).has_value());
  EXPECT_TRUE(b.run(one_transfer("job-1/usage", "user-u1", "provider-p", 60, transfer_kind::usage))
                  .has_value());
  return b.state;
}

TEST(ledger_invariants, a_sound_ledger_passes_both_checks) {
  const auto state = sound_state();
  EXPECT_TRUE(check_ledger(state).has_value());
  const std::vector<std::string> touched = {"user-u1", "provider-p"};
  EXPECT_TRUE(check_accounts(state, touched).has_value());
}

TEST(ledger_invariants, a_forbidden_negative_balance_is_reported_by_name_and_amount) {
  auto state = sound_state();
  state.balances_micros["user-u1"] = -3;
  state.balances_micros["external"] = -97;
  const std::vector<std::string> touched = {"user-u1"};
  const auto incremental = check_accounts(state, touched);
  ASSERT_FALSE(incremental.has_value());
  EXPECT_TRUE(contains(incremental.error().message, "\"user-u1\" holds -3 micro-USD"));
  const auto full = check_ledger(state);
  ASSERT_FALSE(full.has_value());
  EXPECT_TRUE(contains(full.error().message, "\"user-u1\""));
  // The incremental check looks only at what it is given.
  const std::vector<std::string> untouched = {"provider-p"};
  EXPECT_TRUE(check_accounts(state, untouched).has_value());
}

TEST(ledger_invariants, balances_that_do_not_sum_to_zero_are_reported) {
  auto state = sound_state();
  state.balances_micros["platform"] = 5;  // as if a fold moved only one side
  const auto full = check_ledger(state);
  ASSERT_FALSE(full.has_value());
  EXPECT_TRUE(contains(full.error().message, "sum to 5 micro-USD")) << full.error().message;
  state.balance_total_micros = 5;
  const std::vector<std::string> none;
  const auto incremental = check_accounts(state, none);
  ASSERT_FALSE(incremental.has_value());
  EXPECT_TRUE(contains(incremental.error().message, "running total"));
}

TEST(ledger_invariants, a_provider_paid_more_than_it_earned_is_reported) {
  auto state = sound_state();
  state.providers["provider-p"].paid_out_micros = 61;
  const std::vector<std::string> touched = {"provider-p"};
  const auto incremental = check_accounts(state, touched);
  ASSERT_FALSE(incremental.has_value());
  EXPECT_TRUE(contains(incremental.error().message, "paid out 61 micro-USD but earned only 60"))
      << incremental.error().message;
  EXPECT_FALSE(check_ledger(state).has_value());
}

TEST(ledger_invariants, full_check_reports_unknown_accounts_and_lost_group_members) {
  auto unknown = sound_state();
  unknown.balances_micros["bank"] = 0;
  const auto bank = check_ledger(unknown);
  ASSERT_FALSE(bank.has_value());
  EXPECT_TRUE(contains(bank.error().message, "\"bank\""));

  auto lost = sound_state();
  lost.group_sizes["job-1/usage"] = 2;
  const auto groups = check_ledger(lost);
  ASSERT_FALSE(groups.has_value());
  EXPECT_TRUE(contains(groups.error().message, "groups hold 3 transfers but 2 are applied"))
      << groups.error().message;
}

TEST(ledger_invariants, check_group_applied_looks_at_the_accounts_of_the_group) {
  book b;
  ASSERT_TRUE(b.run(user_deposit("d1", "u1", 100)).has_value());
  const auto d = b.run(one_transfer("job-1/usage", "user-u1", "provider-p", 60, transfer_kind::usage));
  ASSERT_TRUE(d.has_value());
  EXPECT_TRUE(check_group_applied(b.state, *d).has_value());
  b.state.balances_micros["provider-p"] = -1;
  const auto broken = check_group_applied(b.state, *d);
  ASSERT_FALSE(broken.has_value());
  EXPECT_TRUE(contains(broken.error().message, "\"provider-p\""));
}

// ---------------------------------------------------------------------------------------------
// The verifier.

transfer_recorded recorded(std::string id, std::string debit, std::string credit,
                           std::int64_t amount, transfer_kind kind, std::string group) {
  return transfer_recorded{std::move(id), std::move(debit), std::move(credit), amount, kind, "ref",
                           std::move(group), 1};
}

TEST(ledger_verifier, a_log_written_by_decide_verifies_and_rebuilds_the_state) {
  book b;
  ASSERT_TRUE(b.run(user_deposit("d1", "u1", 1000)).has_value());
  ASSERT_TRUE(b.run(record_transfers{"job-1", {make_transfer("job-1/usage", "user-u1", "provider-p",
                                                             800, transfer_kind::usage),
                                               make_transfer("job-1/fee", "provider-p", "platform",
                                                             80, transfer_kind::platform_fee)}})
                  .has_value());
  ASSERT_TRUE(b.run(payout_request_transfers("po", "p", 720)).has_value());
  ledger_verifier verifier;
  for (const auto& e : b.log) ASSERT_TRUE(verifier.apply(std::get<transfer_recorded>(e)).has_value());
  const auto finished = verifier.finish();
  ASSERT_TRUE(finished.has_value()) << finished.error().message;
  EXPECT_EQ(verifier.state(), b.state);
  EXPECT_EQ(verifier.transfers_applied(), 4u);
}

// ---------------------------------------------------------------------------------------------
// The window of recent transfers of jobs.

/// A job's settlement: the user pays the provider, the provider pays the platform's fee.
record_transfers job_settlement(const std::string& job) {
  return record_transfers{job, {make_transfer(job + "/usage", "user-u", "provider-p", 10, transfer_kind::usage),
                                make_transfer(job + "/fee", "provider-p", "platform", 2, transfer_kind::platform_fee)}};
}

TEST(ledger_window, the_oldest_groups_of_jobs_are_forgotten_whole_and_deposits_and_payouts_are_kept) {
  book b;
  b.state.recent_transfers_max = 4;
  ASSERT_TRUE(b.run(one_transfer("deposit-1", "external", "user-u", 1'000, transfer_kind::deposit)));
  for (const std::string job : {"job-1", "job-2", "job-3"}) ASSERT_TRUE(b.run(job_settlement(job)));
  ASSERT_TRUE(b.run(one_transfer("payout-1/request", "provider-p", "payouts_in_flight", 5, transfer_kind::payout)));
  ASSERT_TRUE(b.run(job_settlement("job-4")));

  // job-1 and job-2 went (4 transfers of jobs after each); the deposit and the payout stay.
  for (const std::string gone : {"job-1/usage", "job-1/fee", "job-2/usage", "job-2/fee"}) {
    EXPECT_FALSE(b.state.transfers.contains(gone)) << gone;
  }
  for (const std::string kept : {"deposit-1", "payout-1/request", "job-3/usage", "job-3/fee", "job-4/usage", "job-4/fee"}) {
    EXPECT_TRUE(b.state.transfers.contains(kept)) << kept;
  }
  EXPECT_FALSE(b.state.group_sizes.contains("job-1"));
  EXPECT_FALSE(b.state.group_sizes.contains("job-2"));
  EXPECT_EQ(b.state.recent_transfers, 4u);
  // Forgetting moves no money: balances, provider totals and every invariant are as before.
  EXPECT_EQ(b.balance("user-u"), 1'000 - 4 * 10);
  EXPECT_EQ(b.balance("provider-p"), 4 * 8 - 5);
  EXPECT_EQ(b.balance("platform"), 4 * 2);
  EXPECT_TRUE(check_ledger(b.state).has_value()) << check_ledger(b.state).error().message;

  // Within the window a retry is still recognised: nothing to do.
  auto retry = b.run(job_settlement("job-4"));
  ASSERT_TRUE(retry);
  EXPECT_TRUE(retry->empty());
  // Beyond it, decide no longer knows job-1: the ledger actor's claim of every transfer id in the
  // event store refuses it (ledger_actor_test), not this state.
  auto forgotten = ledger::decide(b.state, job_settlement("job-1"), b.now_us);
  ASSERT_TRUE(forgotten);
  EXPECT_EQ(forgotten->size(), 2u);

  // The log folded again forgets the same groups: live state == replay.
  ledger::state rebuilt;
  rebuilt.recent_transfers_max = 4;
  for (const auto& e : b.log) rebuilt = ledger::evolve(std::move(rebuilt), e);
  EXPECT_EQ(rebuilt, b.state);
}

TEST(ledger_window, memory_stays_bounded_however_many_jobs_are_billed) {
  book b;
  b.state.recent_transfers_max = 100;
  ASSERT_TRUE(b.run(one_transfer("deposit-1", "external", "user-u", 1'000'000'000, transfer_kind::deposit)));
  for (int i = 0; i < 20'000; ++i) {
    ASSERT_TRUE(b.run(job_settlement("job-" + std::to_string(i))));
    ASSERT_LE(b.state.recent_transfers, 100u);
    ASSERT_LE(b.state.transfers.size(), 100u + 1);  // the window and the deposit
    ASSERT_LE(b.state.recent.size(), 50u + 1);
    ASSERT_LE(b.state.group_sizes.size(), 50u + 1);  // the window's groups and the deposit's
  }
  EXPECT_EQ(b.balance("platform"), 20'000 * 2);
  EXPECT_TRUE(check_ledger(b.state).has_value());
}

TEST(ledger_window, a_group_larger_than_the_window_is_kept_until_the_next_one) {
  book b;
  b.state.recent_transfers_max = 1;
  ASSERT_TRUE(b.run(one_transfer("deposit-1", "external", "user-u", 1'000, transfer_kind::deposit)));
  ASSERT_TRUE(b.run(job_settlement("job-1")));
  EXPECT_EQ(b.state.group_sizes.at("job-1"), 2u) << "the newest group is never split";
  ASSERT_TRUE(b.run(job_settlement("job-2")));
  EXPECT_FALSE(b.state.group_sizes.contains("job-1"));
  EXPECT_EQ(b.state.group_sizes.at("job-2"), 2u);
  EXPECT_TRUE(check_ledger(b.state).has_value());
}

TEST(ledger_verifier, finds_a_transfer_id_applied_twice_however_far_apart) {
  // The live ledger forgets old transfers of jobs; the verifier of a whole log does not.
  ledger_verifier verifier;
  const auto deposit = std::get<transfer_recorded>(
      ledger::decide({}, one_transfer("deposit-1", "external", "user-u", 1'000'000, transfer_kind::deposit), 1)->front());
  ASSERT_TRUE(verifier.apply(deposit));
  auto recorded = [](const std::string& id, const std::string& group) {
    return transfer_recorded{id, "user-u", "provider-p", 10, transfer_kind::usage, "ref", group, 2};
  };
  ASSERT_TRUE(verifier.apply(recorded("job-0/usage", "job-0")));
  for (std::size_t i = 1; i < ledger_recent_transfers_max + 10; ++i) {
    ASSERT_TRUE(verifier.apply(recorded("job-" + std::to_string(i) + "/usage", "job-" + std::to_string(i))));
  }
  EXPECT_FALSE(verifier.state().transfers.contains("job-0/usage")) << "forgotten by the state";
  auto again = verifier.apply(recorded("job-0/usage", "job-again"));
  ASSERT_FALSE(again);
  EXPECT_TRUE(contains(again.error().message, "applied twice")) << again.error().message;
  auto group_again = verifier.apply(recorded("job-new/usage", "job-1"));
  ASSERT_FALSE(group_again);
  EXPECT_TRUE(contains(group_again.error().message, "appears again")) << group_again.error().message;
}

TEST(ledger_verifier, an_account_below_zero_within_a_group_is_a_violation_though_the_group_ends_sound) {
  // decide refuses such a group (each transfer is checked in turn); the verifier agrees.
  const record_transfers dipping{"g1", {make_transfer("spend", "user-u", "provider-p", 10, transfer_kind::usage),
                                        make_transfer("fund", "external", "user-u", 10, transfer_kind::deposit)}};
  ASSERT_FALSE(ledger::decide({}, dipping, 1).has_value());
  ledger_verifier verifier;
  const auto dipped = verifier.apply(recorded("spend", "user-u", "provider-p", 10, transfer_kind::usage, "g1"));
  ASSERT_FALSE(dipped.has_value());
  EXPECT_TRUE(contains(dipped.error().message, "\"user-u\" holding -10 micro-USD")) << dipped.error().message;
  EXPECT_TRUE(contains(dipped.error().message, "not even within a group")) << dipped.error().message;
}

TEST(ledger_verifier, a_group_over_the_limits_decide_applies_is_a_violation) {
  ledger_verifier verifier;
  ASSERT_TRUE(verifier.apply(recorded("d", "external", "user-u", 1'000, transfer_kind::deposit, "g0")));
  for (std::size_t i = 0; i < transfers_per_group_max; ++i) {
    ASSERT_TRUE(verifier.apply(recorded("t" + std::to_string(i), "user-u", "provider-p", 1, transfer_kind::usage, "g1")));
  }
  const auto one_more = verifier.apply(recorded("t-extra", "user-u", "provider-p", 1, transfer_kind::usage, "g1"));
  ASSERT_FALSE(one_more.has_value());
  EXPECT_TRUE(contains(one_more.error().message, "more than 16 transfers")) << one_more.error().message;

  ledger_verifier other;
  const std::string long_group(ledger_id_length_max + 1, 'g');
  const auto long_id = other.apply(recorded("d", "external", "user-u", 5, transfer_kind::deposit, long_group));
  ASSERT_FALSE(long_id.has_value());
  EXPECT_TRUE(contains(long_id.error().message, "257 bytes")) << long_id.error().message;
}

TEST(ledger_verifier, reports_a_transfer_id_applied_twice) {
  ledger_verifier verifier;
  ASSERT_TRUE(verifier.apply(recorded("t1", "external", "user-u", 5, transfer_kind::deposit, "g1"))
                  .has_value());
  const auto twice =
      verifier.apply(recorded("t1", "external", "user-u", 7, transfer_kind::deposit, "g2"));
  ASSERT_FALSE(twice.has_value());
  EXPECT_TRUE(contains(twice.error().message, "\"t1\" is applied twice"));
  EXPECT_TRUE(contains(twice.error().message, "\"g1\""));
  EXPECT_TRUE(contains(twice.error().message, "7 micro-USD"));
}

TEST(ledger_verifier, reports_a_negative_balance_at_the_transfer_that_makes_it) {
  ledger_verifier verifier;
  ASSERT_TRUE(verifier.apply(recorded("t1", "external", "user-u", 5, transfer_kind::deposit, "g1"))
                  .has_value());
  const auto overdrawn = verifier.apply(recorded("t2", "user-u", "provider-p", 8, transfer_kind::usage, "g2"));
  ASSERT_FALSE(overdrawn.has_value());
  EXPECT_TRUE(contains(overdrawn.error().message, "transfer \"t2\" of group \"g2\""));
  EXPECT_TRUE(contains(overdrawn.error().message, "\"user-u\" holding -3 micro-USD"));
}

TEST(ledger_verifier, reports_a_group_split_by_another_and_bad_transfers) {
  ledger_verifier split;
  ASSERT_TRUE(split.apply(recorded("a", "external", "user-u", 5, transfer_kind::deposit, "g1")).has_value());
  ASSERT_TRUE(split.apply(recorded("b", "external", "user-u", 5, transfer_kind::deposit, "g2")).has_value());
  const auto again = split.apply(recorded("c", "external", "user-u", 5, transfer_kind::deposit, "g1"));
  ASSERT_FALSE(again.has_value());
  EXPECT_TRUE(contains(again.error().message, "group \"g1\" appears again"));

  ledger_verifier route;
  const auto wrong = route.apply(recorded("a", "user-u", "platform", 5, transfer_kind::usage, "g"));
  ASSERT_FALSE(wrong.has_value());
  EXPECT_TRUE(contains(wrong.error().message, "may not move money"));

  ledger_verifier ungrouped;
  const auto lonely = ungrouped.apply(recorded("a", "external", "user-u", 5, transfer_kind::deposit, ""));
  ASSERT_FALSE(lonely.has_value());
  EXPECT_TRUE(contains(lonely.error().message, "no linked group id"));
}

// ---------------------------------------------------------------------------------------------
// Property test: random deposits, job settlements, payouts and bad commands.

std::uint64_t seed_from_env_or_device() {
  if (const char* text = std::getenv("GPUSTREAM_SEED")) return std::strtoull(text, nullptr, 10);
  std::random_device device;
  return (std::uint64_t{device()} << 32) | device();
}

/// The world the property test plays in, with its own simple model of the balances.
class money_world {
 public:
  explicit money_world(std::uint64_t seed) : rng_(seed) {}

  void step(int index);
  void check_everything() const;
  void check_replay() const;

  const book& ledger_book() const { return book_; }
  int accepted_groups() const { return static_cast<int>(accepted_.size()); }
  int refused() const { return refused_; }

 private:
  std::int64_t draw(std::int64_t low, std::int64_t high) {
    return std::uniform_int_distribution<std::int64_t>(low, high)(rng_);
  }
  template <class T>
  const T& pick(const std::vector<T>& from) {
    return from[static_cast<std::size_t>(draw(0, static_cast<std::int64_t>(from.size()) - 1))];
  }

  /// Sends a group; when it is decided, applies it to the model too.
  decision record(const record_transfers& group) {
    auto d = book_.run(group);
    if (d && !d->empty()) {
      for (const auto& t : group.transfers) {
        model_[t.debit_account] -= t.amount_micros;
        model_[t.credit_account] += t.amount_micros;
      }
      accepted_.push_back(group);
      const auto incremental = check_group_applied(book_.state, *d);
      EXPECT_TRUE(incremental.has_value()) << incremental.error().message;
    }
    return d;
  }

  void expect_unchanged_after(const record_transfers& group, errc code) {
    const auto before = book_.state;
    const auto d = book_.run(group);
    ASSERT_FALSE(d.has_value()) << "group " << group.group_id << " should be refused";
    EXPECT_EQ(d.error().code, code) << d.error().message;
    EXPECT_EQ(book_.state, before);
    ++refused_;
  }

  void deposit(int index);
  void settle_a_job(int index);
  void request_a_payout(int index);
  void close_a_payout();
  void retry_something();
  void send_something_bad(int index);

  std::mt19937_64 rng_;
  book book_;
  std::map<std::string, std::int64_t> model_;
  std::vector<record_transfers> accepted_;
  std::map<std::string, payout::state> payouts_;
  std::map<std::string, std::vector<events::event>> payout_logs_;
  int refused_ = 0;
  const std::vector<std::string> users_ = {"premium-a", "premium-b", "free-c", "free-d"};
  const std::vector<std::string> providers_ = {"p1", "p2", "p3"};
  const std::vector<std::string> campaigns_ = {"c1", "c2"};
  pricing_options pricing_;
};

void money_world::deposit(int index) {
  const auto amount = draw(1, 2'000'000);
  const auto id = "d" + std::to_string(index);
  const auto group = draw(0, 3) == 0 ? campaign_deposit(id, pick(campaigns_), amount)
                                     : user_deposit(id, pick(users_), amount);
  const auto d = record(group);
  ASSERT_TRUE(d.has_value()) << d.error().message;
  EXPECT_EQ(d->size(), 1u);
}

void money_world::settle_a_job(int index) {
  job_bill bill;
  bill.job_id = std::to_string(index);
  bill.user_id = pick(users_);
  bill.premium = bill.user_id.starts_with("premium");
  bill.provider_id = pick(providers_);
  bill.outcome = static_cast<job_outcome>(draw(0, 2));
  bill.price = {draw(0, 3'000'000), draw(0, 9'000'000)};
  bill.quality = static_cast<events::quality_tier>(draw(0, 3));
  bill.prompt_tokens = static_cast<std::uint32_t>(draw(0, 20'000));
  bill.completion_tokens = static_cast<std::uint32_t>(draw(0, 4'000));
  if (!bill.premium && draw(0, 1) == 0) {
    bill.ad = ad_charge{"imp-" + bill.job_id, pick(campaigns_), draw(0, 5'000)};
  }
  const auto settlement = settle_job(bill, pricing_);
  ASSERT_TRUE(settlement.has_value()) << settlement.error().message;
  if (settlement->group.transfers.empty()) return;  // failed or free of charge: nothing to record
  const std::string payer = bill.premium ? user_account(bill.user_id) : std::string(subsidy_account);
  bool affordable = !bill.premium || model_[payer] >= settlement->gross_micros;
  if (bill.ad && settlement->ad_micros > model_[campaign_account(bill.ad->campaign_id)]) {
    affordable = false;
  }
  // Copying the whole state costs; only a refusal needs it to prove that nothing changed.
  const auto before = affordable ? ledger::state{} : book_.state;
  const auto d = record(settlement->group);
  if (affordable) {
    ASSERT_TRUE(d.has_value()) << d.error().message;
    EXPECT_EQ(d->size(), settlement->group.transfers.size());
  } else {
    ASSERT_FALSE(d.has_value()) << "job " << bill.job_id << " should not be affordable";
    EXPECT_EQ(d.error().code, errc::insufficient_funds) << d.error().message;
    EXPECT_EQ(book_.state, before);
    ++refused_;
  }
}

void money_world::request_a_payout(int index) {
  const auto& provider = pick(providers_);
  const auto balance = model_[provider_account(provider)];
  // Sometimes more than the balance, sometimes exactly all of it.
  const auto amount = draw(0, 2) == 0 ? balance : draw(-10, balance + 1000);
  const auto id = "po" + std::to_string(index);
  const auto decided =
      payout::decide(payout::state{}, request_payout{id, provider, amount, false, balance}, book_.now_us);
  if (amount <= 0 || amount > balance) {
    ASSERT_FALSE(decided.has_value());
    EXPECT_EQ(decided.error().code, amount <= 0 ? errc::invalid_argument : errc::insufficient_funds);
    ++refused_;
    return;
  }
  ASSERT_TRUE(decided.has_value()) << decided.error().message;
  ASSERT_EQ(decided->size(), 1u);
  const auto d = record(payout_movement(payout::state{}, decided->front()));
  ASSERT_TRUE(d.has_value()) << d.error().message;
  payouts_[id] = payout::evolve(payout::state{}, decided->front());
  payout_logs_[id].push_back(decided->front());
}

void money_world::close_a_payout() {
  std::vector<std::string> open;
  for (const auto& [id, state] : payouts_) {
    if (state.status == payout_status::requested) open.push_back(id);
  }
  if (open.empty()) return;
  const auto& id = pick(open);
  auto& state = payouts_[id];
  const payout::command command = draw(0, 1) == 0 ? payout::command{settle_payout{id, "bank-" + id}}
                                                  : payout::command{fail_payout{id, "iban rejected"}};
  const auto decided = payout::decide(state, command, book_.now_us);
  ASSERT_TRUE(decided.has_value()) << decided.error().message;
  ASSERT_EQ(decided->size(), 1u);
  const auto d = record(payout_movement(state, decided->front()));
  ASSERT_TRUE(d.has_value()) << d.error().message;
  state = payout::evolve(std::move(state), decided->front());
  payout_logs_[id].push_back(decided->front());
  // Closing again is idempotent for the payout and for the ledger.
  const auto repeated = payout::decide(state, command, book_.now_us);
  ASSERT_TRUE(repeated.has_value()) << repeated.error().message;
  EXPECT_TRUE(repeated->empty());
}

void money_world::retry_something() {
  if (accepted_.empty()) return;
  auto group = pick(accepted_);
  const auto same = book_.run(group);
  ASSERT_TRUE(same.has_value()) << same.error().message;
  EXPECT_TRUE(same->empty());
  group.transfers.back().amount_micros += 1;
  expect_unchanged_after(group, errc::already_exists);
  group.transfers.back().amount_micros -= 1;
  group.transfers.push_back(make_transfer(group.group_id + "/more", "external", "user-x", 1,
                                          transfer_kind::deposit));
  expect_unchanged_after(group, errc::invalid_state);
}

void money_world::send_something_bad(int index) {
  const auto id = "bad" + std::to_string(index);
  const auto user = user_account(pick(users_));
  switch (draw(0, 5)) {
    case 0: return expect_unchanged_after(one_transfer(id, user, "bank", 1, transfer_kind::usage),
                                          errc::invalid_argument);
    case 1: return expect_unchanged_after(one_transfer(id, user, user, 1, transfer_kind::usage),
                                          errc::invalid_argument);
    case 2: return expect_unchanged_after(one_transfer(id, "external", user, draw(-5, 0),
                                                       transfer_kind::deposit),
                                          errc::invalid_argument);
    case 3: return expect_unchanged_after(one_transfer(id, user, "platform", 1, transfer_kind::usage),
                                          errc::invalid_argument);
    case 4: {
      record_transfers big{id, {}};
      for (std::size_t i = 0; i <= transfers_per_group_max; ++i) {
        big.transfers.push_back(make_transfer(id + "/" + std::to_string(i), "external", user, 1,
                                              transfer_kind::deposit));
      }
      return expect_unchanged_after(big, errc::limit_exceeded);
    }
    default: {
      // More than the provider holds: the ledger refuses even if a payout decide was skipped.
      const auto& provider = pick(providers_);
      const auto held = model_[provider_account(provider)];
      return expect_unchanged_after(payout_request_transfers(id, provider, held + 1),
                                    errc::insufficient_funds);
    }
  }
}

void money_world::step(int index) {
  const auto roll = draw(0, 99);
  if (roll < 25) return deposit(index);
  if (roll < 60) return settle_a_job(index);
  if (roll < 72) return request_a_payout(index);
  if (roll < 82) return close_a_payout();
  if (roll < 90) return retry_something();
  send_something_bad(index);
}

void money_world::check_everything() const {
  const auto full = check_ledger(book_.state);
  ASSERT_TRUE(full.has_value()) << full.error().message;
  for (const auto& [account, balance] : model_) {
    ASSERT_EQ(book_.balance(account), balance) << account;
  }
  std::vector<payout::state> payouts;
  for (const auto& [id, state] : payouts_) payouts.push_back(state);
  const auto cross = check_payouts_against_ledger(book_.state, payouts);
  ASSERT_TRUE(cross.has_value()) << cross.error().message;
}

/// Folding the accepted events from scratch gives the same states, and the verifier agrees.
void money_world::check_replay() const {
  ledger::state rebuilt;
  ledger_verifier verifier;
  for (const auto& e : book_.log) {
    rebuilt = ledger::evolve(std::move(rebuilt), e);
    const auto ok = verifier.apply(std::get<transfer_recorded>(e));
    ASSERT_TRUE(ok.has_value()) << ok.error().message;
  }
  EXPECT_EQ(rebuilt, book_.state);
  const auto finished = verifier.finish();
  ASSERT_TRUE(finished.has_value()) << finished.error().message;
  EXPECT_EQ(verifier.state(), book_.state);
  for (const auto& [id, log] : payout_logs_) {
    payout::state payout_rebuilt;
    for (const auto& e : log) payout_rebuilt = payout::evolve(std::move(payout_rebuilt), e);
    EXPECT_EQ(payout_rebuilt, payouts_.at(id)) << id;
  }
}

TEST(ledger_property, random_money_keeps_every_invariant_and_replays_to_the_same_state) {
  const auto seed = seed_from_env_or_device();
  std::cout << "ledger property seed: " << seed << " (rerun with GPUSTREAM_SEED=" << seed << ")\n";
  SCOPED_TRACE("GPUSTREAM_SEED=" + std::to_string(seed));
  money_world world(seed);
  constexpr int steps = 3000;
  for (int i = 0; i < steps; ++i) {
    world.step(i);
    world.check_everything();
    if (::testing::Test::HasFatalFailure()) {
      FAIL() << "stopped at step " << i;
    }
  }
  world.check_replay();
  // The run exercised both sides.
  EXPECT_GT(world.accepted_groups(), steps / 3);
  EXPECT_GT(world.refused(), steps / 20);
}

TEST(ledger_bill, a_group_recorded_as_a_bill_comes_back_the_same) {
  const record_transfers group{
      "job-7",
      {transfer{"job-7/usage", "user-u1", "provider-p1", 1'234, events::transfer_kind::usage, "7"},
       transfer{"job-7/platform_fee", "provider-p1", "platform", 123, events::transfer_kind::platform_fee, "7"},
       transfer{"job-7/ad_spend", "campaign-c1", "platform", 45, events::transfer_kind::ad_spend, "imp-1"}}};
  const auto bill = to_bill(group);
  EXPECT_EQ(bill.group_id, "job-7");
  ASSERT_EQ(bill.transfers.size(), 3u);
  EXPECT_EQ(bill.transfers[2], (events::billed_transfer{"job-7/ad_spend", "campaign-c1", "platform", 45,
                                                        events::transfer_kind::ad_spend, "imp-1"}));
  EXPECT_EQ(from_bill(bill), group);
}

}  // namespace
}  // namespace gpustream::domain
