// The payout runner on the whole runtime under test_coordinator: a run pays exactly the providers
// at or above the threshold, a re-run pays nothing twice, the minimum interval holds, a crash
// between the ledger movement and the payout event is reconciled by the next run, settle and fail
// move the money as the domain says (also at once), the payouts agree with the ledger
// (check_payouts_against_ledger), and the domain verifier passes over the log at the end.

#include "actors/payout_runner.hpp"

#include <caf/send.hpp>

#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "actors/runtime.hpp"
#include "domain/job.hpp"
#include "domain/ledger.hpp"
#include "domain/payout.hpp"
#include "domain/verifier.hpp"
#include "events/codec.hpp"
#include "tests/actors/actor_testing.hpp"

namespace gpustream::actors {
namespace {

constexpr std::int64_t usd = 1'000'000;
constexpr std::int64_t hour_us = std::int64_t{3600} * 1'000'000;

class payout_runner_test : public testing::deterministic_fixture {
 protected:
  payout_runner_test() = default;
  ~payout_runner_test() override { stop(); }

  void start(bool settle_at_once = false, std::chrono::milliseconds run_interval = std::chrono::milliseconds(0),
             const std::function<void(payout_runner_options&)>& adjust = {}) {
    storage::store_options store_options;
    store_options.mode = storage::durability::buffered;
    auto store = storage::event_store::open(directory_.path(), store_options);
    ASSERT_TRUE(store) << store.error().message;
    runtime_options options;
    options.store.wait_for_each_append = true;
    options.persistence.clock_us = clock_.function();
    options.payouts.settle_at_once = settle_at_once;
    options.payouts.run_interval = run_interval;
    if (adjust) adjust(options.payouts);
    rt_ = start_runtime(system_, std::move(store.value()), std::move(options));
    running_ = true;
    run();
  }

  void stop() {
    if (!running_) return;
    rt_.stop();
    run();
    running_ = false;
  }

  /// Credits `amount` of usage to the provider, paid from a user's deposit for a job the
  /// provider ran (a provider is paid only in the group of a job that ended).
  void earn(const std::string& provider_id, std::int64_t amount) {
    const auto n = std::to_string(++earnings_);
    ASSERT_TRUE(ask<command_reply>(
        rt_.ledger, domain::ledger::command{domain::user_deposit("d" + n, "payer", amount)}));
    for (auto command : std::vector<domain::job::command>{
             domain::submit_job{.job_id = n, .user_id = "payer", .model = "m", .prompt_tokens = 1, .max_tokens = 1,
                                .premium = true, .conversation_id = {}},
             domain::queue_job{.deadline_at_us = clock_.function()() + 60'000'000},
             domain::assign_job{.provider_id = provider_id},
             domain::start_job{.provider_id = provider_id},
             domain::complete_job{.provider_id = provider_id, .completion_tokens = 1, .provider_reported_tokens = 1}}) {
      ASSERT_TRUE(ask<command_reply>(rt_.jobs, n, std::move(command)));
    }
    domain::record_transfers usage{
        "job-" + n,
        {domain::transfer{"job-" + n + "/usage", domain::user_account("payer"),
                          domain::provider_account(provider_id), amount,
                          events::transfer_kind::usage, n}}};
    ASSERT_TRUE(ask<command_reply>(rt_.ledger, domain::ledger::command{usage}));
  }

  std::int64_t balance(const std::string& account) {
    auto balances = ask<ledger_aggregate::answer>(rt_.ledger, ledger_aggregate::query{.accounts = {account}});
    EXPECT_TRUE(balances);
    return balances ? balances.value().balances.at(account) : -1;
  }

  payout_report run_payouts() {
    auto report = ask<payout_report>(rt_.payout_runner, run_atom::value);
    EXPECT_TRUE(report) << describe(report.error());
    return report ? report.value() : payout_report{};
  }

  domain::payout::state payout(const std::string& id) {
    auto state = ask<domain::payout::state>(rt_.payouts, id, state_atom::value);
    EXPECT_TRUE(state) << describe(state.error());
    return state ? state.value() : domain::payout::state{};
  }

