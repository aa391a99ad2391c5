// The ledger actor's query: the balances and transfers asked for, never a copy of the whole
// ledger (a payout run asks for the providers' balances and the payout transfers only).

#include "actors/ledger_actor.hpp"

#include <gtest/gtest.h>

#include <map>
#include <string>

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

}  // namespace
}  // namespace gpustream::actors
