#include "actors/ledger_actor.hpp"

#include <caf/actor_system.hpp>
#include <caf/stateful_actor.hpp>
#include <caf/typed_event_based_actor.hpp>

namespace gpustream::actors {
namespace {

/// Copies the entries of `from` whose key starts with `prefix` and comes after `after` into `to`,
/// at most `count_max` of them (0: all).
template <class From, class To>
void copy_prefixed(const From& from, std::string_view prefix, To& to, std::string_view after = {},
                   std::size_t count_max = 0) {
  auto it = !after.empty() && after >= prefix ? from.upper_bound(after) : from.lower_bound(prefix);
  for (; it != from.end() && it->first.starts_with(prefix); ++it) {
    if (count_max != 0 && to.size() >= count_max) return;
    to.emplace_hint(to.end(), it->first, it->second);
  }
}

}  // namespace

ledger_aggregate::answer ledger_aggregate::respond(const state& current, const query& q) {
  answer out;
  out.balance_total_micros = current.balance_total_micros;
  if (q.accounts.empty()) {
    const std::size_t count_max = q.accounts_max == 0 ? 0 : q.accounts_max + 1;
    copy_prefixed(current.balances_micros, q.account_prefix, out.balances, q.accounts_after, count_max);
  }
  for (const auto& account : q.accounts) out.balances[account] = domain::balance_micros(current, account);
  if (!q.transfer_prefix.empty()) copy_prefixed(current.transfers, q.transfer_prefix, out.transfers);
  return out;
}

std::vector<std::string> ledger_aggregate::unique_keys(std::span<const events::event> events) {
  std::vector<std::string> keys;
  keys.reserve(events.size() + 1);
  ledger_key_namer name_keys;
  for (const auto& event : events) {
    name_keys(event, [&](std::string key) { keys.push_back(std::move(key)); });
  }
  // Distinct: decide refuses a transfer or group id already in the working state, and a batch
  // (at most events_per_append_max events) is far smaller than the window that state keeps
  // (ledger_recent_transfers_max). Were one larger, an id could leave the window within the
  // batch and come again; the store then refuses the whole append for naming a key twice, so
  // still nothing is applied twice.
  return keys;
}

namespace {

/// The ledger's keeper: what everyone holds as the ledger. It hands each message to the ledger's
/// persistent actor, and starts a new one (which recovers from the log) for the next message once
/// that one stops: a persistent actor stops when its store fails an append (its state may be
/// ahead of the log), and the one ledger must not stay gone until the process restarts.
struct keeper_state {
  keeper_state() = default;  // no aggregate (CAF would build it from the actor pointer)
  store_actor store;
  persistence_options options;
  ledger_actor inner;  ///< none until the first message, and after the last one stopped
  static inline const char* name = "gpustream.ledger";
};

using keeper_pointer = ledger_actor::stateful_pointer<keeper_state>;

const ledger_actor& current(keeper_pointer self) {
  auto& st = self->state;
  if (!st.inner) {
    st.inner = self->home_system().spawn(persistent_behavior<ledger_aggregate>, std::string(ledger_stream),
                                         st.store, st.options);
    // Its down message overtakes the messages queued here meanwhile: those go to the next one.
    self->monitor<caf::message_priority::high>(st.inner);
  }
  return st.inner;
}

ledger_actor::behavior_type keeper_behavior(keeper_pointer self, store_actor store, persistence_options options) {
  self->state.store = std::move(store);
  self->state.options = std::move(options);
  (void)current(self);  // recovers at once, as before
  self->set_down_handler([self](caf::down_msg& msg) {
    if (msg.source == self->state.inner.address()) self->state.inner = nullptr;
  });
  // The ledger lives and dies with its keeper.
  self->set_exit_handler([self](caf::exit_msg& msg) {
    if (self->state.inner) self->send_exit(self->state.inner, msg.reason);
    self->quit(msg.reason);
  });
  using command = ledger_aggregate::command;
  return {
      [self](command& c) {
        auto reply = self->make_response_promise<command_reply>();
        return reply.delegate(current(self), std::move(c));
      },
      [self](std::vector<command>& commands) {
        auto reply = self->make_response_promise<command_reply>();
        return reply.delegate(current(self), std::move(commands));
      },
      [self](state_atom) {
        auto reply = self->make_response_promise<ledger_aggregate::state>();
        return reply.delegate(current(self), state_atom::value);
      },
      [self](passivate_atom) {
        if (self->state.inner) self->send(self->state.inner, passivate_atom::value);
      },
      [self](ledger_aggregate::query& q) {
        auto reply = self->make_response_promise<ledger_aggregate::answer>();
        return reply.delegate(current(self), std::move(q));
      },
  };
}

}  // namespace

ledger_actor spawn_ledger_actor(caf::actor_system& system, store_actor store,
                                persistence_options options) {
  return system.spawn(keeper_behavior, std::move(store), std::move(options));
}

}  // namespace gpustream::actors
