#pragma once
/// `gpustream replay`: reads the whole log in order, checks every record (CRC, gapless global
/// positions, gapless stream versions, a payload that decodes to its declared type) and reports
/// what it found.
///
/// `--verify` also learns the domain: every decoded event goes to a domain::domain_verifier, which
/// rebuilds every aggregate and checks the platform's invariants (money sums to zero, no forbidden
/// negative balance, no campaign over budget, no payout above earnings, no transfer id twice, every
/// job live or terminal, ...); every stream with a snapshot has it compared with the state rebuilt
/// up to the snapshot's version (live state equals rebuilt state); and the store's indexes are
/// checked against the log. The plain replay pays for none of this.

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "base/expected.hpp"
#include "domain/verifier.hpp"

namespace gpustream::app {

struct replay_report {
  std::uint64_t events = 0;
  std::uint64_t streams = 0;
  std::uint64_t last_position = 0;
  std::vector<std::uint64_t> events_per_type;  ///< indexed by event type number
  double seconds = 0;  ///< the replay itself (with --verify's domain checks), without the index checks
  bool indexes_verified = false;  ///< --verify also checked the stream and append id indexes
  std::uint64_t index_runs = 0;     ///< stream index entries checked
  std::uint64_t index_appends = 0;  ///< append id index entries checked
  std::uint64_t index_unique_keys = 0;  ///< claimed unique keys checked (the ledger's transfer and group ids)
  /// The ledger's transfer and group ids found claimed, one each (0 for a format 1 store, which
  /// predates claims).
  std::uint64_t ledger_keys_claimed = 0;
  bool domain_verified = false;  ///< --verify also rebuilt every aggregate and checked its invariants
  domain::verify_counts aggregates{};  ///< what the log rebuilt into (with domain_verified)
  std::uint64_t snapshots_compared = 0;  ///< snapshots found equal to the state rebuilt at their version
  std::uint64_t snapshots_skipped = 0;   ///< snapshots of another snapshot_version: not comparable
  [[nodiscard]] double events_per_second() const { return seconds > 0 ? events / seconds : 0; }
};

/// The first problem found, with the global position where it was found (0 if none applies).
/// A broken domain invariant (--verify) also names its stream, version and invariant, and its
/// message is domain::describe of the violation.
struct replay_problem {
  std::uint64_t position = 0;
  std::string message;
  std::string stream{};       ///< the stream concerned; empty when none is
  std::uint64_t version = 0;  ///< its version there; 0 when none applies
  std::string invariant{};    ///< the broken domain invariant (domain::to_string); empty for log damage
};

/// Replays the store in `data` (opened read-only, so a running `serve` may keep it open). With
/// `verify`, also rebuilds and checks the domain and its snapshots (see the top of this file) and
/// checks that the store's indexes agree with the log (event_store::verify_indexes).
[[nodiscard]] expected<replay_report, replay_problem> replay_store(const std::filesystem::path& data,
                                                                   bool verify = false);

/// Whether another process (a running `serve`) holds the lock of the store in `data`. Never call
/// it in a process that has the store open for writing: closing a descriptor of the lock file
/// drops that process's own lock on it (POSIX record locks are per process).
[[nodiscard]] bool store_in_use(const std::filesystem::path& data);

/// Human-readable report: counts per type, last position, rate; with --verify the aggregates.
[[nodiscard]] std::string format_text(const replay_report& report);
/// The same as a JSON object, with "ok": true.
[[nodiscard]] std::string format_json(const replay_report& report);
/// A problem as a JSON object: "ok": false, the message and position, and the stream, version and
/// invariant where they apply; for scripts reading `replay --json`.
[[nodiscard]] std::string format_json(const replay_problem& problem);

}  // namespace gpustream::app
