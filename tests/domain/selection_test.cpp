// Provider selection: seed scenarios, policies, filters, limits, sticky sessions, index vs plain scan.
#include "domain/selection.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <iostream>
#include <random>
#include <tuple>

namespace gpustream::domain {
namespace {

using events::provider_level;
using events::quality_tier;

constexpr std::string_view model = "llama-3.1-8b";

listed_offer offer_of(std::string name, std::uint32_t concurrency = 5, std::int64_t input = 100,
                      std::int64_t output = 300) {
  return {std::move(name), input, output, concurrency};
}

provider_listing listing(std::string id, std::int64_t score, std::vector<listed_offer> offers) {
  return {std::move(id), level_for_score(score), score, false, std::move(offers)};
}

/// Lists a provider of `model` with `active` of 5 slots taken and the given health.
void add(selection_index& index, const std::string& id, std::int64_t score, std::uint32_t active,
         std::uint32_t health, std::uint32_t load = 20, std::int64_t price = 300) {
  ASSERT_TRUE(index.list(listing(id, score, {offer_of(std::string(model), 5, 100, price)})));
  ASSERT_TRUE(index.report_load(id, {load, health}));
  for (std::uint32_t i = 0; i < active; ++i) ASSERT_TRUE(index.job_started(id));
}

std::string pick(const selection_index& index, selection_request request) {
  const auto chosen = index.select(request);
  return chosen ? std::string(*chosen) : std::string("<none>");
}

selection_request request_for(selection_policy policy = selection_policy::qmesh,
                              quality_tier quality = quality_tier::low) {
  selection_request r;
  r.model = model;
  r.quality = quality;
  r.policy = policy;
  return r;
}

TEST(selection, seed_scenario_one_prefers_the_idle_provider) {
  selection_index index;
  add(index, "A", 1'000, 2, 80);
  add(index, "B", 500, 0, 70);
  add(index, "C", 750, 1, 90);
  EXPECT_EQ(pick(index, request_for()), "B");
}

TEST(selection, seed_scenario_two_weighs_availability_health_and_history_when_all_are_busy) {
  selection_index index;
  add(index, "A", 1'000, 4, 80);
  add(index, "B", 500, 1, 70);
  add(index, "C", 750, 3, 90);
  EXPECT_EQ(pick(index, request_for()), "B");
  const selection_options options;
  // 60% * 80% free + 30% * 70 health + 10% * 5% history, in basis points times percent.
  EXPECT_EQ(qmesh_weight(*index.find("B"), options), 60 * 8'000 + 30 * 7'000 + 10 * 500);
  EXPECT_GT(qmesh_weight(*index.find("B"), options), qmesh_weight(*index.find("C"), options));
  EXPECT_GT(qmesh_weight(*index.find("C"), options), qmesh_weight(*index.find("A"), options));
}

TEST(selection, among_idle_providers_the_healthiest_then_the_cheapest_wins) {
  selection_index index;
  add(index, "A", 0, 0, 80, 20, 500);
  add(index, "B", 0, 0, 95, 20, 900);
  add(index, "C", 0, 0, 95, 20, 400);
  EXPECT_EQ(pick(index, request_for()), "C");
  ASSERT_TRUE(index.report_load("C", {20, 94}));
  EXPECT_EQ(pick(index, request_for()), "B");
}

TEST(selection, equal_candidates_are_told_apart_by_id) {
  selection_index index;
  add(index, "b", 0, 0, 90);
  add(index, "a", 0, 0, 90);
  EXPECT_EQ(pick(index, request_for()), "a");
}

TEST(selection, a_provider_with_no_jobs_but_a_moderate_load_is_not_idle) {
  selection_index index;
  add(index, "loaded", 0, 0, 100, 40);
  add(index, "light", 0, 1, 50, 10);
  EXPECT_FALSE(is_idle(*index.find("loaded"), index.options()));
  // Neither is idle, so the weight decides: all slots free beats one taken.
  EXPECT_EQ(pick(index, request_for()), "loaded");
}

TEST(selection, overloaded_suspended_full_and_underlevelled_providers_are_no_candidates) {
  selection_index index;
  add(index, "hot", 5'000, 0, 100, 80);
  EXPECT_EQ(pick(index, request_for()), "<none>");
  ASSERT_TRUE(index.report_load("hot", {79, 100}));
  EXPECT_EQ(pick(index, request_for()), "hot");

  add(index, "full", 5'000, 5, 100);
  EXPECT_FALSE(accepts_work(*index.find("full"), index.options()));
  ASSERT_TRUE(index.unlist("hot"));
  EXPECT_EQ(pick(index, request_for()), "<none>");
  EXPECT_TRUE(index.can_serve(model, quality_tier::low)) << "busy is not unservable";
  ASSERT_TRUE(index.job_finished("full"));
  EXPECT_EQ(pick(index, request_for()), "full");

  auto suspended = listing("full", 5'000, {offer_of(std::string(model))});
  suspended.suspended = true;
  ASSERT_TRUE(index.list(suspended));
  EXPECT_EQ(pick(index, request_for()), "<none>");
  EXPECT_FALSE(index.can_serve(model, quality_tier::low)) << "suspended serves nothing";

  add(index, "bronze", 0, 0, 100);
  EXPECT_EQ(pick(index, request_for(selection_policy::qmesh, quality_tier::standard)), "bronze");
  EXPECT_EQ(pick(index, request_for(selection_policy::qmesh, quality_tier::high)), "<none>");
  EXPECT_FALSE(index.can_serve(model, quality_tier::high));
  add(index, "gold", 600, 0, 100);
  EXPECT_EQ(pick(index, request_for(selection_policy::qmesh, quality_tier::ultra)), "gold");
  EXPECT_FALSE(index.can_serve("no-such-model", quality_tier::low));
  auto unknown = request_for();
  unknown.model = "no-such-model";
  EXPECT_EQ(pick(index, unknown), "<none>");
}

TEST(selection, an_unreachable_provider_takes_no_job_and_keeps_its_slots_until_listed_again) {
  selection_index index;
  add(index, "p", 5'000, 2, 90);
  ASSERT_TRUE(index.record_speed("p", model, 200'000, 40));
  EXPECT_EQ(pick(index, request_for()), "p");
  ASSERT_TRUE(index.mark_unreachable("p"));
  EXPECT_FALSE(index.mark_unreachable("nobody"));
  EXPECT_EQ(pick(index, request_for()), "<none>");
  EXPECT_FALSE(accepts_work(*index.find("p"), index.options()));
  EXPECT_TRUE(index.can_serve(model, quality_tier::low)) << "it may link again in a moment";
  // Its agent links again: listed anew, it takes work, with its two running jobs still counted
  // (their results may arrive later) and what was measured about it kept.
  ASSERT_TRUE(index.list(listing("p", 5'000, {offer_of(std::string(model))})));
  EXPECT_EQ(pick(index, request_for()), "p");
  const auto* p = index.find("p");
  EXPECT_EQ(p->active_jobs, 2u);
  EXPECT_EQ(p->health_percent, 90u);
  ASSERT_EQ(p->offers.size(), 1u);
  EXPECT_TRUE(p->offers[0].measured);
  EXPECT_TRUE(index.job_finished("p"));
  EXPECT_EQ(index.find("p")->active_jobs, 1u);
}

TEST(selection, a_provider_that_declined_takes_no_job_until_a_slot_frees_a_heartbeat_comes_or_it_links_again) {
  selection_index index;
  add(index, "p", 5'000, 1, 90);
  add(index, "q", 5'000, 4, 80);
  const auto declined_then_back = [&](auto&& news, const char* what) {
    ASSERT_TRUE(index.mark_declined("p"));
    EXPECT_EQ(pick(index, request_for()), "q") << "p is full by its own word; q has a free slot";
    EXPECT_FALSE(accepts_work(*index.find("p"), index.options()));
    EXPECT_TRUE(index.can_serve(model, quality_tier::low, "q")) << "it may take work again in a moment";
    news();
    EXPECT_TRUE(accepts_work(*index.find("p"), index.options())) << what;
  };
  declined_then_back([&] { ASSERT_TRUE(index.job_finished("p")); }, "one of its jobs ended");
  declined_then_back([&] { ASSERT_TRUE(index.report_load("p", {20, 90})); }, "a heartbeat");
  declined_then_back([&] { ASSERT_TRUE(index.list(listing("p", 5'000, {offer_of(std::string(model))}))); },
                     "a new link");
  EXPECT_FALSE(index.mark_declined("nobody"));
  // Another provider's news does not end it.
  ASSERT_TRUE(index.mark_declined("p"));
  ASSERT_TRUE(index.job_finished("q"));
  ASSERT_TRUE(index.report_load("q", {20, 80}));
  EXPECT_FALSE(accepts_work(*index.find("p"), index.options()));
  ASSERT_TRUE(index.job_started("q"));
  EXPECT_EQ(pick(index, request_for()), "q");
}

TEST(selection, a_draining_provider_takes_no_job_until_a_heartbeat_says_otherwise_or_it_links_again) {
  selection_index index;
  add(index, "p", 5'000, 1, 90);
  add(index, "q", 5'000, 1, 80);
  ASSERT_TRUE(index.report_load("p", {.load_percent = 20, .health_percent = 90, .draining = true}));
  EXPECT_FALSE(accepts_work(*index.find("p"), index.options()));
  EXPECT_EQ(pick(index, request_for()), "q");
  // Unlike a decline, its jobs ending is no news: it still stops.
  ASSERT_TRUE(index.job_finished("p"));
  EXPECT_FALSE(accepts_work(*index.find("p"), index.options())) << "one of its jobs ended";
  ASSERT_TRUE(index.report_load("p", {.load_percent = 20, .health_percent = 90, .draining = true}));
  EXPECT_FALSE(accepts_work(*index.find("p"), index.options())) << "its next heartbeat says the same";
  ASSERT_TRUE(index.report_load("p", {.load_percent = 20, .health_percent = 90}));
  EXPECT_TRUE(accepts_work(*index.find("p"), index.options())) << "a heartbeat says it takes work again";
  ASSERT_TRUE(index.report_load("p", {.load_percent = 20, .health_percent = 90, .draining = true}));
  ASSERT_TRUE(index.list(listing("p", 5'000, {offer_of(std::string(model))})));
  EXPECT_TRUE(accepts_work(*index.find("p"), index.options())) << "a new link";
}

TEST(selection, a_provider_rescored_or_suspended_while_listed_is_routed_by_its_new_standing) {
  selection_index index;
  add(index, "p", 0, 0, 90);  // bronze: serves low and standard, not high (silver)
  EXPECT_EQ(pick(index, request_for(selection_policy::qmesh, quality_tier::high)), "<none>");
  ASSERT_TRUE(index.rescore("p", level_for_score(100), 100));
  EXPECT_EQ(pick(index, request_for(selection_policy::qmesh, quality_tier::high)), "p");
  EXPECT_TRUE(index.can_serve(model, quality_tier::high));
  ASSERT_TRUE(index.set_suspended("p", true));
  EXPECT_EQ(pick(index, request_for()), "<none>");
  EXPECT_FALSE(index.can_serve(model, quality_tier::low)) << "a job for it would wait for nothing";
  ASSERT_TRUE(index.set_suspended("p", false));
  EXPECT_EQ(pick(index, request_for()), "p");
  EXPECT_FALSE(index.rescore("nobody", level_for_score(0), 0));
  EXPECT_FALSE(index.set_suspended("nobody", true));
}

TEST(selection, cheapest_orders_by_input_plus_output_price) {
  selection_index index;
  ASSERT_TRUE(index.list(listing("A", 0, {offer_of(std::string(model), 4, 100, 500)})));
  ASSERT_TRUE(index.list(listing("B", 0, {offer_of(std::string(model), 4, 400, 150)})));
  ASSERT_TRUE(index.list(listing("C", 0, {offer_of(std::string(model), 4, 50, 600)})));
  EXPECT_EQ(pick(index, request_for(selection_policy::cheapest)), "B");  // 550 < 600 < 650
  // At equal prices the one with more free slots wins.
  ASSERT_TRUE(index.list(listing("D", 0, {offer_of(std::string(model), 4, 50, 500)})));
  ASSERT_TRUE(index.job_started("B"));
  EXPECT_EQ(pick(index, request_for(selection_policy::cheapest)), "D");
}

TEST(selection, fastest_uses_the_speed_ewmas_and_assumes_a_prior_for_the_unmeasured) {
  selection_index index;
  ASSERT_TRUE(index.list(listing("slow", 0, {offer_of(std::string(model))})));
  ASSERT_TRUE(index.list(listing("quick", 0, {offer_of(std::string(model))})));
  ASSERT_TRUE(index.list(listing("new", 0, {offer_of(std::string(model))})));
  ASSERT_TRUE(index.record_speed("slow", model, 2'000'000, 10));
  ASSERT_TRUE(index.record_speed("quick", model, 200'000, 80));
  // The prior (1 s + 256 tokens at 20 tok/s = 13.8 s) sits between quick (3.4 s) and slow (27.6 s).
  EXPECT_EQ(estimated_us(index.find("new")->offers[0], index.options()), 13'800'000);
  EXPECT_EQ(estimated_us(index.find("quick")->offers[0], index.options()), 3'400'000);
  EXPECT_EQ(pick(index, request_for(selection_policy::fastest)), "quick");
  ASSERT_TRUE(index.unlist("quick"));
  EXPECT_EQ(pick(index, request_for(selection_policy::fastest)), "new");
  EXPECT_FALSE(index.record_speed("slow", "other-model", 1, 1));
}

TEST(selection, speed_ewmas_take_the_first_sample_then_move_an_eighth_of_the_way) {
  selection_index index;
  ASSERT_TRUE(index.list(listing("p", 0, {offer_of(std::string(model))})));
  ASSERT_TRUE(index.record_speed("p", model, 800'000, 40));
  ASSERT_TRUE(index.record_speed("p", model, 1'600'000, 120));
  const auto& offer = index.find("p")->offers[0];
  EXPECT_TRUE(offer.measured);
  EXPECT_EQ(offer.ttft_ewma_us, 900'000);
  EXPECT_EQ(offer.tokens_per_second_ewma, 50);
  // Re-listing the same model keeps what was measured; the running jobs and load stay too.
  ASSERT_TRUE(index.job_started("p"));
  ASSERT_TRUE(index.report_load("p", {30, 70}));
  ASSERT_TRUE(index.list(listing("p", 200, {offer_of(std::string(model)), offer_of("other")})));
  const auto* p = index.find("p");
  EXPECT_EQ(p->offers[0].ttft_ewma_us, 900'000);
  EXPECT_FALSE(p->offers[1].measured);
  EXPECT_EQ(p->active_jobs, 1u);
  EXPECT_EQ(p->load_percent, 30u);
  EXPECT_EQ(p->level, provider_level::silver);
}

TEST(selection, power_of_two_choices_takes_the_less_loaded_of_two_distinct_draws) {
  selection_index index;
  add(index, "busy", 0, 4, 100);
  add(index, "free", 0, 1, 100);
  // With two candidates both are always drawn, whatever the draw.
  for (std::uint64_t draw : {0ull, 1ull, 2ull, 3ull, 0xFFFF'FFFF'FFFF'FFFFull}) {
    auto r = request_for(selection_policy::power_of_two);
    r.random_draw = draw;
    EXPECT_EQ(pick(index, r), "free") << draw;
    r.excluded_provider_id = "free";
    EXPECT_EQ(pick(index, r), "busy") << draw;
  }
}

TEST(selection, sticky_sessions_keep_a_healthy_provider_and_let_go_of_an_unhealthy_one) {
  selection_index index;
  add(index, "best", 0, 0, 100);
  add(index, "mine", 0, 3, 60);
  auto r = request_for();
  r.preferred_provider_id = "mine";
  EXPECT_EQ(pick(index, r), "mine");
  ASSERT_TRUE(index.report_load("mine", {20, 49}));
  EXPECT_EQ(pick(index, r), "best") << "below sticky_health_min_percent";
  ASSERT_TRUE(index.report_load("mine", {85, 100}));
  EXPECT_EQ(pick(index, r), "best") << "overloaded";
  ASSERT_TRUE(index.report_load("mine", {20, 100}));
  r.excluded_provider_id = "mine";
  EXPECT_EQ(pick(index, r), "best") << "excluded wins over preferred";
  r.excluded_provider_id = "best";
  r.preferred_provider_id = "gone";
  EXPECT_EQ(pick(index, r), "mine");
}

TEST(selection, listings_are_validated) {
  selection_index index;
  EXPECT_EQ(index.list(listing("", 0, {offer_of("m")})).error().code, errc::invalid_argument);
  EXPECT_EQ(index.list(listing("p", 0, {offer_of("m", 0)})).error().code, errc::invalid_argument);
  EXPECT_EQ(index.list(listing("p", 0, {offer_of("m"), offer_of("m")})).error().code,
            errc::invalid_argument);
  EXPECT_EQ(index.size(), 0u);
  EXPECT_FALSE(index.job_finished("p"));
  EXPECT_FALSE(index.report_load("p", {}));
  ASSERT_TRUE(index.list(listing("p", 0, {offer_of("m")})));
  EXPECT_FALSE(index.job_finished("p")) << "no job was running";
}

TEST(selection, providers_online_max_is_a_limit) {
  selection_options options;
  options.providers_online_max = 3;
  selection_index index(options);
  for (const char* id : {"a", "b", "c"}) ASSERT_TRUE(index.list(listing(id, 0, {offer_of("m")})));
  const auto refused = index.list(listing("d", 0, {offer_of("m")}));
  ASSERT_FALSE(refused.has_value());
  EXPECT_EQ(refused.error().code, errc::limit_exceeded);
  EXPECT_NE(refused.error().message.find("3"), std::string::npos);
  EXPECT_TRUE(index.list(listing("a", 100, {offer_of("m")}))) << "updating a listed one is fine";
  ASSERT_TRUE(index.unlist("c"));
  EXPECT_TRUE(index.list(listing("d", 0, {offer_of("m")})));
}

TEST(selection, offers_per_provider_max_is_a_limit) {
  selection_index index;
  std::vector<listed_offer> offers;
  for (std::size_t i = 0; i < index.options().offers_per_provider_max; ++i) {
    offers.push_back(offer_of("m" + std::to_string(i)));
  }
  ASSERT_TRUE(index.list(listing("p", 0, offers)));
  offers.push_back(offer_of("one-too-many"));
  EXPECT_EQ(index.list(listing("p", 0, offers)).error().code, errc::limit_exceeded);
}

TEST(selection, listing_for_copies_the_provider_state) {
  provider::state state;
  state.provider_id = "p";
  state.score = 700;
  state.level = provider_level::gold;
  state.suspended_until_at_us = 100;
  state.offers = {{"m", 4'096, "fp16", 10, 20, 3}};
  const auto during = listing_for(state, 99);
  EXPECT_TRUE(during.suspended);
  EXPECT_EQ(during.level, provider_level::gold);
  ASSERT_EQ(during.offers.size(), 1u);
  EXPECT_EQ(during.offers[0].max_concurrency, 3u);
  EXPECT_EQ(during.offers[0].output_price_micros_per_mtok, 20);
  EXPECT_FALSE(listing_for(state, 100).suspended);
}

TEST(selection, policy_names_round_trip) {
  for (auto policy : {selection_policy::qmesh, selection_policy::cheapest,
                      selection_policy::fastest, selection_policy::power_of_two}) {
    EXPECT_EQ(selection_policy_from(to_string(policy)), policy);
  }
  EXPECT_EQ(selection_policy_from("p2c"), selection_policy::power_of_two);
  EXPECT_FALSE(selection_policy_from("random").has_value());
}

TEST(selection, a_price_filter_steps_over_the_offers_above_it_in_every_policy) {
  selection_index index;
  add(index, "cheap", 1'000, 3, 60, 20, 200);  // busy and less healthy, but cheap
  add(index, "dear", 1'000, 0, 100, 20, 900);  // idle and healthiest: qmesh's first choice
  ASSERT_EQ(pick(index, request_for()), "dear");
  const candidate_filter within = [](const online_provider&, const online_offer& o) { return o.output_price_micros_per_mtok <= 500; };
  const candidate_filter nothing = [](const online_provider&, const online_offer&) { return false; };
  for (const auto policy : {selection_policy::qmesh, selection_policy::cheapest, selection_policy::fastest,
                            selection_policy::power_of_two}) {
    for (std::uint64_t draw = 0; draw < 4; ++draw) {
      auto r = request_for(policy);
      r.random_draw = draw;
      r.admits = within;
      EXPECT_EQ(pick(index, r), "cheap") << to_string(policy) << " draw " << draw;
      r.admits = nothing;
      EXPECT_EQ(pick(index, r), "<none>") << to_string(policy) << " draw " << draw;
    }
  }
  auto sticky = request_for();
  sticky.preferred_provider_id = "dear";
  sticky.admits = within;
  EXPECT_EQ(pick(index, sticky), "cheap") << "a sticky provider above the filter is not kept";
  EXPECT_TRUE(index.can_serve(model, quality_tier::low, {}, within));
  EXPECT_FALSE(index.can_serve(model, quality_tier::low, "cheap", within)) << "the only one within it excluded";
  EXPECT_FALSE(index.can_serve(model, quality_tier::low, {}, nothing));
  EXPECT_TRUE(index.can_serve(model, quality_tier::low, {}, candidate_filter{})) << "an empty filter admits every offer";
}

TEST(sticky_sessions, remember_and_forget_after_idle_time) {
  sticky_sessions sessions;
  sessions.remember("conv", "p1", 0);
  EXPECT_EQ(sessions.provider_for("conv", 10), "p1");
  sessions.remember("conv", "p2", 20);
  EXPECT_EQ(sessions.provider_for("conv", 20), "p2");
  const sticky_options options;
  EXPECT_TRUE(sessions.provider_for("conv", 20 + options.idle_us_max - 1).has_value());
  EXPECT_FALSE(sessions.provider_for("conv", 20 + options.idle_us_max).has_value());
  sessions.remember("", "p1", 0);
  EXPECT_EQ(sessions.size(), 1u);
}

TEST(sticky_sessions, conversations_max_forgets_the_least_recently_used) {
  sticky_sessions sessions({.conversations_max = 3});
  sessions.remember("a", "p", 1);
  sessions.remember("b", "p", 2);
  sessions.remember("c", "p", 3);
  sessions.remember("a", "p", 4);  // a is now the most recent
  sessions.remember("d", "p", 5);
  EXPECT_EQ(sessions.size(), 3u);
  EXPECT_FALSE(sessions.provider_for("b", 5).has_value());
  EXPECT_TRUE(sessions.provider_for("a", 5).has_value());
  EXPECT_TRUE(sessions.provider_for("c", 5).has_value());
  EXPECT_TRUE(sessions.provider_for("d", 5).has_value());
}

// ---------------------------------------------------------------------------------------------
// The index against a plain scan.

std::uint64_t test_seed() {
  if (const char* env = std::getenv("GPUSTREAM_SEED")) return std::strtoull(env, nullptr, 10);
  return std::random_device{}();
}

const online_offer* offer_for(const online_provider& p, std::string_view name) {
  for (const auto& o : p.offers) {
    if (o.model_name == name) return &o;
  }
  return nullptr;
}

/// The candidates of a request by the rules as written, scanning every provider.
std::vector<std::pair<const online_provider*, const online_offer*>> candidates(
    const selection_index& index, const selection_request& r) {
  std::vector<std::pair<const online_provider*, const online_offer*>> found;
  const auto level_min = index.options().quality_level_min[static_cast<std::size_t>(r.quality)];
  for (auto id : index.provider_ids()) {
    const auto* p = index.find(id);
    const auto* o = offer_for(*p, r.model);
    if (o == nullptr || !accepts_work(*p, index.options()) || p->level < level_min) continue;
    if (p->provider_id == r.excluded_provider_id) continue;
    found.emplace_back(p, o);
  }
  return found;
}

std::string reference_pick(const selection_index& index, const selection_request& r) {
  const auto& options = index.options();
  const auto all = candidates(index, r);
  for (const auto& [p, o] : all) {
    if (p->provider_id == r.preferred_provider_id &&
        p->health_percent >= options.sticky_health_min_percent) {
      return p->provider_id;
    }
  }
  using key = std::tuple<std::int64_t, std::int64_t, std::string>;
  const auto best_by = [&](auto&& key_of, auto&& keep) -> std::string {
    std::optional<key> best;
    for (const auto& [p, o] : all) {
      if (!keep(*p)) continue;
      key k = key_of(*p, *o);
      if (!best || k < *best) best = std::move(k);
    }
    return best ? std::get<2>(*best) : "<none>";
  };
  const auto any = [](const online_provider&) { return true; };
  switch (r.policy) {
    case selection_policy::qmesh: {
      const auto idle = [&](const online_provider& p) { return is_idle(p, options); };
      auto chosen = best_by(
          [](const online_provider& p, const online_offer& o) {
            return key{-static_cast<std::int64_t>(p.health_percent), price_key(o), p.provider_id};
          },
          idle);
      if (chosen != "<none>") return chosen;
      return best_by(
          [&](const online_provider& p, const online_offer& o) {
            return key{-qmesh_weight(p, options), price_key(o), p.provider_id};
          },
          any);
    }
    case selection_policy::cheapest:
      return best_by(
          [](const online_provider& p, const online_offer& o) {
            return key{price_key(o), -availability_bp(p), p.provider_id};
          },
          any);
    case selection_policy::fastest:
      return best_by(
          [&](const online_provider& p, const online_offer& o) {
            return key{estimated_us(o, options), price_key(o), p.provider_id};
          },
          any);
    case selection_policy::power_of_two: break;
  }
  return "<p2c>";
}

/// What can be checked of a random draw: the pick is a candidate, and with at least two
/// candidates and nothing excluded it is never the unique worst.
void check_power_of_two(const selection_index& index, const selection_request& r,
                        const std::string& chosen) {
  const auto all = candidates(index, r);
  if (all.empty()) {
    EXPECT_EQ(chosen, "<none>");
    return;
  }
  const auto it = std::find_if(all.begin(), all.end(),
                               [&](const auto& c) { return c.first->provider_id == chosen; });
  ASSERT_NE(it, all.end()) << chosen << " is no candidate";
  if (all.size() < 2 || !r.excluded_provider_id.empty() || !r.preferred_provider_id.empty()) return;
  const auto load = [](const online_provider* p) {
    return std::make_tuple(-availability_bp(*p), -static_cast<std::int64_t>(p->health_percent),
                           p->provider_id);
  };
  const auto worst = std::max_element(all.begin(), all.end(), [&](const auto& a, const auto& b) {
    return load(a.first) < load(b.first);
  });
  EXPECT_NE(worst->first->provider_id, chosen) << "two distinct draws never leave the worst";
}

TEST(selection, the_index_agrees_with_a_plain_scan_under_random_changes) {
  const auto seed = test_seed();
  SCOPED_TRACE("GPUSTREAM_SEED=" + std::to_string(seed));
  std::cout << "GPUSTREAM_SEED=" << seed << "\n";
  std::mt19937_64 rng(seed);
  const auto below = [&](std::uint64_t n) { return rng() % n; };
  const std::vector<std::string> models{"m0", "m1", "m2", "m3"};
  selection_index index;
  for (int step = 0; step < 6'000; ++step) {
    const std::string id = "p" + std::to_string(below(60));
    switch (below(9)) {
      case 0: {
        std::vector<listed_offer> offers;
        for (const auto& m : models) {
          if (below(2) == 0) {
            offers.push_back(offer_of(m, 1 + static_cast<std::uint32_t>(below(4)),
                                      static_cast<std::int64_t>(below(4) * 100),
                                      static_cast<std::int64_t>(below(3) * 100)));
          }
        }
        auto l = listing(id, static_cast<std::int64_t>(below(3) * below(3) * 300), offers);
        l.suspended = below(10) == 0;
        ASSERT_TRUE(index.list(l));
        break;
      }
      case 1: (void)index.unlist(id); break;  // may not be listed
      case 2:
        (void)index.report_load(id, {static_cast<std::uint32_t>(below(101)),
                                     static_cast<std::uint32_t>(40 + below(4) * 20), below(6) == 0});
        break;
      case 3:
      case 4: (void)index.job_started(id); break;
      case 5: (void)index.job_finished(id); break;
      case 6:
        (void)index.record_speed(id, models[below(models.size())],
                                 static_cast<std::int64_t>(below(5) * 100'000),
                                 static_cast<std::int64_t>(below(6) * 10));
        break;
      case 7: (void)index.mark_unreachable(id); break;  // may not be listed
      default: (void)index.mark_declined(id); break;     // may not be listed
    }
    selection_request r;
    r.model = models[below(models.size())];
    r.quality = static_cast<quality_tier>(below(4));
    r.policy = static_cast<selection_policy>(below(4));
    r.random_draw = rng();
    const std::string other = "p" + std::to_string(below(60));
    if (below(4) == 0) r.preferred_provider_id = other;
    if (below(4) == 0) r.excluded_provider_id = id;
    const auto chosen = pick(index, r);
    SCOPED_TRACE("step " + std::to_string(step) + " policy " + std::string(to_string(r.policy)));
    if (r.policy == selection_policy::power_of_two) {
      const bool sticky = chosen == r.preferred_provider_id && chosen != "<none>";
      if (!sticky) check_power_of_two(index, r, chosen);
    } else {
      ASSERT_EQ(chosen, reference_pick(index, r));
    }
    ASSERT_EQ(index.can_serve(r.model, r.quality),
              [&] {
                const auto level_min =
                    index.options().quality_level_min[static_cast<std::size_t>(r.quality)];
                for (auto pid : index.provider_ids()) {
                  const auto* p = index.find(pid);
                  if (!p->suspended && p->level >= level_min && offer_for(*p, r.model)) return true;
                }
                return false;
              }());
  }
}

}  // namespace
}  // namespace gpustream::domain
