#pragma once
/// Helpers for actor tests: an actor system on CAF's test_coordinator with a real event store in a
/// temporary directory, and a blocking way to collect a reply once the scheduler has run.

#include <caf/actor_system.hpp>
#include <caf/actor_system_config.hpp>
#include <caf/scheduler/test_coordinator.hpp>
#include <caf/scoped_actor.hpp>

#include <gtest/gtest.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "actors/errors.hpp"
#include "actors/store_actor.hpp"
#include "storage/event_store.hpp"
#include "tests/storage/store_testing.hpp"

namespace gpustream::actors::testing {

/// The seed of a randomized test: GPUSTREAM_SEED when set, else a fresh random one.
[[nodiscard]] std::uint64_t seed_from_environment();

/// A config whose scheduler is CAF's test_coordinator: nothing runs until the test says so.
class test_config : public caf::actor_system_config {
 public:
  test_config();
};

/// A virtual wall clock for decisions, microseconds since the epoch; tests move it by hand.
struct manual_clock {
  std::shared_ptr<std::int64_t> now_us = std::make_shared<std::int64_t>(1'700'000'000'000'000);
  [[nodiscard]] std::function<std::int64_t()> function() const {
    return [now = now_us] { return *now; };
  }
};

/// An actor system on the test coordinator, a store in a temporary directory and its actor.
class deterministic_fixture : public ::testing::Test {
 protected:
  deterministic_fixture();
  ~deterministic_fixture() override;

  /// Opens a buffered store and spawns its actor.
  void open_store();
  /// Opens the store with `options` and spawns its actor.
  void open_store(storage::store_options options);
  /// Stops the store actor and waits until it has closed the store.
  void close_store();

  /// Stops `actor` (before the store) when the test ends.
  template <class Handle>
  Handle stop_at_teardown(Handle actor) {
    to_stop_.push_back(caf::actor_cast<caf::actor>(actor));
    return actor;
  }

  /// Runs every runnable actor until nothing is left to do.
  void run() { sched_.run(); }

  /// The reply to `handle` (a request made by self_), which must already be in self_'s mailbox
  /// (run() first): a missing reply fails the test instead of blocking it.
  template <class T, class Handle>
  [[nodiscard]] expected<T, caf::error> collect(Handle& handle) {
    if (self_->mailbox().empty()) {
      ADD_FAILURE() << "no reply is waiting";
      return unexpected{caf::error(caf::sec::request_timeout)};
    }
    std::optional<expected<T, caf::error>> result;
    handle.receive([&](T& value) { result.emplace(std::move(value)); },
                   [&](caf::error& failure) { result.emplace(unexpected{std::move(failure)}); });
    return std::move(*result);
  }

  /// Sends a request from self_, runs the system until quiet, and returns the reply.
  template <class T, class Dest, class... Ts>
  [[nodiscard]] expected<T, caf::error> ask(const Dest& dest, Ts&&... xs) {
    auto handle = self_->request(dest, caf::infinite, std::forward<Ts>(xs)...);
    run();
    return collect<T>(handle);
  }

  storage::testing::temp_dir directory_;
  test_config config_;
  caf::actor_system system_;
  caf::scheduler::test_coordinator& sched_;
  caf::scoped_actor self_;
  store_actor store_;
  /// The store the store actor owns, shared so that tests can read its statistics.
  std::shared_ptr<storage::event_store> store_ptr_;
  std::vector<caf::actor> to_stop_;
};

}  // namespace gpustream::actors::testing
