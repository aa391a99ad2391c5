#pragma once
/// The 128-bit id of one event: the idempotency key of an append. Callers derive it from the command
/// that caused the event, so that a retried command maps to the same ids.

#include <compare>
#include <cstdint>
#include <string>

namespace gpustream::events {

struct event_id {
  std::uint64_t high = 0;
  std::uint64_t low = 0;

  /// The all-zero id, which no stored event may have.
  [[nodiscard]] bool is_nil() const noexcept { return high == 0 && low == 0; }
  /// 32 lowercase hex digits, high half first.
  [[nodiscard]] std::string to_string() const;

  auto operator<=>(const event_id&) const = default;
};

}  // namespace gpustream::events
