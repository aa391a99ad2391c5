// Job priority: premium, then contribution tier, then age; aging bounds overtaking.
#include "domain/priority.hpp"

#include <gtest/gtest.h>

#include <cstdlib>
#include <iostream>
#include <random>

namespace gpustream::domain {
namespace {

constexpr std::int64_t t0 = 1'700'000'000'000'000;

/// Whether a job (premium, tier) queued at `a_at` is served before one queued at `b_at`.
bool served_first(bool a_premium, contribution_tier a_tier, std::int64_t a_at, bool b_premium,
                  contribution_tier b_tier, std::int64_t b_at) {
  return service_at_us(priority_for(a_premium, a_tier), a_at) <
         service_at_us(priority_for(b_premium, b_tier), b_at);
}

TEST(priority, at_equal_arrival_premium_beats_every_tier_but_master) {
  using enum contribution_tier;
  for (auto tier : {unverified, bronze, silver, gold, platinum, diamond}) {
    EXPECT_TRUE(served_first(true, unverified, t0, false, tier, t0)) << to_string(tier);
  }
  EXPECT_TRUE(served_first(false, master, t0, true, diamond, t0)) << "Master skips queues";
}

TEST(priority, at_equal_arrival_a_higher_tier_goes_first) {
  using enum contribution_tier;
  const contribution_tier ladder[] = {unverified, bronze, silver, gold, platinum, diamond, master};
  for (std::size_t i = 1; i < std::size(ladder); ++i) {
    EXPECT_TRUE(served_first(false, ladder[i], t0, false, ladder[i - 1], t0)) << i;
    EXPECT_TRUE(served_first(true, ladder[i], t0, true, ladder[i - 1], t0)) << i;
  }
}

TEST(priority, within_one_class_the_older_job_goes_first) {
  EXPECT_TRUE(served_first(false, contribution_tier::gold, t0, false, contribution_tier::gold, t0 + 1));
  EXPECT_FALSE(served_first(false, contribution_tier::gold, t0 + 1, false, contribution_tier::gold, t0));
}

TEST(priority, aging_lets_an_old_free_job_ahead_of_a_new_premium_one) {
  const std::int64_t head_start_us = priority_options{}.premium_head_start_ms * 1'000;
  EXPECT_TRUE(served_first(true, contribution_tier::unverified, t0 + head_start_us - 1, false,
                           contribution_tier::unverified, t0));
  EXPECT_FALSE(served_first(true, contribution_tier::unverified, t0 + head_start_us, false,
                            contribution_tier::unverified, t0));
}

TEST(priority, priorities_are_head_starts_in_milliseconds) {
  EXPECT_EQ(priority_for(false, contribution_tier::unverified), 0);
  EXPECT_EQ(priority_for(false, contribution_tier::gold), 4'000);
  EXPECT_EQ(priority_for(true, contribution_tier::gold), 24'000);
  EXPECT_EQ(priority_for(true, contribution_tier::master), 80'000);
  EXPECT_EQ(service_at_us(4'000, t0), t0 - 4'000'000);
  EXPECT_EQ(overtaking_bound_us(), 80'000'000);
}

TEST(priority, options_that_break_the_order_are_recognised) {
  EXPECT_TRUE(keeps_priority_order({}));
  priority_options weak_premium;
  weak_premium.premium_head_start_ms = 16'000;  // no more than Diamond
  EXPECT_FALSE(keeps_priority_order(weak_premium));
  priority_options shuffled;
  std::swap(shuffled.tier_head_start_ms[1], shuffled.tier_head_start_ms[2]);
  EXPECT_FALSE(keeps_priority_order(shuffled));
  priority_options low_master;
  low_master.tier_head_start_ms[6] = 30'000;  // below premium + Diamond
  EXPECT_FALSE(keeps_priority_order(low_master));
  EXPECT_DEATH((void)priority_for(true, contribution_tier::gold, weak_premium), "keeps_priority_order");
}

TEST(priority, no_job_is_overtaken_by_a_later_arrival_beyond_the_bound) {
  std::uint64_t seed = std::random_device{}();
  if (const char* env = std::getenv("GPUSTREAM_SEED")) seed = std::strtoull(env, nullptr, 10);
  SCOPED_TRACE("GPUSTREAM_SEED=" + std::to_string(seed));
  std::cout << "GPUSTREAM_SEED=" << seed << "\n";
  std::mt19937_64 rng(seed);
  const std::int64_t bound = overtaking_bound_us();
  std::int64_t closest_overtake = 0;
  for (int i = 0; i < 100'000; ++i) {
    const bool a_premium = rng() % 2 == 0;
    const bool b_premium = rng() % 2 == 0;
    const auto a_tier = static_cast<contribution_tier>(rng() % contribution_tier_count);
    const auto b_tier = static_cast<contribution_tier>(rng() % contribution_tier_count);
    const std::int64_t a_at = t0;
    const std::int64_t b_at = t0 + static_cast<std::int64_t>(rng() % (2 * bound));
    if (served_first(b_premium, b_tier, b_at, a_premium, a_tier, a_at)) {
      ASSERT_LT(b_at - a_at, bound) << "a later job overtook beyond the bound";
      closest_overtake = std::max(closest_overtake, b_at - a_at);
    }
  }
  // The bound is tight: the worst pair (free Unverified vs premium Master) gets close to it.
  EXPECT_TRUE(served_first(true, contribution_tier::master, t0 + bound - 1, false,
                           contribution_tier::unverified, t0));
  EXPECT_FALSE(served_first(true, contribution_tier::master, t0 + bound, false,
                            contribution_tier::unverified, t0));
  EXPECT_GT(closest_overtake, 0);
}

}  // namespace
}  // namespace gpustream::domain
