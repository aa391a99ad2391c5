// CAF message throughput on this machine: request/response ping-pong between two event-based
// actors, and N senders fanning into one actor. Each figure is printed as messages per second.
//
//   ./build/bench/actors_bench --benchmark_repetitions=3 --benchmark_report_aggregates_only=true

#include <benchmark/benchmark.h>

#include <caf/actor_system.hpp>
#include <caf/actor_system_config.hpp>
#include <caf/event_based_actor.hpp>
#include <caf/scoped_actor.hpp>
#include <caf/send.hpp>

#include <cstdint>
#include <vector>

#include "actors/atoms.hpp"

namespace {

using ping_atom = caf::atom_constant<caf::atom("ping")>;
using done_atom = caf::atom_constant<caf::atom("done")>;

caf::behavior ponger() {
  return {[](ping_atom, std::uint64_t n) { return n; }};
}

/// Sends `rounds` requests to `pong` one after another, then tells `report` it is done.
caf::behavior pinger(caf::event_based_actor* self, caf::actor pong, std::uint64_t rounds,
                     caf::actor report) {
  auto step = std::make_shared<std::function<void(std::uint64_t)>>();
  *step = [self, pong, rounds, report, step](std::uint64_t n) {
    if (n == rounds) {
      self->send(report, done_atom::value);
      self->quit();
      return;
    }
    self->request(pong, caf::infinite, ping_atom::value, n + 1)
        .then([step](std::uint64_t next) { (*step)(next); });
  };
  (*step)(0);
  return {[](done_atom) {}};
}

void ping_pong(benchmark::State& state) {
  caf::actor_system_config config;
  caf::actor_system system(config);
  const auto rounds = static_cast<std::uint64_t>(state.range(0));
  caf::scoped_actor self(system);
  for (auto _ : state) {
    auto pong = system.spawn(ponger);
    system.spawn(pinger, pong, rounds, caf::actor{self});
    self->receive([](done_atom) {});
    caf::anon_send_exit(pong, caf::exit_reason::user_shutdown);
  }
  state.counters["round_trips_per_s"] = benchmark::Counter(
      static_cast<double>(rounds * state.iterations()), benchmark::Counter::kIsRate);
  state.counters["messages_per_s"] = benchmark::Counter(
      static_cast<double>(2 * rounds * state.iterations()), benchmark::Counter::kIsRate);
}
BENCHMARK(ping_pong)->Arg(200'000)->Unit(benchmark::kMillisecond)->UseRealTime();

/// Counts messages; tells `report` once `expected` have arrived.
caf::behavior sink(caf::event_based_actor* self, std::uint64_t expected, caf::actor report) {
  auto seen = std::make_shared<std::uint64_t>(0);
  return {[self, expected, report, seen](ping_atom, std::uint64_t) {
    if (++*seen == expected) {
      self->send(report, done_atom::value);
      self->quit();
    }
  }};
}

void fan_in(benchmark::State& state) {
  caf::actor_system_config config;
  caf::actor_system system(config);
  const auto senders = static_cast<std::uint64_t>(state.range(0));
  const std::uint64_t per_sender = 1'000'000 / senders;
  caf::scoped_actor self(system);
  for (auto _ : state) {
    auto target = system.spawn(sink, senders * per_sender, caf::actor{self});
    for (std::uint64_t s = 0; s < senders; ++s) {
      system.spawn([target, per_sender](caf::event_based_actor* sender) {
        for (std::uint64_t i = 0; i < per_sender; ++i) sender->send(target, ping_atom::value, i);
        sender->quit();
      });
    }
    self->receive([](done_atom) {});
  }
  state.counters["messages_per_s"] = benchmark::Counter(
      static_cast<double>(senders * per_sender * state.iterations()), benchmark::Counter::kIsRate);
}
BENCHMARK(fan_in)->Arg(1)->Arg(8)->Arg(64)->Unit(benchmark::kMillisecond)->UseRealTime();

}  // namespace

BENCHMARK_MAIN();