  /// check_payouts_against_ledger over the live ledger and these payouts.
  domain::invariant_check payouts_match_ledger(const std::vector<std::string>& payout_ids) {
    auto ledger = ask<domain::ledger::state>(rt_.ledger, state_atom::value);
    EXPECT_TRUE(ledger);
    std::vector<domain::payout::state> payouts;
    for (const auto& id : payout_ids) payouts.push_back(payout(id));
    return domain::check_payouts_against_ledger(ledger.value(), payouts);
  }

  static domain::errc refusal_code(const caf::error& e) {
    auto d = domain_error_of(e);
    EXPECT_TRUE(d) << describe(e);
    return d ? d->code : domain::errc::invalid_argument;
  }

  /// Stops the runtime and feeds the whole log to the domain verifier, which also checks every
  /// payout against the ledger; returns how many payouts it found.
  std::uint64_t verify_log() {
    stop();
    storage::store_options options;
    options.read_only = true;
    auto store = storage::event_store::open(directory_.path(), options);
    EXPECT_TRUE(store) << store.error().message;
    if (!store) return 0;
    domain::domain_verifier verifier;
    auto scanned = store.value()->scan(1, [&](const events::record_view& r)
                                              -> expected<void, storage::error> {
      auto event = events::decode_payload(r.type, r.payload);
      if (!event) return unexpected{storage::error{storage::errc::corruption, event.error().message}};
      auto applied = verifier.apply(r.stream, r.version, r.position, event.value());
      if (!applied) {
        return unexpected{storage::error{storage::errc::corruption, domain::describe(applied.error())}};
      }
      return {};
    });
    EXPECT_TRUE(scanned) << scanned.error().message;
    auto finished = verifier.finish();
    EXPECT_TRUE(finished) << domain::describe(finished.error());
    return finished ? finished.value().payouts : 0;
  }

