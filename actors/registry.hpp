#pragma once
/// A registry of the actors of one aggregate type: it spawns the actor of a stream on demand (which
/// recovers from the store), forwards commands and queries to it, and passivates actors that have
/// been idle for idle_max. A stream never has two live actors: commands for a stream whose actor is
/// still stopping are held (bounded) and handed to its successor once the old one is gone.
///
/// Include this only in .cpp files: it pulls in CAF.

#include <caf/actor_clock.hpp>
#include <caf/typed_actor.hpp>

#include <chrono>
#include <deque>
#include <map>
#include <string>
#include <utility>

#include "actors/persistent_actor.hpp"

namespace gpustream::actors {

/// The interface of the registry for aggregate A. Commands and queries name the aggregate by id;
/// the stream is stream_prefix + id.
template <domain::aggregate A>
using registry_actor = caf::typed_actor<
    typename caf::replies_to<std::string, typename A::command>::template with<command_reply>,
    typename caf::replies_to<std::string, std::vector<typename A::command>>::template with<
        command_reply>,
    typename caf::replies_to<std::string, state_atom>::template with<typename A::state>,
    typename caf::replies_to<count_atom>::template with<std::size_t>,
    // Passivates the actor of an id now (e.g. its aggregate reached a final state): it stops once
    // nothing is stashed or in flight; a later command or query spawns a successor.
    caf::reacts_to<passivate_atom, std::string>,
    // Internal: the periodic check for idle actors.
    caf::reacts_to<idle_atom>>;

struct registry_options {
  /// Stream id of aggregate `id`: this prefix + id, e.g. "job-".
  std::string stream_prefix;
  /// Options of every actor the registry spawns.
  persistence_options persistence;
  /// An actor that received nothing for this long is passivated. Default: 60 s.
  caf::timespan idle_max = std::chrono::seconds(60);
  /// How often idle actors are looked for. Default: 10 s.
  caf::timespan idle_check_interval = std::chrono::seconds(10);
  /// Most commands (and, separately, state queries) held for one stream while its previous actor
  /// stops; beyond it they are refused with busy. Default: 1024.
  std::size_t held_commands_max = 1024;
};

template <domain::aggregate A>
struct registry_state {
  // Declared so that the state is no aggregate: CAF would otherwise try to build it from the
  // actor pointer (C++20 aggregates accept parenthesised initialisation).
  registry_state() = default;

  struct held_command {
    caf::typed_response_promise<command_reply> reply;
    std::vector<typename A::command> commands;
  };
  struct entry {
    aggregate_actor<A> actor;
    caf::actor_clock::time_point last_used;
    bool stopping = false;
    std::deque<held_command> held;  ///< for the successor of a stopping actor
    std::deque<caf::typed_response_promise<typename A::state>> held_queries;  ///< likewise
  };

  store_actor store;
  registry_options options;
  std::map<std::string, entry> live;         ///< by aggregate id
  std::map<caf::actor_addr, std::string> ids;  ///< aggregate id of each live actor

