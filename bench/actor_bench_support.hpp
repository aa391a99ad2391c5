#pragma once
/// What the actor benchmarks share: an actor system beside a fresh `sync` event store in a scratch
/// directory, and a way to stop loudly when something that must not fail does.

#include <caf/actor_system.hpp>
#include <caf/actor_system_config.hpp>
#include <caf/error.hpp>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <random>
#include <string>

#include "actors/errors.hpp"
#include "storage/event_store.hpp"

namespace gpustream::bench {

/// Prints what failed and aborts: a benchmark whose work failed must not print a figure.
[[noreturn]] inline void die(const char* what, const caf::error& failure) {
  std::fprintf(stderr, "%s: %s\n", what, actors::describe(failure).c_str());
  std::abort();
}

/// A handler for request(...).receive/then that dies naming `what`.
inline auto must(const char* what) {
  return [what](caf::error& failure) { die(what, failure); };
}

/// A directory under the system temp dir, removed before and after.
struct scratch_dir {
  explicit scratch_dir(const std::string& name)
      : path(std::filesystem::temp_directory_path() /
             ("gpustream-" + name + "-" + std::to_string(std::random_device{}()))) {
    std::filesystem::remove_all(path);
  }
  ~scratch_dir() { std::filesystem::remove_all(path); }
  std::filesystem::path path;
};

/// An actor system and a fresh event store in `sync` durability (the production default).
/// Members are destroyed in reverse order: the system waits for its actors before the directory
/// goes away.
struct actor_bench_setup {
  explicit actor_bench_setup(const std::string& name) : dir(name), system(config_with_errors()) {
    auto opened = storage::event_store::open(dir.path, {});
    if (!opened) {
      std::fprintf(stderr, "cannot open the store: %s\n", opened.error().message.c_str());
      std::abort();
    }
    store = std::move(opened.value());
  }

  scratch_dir dir;
  caf::actor_system_config config;
  caf::actor_system system;
  std::shared_ptr<storage::event_store> store;

 private:
  caf::actor_system_config& config_with_errors() {
    actors::add_error_categories(config);
    return config;
  }
};

}  // namespace gpustream::bench
