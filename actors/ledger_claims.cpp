#include "actors/ledger_claims.hpp"

#include <cstdint>
#include <limits>
#include <span>
#include <vector>

#include "events/codec.hpp"

namespace gpustream::actors {

expected<void, storage::error> claim_ledger_keys(const storage::event_store& store,
                                                 const storage::claim_sink& claim) {
  ledger_key_namer name_keys;
  std::vector<storage::claimed_key> claims;
  for (std::uint64_t from = 1;;) {
    auto records = store.read_stream(ledger_stream, from, std::numeric_limits<std::uint64_t>::max(),
                                     store.options().read_events_max);
    if (!records) return unexpected{records.error()};
    if (records->empty()) return {};
    claims.clear();
    for (const auto& r : *records) {
      auto event = events::decode_payload(r.type, std::as_bytes(std::span(r.payload.data(), r.payload.size())));
      if (!event) {
        return unexpected{storage::error{
            storage::errc::corruption, "event " + std::to_string(r.version) + " of stream " +
                                           std::string(ledger_stream) +
                                           " cannot be decoded: " + event.error().message}};
      }
      name_keys(event.value(), [&](std::string key) { claims.push_back({std::move(key), r.position}); });
    }
    if (auto written = claim(claims); !written) return unexpected{written.error()};
    from = records->back().version + 1;
  }
}

}  // namespace gpustream::actors
