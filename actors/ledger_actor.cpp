#include "actors/ledger_actor.hpp"

#include <caf/actor_system.hpp>

namespace gpustream::actors {

ledger_aggregate::answer ledger_aggregate::respond(const state& current, const query& q) {
  if (q.accounts.empty()) {
    return answer(current.balances_micros.begin(), current.balances_micros.end());
  }
  answer balances;
  for (const auto& account : q.accounts) balances[account] = domain::balance_micros(current, account);
  return balances;
}

ledger_actor spawn_ledger_actor(caf::actor_system& system, store_actor store,
                                persistence_options options) {
  return system.spawn(persistent_behavior<ledger_aggregate>, std::string(ledger_stream),
                      std::move(store), std::move(options));
}

}  // namespace gpustream::actors
