// Payouts: the automatic rule, request/settle/fail decisions and their idempotency, evolve, and the
// ledger movements of each step (the money returns when a payout fails).
#include <gtest/gtest.h>

#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "domain/ledger.hpp"
#include "domain/payout.hpp"

namespace gpustream::domain {
namespace {

using events::transfer_kind;

constexpr std::int64_t hour_us = std::int64_t{3600} * 1'000'000;
constexpr std::int64_t now = 1'700'000'000'000'000;

bool contains(const std::string& text, std::string_view part) {
  return text.find(part) != std::string::npos;
}

void expect_refused(const decision& d, errc code, std::string_view part) {
  ASSERT_FALSE(d.has_value());
  EXPECT_EQ(d.error().code, code) << d.error().message;
  EXPECT_TRUE(contains(d.error().message, part)) << d.error().message;
}

/// Decides and, when decided, evolves.
decision run(payout::state& state, const payout::command& command, std::int64_t at_us = now) {
  auto d = payout::decide(state, command, at_us);
  if (d) {
    for (const auto& e : *d) state = payout::evolve(std::move(state), e);
  }
  return d;
}

payout::state requested(std::int64_t amount = 400) {
  payout::state state;
  EXPECT_TRUE(run(state, request_payout{"po1", "p1", amount, false, 1000}).has_value());
  return state;
}

// ---------------------------------------------------------------------------------------------
// The automatic rule.

TEST(payout_automatic, defaults_are_ten_usd_and_a_day) {
  const payout_options options;
  EXPECT_EQ(options.threshold_micros, 10'000'000);
  EXPECT_EQ(options.interval_min_us, 24 * hour_us);
}

TEST(payout_automatic, is_due_from_the_threshold_on) {
  const payout_options options;
  EXPECT_FALSE(automatic_payout_due(9'999'999, std::nullopt, now, options));
  EXPECT_TRUE(automatic_payout_due(10'000'000, std::nullopt, now, options));
  EXPECT_TRUE(automatic_payout_due(50'000'000, std::nullopt, now, options));
}

TEST(payout_automatic, waits_interval_min_us_after_the_last_automatic_payout) {
  const payout_options options;
  const std::int64_t last = now - 24 * hour_us;
  EXPECT_TRUE(automatic_payout_due(10'000'000, last, now, options));
  EXPECT_FALSE(automatic_payout_due(10'000'000, last + 1, now, options));
  EXPECT_FALSE(automatic_payout_due(10'000'000, now, now, options));
  payout_options hourly;
  hourly.interval_min_us = hour_us;
  EXPECT_TRUE(automatic_payout_due(10'000'000, now - hour_us, now, hourly));
  // Times too far apart for an int64 difference still count as long enough.
  EXPECT_TRUE(automatic_payout_due(10'000'000, std::numeric_limits<std::int64_t>::min(),
                                   std::numeric_limits<std::int64_t>::max(), options));
}

TEST(payout_automatic, never_pays_out_nothing_even_with_a_zero_threshold) {
  payout_options options;
  options.threshold_micros = 0;
  EXPECT_FALSE(automatic_payout_due(0, std::nullopt, now, options));
  EXPECT_FALSE(automatic_payout_due(-5, std::nullopt, now, options));
  EXPECT_TRUE(automatic_payout_due(1, std::nullopt, now, options));
}

// ---------------------------------------------------------------------------------------------
// Request.

TEST(payout_request, records_the_request) {
  payout::state state;
  const auto d = run(state, request_payout{"po1", "p1", 400, true, 1000});
  ASSERT_TRUE(d.has_value()) << d.error().message;
  ASSERT_EQ(d->size(), 1u);
  EXPECT_EQ(std::get<events::payout_requested>(d->front()),
            (events::payout_requested{"po1", "p1", 400, true, now}));
  EXPECT_EQ(state.status, payout_status::requested);
  EXPECT_EQ(state.payout_id, "po1");
  EXPECT_EQ(state.provider_id, "p1");
  EXPECT_EQ(state.amount_micros, 400);
  EXPECT_TRUE(state.automatic);
  EXPECT_EQ(state.requested_at_us, now);
  EXPECT_EQ(payout_stream("po1"), "payout-po1");
}

TEST(payout_request, never_exceeds_the_balance) {
  payout::state state;
  expect_refused(run(state, request_payout{"po1", "p1", 1001, false, 1000}),
                 errc::insufficient_funds, "holds 1000 micro-USD");
  EXPECT_EQ(state.status, payout_status::none);
  EXPECT_TRUE(run(state, request_payout{"po1", "p1", 1000, false, 1000}).has_value());
}

TEST(payout_request, malformed_requests_are_invalid_argument) {
  payout::state state;
  const std::string long_text(payout_text_length_max + 1, 'x');
  expect_refused(run(state, request_payout{"po1", "p1", 0, false, 1000}), errc::invalid_argument,
                 "must be positive");
  expect_refused(run(state, request_payout{"po1", "p1", -3, false, 1000}), errc::invalid_argument,
                 "-3 micro-USD");
  expect_refused(run(state, request_payout{"", "p1", 1, false, 1000}), errc::invalid_argument,
                 "payout id must not be empty");
  expect_refused(run(state, request_payout{"po1", "", 1, false, 1000}), errc::invalid_argument,
                 "provider id must not be empty");
  expect_refused(run(state, request_payout{long_text, "p1", 1, false, 1000}),
                 errc::invalid_argument, "payout_text_length_max");
  EXPECT_TRUE(run(state, request_payout{std::string(payout_text_length_max, 'x'), "p1", 1, false,
                                        1000})
                  .has_value());
}

TEST(payout_request, asking_again_is_idempotent_and_other_content_is_already_exists) {
  auto state = requested();
  const auto before = state;
  // The balance has dropped by the payout meanwhile; the retry still changes nothing.
  const auto again = run(state, request_payout{"po1", "p1", 400, false, 600});
  ASSERT_TRUE(again.has_value()) << again.error().message;
  EXPECT_TRUE(again->empty());
  expect_refused(run(state, request_payout{"po1", "p1", 500, false, 1000}), errc::already_exists,
                 "400 micro-USD");
  expect_refused(run(state, request_payout{"po1", "p2", 400, false, 1000}), errc::already_exists,
                 "\"p1\"");
  expect_refused(run(state, request_payout{"po2", "p1", 400, false, 1000}), errc::invalid_argument,
                 "sent to payout \"po1\"");
  EXPECT_EQ(state, before);
}

// ---------------------------------------------------------------------------------------------
// Settle and fail.

TEST(payout_settle, settles_once_and_refuses_another_reference) {
  payout::state none;
  expect_refused(run(none, settle_payout{"po1", "ref"}), errc::not_found, "never requested");

  auto state = requested();
  expect_refused(run(state, settle_payout{"po1", ""}), errc::invalid_argument,
                 "external reference must not be empty");
  const auto d = run(state, settle_payout{"po1", "stripe-1"}, now + 5);
  ASSERT_TRUE(d.has_value()) << d.error().message;
  EXPECT_EQ(std::get<events::payout_settled>(d->front()),
            (events::payout_settled{"po1", "stripe-1", now + 5}));
  EXPECT_EQ(state.status, payout_status::settled);
  EXPECT_EQ(state.closed_at_us, now + 5);
  EXPECT_EQ(state.external_reference, "stripe-1");

  const auto again = run(state, settle_payout{"po1", "stripe-1"});
  ASSERT_TRUE(again.has_value());
  EXPECT_TRUE(again->empty());
  expect_refused(run(state, settle_payout{"po1", "stripe-2"}), errc::already_exists,
                 "double payment");
  expect_refused(run(state, fail_payout{"po1", "bounced"}), errc::invalid_state, "already settled");
}

TEST(payout_fail, fails_once_and_a_failed_payout_cannot_settle) {
  payout::state none;
  expect_refused(run(none, fail_payout{"po1", "r"}), errc::not_found, "never requested");

  auto state = requested();
  expect_refused(run(state, fail_payout{"po1", ""}), errc::invalid_argument,
                 "failure reason must not be empty");
  const auto d = run(state, fail_payout{"po1", "account closed"}, now + 9);
  ASSERT_TRUE(d.has_value()) << d.error().message;
  EXPECT_EQ(std::get<events::payout_failed>(d->front()),
            (events::payout_failed{"po1", "account closed", now + 9}));
  EXPECT_EQ(state.status, payout_status::failed);
  EXPECT_EQ(state.failure_reason, "account closed");
  EXPECT_EQ(state.closed_at_us, now + 9);

  const auto again = run(state, fail_payout{"po1", "account closed"});
  ASSERT_TRUE(again.has_value());
  EXPECT_TRUE(again->empty());
  expect_refused(run(state, settle_payout{"po1", "stripe-1"}), errc::invalid_state,
                 "account closed");
}

TEST(payout_evolve, ignores_events_out_of_order_or_of_other_payouts) {
  payout::state none;
  EXPECT_EQ(payout::evolve(none, events::event{events::payout_settled{"po1", "r", 1}}), none);
  EXPECT_EQ(payout::evolve(none, events::event{events::payout_failed{"po1", "r", 1}}), none);
  EXPECT_EQ(payout::evolve(none, events::event{events::user_credited{}}), none);
  const auto state = requested();
  EXPECT_EQ(payout::evolve(state, events::event{events::payout_settled{"po2", "r", 1}}), state);
  EXPECT_EQ(payout::evolve(state, events::event{events::payout_requested{"po1", "p9", 1, false, 1}}),
            state);
}

// ---------------------------------------------------------------------------------------------
// Ledger movements.

TEST(payout_movements, each_step_moves_the_money_the_documented_way) {
  EXPECT_EQ(payout_request_transfers("po1", "p1", 400),
            (record_transfers{"payout-po1/request",
                              {transfer{"payout-po1/request", "provider-p1", "payouts_in_flight", 400,
                                        transfer_kind::payout, "po1"}}}));
  EXPECT_EQ(payout_settle_transfers("po1", 400),
            (record_transfers{"payout-po1/settle",
                              {transfer{"payout-po1/settle", "payouts_in_flight", "external", 400,
                                        transfer_kind::payout, "po1"}}}));
  EXPECT_EQ(payout_fail_transfers("po1", "p1", 400),
            (record_transfers{"payout-po1/fail",
                              {transfer{"payout-po1/fail", "payouts_in_flight", "provider-p1", 400,
                                        transfer_kind::payout, "po1"}}}));
}

TEST(payout_movements, payout_movement_follows_the_decided_event) {
  payout::state none;
  const auto request = payout::decide(none, request_payout{"po1", "p1", 400, false, 1000}, now);
  ASSERT_TRUE(request.has_value());
  EXPECT_EQ(payout_movement(none, request->front()), payout_request_transfers("po1", "p1", 400));
  const auto state = requested();
  const auto settle = payout::decide(state, settle_payout{"po1", "ref"}, now);
  ASSERT_TRUE(settle.has_value());
  EXPECT_EQ(payout_movement(state, settle->front()), payout_settle_transfers("po1", 400));
  const auto fail = payout::decide(state, fail_payout{"po1", "why"}, now);
  ASSERT_TRUE(fail.has_value());
  EXPECT_EQ(payout_movement(state, fail->front()), payout_fail_transfers("po1", "p1", 400));
}

TEST(payout_movements, a_failed_payout_returns_the_money_and_a_settled_one_leaves) {
  ledger::state ledger_state;
  auto apply = [&](const record_transfers& group) {
    auto d = ledger::decide(ledger_state, group, now);
    if (d) {
      for (const auto& e : *d) ledger_state = ledger::evolve(std::move(ledger_state), e);
    }
    return d;
  };
  ASSERT_TRUE(apply(record_transfers{"earn", {transfer{"earn", "subsidy", "provider-p1", 1000,
                                                      transfer_kind::free_tier_subsidy, "j"}}})
                  .has_value());
  // The ledger refuses a request beyond the balance even if the payout decide was skipped.
  const auto too_much = apply(payout_request_transfers("po0", "p1", 1001));
  ASSERT_FALSE(too_much.has_value());
  EXPECT_EQ(too_much.error().code, errc::insufficient_funds);

  ASSERT_TRUE(apply(payout_request_transfers("po1", "p1", 400)).has_value());
  EXPECT_EQ(balance_micros(ledger_state, "provider-p1"), 600);
  EXPECT_EQ(balance_micros(ledger_state, "payouts_in_flight"), 400);
  ASSERT_TRUE(apply(payout_fail_transfers("po1", "p1", 400)).has_value());
  EXPECT_EQ(balance_micros(ledger_state, "provider-p1"), 1000);
  EXPECT_EQ(balance_micros(ledger_state, "payouts_in_flight"), 0);

  ASSERT_TRUE(apply(payout_request_transfers("po2", "p1", 1000)).has_value());
  ASSERT_TRUE(apply(payout_settle_transfers("po2", 1000)).has_value());
  EXPECT_EQ(balance_micros(ledger_state, "provider-p1"), 0);
  EXPECT_EQ(balance_micros(ledger_state, "payouts_in_flight"), 0);
  EXPECT_EQ(balance_micros(ledger_state, "external"), 1000);  // paid to the outside world
  EXPECT_EQ(balance_micros(ledger_state, "subsidy"), -1000);
  // Settling twice through the ledger is one settlement.
  const auto again = apply(payout_settle_transfers("po2", 1000));
  ASSERT_TRUE(again.has_value());
  EXPECT_TRUE(again->empty());
  EXPECT_TRUE(check_ledger(ledger_state).has_value());
}

// ---------------------------------------------------------------------------------------------
// Cross-check with the ledger.

/// A ledger and payouts kept in step the way the actors are meant to: ledger group, then event.
struct payout_books {
  ledger::state ledger_state;
  std::vector<payout::state> payouts;

