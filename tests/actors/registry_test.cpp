// The registry under test_coordinator: actors spawned on demand, one per stream, passivated when
// idle and recovered on the next command, commands held while a stream's actor stops, and the
// hold limit.

#include "actors/registry.hpp"

#include <caf/send.hpp>

#include <gtest/gtest.h>

#include <algorithm>

#include "storage/fault_injector.hpp"
#include "tests/actors/actor_testing.hpp"
#include "tests/actors/wallet.hpp"

namespace gpustream::actors {
namespace {

using testing::wallet;

class registry_test : public testing::deterministic_fixture {
 protected:
  registry_test() { open_store(); }

  registry_actor<wallet> spawn_registry(std::size_t held_commands_max = 1024) {
    registry_options options{.stream_prefix = "wallet-",
                             .persistence = {.clock_us = clock_.function()},
                             .idle_max = std::chrono::seconds(60),
                             .idle_check_interval = std::chrono::seconds(10),
                             .held_commands_max = held_commands_max};
    return stop_at_teardown(system_.spawn(registry_behavior<wallet>, store_, options));
  }

  static wallet::command credit(std::string id, std::int64_t amount) {
    return wallet::credit{std::move(id), amount};
  }

  std::size_t live(const registry_actor<wallet>& registry) {
    auto count = ask<std::size_t>(registry, count_atom::value);
    EXPECT_TRUE(count);
    return count ? count.value() : 0;
  }

  /// Moves virtual time on by `span` and lets every actor react.
  void advance(caf::timespan span) {
    sched_.clock().advance_time(span);
    run();
  }

  testing::manual_clock clock_;
};

TEST_F(registry_test, spawns_one_actor_per_stream_on_demand) {
  auto registry = spawn_registry();
  EXPECT_EQ(live(registry), 0u);
  ASSERT_TRUE(ask<command_reply>(registry, std::string("a"), credit("d1", 1)));
  auto second = ask<command_reply>(registry, std::string("a"), credit("d2", 2));
  ASSERT_TRUE(second);
  EXPECT_EQ(second.value().version, 2u);
  ASSERT_TRUE(ask<command_reply>(registry, std::string("b"), credit("d1", 5)));
  EXPECT_EQ(live(registry), 2u);
  auto listed = ask<command_reply>(registry, std::string("a"),
                                   std::vector<wallet::command>{credit("d3", 0), credit("d4", 4)});
  ASSERT_FALSE(listed) << "a list is decided all or none";
  auto a = ask<wallet::state>(registry, std::string("a"), state_atom::value);
  auto b = ask<wallet::state>(registry, std::string("b"), state_atom::value);
  ASSERT_TRUE(a);
  ASSERT_TRUE(b);
  EXPECT_EQ(a.value().balance_micros, 3);
  EXPECT_EQ(b.value().balance_micros, 5);
}

TEST_F(registry_test, passivates_idle_actors_and_recovers_them_on_the_next_command) {
  auto registry = spawn_registry();
  ASSERT_TRUE(ask<command_reply>(registry, std::string("a"), credit("d1", 1)));
  advance(std::chrono::seconds(30));
  ASSERT_TRUE(ask<command_reply>(registry, std::string("b"), credit("d1", 1)));
  advance(std::chrono::seconds(40));  // a idle for 70 s, b for 40 s
  EXPECT_EQ(live(registry), 1u);
  advance(std::chrono::seconds(30));
  EXPECT_EQ(live(registry), 0u);

  auto again = ask<command_reply>(registry, std::string("a"), credit("d2", 2));
  ASSERT_TRUE(again) << describe(again.error());
  EXPECT_EQ(again.value().version, 2u) << "the new actor recovered the stream";
  auto state = ask<wallet::state>(registry, std::string("a"), state_atom::value);
  ASSERT_TRUE(state);
  EXPECT_EQ(state.value().balance_micros, 3);
}

TEST_F(registry_test, an_actor_passivated_by_id_stops_at_once_and_its_stream_goes_on_later) {
  auto registry = spawn_registry();
  ASSERT_TRUE(ask<command_reply>(registry, std::string("a"), credit("d1", 1)));
  ASSERT_TRUE(ask<command_reply>(registry, std::string("b"), credit("d1", 1)));
  EXPECT_EQ(live(registry), 2u);
  self_->send(registry, passivate_atom::value, std::string("a"));
  self_->send(registry, passivate_atom::value, std::string("nobody"));  // no actor: nothing happens
  run();
  EXPECT_EQ(live(registry), 1u) << "a stopped without waiting for idle_max; b is untouched";
  auto again = ask<command_reply>(registry, std::string("a"), credit("d2", 2));
  ASSERT_TRUE(again) << describe(again.error());
  EXPECT_EQ(again.value().version, 2u) << "the successor recovered the stream";
  EXPECT_EQ(live(registry), 2u);
}

TEST_F(registry_test, commands_for_a_stopping_actor_wait_for_its_successor) {
  auto registry = spawn_registry(/*held_commands_max=*/1);
  ASSERT_TRUE(ask<command_reply>(registry, std::string("a"), credit("d1", 1)));
  // The idle check fires and the registry sends `passivate`; the actor has not handled it yet.
  sched_.clock().advance_time(std::chrono::seconds(70));
  ASSERT_TRUE(sched_.prioritize(registry));
  sched_.run_once();
  auto held = self_->request(registry, caf::infinite, std::string("a"), credit("d2", 2));
  auto refused = self_->request(registry, caf::infinite, std::string("a"), credit("d3", 3));
  ASSERT_TRUE(sched_.prioritize(registry));
  sched_.run_once();  // both come while the actor stops
  run();
  auto answer = collect<command_reply>(held);
  ASSERT_TRUE(answer) << describe(answer.error());
  EXPECT_EQ(answer.value().version, 2u);
  auto over = collect<command_reply>(refused);
  ASSERT_FALSE(over);
  ASSERT_TRUE(domain_error_of(over.error()));
  EXPECT_EQ(domain_error_of(over.error())->code, domain::errc::busy);
  EXPECT_EQ(live(registry), 1u);
}

class registry_fault_test : public registry_test {
 protected:
  registry_fault_test() {
    close_store();  // the one registry_test opened: this one fails on demand
    storage::store_options options;
    options.faults = faults_;
    open_store(std::move(options));
  }

