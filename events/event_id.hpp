#pragma once
/// The 128-bit id of one event: the idempotency key of an append. Callers derive it from the command
/// that caused the event, so that a retried command maps to the same ids.

#include <compare>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace gpustream::events {

struct event_id {
  std::uint64_t high = 0;
  std::uint64_t low = 0;

  /// The all-zero id, which no stored event may have.
  [[nodiscard]] bool is_nil() const noexcept { return high == 0 && low == 0; }
  /// 32 lowercase hex digits, high half first.
  [[nodiscard]] std::string to_string() const;
  /// Parses what to_string() wrote; nullopt for anything else.
  [[nodiscard]] static std::optional<event_id> parse(std::string_view hex) noexcept;

  auto operator<=>(const event_id&) const = default;
};

}  // namespace gpustream::events
