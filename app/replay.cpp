#include "app/replay.hpp"

#include <boost/json.hpp>
#include <caf/actor_system.hpp>
#include <caf/actor_system_config.hpp>
#include <caf/binary_deserializer.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <unordered_map>
#include <fcntl.h>
#include <unistd.h>

#include "actors/ledger_claims.hpp"
#include "actors/persistence.hpp"
#include "app/open_files.hpp"
#include "domain/verifier.hpp"
#include "events/codec.hpp"
#include "events/event.hpp"
#include "storage/event_store.hpp"

namespace gpustream::app {
namespace {

using storage::errc;

replay_problem problem_of(const domain::verify_violation& v) {
  return replay_problem{v.position, domain::describe(v), v.stream, v.version, std::string(domain::to_string(v.broken))};
}

/// The first field (counted from 1, in the order `inspect` lists them) in which `a` and `b` differ,
/// and how many fields there are; first == 0 when none differs.
template <class State>
std::pair<std::size_t, std::size_t> first_difference(State& a, State& b) {
  std::size_t first = 0;
  std::size_t count = 0;
  auto outer = [&](auto&... xs) {
    auto inner = [&](auto&... ys) {
      count = sizeof...(ys);
      std::size_t index = 0;
      ((++index, first == 0 && !(xs == ys) ? void(first = index) : void()), ...);
      return true;
    };
    return inspect(inner, b);
  };
  (void)inspect(outer, a);
  return {first, count};
}

/// --verify's domain half: feeds every decoded event to a domain_verifier and compares each
/// stream's snapshot with the state rebuilt at the snapshot's version. A stream's snapshot is read
/// when the stream is first met (at its version 1) and kept until the scan reaches its version, so
/// at most the snapshots of streams still being scanned are held.
class domain_pass {
 public:
  explicit domain_pass(const storage::event_store& store) : store_(store) {}

  expected<void, replay_problem> apply(const events::record_view& r, const events::event& event) {
    if (r.version == 1) {
      if (auto loaded = remember_snapshot(r); !loaded) return loaded;
    }
    if (auto ok = verifier_.apply(r.stream, r.version, r.position, event); !ok) {
      return unexpected{problem_of(ok.error())};
    }
    if (pending_.empty()) return {};
    const auto found = pending_.find(r.stream);
    if (found == pending_.end() || found->second.version != r.version) return {};
    auto compared = compare(found->first, found->second, r.position);
    pending_.erase(found);
    return compared;
  }

  expected<void, replay_problem> finish(replay_report& report) {
    if (!pending_.empty()) {
      const auto& [stream, snapshot] = *pending_.begin();
      const auto version = verifier_.version_of(stream);
      return unexpected{problem_of(domain::verify_violation{
          domain::invariant::live_state, stream, version, 0,
          "the snapshot is of version " + std::to_string(snapshot.version) + " but the log holds only " +
              std::to_string(version) + " events of the stream"})};
    }
    // A snapshot of a stream the log holds no event of was never met by the scan: an actor of
    // that stream would start from a state the log lacks.
    std::optional<std::string> orphan;
    auto listed = store_.for_each_snapshot_stream([&](std::string_view stream) {
      if (verifier_.version_of(stream) == 0) orphan = std::string(stream);
      return !orphan;
    });
    if (!listed) {
      return unexpected{replay_problem{0, "the snapshots cannot be listed: " + listed.error().message, {}}};
    }
    if (orphan) {
      return unexpected{problem_of(domain::verify_violation{
          domain::invariant::live_state, *orphan, 0, 0,
          "the stream has a snapshot but the log holds no event of it"})};
    }
    auto counts = verifier_.finish();
    if (!counts) return unexpected{problem_of(counts.error())};
    report.domain_verified = true;
    report.aggregates = *counts;
    report.snapshots_compared = compared_;
    report.snapshots_skipped = skipped_;
    return {};
  }

 private:
  expected<void, replay_problem> remember_snapshot(const events::record_view& r) {
    auto loaded = store_.load_snapshot(r.stream);
    if (!loaded) {
      return unexpected{replay_problem{r.position, "the snapshot of stream " + std::string(r.stream) +
                                                       " cannot be read: " + loaded.error().message,
                                       std::string(r.stream)}};
    }
    if (loaded->has_value()) pending_.emplace(std::string(r.stream), std::move(**loaded));
    return {};
  }

  /// CAF decodes snapshots; its actor system is started only for a store that has some.
  caf::actor_system& system() {
    if (!system_) {
      config_ = std::make_unique<caf::actor_system_config>();
      config_->set("scheduler.max-threads", 1);
      system_ = std::make_unique<caf::actor_system>(*config_);
    }
    return *system_;
  }

