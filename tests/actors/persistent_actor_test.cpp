// The persistence shell under test_coordinator: persist then apply, stash, batching, recovery from
// snapshot + tail, snapshots of another version, store failures, and the stash limit.

#include "actors/persistent_actor.hpp"

#include <caf/send.hpp>

#include <gtest/gtest.h>

#include <map>
#include <set>
#include <string>
#include <variant>

#include "events/crc32c.hpp"
#include "storage/fault_injector.hpp"
#include "tests/actors/actor_testing.hpp"
#include "tests/actors/wallet.hpp"
#include "tests/storage/store_testing.hpp"

namespace gpustream::actors {
namespace {

using testing::wallet;
using wallet_actor = aggregate_actor<wallet>;

class persistent_actor_test : public testing::deterministic_fixture {
 protected:
  persistent_actor_test() { open_store(); }

  wallet_actor spawn_wallet() { return spawn_wallet(persistence_options{}); }

  wallet_actor spawn_wallet(persistence_options options) {
    options.clock_us = clock_.function();
    return system_.spawn(persistent_behavior<wallet>, std::string("wallet-1"), store_, options);
  }

  wallet::command credit(std::string id, std::int64_t amount) {
    return wallet::credit{std::move(id), amount};
  }

  /// wallet-1 credited 1 to 4 (balance 10) with a snapshot at version 3, its actor stopped.
  void credit_four_with_a_snapshot_at_3() {
    persistence_options options;
    options.snapshot_every_events = 3;
    auto actor = spawn_wallet(options);
    for (int i = 1; i <= 4; ++i) ASSERT_TRUE(ask<command_reply>(actor, credit("d" + std::to_string(i), i)));
    self_->send_exit(actor, caf::exit_reason::user_shutdown);
    run();
  }

  /// A new actor of wallet-1 holds what the log holds (balance 10) and appends version 5 next;
  /// it stays alive for the caller.
  wallet_actor expect_recovered_from_the_log() {
    auto actor = spawn_wallet();
    auto recovered = ask<wallet::state>(actor, state_atom::value);
    EXPECT_TRUE(recovered) << describe(recovered.error());
    if (recovered) {
      EXPECT_EQ(recovered.value().balance_micros, 10);
    }
    return actor;
  }

  void expect_next_version_5(const wallet_actor& actor) {
    auto next = ask<command_reply>(actor, credit("d5", 5));
    ASSERT_TRUE(next) << "the actor took the stream to be at another version: " << describe(next.error());
    EXPECT_EQ(next.value().version, 5u);
  }

