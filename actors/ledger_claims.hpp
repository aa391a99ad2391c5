#pragma once
/// The keys the ledger claims in the event store for good, so that a transfer id is applied at
/// most once and a group id used once, ever, beyond the ledger's window of recent transfers:
/// "ledger/transfer/<id>" for each transfer and "ledger/group/<id>" for each group. The append
/// that records them claims them (ledger_aggregate::unique_keys); for a store written before
/// appends claimed keys, the store's upgrade does (claim_ledger_keys).

#include <string>
#include <string_view>
#include <utility>
#include <variant>

#include "base/expected.hpp"
#include "events/event.hpp"
#include "storage/event_store.hpp"

namespace gpustream::actors {

/// The stream of the ledger.
inline constexpr std::string_view ledger_stream = "ledger";

/// Names the keys of the ledger's events in the order its stream records them. A group's
/// transfers are consecutive, so its key is named once, at its first transfer.
class ledger_key_namer {
 public:
  /// Calls `name(std::string key)` for each key `e` claims: none unless it is a transfer.
  template <class Name>
  void operator()(const events::event& e, Name&& name) {
    const auto* t = std::get_if<events::transfer_recorded>(&e);
    if (t == nullptr) return;
    name("ledger/transfer/" + t->transfer_id);
    if (t->linked_group_id != last_group_) {
      name("ledger/group/" + t->linked_group_id);
      last_group_ = t->linked_group_id;
    }
  }

 private:
  std::string last_group_;
};

/// The claims of the store's upgrade from format 1 (storage::store_options::format_1_claims):
/// every key the ledger's stream claims, each at the position of the transfer that claims it,
/// passed to `claim` a read's worth (read_events_max events) at a time.
[[nodiscard]] expected<void, storage::error> claim_ledger_keys(const storage::event_store& store,
                                                               const storage::claim_sink& claim);

}  // namespace gpustream::actors
