// The full job lifecycle through the actors, store in `sync` mode: submit (job recorded, quote held
// against the ledger balance, queued) -> assigned by the scheduler -> offered to a provider session
// -> started -> completed -> ledger group (usage + fee) and provider scored. Simulated providers
// answer every offer at once, so the figure is the platform's own cost per job.
//
//   ./build/bench/lifecycle_bench --benchmark_repetitions=3 --benchmark_report_aggregates_only=true

#include <benchmark/benchmark.h>

#include <caf/actor_system.hpp>
#include <caf/actor_system_config.hpp>
#include <caf/event_based_actor.hpp>
#include <caf/scoped_actor.hpp>
#include <caf/send.hpp>

#include <string>

#include "actors/errors.hpp"
#include "actors/runtime.hpp"
#include "bench/actor_bench_support.hpp"
#include "domain/ledger.hpp"
#include "domain/selection.hpp"

namespace {

using namespace gpustream;

using done_atom = caf::atom_constant<caf::atom("done")>;
using go_atom = caf::atom_constant<caf::atom("go")>;

constexpr int users = 64;
constexpr int providers = 32;
constexpr std::uint32_t slots_per_provider = 16;

using bench::die;
using bench::must;

/// A provider that starts and finishes every job it is offered at once, and tells `counter` when
/// the scheduler has settled it.
actors::provider_session::behavior_type instant_provider(actors::provider_session::pointer self,
                                                         actors::scheduler_actor scheduler,
                                                         std::string provider_id,
                                                         caf::actor counter) {
  return {
      [=](actors::offer_atom, const actors::job_offer& offer) {
        self->request(scheduler, caf::infinite, actors::started_atom::value, offer.job_id,
                      provider_id)
            .then(
                [=](std::uint64_t) {
                  self->request(scheduler, caf::infinite,
                                actors::job_result{offer.job_id, provider_id, 200, 200, 50'000,
                                                   2'000'000, 200, 800})
                      .then([=](const actors::job_ended&) { caf::anon_send(counter, done_atom::value); },
                            [](caf::error& failure) { die("result refused", failure); });
                },
                [](caf::error& failure) { die("start refused", failure); });
      },
      [](actors::cancel_atom, const std::string&) {},
  };
}

/// Once told to go, submits `total` jobs keeping `window` in flight; tells `report` when all are
/// settled.
caf::behavior driver(caf::event_based_actor* self, actors::scheduler_actor scheduler,
                     std::uint64_t first, std::uint64_t total, std::uint64_t window,
                     caf::actor report) {
  auto submitted = std::make_shared<std::uint64_t>(0);
  auto settled = std::make_shared<std::uint64_t>(0);
  auto submit_one = std::make_shared<std::function<void()>>();
  *submit_one = [=] {
    if (*submitted == total) return;
    const std::uint64_t n = first + (*submitted)++;
    actors::job_request request{.job_id = "b" + std::to_string(n),
                                .user_id = "u" + std::to_string(n % users),
                                .model = "llama-8b",
                                .quality = events::quality_tier::standard,
                                .prompt_tokens = 500,
                                .max_tokens = 256,
                                .max_price_micros = 1'000'000,
                                .premium = true,
                                .conversation_id = {},
                                .contribution_score = 0};
    self->request(scheduler, caf::infinite, std::move(request))
        .then([](const actors::job_accepted&) {},
              [](caf::error& failure) { die("submit refused", failure); });
  };
  return {[=](go_atom) {
            for (std::uint64_t i = 0; i < window; ++i) (*submit_one)();
          },
          [=](done_atom) {
    if (++*settled == total) {
      self->send(report, done_atom::value);
      self->quit();
    } else {
      (*submit_one)();
    }
  }};
}

void job_lifecycle(benchmark::State& state) {
  bench::actor_bench_setup setup("lifecycle-bench");
  auto& system = setup.system;
  auto rt = actors::start_runtime(system, setup.store);
  caf::scoped_actor self(system);
  for (int u = 0; u < users; ++u) {
    const std::string id = "u" + std::to_string(u);
    self->request(rt.users, caf::infinite, id,
                  domain::user::command{domain::create_user{id, id, events::user_tier::premium}})
        .receive([](const actors::command_reply&) {}, must("create user"));
    self->request(rt.ledger, caf::infinite,
                  domain::ledger::command{domain::user_deposit("d" + id, id, 10'000'000'000)})
        .receive([](const actors::command_reply&) {}, must("deposit"));
  }
  // The driver counts settlements; sessions report to it. Spawned per iteration below.
  const auto jobs = static_cast<std::uint64_t>(state.range(0));
  const auto window = static_cast<std::uint64_t>(state.range(1));
  std::uint64_t first = 0;
  bool providers_online = false;
  for (auto _ : state) {
    auto counter = system.spawn(driver, rt.scheduler, first, jobs, window, caf::actor{self});
    if (!providers_online) {
      state.PauseTiming();
      for (int p = 0; p < providers; ++p) {
        const std::string id = "p" + std::to_string(p);
        using provider = domain::provider;
        for (auto command : {provider::command{provider::create{id, "o" + id, id, {}}},
                             provider::command{provider::connect{
                                 {}, events::backend_kind::openai, "http://127.0.0.1:1/v1", "b"}},
                             provider::command{provider::advertise{{events::model_offer{
                                 "llama-8b", 8192, "Q4", 100'000, 400'000, slots_per_provider}}}}}) {
          self->request(rt.providers, caf::infinite, id, command)
              .receive([](const actors::command_reply&) {}, must("provider"));
        }
        domain::provider::state provider_state;
        self->request(rt.providers, caf::infinite, id, actors::state_atom::value)
            .receive([&](domain::provider::state& s) { provider_state = std::move(s); },
                     must("provider state"));
        auto session = system.spawn(instant_provider, rt.scheduler, id, counter);
        self->send(rt.scheduler, actors::online_atom::value,
                   actors::provider_online{
                       domain::listing_for(provider_state, actors::system_clock_us()), session});
      }
      providers_online = true;
      state.ResumeTiming();
    }
    self->send(counter, go_atom::value);
    self->receive([](done_atom) {});
    first += jobs;
  }
  state.counters["jobs_per_s"] = benchmark::Counter(static_cast<double>(jobs * state.iterations()),
                                                    benchmark::Counter::kIsRate);
  // Money adds up: the full ledger check once at the end.
  self->request(rt.ledger, caf::infinite, actors::state_atom::value)
      .receive(
          [&](const domain::ledger::state& ledger) {
            if (!domain::check_ledger(ledger)) state.SkipWithError("ledger invariant broken");
          },
          must("ledger state"));
  rt.stop();
}
BENCHMARK(job_lifecycle)
    ->Args({20'000, 256})
    ->ArgNames({"jobs", "in_flight"})
    ->Iterations(1)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

}  // namespace

BENCHMARK_MAIN();
