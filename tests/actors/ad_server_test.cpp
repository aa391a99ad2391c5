// The ad server on the whole runtime under test_coordinator: campaign creation escrows the budget
// once however often it is retried or wherever it was interrupted; pick -> reserve -> served ->
// charge settled in the ledger; budgets never exceeded over a seeded random walk; frequency caps;
// release and expiry; clicks, also after a restart on the same store; and the domain verifier
// over the log at the end.

#include "actors/ad_server.hpp"

#include <caf/send.hpp>

#include <gtest/gtest.h>

#include <algorithm>
#include <iostream>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "actors/runtime.hpp"
#include "domain/ledger.hpp"
#include "domain/pricing.hpp"
#include "domain/time.hpp"
#include "domain/verifier.hpp"
#include "events/codec.hpp"
#include "storage/fault_injector.hpp"
#include "tests/actors/actor_testing.hpp"

namespace gpustream::actors {
namespace {

class ad_server_test : public testing::deterministic_fixture {
 protected:
  ad_server_test() { start(); }
  ~ad_server_test() override { stop(); }

  /// A runtime on the store in directory_ (reopened after a stop).
  void start(std::vector<std::string> campaign_ids = {}, std::size_t campaigns_max = ad_server_options{}.campaigns_max) {
    storage::store_options store_options;
    store_options.mode = storage::durability::buffered;
    store_options.faults = faults_;
    auto store = storage::event_store::open(directory_.path(), store_options);
    ASSERT_TRUE(store) << store.error().message;
    runtime_options options;
    options.store.wait_for_each_append = true;
    options.persistence.clock_us = clock_.function();
    options.ads.campaign_ids = std::move(campaign_ids);
    options.ads.campaigns_max = campaigns_max;
    options.payouts.run_interval = std::chrono::milliseconds(0);
    rt_ = start_runtime(system_, std::move(store.value()), std::move(options));
    running_ = true;
    run();
  }

  /// Stops every actor of the runtime; the store closes with its actor.
  void stop() {
    if (!running_) return;
    rt_.stop();
    run();
    running_ = false;
  }

  static domain::create_campaign campaign(const std::string& id, std::vector<std::string> keywords,
                                          std::int64_t budget_micros = 1'000'000,
                                          std::uint32_t frequency_cap = 3) {
    return domain::create_campaign{id,
                                   "Acme",
                                   "Title " + id,
                                   "Text of " + id,
                                   "https://" + id + ".example/landing",
                                   std::move(keywords),
                                   {},
                                   2'000'000,  // 2 USD CPM: 2,000 micro-USD per impression at most
                                   budget_micros,
                                   budget_micros,
                                   frequency_cap};
  }

  std::string create(const domain::create_campaign& c) {
    auto id = ask<std::string>(rt_.ad_server, c);
    EXPECT_TRUE(id) << describe(id.error());
    return id ? id.value() : std::string{};
  }

  std::optional<served_ad> pick(const std::string& job_id, const std::string& user_id,
                                const std::string& prompt) {
    auto picked = ask<ad_pick>(rt_.ad_server, ad_request{job_id, user_id, prompt, 0});
    EXPECT_TRUE(picked) << describe(picked.error());
    return picked ? picked.value().ad : std::nullopt;
  }

  std::int64_t balance(const std::string& account) {
    auto balances = ask<ledger_aggregate::answer>(rt_.ledger, ledger_aggregate::query{.accounts = {account}});
    EXPECT_TRUE(balances);
    return balances ? balances.value().balances.at(account) : -1;
  }

  domain::campaign_state campaign_state(const std::string& id) {
    auto state = ask<domain::campaign_state>(rt_.campaigns, id, state_atom::value);
    EXPECT_TRUE(state) << describe(state.error());
    return state ? state.value() : domain::campaign_state{};
  }

  /// Sends a pick without running the system, so that several are decided on the same cache.
  using pick_handle =
      caf::response_handle<caf::blocking_actor,
                           caf::response_type_t<ad_server_actor::signatures, ad_request>, true>;
  pick_handle send_pick(ad_request request) {
    return self_->request(rt_.ad_server, caf::infinite, std::move(request));
  }

  ad_server_counts counts() {
    auto c = ask<ad_server_counts>(rt_.ad_server, count_atom::value);
    EXPECT_TRUE(c);
    return c ? c.value() : ad_server_counts{};
  }

  /// Settles a free job that carried `charge` in the ledger, as the scheduler does: the ad spend
  /// is a transfer of the job's group.
  void settle(const std::string& job_id, const domain::ad_charge& charge) {
    domain::job_bill bill{.job_id = job_id,
                          .user_id = "free-user",
                          .provider_id = "p1",
                          .premium = false,
                          .outcome = domain::job_outcome::completed,
                          .price = {},
                          .quality = events::quality_tier::standard,
                          .prompt_tokens = 10,
                          .completion_tokens = 10,
                          .ad = charge};
    auto settled = domain::settle_job(bill, {});
    ASSERT_TRUE(settled) << settled.error().message;
    ASSERT_EQ(settled.value().group.transfers.size(), 1u);
    auto recorded = ask<command_reply>(rt_.ledger, domain::ledger::command{settled.value().group});
    ASSERT_TRUE(recorded) << describe(recorded.error());
  }

