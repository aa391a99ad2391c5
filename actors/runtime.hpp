#pragma once
/// The actor runtime of one node: the store actor owning the event store, the ledger actor, one
/// registry per aggregate kind, the scheduler, the ad server and the payout runner, wired
/// together. app/ starts it; tests and benchmarks start it on their own stores.

#include <caf/fwd.hpp>

#include <memory>

#include "actors/ad_server.hpp"
#include "actors/aggregates.hpp"
#include "actors/ledger_actor.hpp"
#include "actors/payout_runner.hpp"
#include "actors/scheduler.hpp"
#include "actors/store_actor.hpp"

namespace gpustream::actors {

struct runtime_options {
  store_actor_options store;
  /// Options of every aggregate actor (stash, batching, snapshots, clock).
  persistence_options persistence;
  /// Idle time after which an aggregate actor is passivated. Default: 60 s.
  caf::timespan idle_max = std::chrono::seconds(60);
  scheduler_options scheduler;
  /// The ad server's options; its clock defaults to the persistence clock. Pass the ids of the
  /// campaigns found in the log as ads.campaign_ids so that they take part in auctions.
  ad_server_options ads;
  /// The payout runner's options; its clock defaults to the persistence clock.
  payout_runner_options payouts;
};

struct runtime {
  store_actor store;
  ledger_actor ledger;
  user_registry users;
  provider_registry providers;
  job_registry jobs;
  campaign_registry campaigns;
  payout_registry payouts;
  scheduler_actor scheduler;
  ad_server_actor ad_server;
  payout_runner_actor payout_runner;

  /// Asks every actor to stop, the store last (it closes the event store when it exits).
  void stop() const;
};

/// Spawns the runtime on `store`. The scheduler, the ad server, the payout runner and every
/// aggregate actor share the clock of `options.persistence.clock_us` unless their own is set.
[[nodiscard]] runtime start_runtime(caf::actor_system& system,
                                    std::shared_ptr<storage::event_store> store,
                                    runtime_options options = {});

}  // namespace gpustream::actors
