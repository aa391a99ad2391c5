// Durability under power cuts: a child appends in `sync` mode and is killed with SIGKILL at a
// random moment; then every file is cut back to the bytes the child had fsynced (what a power cut
// would leave). Every acknowledged append survives, every append is all or nothing, positions and
// versions stay gapless, across 20 seeded cycles on one store.
#include <gtest/gtest.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <random>
#include <sstream>

#include "store_testing.hpp"

namespace gpustream::storage {
namespace {

struct acknowledged {
  std::uint64_t first = 0;
  std::uint64_t last = 0;
  std::string batch;
};

/// Starts the child on `dir`; returns its pid and the read end of its stdout.
std::pair<pid_t, int> spawn_child(const std::filesystem::path& dir, std::uint64_t seed) {
  int fds[2];
  if (::pipe(fds) != 0) return {-1, -1};
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::dup2(fds[1], STDOUT_FILENO);
    ::close(fds[0]);
    ::close(fds[1]);
    const std::string dir_text = dir.string(), seed_text = std::to_string(seed);
    ::execl(GPUSTREAM_CRASH_CHILD, GPUSTREAM_CRASH_CHILD, dir_text.c_str(), seed_text.c_str(), nullptr);
    std::_Exit(127);
  }
  ::close(fds[1]);
  return {pid, fds[0]};
}

/// What the child reported before it died.
struct child_report {
  std::vector<acknowledged> acks;
  std::map<std::string, std::uint64_t> durable_bytes;  ///< by file name: what its fsyncs covered
};

/// Reads the child's lines until `deadline` (then kills it) or until it exits.
child_report run_and_kill(pid_t pid, int fd, std::chrono::milliseconds run_for) {
  child_report report;
  auto& acks = report.acks;
  std::string pending;
  bool ready = false, killed = false;
  std::chrono::steady_clock::time_point deadline{};
  for (;;) {
    int timeout_ms = -1;
    if (ready && !killed) {
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
          deadline - std::chrono::steady_clock::now());
      if (left.count() <= 0) {
        ::kill(pid, SIGKILL);
        killed = true;
      } else {
        timeout_ms = static_cast<int>(left.count());
      }
    }
    pollfd p{fd, POLLIN, 0};
    if (::poll(&p, 1, timeout_ms) == 0) continue;  // the deadline passed: kill on the next turn
    char buffer[4096];
    const auto n = ::read(fd, buffer, sizeof buffer);
    if (n <= 0) break;  // the child is gone and its pipe drained
    pending.append(buffer, static_cast<std::size_t>(n));
    for (auto newline = pending.find('\n'); newline != std::string::npos; newline = pending.find('\n')) {
      std::istringstream line(pending.substr(0, newline));
      pending.erase(0, newline + 1);
      std::string word;
      line >> word;
      if (word == "ready") {
        ready = true;
        deadline = std::chrono::steady_clock::now() + run_for;
      } else if (word == "ack") {
        acknowledged a;
        line >> a.first >> a.last >> a.batch;
        acks.push_back(a);
      } else if (word == "synced") {
        std::string path;
        std::uint64_t bytes = 0;
        line >> path >> bytes;
        auto& durable = report.durable_bytes[std::filesystem::path(path).filename().string()];
        durable = std::max(durable, bytes);
      }
    }
  }
  ::close(fd);
  int status = 0;
  ::waitpid(pid, &status, 0);
  EXPECT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL)
      << "the child ended by itself (status " << status << "); see its stderr";
  return report;
}

std::map<std::string, std::uint64_t> file_sizes(const std::filesystem::path& dir) {
  std::map<std::string, std::uint64_t> sizes;
  for (const auto& entry : std::filesystem::directory_iterator(dir)) {
    if (entry.is_regular_file()) sizes[entry.path().filename().string()] = entry.file_size();
  }
  return sizes;
}