  static domain::errc refusal_code(const caf::error& e) {
    auto d = domain_error_of(e);
    EXPECT_TRUE(d) << describe(e);
    return d ? d->code : domain::errc::invalid_argument;
  }

  /// Stops the runtime and feeds the whole log to the domain verifier; fails the test with the
  /// first violation.
  void verify_log() {
    stop();
    storage::store_options options;
    options.read_only = true;
    auto store = storage::event_store::open(directory_.path(), options);
    ASSERT_TRUE(store) << store.error().message;
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
    ASSERT_TRUE(scanned) << scanned.error().message;
    auto finished = verifier.finish();
    ASSERT_TRUE(finished) << domain::describe(finished.error());
    EXPECT_GT(finished.value().campaigns, 0u);
  }

  testing::manual_clock clock_;
  std::shared_ptr<storage::fault_injector> faults_ = std::make_shared<storage::fault_injector>();
  runtime rt_;
  bool running_ = false;
};

TEST_F(ad_server_test, creating_a_campaign_escrows_its_budget_once_however_often_it_is_sent) {
  const auto c1 = campaign("c1", {"rust"}, 5'000'000);
  EXPECT_EQ(create(c1), "c1");
  EXPECT_EQ(balance("campaign-c1"), 5'000'000);
  EXPECT_EQ(balance("external"), -5'000'000);
  auto state = campaign_state("c1");
  EXPECT_EQ(state.funded_micros, 5'000'000);
  EXPECT_EQ(state.budget_micros, 5'000'000);

  // The same command again: nothing moves, nothing is appended.
  EXPECT_EQ(create(c1), "c1");
  EXPECT_EQ(balance("campaign-c1"), 5'000'000);
  EXPECT_EQ(campaign_state("c1"), state);

  // Other settings under the same id: refused before any money moves.
  auto other = c1;
  other.budget_micros = 9'000'000;
  other.daily_budget_micros = 9'000'000;
  auto refused = ask<std::string>(rt_.ad_server, other);
  ASSERT_FALSE(refused);
  EXPECT_EQ(refusal_code(refused.error()), domain::errc::already_exists);
  EXPECT_EQ(balance("campaign-c1"), 5'000'000);

  // Invalid campaigns and ids are refused before anything is recorded.
  auto bad_url = campaign("c2", {"rust"});
  bad_url.url = "ftp://nowhere";
  auto invalid = ask<std::string>(rt_.ad_server, bad_url);
  ASSERT_FALSE(invalid);
  EXPECT_EQ(refusal_code(invalid.error()), domain::errc::invalid_argument);
  auto dotted = ask<std::string>(rt_.ad_server, campaign("c.3", {"rust"}));
  ASSERT_FALSE(dotted);
  EXPECT_EQ(refusal_code(dotted.error()), domain::errc::invalid_argument);
  // campaign_id_length_max (48): an id is part of every impression id.
  auto long_id = ask<std::string>(rt_.ad_server, campaign(std::string(49, 'c'), {"rust"}));
  ASSERT_FALSE(long_id);
  EXPECT_EQ(refusal_code(long_id.error()), domain::errc::invalid_argument);
  EXPECT_NE(describe(long_id.error()).find("is 49 bytes long; at most 48 are allowed"), std::string::npos)
      << describe(long_id.error());
  EXPECT_TRUE(ask<std::string>(rt_.ad_server, campaign(std::string(48, 'c'), {"rust"}))) << "at the limit";
  EXPECT_EQ(balance("campaign-c2"), 0);
  EXPECT_FALSE(campaign_state("c2").created);
  // A bid below the auction's floor would never be shown while its budget sat in escrow.
  auto below_floor = campaign("c4", {"rust"});
  below_floor.cpm_bid_micros = domain::auction_options{}.floor_cpm_micros - 1;
  auto never_shown = ask<std::string>(rt_.ad_server, below_floor);
  ASSERT_FALSE(never_shown);
  EXPECT_EQ(refusal_code(never_shown.error()), domain::errc::invalid_argument);
  EXPECT_NE(describe(never_shown.error()).find("below the auction's floor of 100000"), std::string::npos)
      << describe(never_shown.error());
  EXPECT_EQ(balance("campaign-c4"), 0);
  EXPECT_FALSE(campaign_state("c4").created);
  verify_log();
}

TEST_F(ad_server_test, a_creation_interrupted_after_any_step_is_completed_by_sending_it_again) {
  // Interrupted after step 1: the campaign exists, nothing is funded.
  const auto a = campaign("after-create", {"rust"}, 3'000'000);
  ASSERT_TRUE(ask<command_reply>(rt_.campaigns, a.campaign_id, domain::campaign::command{a}));
  // Interrupted after step 2: the campaign exists and the ledger holds its escrow.
  const auto b = campaign("after-deposit", {"rust"}, 4'000'000);
  ASSERT_TRUE(ask<command_reply>(rt_.campaigns, b.campaign_id, domain::campaign::command{b}));
  ASSERT_TRUE(ask<command_reply>(
      rt_.ledger, domain::ledger::command{domain::campaign_deposit(
                      "campaign-after-deposit/budget", "after-deposit", 4'000'000)}));
  EXPECT_EQ(campaign_state("after-deposit").funded_micros, 0);

  EXPECT_EQ(create(a), "after-create");
  EXPECT_EQ(create(b), "after-deposit");
  EXPECT_EQ(balance("campaign-after-create"), 3'000'000);
  EXPECT_EQ(balance("campaign-after-deposit"), 4'000'000);  // not deposited twice
  EXPECT_EQ(balance("external"), -7'000'000);
  EXPECT_EQ(campaign_state("after-create").funded_micros, 3'000'000);
  EXPECT_EQ(campaign_state("after-deposit").funded_micros, 4'000'000);
  // Both take part in auctions now.
  EXPECT_EQ(counts().campaigns, 2u);
  verify_log();
}

TEST_F(ad_server_test, a_picked_ad_is_reserved_served_and_charged_through_the_job_settlement) {
  create(campaign("c1", {"rust"}));
  auto ad = pick("j1", "u1", "How do I learn Rust quickly?");
  ASSERT_TRUE(ad);
  EXPECT_EQ(ad->impression_id, "c1.j1");
  EXPECT_EQ(ad->campaign_id, "c1");
  EXPECT_EQ(ad->title, "Title c1");
  EXPECT_EQ(ad->text, "Text of c1");
  EXPECT_EQ(ad->url, "https://c1.example/landing");
  // Alone in the auction: it pays the floor, 0.10 USD CPM = 100 micro-USD per impression.
  EXPECT_EQ(ad->price_micros, 100);
  EXPECT_EQ(campaign_state("c1").reserved_micros, 100);

  auto charge = ask<domain::ad_charge>(rt_.ad_server, served_atom::value, ad->impression_id);
  ASSERT_TRUE(charge) << describe(charge.error());
  EXPECT_EQ(charge.value().impression_id, "c1.j1");
  EXPECT_EQ(charge.value().campaign_id, "c1");
  EXPECT_EQ(charge.value().price_micros, 100);
  // Served again (a retried report): the same charge, recorded once.
  auto again = ask<domain::ad_charge>(rt_.ad_server, served_atom::value, ad->impression_id);
  ASSERT_TRUE(again) << describe(again.error());
  EXPECT_EQ(again.value().price_micros, 100);
  auto state = campaign_state("c1");
  EXPECT_EQ(state.spent_micros, 100);
  EXPECT_EQ(state.reserved_micros, 0);
  EXPECT_EQ(state.impressions_total, 1u);

  settle("j1", charge.value());
  EXPECT_EQ(balance("campaign-c1"), 1'000'000 - 100);
  EXPECT_EQ(balance("platform"), 100);

  // A prompt matching no campaign gets no ad; a second campaign makes it a real auction.
  EXPECT_FALSE(pick("j2", "u1", "tell me about the weather"));
  create(campaign("c2", {"rust", "cargo"}));
  auto second = pick("j3", "u2", "rust cargo build fails");
  ASSERT_TRUE(second);
  EXPECT_EQ(second->campaign_id, "c2");  // relevance 6 x 2 USD beats 3 x 2 USD
  // Second price: c1's effective bid 3 * 2,000,000 over c2's relevance 6 = 1,000,000 CPM.
  EXPECT_EQ(second->price_micros, 1'000);
  const auto c = counts();
  EXPECT_EQ(c.picks, 3u);
  EXPECT_EQ(c.ads, 2u);
  EXPECT_EQ(c.impressions, 1u);
  verify_log();
}

TEST_F(ad_server_test, a_user_sees_a_campaign_at_most_its_frequency_cap_per_day) {
  create(campaign("c1", {"gpu"}, 1'000'000, 2));
  // Reservations count as impressions: two held ads reach the cap before either is served.
  auto first = pick("j1", "u1", "which gpu");
  auto second = pick("j2", "u1", "which gpu");
  ASSERT_TRUE(first);
  ASSERT_TRUE(second);
  EXPECT_FALSE(pick("j3", "u1", "which gpu"));
  ASSERT_TRUE(ask<domain::ad_charge>(rt_.ad_server, served_atom::value, first->impression_id));
  ASSERT_TRUE(ask<domain::ad_charge>(rt_.ad_server, served_atom::value, second->impression_id));
  EXPECT_FALSE(pick("j4", "u1", "which gpu"));
  EXPECT_TRUE(pick("j5", "u2", "which gpu"));  // another user
  // The next UTC day the cap starts again.
  *clock_.now_us += domain::us_per_day;
  EXPECT_TRUE(pick("j6", "u1", "which gpu"));
  verify_log();
}

TEST_F(ad_server_test, a_released_or_expired_reservation_gives_its_budget_back_and_cannot_be_served) {
  create(campaign("c1", {"gpu"}));
  auto ad = pick("j1", "u1", "gpu prices");
  ASSERT_TRUE(ad);
  auto released = ask<bool>(rt_.ad_server, release_atom::value, ad->impression_id,
                            std::string("the answer failed"));
  ASSERT_TRUE(released) << describe(released.error());
  EXPECT_TRUE(released.value());
  auto twice = ask<bool>(rt_.ad_server, release_atom::value, ad->impression_id,
                         std::string("the answer failed"));
  ASSERT_TRUE(twice) << describe(twice.error());
  EXPECT_FALSE(twice.value());
  EXPECT_EQ(campaign_state("c1").reserved_micros, 0);
  auto late = ask<domain::ad_charge>(rt_.ad_server, served_atom::value, ad->impression_id);
  ASSERT_FALSE(late);
  EXPECT_EQ(refusal_code(late.error()), domain::errc::not_found);

  // Neither served nor released: the timer gives it back once its time is up.
  auto forgotten = pick("j2", "u1", "gpu prices");
  ASSERT_TRUE(forgotten);
  EXPECT_EQ(campaign_state("c1").reserved_micros, forgotten->price_micros);
  *clock_.now_us += ad_server_options{}.reservation_ttl.count();
  sched_.clock().advance_time(std::chrono::seconds(10));
  run();
  EXPECT_EQ(campaign_state("c1").reserved_micros, 0);
  EXPECT_EQ(counts().expired, 1u);
  auto expired = ask<domain::ad_charge>(rt_.ad_server, served_atom::value, forgotten->impression_id);
  ASSERT_FALSE(expired);
  // The cache followed: the ad server's view shows no reservation either.
  auto cached = ask<domain::campaign_state>(rt_.ad_server, state_atom::value, std::string("c1"));
  ASSERT_TRUE(cached);
  EXPECT_EQ(cached.value(), campaign_state("c1"));
  verify_log();
}

TEST_F(ad_server_test, an_impression_whose_answer_went_unsettled_is_taken_back_once) {
  create(campaign("c1", {"gpu"}, 1'000'000, 1));
  auto ad = pick("j1", "u1", "gpu prices");
  ASSERT_TRUE(ad);
  ASSERT_TRUE(ask<domain::ad_charge>(rt_.ad_server, served_atom::value, ad->impression_id));
  EXPECT_EQ(campaign_state("c1").spent_micros, ad->price_micros);
  EXPECT_FALSE(pick("j2", "u1", "gpu prices")) << "its frequency cap of 1 is reached";
  auto voided = ask<bool>(rt_.ad_server, unserved_atom::value, ad->impression_id, std::string("the client left"));
  ASSERT_TRUE(voided) << describe(voided.error());
  EXPECT_TRUE(voided.value());
  auto twice = ask<bool>(rt_.ad_server, unserved_atom::value, ad->impression_id, std::string("the client left"));
  ASSERT_TRUE(twice) << describe(twice.error());
  EXPECT_FALSE(twice.value());
  const auto state = campaign_state("c1");
  EXPECT_EQ(state.spent_micros, 0);
  EXPECT_EQ(state.impressions_total, 0u);
  EXPECT_EQ(counts().voided, 1u);
  EXPECT_TRUE(pick("j2", "u1", "gpu prices")) << "the cache knows the user saw nothing";
  // Not served again, not clicked.
  EXPECT_FALSE(ask<domain::ad_charge>(rt_.ad_server, served_atom::value, ad->impression_id));
  auto click = ask<click_redirect>(rt_.ad_server, click_atom::value, ad->impression_id);
  ASSERT_TRUE(click) << "the redirect still works";
  EXPECT_EQ(campaign_state("c1").clicks_total, 0u);
  verify_log();
}

TEST_F(ad_server_test, an_ad_taken_back_before_its_impression_was_recorded_is_released) {
  // Its recording's answer was lost: whoever served it cannot tell whether it was recorded.
  create(campaign("c1", {"gpu"}, 1'000'000, 1));
  auto ad = pick("j1", "u1", "gpu prices");
  ASSERT_TRUE(ad);
  EXPECT_EQ(campaign_state("c1").reserved_micros, ad->price_micros);
  auto taken = ask<bool>(rt_.ad_server, unserved_atom::value, ad->impression_id, std::string("not recorded"));
  ASSERT_TRUE(taken) << describe(taken.error());
  EXPECT_TRUE(taken.value());
  EXPECT_EQ(campaign_state("c1").reserved_micros, 0);
  EXPECT_EQ(counts().releases, 1u);
  EXPECT_EQ(counts().voided, 0u);
  EXPECT_TRUE(pick("j2", "u1", "gpu prices")) << "its frequency cap is free again";
  EXPECT_FALSE(ask<domain::ad_charge>(rt_.ad_server, served_atom::value, ad->impression_id)) << "never served now";
  verify_log();
}

TEST_F(ad_server_test, an_ad_picked_for_a_long_answer_is_still_served_when_the_answer_ends) {
  // Picked at submission, served at the end: a minute in the queue and ten minutes of answer
  // (5,000 tokens at 8 tokens/s on a slow GPU) keep their ad.
  create(campaign("c1", {"gpu"}));
  auto ad = pick("j1", "u1", "gpu prices");
  ASSERT_TRUE(ad);
  *clock_.now_us += std::chrono::microseconds(std::chrono::minutes(11)).count();
  sched_.clock().advance_time(std::chrono::seconds(10));
  run();
  auto charge = ask<domain::ad_charge>(rt_.ad_server, served_atom::value, ad->impression_id);
  ASSERT_TRUE(charge) << describe(charge.error());
  EXPECT_EQ(charge.value().price_micros, ad->price_micros);
  EXPECT_EQ(counts().expired, 0u);
}

TEST_F(ad_server_test, a_pick_that_comes_after_its_asker_stopped_waiting_reserves_nothing) {
  create(campaign("c1", {"gpu"}));
  const std::int64_t now = *clock_.now_us;
  auto late = ask<ad_pick>(rt_.ad_server, ad_request{"j1", "u1", "gpu", now});
  ASSERT_TRUE(late) << describe(late.error());
  EXPECT_FALSE(late.value().ad);
  EXPECT_TRUE(campaign_state("c1").reservations.empty()) << "no budget or frequency cap held";
  EXPECT_EQ(counts().picks_late, 1u);
  auto in_time = ask<ad_pick>(rt_.ad_server, ad_request{"j2", "u1", "gpu", now + 1});
  ASSERT_TRUE(in_time) << describe(in_time.error());
  EXPECT_TRUE(in_time.value().ad) << "one waited for gets its ad";
}

TEST_F(ad_server_test, a_click_records_once_and_answers_the_advertisers_url) {
  create(campaign("c1", {"gpu"}));
  auto ad = pick("j1", "u1", "gpu");
  ASSERT_TRUE(ad);
  // Not served yet: no impression to count, but the link still leads to the advertiser.
  auto early = ask<click_redirect>(rt_.ad_server, click_atom::value, ad->impression_id);
  ASSERT_TRUE(early) << describe(early.error());
  EXPECT_EQ(early.value().url, "https://c1.example/landing");
  EXPECT_EQ(campaign_state("c1").clicks_total, 0u);
  ASSERT_TRUE(ask<domain::ad_charge>(rt_.ad_server, served_atom::value, ad->impression_id));
  for (int i = 0; i < 2; ++i) {
    auto url = ask<click_redirect>(rt_.ad_server, click_atom::value, ad->impression_id);
    ASSERT_TRUE(url) << describe(url.error());
    EXPECT_EQ(url.value().url, "https://c1.example/landing");
  }
  EXPECT_EQ(campaign_state("c1").clicks_total, 1u);
  EXPECT_EQ(counts().clicks, 1u);
  auto uncounted = ask<click_redirect>(rt_.ad_server, click_atom::value, std::string("c1.nothing"));
  ASSERT_TRUE(uncounted) << describe(uncounted.error());
  EXPECT_EQ(uncounted.value().url, "https://c1.example/landing");
  EXPECT_EQ(campaign_state("c1").clicks_total, 1u) << "an impression the campaign never recorded counts nothing";
  for (const std::string& unknown : std::vector<std::string>{"nocampaign.j1", "garbage", ".j1", "c1.", "c/1.j1",
                                                              std::string(49, 'c') + ".j1"}) {
    auto url = ask<click_redirect>(rt_.ad_server, click_atom::value, unknown);
    ASSERT_FALSE(url) << unknown;
    EXPECT_EQ(refusal_code(url.error()), domain::errc::not_found) << unknown;
  }
  verify_log();
}

TEST_F(ad_server_test, a_click_the_store_fails_to_record_still_leads_to_the_advertiser_and_is_counted_as_unrecorded) {
  create(campaign("c1", {"gpu"}));
  auto ad = pick("j1", "u1", "gpu");
  ASSERT_TRUE(ad);
  ASSERT_TRUE(ask<domain::ad_charge>(rt_.ad_server, served_atom::value, ad->impression_id));
  faults_->set_no_space(true);
  auto url = ask<click_redirect>(rt_.ad_server, click_atom::value, ad->impression_id);
  faults_->set_no_space(false);
  ASSERT_TRUE(url) << describe(url.error());
  EXPECT_EQ(url.value().url, "https://c1.example/landing");
  EXPECT_NE(url.value().unrecorded.find("no space"), std::string::npos) << url.value().unrecorded;
  EXPECT_EQ(counts().clicks, 0u);
  EXPECT_EQ(counts().clicks_unrecorded, 1u);
}

TEST_F(ad_server_test, a_click_older_than_the_click_window_is_redirected_and_not_counted) {
  create(campaign("c1", {"gpu"}));
  auto ad = pick("j1", "u1", "gpu");
  ASSERT_TRUE(ad);
  ASSERT_TRUE(ask<domain::ad_charge>(rt_.ad_server, served_atom::value, ad->impression_id));
  auto click_leads_to_the_advertiser = [&] {
    auto url = ask<click_redirect>(rt_.ad_server, click_atom::value, ad->impression_id);
    ASSERT_TRUE(url) << describe(url.error());
    EXPECT_EQ(url.value().url, "https://c1.example/landing");
  };
  // Past the window the campaign still remembers the impression, and counts no click for it.
  *clock_.now_us += domain::click_window_us;
  click_leads_to_the_advertiser();
  EXPECT_TRUE(campaign_state("c1").impressions.contains(ad->impression_id));
  // The campaign's next event on a later day forgets it: the click finds no impression at all.
  *clock_.now_us += domain::us_per_day;
  auto next = pick("j2", "u2", "gpu");
  ASSERT_TRUE(next);
  ASSERT_TRUE(ask<domain::ad_charge>(rt_.ad_server, served_atom::value, next->impression_id));
  EXPECT_FALSE(campaign_state("c1").impressions.contains(ad->impression_id));
  click_leads_to_the_advertiser();
  EXPECT_EQ(campaign_state("c1").clicks_total, 0u);
  EXPECT_EQ(counts().clicks, 0u);
  verify_log();
}

TEST_F(ad_server_test, a_finished_campaign_makes_room_for_a_new_one_in_a_full_cache) {
  // Campaigns ever created are no limit, only those that can still spend: a busy platform would
  // otherwise stop taking campaigns, and after a restart serve no ad at all.
  stop();
  start({}, 2);
  create(campaign("c1", {"gpu"}, 2'000));  // one impression's price: finished once served
  create(campaign("c2", {"cuda"}));
  auto full = ask<std::string>(rt_.ad_server, campaign("c3", {"tensor"}));
  ASSERT_FALSE(full);
  EXPECT_EQ(refusal_code(full.error()), domain::errc::limit_exceeded);
  auto ad = pick("j1", "u1", "gpu");
  ASSERT_TRUE(ad);
  ASSERT_EQ(ad->campaign_id, "c1");
  ASSERT_TRUE(ask<domain::ad_charge>(rt_.ad_server, served_atom::value, ad->impression_id));
  EXPECT_TRUE(campaign_state("c1").exhausted);

  create(campaign("c3", {"tensor"}));
  EXPECT_EQ(counts().campaigns, 2u);
  EXPECT_EQ(counts().evicted, 1u);
  auto url = ask<click_redirect>(rt_.ad_server, click_atom::value, ad->impression_id);
  ASSERT_TRUE(url) << describe(url.error());
  EXPECT_EQ(url.value().url, "https://c1.example/landing");
  EXPECT_EQ(campaign_state("c1").clicks_total, 1u) << "a dropped campaign's clicks still count";
  auto other = pick("j2", "u2", "tensor");
  ASSERT_TRUE(other);
  EXPECT_EQ(other->campaign_id, "c3");
  // The finished one's create, repeated (a retried request), is answered though the cache is full.
  EXPECT_EQ(create(campaign("c1", {"gpu"}, 2'000)), "c1");
  EXPECT_EQ(counts().campaigns, 2u);
  auto changed = ask<std::string>(rt_.ad_server, campaign("c1", {"gpu"}, 4'000));
  ASSERT_FALSE(changed) << "a create with other settings is refused, full cache or not";
  EXPECT_EQ(refusal_code(changed.error()), domain::errc::already_exists);

  // After a restart the finished one is not loaded, and the others fit.
  stop();
  start({"c1", "c2", "c3"}, 2);
  EXPECT_EQ(counts().campaigns, 2u);
  auto again = pick("j3", "u3", "cuda");
  ASSERT_TRUE(again);
  EXPECT_EQ(again->campaign_id, "c2");
  verify_log();
}

TEST_F(ad_server_test, after_a_restart_on_the_same_store_clicks_still_find_their_campaign) {
  create(campaign("c1", {"gpu"}));
  create(campaign("c2", {"rust"}));
  auto ad = pick("j1", "u1", "gpu");
  ASSERT_TRUE(ad);
  ASSERT_TRUE(ask<domain::ad_charge>(rt_.ad_server, served_atom::value, ad->impression_id));
  auto held = pick("j2", "u2", "rust");
  ASSERT_TRUE(held);
  stop();

  // Without the campaign ids: nothing takes part in auctions, but clicks find their campaign.
  start();
  EXPECT_EQ(counts().campaigns, 0u);
  auto url = ask<click_redirect>(rt_.ad_server, click_atom::value, ad->impression_id);
  ASSERT_TRUE(url) << describe(url.error());
  EXPECT_EQ(url.value().url, "https://c1.example/landing");
  stop();

  // With them (as found in the log): auctions run at once, and a reservation made before the
  // restart is still served.
  start({"c1", "c2", "never-created"});
  EXPECT_EQ(counts().campaigns, 2u);
  EXPECT_TRUE(pick("j3", "u3", "gpu"));
  auto charge = ask<domain::ad_charge>(rt_.ad_server, served_atom::value, held->impression_id);
  ASSERT_TRUE(charge) << describe(charge.error());
  EXPECT_EQ(charge.value().price_micros, held->price_micros);
  auto loaded = ask<std::size_t>(rt_.ad_server, load_atom::value, std::vector<std::string>{"c1", "x"});
  ASSERT_TRUE(loaded);
  EXPECT_EQ(loaded.value(), 1u);
  verify_log();
}

TEST_F(ad_server_test, reservations_of_a_campaign_a_full_cache_left_out_after_a_restart_still_expire) {
  stop();
  start({}, 2);
  create(campaign("c1", {"gpu"}));
  create(campaign("c2", {"rust"}));
  auto held = pick("j1", "u1", "gpu");  // never served nor released: the node stops
  ASSERT_TRUE(held);
  EXPECT_EQ(campaign_state("c1").reserved_micros, held->price_micros);
  stop();

  // Room for one: c2 is cached, c1 is not, and no pick will ever serve or release its hold.
  start({"c2", "c1"}, 1);
  EXPECT_EQ(counts().campaigns, 1u);
  *clock_.now_us += ad_server_options{}.reservation_ttl.count();
  sched_.clock().advance_time(std::chrono::seconds(10));
  run();
  EXPECT_EQ(campaign_state("c1").reserved_micros, 0) << "its budget, pacing and the user's cap are free again";
  EXPECT_EQ(counts().expired, 1u);
  verify_log();
}

TEST_F(ad_server_test, budgets_are_never_exceeded_over_a_seeded_walk_of_picks) {
  const auto seed = testing::seed_from_environment();
  std::cout << "GPUSTREAM_SEED=" << seed << "\n";
  SCOPED_TRACE("GPUSTREAM_SEED=" + std::to_string(seed));
  std::mt19937_64 random(seed);
  // Small budgets (a few impressions at the bid) so that the walk runs them out.
  const std::vector<std::string> ids = {"c1", "c2", "c3"};
  create(campaign("c1", {"gpu", "cuda"}, 12'000, 3));
  create(campaign("c2", {"gpu"}, 9'000, 2));
  create(campaign("c3", {"rust"}, 20'000, 5));
  const std::vector<std::string> prompts = {"gpu", "cuda gpu", "rust", "rust gpu", "nothing"};
  std::map<std::string, std::int64_t> charged;  // by campaign, from the served replies
  int served_count = 0;
  const auto any_exhausted = [&] {
    return std::any_of(ids.begin(), ids.end(), [&](const std::string& id) { return campaign_state(id).exhausted; });
  };
  // 400 steps, and on until a budget runs out (about one seed in 70 had not by then), at most 4,000.
  for (int step = 0; step < 4'000 && (step < 400 || !any_exhausted()); ++step) {
    // Sometimes several picks at once, decided against the same cache: the campaigns' own
    // decisions then refuse what the budget no longer pays for.
    const int burst = random() % 5 == 0 ? 3 : 1;
    std::vector<pick_handle> handles;
    std::vector<std::string> jobs;
    for (int i = 0; i < burst; ++i) {
      jobs.push_back("j" + std::to_string(step) + "-" + std::to_string(i));
      handles.push_back(send_pick(ad_request{jobs.back(), "u" + std::to_string(random() % 6),
                                             prompts[random() % prompts.size()], 0}));
    }
    run();
    for (std::size_t i = 0; i < handles.size(); ++i) {
      auto picked = collect<ad_pick>(handles[i]);
      ASSERT_TRUE(picked) << describe(picked.error());
      if (!picked.value().ad) continue;
      const auto& ad = *picked.value().ad;
      const auto what = random() % 10;
      if (what < 7) {
        auto charge = ask<domain::ad_charge>(rt_.ad_server, served_atom::value, ad.impression_id);
        ASSERT_TRUE(charge) << describe(charge.error());
        settle(jobs[i], charge.value());
        charged[charge.value().campaign_id] += charge.value().price_micros;
        ++served_count;
      } else if (what < 9) {
        ASSERT_TRUE(ask<bool>(rt_.ad_server, release_atom::value, ad.impression_id,
                              std::string("not shown")));
      }  // else: left to expire
    }
    if (random() % 8 == 0) {
      *clock_.now_us += static_cast<std::int64_t>(random() % 200'000'000);
      sched_.clock().advance_time(std::chrono::seconds(10));
      run();
    }
    for (const auto& id : ids) {
      const auto state = campaign_state(id);
      ASSERT_LE(state.spent_micros + state.reserved_micros, state.budget_micros) << id;
      ASSERT_GE(balance("campaign-" + id), 0) << id;
      ASSERT_EQ(balance("campaign-" + id), state.budget_micros - charged[id]) << id;
    }
  }
  EXPECT_GT(served_count, 10);
  EXPECT_TRUE(any_exhausted()) << "the walk never ran a budget out; it tests too little";
  verify_log();
}

TEST_F(ad_server_test, concurrent_picks_get_ads_only_while_the_budget_pays_for_them) {
  // Two impressions' worth of budget at a bid equal to the floor (100 micro-USD each).
  auto tight = campaign("c1", {"gpu"}, 200, 1);
  tight.cpm_bid_micros = 100'000;
  create(tight);
  std::vector<pick_handle> handles;
  for (int i = 0; i < 5; ++i) {
    handles.push_back(
        send_pick(ad_request{"j" + std::to_string(i), "u" + std::to_string(i), "gpu", 0}));
  }
  run();  // all five auctions ran before any reservation came back
  int ads = 0;
  for (auto& handle : handles) {
    auto picked = collect<ad_pick>(handle);
    ASSERT_TRUE(picked) << describe(picked.error());
    ads += picked.value().ad ? 1 : 0;
  }
  EXPECT_EQ(ads, 2);
  // The cache held each pick's reservation at once: the later picks saw the budget taken and
  // asked the campaign for nothing it would refuse.
  EXPECT_EQ(counts().reservations_refused, 0u);
  const auto state = campaign_state("c1");
  EXPECT_EQ(state.reserved_micros, 200);
  // The cache agrees with the campaign, and the next pick gets nothing.
  auto cached = ask<domain::campaign_state>(rt_.ad_server, state_atom::value, std::string("c1"));
  ASSERT_TRUE(cached);
  EXPECT_EQ(cached.value(), state);
  EXPECT_FALSE(pick("j9", "u9", "gpu"));
  EXPECT_EQ(counts().reservations_refused, 0u);
  verify_log();
}

TEST_F(ad_server_test, concurrent_picks_past_the_winners_budget_go_to_the_next_bidder) {
  // c1 bids more but pays for two impressions; c2 bids less with plenty: five picks at once get
  // five ads, two of c1's and three of c2's, where the later picks were all refused by c1 before.
  auto rich = campaign("c1", {"gpu"}, 3'500, 5);
  create(rich);
  auto other = campaign("c2", {"gpu"}, 1'000'000, 5);
  other.cpm_bid_micros = 1'000'000;
  create(other);
  std::vector<pick_handle> handles;
  for (int i = 0; i < 5; ++i) handles.push_back(send_pick(ad_request{"j" + std::to_string(i), "u" + std::to_string(i), "gpu", 0}));
  run();
  std::map<std::string, int> by_campaign;
  for (auto& handle : handles) {
    auto picked = collect<ad_pick>(handle);
    ASSERT_TRUE(picked) << describe(picked.error());
    ASSERT_TRUE(picked.value().ad) << "every pick gets an ad";
    by_campaign[picked.value().ad->campaign_id] += 1;
  }
  EXPECT_EQ(by_campaign, (std::map<std::string, int>{{"c1", 2}, {"c2", 3}}));
  EXPECT_EQ(counts().reservations_refused, 0u);
  verify_log();
}

TEST(impression_ids, name_their_campaign_and_fit_the_id_limit) {
  EXPECT_EQ(impression_id_of("c1", "job-7", 128), "c1.job-7");
  EXPECT_EQ(campaign_of_impression("c1.job-7"), "c1");
  EXPECT_EQ(campaign_of_impression("c1.job.with.dots"), "c1");
  EXPECT_EQ(campaign_of_impression("nodot"), "");
  const std::string long_job(200, 'x');
  const auto id = impression_id_of("campaign", long_job, 128);
  EXPECT_LE(id.size(), 128u);
  EXPECT_EQ(campaign_of_impression(id), "campaign");
  EXPECT_EQ(id, impression_id_of("campaign", long_job, 128));
  EXPECT_NE(id, impression_id_of("campaign", long_job + "y", 128));
}

}  // namespace
}  // namespace gpustream::actors
