// The per-key rate limit: bursts, refusal with the right Retry-After, refill, the keys_max bound and
// concurrent callers, on time passed in by the test.
#include "gateway/rate_limiter.hpp"

#include <gtest/gtest.h>

#include <atomic>
#include <thread>
#include <vector>

namespace gpustream::gateway {
namespace {

using namespace std::chrono_literals;
const rate_limiter::clock::time_point t0 = rate_limiter::clock::time_point{} + 1000h;

rate_limiter make(std::uint32_t per_minute, std::uint32_t burst, std::size_t keys_max = 100) {
  return rate_limiter(rate_limiter_options{per_minute, burst, keys_max});
}

TEST(rate_limiter, a_burst_is_allowed_then_refused_with_retry_after) {
  auto limiter = make(6, 3);  // one token every 10 s, three at once
  for (int i = 0; i < 3; ++i) {
    const auto decision = limiter.check("alice", t0);
    EXPECT_TRUE(decision.allowed) << i;
    EXPECT_EQ(decision.retry_after_seconds, 0u);
  }
  const auto refused = limiter.check("alice", t0);
  EXPECT_FALSE(refused.allowed);
  EXPECT_EQ(refused.retry_after_seconds, 10u);
  // Refusals take no token: later in the same interval the wait shrinks, rounded up.
  const auto later = limiter.check("alice", t0 + 9500ms);
  EXPECT_FALSE(later.allowed);
  EXPECT_EQ(later.retry_after_seconds, 1u);
  const auto almost = limiter.check("alice", t0 + 3s + 1ns);
  EXPECT_FALSE(almost.allowed);
  EXPECT_EQ(almost.retry_after_seconds, 7u);
  EXPECT_TRUE(limiter.check("alice", t0 + 10s).allowed);
  const auto again = limiter.check("alice", t0 + 10s);
  EXPECT_FALSE(again.allowed);
  EXPECT_EQ(again.retry_after_seconds, 10u);
}

TEST(rate_limiter, check_if_takes_a_token_only_for_what_costs_and_asks_nothing_once_empty) {
  auto limiter = make(6, 2);
  int asked = 0;
  const auto free_of_cost = [&] { ++asked; return false; };
  const auto costly = [&] { ++asked; return true; };
  EXPECT_TRUE(limiter.check_if("bob", t0, free_of_cost).allowed);
  EXPECT_EQ(limiter.keys(), 0u) << "a key whose requests cost nothing is not tracked";
  EXPECT_TRUE(limiter.check_if("bob", t0, costly).allowed);
  for (int i = 0; i < 5; ++i) EXPECT_TRUE(limiter.check_if("bob", t0, free_of_cost).allowed) << i;
  EXPECT_TRUE(limiter.check_if("bob", t0, costly).allowed) << "the free requests took nothing";
  EXPECT_EQ(asked, 8);
  const auto refused = limiter.check_if("bob", t0, costly);
  EXPECT_FALSE(refused.allowed);
  EXPECT_EQ(refused.retry_after_seconds, 10u);
  EXPECT_FALSE(limiter.check_if("bob", t0 + 4s, free_of_cost).allowed) << "an empty bucket refuses everyone";
  EXPECT_EQ(asked, 8) << "an empty bucket asks nothing";
  EXPECT_EQ(limiter.check("bob", t0 + 4s).retry_after_seconds, 6u);
  EXPECT_TRUE(limiter.check_if("bob", t0 + 10s, costly).allowed);
  EXPECT_EQ(asked, 9);
}

TEST(rate_limiter, concurrent_check_ifs_let_no_more_costly_requests_through_than_the_bucket_holds) {
  // The admin API's wrong-token throttle: every thread guesses at once; the bucket's three tokens
  // let exactly three guesses be looked at, however the threads interleave.
  auto limiter = make(1, 3);
  std::atomic<int> looked_at{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 50; ++i) {
        (void)limiter.check_if("10.0.0.9", t0, [&] {
          looked_at.fetch_add(1);
          return true;
        });
      }
    });
  }
  for (auto& thread : threads) thread.join();
  EXPECT_EQ(looked_at.load(), 3);
}

TEST(rate_limiter, retry_after_rounds_up_and_is_at_least_one_second) {
  auto limiter = make(7, 1);  // one token every 8.571… s
  EXPECT_TRUE(limiter.check("k", t0).allowed);
  EXPECT_EQ(limiter.check("k", t0).retry_after_seconds, 9u);

  auto fast = make(6000, 1);  // one token every 10 ms
  EXPECT_TRUE(fast.check("k", t0).allowed);
  const auto refused = fast.check("k", t0 + 1ms);
  EXPECT_FALSE(refused.allowed);
  EXPECT_EQ(refused.retry_after_seconds, 1u);
  EXPECT_TRUE(fast.check("k", t0 + 10ms).allowed);
}

