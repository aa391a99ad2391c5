// The ledger actor's query: the balances and transfers asked for, never a copy of the whole
// ledger (a payout run asks for the providers' balances and the payout transfers only); and a
// transfer id applied at most once even after the ledger's window has forgotten it, also in a
// store written before appends claimed keys (upgraded when opened).

#include "actors/ledger_actor.hpp"

#include <gtest/gtest.h>

#include <filesystem>
#include <map>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "actors/ledger_claims.hpp"
#include "actors/persistent_actor.hpp"
#include "storage/fault_injector.hpp"
#include "events/codec.hpp"
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

// ---- a store written before appends claimed keys, upgraded when opened

/// The ledger's events for `commands`, decided by the ledger's rules, appended as a build before
/// claimed keys did (no key claimed), in appends of at most `per_append` events; then the store
/// is marked format 1. Returns each event's global position.
std::vector<std::uint64_t> write_unclaimed_ledger(const std::filesystem::path& dir,
                                                  const std::vector<ledger::command>& commands,
                                                  std::size_t per_append) {
  std::vector<std::uint64_t> positions;
  {
    storage::store_options options;
    options.mode = storage::durability::buffered;
    auto store = storage::testing::open_or_fail(dir, options);
    EXPECT_TRUE(store);
    if (!store) return positions;
    ledger::state state;
    std::vector<storage::new_event> pending;
    const auto flush = [&] {
      std::vector<storage::stream_append> request(1);
      request.front().stream = std::string(ledger_stream);
      request.front().events = std::move(pending);
      pending.clear();
      auto appended = store->append(std::move(request));
      ASSERT_TRUE(appended) << appended.error().message;
      for (auto p = appended->first_position; p <= appended->last_position; ++p) positions.push_back(p);
    };
    for (const auto& command : commands) {
      auto decided = ledger::decide(state, command, 1'700'000'000'000'000);
      EXPECT_TRUE(decided) << decided.error().message;
      if (!decided) return positions;
      for (const auto& event : *decided) {
        state = ledger::evolve(std::move(state), event);
        pending.push_back({storage::testing::make_id(77, positions.size() + pending.size() + 1),
                           events::type_of(event), events::encode_payload(event)});
      }
      if (pending.size() >= per_append) flush();
    }
    if (!pending.empty()) flush();
  }
  storage::testing::raw_put(dir, "default", "format_version", std::string("\0\0\0\0\0\0\0\x01", 8));
  return positions;
}

/// Every claim `source` passes on, in order, and into how many chunks.
struct claims_seen {
  std::vector<std::pair<std::string, std::uint64_t>> claims;
  std::size_t chunks = 0;
};

TEST(claim_ledger_keys, names_each_transfer_and_each_group_once_at_the_position_of_its_transfer) {
  storage::testing::temp_dir dir;
  const auto deposit = domain::user_deposit("d1", "u", 1'000);
  const auto positions = write_unclaimed_ledger(dir.path(), {deposit, settlement("job-1"), settlement("job-2")}, 2);
  ASSERT_FALSE(HasFailure());
  ASSERT_EQ(positions, (std::vector<std::uint64_t>{1, 2, 3, 4, 5}));
  storage::store_options options;
  options.mode = storage::durability::buffered;
  options.read_events_max = 2;  // three reads' worth
  claims_seen seen;
  options.format_1_claims = [&](const storage::event_store& store, const storage::claim_sink& claim) {
    return claim_ledger_keys(store, [&](std::span<const storage::claimed_key> keys) {
      ++seen.chunks;
      for (const auto& k : keys) seen.claims.emplace_back(k.key, k.position);
      return claim(keys);
    });
  };
  auto store = storage::testing::open_or_fail(dir.path(), options);
  ASSERT_TRUE(store);
  ASSERT_EQ(deposit.transfers.size(), 1u);
  EXPECT_EQ(seen.claims, (std::vector<std::pair<std::string, std::uint64_t>>{
                             {"ledger/transfer/" + deposit.transfers.front().transfer_id, 1},
                             {"ledger/group/" + deposit.group_id, 1},
                             {"ledger/transfer/job-1/usage", 2},
                             {"ledger/group/job-1", 2},
                             {"ledger/transfer/job-1/fee", 3},
                             {"ledger/transfer/job-2/usage", 4},
                             {"ledger/group/job-2", 4},
                             {"ledger/transfer/job-2/fee", 5}}));
  EXPECT_EQ(seen.chunks, 3u);
}

class ledger_keeper_test : public testing::deterministic_fixture {};

TEST_F(ledger_keeper_test, a_ledger_whose_append_the_store_failed_answers_again_from_the_log) {
  // Its persistent actor stops at a failed append (its state may be ahead of the log); the one
  // ledger must not stay gone until the process restarts.
  auto faults = std::make_shared<storage::fault_injector>();
  storage::store_options options;
  options.mode = storage::durability::sync;
  options.faults = faults;
  open_store(options);
  auto ledger = stop_at_teardown(spawn_ledger_actor(system_, store_));
  ASSERT_TRUE(ask<command_reply>(ledger, ledger::command{domain::user_deposit("d1", "u", 1'000)}));
  faults->set_fail_sync(true);
  auto failed = ask<command_reply>(ledger, ledger::command{domain::user_deposit("d2", "u", 20)});
  faults->set_fail_sync(false);
  ASSERT_FALSE(failed);
  EXPECT_TRUE(storage_error_of(failed.error())) << describe(failed.error());
  // The ledger started again may read the log before the store has reopened after the failed
  // fsync, and then meet d2's record with its next append (event_id_conflict): that one stops it
  // too, and the next starts from the reopened store. At most that once.
  auto later = ask<command_reply>(ledger, ledger::command{domain::user_deposit("d3", "u", 300)});
  if (!later) {
    ASSERT_TRUE(storage_error_of(later.error())) << describe(later.error());
    EXPECT_EQ(storage_error_of(later.error())->code, storage::errc::event_id_conflict) << describe(later.error());
    later = ask<command_reply>(ledger, ledger::command{domain::user_deposit("d3", "u", 300)});
  }
  ASSERT_TRUE(later) << describe(later.error());
  auto answer = ask<ledger_aggregate::answer>(ledger, ledger_aggregate::query{.accounts = {"user-u"}});
  ASSERT_TRUE(answer) << describe(answer.error());
  // d2's fate was open (its fsync failed, its write may have reached the log): the ledger read
  // again from the log says which, and d1 and d3 are there.
  const auto balance = answer->balances.at("user-u");
  EXPECT_TRUE(balance == 1'300 || balance == 1'320) << balance;
}

class ledger_upgrade_test : public testing::deterministic_fixture {};

TEST_F(ledger_upgrade_test, a_job_settled_before_claims_is_refused_again_after_the_window_forgot_it) {
  std::vector<ledger::command> history{ledger::command{domain::user_deposit("d1", "u", 1'000'000'000)}};
  const std::size_t jobs = domain::ledger_recent_transfers_max / 2 + 1;  // two transfers each
  for (std::size_t i = 0; i < jobs; ++i) history.push_back(settlement("job-" + std::to_string(i)));
  (void)write_unclaimed_ledger(directory_.path(), history, 4'000);
  ASSERT_FALSE(HasFailure());

  storage::store_options options;
  options.mode = storage::durability::buffered;
  options.format_1_claims = claim_ledger_keys;
  open_store(std::move(options));
  ASSERT_FALSE(HasFailure());
  auto ledger_actor = stop_at_teardown(spawn_ledger_actor(system_, store_));
  auto state = ask<ledger::state>(ledger_actor, state_atom::value);
  ASSERT_TRUE(state);
  ASSERT_FALSE(state->transfers.contains("job-0/usage")) << "the window should have forgotten job-0";

  auto again = ask<command_reply>(ledger_actor, settlement("job-0"));
  ASSERT_FALSE(again) << "settled twice";
  ASSERT_TRUE(storage_error_of(again.error())) << describe(again.error());
  EXPECT_EQ(storage_error_of(again.error())->code, storage::errc::key_taken);
  auto fresh = ask<command_reply>(ledger_actor, settlement("job-new"));
  ASSERT_TRUE(fresh) << describe(fresh.error());
  EXPECT_EQ(fresh->events.size(), 2u);
  auto balances = ask<ledger_aggregate::answer>(ledger_actor, ledger_aggregate::query{.accounts = {"platform"}});
  ASSERT_TRUE(balances);
  EXPECT_EQ(balances->balances.at("platform"), static_cast<std::int64_t>(jobs + 1) * 2);
}

}  // namespace
}  // namespace gpustream::actors
