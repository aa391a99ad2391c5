#include "actors/runtime.hpp"

#include <caf/actor_system.hpp>
#include <caf/send.hpp>

namespace gpustream::actors {

namespace {

template <class A>
registry_actor<A> spawn_registry(caf::actor_system& system, const store_actor& store,
                                 std::string prefix, const runtime_options& options) {
  registry_options registry;  // held_commands_max keeps its default
  registry.stream_prefix = std::move(prefix);
  registry.persistence = options.persistence;
  registry.idle_max = options.idle_max;
  registry.idle_check_interval = options.idle_max / 6;
  return system.spawn(registry_behavior<A>, store, std::move(registry));
}

}  // namespace

void runtime::stop() const {
  const auto reason = caf::exit_reason::user_shutdown;
  caf::anon_send_exit(ad_server, reason);
  caf::anon_send_exit(payout_runner, reason);
  caf::anon_send_exit(scheduler, reason);
  caf::anon_send_exit(users, reason);
  caf::anon_send_exit(providers, reason);
  caf::anon_send_exit(jobs, reason);
  caf::anon_send_exit(campaigns, reason);
  caf::anon_send_exit(payouts, reason);
  caf::anon_send_exit(ledger, reason);
  caf::anon_send_exit(store, reason);
}

runtime start_runtime(caf::actor_system& system, std::shared_ptr<storage::event_store> store,
                      runtime_options options) {
  if (!options.persistence.clock_us) options.persistence.clock_us = system_clock_us;
  if (!options.scheduler.clock_us) options.scheduler.clock_us = options.persistence.clock_us;
  if (!options.ads.clock_us) options.ads.clock_us = options.persistence.clock_us;
  if (!options.payouts.clock_us) options.payouts.clock_us = options.persistence.clock_us;
  runtime r;
  r.store = spawn_store_actor(system, std::move(store), options.store);
  r.ledger = spawn_ledger_actor(system, r.store, options.persistence);
  r.users = spawn_registry<domain::user>(system, r.store, "user-", options);
  r.providers = spawn_registry<domain::provider>(system, r.store, "provider-", options);
  r.jobs = spawn_registry<domain::job>(system, r.store, "job-", options);
  r.campaigns = spawn_registry<domain::campaign>(system, r.store, "campaign-", options);
  r.payouts = spawn_registry<domain::payout>(system, r.store, "payout-", options);
  r.scheduler = spawn_scheduler(system, {r.ledger, r.users, r.providers, r.jobs},
                                std::move(options.scheduler));
  r.ad_server = spawn_ad_server(system, {r.campaigns, r.ledger}, std::move(options.ads));
  r.payout_runner = spawn_payout_runner(system, {r.ledger, r.payouts}, std::move(options.payouts));
  return r;
}

}  // namespace gpustream::actors
