#pragma once
/// The ledger actor: the one aggregate of stream "ledger" (domain/ledger.hpp) in the persistence
/// shell, behind a keeper that starts it again (recovering from the log) for the next message
/// once a failed append stopped it. Every group it applies is checked against the ledger's invariants (touched accounts and
/// the running total) before its requester hears back; a violation stops the process, since it
/// can only be a bug in the rules. Besides commands and the whole state, it answers balances.
///
/// Its state keeps only the recent transfers of jobs (ledger_recent_transfers_max), so that its
/// memory does not grow with every job billed. Each append claims its transfer ids and group ids
/// in the event store for good ("ledger/transfer/<id>", "ledger/group/<id>"): a command that would
/// apply a transfer id or reuse a group id from beyond the window is refused with the store's
/// key_taken error naming it, so a transfer id is still applied at most once, ever.

#include <caf/fwd.hpp>

#include <cstdint>
#include <map>
#include <span>
#include <string>
#include <vector>

#include "actors/ledger_claims.hpp"
#include "actors/persistent_actor.hpp"
#include "domain/ledger.hpp"

namespace gpustream::actors {

/// domain::ledger with what the shell asks of it: a query and the per-group check.
struct ledger_aggregate : domain::ledger {
  /// Balances and transfers, without a copy of the whole ledger (which keeps every transfer).
  struct query {
    /// These accounts' balances (0 for an account that never moved money). When empty, every
    /// account whose name starts with `account_prefix` ("": all of them).
    std::vector<std::string> accounts{};
    std::string account_prefix{};
    /// Also the transfers whose id starts with this (e.g. "payout-"); none when empty.
    std::string transfer_prefix{};
    /// With account_prefix: only accounts named after this one (a listing's cursor); "": from
    /// the first.
    std::string accounts_after{};
    /// With account_prefix: at most this many accounts, in name order, plus one more when there
    /// are more (which tells the caller so); 0: all. The copy is made inside the ledger actor,
    /// which bills every job: a listing asks for a page, not the ledger.
    std::size_t accounts_max = 0;
  };
  struct answer {
    std::map<std::string, std::int64_t> balances;
    std::map<std::string, applied_transfer> transfers;
    /// The sum of every balance (0 in a sound ledger), whatever the query selected.
    std::int64_t balance_total_micros = 0;
  };

  [[nodiscard]] static answer respond(const state& current, const query& q);
  /// The keys an append of these events claims: each transfer id and each group id.
  [[nodiscard]] static std::vector<std::string> unique_keys(std::span<const events::event> events);
  [[nodiscard]] static domain::invariant_check check_applied(const state& current,
                                                             std::span<const events::event> group) {
    return domain::check_group_applied(current, group);
  }
};

using ledger_actor = aggregate_actor<ledger_aggregate>;

[[nodiscard]] ledger_actor spawn_ledger_actor(caf::actor_system& system, store_actor store,
                                              persistence_options options = {});

}  // namespace gpustream::actors

CAF_ALLOW_UNSAFE_MESSAGE_TYPE(gpustream::actors::ledger_aggregate::query)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(gpustream::actors::ledger_aggregate::answer)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(gpustream::domain::ledger::command)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(std::vector<gpustream::domain::ledger::command>)