  void record(const record_transfers& group) {
    const auto d = ledger::decide(ledger_state, group, now);
    ASSERT_TRUE(d.has_value()) << d.error().message;
    for (const auto& e : *d) ledger_state = ledger::evolve(std::move(ledger_state), e);
  }

  void step(std::size_t index, const payout::command& command) {
    auto& p = payouts[index];
    const auto d = payout::decide(p, command, now);
    ASSERT_TRUE(d.has_value()) << d.error().message;
    record(payout_movement(p, d->front()));
    p = payout::evolve(std::move(p), d->front());
  }
};

payout_books three_payouts() {
  payout_books books;
  books.record(record_transfers{"earn", {transfer{"earn", "subsidy", "provider-p1", 1000,
                                                  transfer_kind::free_tier_subsidy, "j"}}});
  books.payouts.resize(3);
  books.step(0, request_payout{"a", "p1", 100, false, 1000});
  books.step(1, request_payout{"b", "p1", 200, false, 900});
  books.step(2, request_payout{"c", "p1", 300, false, 700});
  books.step(1, settle_payout{"b", "ref-b"});
  books.step(2, fail_payout{"c", "closed"});
  return books;
}

TEST(payout_ledger_check, payouts_kept_in_step_with_the_ledger_pass) {
  const auto books = three_payouts();
  const auto ok = check_payouts_against_ledger(books.ledger_state, books.payouts);
  EXPECT_TRUE(ok.has_value()) << ok.error().message;
  EXPECT_EQ(balance_micros(books.ledger_state, "payouts_in_flight"), 100);
}

TEST(payout_ledger_check, reports_a_missing_or_different_movement) {
  auto books = three_payouts();
  books.payouts[0].amount_micros = 150;  // the payout says 150, the ledger moved 100
  auto broken = check_payouts_against_ledger(books.ledger_state, books.payouts);
  ASSERT_FALSE(broken.has_value());
  EXPECT_TRUE(contains(broken.error().message, "\"payout-a/request\" moves 100 micro-USD"))
      << broken.error().message;

  books = three_payouts();
  books.payouts[1].status = payout_status::requested;  // the ledger settled it, the payout did not
  broken = check_payouts_against_ledger(books.ledger_state, books.payouts);
  ASSERT_FALSE(broken.has_value());
  EXPECT_TRUE(contains(broken.error().message, "should not have ledger transfer \"payout-b/settle\""))
      << broken.error().message;
}

TEST(payout_ledger_check, reports_money_moved_for_an_unrecorded_payout) {
  auto books = three_payouts();
  books.record(payout_request_transfers("lost", "p1", 50));  // the payout event never made it
  const auto broken = check_payouts_against_ledger(books.ledger_state, books.payouts);
  ASSERT_FALSE(broken.has_value());
  EXPECT_TRUE(contains(broken.error().message, "\"payout-lost/request\" moves 50 micro-USD"))
      << broken.error().message;
}

TEST(payout_ledger_check, reports_in_flight_money_that_open_payouts_do_not_explain) {
  auto books = three_payouts();
  books.ledger_state.balances_micros["payouts_in_flight"] = 130;
  const auto broken = check_payouts_against_ledger(books.ledger_state, books.payouts);
  ASSERT_FALSE(broken.has_value());
  EXPECT_TRUE(contains(broken.error().message, "holds 130 micro-USD but open payouts total 100"))
      << broken.error().message;
}

}  // namespace
}  // namespace gpustream::domain
