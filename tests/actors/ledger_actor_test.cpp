// The ledger actor's query: the balances and transfers asked for, never a copy of the whole
// ledger (a payout run asks for the providers' balances and the payout transfers only); and a
// transfer id applied at most once even after the ledger's window has forgotten it.

#include "actors/ledger_actor.hpp"

#include <gtest/gtest.h>

#include <map>
#include <string>
#include <vector>

#include "actors/persistent_actor.hpp"
#include "tests/actors/actor_testing.hpp"

namespace gpustream::actors {
namespace {

domain::ledger::applied_transfer moved(std::string debit, std::string credit, std::int64_t amount) {
  domain::ledger::applied_transfer transfer;
  transfer.debit_account = std::move(debit);
  transfer.credit_account = std::move(credit);
  transfer.amount_micros = amount;
  return transfer;
}

domain::ledger::state example_ledger() {
  domain::ledger::state ledger;
  ledger.balances_micros = {{"external", -900}, {"payouts_in_flight", 100}, {"platform", 50},
                            {"provider-a", 250}, {"provider-b", 0},         {"providerx", 7},
                            {"user-u", 493}};
  ledger.transfers = {{"d1", moved("external", "user-u", 900)},
                      {"job-1/usage", moved("user-u", "provider-a", 400)},
                      {"payout-a-1/request", moved("provider-a", "payouts_in_flight", 100)},
                      {"payout-a-1/settle", moved("payouts_in_flight", "external", 100)},
                      {"payoutz", moved("user-u", "provider-a", 1)}};
  return ledger;
}

TEST(ledger_query, named_accounts_get_their_balance_and_zero_when_never_touched) {
  const auto answer = ledger_aggregate::respond(example_ledger(), {.accounts = {"user-u", "user-nobody"}});
  EXPECT_EQ(answer.balances, (std::map<std::string, std::int64_t>{{"user-u", 493}, {"user-nobody", 0}}));
  EXPECT_TRUE(answer.transfers.empty()) << "no transfers unless asked for";
}

TEST(ledger_query, no_accounts_named_gives_those_with_the_prefix_or_all) {
  const auto ledger = example_ledger();
  const auto providers = ledger_aggregate::respond(ledger, {.account_prefix = "provider-"});
  EXPECT_EQ(providers.balances, (std::map<std::string, std::int64_t>{{"provider-a", 250}, {"provider-b", 0}}));
  const auto all = ledger_aggregate::respond(ledger, {});
  EXPECT_EQ(all.balances.size(), ledger.balances_micros.size());
  EXPECT_EQ(all.balances.at("external"), -900);
}

TEST(ledger_query, transfers_come_by_id_prefix) {
  const auto answer = ledger_aggregate::respond(example_ledger(), {.accounts = {"platform"}, .transfer_prefix = "payout-"});
  ASSERT_EQ(answer.transfers.size(), 2u);
  EXPECT_EQ(answer.transfers.at("payout-a-1/request").amount_micros, 100);
  EXPECT_TRUE(answer.transfers.contains("payout-a-1/settle"));
  EXPECT_EQ(answer.balances, (std::map<std::string, std::int64_t>{{"platform", 50}}));
}

// ---- a transfer id at most once, beyond the window of recent transfers

using domain::ledger;
using events::transfer_kind;

ledger::command settlement(const std::string& job) {
  return domain::record_transfers{
      job, {{job + "/usage", "user-u", "provider-p", 10, transfer_kind::usage, job},
            {job + "/fee", "provider-p", "platform", 2, transfer_kind::platform_fee, job}}};
}

class ledger_window_test : public testing::deterministic_fixture {
 protected:
  ledger_window_test() {
    open_store();
    ledger_ = stop_at_teardown(spawn_ledger_actor(system_, store_));
  }

  /// Settles jobs job-<first> .. job-<first + count - 1>, a stash's worth at a time.
  void settle(std::size_t first, std::size_t count) {
    for (std::size_t begin = first; begin < first + count; begin += 256) {
      std::vector<decltype(self_->request(ledger_, caf::infinite, settlement("x")))> replies;
      for (std::size_t i = begin; i < std::min(first + count, begin + 256); ++i) {
        replies.push_back(self_->request(ledger_, caf::infinite, settlement("job-" + std::to_string(i))));
      }
      run();
      for (auto& reply : replies) ASSERT_TRUE(collect<command_reply>(reply));
    }
  }

  std::int64_t balance(const std::string& account) {
    auto answer = ask<ledger_aggregate::answer>(ledger_, ledger_aggregate::query{.accounts = {account}});
    EXPECT_TRUE(answer);
    return answer ? answer->balances.at(account) : 0;
  }

  ledger_actor ledger_;
};

TEST_F(ledger_window_test, a_job_settled_again_after_the_window_forgot_it_is_refused_and_moves_no_money) {
  auto deposited = ask<command_reply>(ledger_, ledger::command{domain::user_deposit("d1", "u", 1'000'000'000)});
  ASSERT_TRUE(deposited) << describe(deposited.error());
  const std::size_t jobs = domain::ledger_recent_transfers_max / 2 + 1;  // two transfers each
  settle(0, jobs);
  auto state = ask<ledger::state>(ledger_, state_atom::value);
  ASSERT_TRUE(state);
  ASSERT_FALSE(state->transfers.contains("job-0/usage")) << "the window should have forgotten job-0";
  ASSERT_TRUE(state->transfers.contains("job-1/usage"));

  // Alone: the store's error, naming the job.
  auto alone = ask<command_reply>(ledger_, settlement("job-0"));
  ASSERT_FALSE(alone);
  ASSERT_TRUE(storage_error_of(alone.error())) << describe(alone.error());
  EXPECT_EQ(storage_error_of(alone.error())->code, storage::errc::key_taken);
  EXPECT_NE(describe(alone.error()).find("job-0"), std::string::npos) << describe(alone.error());

  // In one batch with new jobs: only it is refused; the others are appended one by one after.
  auto before = self_->request(ledger_, caf::infinite, settlement("job-new-1"));
  auto again = self_->request(ledger_, caf::infinite, settlement("job-0"));
  auto after = self_->request(ledger_, caf::infinite, settlement("job-new-2"));
  run();
  auto r_before = collect<command_reply>(before);
  auto r_again = collect<command_reply>(again);
  auto r_after = collect<command_reply>(after);
  ASSERT_TRUE(r_before) << describe(r_before.error());
  ASSERT_TRUE(r_after) << describe(r_after.error());
  EXPECT_EQ(r_before->events.size(), 2u);
  EXPECT_EQ(r_after->events.size(), 2u);
  ASSERT_FALSE(r_again);
  EXPECT_EQ(storage_error_of(r_again.error())->code, storage::errc::key_taken);

  const auto settled = static_cast<std::int64_t>(jobs) + 2;
  EXPECT_EQ(balance("user-u"), 1'000'000'000 - settled * 10);
  EXPECT_EQ(balance("platform"), settled * 2);
  // And the actor carries on as before: a retry within the window is still answered as nothing to do.
  auto retried = ask<command_reply>(ledger_, settlement("job-new-2"));
  ASSERT_TRUE(retried) << describe(retried.error());
  EXPECT_TRUE(retried->events.empty());
}

}  // namespace
}  // namespace gpustream::actors
