#include "actors/ledger_actor.hpp"

#include <caf/actor_system.hpp>

namespace gpustream::actors {

ledger_aggregate::answer ledger_aggregate::respond(const state& current, const query& q) {
  answer out;
  if (q.accounts.empty()) {
    for (auto it = current.balances_micros.lower_bound(q.account_prefix);
         it != current.balances_micros.end() && it->first.starts_with(q.account_prefix); ++it) {
      out.balances.emplace_hint(out.balances.end(), it->first, it->second);
    }
  }
  for (const auto& account : q.accounts) out.balances[account] = domain::balance_micros(current, account);
  if (!q.transfer_prefix.empty()) {
    for (auto it = current.transfers.lower_bound(q.transfer_prefix);
         it != current.transfers.end() && it->first.starts_with(q.transfer_prefix); ++it) {
      out.transfers.emplace_hint(out.transfers.end(), it->first, it->second);
    }
  }
  return out;
}

ledger_actor spawn_ledger_actor(caf::actor_system& system, store_actor store,
                                persistence_options options) {
  return system.spawn(persistent_behavior<ledger_aggregate>, std::string(ledger_stream),
                      std::move(store), std::move(options));
}

}  // namespace gpustream::actors
