#pragma once
/// Calendar arithmetic the rules share. Instants are microseconds since the Unix epoch.

#include <cstdint>

namespace gpustream::domain {

inline constexpr std::int64_t us_per_day = 86'400'000'000;

/// The UTC day of an instant: days since the epoch, rounded down (instants before the epoch do not
/// share day 0 with those after it). Free-tier quotas, pacing and frequency caps reset per UTC day.
[[nodiscard]] constexpr std::int64_t utc_day(std::int64_t at_us) noexcept {
  return at_us >= 0 ? at_us / us_per_day : -((-at_us + us_per_day - 1) / us_per_day);
}

static_assert(utc_day(0) == 0 && utc_day(us_per_day - 1) == 0 && utc_day(us_per_day) == 1);
static_assert(utc_day(-1) == -1);

}  // namespace gpustream::domain