  testing::manual_clock clock_;
};

TEST_F(persistent_actor_test, a_recovery_read_does_not_hold_up_the_store_actors_appends) {
  // A long recovery (a ledger's tail) used to run inside the store actor, and every append
  // acknowledged meanwhile waited behind it.
  ASSERT_TRUE(ask<command_reply>(spawn_wallet(), credit("d1", 1)));
  auto recovering =
      self_->request(store_, caf::infinite, recover_atom::value, std::string("wallet-1"), false, std::uint64_t{0});
  auto appending = self_->request(store_, caf::infinite, append_atom::value,
                                 append_request{storage::testing::one_stream("other", storage::no_stream, 9, 1, 1)});
  for (int message = 0; message < 2; ++message) {  // the store actor alone: it hands the read on and appends
    ASSERT_TRUE(sched_.prioritize(store_));
    sched_.run_once();
  }
  auto appended = collect<storage::append_result>(appending);
  ASSERT_TRUE(appended) << describe(appended.error());
  EXPECT_TRUE(self_->mailbox().empty()) << "the recovery was read by the store actor itself";
  run();
  auto recovered = collect<recovery>(recovering);
  ASSERT_TRUE(recovered) << describe(recovered.error());
  EXPECT_EQ(recovered.value().tail.size(), 1u);
}

class persistent_actor_small_reads_test : public persistent_actor_test {
 protected:
  persistent_actor_small_reads_test() {
    close_store();
    storage::store_options options;
    options.mode = storage::durability::buffered;
    options.read_events_max = 4;
    open_store(std::move(options));
  }
};

TEST_F(persistent_actor_small_reads_test, a_long_tail_is_recovered_in_parts_of_at_most_read_events_max) {
  // A ledger without a usable snapshot (a new snapshot_version) recovers its whole history: it
  // used to come over in one message, all of it in memory at once.
  auto writer = spawn_wallet();
  for (int i = 1; i <= 10; ++i) ASSERT_TRUE(ask<command_reply>(writer, credit("d" + std::to_string(i), i)));
  std::vector<std::pair<std::size_t, bool>> parts;  // (events, complete)
  for (std::uint64_t after = 0;;) {
    auto part = ask<recovery>(store_, recover_atom::value, std::string("wallet-1"), false, after);
    ASSERT_TRUE(part) << describe(part.error());
    parts.emplace_back(part.value().tail.size(), part.value().complete);
    if (part.value().complete) break;
    after = part.value().tail.back().version;
  }
  EXPECT_EQ(parts, (std::vector<std::pair<std::size_t, bool>>{{4, false}, {4, false}, {2, true}}));
  persistence_options no_snapshots;
  no_snapshots.snapshot_every_events = 0;
  auto revived = spawn_wallet(no_snapshots);
  auto state = ask<wallet::state>(revived, state_atom::value);
  ASSERT_TRUE(state) << describe(state.error());
  EXPECT_EQ(state.value().balance_micros, 55);
  EXPECT_EQ(state.value().deposit_ids.size(), 10u);
  auto more = ask<command_reply>(revived, credit("d11", 11));
  ASSERT_TRUE(more) << describe(more.error());
  EXPECT_EQ(more.value().version, 11u) << "it goes on from the last part's version";
}

TEST_F(persistent_actor_test, applies_and_answers_only_after_the_store_acknowledges) {
  auto actor = spawn_wallet();
  run();  // recovery of an empty stream
  auto reply = self_->request(actor, caf::infinite, credit("d1", 500));
  // Let the wallet decide and send its append, but keep the store from running.
  ASSERT_TRUE(sched_.prioritize(actor));
  sched_.run_once();
  EXPECT_TRUE(self_->mailbox().empty()) << "answered before the append was acknowledged";
  auto before = self_->request(actor, caf::infinite, state_atom::value);
  sched_.prioritize(actor);
  sched_.run_once();
  auto seen = collect<wallet::state>(before);
  ASSERT_TRUE(seen);
  EXPECT_EQ(seen.value().balance_micros, 0) << "state changed before the append was acknowledged";

  run();
  auto answered = collect<command_reply>(reply);
  ASSERT_TRUE(answered) << describe(answered.error());
  EXPECT_EQ(answered.value().version, 1u);
  ASSERT_EQ(answered.value().events.size(), 1u);
  auto after = ask<wallet::state>(actor, state_atom::value);
  ASSERT_TRUE(after);
  EXPECT_EQ(after.value().balance_micros, 500);
}

TEST_F(persistent_actor_test, commands_during_recovery_are_stashed_and_batched_in_order) {
  auto actor = spawn_wallet();
  // Nothing has run: the actor is still recovering when these arrive.
  auto first = self_->request(actor, caf::infinite, credit("d1", 1));
  auto second = self_->request(actor, caf::infinite, credit("d2", 2));
  auto refused = self_->request(actor, caf::infinite, credit("d3", -3));
  auto repeat = self_->request(actor, caf::infinite, credit("d1", 1));
  run();
  auto r1 = collect<command_reply>(first);
  auto r2 = collect<command_reply>(second);
  auto r3 = collect<command_reply>(refused);
  auto r4 = collect<command_reply>(repeat);
  ASSERT_TRUE(r1);
  ASSERT_TRUE(r2);
  EXPECT_EQ(r1.value().version, 1u);
  EXPECT_EQ(r2.value().version, 2u);
  ASSERT_FALSE(r3);
  ASSERT_TRUE(domain_error_of(r3.error()));
  EXPECT_EQ(domain_error_of(r3.error())->code, domain::errc::invalid_argument);
  ASSERT_TRUE(r4);
  EXPECT_TRUE(r4.value().events.empty()) << "a repeated deposit appends nothing";
  EXPECT_EQ(r4.value().version, 2u);
}

TEST_F(persistent_actor_test, a_list_of_commands_is_decided_together_all_or_none) {
  auto actor = spawn_wallet();
  auto both = ask<command_reply>(actor, std::vector<wallet::command>{credit("d1", 1), credit("d2", 2)});
  ASSERT_TRUE(both) << describe(both.error());
  EXPECT_EQ(both.value().version, 2u);
  EXPECT_EQ(both.value().events.size(), 2u);

  auto refused = ask<command_reply>(actor, std::vector<wallet::command>{credit("d3", 3), credit("d4", -4)});
  ASSERT_FALSE(refused);
  EXPECT_EQ(domain_error_of(refused.error())->code, domain::errc::invalid_argument);
  auto empty = ask<command_reply>(actor, std::vector<wallet::command>{});
  ASSERT_FALSE(empty);
  EXPECT_EQ(domain_error_of(empty.error())->code, domain::errc::invalid_argument);

  auto state = ask<wallet::state>(actor, state_atom::value);
  ASSERT_TRUE(state);
  EXPECT_EQ(state.value().balance_micros, 3) << "d3 was refused with d4";
  EXPECT_FALSE(state.value().deposit_ids.contains("d3"));
}

TEST_F(persistent_actor_test, commands_per_append_max_and_events_per_append_max_split_batches) {
  persistence_options options;
  options.commands_per_append_max = 2;
  auto by_commands = spawn_wallet(options);
  const auto appends_before = store_ptr_->stats().grouped_appends;
  std::vector<decltype(self_->request(by_commands, caf::infinite, credit("x", 1)))> replies;
  for (int i = 0; i < 5; ++i) {
    replies.push_back(self_->request(by_commands, caf::infinite, credit("d" + std::to_string(i), 1)));
  }
  run();
  for (auto& reply : replies) EXPECT_TRUE(collect<command_reply>(reply));
  EXPECT_EQ(store_ptr_->stats().grouped_appends - appends_before, 3u) << "5 commands, 2 per append";

  persistence_options small_batches;
  small_batches.events_per_append_max = 3;
  small_batches.clock_us = clock_.function();
  auto by_events =
      system_.spawn(persistent_behavior<wallet>, std::string("wallet-2"), store_, small_batches);
  const auto before = store_ptr_->stats().grouped_appends;
  replies.clear();
  for (int i = 0; i < 5; ++i) {
    replies.push_back(self_->request(by_events, caf::infinite, credit("e" + std::to_string(i), 1)));
  }
  run();
  for (auto& reply : replies) EXPECT_TRUE(collect<command_reply>(reply));
  EXPECT_EQ(store_ptr_->stats().grouped_appends - before, 2u) << "5 events, at most 3 per append";
}

TEST_F(persistent_actor_test, a_list_deciding_more_than_events_per_append_max_is_refused_alone) {
  // Appended whole, it would pass the store's limit too, and the store's refusal would fail every
  // command waiting with it and stop the actor.
  persistence_options small_batches;
  small_batches.events_per_append_max = 3;
  small_batches.clock_us = clock_.function();
  auto actor = system_.spawn(persistent_behavior<wallet>, std::string("wallet-3"), store_, small_batches);
  auto too_many = self_->request(actor, caf::infinite,
                                 std::vector<wallet::command>{credit("a", 1), credit("b", 1), credit("c", 1), credit("d", 1)});
  auto next = self_->request(actor, caf::infinite, credit("e", 1));
  run();
  auto refused = collect<command_reply>(too_many);
  ASSERT_FALSE(refused);
  ASSERT_TRUE(domain_error_of(refused.error())) << describe(refused.error());
  EXPECT_EQ(domain_error_of(refused.error())->code, domain::errc::limit_exceeded);
  EXPECT_NE(domain_error_of(refused.error())->message.find("4 events"), std::string::npos)
      << domain_error_of(refused.error())->message;
  auto answered = collect<command_reply>(next);
  ASSERT_TRUE(answered) << describe(answered.error());
  EXPECT_EQ(answered.value().version, 1u) << "nothing of the refused list was appended";
}

TEST_F(persistent_actor_test, a_full_stash_refuses_as_busy) {
  persistence_options options;
  options.stash_commands_max = 2;
  auto actor = spawn_wallet(options);
  auto a = self_->request(actor, caf::infinite, credit("d1", 1));
  auto b = self_->request(actor, caf::infinite, credit("d2", 1));
  auto c = self_->request(actor, caf::infinite, credit("d3", 1));
  run();
  EXPECT_TRUE(collect<command_reply>(a));
  EXPECT_TRUE(collect<command_reply>(b));
  auto refused = collect<command_reply>(c);
  ASSERT_FALSE(refused);
  ASSERT_TRUE(domain_error_of(refused.error()));
  EXPECT_EQ(domain_error_of(refused.error())->code, domain::errc::busy);
}

TEST_F(persistent_actor_test, recovers_from_snapshot_plus_tail_to_the_state_of_a_full_replay) {
  persistence_options options;
  options.snapshot_every_events = 3;
  auto actor = spawn_wallet(options);
  for (int i = 1; i <= 7; ++i) {
    ASSERT_TRUE(ask<command_reply>(actor, credit("d" + std::to_string(i), i)));
  }
  auto live = ask<wallet::state>(actor, state_atom::value);
  ASSERT_TRUE(live);
  self_->send_exit(actor, caf::exit_reason::user_shutdown);
  run();

  auto from_snapshot = spawn_wallet();
  auto recovered = ask<wallet::state>(from_snapshot, state_atom::value);
  ASSERT_TRUE(recovered);
  EXPECT_EQ(recovered.value(), live.value());
  EXPECT_EQ(recovered.value().balance_micros, 28);

  // The same state from the log alone: a snapshot of another format is ignored, not misread.
  self_->send(store_, snapshot_atom::value, std::string("wallet-1"), std::uint64_t{7},
              std::string("\x09\x00\x00\x00 written by another version", 32));
  run();
  auto from_log = spawn_wallet();
  auto replayed = ask<wallet::state>(from_log, state_atom::value);
  ASSERT_TRUE(replayed);
  EXPECT_EQ(replayed.value(), live.value());
  auto next = ask<command_reply>(from_log, credit("d8", 8));
  ASSERT_TRUE(next);
  EXPECT_EQ(next.value().version, 8u) << "the recovered actor continues the stream";
}

TEST_F(persistent_actor_test, a_snapshot_that_fails_its_check_is_read_past_and_the_stream_replayed_whole) {
  ASSERT_NO_FATAL_FAILURE(credit_four_with_a_snapshot_at_3());
  close_store();
  storage::testing::raw_put(directory_.path(), "snapshots", "wallet-1", std::string(20, '\x5a'));  // no CRC holds
  ASSERT_FALSE(HasFailure());
  open_store();
  const auto recovered = expect_recovered_from_the_log();
  expect_next_version_5(recovered);
}

TEST_F(persistent_actor_test, a_snapshot_ahead_of_the_log_is_read_past_and_the_stream_replayed_whole) {
  // The log lost its tail (a power cut under buffered durability) and the snapshot, written to
  // its own table, outlived it: its state holds events the log no longer has.
  ASSERT_NO_FATAL_FAILURE(credit_four_with_a_snapshot_at_3());
  auto saved = store_ptr_->load_snapshot("wallet-1");
  ASSERT_TRUE(saved && saved.value()) << "a snapshot at version 3";
  ASSERT_EQ(saved.value()->version, 3u);
  close_store();
  // The same state, said to be at version 9 (as RocksDB stores it: version, state, CRC32C).
  std::string value(8, '\0');
  value[7] = '\x09';
  value += saved.value()->state;
  const auto crc = events::crc32c(std::as_bytes(std::span(value.data(), value.size())));
  for (int i = 0; i < 4; ++i) value.push_back(static_cast<char>((crc >> (8 * i)) & 0xFFu));
  storage::testing::raw_put(directory_.path(), "snapshots", "wallet-1", value);
  ASSERT_FALSE(HasFailure());
  open_store();
  auto loaded = store_ptr_->load_snapshot("wallet-1");
  ASSERT_TRUE(loaded && loaded.value() && loaded.value()->version == 9u) << "the forged snapshot is sound";
  const auto recovered = expect_recovered_from_the_log();
  auto gone = store_ptr_->load_snapshot("wallet-1");
  ASSERT_TRUE(gone);
  EXPECT_FALSE(gone.value()) << "deleted: once the stream grows back to version 9 it would be trusted";
  expect_next_version_5(recovered);
}

/// A store whose files consult faults_ (a failed fsync on demand).
class persistent_actor_fault_test : public testing::deterministic_fixture {
 protected:
  persistent_actor_fault_test() {
    storage::store_options options;
    options.faults = faults_;
    open_store(std::move(options));
  }
  std::shared_ptr<storage::fault_injector> faults_ = std::make_shared<storage::fault_injector>();
};

TEST_F(persistent_actor_fault_test, a_failed_append_stops_the_actor_and_answers_everyone) {
  auto& faults = faults_;
  testing::manual_clock clock;
  auto actor = system_.spawn(persistent_behavior<wallet>, std::string("wallet-1"), store_,
                             persistence_options{.clock_us = clock.function()});
  ASSERT_TRUE(ask<command_reply>(actor, wallet::command{wallet::credit{"d1", 1}}));
  self_->monitor(actor);
  faults->set_fail_sync(true);
  auto failed = self_->request(actor, caf::infinite, wallet::command{wallet::credit{"d2", 2}});
  auto stashed = self_->request(actor, caf::infinite, wallet::command{wallet::credit{"d3", 3}});
  run();
  for (auto* handle : {&failed, &stashed}) {
    auto reply = collect<command_reply>(*handle);
    ASSERT_FALSE(reply);
    ASSERT_TRUE(storage_error_of(reply.error())) << describe(reply.error());
    EXPECT_EQ(storage_error_of(reply.error())->code, storage::errc::io_error);
  }
  bool down = false;
  self_->receive([&](caf::down_msg& msg) {
    down = true;
    EXPECT_TRUE(storage_error_of(msg.reason)) << describe(msg.reason);
  });
  EXPECT_TRUE(down);

  // Once the fault is lifted, a new actor recovers what was acknowledged and goes on.
  faults->set_fail_sync(false);
  auto revived = system_.spawn(persistent_behavior<wallet>, std::string("wallet-1"), store_,
                               persistence_options{.clock_us = clock.function()});
  auto retried = ask<command_reply>(revived, wallet::command{wallet::credit{"d2", 2}});
  ASSERT_TRUE(retried) << describe(retried.error());
  auto state = ask<wallet::state>(revived, state_atom::value);
  ASSERT_TRUE(state);
  EXPECT_TRUE(state.value().deposit_ids.contains("d1"));
  EXPECT_TRUE(state.value().deposit_ids.contains("d2"));
}

TEST_F(persistent_actor_fault_test, a_command_decided_anew_after_a_failed_append_never_claims_what_the_log_lacks) {
  // The failed append (d2) may be in the log: its bytes reached the WAL. An actor recovering
  // before the store reopened decided d3 at d2's version, with d2's event ids. The store used to
  // answer that append as a retry of d2: the actor then held d3, which the log lacked. Later it
  // refused it as an event id conflict. Now no read shows the log before the reopen.
  auto& faults = faults_;
  testing::manual_clock clock;
  auto spawn = [&] {
    return system_.spawn(persistent_behavior<wallet>, std::string("wallet-1"), store_,
                         persistence_options{.clock_us = clock.function()});
  };
  auto actor = spawn();
  ASSERT_TRUE(ask<command_reply>(actor, wallet::command{wallet::credit{"d1", 1}}));
  faults->set_fail_sync(true);
  auto failed = self_->request(actor, caf::infinite, wallet::command{wallet::credit{"d2", 2}});
  run();
  ASSERT_FALSE(collect<command_reply>(failed));
  faults->set_fail_sync(false);

  auto revived = spawn();
  auto decided = ask<command_reply>(revived, wallet::command{wallet::credit{"d3", 3}});
  ASSERT_TRUE(decided) << describe(decided.error());
  auto live = ask<wallet::state>(revived, state_atom::value);
  auto replayed = ask<wallet::state>(spawn(), state_atom::value);
  ASSERT_TRUE(live);
  ASSERT_TRUE(replayed);
  EXPECT_EQ(live.value(), replayed.value()) << "the actor's state is the log's";
  EXPECT_TRUE(live.value().deposit_ids.contains("d1"));
  EXPECT_TRUE(live.value().deposit_ids.contains("d3"));
}

}  // namespace
}  // namespace gpustream::actors