  static inline const char* name = "gpustream.registry";
};

namespace detail {

template <domain::aggregate A>
using registry_pointer = typename registry_actor<A>::template stateful_pointer<registry_state<A>>;

template <domain::aggregate A>
typename registry_state<A>::entry& spawn_entry(registry_pointer<A> self, const std::string& id) {
  auto& st = self->state;
  auto actor = self->system().spawn(persistent_behavior<A>, st.options.stream_prefix + id, st.store,
                                    st.options.persistence);
  // Urgent: a command that arrives while the actor stops must not be handed to it after it stopped
  // (it would fail with request_receiver_down) but wait for, or go to, its successor.
  self->template monitor<caf::message_priority::high>(actor);
  st.ids[actor.address()] = id;
  auto& e = st.live[id];
  e.actor = std::move(actor);
  e.stopping = false;
  e.last_used = self->clock().now();
  return e;
}

template <domain::aggregate A>
void passivate(registry_pointer<A> self, typename registry_state<A>::entry& e) {
  if (e.stopping) return;
  e.stopping = true;
  self->send(e.actor, passivate_atom::value);
}

template <domain::aggregate A>
void passivate_idle(registry_pointer<A> self) {
  auto& st = self->state;
  const auto now = self->clock().now();
  for (auto& [id, e] : st.live) {
    if (now - e.last_used >= st.options.idle_max) passivate<A>(self, e);
  }
}

template <domain::aggregate A>
void on_down(registry_pointer<A> self, const caf::down_msg& msg) {
  auto& st = self->state;
  auto id_at = st.ids.find(msg.source);
  if (id_at == st.ids.end()) return;
  const std::string id = std::move(id_at->second);
  st.ids.erase(id_at);
  auto e = st.live.find(id);
  if (e == st.live.end()) return;
  if (e->second.held.empty() && e->second.held_queries.empty()) {
    st.live.erase(e);
    return;
  }
  auto held = std::move(e->second.held);
  auto held_queries = std::move(e->second.held_queries);
  auto& successor = spawn_entry<A>(self, id);
  for (auto& h : held) h.reply.delegate(successor.actor, std::move(h.commands));
  for (auto& q : held_queries) q.delegate(successor.actor, state_atom::value);
}

}  // namespace detail

template <domain::aggregate A>
typename registry_actor<A>::behavior_type registry_behavior(detail::registry_pointer<A> self,
                                                            store_actor store,
                                                            registry_options options) {
  self->state.store = std::move(store);
  self->state.options = std::move(options);
  self->set_down_handler([self](caf::down_msg& msg) { detail::on_down<A>(self, msg); });
  // The registry's actors live and die with it.
  self->set_exit_handler([self](caf::exit_msg& msg) {
    for (auto& [id, e] : self->state.live) self->send_exit(e.actor, msg.reason);
    self->quit(msg.reason);
  });
  self->delayed_send(self, self->state.options.idle_check_interval, idle_atom::value);
  auto on_commands = [self](const std::string& id, std::vector<typename A::command>& commands)
      -> caf::typed_response_promise<command_reply> {
    auto& st = self->state;
    auto reply = self->template make_response_promise<command_reply>();
    auto found = st.live.find(id);
    auto& e = found != st.live.end() ? found->second : detail::spawn_entry<A>(self, id);
    if (!e.stopping) {
      e.last_used = self->clock().now();
      return reply.delegate(e.actor, std::move(commands));
    }
    if (e.held.size() >= st.options.held_commands_max) {
      reply.deliver(make_error(domain::error{
          domain::errc::busy,
          "stream " + st.options.stream_prefix + id + " is restarting and already holds " +
              std::to_string(e.held.size()) + " commands (held_commands_max); retry later"}));
      return reply;
    }
    e.held.push_back({reply, std::move(commands)});
    return reply;
  };
  return {
      [on_commands](const std::string& id, typename A::command& command) mutable {
        std::vector<typename A::command> one;
        one.push_back(std::move(command));
        return on_commands(id, one);
      },
      on_commands,
      [self](const std::string& id, state_atom) -> caf::typed_response_promise<typename A::state> {
        auto& st = self->state;
        auto reply = self->template make_response_promise<typename A::state>();
        auto found = st.live.find(id);
        if (found != st.live.end() && found->second.stopping) {
          if (found->second.held_queries.size() >= st.options.held_commands_max) {
            reply.deliver(make_error(domain::error{
                domain::errc::busy,
                "stream " + st.options.stream_prefix + id + " is restarting and already holds " +
                    std::to_string(found->second.held_queries.size()) +
                    " queries (held_commands_max); retry later"}));
            return reply;
          }
          found->second.held_queries.push_back(reply);
          return reply;
        }
        auto& e = found != st.live.end() ? found->second : detail::spawn_entry<A>(self, id);
        e.last_used = self->clock().now();
        return reply.delegate(e.actor, state_atom::value);
      },
      [self](count_atom) { return self->state.live.size(); },
      [self](passivate_atom, const std::string& id) {
        auto found = self->state.live.find(id);
        if (found != self->state.live.end()) detail::passivate<A>(self, found->second);
      },
      [self](idle_atom) {
        detail::passivate_idle<A>(self);
        self->delayed_send(self, self->state.options.idle_check_interval, idle_atom::value);
      },
  };
}

}  // namespace gpustream::actors
