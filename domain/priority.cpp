#include "domain/priority.hpp"

#include <algorithm>

#include "base/ensure.hpp"

namespace gpustream::domain {

bool keeps_priority_order(const priority_options& options) noexcept {
  const auto& tiers = options.tier_head_start_ms;
  if (tiers.front() < 0 || !std::is_sorted(tiers.begin(), tiers.end())) return false;
  const auto diamond = tiers[static_cast<std::size_t>(contribution_tier::diamond)];
  const auto master = tiers[static_cast<std::size_t>(contribution_tier::master)];
  return options.premium_head_start_ms > diamond &&
         static_cast<std::int64_t>(master) >=
             static_cast<std::int64_t>(options.premium_head_start_ms) + diamond;
}

std::int32_t priority_for(bool premium, contribution_tier tier, const priority_options& options) {
  GPUSTREAM_ENSURE(keeps_priority_order(options));
  const auto index = static_cast<std::size_t>(tier);
  GPUSTREAM_ENSURE(index < options.tier_head_start_ms.size());
  return options.tier_head_start_ms[index] + (premium ? options.premium_head_start_ms : 0);
}

std::int64_t service_at_us(std::int32_t priority, std::int64_t queued_at_us) noexcept {
  return queued_at_us - static_cast<std::int64_t>(priority) * 1'000;
}

std::int64_t overtaking_bound_us(const priority_options& options) noexcept {
  const auto& tiers = options.tier_head_start_ms;
  const std::int64_t highest =
      static_cast<std::int64_t>(*std::max_element(tiers.begin(), tiers.end())) +
      options.premium_head_start_ms;
  const std::int64_t lowest = *std::min_element(tiers.begin(), tiers.end());
  return (highest - lowest) * 1'000;
}

}  // namespace gpustream::domain