TEST(rate_limiter, tokens_refill_at_the_sustained_rate_up_to_the_burst) {
  auto limiter = make(60, 5);  // one per second
  for (int i = 0; i < 5; ++i) ASSERT_TRUE(limiter.check("k", t0).allowed);
  ASSERT_FALSE(limiter.check("k", t0).allowed);
  // Two seconds earn two tokens, no more.
  EXPECT_TRUE(limiter.check("k", t0 + 2s).allowed);
  EXPECT_TRUE(limiter.check("k", t0 + 2s).allowed);
  EXPECT_FALSE(limiter.check("k", t0 + 2s).allowed);
  // A long idle time refills to the burst, never beyond it.
  const auto idle = t0 + 1h;
  for (int i = 0; i < 5; ++i) EXPECT_TRUE(limiter.check("k", idle).allowed) << i;
  EXPECT_FALSE(limiter.check("k", idle).allowed);
  // Steady use at exactly the rate is always allowed.
  for (int i = 1; i <= 100; ++i) EXPECT_TRUE(limiter.check("k", idle + i * 1s).allowed) << i;
}

TEST(rate_limiter, keys_are_limited_separately) {
  auto limiter = make(60, 1);
  EXPECT_TRUE(limiter.check("alice", t0).allowed);
  EXPECT_FALSE(limiter.check("alice", t0).allowed);
  EXPECT_TRUE(limiter.check("bob", t0).allowed);
  EXPECT_FALSE(limiter.check("bob", t0).allowed);
  EXPECT_EQ(limiter.keys(), 2u);
}

TEST(rate_limiter, time_going_backwards_is_judged_at_the_keys_latest_time) {
  auto limiter = make(60, 1);
  EXPECT_TRUE(limiter.check("k", t0 + 10s).allowed);
  const auto earlier = limiter.check("k", t0);
  EXPECT_FALSE(earlier.allowed);
  EXPECT_EQ(earlier.retry_after_seconds, 11u);
}

TEST(rate_limiter, keys_max_bounds_tracked_keys_and_forgets_the_least_recently_used) {
  auto limiter = make(60, 1, 2);
  EXPECT_TRUE(limiter.check("a", t0).allowed);
  EXPECT_TRUE(limiter.check("b", t0).allowed);
  EXPECT_FALSE(limiter.check("a", t0).allowed);  // a is now the most recently used
  EXPECT_TRUE(limiter.check("c", t0).allowed);   // evicts b
  EXPECT_EQ(limiter.keys(), 2u);
  EXPECT_FALSE(limiter.check("a", t0).allowed);  // a was kept: still limited
  EXPECT_TRUE(limiter.check("b", t0).allowed);   // b was forgotten: a fresh bucket (evicts c)
  EXPECT_EQ(limiter.keys(), 2u);
  EXPECT_TRUE(limiter.check("c", t0).allowed);  // c was forgotten too (evicts a)
  EXPECT_EQ(limiter.keys(), 2u);

  auto many = make(60, 1, 1000);
  for (int i = 0; i < 5000; ++i) (void)many.check("key-" + std::to_string(i), t0);  // only the count matters
  EXPECT_EQ(many.keys(), 1000u);
  EXPECT_FALSE(many.check("key-4999", t0).allowed);
  EXPECT_TRUE(many.check("key-0", t0).allowed);
}

TEST(rate_limiter, a_key_check_if_keeps_refusing_is_not_forgotten_while_others_come_and_go) {
  // A guesser refused again and again would otherwise age out behind new keys and come back
  // with a fresh budget.
  auto limiter = make(60, 1, 2);
  const auto costly = [] { return true; };
  EXPECT_TRUE(limiter.check_if("guesser", t0, costly).allowed);
  EXPECT_TRUE(limiter.check_if("b", t0, costly).allowed);
  EXPECT_FALSE(limiter.check_if("guesser", t0, costly).allowed);  // refused: now the most recent
  EXPECT_TRUE(limiter.check_if("c", t0, costly).allowed);          // evicts b, not the guesser
  EXPECT_FALSE(limiter.check_if("guesser", t0, costly).allowed) << "still refused";
  EXPECT_TRUE(limiter.check_if("d", t0, costly).allowed);          // evicts c
  EXPECT_FALSE(limiter.check_if("guesser", t0, costly).allowed) << "still refused";
}

TEST(rate_limiter, concurrent_callers_share_one_bucket_exactly) {
  auto limiter = make(60, 50);
  std::atomic<int> allowed{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 1000; ++i) {
        if (limiter.check("shared", t0).allowed) allowed.fetch_add(1);
        (void)limiter.check("own-" + std::to_string(t) + "-" + std::to_string(i % 10), t0);  // churn the index
      }
    });
  }
  for (auto& thread : threads) thread.join();
  EXPECT_EQ(allowed.load(), 50);
  EXPECT_EQ(limiter.keys(), 41u);
}

}  // namespace
}  // namespace gpustream::gateway
