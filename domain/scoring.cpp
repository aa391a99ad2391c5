#include "domain/scoring.hpp"

#include <algorithm>

namespace gpustream::domain {

// contribution_tier_for and to_string(contribution_tier) rely on the two ladders lining up.
static_assert(static_cast<int>(contribution_tier::bronze) ==
              static_cast<int>(events::provider_level::bronze));
static_assert(static_cast<int>(contribution_tier::master) ==
              static_cast<int>(events::provider_level::master));

namespace {

/// The finishing provider's own tokens over `us` (at least 1 us). A backend that ran past
/// max_tokens sent more pieces than the answer keeps.
std::uint64_t own_tokens_per_second(const job_measure& measure, std::int64_t us) noexcept {
  const std::uint64_t tokens = std::min(measure.attempt_tokens, measure.completion_tokens);
  return tokens * 1'000'000u / static_cast<std::uint64_t>(std::max<std::int64_t>(1, us));
}

}  // namespace

std::uint64_t decode_tokens_per_second(const job_measure& measure) noexcept {
  // The first token's latency is the provider's queue and prefill, not its decode speed.
  return own_tokens_per_second(measure, measure.total_us - measure.ttft_us);
}

std::uint64_t attempt_tokens_per_second(const job_measure& measure) noexcept {
  return own_tokens_per_second(measure, measure.total_us);
}

std::uint64_t credible_tokens_per_second(const job_measure& measure, const scoring_options& options) noexcept {
  const std::uint64_t decode = decode_tokens_per_second(measure);
  return decode <= options.plausible_tokens_per_second_max ? decode : attempt_tokens_per_second(measure);
}

std::int32_t speed_points_for(std::uint64_t tokens_per_second,
                              const scoring_options& options) noexcept {
  for (const auto& tier : options.speed_tiers) {
    if (tokens_per_second >= tier.tokens_per_second_min) return tier.points;
  }
  return 0;
}

job_points points_for_success(const job_measure& measure, bool plausible,
                              const scoring_options& options) noexcept {
  job_points points;
  if (plausible && measure.attempt_tokens >= options.plausibility_completion_tokens_min) {
    points.speed_points = speed_points_for(credible_tokens_per_second(measure, options), options);
  }
  const auto per_point = std::max<std::uint32_t>(1, options.complexity_tokens_per_point);
  points.complexity_points = static_cast<std::int32_t>(
      std::min<std::uint32_t>(measure.prompt_tokens / per_point,
                              static_cast<std::uint32_t>(std::max(0, options.complexity_points_max))));
  points.success_points = options.success_points;
  if (measure.attempt_tokens >= options.long_answer_tokens_min) {
    points.success_points += options.long_answer_points;
  }
  return points;
}

job_points points_for_provider_fault(const scoring_options& options) noexcept {
  job_points points;
  points.success_points = options.failure_points;
  return points;
}

std::int64_t add_points(std::int64_t score, std::int32_t points) noexcept {
  return std::max<std::int64_t>(0, score + points);
}

events::provider_level level_for_score(std::int64_t score) noexcept {
  using events::provider_level;
  if (score >= 10'000) return provider_level::master;
  if (score >= 4'000) return provider_level::diamond;
  if (score >= 1'500) return provider_level::platinum;
  if (score >= 500) return provider_level::gold;
  if (score >= 100) return provider_level::silver;
  return provider_level::bronze;
}

contribution_tier contribution_tier_for(std::int64_t contribution_score) noexcept {
  if (contribution_score <= 0) return contribution_tier::unverified;
  // Above zero the tiers follow the provider levels, Bronze to Master.
  return static_cast<contribution_tier>(level_for_score(contribution_score));
}

std::string_view to_string(contribution_tier tier) noexcept {
  return level_name(static_cast<events::provider_level>(tier));
}

std::string_view level_name(events::provider_level level) noexcept {
  using events::provider_level;
  switch (level) {
    case provider_level::unverified: return "Unverified";
    case provider_level::bronze: return "Bronze";
    case provider_level::silver: return "Silver";
    case provider_level::gold: return "Gold";
    case provider_level::platinum: return "Platinum";
    case provider_level::diamond: return "Diamond";
    case provider_level::master: return "Master";
  }
  return "Unknown";
}

health_status health_for_load(std::uint32_t load_percent,
                              const health_thresholds& thresholds) noexcept {
  if (load_percent >= thresholds.overloaded_from_percent) return health_status::overloaded;
  if (load_percent >= thresholds.busy_from_percent) return health_status::busy;
  if (load_percent >= thresholds.moderate_from_percent) return health_status::moderate;
  return health_status::light;
}

bool token_counts_match(const job_measure& measure, const scoring_options& options) noexcept {
  const std::uint64_t reported = measure.provider_reported_tokens;
  if (reported == 0) return true;
  const std::uint64_t pieces = measure.attempt_tokens;
  const std::uint64_t tolerance = std::max<std::uint64_t>(
      options.token_mismatch_tolerance_tokens, pieces * options.token_mismatch_tolerance_percent / 100);
  const std::uint64_t low = pieces > tolerance ? pieces - tolerance : 0;
  const std::uint64_t high = std::max(measure.attempt_bytes, pieces) + tolerance;
  return reported >= low && reported <= high;
}

bool unreasonably_fast(const job_measure& measure, const scoring_options& options) noexcept {
  if (measure.attempt_tokens < options.plausibility_completion_tokens_min) return false;
  return attempt_tokens_per_second(measure) > options.plausible_tokens_per_second_max;
}

bool reaches_suspension(const events::suspicion_counters& counters,
                        const scoring_options& options) noexcept {
  return counters.unreasonably_fast_jobs >= options.unreasonably_fast_jobs_max ||
         counters.aborted_jobs >= options.aborted_jobs_max ||
         counters.token_count_mismatches >= options.token_count_mismatches_max;
}

std::string suspension_reason(const events::suspicion_counters& counters,
                              const scoring_options& options) {
  std::string reason;
  const auto add = [&reason](std::uint32_t count, std::uint32_t max, std::string_view what) {
    if (count < max) return;
    if (!reason.empty()) reason += "; ";
    reason += std::to_string(count) + " " + std::string(what) + " (threshold " +
              std::to_string(max) + ")";
  };
  add(counters.unreasonably_fast_jobs, options.unreasonably_fast_jobs_max,
      "jobs faster than the hardware can plausibly produce");
  add(counters.aborted_jobs, options.aborted_jobs_max, "jobs aborted by the provider");
  add(counters.token_count_mismatches, options.token_count_mismatches_max,
      "reported token counts that disagree with the platform's count");
  return reason;
}

}  // namespace gpustream::domain