  testing::manual_clock clock_;
  runtime rt_;
  bool running_ = false;
  int earnings_ = 0;
};

TEST_F(payout_runner_test, a_run_pays_exactly_the_providers_at_or_above_the_threshold) {
  start();
  earn("p1", 12 * usd);
  earn("p2", 10 * usd - 1);
  earn("p3", 10 * usd);
  const auto report = run_payouts();
  EXPECT_TRUE(report.problems.empty()) << report.problems.front();
  ASSERT_EQ(report.payouts.size(), 2u);
  EXPECT_EQ(report.payouts[0], (payout_entry{"auto-p1-1", "p1", 12 * usd,
                                             domain::payout_status::requested, false}));
  EXPECT_EQ(report.payouts[1], (payout_entry{"auto-p3-1", "p3", 10 * usd,
                                             domain::payout_status::requested, false}));
  EXPECT_EQ(balance("provider-p1"), 0);
  EXPECT_EQ(balance("provider-p2"), 10 * usd - 1);
  EXPECT_EQ(balance("provider-p3"), 0);
  EXPECT_EQ(balance("payouts_in_flight"), 22 * usd);
  EXPECT_EQ(balance("external"), -32 * usd + 1);  // the deposits; nothing paid out yet
  EXPECT_TRUE(payout("auto-p1-1").automatic);
  EXPECT_TRUE(payouts_match_ledger({"auto-p1-1", "auto-p3-1"}));
  auto last = ask<payout_report>(rt_.payout_runner, state_atom::value);
  ASSERT_TRUE(last);
  EXPECT_EQ(last.value().payouts, report.payouts);
  EXPECT_EQ(verify_log(), 2u);
}

TEST_F(payout_runner_test, a_run_requests_at_most_payouts_per_run_max_and_leaves_the_rest_for_the_next) {
  start(false, std::chrono::milliseconds(0), [](payout_runner_options& o) { o.payouts_per_run_max = 2; });
  earn("p1", 12 * usd);
  earn("p2", 11 * usd);
  earn("p3", 10 * usd);
  const auto first = run_payouts();
  EXPECT_EQ(first.payouts.size(), 2u);
  ASSERT_EQ(first.problems.size(), 1u);
  EXPECT_EQ(first.problems.front(),
            "1 more providers are due; they are left for the next run (2 payouts per run at most)");
  const auto second = run_payouts();
  EXPECT_TRUE(second.problems.empty()) << second.problems.front();
  ASSERT_EQ(second.payouts.size(), 1u);
  EXPECT_EQ(second.payouts.front().provider_id, "p3");
  EXPECT_EQ(balance("payouts_in_flight"), 33 * usd);
  EXPECT_EQ(verify_log(), 3u);
}

TEST_F(payout_runner_test, operations_beyond_operations_waiting_max_are_refused_as_busy) {
  start(false, std::chrono::milliseconds(0), [](payout_runner_options& o) { o.operations_waiting_max = 1; });
  earn("p1", 12 * usd);
  // Three runs at once: one runs, one waits, the third finds the line full, and is told so (a
  // refusal once lost: the requester waited for good).
  auto a = self_->request(rt_.payout_runner, caf::infinite, run_atom::value);
  auto b = self_->request(rt_.payout_runner, caf::infinite, run_atom::value);
  auto c = self_->request(rt_.payout_runner, caf::infinite, run_atom::value);
  run();
  std::vector<expected<payout_report, caf::error>> replies;
  for (auto* handle : {&a, &b, &c}) replies.push_back(collect<payout_report>(*handle));
  const auto refused = std::count_if(replies.begin(), replies.end(), [](const auto& r) { return !r; });
  ASSERT_EQ(refused, 1) << "one of three refused";
  for (const auto& r : replies) {
    if (r) continue;
    EXPECT_EQ(refusal_code(r.error()), domain::errc::busy);
    EXPECT_NE(describe(r.error()).find("(operations_waiting_max); retry later"), std::string::npos) << describe(r.error());
  }
  EXPECT_FALSE(replies[2]) << "the third, with one running and one waiting";
  EXPECT_EQ(balance("provider-p1"), 0) << "paid once by the runs that ran";
}

TEST_F(payout_runner_test, running_again_pays_nothing_twice_and_keeps_the_minimum_interval) {
  start();
  earn("p1", 12 * usd);
  ASSERT_EQ(run_payouts().payouts.size(), 1u);
  const auto again = run_payouts();
  EXPECT_TRUE(again.payouts.empty());
  EXPECT_TRUE(again.problems.empty());
  EXPECT_EQ(balance("payouts_in_flight"), 12 * usd);

  // Above the threshold again, but within the interval: not yet.
  earn("p1", 15 * usd);
  *clock_.now_us += 23 * hour_us;
  EXPECT_TRUE(run_payouts().payouts.empty());
  *clock_.now_us += hour_us;
  const auto later = run_payouts();
  ASSERT_EQ(later.payouts.size(), 1u);
  EXPECT_EQ(later.payouts[0].payout_id, "auto-p1-2");
  EXPECT_EQ(later.payouts[0].amount_micros, 15 * usd);
  EXPECT_EQ(balance("payouts_in_flight"), 27 * usd);
  EXPECT_TRUE(run_payouts().payouts.empty());
  EXPECT_TRUE(payouts_match_ledger({"auto-p1-1", "auto-p1-2"}));
  EXPECT_EQ(verify_log(), 2u);
}

TEST_F(payout_runner_test, a_crash_between_the_ledger_movement_and_the_payout_event_is_reconciled) {
  start();
  earn("p1", 12 * usd);
  earn("p2", 11 * usd);
  // The first step of p1's payout as the runner takes it, then the "crash": no payout event.
  const auto orphan = automatic_payout_id("p1", 1);
  ASSERT_TRUE(ask<command_reply>(rt_.ledger, domain::ledger::command{domain::payout_request_transfers(
                                                 orphan, "p1", 12 * usd)}));
  EXPECT_FALSE(payouts_match_ledger({}));  // the ledger holds a payout movement without its payout
  stop();
  start();  // a restart on the same store, as after the crash

  const auto report = run_payouts();
  EXPECT_TRUE(report.problems.empty()) << report.problems.front();
  ASSERT_EQ(report.payouts.size(), 2u);
  EXPECT_EQ(report.payouts[0], (payout_entry{orphan, "p1", 12 * usd,
                                             domain::payout_status::requested, true}));
  EXPECT_EQ(report.payouts[1], (payout_entry{"auto-p2-1", "p2", 11 * usd,
                                             domain::payout_status::requested, false}));
  const auto reconciled = payout(orphan);
  EXPECT_EQ(reconciled.status, domain::payout_status::requested);
  EXPECT_EQ(reconciled.amount_micros, 12 * usd);
  EXPECT_EQ(balance("provider-p1"), 0);  // moved once
  EXPECT_EQ(balance("payouts_in_flight"), 23 * usd);
  EXPECT_TRUE(payouts_match_ledger({orphan, "auto-p2-1"}));
  const auto again = run_payouts();
  EXPECT_TRUE(again.payouts.empty());
  EXPECT_TRUE(again.problems.empty());
  EXPECT_EQ(verify_log(), 2u);
}

TEST_F(payout_runner_test, a_runner_that_runs_by_itself_reconciles_a_crash_as_soon_as_it_starts) {
  // Not an hour later: until then `replay --verify` would report the ledger's movement without
  // its payout.
  start();
  earn("p1", 12 * usd);
  const auto orphan = automatic_payout_id("p1", 1);
  ASSERT_TRUE(ask<command_reply>(rt_.ledger, domain::ledger::command{domain::payout_request_transfers(
                                                 orphan, "p1", 12 * usd)}));
  stop();
  start(false, std::chrono::hours(1));  // nobody asks for a run
  const auto reconciled = payout(orphan);
  EXPECT_EQ(reconciled.status, domain::payout_status::requested);
  EXPECT_EQ(reconciled.amount_micros, 12 * usd);
  EXPECT_TRUE(payouts_match_ledger({orphan}));
  EXPECT_EQ(verify_log(), 1u);
}

TEST_F(payout_runner_test, a_ledger_refusal_appends_no_payout_event_and_is_reported) {
  start();
  earn("p1", 15 * usd);
  // A movement written by someone else under the id the runner will use next (auto-p1-2: one
  // request is on the ledger), with another amount: the ledger refuses the runner's.
  ASSERT_TRUE(ask<command_reply>(rt_.ledger, domain::ledger::command{domain::payout_request_transfers(
                                                 "auto-p1-2", "p1", 5 * usd)}));
  const auto report = run_payouts();
  EXPECT_TRUE(report.payouts.empty());
  ASSERT_EQ(report.problems.size(), 1u);
  EXPECT_NE(report.problems[0].find("auto-p1-2"), std::string::npos) << report.problems[0];
  EXPECT_NE(report.problems[0].find("already_exists"), std::string::npos) << report.problems[0];
  EXPECT_EQ(payout("auto-p1-2").status, domain::payout_status::none);
  EXPECT_EQ(balance("provider-p1"), 10 * usd);
  EXPECT_EQ(balance("payouts_in_flight"), 5 * usd);
  // The foreign movement's own event, so that the log is whole for the verifier.
  ASSERT_TRUE(ask<command_reply>(
      rt_.payouts, std::string("auto-p1-2"),
      domain::payout::command{domain::request_payout{"auto-p1-2", "p1", 5 * usd, false, 15 * usd}}));
  EXPECT_EQ(verify_log(), 1u);
}

TEST_F(payout_runner_test, settle_and_fail_move_the_money_and_repeat_safely) {
  start();
  earn("p1", 12 * usd);
  earn("p3", 10 * usd);
  ASSERT_EQ(run_payouts().payouts.size(), 2u);

  auto settled = ask<payout_entry>(rt_.payout_runner, settle_atom::value, std::string("auto-p1-1"),
                                   std::string("bank-1"));
  ASSERT_TRUE(settled) << describe(settled.error());
  EXPECT_EQ(settled.value().status, domain::payout_status::settled);
  auto repeated = ask<payout_entry>(rt_.payout_runner, settle_atom::value, std::string("auto-p1-1"),
                                    std::string("bank-1"));
  ASSERT_TRUE(repeated) << describe(repeated.error());
  EXPECT_EQ(repeated.value().status, domain::payout_status::settled);
  auto other = ask<payout_entry>(rt_.payout_runner, settle_atom::value, std::string("auto-p1-1"),
                                 std::string("bank-2"));
  ASSERT_FALSE(other);
  EXPECT_EQ(refusal_code(other.error()), domain::errc::already_exists);
  auto fail_settled = ask<payout_entry>(rt_.payout_runner, fail_atom::value,
                                        std::string("auto-p1-1"), std::string("bounced"));
  ASSERT_FALSE(fail_settled);
  EXPECT_EQ(refusal_code(fail_settled.error()), domain::errc::invalid_state);

  auto failed = ask<payout_entry>(rt_.payout_runner, fail_atom::value, std::string("auto-p3-1"),
                                  std::string("account closed"));
  ASSERT_TRUE(failed) << describe(failed.error());
  EXPECT_EQ(failed.value().status, domain::payout_status::failed);
  ASSERT_TRUE(ask<payout_entry>(rt_.payout_runner, fail_atom::value, std::string("auto-p3-1"),
                                std::string("account closed")));
  auto unknown = ask<payout_entry>(rt_.payout_runner, settle_atom::value, std::string("nope"),
                                   std::string("bank-3"));
  ASSERT_FALSE(unknown);
  EXPECT_EQ(refusal_code(unknown.error()), domain::errc::not_found);

  EXPECT_EQ(balance("provider-p1"), 0);
  EXPECT_EQ(balance("provider-p3"), 10 * usd);  // returned
  EXPECT_EQ(balance("payouts_in_flight"), 0);
  EXPECT_EQ(balance("external"), -22 * usd + 12 * usd);
  EXPECT_TRUE(payouts_match_ledger({"auto-p1-1", "auto-p3-1"}));

  // The failed payout's money is due again after the interval, under the next id.
  *clock_.now_us += 24 * hour_us;
  const auto report = run_payouts();
  ASSERT_EQ(report.payouts.size(), 1u);
  EXPECT_EQ(report.payouts[0].payout_id, "auto-p3-2");
  EXPECT_EQ(verify_log(), 3u);
}

TEST_F(payout_runner_test, settle_at_once_pays_out_and_completes_an_interrupted_settlement) {
  start(true);
  earn("p1", 12 * usd);
  earn("p2", 20 * usd);
  // p2's payout was requested and its settlement reached the ledger when the process died.
  const auto interrupted = automatic_payout_id("p2", 1);
  ASSERT_TRUE(ask<command_reply>(rt_.ledger, domain::ledger::command{domain::payout_request_transfers(
                                                 interrupted, "p2", 20 * usd)}));
  ASSERT_TRUE(ask<command_reply>(
      rt_.payouts, interrupted,
      domain::payout::command{domain::request_payout{interrupted, "p2", 20 * usd, true, 20 * usd}}));
  ASSERT_TRUE(ask<command_reply>(
      rt_.ledger, domain::ledger::command{domain::payout_settle_transfers(interrupted, 20 * usd)}));

  const auto report = run_payouts();
  EXPECT_TRUE(report.problems.empty()) << report.problems.front();
  ASSERT_EQ(report.payouts.size(), 2u);
  EXPECT_EQ(report.payouts[0], (payout_entry{"auto-p1-1", "p1", 12 * usd,
                                             domain::payout_status::settled, false}));
  EXPECT_EQ(report.payouts[1], (payout_entry{interrupted, "p2", 20 * usd,
                                             domain::payout_status::settled, true}));
  EXPECT_EQ(payout("auto-p1-1").external_reference, "at-once-auto-p1-1");
  EXPECT_EQ(balance("payouts_in_flight"), 0);
  EXPECT_EQ(balance("external"), 0);  // every deposited micro paid out again
  EXPECT_TRUE(run_payouts().payouts.empty());
  EXPECT_EQ(verify_log(), 2u);
}

TEST_F(payout_runner_test, a_settle_or_fail_whose_ledger_movement_was_lost_is_completed_by_the_next_run) {
  // Settle and fail record the payout's event first, then its movement: a crash in between
  // leaves the payout closed on its stream and open in the ledger, for any payout of a provider,
  // not only its latest one.
  start();
  earn("p1", 12 * usd);
  earn("p2", 11 * usd);
  ASSERT_EQ(run_payouts().payouts.size(), 2u);  // auto-p1-1, auto-p2-1: requested
  *clock_.now_us += 24 * hour_us;
  earn("p1", 10 * usd);
  const auto second = run_payouts();
  ASSERT_EQ(second.payouts.size(), 1u);
  EXPECT_EQ(second.payouts[0].payout_id, "auto-p1-2");  // p1's latest; auto-p1-1 is older
  // The events alone, as a crash would leave them.
  ASSERT_TRUE(ask<command_reply>(rt_.payouts, std::string("auto-p1-1"),
                                 domain::payout::command{domain::fail_payout{"auto-p1-1", "bounced"}}));
  ASSERT_TRUE(ask<command_reply>(rt_.payouts, std::string("auto-p2-1"),
                                 domain::payout::command{domain::settle_payout{"auto-p2-1", "bank-7"}}));
  EXPECT_FALSE(payouts_match_ledger({"auto-p1-1", "auto-p1-2", "auto-p2-1"}));
  stop();
  start();

  const auto report = run_payouts();
  EXPECT_TRUE(report.problems.empty()) << report.problems.front();
  ASSERT_EQ(report.payouts.size(), 2u);
  EXPECT_EQ(report.payouts[0], (payout_entry{"auto-p1-1", "p1", 12 * usd, domain::payout_status::failed, true}));
  EXPECT_EQ(report.payouts[1], (payout_entry{"auto-p2-1", "p2", 11 * usd, domain::payout_status::settled, true}));
  EXPECT_EQ(balance("provider-p1"), 12 * usd);  // the failed payout's money came back
  EXPECT_EQ(balance("payouts_in_flight"), 10 * usd);  // auto-p1-2 only
  EXPECT_TRUE(payouts_match_ledger({"auto-p1-1", "auto-p1-2", "auto-p2-1"}));
  EXPECT_TRUE(run_payouts().payouts.empty());
  EXPECT_EQ(verify_log(), 3u);
}

TEST_F(payout_runner_test, a_payout_whose_money_the_ledger_returned_cannot_be_settled) {
  // A build that moved the money first could crash after a fail's movement, before its event:
  // a later settle would then pay out money that went back to the provider, taken from the other
  // open payouts in payouts_in_flight.
  start();
  earn("p1", 12 * usd);
  earn("p2", 11 * usd);
  ASSERT_EQ(run_payouts().payouts.size(), 2u);
  ASSERT_TRUE(ask<command_reply>(
      rt_.ledger, domain::ledger::command{domain::payout_fail_transfers("auto-p1-1", "p1", 12 * usd)}));

  auto settled = ask<payout_entry>(rt_.payout_runner, settle_atom::value, std::string("auto-p1-1"),
                                   std::string("bank-1"));
  ASSERT_FALSE(settled);
  EXPECT_EQ(refusal_code(settled.error()), domain::errc::invalid_state);
  EXPECT_NE(describe(settled.error()).find("send the same fail again"), std::string::npos)
      << describe(settled.error());
  EXPECT_EQ(payout("auto-p1-1").status, domain::payout_status::requested);
  EXPECT_EQ(balance("payouts_in_flight"), 11 * usd);  // auto-p2-1's money is untouched

  auto failed = ask<payout_entry>(rt_.payout_runner, fail_atom::value, std::string("auto-p1-1"),
                                  std::string("bounced"));
  ASSERT_TRUE(failed) << describe(failed.error());
  EXPECT_EQ(failed.value().status, domain::payout_status::failed);
  EXPECT_EQ(balance("provider-p1"), 12 * usd);  // returned once
  EXPECT_TRUE(payouts_match_ledger({"auto-p1-1", "auto-p2-1"}));
  EXPECT_EQ(verify_log(), 2u);
}

TEST_F(payout_runner_test, a_payout_with_neither_event_reaching_the_log_is_requested_normally) {
  start();
  earn("p1", 12 * usd);
  stop();  // the run never started, or died before its first append
  start();
  const auto report = run_payouts();
  ASSERT_EQ(report.payouts.size(), 1u);
  EXPECT_FALSE(report.payouts[0].reconciled);
  EXPECT_EQ(verify_log(), 1u);
}

}  // namespace
}  // namespace gpustream::actors
