#pragma once
/// The persistence shell around a domain aggregate (domain/aggregate.hpp): a command is decided,
/// its events are appended through the store actor, and only once the store has acknowledged them
/// are they applied to the state and the reply sent (persist, then apply).
///
/// - A list of commands is decided together, all or none, and appended in one batch (e.g. a job
///   submitted and queued at once).
/// - Commands arriving while the actor recovers or waits for an append are stashed (bounded by
///   stash_commands_max) and handled in order; the next append carries every stashed command's
///   events (up to the batch limits), each decided against the state including the earlier ones.
///   Refusals are answered only after that append too, since they were decided against it.
/// - On spawn the actor recovers from its latest snapshot plus the tail of its stream, and writes
///   a snapshot every snapshot_every_events events.
/// - If the store fails, every waiting requester gets the error and the actor stops with it,
///   rather than carry on with state that is not persisted.
/// - `passivate` (from the registry) stops the actor once nothing is stashed or in flight.
///
/// Include this only in .cpp files: it pulls in CAF.

#include <caf/event_based_actor.hpp>
#include <caf/stateful_actor.hpp>
#include <caf/typed_actor.hpp>
#include <caf/typed_event_based_actor.hpp>
#include <caf/typed_response_promise.hpp>

#include <deque>
#include <functional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "actors/atoms.hpp"
#include "actors/errors.hpp"
#include "actors/persistence.hpp"
#include "actors/store_actor.hpp"
#include "base/ensure.hpp"
#include "domain/aggregate.hpp"
#include "events/codec.hpp"

namespace gpustream::actors {

/// An aggregate may answer one kind of query about its acknowledged state besides the state
/// itself (cheaper than copying a large state): `query`, `answer` and `static answer
/// respond(const state&, const query&)`.
template <class A>
concept has_query = requires(const typename A::state& s, const typename A::query& q) {
  { A::respond(s, q) } -> std::same_as<typename A::answer>;
};

/// An aggregate may check its invariants after each command's events are applied:
/// `static expected<void, V> check_applied(const state&, std::span<const events::event>)`. A failed
/// check is a bug in the domain rules, so it stops the process (GPUSTREAM_ENSURE).
template <class A>
concept has_applied_check = requires(const typename A::state& s, std::span<const events::event> e) {
  { A::check_applied(s, e).has_value() } -> std::convertible_to<bool>;
};

/// An aggregate may claim keys in the store for good with the events of each append (e.g. the
/// ledger's transfer ids): `static std::vector<std::string> unique_keys(std::span<const
/// events::event>)`. An append refused because a key was claimed before (key_taken) writes nothing;
/// its commands are decided again one per append, so that only the one claiming a taken key is
/// refused (with the store's error naming the key).
template <class A>
concept has_unique_keys = requires(std::span<const events::event> e) {
  { A::unique_keys(e) } -> std::same_as<std::vector<std::string>>;
};

template <class A>
struct aggregate_interface {
  using type =
      caf::typed_actor<typename caf::replies_to<typename A::command>::template with<command_reply>,
                       typename caf::replies_to<std::vector<typename A::command>>::template with<
                           command_reply>,
                       typename caf::replies_to<state_atom>::template with<typename A::state>,
                       caf::reacts_to<passivate_atom>>;
};

template <has_query A>
struct aggregate_interface<A> {
  using type =
      caf::typed_actor<typename caf::replies_to<typename A::command>::template with<command_reply>,
                       typename caf::replies_to<std::vector<typename A::command>>::template with<
                           command_reply>,
                       typename caf::replies_to<state_atom>::template with<typename A::state>,
                       caf::reacts_to<passivate_atom>,
                       typename caf::replies_to<typename A::query>::template with<typename A::answer>>;
};

/// The interface of the actor around aggregate A. `state_atom` answers the acknowledged state.
template <domain::aggregate A>
using aggregate_actor = typename aggregate_interface<A>::type;

template <domain::aggregate A>
struct persistent_state {
  // Declared so that the state is no aggregate: CAF would otherwise try to build it from the
  // actor pointer (C++20 aggregates accept parenthesised initialisation).
  persistent_state() = default;

