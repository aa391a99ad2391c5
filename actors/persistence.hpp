#pragma once
/// What every persistent (event-sourced) actor shares, independent of its aggregate: the reply to
/// a command, the options, event ids and encoding of events for the store, and snapshots.

#include <caf/fwd.hpp>

#include <chrono>
#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "base/expected.hpp"
#include "events/event.hpp"
#include "events/event_id.hpp"
#include "storage/event_store.hpp"

namespace gpustream::actors {

/// The answer to an accepted command, sent only once its events are acknowledged by the store.
struct command_reply {
  std::uint64_t version = 0;          ///< the stream's version after the command
  std::vector<events::event> events;  ///< what the command appended; empty: nothing was left to do
};

struct persistence_options {
  /// Most commands waiting while the actor recovers or appends; beyond it a command is refused
  /// with busy (backpressure: CAF mailboxes themselves are unbounded). Default: 4096.
  std::size_t stash_commands_max = 4096;
  /// Most waiting commands decided into one append, so that a busy actor writes one batch per
  /// round trip to the store instead of one per command. Default: 512.
  std::size_t commands_per_append_max = 512;
  /// Most events in one append; a batch stops growing when the next command would pass it. Must
  /// not exceed the store's append_events_max. Default: 2048.
  std::size_t events_per_append_max = 2048;
  /// A snapshot is written after this many events since the last one (0: never), and only once
  /// those are at least a quarter of the stream: a snapshot costs time in proportion to the
  /// state, which may grow with the stream (the ledger keeps every transfer id), so this keeps
  /// its cost per event constant while recovery still replays less than a quarter of the stream.
  /// Default: 1000.
  std::uint64_t snapshot_every_events = 1000;
  /// Source of `now` for decisions, microseconds since the Unix epoch. Default: the system clock.
  std::function<std::int64_t()> clock_us;
};

/// The system clock in microseconds since the Unix epoch.
[[nodiscard]] std::int64_t system_clock_us();

/// The id of the event at `version` of `stream`. Each stream has one writer, so (stream, version)
/// names an event uniquely, and an append retried unchanged after an unknown outcome carries the
/// same ids: the store then finds it written instead of writing it twice.
[[nodiscard]] events::event_id derive_event_id(std::string_view stream, std::uint64_t version);

/// Encodes `batch`, the next events of `stream` after `version`, for the store.
[[nodiscard]] storage::stream_append make_stream_append(const std::string& stream,
                                                        std::uint64_t version,
                                                        const std::vector<events::event>& batch);

/// A snapshot's bytes: the aggregate's snapshot_version, then its state, serialized by CAF.
template <class State>
[[nodiscard]] std::string encode_snapshot(caf::actor_system& system, std::uint32_t format,
                                          State& state);

/// The state in `bytes`, or nothing if they were written by another snapshot_version (the caller
/// then replays the stream from the start: snapshots are only an optimisation).
template <class State>
[[nodiscard]] bool decode_snapshot(caf::actor_system& system, std::uint32_t format,
                                   const std::string& bytes, State& state);

}  // namespace gpustream::actors

#include <caf/allowed_unsafe_message_type.hpp>
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(gpustream::actors::command_reply)

// ---------------------------------------------------------------------------------------------
// Templates.

#include <caf/binary_deserializer.hpp>
#include <caf/binary_serializer.hpp>

namespace gpustream::actors {

template <class State>
std::string encode_snapshot(caf::actor_system& system, std::uint32_t format, State& state) {
  std::vector<char> bytes;
  caf::binary_serializer sink(system, bytes);
  const auto failure = sink(format, state);
  GPUSTREAM_ENSURE(!failure);  // serializing plain values into memory cannot fail
  return std::string(bytes.begin(), bytes.end());
}

template <class State>
bool decode_snapshot(caf::actor_system& system, std::uint32_t format, const std::string& bytes,
                     State& state) {
  caf::binary_deserializer source(system, bytes.data(), bytes.size());
  std::uint32_t stored_format = 0;
  if (source(stored_format) || stored_format != format) return false;
  State decoded{};
  if (source(decoded) || source.remaining() != 0) return false;
  state = std::move(decoded);
  return true;
}

}  // namespace gpustream::actors
