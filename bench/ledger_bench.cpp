// Ledger transfers through the ledger actor, store in `sync` mode, every invariant checked after
// every group (the actor's per-group check; the full check once at the end). Each command settles
// one premium job: user -> provider (usage) and provider -> platform (platform fee), 2 transfers.
// Also what a payout run reads from a large ledger (ledger_payout_read).
//
//   ./build/bench/ledger_bench --benchmark_repetitions=3 --benchmark_report_aggregates_only=true

#include <benchmark/benchmark.h>

#include <caf/actor_system.hpp>
#include <caf/actor_system_config.hpp>
#include <caf/event_based_actor.hpp>
#include <caf/scoped_actor.hpp>

#include <chrono>
#include <string>

#include "actors/errors.hpp"
#include "actors/ledger_actor.hpp"
#include "bench/actor_bench_support.hpp"
#include "domain/pricing.hpp"

namespace {

using namespace gpustream;

using done_atom = caf::atom_constant<caf::atom("done")>;

constexpr int users = 64;

domain::record_transfers settlement(std::uint64_t job) {
  domain::job_bill bill{.job_id = "bench-" + std::to_string(job),
                        .user_id = "u" + std::to_string(job % users),
                        .provider_id = "p" + std::to_string(job % 16),
                        .premium = true,
                        .outcome = domain::job_outcome::completed,
                        .price = {.input_micros_per_mtok = 100'000, .output_micros_per_mtok = 400'000},
                        .quality = events::quality_tier::standard,
                        .prompt_tokens = 500,
                        .completion_tokens = 200,
                        .ad = std::nullopt};
  auto settled = domain::settle_job(bill, domain::pricing_options{});
  if (!settled) std::abort();
  return std::move(settled.value().group);
}

/// Keeps `window` settlements in flight until `total` are acknowledged, then tells `report`.
caf::behavior driver(caf::event_based_actor* self, actors::ledger_actor ledger, std::uint64_t first,
                     std::uint64_t total, std::uint64_t window, caf::actor report) {
  auto next = std::make_shared<std::uint64_t>(0);
  auto acknowledged = std::make_shared<std::uint64_t>(0);
  auto send_one = std::make_shared<std::function<void()>>();
  *send_one = [=] {
    if (*next == total) return;
    const std::uint64_t job = first + (*next)++;
    self->request(ledger, caf::infinite, domain::ledger::command{settlement(job)})
        .then(
            [=](const actors::command_reply&) {
              if (++*acknowledged == total) {
                self->send(report, done_atom::value);
                self->quit();
              } else {
                (*send_one)();
              }
            },
            bench::must("settlement"));
  };
  for (std::uint64_t i = 0; i < window; ++i) (*send_one)();
  return {[](done_atom) {}};
}

/// A store, its actor and a ledger actor whose users have enough money for any number of
/// settlements; the actors stop with it.
struct funded_ledger {
  funded_ledger() {
    for (int u = 0; u < users; ++u) {
      auto deposit = domain::user_deposit("seed-" + std::to_string(u), "u" + std::to_string(u),
                                          1'000'000'000'000);
      self->request(ledger, caf::infinite, domain::ledger::command{deposit})
          .receive([](const actors::command_reply&) {}, bench::must("deposit"));
    }
  }
  ~funded_ledger() {
    self->send_exit(ledger, caf::exit_reason::user_shutdown);
    self->send_exit(store, caf::exit_reason::user_shutdown);
  }

  /// Settles jobs first .. first + total - 1, `window` at a time, and waits for all of them.
  void settle(std::uint64_t first, std::uint64_t total, std::uint64_t window) {
    setup.system.spawn(driver, ledger, first, total, window, caf::actor{self});
    self->receive([](done_atom) {});
  }

  bench::actor_bench_setup setup{"ledger-bench"};
  actors::store_actor store = actors::spawn_store_actor(setup.system, setup.store);
  actors::ledger_actor ledger = actors::spawn_ledger_actor(setup.system, store);
  caf::scoped_actor self{setup.system};
};

void ledger_transfers(benchmark::State& state) {
  funded_ledger world;
  auto& ledger = world.ledger;
  auto& self = world.self;
  const auto jobs = static_cast<std::uint64_t>(state.range(0));
  const auto window = static_cast<std::uint64_t>(state.range(1));
  std::uint64_t first = 0;
  for (auto _ : state) {
    world.settle(first, jobs, window);
    first += jobs;
  }
  // The full check, once: every balance sums to zero and none is negative where it must not be.
  self->request(ledger, caf::infinite, actors::state_atom::value)
      .receive(
          [&](const domain::ledger::state& ledger_state) {
            if (!domain::check_ledger(ledger_state)) state.SkipWithError("ledger invariant broken");
          },
          [&](caf::error&) { state.SkipWithError("state query failed"); });
  state.counters["transfers_per_s"] = benchmark::Counter(
      static_cast<double>(2 * jobs * state.iterations()), benchmark::Counter::kIsRate);
}
BENCHMARK(ledger_transfers)
    ->Args({20'000, 256})
    ->ArgNames({"jobs", "in_flight"})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

/// What a payout run reads from a ledger of `jobs` settled jobs: the providers' balances and the
/// payout transfers (the query the payout runner sends), against the whole state it read before
/// (a copy of every transfer), timed in the same run on the same ledger. Counters: the query's
/// time and the whole state's time per read, and their ratio.
void ledger_payout_read(benchmark::State& state) {
  funded_ledger world;
  auto& ledger = world.ledger;
  auto& self = world.self;
  world.settle(0, static_cast<std::uint64_t>(state.range(0)), 256);
  const actors::ledger_aggregate::query run_query{.account_prefix = "provider-", .transfer_prefix = "payout-"};
  using clock = std::chrono::steady_clock;
  clock::duration queried{};
  clock::duration whole{};
  for (auto _ : state) {
    const auto start = clock::now();
    self->request(ledger, caf::infinite, run_query)
        .receive(
            [&](const actors::ledger_aggregate::answer& answer) {
              if (answer.balances.size() != 16) state.SkipWithError("expected 16 providers");
            },
            bench::must("query"));
    const auto middle = clock::now();
    self->request(ledger, caf::infinite, actors::state_atom::value)
        .receive([&](const domain::ledger::state& whole_state) { benchmark::DoNotOptimize(whole_state); },
                 bench::must("state"));
    queried += middle - start;
    whole += clock::now() - middle;
  }
  const auto per_read_us = [&](clock::duration total) {
    return std::chrono::duration<double, std::micro>(total).count() / static_cast<double>(state.iterations());
  };
  state.counters["query_us"] = per_read_us(queried);
  state.counters["whole_state_us"] = per_read_us(whole);
  state.counters["whole_over_query"] = per_read_us(whole) / per_read_us(queried);
}
BENCHMARK(ledger_payout_read)->Arg(100'000)->ArgName("jobs")->Unit(benchmark::kMillisecond)->UseRealTime();

}  // namespace

BENCHMARK_MAIN();
