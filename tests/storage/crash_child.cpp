// The process the crash test kills: appends in `sync` mode from several threads and reports every
// acknowledged append on stdout as "ack FIRST LAST BATCH", one line each, after the store returned.
// It also reports every fsync as "synced PATH BYTES" before the fsync returns, so that the parent
// can cut each file back to what was durable: a power cut, not just a killed process.
#include <unistd.h>

#include <cstdio>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "storage/event_store.hpp"
#include "storage/fault_injector.hpp"

using namespace gpustream;

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s DIR SEED\n", argv[0]);
    return 2;
  }
  const std::uint64_t seed = std::stoull(argv[2]);
  std::mutex out;
  auto report = [&](const std::string& line) {
    std::lock_guard lock(out);
    // One write per line: the parent reads whole lines even if this process dies right after.
    const auto written = ::write(STDOUT_FILENO, line.data(), line.size());
    if (written != static_cast<ssize_t>(line.size())) std::_Exit(3);
  };
  auto faults = std::make_shared<storage::fault_injector>();
  faults->set_sync_observer([&](const std::string& path, std::uint64_t bytes) {
    report("synced " + path + " " + std::to_string(bytes) + "\n");
  });
  storage::store_options options;
  options.faults = faults;
  auto store = storage::event_store::open(argv[1], options);
  if (!store) {
    std::fprintf(stderr, "crash child: %s\n", store.error().message.c_str());
    return 1;
  }
  report("ready\n");
  constexpr int threads = 4;
  constexpr int streams = 6;
  std::vector<std::thread> workers;
  for (int t = 0; t < threads; ++t) {
    workers.emplace_back([&, t] {
      std::mt19937_64 rng(seed * 31 + static_cast<std::uint64_t>(t));
      for (std::uint64_t k = 0;; ++k) {
        const std::string batch = std::to_string(seed) + "-" + std::to_string(t) + "-" + std::to_string(k);
        const int stream_count = 1 + static_cast<int>(rng() % 2);
        const int first_stream = static_cast<int>(rng() % streams);
        std::vector<std::size_t> sizes;
        std::size_t total = 0;
        for (int s = 0; s < stream_count; ++s) total += sizes.emplace_back(1 + rng() % 4);
        std::vector<storage::stream_append> request;
        std::size_t index = 0;
        for (int s = 0; s < stream_count; ++s) {
          storage::stream_append append{"crash-" + std::to_string((first_stream + s) % streams),
                                        storage::any_version, {}};
          for (std::size_t e = 0; e < sizes[static_cast<std::size_t>(s)]; ++e, ++index) {
            const events::event_id id{seed << 8 | static_cast<std::uint64_t>(t), k << 8 | index};
            append.events.push_back({id, 1, "batch=" + batch + " count=" + std::to_string(total)});
          }
          request.push_back(std::move(append));
        }
        auto result = store.value()->append(std::move(request));
        if (!result) {
          std::fprintf(stderr, "crash child: append failed: %s\n", result.error().message.c_str());
          std::_Exit(4);
        }
        report("ack " + std::to_string(result->first_position) + " " +
               std::to_string(result->last_position) + " " + batch + "\n");
      }
    });
  }
  for (auto& w : workers) w.join();  // never returns: the parent kills this process
}
