#include "actors/store_actor.hpp"

#include <caf/actor_system.hpp>
#include <caf/event_based_actor.hpp>
#include <caf/send.hpp>
#include <caf/stateful_actor.hpp>
#include <caf/typed_event_based_actor.hpp>

#include <map>
#include <utility>

#include "actors/errors.hpp"

namespace gpustream::actors {

namespace {

/// Serves the store actor's reads and snapshot writes, so that a long recovery (a ledger's tail)
/// or a snapshot's synced write does not hold up the acknowledgements of appends behind it. One
/// actor, in the order the store actor forwards: a snapshot saved before a recovery of its
/// stream is seen by it.
using store_reader = caf::typed_actor<caf::replies_to<recover_atom, std::string, bool, std::uint64_t>::with<recovery>,
                                      caf::reacts_to<snapshot_atom, std::string, std::uint64_t, std::string>>;

struct store_state {
  // Declared so that the state is no aggregate: CAF would otherwise try to build it from the
  // actor pointer (C++20 aggregates accept parenthesised initialisation).
  store_state() = default;

  std::shared_ptr<storage::event_store> store;
  store_actor_options options;
  store_reader reader;  ///< linked: it exits with this actor
  /// Appends handed to the store and not yet answered, by ticket. Bounded by the store itself:
  /// beyond its append_queue_events_max or append_queue_bytes_max it refuses appends with
  /// `overloaded`.
  std::map<std::uint64_t, caf::typed_response_promise<storage::append_result>> pending;
  std::uint64_t next_ticket = 1;

  static inline const char* name = "gpustream.store";
};

using store_pointer = store_actor::stateful_pointer<store_state>;

/// One part of a recovery: a stream's whole tail may be long (a ledger's), so it goes over in
/// parts of at most read_events_max events, and is never held in memory whole.
expected<recovery, storage::error> read_recovery(storage::event_store& store, const std::string& stream,
                                                 bool use_snapshot, std::uint64_t after_version) {
  recovery result;
  if (use_snapshot && after_version == 0) {
    auto snapshot = store.load_snapshot(stream);
    // A snapshot only saves reading: one that fails its check is read past, and the stream
    // replayed whole (`replay --verify` names it; the actor's next snapshot replaces it).
    if (!snapshot && snapshot.error().code != storage::errc::corruption) return unexpected{snapshot.error()};
    // One ahead of the log is read past as well: the log lost its tail (a power cut under
    // `buffered` durability, whose lost appends the snapshot, written to its own table, outlived).
    // Its state holds events the log no longer has, and the actor's next append would expect a
    // version the stream never reaches.
    if (snapshot && snapshot.value()) {
      auto head = store.stream_version(stream);
      if (!head) return unexpected{head.error()};
      if (snapshot.value()->version <= *head) {
        result.has_snapshot = true;
        result.snapshot = std::move(*snapshot.value());
        after_version = result.snapshot.version;
      } else {
        // Else, once the stream grew back to its version, it would be taken for the log's state.
        // Best effort: a store that cannot delete it (read-only, a failed disk) says so at its
        // next write, and the next recovery reads past it again.
        (void)store.delete_snapshot(stream);
      }
    }
  }
  const std::size_t chunk = store.options().read_events_max;
  auto events = store.read_stream(stream, after_version + 1, ~std::uint64_t{0}, chunk);
  if (!events) return unexpected{events.error()};
  result.tail = std::move(events).value();
  result.complete = result.tail.size() < chunk;
  return result;
}

caf::result<storage::append_result> append(store_pointer self, append_request request) {
  auto& state = self->state;
  if (state.options.wait_for_each_append) {
    auto result = state.store->append(std::move(request.streams));
    if (!result) return make_error(result.error());
    return std::move(result.value());
  }
  const std::uint64_t ticket = state.next_ticket++;
  state.pending.emplace(ticket, self->make_response_promise<storage::append_result>());
  // The callback runs on the store's thread: it only posts the outcome to this actor's mailbox.
  state.store->append_async(
      std::move(request.streams),
      [handle = store_actor{self}, ticket](expected<storage::append_result, storage::error> r) {
        caf::anon_send(handle, appended_atom::value, append_outcome{ticket, std::move(r)});
      });
  return state.pending.at(ticket);
}

void deliver(store_pointer self, append_outcome& outcome) {
  auto pending = self->state.pending.find(outcome.ticket);
  GPUSTREAM_ENSURE(pending != self->state.pending.end());
  if (outcome.result) {
    pending->second.deliver(std::move(outcome.result.value()));
  } else {
    pending->second.deliver(make_error(outcome.result.error()));
  }
  self->state.pending.erase(pending);
}

store_reader::behavior_type reader_behavior(std::shared_ptr<storage::event_store> store) {
  return {
      [store](recover_atom, const std::string& stream, bool use_snapshot,
              std::uint64_t after_version) -> caf::result<recovery> {
        auto result = read_recovery(*store, stream, use_snapshot, after_version);
        if (!result) return make_error(result.error());
        return std::move(result.value());
      },
      [store](snapshot_atom, const std::string& stream, std::uint64_t version, const std::string& state) {
        // Snapshots are only an optimisation: a failed save costs a longer recovery, no data.
        (void)store->save_snapshot(stream, version, state);
      },
  };
}

store_actor::behavior_type store_behavior(store_pointer self,
                                          std::shared_ptr<storage::event_store> store,
                                          store_actor_options options) {
  self->state.store = std::move(store);
  self->state.options = options;
  self->state.reader = self->spawn<caf::linked>(reader_behavior, self->state.store);
  return {
      [self](append_atom, append_request& request) {
        return append(self, std::move(request));
      },
      [self](recover_atom, std::string& stream, bool use_snapshot, std::uint64_t after_version) {
        return self->delegate(self->state.reader, recover_atom::value, std::move(stream), use_snapshot,
                              after_version);
      },
      [self](snapshot_atom, std::string& stream, std::uint64_t version, std::string& state) {
        self->send(self->state.reader, snapshot_atom::value, std::move(stream), version, std::move(state));
      },
      [self](appended_atom, append_outcome& outcome) { deliver(self, outcome); },
  };
}

}  // namespace

store_actor spawn_store_actor(caf::actor_system& system,
                              std::shared_ptr<storage::event_store> store,
                              store_actor_options options) {
  return system.spawn(store_behavior, std::move(store), options);
}

}  // namespace gpustream::actors
