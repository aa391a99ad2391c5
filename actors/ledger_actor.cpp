#include "actors/ledger_actor.hpp"

#include <caf/actor_system.hpp>

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

ledger_actor spawn_ledger_actor(caf::actor_system& system, store_actor store,
                                persistence_options options) {
  return system.spawn(persistent_behavior<ledger_aggregate>, std::string(ledger_stream),
                      std::move(store), std::move(options));
}

}  // namespace gpustream::actors
