// Scoring rules: points per job, levels, contribution tiers, health from load, suspicion thresholds.
#include "domain/scoring.hpp"

#include <gtest/gtest.h>

namespace gpustream::domain {
namespace {

using events::provider_level;

job_measure measure(std::uint32_t prompt, std::uint32_t completion, std::int64_t ttft_us,
                    std::int64_t total_us) {
  return {prompt, completion, completion, ttft_us, total_us, completion, std::uint64_t{completion} * 4};
}

TEST(scoring, decode_throughput_ignores_time_to_first_token) {
  // 100 tokens decoded in 2 s after a 5 s wait for the first one: 50 tok/s.
  EXPECT_EQ(decode_tokens_per_second(measure(0, 100, 5'000'000, 7'000'000)), 50u);
  // A job whose last token came with the first is measured over 1 us, never divided by zero.
  EXPECT_EQ(decode_tokens_per_second(measure(0, 3, 1'000, 1'000)), 3'000'000u);
}

TEST(scoring, after_a_failover_the_finishing_provider_is_judged_on_its_own_tokens) {
  const scoring_options options;
  // 800 tokens came from the provider that failed; this one produced 40 in 0.5 s: 80 tok/s, not
  // 840 / 0.5 s = 1,680 tok/s, which would be implausible.
  job_measure continued = measure(500, 840, 1'000'000, 1'500'000);
  continued.attempt_tokens = 40;
  continued.attempt_bytes = 160;
  EXPECT_EQ(decode_tokens_per_second(continued), 80u);
  EXPECT_FALSE(unreasonably_fast(continued, options));
  const auto points = points_for_success(continued, true, options);
  EXPECT_EQ(points.speed_points, 4);
  EXPECT_EQ(points.success_points, options.success_points) << "the long answer's bonus is not its own";
}

TEST(scoring, an_answer_too_short_to_judge_earns_no_speed_points) {
  const scoring_options options;
  // A few tokens over a near-zero decode time would otherwise earn the most.
  const auto short_answer = measure(0, options.plausibility_completion_tokens_min - 1, 1'000, 1'001);
  EXPECT_EQ(points_for_success(short_answer, true, options).speed_points, 0);
  const auto judged = measure(0, options.plausibility_completion_tokens_min, 0, 1'000'000);
  EXPECT_EQ(points_for_success(judged, true, options).speed_points, 3) << "32 tok/s";
}

TEST(scoring, faster_jobs_earn_more_speed_points) {
  const scoring_options options;
  EXPECT_EQ(speed_points_for(1'000, options), 5);
  EXPECT_EQ(speed_points_for(100, options), 5);
  EXPECT_EQ(speed_points_for(99, options), 4);
  EXPECT_EQ(speed_points_for(50, options), 4);
  EXPECT_EQ(speed_points_for(25, options), 3);
  EXPECT_EQ(speed_points_for(10, options), 2);
  EXPECT_EQ(speed_points_for(5, options), 1);
  EXPECT_EQ(speed_points_for(4, options), 0);
}

TEST(scoring, longer_prompts_earn_more_complexity_points_up_to_the_cap) {
  const scoring_options options;
  const auto complexity = [&](std::uint32_t prompt) {
    return points_for_success(measure(prompt, 10, 0, 1'000'000), true, options).complexity_points;
  };
  EXPECT_EQ(complexity(0), 0);
  EXPECT_EQ(complexity(499), 0);
  EXPECT_EQ(complexity(500), 1);
  EXPECT_EQ(complexity(1'499), 2);
  EXPECT_EQ(complexity(1'500), 3);
  EXPECT_EQ(complexity(1'000'000), options.complexity_points_max);
}

TEST(scoring, success_bonus_grows_for_long_answers) {
  const scoring_options options;
  EXPECT_EQ(points_for_success(measure(0, 99, 0, 1'000'000), true, options).success_points, 2);
  EXPECT_EQ(points_for_success(measure(0, 100, 0, 1'000'000), true, options).success_points, 3);
}

TEST(scoring, an_implausible_job_earns_no_speed_points) {
  const scoring_options options;
  const auto fast = measure(600, 200, 0, 1'000'000);  // 200 tok/s
  EXPECT_EQ(points_for_success(fast, true, options).speed_points, 5);
  const auto points = points_for_success(fast, false, options);
  EXPECT_EQ(points.speed_points, 0);
  EXPECT_EQ(points.complexity_points, 1);
  EXPECT_EQ(points.success_points, 3);
  EXPECT_EQ(points.total(), 4);
}

TEST(scoring, a_provider_fault_costs_points_and_the_score_stays_non_negative) {
  const scoring_options options;
  const auto points = points_for_provider_fault(options);
  EXPECT_EQ(points.speed_points, 0);
  EXPECT_EQ(points.complexity_points, 0);
  EXPECT_EQ(points.success_points, -5);
  EXPECT_EQ(add_points(100, points.total()), 95);
  EXPECT_EQ(add_points(3, points.total()), 0);
  EXPECT_EQ(add_points(0, 7), 7);
}

TEST(scoring, levels_follow_the_score_bands) {
  EXPECT_EQ(level_for_score(-5), provider_level::bronze);
  EXPECT_EQ(level_for_score(0), provider_level::bronze);
  EXPECT_EQ(level_for_score(99), provider_level::bronze);
  EXPECT_EQ(level_for_score(100), provider_level::silver);
  EXPECT_EQ(level_for_score(499), provider_level::silver);
  EXPECT_EQ(level_for_score(500), provider_level::gold);
  EXPECT_EQ(level_for_score(1'499), provider_level::gold);
  EXPECT_EQ(level_for_score(1'500), provider_level::platinum);
  EXPECT_EQ(level_for_score(3'999), provider_level::platinum);
  EXPECT_EQ(level_for_score(4'000), provider_level::diamond);
  EXPECT_EQ(level_for_score(9'999), provider_level::diamond);
  EXPECT_EQ(level_for_score(10'000), provider_level::master);
  EXPECT_EQ(level_name(level_for_score(10'000)), "Master");
}

TEST(scoring, contribution_tiers_start_unverified) {
  EXPECT_EQ(contribution_tier_for(-1), contribution_tier::unverified);
  EXPECT_EQ(contribution_tier_for(0), contribution_tier::unverified);
  EXPECT_EQ(contribution_tier_for(1), contribution_tier::bronze);
  EXPECT_EQ(contribution_tier_for(99), contribution_tier::bronze);
  EXPECT_EQ(contribution_tier_for(100), contribution_tier::silver);
  EXPECT_EQ(contribution_tier_for(500), contribution_tier::gold);
  EXPECT_EQ(contribution_tier_for(1'500), contribution_tier::platinum);
  EXPECT_EQ(contribution_tier_for(4'000), contribution_tier::diamond);
  EXPECT_EQ(contribution_tier_for(9'999), contribution_tier::diamond);
  EXPECT_EQ(contribution_tier_for(10'000), contribution_tier::master);
  EXPECT_EQ(to_string(contribution_tier::unverified), "Unverified");
  EXPECT_EQ(to_string(contribution_tier::gold), "Gold");
}

TEST(scoring, health_follows_reported_load) {
  EXPECT_EQ(health_for_load(0), health_status::light);
  EXPECT_EQ(health_for_load(39), health_status::light);
  EXPECT_EQ(health_for_load(40), health_status::moderate);
  EXPECT_EQ(health_for_load(59), health_status::moderate);
  EXPECT_EQ(health_for_load(60), health_status::busy);
  EXPECT_EQ(health_for_load(79), health_status::busy);
  EXPECT_EQ(health_for_load(80), health_status::overloaded);
  EXPECT_EQ(health_for_load(250), health_status::overloaded);
}

/// An attempt that sent `pieces` pieces of `bytes` bytes of text, whose backend reported `reported`.
job_measure attempt(std::uint32_t pieces, std::uint64_t bytes, std::uint32_t reported) {
  job_measure m;
  m.completion_tokens = pieces;
  m.attempt_tokens = pieces;
  m.attempt_bytes = bytes;
  m.provider_reported_tokens = reported;
  return m;
}

TEST(scoring, a_reported_count_is_at_least_the_pieces_sent_give_or_take_a_few_tokens_or_percent) {
  const scoring_options options;
  EXPECT_TRUE(token_counts_match(attempt(10, 40, 10), options));
  EXPECT_TRUE(token_counts_match(attempt(10, 40, 8), options));
  EXPECT_FALSE(token_counts_match(attempt(10, 40, 7), options)) << "more pieces than tokens: split to be paid more";
  EXPECT_TRUE(token_counts_match(attempt(1'000, 4'000, 950), options));  // 5 %
  EXPECT_FALSE(token_counts_match(attempt(1'000, 4'000, 949), options));
}

TEST(scoring, a_reported_count_may_put_several_tokens_in_a_piece_but_not_more_than_a_token_per_byte) {
  const scoring_options options;
  // vLLM under load, a held-back stop sequence or split character: several tokens in one piece.
  EXPECT_TRUE(token_counts_match(attempt(10, 40, 30), options));
  EXPECT_TRUE(token_counts_match(attempt(10, 40, 42), options));
  EXPECT_FALSE(token_counts_match(attempt(10, 40, 43), options));
  EXPECT_FALSE(token_counts_match(attempt(200, 800, 5'000), options));
}

TEST(scoring, no_reported_count_leaves_nothing_to_check) {
  // Many OpenAI-compatible servers stream no usage; the agent then reports 0.
  EXPECT_TRUE(token_counts_match(attempt(1'000, 4'000, 0), scoring_options{}));
}

TEST(scoring, after_a_failover_the_report_is_checked_against_the_finishing_attempt_only) {
  // 16 tokens in all, 5 of them the earlier attempt's: the backend's usage counts its own 11.
  auto m = attempt(11, 44, 11);
  m.completion_tokens = 16;
  EXPECT_TRUE(token_counts_match(m, scoring_options{}));
  m.provider_reported_tokens = 16;
  EXPECT_TRUE(token_counts_match(m, scoring_options{})) << "a backend counting the prefix too is still within the bytes";
}

TEST(scoring, only_long_enough_implausibly_fast_completions_are_suspect) {
  const scoring_options options;
  // 31 tokens in 1 us is absurd, but too short to judge.
  EXPECT_FALSE(unreasonably_fast(measure(0, 31, 0, 1), options));
  EXPECT_TRUE(unreasonably_fast(measure(0, 32, 0, 1), options));
  // Exactly the plausible maximum is fine; one token per second more is not.
  EXPECT_FALSE(unreasonably_fast(measure(0, 1'000, 0, 1'000'000), options));
  EXPECT_TRUE(unreasonably_fast(measure(0, 1'001, 0, 1'000'000), options));
}

TEST(scoring, a_burst_of_pieces_after_a_late_first_token_is_not_implausible) {
  const scoring_options options;
  // A node too busy to read its links sees an honest 64-token answer (670 tok/s, 95 ms) only when
  // it gets to it: the first piece 60 ms after the offer, the other 63 in the next 10 ms. Its
  // decode looks like 6,400 tok/s, but the whole attempt took 70 ms at least: 914 tok/s.
  const auto burst = measure(0, 64, 60'000, 70'000);
  EXPECT_EQ(decode_tokens_per_second(burst), 6'400u);
  EXPECT_EQ(attempt_tokens_per_second(burst), 914u);
  EXPECT_FALSE(unreasonably_fast(burst, options));
  // A made-up answer held back for 10 ms and then sent at once is still found out.
  EXPECT_TRUE(unreasonably_fast(measure(0, 64, 10'000, 10'050), options));
  // Waiting 1 ms per token is no faster than the plausible maximum.
  EXPECT_FALSE(unreasonably_fast(measure(0, 64, 64'000, 64'050), options));
}

TEST(scoring, a_burst_earns_the_speed_points_of_its_whole_attempt_not_of_its_decode) {
  const scoring_options options;
  // 64 tokens held back for a second, then sent in 10 ms: not implausible over the attempt
  // (63 tok/s), but its decode (6,400 tok/s) would earn the top tier and rank it fastest.
  const auto held_back = measure(0, 64, 1'000'000, 1'010'000);
  EXPECT_FALSE(unreasonably_fast(held_back, options));
  EXPECT_EQ(credible_tokens_per_second(held_back, options), 63u);
  EXPECT_EQ(points_for_success(held_back, true, options).speed_points, 4) << "50-99 tok/s";
  // A decode within the plausible maximum counts as it is.
  const auto steady = measure(0, 64, 1'000'000, 1'640'000);
  EXPECT_EQ(credible_tokens_per_second(steady, options), 100u);
  EXPECT_EQ(points_for_success(steady, true, options).speed_points, 5);
}

TEST(scoring, each_counter_suspends_at_its_threshold) {
  const scoring_options options;
  EXPECT_FALSE(reaches_suspension({2, 9, 4}, options));
  EXPECT_TRUE(reaches_suspension({3, 0, 0}, options));
  EXPECT_TRUE(reaches_suspension({0, 10, 0}, options));
  EXPECT_TRUE(reaches_suspension({0, 0, 5}, options));
  const auto reason = suspension_reason({0, 10, 5}, options);
  EXPECT_NE(reason.find("10 jobs aborted by the provider (threshold 10)"), std::string::npos)
      << reason;
  EXPECT_NE(reason.find("5 reported token counts"), std::string::npos) << reason;
  EXPECT_EQ(reason.find("faster"), std::string::npos) << reason;
}

}  // namespace
}  // namespace gpustream::domain