  expected<void, replay_problem> compare(const std::string& stream, const storage::snapshot& snapshot,
                                         std::uint64_t position) {
    return std::visit(
        [&](const auto& rebuilt) -> expected<void, replay_problem> {
          using view = std::decay_t<decltype(rebuilt)>;
          if constexpr (std::is_same_v<view, std::monostate>) {
            GPUSTREAM_ENSURE(false);  // the verifier applied an event of this stream just now
            return {};
          } else if constexpr (std::is_same_v<view, const domain::user_state*>) {
            return compare_as<domain::user>(stream, snapshot, position, *rebuilt);
          } else if constexpr (std::is_same_v<view, const domain::provider::state*>) {
            return compare_as<domain::provider>(stream, snapshot, position, *rebuilt);
          } else if constexpr (std::is_same_v<view, const domain::job_state*>) {
            return compare_as<domain::job>(stream, snapshot, position, *rebuilt);
          } else if constexpr (std::is_same_v<view, const domain::campaign_state*>) {
            return compare_as<domain::campaign>(stream, snapshot, position, *rebuilt);
          } else if constexpr (std::is_same_v<view, const domain::payout::state*>) {
            return compare_as<domain::payout>(stream, snapshot, position, *rebuilt);
          } else {
            static_assert(std::is_same_v<view, const domain::ledger::state*>);
            // actors::ledger_aggregate is domain::ledger with queries: same state, same version.
            return compare_as<domain::ledger>(stream, snapshot, position, *rebuilt);
          }
        },
        verifier_.state_of(stream));
  }

  template <class Aggregate>
  expected<void, replay_problem> compare_as(const std::string& stream, const storage::snapshot& snapshot,
                                            std::uint64_t position, const typename Aggregate::state& rebuilt) {
    auto violation = [&](std::string message) {
      return unexpected{problem_of(domain::verify_violation{domain::invariant::live_state, stream, snapshot.version,
                                                            position, std::move(message)})};
    };
    caf::binary_deserializer source(system(), snapshot.state.data(), snapshot.state.size());
    std::uint32_t format = 0;
    if (source(format)) return violation("the snapshot is too short to hold its snapshot_version");
    if (format != Aggregate::snapshot_version) {
      ++skipped_;  // written by another build: the actor would replay instead, and so do we
      return {};
    }
    typename Aggregate::state decoded{};
    if (!actors::decode_snapshot(system(), Aggregate::snapshot_version, snapshot.state, decoded)) {
      return violation("the snapshot does not decode as a state of snapshot_version " + std::to_string(format));
    }
    if (decoded == rebuilt) {
      ++compared_;
      return {};
    }
    auto copy = rebuilt;
    const auto [field, fields] = first_difference(decoded, copy);
    return violation("the snapshot differs from the state rebuilt from the log, first in field " +
                     std::to_string(field) + " of " + std::to_string(fields) + " (in the order inspect lists them)");
  }

  const storage::event_store& store_;
  domain::domain_verifier verifier_;
  std::map<std::string, storage::snapshot, std::less<>> pending_;  ///< by stream, until its version is met
  std::unique_ptr<caf::actor_system_config> config_;
  std::unique_ptr<caf::actor_system> system_;
  std::uint64_t compared_ = 0;
  std::uint64_t skipped_ = 0;
};

/// Checks each record against the ones before it; the first failure stops the scan.
class log_checker {
 public:
  /// With a domain pass (--verify), every decoded event is also fed to it.
  explicit log_checker(domain_pass* domain = nullptr) : domain_(domain) {}

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
    if (domain_ != nullptr) {
      if (auto ok = domain_->apply(r, decoded.value()); !ok) {
        domain_problem_ = ok.error();
        return fail(r.position, domain_problem_->message);
      }
    }
    return {};
  }

  /// The domain problem that stopped the scan, if one did.
  const std::optional<replay_problem>& domain_problem() const { return domain_problem_; }

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