/// The power cut: every file loses what was written to it after its last fsync. Files that
/// existed before the child keep at least what they had; files it created and never fsynced
/// become empty. Returns the number of bytes cut.
std::uint64_t cut_to_durable(const std::filesystem::path& dir,
                             const std::map<std::string, std::uint64_t>& before,
                             const std::map<std::string, std::uint64_t>& durable_bytes) {
  std::uint64_t cut = 0;
  for (const auto& [name, size] : file_sizes(dir)) {
    std::uint64_t durable = 0;
    if (auto it = before.find(name); it != before.end()) durable = it->second;
    if (auto it = durable_bytes.find(name); it != durable_bytes.end()) durable = std::max(durable, it->second);
    if (size > durable) {
      std::filesystem::resize_file(dir / name, durable);
      cut += size - durable;
    }
  }
  return cut;
}

/// Everything the store holds must be consistent, and every acknowledged batch present.
void verify(const std::filesystem::path& dir, const std::vector<acknowledged>& acks) {
  auto store = testing::open_or_fail(dir);
  ASSERT_TRUE(store);
  std::map<std::string, std::uint64_t> versions;
  std::map<std::string, std::pair<std::size_t, std::size_t>> batches;  // batch -> (seen, declared)
  std::vector<std::string> batch_at{""};                                // by position
  auto scanned = store->scan(1, [&](const events::record_view& r) -> expected<void, error> {
    EXPECT_EQ(r.position, batch_at.size()) << "positions must be gapless";
    auto& version = versions[std::string(r.stream)];
    EXPECT_EQ(r.version, version + 1) << "versions of " << r.stream << " must be gapless";
    version = r.version;
    std::istringstream payload(std::string(reinterpret_cast<const char*>(r.payload.data()), r.payload.size()));
    std::string batch, count;
    payload >> batch >> count;
    batch = batch.substr(6);  // "batch="
    auto& b = batches[batch];
    b.first += 1;
    b.second = std::stoul(count.substr(6));  // "count="
    batch_at.push_back(batch);
    return {};
  });
  ASSERT_TRUE(scanned) << scanned.error().message;
  for (const auto& [batch, counts] : batches) {
    EXPECT_EQ(counts.first, counts.second) << "batch " << batch << " is not all-or-nothing";
  }
  for (const auto& a : acks) {
    ASSERT_LT(a.last, batch_at.size()) << "acknowledged batch " << a.batch << " is lost";
    for (auto p = a.first; p <= a.last; ++p) {
      ASSERT_EQ(batch_at[p], a.batch) << "position " << p << " of acknowledged batch " << a.batch;
    }
  }
}

TEST(event_store_crash, acknowledged_sync_appends_survive_a_power_cut) {
  const char* env_seed = std::getenv("GPUSTREAM_SEED");
  const std::uint64_t seed = env_seed ? std::stoull(env_seed) : std::random_device{}();
  std::printf("crash test seed: %llu (rerun with GPUSTREAM_SEED=%llu)\n",
              static_cast<unsigned long long>(seed), static_cast<unsigned long long>(seed));
  std::mt19937_64 rng(seed);
  testing::temp_dir dir;
  constexpr int cycles = 20;
  std::vector<acknowledged> all_acks;
  std::uint64_t bytes_cut = 0;
  for (int cycle = 0; cycle < cycles; ++cycle) {
    const auto run_for = std::chrono::milliseconds(10 + rng() % 240);
    const auto before = file_sizes(dir.path());
    auto [pid, fd] = spawn_child(dir.path(), seed * 100 + static_cast<std::uint64_t>(cycle));
    ASSERT_GT(pid, 0);
    auto report = run_and_kill(pid, fd, run_for);
    bytes_cut += cut_to_durable(dir.path(), before, report.durable_bytes);
    all_acks.insert(all_acks.end(), report.acks.begin(), report.acks.end());
    SCOPED_TRACE("cycle " + std::to_string(cycle) + " seed " + std::to_string(seed));
    verify(dir.path(), all_acks);
    if (HasFatalFailure()) return;
  }
  std::printf("crash test: %d power cuts, %zu acknowledged appends verified, %llu unsynced bytes cut\n",
              cycles, all_acks.size(), static_cast<unsigned long long>(bytes_cut));
  EXPECT_GE(all_acks.size(), static_cast<std::size_t>(cycles)) << "too few appends to mean anything";
}

}  // namespace
}  // namespace gpustream::storage