  using promise = caf::typed_response_promise<command_reply>;

  struct waiting {
    promise reply;
    std::vector<typename A::command> commands;  ///< decided together: all or none
  };
  /// A decided command whose answer waits for the append it is part of.
  struct decided {
    promise reply;
    domain::decision outcome;
    std::vector<typename A::command> commands;  ///< to decide again if the append is refused
  };

  std::string stream;
  store_actor store;
  persistence_options options;
  typename A::state state{};    ///< acknowledged events only: what queries see
  typename A::state working{};  ///< plus the events in flight: what decisions are taken against
  std::uint64_t version = 0;    ///< acknowledged
  std::uint64_t snapshot_version = 0;
  bool recovering = true;
  bool appending = false;
  bool passivating = false;
  /// After an append refused for a taken unique key: how many of the stash's first commands are
  /// still to be decided and appended one at a time.
  std::size_t alone = 0;
  std::deque<waiting> stash;
  std::vector<decided> in_flight;
  /// Queries that arrived during recovery, answered once it ends (with the error if it fails).
  std::vector<std::function<void(const caf::error* failure)>> recovery_waiters;

  static inline const char* name = "gpustream.aggregate";
};

namespace detail {

template <domain::aggregate A>
using persistent_pointer = typename aggregate_actor<A>::template stateful_pointer<persistent_state<A>>;

template <domain::aggregate A>
void fail_everything(persistent_pointer<A> self, const caf::error& failure) {
  auto& st = self->state;
  for (auto& d : st.in_flight) d.reply.deliver(failure);
  for (auto& w : st.stash) w.reply.deliver(failure);
  for (auto& waiter : st.recovery_waiters) waiter(&failure);
  st.recovery_waiters.clear();
  st.in_flight.clear();
  st.stash.clear();
  self->quit(failure);
}

/// Runs `answer` now if the actor has recovered, else once recovery ends.
template <domain::aggregate A, class F>
void when_recovered(persistent_pointer<A> self, F answer) {
  if (self->state.recovering) {
    self->state.recovery_waiters.emplace_back(std::move(answer));
  } else {
    answer(nullptr);
  }
}

template <domain::aggregate A>
void maybe_snapshot(persistent_pointer<A> self) {
  auto& st = self->state;
  if (st.options.snapshot_every_events == 0) return;
  const std::uint64_t since = st.version - st.snapshot_version;
  if (since < st.options.snapshot_every_events || since < st.version / 4) return;
  auto bytes = encode_snapshot(self->system(), A::snapshot_version, st.state);
  self->send(st.store, snapshot_atom::value, st.stream, st.version, std::move(bytes));
  st.snapshot_version = st.version;
}

template <domain::aggregate A>
void dispatch(persistent_pointer<A> self);

/// The append of the current batch was acknowledged: apply, answer, go on.
template <domain::aggregate A>
void on_appended(persistent_pointer<A> self) {
  auto& st = self->state;
  for (auto& d : st.in_flight) {
    if (!d.outcome) {
      d.reply.deliver(make_error(d.outcome.error()));
      continue;
    }
    for (const auto& event : d.outcome.value()) st.state = A::evolve(std::move(st.state), event);
    if constexpr (has_applied_check<A>) {
      GPUSTREAM_ENSURE(A::check_applied(st.state, d.outcome.value()).has_value());
    }
    st.version += d.outcome.value().size();
    d.reply.deliver(command_reply{st.version, std::move(d.outcome.value())});
  }
  st.in_flight.clear();
  st.appending = false;
  maybe_snapshot<A>(self);
  dispatch<A>(self);
}

/// The append of the current batch was refused because it claimed a key claimed before: nothing
/// of it was written. A batch of one command is refused with the store's error; a larger one is
/// decided again, one command per append, so that only the command claiming the key is refused.
template <domain::aggregate A>
void on_key_taken(persistent_pointer<A> self, const caf::error& failure) {
  auto& st = self->state;
  st.working = st.state;
  st.appending = false;
  if (st.in_flight.size() == 1) {
    st.in_flight.front().reply.deliver(failure);
  } else {
    for (auto d = st.in_flight.rbegin(); d != st.in_flight.rend(); ++d) {
      st.stash.push_front({std::move(d->reply), std::move(d->commands)});
    }
    st.alone = st.in_flight.size();
  }
  st.in_flight.clear();
  dispatch<A>(self);
}

/// Decides stashed commands into one batch and appends it; repeats while nothing needs appending.
template <domain::aggregate A>
void dispatch(persistent_pointer<A> self) {
  auto& st = self->state;
  while (!st.recovering && !st.appending && !st.stash.empty()) {
    std::vector<events::event> batch;
    const std::int64_t now_us = st.options.clock_us();
    const std::size_t commands_max = st.alone > 0 ? 1 : st.options.commands_per_append_max;
    while (!st.stash.empty() && st.in_flight.size() < commands_max) {
      auto outcome = domain::decide_all<A>(st.working, st.stash.front().commands, now_us);
      if (outcome && outcome.value().size() > st.options.events_per_append_max) {
        // Alone in an append it would still pass the limit (and perhaps the store's, whose
        // refusal would fail every command waiting with it): refused on its own.
        outcome = domain::refuse(domain::errc::limit_exceeded,
                                 "the commands for stream " + st.stream + " decide " +
                                     std::to_string(outcome.value().size()) + " events; at most " +
                                     std::to_string(st.options.events_per_append_max) +
                                     " are appended at once (events_per_append_max)");
      }
      if (outcome && batch.size() + outcome.value().size() > st.options.events_per_append_max &&
          !batch.empty()) {
        break;  // this command opens the next batch
      }
      if (outcome) {
        for (const auto& event : outcome.value()) {
          st.working = A::evolve(std::move(st.working), event);
          batch.push_back(event);
        }
      }
      st.in_flight.push_back({std::move(st.stash.front().reply), std::move(outcome),
                              std::move(st.stash.front().commands)});
      st.stash.pop_front();
      if (st.alone > 0) --st.alone;
    }
    if (batch.empty()) {
      on_appended<A>(self);  // only refusals and no-ops: nothing to persist
      return;
    }
    st.appending = true;
    // Expected version: the acknowledged one, which only this actor moves.
    append_request request{{make_stream_append(st.stream, st.version, batch)}};
    if constexpr (has_unique_keys<A>) request.streams.front().unique_keys = A::unique_keys(batch);
    self->request(st.store, caf::infinite, append_atom::value, std::move(request))
        .then([self](const storage::append_result&) { on_appended<A>(self); },
              [self](caf::error& failure) {
                if constexpr (has_unique_keys<A>) {
                  const auto refused = storage_error_of(failure);
                  if (refused && refused->code == storage::errc::key_taken) return on_key_taken<A>(self, failure);
                }
                fail_everything<A>(self, failure);
              });
  }
  if (st.passivating && !st.appending && st.stash.empty() && !st.recovering) self->quit();
}

/// Applies one part of the recovery: the snapshot (if it decodes) and events. Returns false when
/// the snapshot was written by another snapshot_version: the caller then recovers without it.
/// The recovery ends with its complete part.
template <domain::aggregate A>
expected<bool, caf::error> apply_recovery(persistent_pointer<A> self, recovery& r) {
  auto& st = self->state;
  if (r.has_snapshot) {
    if (!decode_snapshot(self->system(), A::snapshot_version, r.snapshot.state, st.state)) {
      return false;
    }
    st.version = r.snapshot.version;
    st.snapshot_version = r.snapshot.version;
  }
  for (const auto& record : r.tail) {
    GPUSTREAM_ENSURE(record.version == st.version + 1);
    auto event = events::decode_payload(
        record.type, std::as_bytes(std::span(record.payload.data(), record.payload.size())));
    if (!event) {
      return unexpected{make_error(storage::error{
          storage::errc::corruption, "event " + std::to_string(record.version) + " of stream " +
                                         st.stream + " cannot be decoded: " + event.error().message})};
    }
    st.state = A::evolve(std::move(st.state), event.value());
    st.version = record.version;
  }
  if (!r.complete) return true;
  st.working = st.state;
  st.recovering = false;
  for (auto& waiter : st.recovery_waiters) waiter(nullptr);
  st.recovery_waiters.clear();
  return true;
}

/// Recovers the actor's state: the snapshot (when `use_snapshot`) and the events after it, or
/// (after_version > 0) goes on with the events after after_version.
template <domain::aggregate A>
void recover(persistent_pointer<A> self, bool use_snapshot, std::uint64_t after_version = 0) {
  auto& st = self->state;
  self->request(st.store, caf::infinite, recover_atom::value, st.stream, use_snapshot, after_version)
      .then(
          [self](recovery& r) {
            auto applied = apply_recovery<A>(self, r);
            if (!applied) {
              fail_everything<A>(self, applied.error());
            } else if (!applied.value()) {
              self->state.state = typename A::state{};
              self->state.version = 0;
              recover<A>(self, false);
            } else if (!r.complete) {
              recover<A>(self, false, self->state.version);
            } else {
              dispatch<A>(self);
            }
          },
          [self](caf::error& failure) { fail_everything<A>(self, failure); });
}

}  // namespace detail

/// The behavior of the actor around aggregate A, for `stream`.
template <domain::aggregate A>
typename aggregate_actor<A>::behavior_type persistent_behavior(
    detail::persistent_pointer<A> self, std::string stream, store_actor store,
    persistence_options options) {
  auto& st = self->state;
  st.stream = std::move(stream);
  st.store = std::move(store);
  if (!options.clock_us) options.clock_us = system_clock_us;
  st.options = std::move(options);
  detail::recover<A>(self, true);
  auto on_commands = [self](std::vector<typename A::command>& commands)
      -> caf::typed_response_promise<command_reply> {
    auto& st = self->state;
    auto reply = self->template make_response_promise<command_reply>();
    if (commands.empty()) {
      reply.deliver(make_error(domain::error{domain::errc::invalid_argument,
                                             "an empty list of commands for stream " + st.stream}));
      return reply;
    }
    if (st.stash.size() >= st.options.stash_commands_max) {
      reply.deliver(make_error(domain::error{
          domain::errc::busy,
          "stream " + st.stream + " has " + std::to_string(st.stash.size()) +
              " commands waiting, the most allowed (stash_commands_max); retry later"}));
      return reply;
    }
    st.stash.push_back({reply, std::move(commands)});
    detail::dispatch<A>(self);
    return reply;
  };
  auto on_command = [on_commands](typename A::command& command) mutable {
    std::vector<typename A::command> one;
    one.push_back(std::move(command));
    return on_commands(one);
  };
  auto on_state = [self](state_atom) {
    auto reply = self->template make_response_promise<typename A::state>();
    detail::when_recovered<A>(self, [self, reply](const caf::error* failure) mutable {
      if (failure) {
        reply.deliver(*failure);
      } else {
        reply.deliver(self->state.state);
      }
    });
    return reply;
  };
  auto on_passivate = [self](passivate_atom) {
    self->state.passivating = true;
    detail::dispatch<A>(self);
  };
  if constexpr (has_query<A>) {
    auto on_query = [self](typename A::query& query) {
      auto reply = self->template make_response_promise<typename A::answer>();
      detail::when_recovered<A>(self, [self, reply, query = std::move(query)](
                                          const caf::error* failure) mutable {
        if (failure) {
          reply.deliver(*failure);
        } else {
          reply.deliver(A::respond(self->state.state, query));
        }
      });
      return reply;
    };
    return {on_command, on_commands, on_state, on_passivate, on_query};
  } else {
    return {on_command, on_commands, on_state, on_passivate};
  }
}

}  // namespace gpustream::actors
