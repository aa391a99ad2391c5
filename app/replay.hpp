#pragma once
/// `gpustream replay`: reads the whole log in order, checks every record (CRC, gapless global
/// positions, gapless stream versions, a payload that decodes to its declared type) and reports
/// what it found.

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "base/expected.hpp"

namespace gpustream::app {

struct replay_report {
  std::uint64_t events = 0;
  std::uint64_t streams = 0;
  std::uint64_t last_position = 0;
  std::vector<std::uint64_t> events_per_type;  ///< indexed by event type number
  double seconds = 0;  ///< the replay itself, without --verify's index checks
  bool indexes_verified = false;  ///< --verify also checked the stream and append id indexes
  std::uint64_t index_runs = 0;     ///< stream index entries checked
  std::uint64_t index_appends = 0;  ///< append id index entries checked
  [[nodiscard]] double events_per_second() const { return seconds > 0 ? events / seconds : 0; }
};

/// The first problem found, with the global position where it was found (0 if none applies).
struct replay_problem {
  std::uint64_t position = 0;
  std::string message;
};

/// Replays the store in `data` (opened read-only, so a running `serve` may keep it open). With
/// `verify`, also checks that the store's indexes agree with the log (event_store::verify_indexes).
[[nodiscard]] expected<replay_report, replay_problem> replay_store(const std::filesystem::path& data,
                                                                   bool verify = false);

/// Human-readable report: counts per type, last position, rate.
[[nodiscard]] std::string format_text(const replay_report& report);
/// The same as a JSON object.
[[nodiscard]] std::string format_json(const replay_report& report);

}  // namespace gpustream::app