  /// Runs every actor but `skipped` until only it has work left.
  void run_all_but(const caf::actor_addr& skipped) {
    auto* left_out = dynamic_cast<caf::resumable*>(caf::actor_cast<caf::abstract_actor*>(skipped));
    for (;;) {
      const auto other = std::find_if(sched_.jobs.begin(), sched_.jobs.end(),
                                      [&](caf::resumable* job) { return job != left_out; });
      if (other == sched_.jobs.end()) return;
      std::iter_swap(sched_.jobs.begin(), other);
      sched_.run_once();
    }
  }

  std::shared_ptr<storage::fault_injector> faults_ = std::make_shared<storage::fault_injector>();
};

TEST_F(registry_fault_test, a_command_waiting_at_the_registry_when_its_actor_stopped_goes_to_its_successor) {
  // The actor stops after a failed append while a command for it waits in the registry's mailbox:
  // the registry learns of the stop first, rather than hand that command to a stopped actor (a
  // provider's heartbeat failing its link, a job's command failing) after it.
  auto registry = spawn_registry();
  ASSERT_TRUE(ask<command_reply>(registry, std::string("a"), credit("d1", 1)));
  faults_->set_fail_sync(true);
  auto failed = self_->request(registry, caf::infinite, std::string("a"), credit("d2", 2));
  ASSERT_TRUE(sched_.prioritize(registry));
  sched_.run_once();  // d2 goes to the actor
  auto waiting = self_->request(registry, caf::infinite, std::string("a"), credit("d3", 3));
  run_all_but(registry.address());  // d2's append fails and the actor stops
  faults_->set_fail_sync(false);
  run();
  ASSERT_FALSE(collect<command_reply>(failed));
  auto answer = collect<command_reply>(waiting);
  ASSERT_TRUE(answer) << describe(answer.error());
  EXPECT_EQ(answer.value().version, 3u) << "d3 follows d2, which the reopened log holds";
}

}  // namespace
}  // namespace gpustream::actors
