#pragma once
/// What every aggregate of the domain looks like, and the closed error type its decisions return.
///
/// An aggregate is a tag struct with:
///   - `state`: a plain value (integers, bool, enums, std::string, std::vector, std::map, std::set,
///     nested structs) with a free `inspect(Inspector&, state&)` that lists every field as
///     `return f(x.a, x.b, ...)`, so that actors/ can snapshot it with CAF's serializers without
///     domain/ ever including CAF;
///   - `command`: a std::variant of command structs;
///   - `static state evolve(state, const events::event&)`: applies one event; total (an event of
///     another aggregate, or one that cannot apply, leaves the state as it is);
///   - `static decision decide(const state&, const command&, std::int64_t now_us)`: the events that
///     carry the command out, or why it is refused. Pure: no clock, no randomness, no I/O.
///   - `static constexpr std::uint32_t snapshot_version`: bumped whenever `state`'s fields change,
///     so that an old snapshot is ignored (replayed from the log) rather than misread.

#include <concepts>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "base/expected.hpp"
#include "events/event.hpp"

namespace gpustream::domain {

/// Why a command was refused. Closed: callers switch on it (the gateway maps it to HTTP statuses).
enum class errc {
  invalid_argument,    ///< the command itself is malformed (empty id, negative amount, ...)
  not_found,           ///< the aggregate or a thing it refers to does not exist
  already_exists,      ///< creating something that exists with different content
  invalid_state,       ///< the command does not apply in the aggregate's current state
  insufficient_funds,  ///< a balance that must not go negative would
  quota_exceeded,      ///< a free-tier daily quota or a frequency cap is used up
  limit_exceeded,      ///< a named limit (queue length, budget, ...) would be exceeded
  no_provider,         ///< no online provider can serve the request
  suspended,           ///< the provider is suspended
  busy,                ///< a queue or backlog is full now: the same command may pass shortly
};

[[nodiscard]] std::string_view to_string(errc code) noexcept;

struct error {
  errc code;
  std::string message;  ///< says what was refused and why, in words a person can act on
};

/// The outcome of `decide`: the events to append (possibly none: the command was already carried
/// out), or why the command was refused.
using decision = expected<std::vector<events::event>, error>;

/// Shorthand for a refused decision.
[[nodiscard]] inline unexpected<error> refuse(errc code, std::string message) {
  return unexpected<error>{error{code, std::move(message)}};
}

template <class A>
concept aggregate = requires(typename A::state s, const events::event& e,
                             const typename A::command& c, std::int64_t now_us) {
  { A::evolve(std::move(s), e) } -> std::same_as<typename A::state>;
  { A::decide(s, c, now_us) } -> std::same_as<decision>;
  { A::snapshot_version } -> std::convertible_to<std::uint32_t>;
};

/// The events of `commands` decided one after another against `working`, all or none: the first
/// refusal refuses them all. What an aggregate's actor appends for a list of commands; deciding it
/// without appending tells whether the list would be accepted now.
template <aggregate A>
[[nodiscard]] decision decide_all(const typename A::state& working,
                                  const std::vector<typename A::command>& commands, std::int64_t now_us) {
  if (commands.size() == 1) return A::decide(working, commands.front(), now_us);
  auto trial = working;
  std::vector<events::event> decided;
  for (const auto& command : commands) {
    auto outcome = A::decide(trial, command, now_us);
    if (!outcome) return outcome;
    for (auto& event : outcome.value()) {
      trial = A::evolve(std::move(trial), event);
      decided.push_back(std::move(event));
    }
  }
  return decided;
}

}  // namespace gpustream::domain
