#pragma once
/// Helpers shared by the app tests: an event store holding every example event, and raw damage to
/// one of its records.

#include <cstdint>
#include <filesystem>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "storage/event_store.hpp"
#include "tests/storage/store_testing.hpp"

namespace gpustream::app::testing {

/// What fill_with_examples appended, for comparison with what a replay reports.
struct appended_contents {
  std::vector<std::uint64_t> events_per_type;  ///< indexed by event type number
  std::set<std::string> streams;
  std::uint64_t events = 0;
  std::uint64_t last_position = 0;
};

/// Appends a sound story made of the examples of tests/events/event_examples.hpp (copies whose ids
/// and amounts are changed so that every domain invariant holds: `replay --verify` passes), encoded
/// with events::encode_payload, to `store` in several appends (some touching several streams at
/// once; every type at least once, some more often), and returns what it appended. Fails the
/// current test if an append fails. `store` must be empty.
///
/// The ledger's appends claim their transfer and group ids, as the ledger actor's do, unless
/// `claims` is none: what a build before claimed keys wrote (a format 1 store).
enum class ledger_claims { as_the_ledger_does, none };
[[nodiscard]] appended_contents fill_with_examples(storage::event_store& store,
                                                   ledger_claims claims = ledger_claims::as_the_ledger_does);

/// Creates a store in `directory`, fills it with fill_with_examples and closes it again.
[[nodiscard]] appended_contents make_example_store(const std::filesystem::path& directory,
                                                   ledger_claims claims = ledger_claims::as_the_ledger_does);

/// Flips one bit of the byte at `offset` (taken modulo the record's size) of the stored record at
/// global `position`, through raw RocksDB: the column family "global" maps the position as 8
/// big-endian bytes to the record. The store must be closed. Fails the current test (fatally) if
/// the record is not there.
using storage::testing::flip_byte_of_record;
/// Deletes the first key of a column family ("dedup", "events"): damage only --verify can see.
inline void delete_first_index_entry(const std::filesystem::path& directory, const std::string& family) {
  storage::testing::delete_first_entry(directory, family);
}

/// The name and count of every type with a non-zero count in `per_type` (indexed by type number):
/// exactly what a replay report must list.
[[nodiscard]] std::map<std::string, std::uint64_t> named_counts(const std::vector<std::uint64_t>& per_type);

/// The per-type table of app::format_text's output as name -> count. Fails the current test on a
/// line that is not "name count" or on a type listed twice.
[[nodiscard]] std::map<std::string, std::uint64_t> text_counts(const std::string& text);

}  // namespace gpustream::app::testing
