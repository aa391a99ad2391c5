#include "app/replay.hpp"

#include <boost/json.hpp>

#include <chrono>
#include <cstdio>
#include <unordered_map>

#include "events/codec.hpp"
#include "events/event.hpp"
#include "storage/event_store.hpp"

namespace gpustream::app {
namespace {

using storage::errc;

/// Checks each record against the ones before it; the first failure stops the scan.
class log_checker {
 public:
  expected<void, storage::error> check(const events::record_view& r) {
    if (r.position != last_position_ + 1) {
      return fail(r.position, "global position " + std::to_string(r.position) + " follows " +
                                  std::to_string(last_position_) + ": positions must be gapless");
    }
    last_position_ = r.position;
    auto found = versions_.find(r.stream);
    if (found == versions_.end()) found = versions_.emplace(std::string(r.stream), 0).first;
    auto& version = found->second;
    if (r.version != version + 1) {
      return fail(r.position, "stream " + std::string(r.stream) + " has version " + std::to_string(r.version) +
                                  " after version " + std::to_string(version) +
                                  ": stream versions must be gapless from 1");
    }
    version = r.version;
    auto decoded = events::decode_payload(r.type, r.payload);
    if (!decoded) {
      return fail(r.position, "event " + r.id.to_string() + " in stream " + std::string(r.stream) + " version " +
                                  std::to_string(r.version) + " does not decode: " +
                                  decoded.error().message);
    }
    report_.events_per_type[r.type] += 1;
    report_.events += 1;
    return {};
  }

  replay_report finish() {
    report_.last_position = last_position_;
    report_.streams = versions_.size();
    return std::move(report_);
  }

  std::uint64_t problem_position() const { return problem_position_ ? problem_position_ : last_position_ + 1; }

 private:
  expected<void, storage::error> fail(std::uint64_t position, std::string message) {
    problem_position_ = position;
    return unexpected{storage::error{errc::corruption, std::move(message)}};
  }

  replay_report report_{.events_per_type = std::vector<std::uint64_t>(events::event_type_count, 0)};
  std::uint64_t last_position_ = 0;
  std::uint64_t problem_position_ = 0;
  /// Hashes std::string and std::string_view alike, so lookups by a record's view do not allocate.
  struct stream_hash {
    using is_transparent = void;
    std::size_t operator()(std::string_view s) const noexcept { return std::hash<std::string_view>{}(s); }
  };
  std::unordered_map<std::string, std::uint64_t, stream_hash, std::equal_to<>> versions_;
};

}  // namespace

expected<replay_report, replay_problem> replay_store(const std::filesystem::path& data, bool verify) {
  storage::store_options options;
  options.read_only = true;
  auto store = storage::event_store::open(data, options);
  if (!store) return unexpected{replay_problem{0, store.error().message}};
  const auto started = std::chrono::steady_clock::now();
  log_checker checker;
  auto scanned = (*store)->scan(1, [&](const events::record_view& r) { return checker.check(r); });
  if (!scanned) return unexpected{replay_problem{checker.problem_position(), scanned.error().message}};
  auto report = checker.finish();
  if (report.last_position != (*store)->last_position()) {
    return unexpected{replay_problem{report.last_position,
                                     "the log ends at position " + std::to_string(report.last_position) +
                                         " but the store's last position is " +
                                         std::to_string((*store)->last_position())}};
  }
  report.seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  if (verify) {
    auto indexes = (*store)->verify_indexes();
    if (!indexes) return unexpected{replay_problem{0, indexes.error().message}};
    report.indexes_verified = true;
    report.index_runs = indexes->runs;
    report.index_appends = indexes->appends;
  }
  return report;
}

std::string format_text(const replay_report& report) {
  std::string out;
  char line[160];
  for (std::size_t type = 0; type < report.events_per_type.size(); ++type) {
    if (report.events_per_type[type] == 0) continue;
    std::snprintf(line, sizeof line, "%-32s %12llu\n",
                  std::string(events::type_name(static_cast<events::event_type>(type))).c_str(),
                  static_cast<unsigned long long>(report.events_per_type[type]));
    out += line;
  }
  std::snprintf(line, sizeof line,
                "events %llu, streams %llu, last position %llu, %.3f s, %.0f events/s\n",
                static_cast<unsigned long long>(report.events),
                static_cast<unsigned long long>(report.streams),
                static_cast<unsigned long long>(report.last_position), report.seconds,
                report.events_per_second());
  out += line;
  if (report.indexes_verified) {
    std::snprintf(line, sizeof line, "indexes verified: %llu stream runs, %llu appends\n",
                  static_cast<unsigned long long>(report.index_runs),
                  static_cast<unsigned long long>(report.index_appends));
    out += line;
  }
  return out;
}

std::string format_json(const replay_report& report) {
  boost::json::object types;
  for (std::size_t type = 0; type < report.events_per_type.size(); ++type) {
    if (report.events_per_type[type] == 0) continue;
    types[events::type_name(static_cast<events::event_type>(type))] = report.events_per_type[type];
  }
  boost::json::object out;
  out["events"] = report.events;
  out["streams"] = report.streams;
  out["last_position"] = report.last_position;
  out["seconds"] = report.seconds;
  out["events_per_second"] = report.events_per_second();
  out["events_per_type"] = std::move(types);
  if (report.indexes_verified) {
    out["indexes_verified"] = true;
    out["index_runs"] = report.index_runs;
    out["index_appends"] = report.index_appends;
  }
  return boost::json::serialize(out) + "\n";
}

}  // namespace gpustream::app
