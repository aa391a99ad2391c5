#include "tests/app/example_store.hpp"

#include <gtest/gtest.h>

#include <cstdint>
#include <map>
#include <memory>
#include <set>
#include <sstream>
#include <string>
#include <utility>
#include <variant>
#include <vector>

#include "actors/ledger_claims.hpp"
#include "events/codec.hpp"
#include "tests/events/event_examples.hpp"
#include "tests/storage/store_testing.hpp"

namespace gpustream::app::testing {
namespace {

/// Events for one stream in one append.
struct stream_part {
  std::string stream;
  std::vector<events::event> events;
};

using example_append = std::vector<stream_part>;

/// A copy of the example of type T, to be adapted to the story.
template <class T>
T example(const std::vector<events::event>& examples) {
  return std::get<T>(examples.at(events::event{T{}}.index()));
}

events::transfer_recorded transfer(const std::vector<events::event>& examples, std::string id, std::string debit,
                                   std::string credit, std::int64_t amount, events::transfer_kind kind) {
  auto t = example<events::transfer_recorded>(examples);
  t.transfer_id = id;
  t.linked_group_id = std::move(id);
  t.debit_account = std::move(debit);
  t.credit_account = std::move(credit);
  t.amount_micros = amount;
  t.kind = kind;
  return t;
}

/// Users ada (premium, 25 USD deposited) and bob (free), provider 17.
std::vector<example_append> people(const std::vector<events::event>& ex) {
  auto ada = example<events::user_created>(ex);
  ada.user_id = "ada";
  auto issued = example<events::api_key_issued>(ex);
  issued.user_id = "ada";
  auto revoked = example<events::api_key_revoked>(ex);
  revoked.user_id = "ada";
  auto credited = example<events::user_credited>(ex);
  credited.user_id = "ada";
  auto bob = example<events::user_created>(ex);
  bob.user_id = "bob";
  bob.tier = events::user_tier::free;
  auto used = example<events::free_tokens_used>(ex);
  used.user_id = "bob";
  auto upgraded = example<events::user_tier_changed>(ex);
  upgraded.user_id = "bob";
  auto created = example<events::provider_created>(ex);
  created.provider_id = "17";
  auto connected = example<events::provider_connected>(ex);
  connected.provider_id = "17";
  auto advertised = example<events::models_advertised>(ex);
  advertised.provider_id = "17";
  auto disconnected = example<events::provider_disconnected>(ex);
  disconnected.provider_id = "17";
  auto suspended = example<events::provider_suspended>(ex);
  suspended.provider_id = "17";
  auto scored = example<events::provider_scored>(ex);
  scored.provider_id = "17";
  auto achieved = example<events::achievement_unlocked>(ex);
  achieved.provider_id = "17";
  auto suspicion = example<events::suspicion_recorded>(ex);
  suspicion.provider_id = "17";
  auto token_replaced = example<events::provider_token_replaced>(ex);
  token_replaced.provider_id = "17";
  return {
      {{"user-ada", {ada, issued, revoked, credited}},
       {"ledger", {transfer(ex, "deposit-" + credited.deposit_id, "external", "user-ada", credited.amount_micros,
                            events::transfer_kind::deposit)}}},
      {{"user-bob", {bob, used, upgraded}}, {"provider-17", {created, connected, advertised}}},
      {{"provider-17", {disconnected, suspended, scored, achieved, suspicion, token_replaced}}},
  };
}

/// Job 1 completes on provider 17 and is billed; job 2 is reassigned and fails; job 3 is cancelled.
std::vector<example_append> jobs(const std::vector<events::event>& ex) {
  std::vector<events::event> one, two, three;
  auto submitted = example<events::job_submitted>(ex);
  auto queued = example<events::job_queued>(ex);
  auto assigned = example<events::job_assigned>(ex);
  assigned.attempt = 1;
  auto started = example<events::job_started>(ex);
  auto completed = example<events::job_completed>(ex);
  submitted.job_id = queued.job_id = assigned.job_id = started.job_id = completed.job_id = "1";
  submitted.user_id = "ada";
  assigned.provider_id = started.provider_id = completed.provider_id = "17";
  auto fee = transfer(ex, "job-1/fee", "provider-17", "platform", 123, events::transfer_kind::platform_fee);
  auto usage = transfer(ex, "job-1/usage", "user-ada", "provider-17", 4'000, events::transfer_kind::usage);
  usage.linked_group_id = fee.linked_group_id = "job-1";
  // Its end records the bill that the ledger's group then applies (actors/scheduler).
  completed.bill.group_id = "job-1";
  for (const auto& t : {usage, fee}) {
    completed.bill.transfers.push_back(
        {t.transfer_id, t.debit_account, t.credit_account, t.amount_micros, t.kind, t.reference});
  }
  one = {submitted, queued, assigned, started, completed};

  auto reassigned = example<events::job_reassigned>(ex);
  auto failed = example<events::job_failed>(ex);
  submitted.job_id = queued.job_id = assigned.job_id = started.job_id = reassigned.job_id = failed.job_id = "2";
  assigned.provider_id = started.provider_id = reassigned.from_provider_id = "23";
  two = {submitted, queued, assigned, started, reassigned, failed};

  auto cancelled = example<events::job_cancelled>(ex);
  submitted.job_id = queued.job_id = cancelled.job_id = "3";
  three = {submitted, queued, cancelled};

  return {
      {{"job-1", one}, {"ledger", {usage, fee}}},
      {{"job-2", two}, {"job-3", three}},
  };
}

/// Campaign 1 is funded with one impression's worth (2,500 at a CPM of 2.5 USD), serves one
/// impression of 2,250 (after a reservation released unserved, and an impression voided because its
/// answer was not settled) and is exhausted.
std::vector<example_append> campaign(const std::vector<events::event>& ex) {
  auto created = example<events::campaign_created>(ex);
  auto funded = example<events::campaign_funded>(ex);
  funded.amount_micros = 2'500;
  auto paused = example<events::campaign_paused>(ex);
  auto resumed = example<events::campaign_resumed>(ex);
  auto released_reservation = example<events::ad_reserved>(ex);
  auto released = example<events::ad_reservation_released>(ex);
  auto reserved = example<events::ad_reserved>(ex);
  auto impression = example<events::impression_recorded>(ex);
  reserved.reservation_id = impression.impression_id;
  reserved.job_id = impression.job_id;
  auto voided = example<events::impression_voided>(ex);
  voided.impression_id = "imp-79";
  auto voided_reservation = example<events::ad_reserved>(ex);
  voided_reservation.reservation_id = voided.impression_id;
  auto voided_impression = example<events::impression_recorded>(ex);
  voided_impression.impression_id = voided.impression_id;
  voided_reservation.campaign_id = voided_impression.campaign_id = voided.campaign_id = "1";
  auto clicked = example<events::ad_clicked>(ex);
  auto exhausted = example<events::campaign_exhausted>(ex);
  exhausted.spent_micros = impression.price_micros;
  created.campaign_id = funded.campaign_id = paused.campaign_id = resumed.campaign_id = "1";
  released_reservation.campaign_id = released.campaign_id = reserved.campaign_id = "1";
  impression.campaign_id = clicked.campaign_id = exhausted.campaign_id = "1";
  return {
      {{"campaign-1", {created, funded}},
       {"ledger", {transfer(ex, "campaign-1/funded-2", "external", "campaign-1", funded.amount_micros,
                            events::transfer_kind::deposit)}}},
      {{"campaign-1", {paused, resumed, released_reservation, released, voided_reservation, voided_impression, voided,
                       reserved, impression, clicked, exhausted}},
       {"ledger", {transfer(ex, impression.impression_id, "campaign-1", "platform", impression.price_micros,
                            events::transfer_kind::ad_spend)}}},
  };
}

/// Provider 17 earned 3,877 (4,000 - 123): payout 1 of 3,000 settles, payout 2 of 500 fails and the
/// money returns. Each step moves the money in the ledger before the payout event, as the actors do.
std::vector<example_append> payouts(const std::vector<events::event>& ex) {
  auto first = example<events::payout_requested>(ex);
  first.payout_id = "1";
  first.provider_id = "17";
  first.amount_micros = 3'000;
  auto settled = example<events::payout_settled>(ex);
  settled.payout_id = "1";
  auto second = first;
  second.payout_id = "2";
  second.amount_micros = 500;
  auto failed = example<events::payout_failed>(ex);
  failed.payout_id = "2";
  const auto payout = events::transfer_kind::payout;
  return {
      {{"ledger", {transfer(ex, "payout-1/request", "provider-17", "payouts_in_flight", 3'000, payout)}},
       {"payout-1", {first}}},
      {{"ledger", {transfer(ex, "payout-1/settle", "payouts_in_flight", "external", 3'000, payout)}},
       {"payout-1", {settled}}},
      {{"ledger", {transfer(ex, "payout-2/request", "provider-17", "payouts_in_flight", 500, payout)}},
       {"payout-2", {second}}},
      {{"ledger", {transfer(ex, "payout-2/fail", "payouts_in_flight", "provider-17", 500, payout)}},
       {"payout-2", {failed}}},
  };
}

/// Each inner vector is one append. The story is sound (replay --verify passes): ids fit their
/// streams, amounts balance. Several types appear more than once; many appends touch several
/// streams; user-ada, provider-17, campaign-1 and ledger are appended to more than once.
std::vector<example_append> example_appends() {
  const auto examples = events::event_examples();
  std::vector<example_append> appends;
  for (auto part : {people(examples), jobs(examples), campaign(examples), payouts(examples)}) {
    for (auto& append : part) appends.push_back(std::move(append));
  }
  // Types added to the catalog after this file was written still get replayed: one more append
  // (which --verify refuses until the story gives them a place).
  std::set<events::event_type> covered;
  for (const auto& append : appends) {
    for (const auto& part : append) {
      for (const auto& event : part.events) covered.insert(events::type_of(event));
    }
  }
  stream_part uncovered{"other-1", {}};
  for (events::event_type type = 0; type < examples.size(); ++type) {
    if (!covered.contains(type)) uncovered.events.push_back(examples[type]);
  }
  if (!uncovered.events.empty()) appends.push_back({uncovered});
  return appends;
}

}  // namespace

appended_contents fill_with_examples(storage::event_store& store, ledger_claims claims) {
  appended_contents contents;
  contents.events_per_type.assign(events::event_type_count, 0);
  std::map<std::string, std::uint64_t> versions;
  std::uint64_t next_id = 1;
  for (const auto& append : example_appends()) {
    std::vector<storage::stream_append> request;
    for (const auto& part : append) {
      storage::stream_append one{part.stream, versions[part.stream], {}};
      if (part.stream == actors::ledger_stream && claims == ledger_claims::as_the_ledger_does) {
        actors::ledger_key_namer name_keys;
        for (const auto& event : part.events) {
          name_keys(event, [&](std::string key) { one.unique_keys.push_back(std::move(key)); });
        }
      }
      for (const auto& event : part.events) {
        const auto type = events::type_of(event);
        one.events.push_back(
            storage::new_event{storage::testing::make_id(0xa99, next_id++), type, events::encode_payload(event)});
        contents.events_per_type.at(type) += 1;
        contents.events += 1;
      }
      versions[part.stream] += part.events.size();
      contents.streams.insert(part.stream);
      request.push_back(std::move(one));
    }
    auto appended = store.append(std::move(request));
    if (!appended) {
      ADD_FAILURE() << "append failed: " << appended.error().message;
      return contents;
    }
    EXPECT_EQ(appended->first_position, contents.last_position + 1);
    contents.last_position = appended->last_position;
  }
  EXPECT_EQ(contents.last_position, contents.events);
  return contents;
}

appended_contents make_example_store(const std::filesystem::path& directory, ledger_claims claims) {
  auto store = storage::testing::open_or_fail(directory);
  if (!store) return {};
  return fill_with_examples(*store, claims);
}

std::map<std::string, std::uint64_t> named_counts(const std::vector<std::uint64_t>& per_type) {
  std::map<std::string, std::uint64_t> counts;
  for (std::size_t type = 0; type < per_type.size(); ++type) {
    if (per_type[type] == 0) continue;
    counts.emplace(events::type_name(static_cast<events::event_type>(type)), per_type[type]);
  }
  return counts;
}

std::map<std::string, std::uint64_t> text_counts(const std::string& text) {
  std::map<std::string, std::uint64_t> counts;
  std::istringstream lines(text);
  for (std::string line; std::getline(lines, line);) {
    if (line.starts_with("events ")) break;  // the summary line ends the table
    std::istringstream fields(line);
    std::string name;
    std::uint64_t count = 0;
    fields >> name >> count;
    EXPECT_FALSE(fields.fail()) << "not a \"type count\" line: " << line;
    EXPECT_TRUE(counts.emplace(name, count).second) << "type listed twice: " << name;
  }
  return counts;
}

}  // namespace gpustream::app::testing
