#pragma once
/// Provider scoring, after the QMesh seed: points per job (speed, complexity, success), levels,
/// achievements, health from reported load, suspicion, and the contribution tiers of users.
///
/// Everything here is a pure integer function of its arguments; every threshold is a field of
/// `scoring_options` or `health_thresholds` with its default written beside it. The provider
/// aggregate (provider.hpp) folds these into events; the selection index (selection.hpp) uses the
/// health thresholds; the priority rules (priority.hpp) use the contribution tiers.

#include <array>
#include <cstdint>
#include <string>
#include <string_view>

#include "events/event.hpp"

namespace gpustream::domain {

/// What the platform measured about one job a provider served. Token counts are the platform's own
/// unless named otherwise; durations are microseconds from the job's assignment.
struct job_measure {
  std::uint32_t prompt_tokens = 0;
  std::uint32_t completion_tokens = 0;         ///< counted by the platform
  std::uint32_t provider_reported_tokens = 0;  ///< what the provider claimed it produced
  std::int64_t ttft_us = 0;                    ///< time to the first token
  std::int64_t total_us = 0;                   ///< time to the last token
  /// Of completion_tokens, the pieces the provider that finished sent itself, and their text in
  /// bytes: after a failover the earlier attempts' pieces are a prefix it was given, and its
  /// backend's usage (provider_reported_tokens) counts only its own.
  std::uint32_t attempt_tokens = 0;
  std::uint64_t attempt_bytes = 0;
};

/// The points one job earns; their sum is added to the provider's score.
struct job_points {
  std::int32_t speed_points = 0;
  std::int32_t complexity_points = 0;
  std::int32_t success_points = 0;  ///< negative for a failure the provider caused

  [[nodiscard]] std::int32_t total() const noexcept {
    return speed_points + complexity_points + success_points;
  }
};

/// Speed points from which a job counts as fast (for the "ten fast jobs" achievement). A constant,
/// not an option: the provider aggregate counts fast jobs while replaying provider_scored events,
/// so changing it changes what the log means.
inline constexpr std::int32_t fast_job_speed_points_min = 4;

/// A job whose decode throughput reaches `tokens_per_second_min` earns `points` speed points.
struct speed_tier {
  std::uint32_t tokens_per_second_min = 0;
  std::int32_t points = 0;
};

struct scoring_options {
  /// Speed points by decode throughput, best tier first; the first tier the job reaches counts,
  /// slower jobs earn 0. Default: >= 100 tok/s: 5, >= 50: 4, >= 25: 3, >= 10: 2, >= 5: 1.
  std::array<speed_tier, 5> speed_tiers{{{100, 5}, {50, 4}, {25, 3}, {10, 2}, {5, 1}}};
  /// Prompt tokens per complexity point (longer prompts earn more). Default: 500.
  std::uint32_t complexity_tokens_per_point = 500;
  /// Most complexity points one job earns. Default: 3.
  std::int32_t complexity_points_max = 3;
  /// Points for a job completed without fault. Default: 2.
  std::int32_t success_points = 2;
  /// Length of the finishing provider's own part of the answer (job_measure::attempt_tokens) from
  /// which a successful job earns `long_answer_points` more. Default: 100.
  std::uint32_t long_answer_tokens_min = 100;
  /// Extra success points for a long answer. Default: 1.
  std::int32_t long_answer_points = 1;
  /// Success points of a job that failed by the provider's fault (negative). Default: -5.
  std::int32_t failure_points = -5;

  /// Fast jobs that unlock `ten_fast_jobs`. Default: 10.
  std::uint32_t fast_jobs_for_achievement = 10;
  /// Successful jobs that unlock `hundred_jobs`. Default: 100.
  std::uint32_t jobs_for_achievement = 100;
  /// Successes without a provider fault between them that unlock `fifty_successes_in_a_row`.
  /// Default: 50.
  std::uint32_t successes_in_a_row_for_achievement = 50;
  /// Length of one uninterrupted connection that unlocks `hour_of_uptime`. Default: 1 h.
  std::int64_t uptime_for_achievement_us = 3'600'000'000;

