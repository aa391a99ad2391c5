// Tests the ad auction: prompt words, relevance, eligibility (pacing, caps, funds, floor), second price and tie-breaks.

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <iostream>
#include <random>
#include <string>
#include <vector>

#include "domain/auction.hpp"

namespace gpustream::domain {
namespace {

constexpr std::int64_t day_us = 86'400'000'000;
constexpr std::int64_t midnight = 19'700 * day_us;
constexpr std::int64_t noon = midnight + day_us / 2;

/// A created and fully funded campaign, built through decide and evolve like the actor does.
campaign_state make_campaign(std::string id, std::int64_t cpm_bid_micros, std::vector<std::string> keywords,
                             std::vector<std::string> categories = {}, std::int64_t budget_micros = 10'000'000) {
  campaign_state s;
  const create_campaign create{std::move(id),       "acme",          "title",        "text",
                               "https://acme.example", std::move(keywords), std::move(categories), cpm_bid_micros,
                               budget_micros,        budget_micros,   2};
  for (const campaign::command& c : {campaign::command{create}, campaign::command{fund_campaign{budget_micros}}}) {
    auto d = campaign::decide(s, c, midnight);
    EXPECT_TRUE(d) << d.error().message;
    for (const auto& e : *d) s = campaign::evolve(std::move(s), e);
  }
  return s;
}

void apply(campaign_state& s, const campaign::command& c, std::int64_t now_us) {
  auto d = campaign::decide(s, c, now_us);
  ASSERT_TRUE(d) << d.error().message;
  for (const auto& e : *d) s = campaign::evolve(std::move(s), e);
}

TEST(auction, prompt_words_are_lowercase_distinct_and_bounded) {
  EXPECT_EQ(prompt_words("How do I use CUDA, cuda-graphs & GPUs?", 100),
            (std::set<std::string>{"how", "do", "i", "use", "cuda", "graphs", "gpus"}));
  EXPECT_EQ(prompt_words("caf\xc3\xa9 au lait", 100), (std::set<std::string>{"caf\xc3\xa9", "au", "lait"}))
      << "non-ASCII bytes stay inside words";
  EXPECT_EQ(prompt_words("alpha beta gamma", 8), (std::set<std::string>{"alpha"}))
      << "a word cut at 8 bytes is left out";
  EXPECT_EQ(prompt_words("alpha beta gamma", 10), (std::set<std::string>{"alpha", "beta"}));
  EXPECT_TRUE(prompt_words("", 10).empty());
}

TEST(auction, category_table_maps_common_words) {
  EXPECT_EQ(category_of("cuda"), "hardware");
  EXPECT_EQ(category_of("recipe"), "food");
  EXPECT_EQ(category_of("python"), "programming");
  EXPECT_EQ(category_of("zebra"), "");
}

TEST(auction, relevance_weighs_keywords_and_categories_once_each) {
  const auto gpu = make_campaign("c1", 1'000'000, {"gpu", "rental"}, {"hardware", "gaming"});
  const auction_options o;
  EXPECT_EQ(relevance(prompt_words("rent a gpu gpu GPU", 100), gpu, o), 3 + 1) << "keyword gpu + category via table";
  EXPECT_EQ(relevance(prompt_words("gpu rental for games", 100), gpu, o), 3 + 3 + 1 + 1);
  EXPECT_EQ(relevance(prompt_words("best hardware", 100), gpu, o), 1) << "a category named as a word";
  EXPECT_EQ(relevance(prompt_words("bake bread", 100), gpu, o), 0);
}

TEST(auction, only_the_first_prompt_bytes_count) {
  const std::vector<campaign_state> campaigns{make_campaign("c1", 1'000'000, {"gpu"})};
  auction_options o;
  o.prompt_bytes_max = 10;
  EXPECT_FALSE(run_auction(campaigns, "0123456789 gpu", "u1", noon, o));
  EXPECT_TRUE(run_auction(campaigns, "gpu 456789 gpu", "u1", noon, o));
}

TEST(auction, no_eligible_campaign_means_no_ad) {
  const std::vector<campaign_state> none;
  EXPECT_FALSE(run_auction(none, "gpu", "u1", noon, {}));
  const std::vector<campaign_state> unrelated{make_campaign("c1", 1'000'000, {"bread"})};
  EXPECT_FALSE(run_auction(unrelated, "rent a gpu", "u1", noon, {}));
}

TEST(auction, a_lone_winner_pays_the_floor) {
  const std::vector<campaign_state> one{make_campaign("c1", 2'000'000, {"gpu"})};
  const auto choice = run_auction(one, "gpu please", "u1", noon, {});
  ASSERT_TRUE(choice);
  EXPECT_EQ(choice->campaign_id, "c1");
  EXPECT_EQ(choice->clearing_cpm_micros, 100'000);
  EXPECT_EQ(choice->price_micros, 100);
  EXPECT_EQ(choice->runner_up_campaign_id, "");
}

TEST(auction, winner_pays_the_runner_up_bid_scaled_to_its_own_relevance) {
  // c1: relevance 6 (two keywords) x 2.00 USD = 12,000,000; c2: relevance 3 x 3.00 USD = 9,000,000.
  const std::vector<campaign_state> campaigns{make_campaign("c1", 2'000'000, {"gpu", "cuda"}),
                                              make_campaign("c2", 3'000'000, {"gpu"})};
  const auto choice = run_auction(campaigns, "cuda on a gpu", "u1", noon, {});
  ASSERT_TRUE(choice);
  EXPECT_EQ(choice->campaign_id, "c1") << "the more relevant campaign wins with the lower bid";
  EXPECT_EQ(choice->relevance, 6);
  EXPECT_EQ(choice->effective_bid, 12'000'000);
  EXPECT_EQ(choice->runner_up_campaign_id, "c2");
  EXPECT_EQ(choice->clearing_cpm_micros, 1'500'000) << "9,000,000 / 6";
  EXPECT_EQ(choice->price_micros, 1'500);
}

TEST(auction, clearing_price_rounds_down) {
  // c1: 3 x 1,000,001 = 3,000,003 (wins); c2: 1 x 1,000,000 via its category: 1,000,000 / 3 = 333,333.33.
  const std::vector<campaign_state> campaigns{make_campaign("c1", 1'000'001, {"gpu"}),
                                              make_campaign("c2", 1'000'000, {}, {"hardware"})};
  const auto choice = run_auction(campaigns, "gpu", "u1", noon, {});
  ASSERT_TRUE(choice);
  EXPECT_EQ(choice->clearing_cpm_micros, 333'333);
  EXPECT_EQ(choice->price_micros, 333);
}

TEST(auction, price_never_falls_below_the_floor) {
  // c2's effective bid scaled to c1's relevance, 150,000 / 3 = 50,000, is below the 100,000 floor.
  const std::vector<campaign_state> campaigns{make_campaign("c1", 1'000'000, {"gpu"}),
                                              make_campaign("c2", 150'000, {}, {"hardware"})};
  const auto choice = run_auction(campaigns, "gpu", "u1", noon, {});
  ASSERT_TRUE(choice);
  EXPECT_EQ(choice->campaign_id, "c1");
  EXPECT_EQ(choice->clearing_cpm_micros, 100'000);
}

TEST(auction, bids_below_the_floor_do_not_take_part) {
  auction_options o;
  o.floor_cpm_micros = 500'000;
  const std::vector<campaign_state> campaigns{make_campaign("c1", 499'999, {"gpu"})};
  EXPECT_FALSE(run_auction(campaigns, "gpu", "u1", noon, o));
  o.floor_cpm_micros = 499'999;
  EXPECT_TRUE(run_auction(campaigns, "gpu", "u1", noon, o));
}

TEST(auction, equal_effective_bids_go_to_the_smaller_id_at_its_own_bid) {
  std::vector<campaign_state> campaigns{make_campaign("b", 1'000'000, {"gpu"}),
                                        make_campaign("a", 1'000'000, {"gpu"})};
  for (int order = 0; order < 2; ++order) {
    const auto choice = run_auction(campaigns, "gpu", "u1", noon, {});
    ASSERT_TRUE(choice);
    EXPECT_EQ(choice->campaign_id, "a");
    EXPECT_EQ(choice->clearing_cpm_micros, 1'000'000) << "never more than its own bid";
    std::reverse(campaigns.begin(), campaigns.end());
  }
}

TEST(auction, paused_exhausted_and_unfunded_campaigns_are_skipped) {
  auto paused = make_campaign("a", 5'000'000, {"gpu"});
  apply(paused, pause_campaign{"review"}, noon);
  auto poor = make_campaign("b", 5'000'000, {"gpu"}, {}, 10'000);  // 10,000 funded, one impression costs 5,000
  apply(poor, reserve_ad{"r1", "j", "u9", 5'000, noon + 10}, noon);
  apply(poor, reserve_ad{"r2", "j", "u8", 5'000, noon + 10}, noon);
  const std::vector<campaign_state> campaigns{paused, poor, make_campaign("c", 1'000'000, {"gpu"})};
  const auto choice = run_auction(campaigns, "gpu", "u1", noon, {});
  ASSERT_TRUE(choice);
  EXPECT_EQ(choice->campaign_id, "c");
}

TEST(auction, campaigns_ahead_of_their_pacing_are_skipped) {
  // 10 USD a day at 4 USD CPM: at 00:00 the burst is 5 % = 500,000, i.e. 125 impressions of 4,000.
  auto fast = make_campaign("a", 4'000'000, {"gpu"});
  for (int i = 0; i < 125; ++i) {
    const std::string id = "r" + std::to_string(i);
    apply(fast, reserve_ad{id, "j", "user" + std::to_string(i), 4'000, midnight + 100}, midnight);
    apply(fast, record_impression{id, 4'000}, midnight);
  }
  const std::vector<campaign_state> campaigns{fast, make_campaign("b", 1'000'000, {"gpu"})};
  const auto at_midnight = run_auction(campaigns, "gpu", "u1", midnight, {});
  ASSERT_TRUE(at_midnight);
  EXPECT_EQ(at_midnight->campaign_id, "b");
  const auto an_hour_later = run_auction(campaigns, "gpu", "u1", midnight + 3'600'000'000, {});
  ASSERT_TRUE(an_hour_later);
  EXPECT_EQ(an_hour_later->campaign_id, "a") << "the clock has made room for more spend";
}

TEST(auction, frequency_capped_campaigns_are_skipped_for_that_user_only) {
  auto capped = make_campaign("a", 5'000'000, {"gpu"});  // cap: 2 per user per day
  apply(capped, reserve_ad{"r1", "j", "u1", 5'000, noon + 100}, noon);
  apply(capped, record_impression{"r1", 5'000}, noon);
  apply(capped, reserve_ad{"r2", "j", "u1", 5'000, noon + 100}, noon);
  const std::vector<campaign_state> campaigns{capped, make_campaign("b", 1'000'000, {"gpu"})};
  EXPECT_EQ(run_auction(campaigns, "gpu", "u1", noon, {})->campaign_id, "b");
  EXPECT_EQ(run_auction(campaigns, "gpu", "u2", noon, {})->campaign_id, "a");
}

TEST(auction, the_winner_can_reserve_at_the_price) {
  std::vector<campaign_state> campaigns{make_campaign("c1", 2'000'000, {"gpu", "cuda"}),
                                        make_campaign("c2", 3'000'000, {"gpu"})};
  const auto choice = run_auction(campaigns, "cuda gpu", "u1", noon, {});
  ASSERT_TRUE(choice);
  auto& winner = campaigns[0];
  ASSERT_EQ(winner.campaign_id, choice->campaign_id);
  apply(winner, reserve_ad{"imp-1", "job-1", "u1", choice->price_micros, noon + 60'000'000}, noon);
  apply(winner, record_impression{"imp-1", choice->price_micros}, noon + 1);
  EXPECT_EQ(winner.spent_micros, choice->price_micros);
}

std::uint64_t seed_from_environment() {
  if (const char* text = std::getenv("GPUSTREAM_SEED")) return std::strtoull(text, nullptr, 10);
  return std::random_device{}();
}

// Random markets: the winner has the highest effective bid, pays between the floor and its own
// bid, above the floor exactly the runner-up's effective bid scaled to its relevance (rounded
// down), and the outcome does not depend on the order of the campaigns.
TEST(auction, random_markets_keep_second_price_bounds) {
  const auto seed = seed_from_environment();
  SCOPED_TRACE("GPUSTREAM_SEED=" + std::to_string(seed));
  std::cout << "auction random markets: GPUSTREAM_SEED=" << seed << "\n";
  std::mt19937_64 rng(seed);
  const std::vector<std::string> vocabulary{"gpu", "cuda", "python", "recipe", "travel", "game", "stock", "video"};
  const auction_options o;
  for (int market = 0; market < 300; ++market) {
    std::vector<campaign_state> campaigns;
    const auto count = 1 + rng() % 6;
    for (std::size_t i = 0; i < count; ++i) {
      std::vector<std::string> keywords{vocabulary[rng() % vocabulary.size()], vocabulary[rng() % vocabulary.size()]};
      const auto bid = static_cast<std::int64_t>(50'000 + rng() % 5'000'000);
      campaigns.push_back(make_campaign("c" + std::to_string(i), bid, keywords));
    }
    std::string prompt;
    for (int w = 0; w < 4; ++w) prompt += vocabulary[rng() % vocabulary.size()] + " ";
    const auto choice = run_auction(campaigns, prompt, "u1", noon, o);
    std::shuffle(campaigns.begin(), campaigns.end(), rng);
    ASSERT_EQ(choice, run_auction(campaigns, prompt, "u1", noon, o)) << "market " << market;
    if (!choice) continue;
    const auto words = prompt_words(prompt, o.prompt_bytes_max);
    const campaign_state* winner = nullptr;
    std::int64_t second_best = 0;  // the highest effective bid of the others that take part
    for (const auto& c : campaigns) {
      if (c.cpm_bid_micros < o.floor_cpm_micros) continue;
      const std::int64_t effective = relevance(words, c, o) * c.cpm_bid_micros;
      ASSERT_LE(effective, choice->effective_bid) << "market " << market;
      if (c.campaign_id == choice->campaign_id)
        winner = &c;
      else
        second_best = std::max(second_best, effective);
    }
    ASSERT_NE(winner, nullptr);
    ASSERT_GE(choice->clearing_cpm_micros, o.floor_cpm_micros);
    ASSERT_LE(choice->clearing_cpm_micros, winner->cpm_bid_micros);
    ASSERT_EQ(choice->price_micros, choice->clearing_cpm_micros / 1000);
    if (choice->clearing_cpm_micros > o.floor_cpm_micros) {
      // Second price: just enough to match the runner-up's quality-weighted bid, rounded down.
      ASSERT_LE(choice->clearing_cpm_micros * choice->relevance, second_best) << "market " << market;
      ASSERT_GT((choice->clearing_cpm_micros + 1) * choice->relevance, second_best) << "market " << market;
    }
  }
}

}  // namespace
}  // namespace gpustream::domain
