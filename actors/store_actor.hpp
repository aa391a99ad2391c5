#pragma once
/// The store actor owns the event store. Aggregate actors send it their appends; it hands them to
/// the store's group commit without waiting (appends of many actors share one fsync) and answers
/// each once the store has acknowledged it. It also serves recovery reads and snapshot writes,
/// through an actor of its own, so that they never hold up the acknowledgements.

#include <caf/fwd.hpp>
#include <caf/replies_to.hpp>
#include <caf/typed_actor.hpp>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "actors/atoms.hpp"
#include "events/record.hpp"
#include "storage/event_store.hpp"

namespace gpustream::actors {

/// One atomic append: every event of every stream, or none.
struct append_request {
  std::vector<storage::stream_append> streams;
};

/// What an aggregate actor needs to come back to life: its latest snapshot (if any) and the events
/// after it, at most the store's read_events_max at a time.
struct recovery {
  bool has_snapshot = false;
  storage::snapshot snapshot;        ///< valid when has_snapshot
  std::vector<events::record> tail;  ///< events after the snapshot's version (or the asked one), in order
  /// False: more events follow; the actor asks again after the last one's version.
  bool complete = true;
};

/// The outcome of one append, passed from the store's thread back into the actor.
struct append_outcome {
  std::uint64_t ticket = 0;  ///< which pending request it answers
  expected<storage::append_result, storage::error> result;
};

using store_actor = caf::typed_actor<
    caf::replies_to<append_atom, append_request>::with<storage::append_result>,
    // (stream, use_snapshot, after_version): with after_version 0, the snapshot (unless
    // use_snapshot is false) and the events after it; otherwise the events after after_version.
    caf::replies_to<recover_atom, std::string, bool, std::uint64_t>::with<recovery>,
    caf::reacts_to<snapshot_atom, std::string, std::uint64_t, std::string>,
    // Internal: the store's completion callback reports back through the mailbox, because a
    // response promise must only be fulfilled on the actor's own thread.
    caf::reacts_to<appended_atom, append_outcome>>;

struct store_actor_options {
  /// Tests: answer each append only after blocking until it is acknowledged, so that runs under
  /// CAF's test_coordinator are deterministic. Production leaves it off, so that appends of many
  /// actors are in flight at once and share a group commit. Default: false.
  bool wait_for_each_append = false;
};

/// Spawns the store actor, which shares `store` from then on; the store closes once the actor
/// has exited and every other owner (e.g. a health check reading last_position) let it go.
[[nodiscard]] store_actor spawn_store_actor(caf::actor_system& system,
                                            std::shared_ptr<storage::event_store> store,
                                            store_actor_options options = {});

}  // namespace gpustream::actors

// Local-only message types: they never cross a node boundary, so they need no serializer.
#include <caf/allowed_unsafe_message_type.hpp>
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(gpustream::actors::append_request)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(gpustream::actors::recovery)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(gpustream::actors::append_outcome)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(gpustream::storage::append_result)