  /// Throughput above which a job is implausible for one stream on any GPU we serve, judged over
  /// the whole attempt (attempt_tokens_per_second): a provider that makes its answer up sends it
  /// at once. Default: 1,000 tok/s.
  std::uint32_t plausible_tokens_per_second_max = 1'000;
  /// A provider's own part of an answer shorter than this is too short to judge throughput: it is
  /// never found implausibly fast, and earns no speed points (nor counts as a fast job for the
  /// achievements). Default: 32 tokens.
  std::uint32_t plausibility_completion_tokens_min = 32;
  /// Token counts match when they differ by at most this many tokens ... Default: 2.
  std::uint32_t token_mismatch_tolerance_tokens = 2;
  /// ... or by at most this percentage of the platform's count, whichever is larger. Default: 5.
  std::uint32_t token_mismatch_tolerance_percent = 5;
  /// Counter values at which a provider is suspended. Defaults: 3 unreasonably fast jobs,
  /// 10 aborted jobs, 5 token-count mismatches. Counters restart at 0 after a suspension, and at a
  /// suspicion that comes suspicion_window_jobs or more jobs after the previous one.
  std::uint32_t unreasonably_fast_jobs_max = 3;
  std::uint32_t aborted_jobs_max = 10;
  std::uint32_t token_count_mismatches_max = 5;
  /// Suspicions count toward a suspension only while they come fewer than this many jobs apart:
  /// a rare burst of pieces among thousands of honest answers is a loaded network or node, while a
  /// provider that cheats does so job after job. Default: 1,000.
  std::uint64_t suspicion_window_jobs = 1'000;
  /// How long a suspension lasts. Default: 24 h.
  std::int64_t suspension_us = 86'400'000'000;
};

/// Decode throughput of a job in whole tokens per second (rounded down): the finishing provider's
/// own tokens (attempt_tokens: after a failover, the earlier attempts' were a prefix it was given,
/// while its times count from its own offer) over the time from the first to the last token, at
/// least 1 us.
[[nodiscard]] std::uint64_t decode_tokens_per_second(const job_measure& measure) noexcept;

/// Throughput of the finishing provider's whole attempt in whole tokens per second (rounded
/// down): its own tokens over the time from its offer to the last token, at least 1 us. Unlike the
/// decode throughput, nothing the platform does can raise it: a node or agent too busy to read the
/// pieces as they come sees the first token late and the rest in a burst, which shortens the
/// decode it sees but only lengthens the attempt. A provider that holds a made-up answer back and
/// then sends it at once is still found out, unless it waits a token's worth of the plausible
/// maximum (1 ms at the default) per token, which is then no faster than a real GPU.
[[nodiscard]] std::uint64_t attempt_tokens_per_second(const job_measure& measure) noexcept;

/// The decode throughput as far as it is credible: decode_tokens_per_second, unless that is
/// above plausible_tokens_per_second_max (the pieces came in a burst: held back by a busy node or
/// agent, or by a provider making its answer look fast), then attempt_tokens_per_second. Speed
/// points and the `fastest` ranking use it, so that a burst earns no more than the whole attempt
/// shows.
[[nodiscard]] std::uint64_t credible_tokens_per_second(const job_measure& measure,
                                                       const scoring_options& options) noexcept;

/// Speed points for a throughput (0 when below every tier).
[[nodiscard]] std::int32_t speed_points_for(std::uint64_t tokens_per_second,
                                            const scoring_options& options) noexcept;

/// Points of a job completed without fault, on what its provider produced itself, its speed by
/// credible_tokens_per_second. `plausible` is false when the job was unreasonably fast: such a
/// job earns no speed points (suspicion is recorded separately); nor does one too short to judge
/// (plausibility_completion_tokens_min), whose few tokens over a near-zero decode time would earn
/// the most.
[[nodiscard]] job_points points_for_success(const job_measure& measure, bool plausible,
                                            const scoring_options& options) noexcept;

/// Points of a job that failed by the provider's fault: `failure_points` and nothing else.
[[nodiscard]] job_points points_for_provider_fault(const scoring_options& options) noexcept;

/// The score after adding `points`; a score never drops below 0.
[[nodiscard]] std::int64_t add_points(std::int64_t score, std::int32_t points) noexcept;

/// Provider level for a score: Bronze 0-99, Silver 100-499, Gold 500-1499, Platinum 1500-3999,
/// Diamond 4000-9999, Master 10000+ (below 0 counts as Bronze). Never `unverified`.
[[nodiscard]] events::provider_level level_for_score(std::int64_t score) noexcept;

/// A user's contribution tier (what they earned as a provider), which orders their jobs.
enum class contribution_tier : std::uint8_t {
  unverified,  ///< score 0 (or less): never contributed
  bronze,      ///< 1-99
  silver,      ///< 100-499
  gold,        ///< 500-1499
  platinum,    ///< 1500-3999
  diamond,     ///< 4000-9999
  master,      ///< 10000+: skips queues
};

inline constexpr std::size_t contribution_tier_count = 7;

[[nodiscard]] contribution_tier contribution_tier_for(std::int64_t contribution_score) noexcept;

[[nodiscard]] std::string_view to_string(contribution_tier tier) noexcept;
/// "Bronze" ... "Master" (and "Unverified"), for messages.
[[nodiscard]] std::string_view level_name(events::provider_level level) noexcept;

/// What a provider's reported load means for routing.
enum class health_status : std::uint8_t {
  light,       ///< idle or lightly loaded
  moderate,
  busy,
  overloaded,  ///< takes no new work
};

/// Load percentages at which each status starts (a load of 100 is a fully used GPU).
struct health_thresholds {
  /// Default: 40 (below is light).
  std::uint32_t moderate_from_percent = 40;
  /// Default: 60.
  std::uint32_t busy_from_percent = 60;
  /// Default: 80; an overloaded provider rejects work.
  std::uint32_t overloaded_from_percent = 80;
};

[[nodiscard]] health_status health_for_load(std::uint32_t load_percent,
                                            const health_thresholds& thresholds = {}) noexcept;

/// Whether the tokens the provider reports for its attempt (its backend's usage) fit what the
/// platform saw of that attempt: at least its pieces (each piece carries a token; fewer by the
/// tolerance, since tokenisers of one family disagree by a few) and at most its text's bytes (a
/// backend may send several tokens in one piece: vLLM under load, a held-back stop sequence or a
/// split character; but a token is at least a byte), plus the tolerance. A report of 0 is none:
/// many OpenAI-compatible servers stream no usage, and nothing contradicts the platform's count.
[[nodiscard]] bool token_counts_match(const job_measure& measure, const scoring_options& options) noexcept;

/// Whether a completed job was produced faster than plausible: attempt_tokens_per_second above
/// plausible_tokens_per_second_max, for an answer long enough to judge.
[[nodiscard]] bool unreasonably_fast(const job_measure& measure,
                                     const scoring_options& options) noexcept;

/// Whether these counters call for a suspension; when they do, `suspension_reason` says which.
[[nodiscard]] bool reaches_suspension(const events::suspicion_counters& counters,
                                      const scoring_options& options) noexcept;

/// Words for the provider and the operator naming the counter that reached its threshold.
[[nodiscard]] std::string suspension_reason(const events::suspicion_counters& counters,
                                            const scoring_options& options);

}  // namespace gpustream::domain