  domain_pass* domain_;
  std::optional<replay_problem> domain_problem_;
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

/// --verify's check that every key the ledger's transfers claim is claimed in the store (format 2
/// on): without its claim, a transfer id from beyond the ledger's window could be applied again.
/// Returns how many keys it checked.
expected<std::uint64_t, replay_problem> check_ledger_claims(const storage::event_store& store) {
  std::uint64_t checked = 0;
  std::optional<replay_problem> missing;
  const auto check = [&](std::span<const storage::claimed_key> claims) -> expected<std::size_t, storage::error> {
    const std::size_t chunk_max = store.options().read_events_max;
    for (std::size_t first = 0; first < claims.size(); first += chunk_max) {
      const auto chunk = claims.subspan(first, std::min(chunk_max, claims.size() - first));
      std::vector<std::string> keys;
      keys.reserve(chunk.size());
      for (const auto& c : chunk) keys.push_back(c.key);
      auto claimed = store.claimed(keys);
      if (!claimed) return unexpected{claimed.error()};
      for (std::size_t i = 0; i < chunk.size(); ++i) {
        if ((*claimed)[i]) continue;
        missing = replay_problem{chunk[i].position,
                                 "the ledger's key '" + chunk[i].key + "' (its transfer is at position " +
                                     std::to_string(chunk[i].position) +
                                     ") is not claimed in the store's id index: once the ledger's window "
                                     "forgets it, a retry could apply it again",
                                 std::string(actors::ledger_stream)};
        return unexpected{storage::error{storage::errc::corruption, missing->message}};
      }
      checked += chunk.size();
    }
    return claims.size();
  };
  if (auto done = actors::claim_ledger_keys(store, check); !done) {
    if (missing) return unexpected{*missing};
    return unexpected{replay_problem{0, done.error().message}};
  }
  return checked;
}

}  // namespace

namespace {

expected<replay_report, replay_problem> replay_opened(const std::filesystem::path& data, bool verify) {
  storage::store_options options;
  options.read_only = true;
  (void)raise_open_files_limit();  // the store keeps each of its table files open
  auto store = storage::event_store::open(data, options);
  if (!store) return unexpected{replay_problem{0, store.error().message}};
  const auto started = std::chrono::steady_clock::now();
  std::optional<domain_pass> domain;
  if (verify) domain.emplace(**store);
  log_checker checker(domain ? &*domain : nullptr);
  auto scanned = (*store)->scan(1, [&](const events::record_view& r) { return checker.check(r); });
  if (!scanned) {
    if (checker.domain_problem()) return unexpected{*checker.domain_problem()};
    return unexpected{replay_problem{checker.problem_position(), scanned.error().message}};
  }
  auto report = checker.finish();
  if (report.last_position != (*store)->last_position()) {
    return unexpected{replay_problem{report.last_position,
                                     "the log ends at position " + std::to_string(report.last_position) +
                                         " but the store's last position is " +
                                         std::to_string((*store)->last_position())}};
  }
  if (domain) {
    if (auto finished = domain->finish(report); !finished) return unexpected{finished.error()};
  }
  report.seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  if (verify) {
    auto indexes = (*store)->verify_indexes();
    if (!indexes) return unexpected{replay_problem{0, indexes.error().message}};
    report.indexes_verified = true;
    report.index_runs = indexes->runs;
    report.index_appends = indexes->appends;
    report.index_unique_keys = indexes->unique_keys;
    // A format 1 store predates claimed keys: `serve` claims them when it upgrades it.
    if ((*store)->format_version() >= 2) {
      auto claims = check_ledger_claims(**store);
      if (!claims) return unexpected{claims.error()};
      report.ledger_keys_claimed = *claims;
    }
  }
  return report;
}

}  // namespace

bool store_in_use(const std::filesystem::path& data) {
  const int fd = ::open((data / "LOCK").c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return false;
  struct flock lock {};
  lock.l_type = F_WRLCK;
  lock.l_whence = SEEK_SET;
  const bool held = ::fcntl(fd, F_GETLK, &lock) == 0 && lock.l_type != F_UNLCK;
  ::close(fd);
  return held;
}

expected<replay_report, replay_problem> replay_store(const std::filesystem::path& data, bool verify) {
  auto replayed = replay_opened(data, verify);
  // A writer's step of two appends (a payout's movement and its event, a bill and its group)
  // reads as half done between them.
  if (!replayed && !replayed.error().invariant.empty() && store_in_use(data)) {
    auto problem = replayed.error();
    problem.message +=
        " (a process, `gpustream serve`?, has this store open: a step it has under way reads as half done; "
        "run the check again, or with serve stopped)";
    return unexpected{std::move(problem)};
  }
  return replayed;
}

namespace {

/// Job statuses from submitted on, in lifecycle order (none never counts: see verify_counts).
constexpr domain::job_status job_statuses[] = {
    domain::job_status::submitted, domain::job_status::queued,    domain::job_status::assigned,
    domain::job_status::streaming, domain::job_status::completed, domain::job_status::failed,
    domain::job_status::cancelled};

std::uint64_t jobs_in(const domain::verify_counts& counts, domain::job_status status) {
  return counts.jobs_by_status[static_cast<std::size_t>(status)];
}

/// --verify's lines: what every aggregate rebuilt into, and the snapshots compared.
std::string format_aggregates(const replay_report& report) {
  const auto& a = report.aggregates;
  auto n = [](std::uint64_t value) { return std::to_string(value); };
  std::string out = "domain verified: " + n(a.users) + " users, " + n(a.providers) + " providers, " + n(a.jobs) +
                    " jobs, " + n(a.campaigns) + " campaigns, " + n(a.payouts) + " payouts\n";
  out += "jobs:";
  for (const auto status : job_statuses) out += " " + std::string(domain::to_string(status)) + " " + n(jobs_in(a, status));
  out += "\npayouts: requested " + n(a.payouts_requested) + ", settled " + n(a.payouts_settled) + ", failed " +
         n(a.payouts_failed) + "\n";
  out += "ledger: " + n(a.ledger_transfers) + " transfers in " + n(a.ledger_groups) + " groups over " +
         n(a.ledger_accounts) + " accounts\n";
  if (a.job_bills_unsettled > 0) {
    out += "job bills not yet in the ledger: " + n(a.job_bills_unsettled) +
           " (a stop came between a job's end and its ledger group; serve settles them when it starts)\n";
  }
  if (a.free_usage_unrecorded > 0) {
    out += "free jobs' usage not yet counted against their users' quotas: " + n(a.free_usage_unrecorded) +
           " (a stop came between a job's end and its usage; serve records it when it starts)\n";
  }
  out += "snapshots: " + n(report.snapshots_compared) + " equal to the log, " + n(report.snapshots_skipped) +
         " skipped (another snapshot_version)\n";
  return out;
}

boost::json::object aggregates_json(const replay_report& report) {
  const auto& a = report.aggregates;
  boost::json::object jobs;
  for (const auto status : job_statuses) jobs[domain::to_string(status)] = jobs_in(a, status);
  boost::json::object out;
  out["users"] = a.users;
  out["providers"] = a.providers;
  out["jobs"] = a.jobs;
  out["jobs_by_status"] = std::move(jobs);
  out["campaigns"] = a.campaigns;
  out["payouts"] = a.payouts;
  out["payouts_by_status"] = boost::json::object{
      {"requested", a.payouts_requested}, {"settled", a.payouts_settled}, {"failed", a.payouts_failed}};
  out["ledger_transfers"] = a.ledger_transfers;
  out["ledger_groups"] = a.ledger_groups;
  out["ledger_accounts"] = a.ledger_accounts;
  out["job_bills_unsettled"] = a.job_bills_unsettled;
  out["free_usage_unrecorded"] = a.free_usage_unrecorded;
  return out;
}

}  // namespace

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
  if (report.domain_verified) out += format_aggregates(report);
  if (report.indexes_verified) {
    std::snprintf(line, sizeof line,
                  "indexes verified: %llu stream runs, %llu appends, %llu unique keys "
                  "(%llu of them the ledger's, each found claimed)\n",
                  static_cast<unsigned long long>(report.index_runs),
                  static_cast<unsigned long long>(report.index_appends),
                  static_cast<unsigned long long>(report.index_unique_keys),
                  static_cast<unsigned long long>(report.ledger_keys_claimed));
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
  out["ok"] = true;
  out["events"] = report.events;
  out["streams"] = report.streams;
  out["last_position"] = report.last_position;
  out["seconds"] = report.seconds;
  out["events_per_second"] = report.events_per_second();
  out["events_per_type"] = std::move(types);
  if (report.domain_verified) {
    out["domain_verified"] = true;
    out["aggregates"] = aggregates_json(report);
    out["snapshots_compared"] = report.snapshots_compared;
    out["snapshots_skipped"] = report.snapshots_skipped;
  }
  if (report.indexes_verified) {
    out["indexes_verified"] = true;
    out["index_runs"] = report.index_runs;
    out["index_appends"] = report.index_appends;
    out["index_unique_keys"] = report.index_unique_keys;
    out["ledger_keys_claimed"] = report.ledger_keys_claimed;
  }
  return boost::json::serialize(out) + "\n";
}

std::string format_json(const replay_problem& problem) {
  boost::json::object out;
  out["ok"] = false;
  out["message"] = problem.message;
  if (problem.position != 0 || !problem.stream.empty()) out["position"] = problem.position;  // else not about a record
  if (!problem.stream.empty()) {
    out["stream"] = problem.stream;
    out["version"] = problem.version;
  }
  if (!problem.invariant.empty()) out["invariant"] = problem.invariant;
  return boost::json::serialize(out) + "\n";
}

}  // namespace gpustream::app
