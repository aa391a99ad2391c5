#pragma once
/// Job priority: premium first, then the user's contribution tier, then age; aging bounds how long
/// any job waits behind later arrivals.
///
/// A job's priority is a head start in milliseconds (the number job_queued records). The queue
/// serves jobs by `service_at_us = queued_at_us - head start`, earliest first, first queued first
/// on a tie. A later job overtakes an earlier one only while it arrived less than the difference
/// of their head starts after it, so no job ever waits behind a later arrival that came more than
/// `overtaking_bound_us` after it: priority reorders, it never starves.
///
/// The defaults keep the order for jobs arriving together: premium beats every tier but
/// Master, a higher tier beats a lower one, and Master (which "skips queues") beats everything.

#include <array>
#include <cstdint>

#include "domain/scoring.hpp"

namespace gpustream::domain {

struct priority_options {
  /// Head start of a premium job over a free one. Must exceed every tier's but Master's.
  /// Default: 20 s.
  std::int32_t premium_head_start_ms = 20'000;
  /// Head start by contribution tier, indexed by contribution_tier; never decreasing, and
  /// Master's must be at least premium + Diamond so that Master skips every queue.
  /// Default: Unverified 0, Bronze 1 s, Silver 2 s, Gold 4 s, Platinum 8 s, Diamond 16 s,
  /// Master 60 s.
  std::array<std::int32_t, contribution_tier_count> tier_head_start_ms{
      0, 1'000, 2'000, 4'000, 8'000, 16'000, 60'000};
};

/// Whether the options keep the order described above (a configuration check for app/).
[[nodiscard]] bool keeps_priority_order(const priority_options& options) noexcept;

/// The priority (head start, ms) of a job. The options must keep the priority order.
[[nodiscard]] std::int32_t priority_for(bool premium, contribution_tier tier,
                                        const priority_options& options = {});

/// When the job is due in the queue's order: earlier is served first.
[[nodiscard]] std::int64_t service_at_us(std::int32_t priority, std::int64_t queued_at_us) noexcept;

/// The longest any job waits behind jobs that arrived after it (the largest head start
/// difference), in microseconds.
[[nodiscard]] std::int64_t overtaking_bound_us(const priority_options& options = {}) noexcept;

}  // namespace gpustream::domain
