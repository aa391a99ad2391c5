#include "store_testing.hpp"

#include <gtest/gtest.h>

#include <atomic>
#include <random>
#include <unistd.h>

namespace gpustream::storage::testing {

temp_dir::temp_dir() {
  static std::atomic<int> counter{0};
  path_ = std::filesystem::temp_directory_path() /
          ("gpustream-test-" + std::to_string(::getpid()) + "-" + std::to_string(counter++));
  std::filesystem::remove_all(path_);
  std::filesystem::create_directories(path_);
}

temp_dir::~temp_dir() {
  std::error_code ec;
  std::filesystem::remove_all(path_, ec);  // best effort: a leftover temp dir harms nothing
}

events::event_id make_id(std::uint64_t tag, std::uint64_t n) { return {tag, n}; }

new_event make_event(events::event_id id, std::string text, std::uint16_t type) {
  return new_event{id, type, std::move(text)};
}

std::vector<stream_append> one_stream(std::string stream, std::uint64_t expected, std::uint64_t tag,
                                      std::uint64_t first, std::size_t count) {
  stream_append append{std::move(stream), expected, {}};
  for (std::size_t i = 0; i < count; ++i) {
    const auto n = first + i;
    append.events.push_back(make_event(make_id(tag, n), "payload-" + std::to_string(n)));
  }
  return {std::move(append)};
}

std::unique_ptr<event_store> open_or_fail(const std::filesystem::path& dir, store_options options) {
  auto store = event_store::open(dir, std::move(options));
  if (!store) {
    ADD_FAILURE() << "cannot open store: " << store.error().message;
    return nullptr;
  }
  return std::move(store).value();
}

}  // namespace gpustream::storage::testing
