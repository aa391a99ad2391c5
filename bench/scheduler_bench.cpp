// Provider selection with 10,000 online providers: p50/p99 of one selection per policy, against a
// plain scan of every provider as the baseline, plus index updates and queue passes. Before timing,
// the index's choices are checked against the scan. The goal: p50 <= 10 us, p99 <= 50 us.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "domain/job_queue.hpp"
#include "domain/priority.hpp"
#include "domain/selection.hpp"

namespace {

using namespace gpustream;
using namespace gpustream::domain;
using clock_type = std::chrono::steady_clock;

constexpr std::size_t providers_online = 10'000;
constexpr std::size_t model_count = 20;
constexpr double goal_p50_us = 10.0;
constexpr double goal_p99_us = 50.0;

std::string model_name(std::size_t i) { return "model-" + std::to_string(i); }

/// A model drawn with Zipf-like popularity: model-0 is the most requested and the most offered.
std::size_t popular_model(std::mt19937_64& rng) {
  static const std::vector<double> weights = [] {
    std::vector<double> w;
    for (std::size_t i = 0; i < model_count; ++i) w.push_back(1.0 / static_cast<double>(i + 1));
    return w;
  }();
  std::discrete_distribution<std::size_t> pick(weights.begin(), weights.end());
  return pick(rng);
}

/// 10,000 providers, 1-3 models each, scores spread over every level, varied slots, load,
/// health and measured speed; about 10% overloaded, 1% suspended, a third of slots in use.
struct fleet {
  std::mt19937_64 rng{42};
  selection_index index;
  std::vector<std::string> ids;

  fleet() {
    for (std::size_t i = 0; i < providers_online; ++i) {
      ids.push_back("provider-" + std::to_string(i));
      std::vector<listed_offer> offers;
      const std::size_t models = 1 + rng() % 3;
      for (std::size_t m = 0; m < models; ++m) {
        const auto name = model_name(popular_model(rng));
        if (std::any_of(offers.begin(), offers.end(),
                        [&](const listed_offer& o) { return o.model_name == name; })) {
          continue;
        }
        offers.push_back({name, static_cast<std::int64_t>(50'000 + rng() % 200'000),
                          static_cast<std::int64_t>(100'000 + rng() % 600'000),
                          static_cast<std::uint32_t>(1 + rng() % 8)});
      }
      const std::int64_t scores[] = {0, 50, 150, 700, 2'000, 5'000, 12'000};
      const auto score = scores[std::min<std::size_t>(rng() % 10, 6)];
      const bool suspended = rng() % 100 == 0;
      if (!index.list({ids.back(), level_for_score(score), score, suspended, offers})) std::abort();
      for (const auto& o : offers) {
        if (rng() % 4 != 0) {
          (void)index.record_speed(ids.back(), o.model_name,
                                   static_cast<std::int64_t>(100'000 + rng() % 900'000),
                                   static_cast<std::int64_t>(10 + rng() % 150));
        }
      }
      churn_load(ids.back());
      const auto* p = index.find(ids.back());
      for (std::uint32_t j = 0; j < p->concurrency_max / 3; ++j) (void)index.job_started(ids.back());
    }
  }

  void churn_load(const std::string& id) {
    const bool overloaded = rng() % 10 == 0;
    const auto load = static_cast<std::uint32_t>(overloaded ? 80 + rng() % 21 : rng() % 80);
    (void)index.report_load(id, {load, static_cast<std::uint32_t>(40 + rng() % 61)});
  }

  selection_request random_request(selection_policy policy, const std::string& model) {
    selection_request r;
    r.model = model;
    const auto q = rng() % 10;  // mostly low and standard
    r.quality = q < 5 ? events::quality_tier::low
                : q < 8 ? events::quality_tier::standard
                : q < 9 ? events::quality_tier::high
                        : events::quality_tier::ultra;
    r.policy = policy;
    r.random_draw = rng();
    return r;
  }

  /// Between two selections: the chosen provider starts a job, another one finishes, a third
  /// reports its load. Untimed; keeps the index moving as in production.
  void churn(std::optional<std::string_view> chosen) {
    if (chosen) (void)index.job_started(*chosen);
    (void)index.job_finished(ids[rng() % ids.size()]);
    churn_load(ids[rng() % ids.size()]);
  }
};

fleet& shared_fleet() {
  static fleet f;
  return f;
}

/// The plain scan: every provider, the rules as written. The baseline, and the check.
std::optional<std::string> scan(const selection_index& index, const selection_request& r) {
  const auto& options = index.options();
  const auto level_min = options.quality_level_min[static_cast<std::size_t>(r.quality)];
  using key = std::tuple<bool, std::int64_t, std::int64_t, std::string_view>;
  std::optional<key> best;
  for (auto id : index.provider_ids()) {
    const auto* p = index.find(id);
    if (!accepts_work(*p, options) || p->level < level_min) continue;
    const auto offer = std::find_if(p->offers.begin(), p->offers.end(),
                                    [&](const online_offer& o) { return o.model_name == r.model; });
    if (offer == p->offers.end()) continue;
    key k;
    switch (r.policy) {
      case selection_policy::cheapest:
        k = {false, price_key(*offer), -availability_bp(*p), id};
        break;
      case selection_policy::fastest:
        k = {false, estimated_us(*offer, options), price_key(*offer), id};
        break;
      default: {
        const bool idle = is_idle(*p, options);
        k = idle ? key{false, -static_cast<std::int64_t>(p->health_percent), price_key(*offer), id}
                 : key{true, -qmesh_weight(*p, options), price_key(*offer), id};
      }
    }
    if (!best || k < *best) best = k;
  }
  if (!best) return std::nullopt;
  return std::string(std::get<3>(*best));
}

void check_against_scan(fleet& f) {
  for (auto policy : {selection_policy::qmesh, selection_policy::cheapest, selection_policy::fastest}) {
    for (int i = 0; i < 300; ++i) {
      const auto model = model_name(popular_model(f.rng));
      const auto r = f.random_request(policy, model);
      const auto chosen = f.index.select(r);
      const auto expected = scan(f.index, r);
      if (chosen.has_value() != expected.has_value() || (chosen && *chosen != *expected)) {
        std::fprintf(stderr, "index and scan disagree (policy %s, %s): %s vs %s\n",
                     std::string(to_string(policy)).c_str(), model.c_str(),
                     chosen ? std::string(*chosen).c_str() : "none",
                     expected ? expected->c_str() : "none");
        std::abort();
      }
      f.churn(chosen);
    }
  }
}

void report_percentiles(benchmark::State& state, std::vector<double>& samples_us, bool with_goal) {
  if (samples_us.empty()) return;
  std::sort(samples_us.begin(), samples_us.end());
  const double p50 = samples_us[samples_us.size() / 2];
  const double p99 = samples_us[samples_us.size() * 99 / 100];
  state.counters["p50_us"] = p50;
  state.counters["p99_us"] = p99;
  state.counters["max_us"] = samples_us.back();
  if (with_goal) state.counters["goal_met"] = (p50 <= goal_p50_us && p99 <= goal_p99_us) ? 1 : 0;
}

void select_one(benchmark::State& state) {
  auto& f = shared_fleet();
  static const bool checked = (check_against_scan(f), true);
  (void)checked;
  const auto policy = static_cast<selection_policy>(state.range(0));
  std::vector<double> samples_us;
  std::size_t found = 0;
  for (auto _ : state) {
    state.PauseTiming();
    const auto model = model_name(popular_model(f.rng));
    const auto request = f.random_request(policy, model);
    state.ResumeTiming();
    const auto start = clock_type::now();
    const auto chosen = f.index.select(request);
    const auto stop = clock_type::now();
    benchmark::DoNotOptimize(chosen);
    state.PauseTiming();
    samples_us.push_back(std::chrono::duration<double, std::micro>(stop - start).count());
    found += chosen.has_value();
    f.churn(chosen);
    state.ResumeTiming();
  }
  state.SetLabel(std::string(to_string(policy)));
  state.counters["found_percent"] = 100.0 * static_cast<double>(found) /
                                    static_cast<double>(std::max<std::size_t>(1, samples_us.size()));
  report_percentiles(state, samples_us, true);
}
BENCHMARK(select_one)->DenseRange(0, 3)->Unit(benchmark::kMicrosecond)->Iterations(50'000);

void select_by_scan(benchmark::State& state) {
  auto& f = shared_fleet();
  std::vector<double> samples_us;
  for (auto _ : state) {
    state.PauseTiming();
    const auto model = model_name(popular_model(f.rng));
    const auto request = f.random_request(selection_policy::qmesh, model);
    state.ResumeTiming();
    const auto start = clock_type::now();
    const auto chosen = scan(f.index, request);
    const auto stop = clock_type::now();
    benchmark::DoNotOptimize(chosen);
    state.PauseTiming();
    samples_us.push_back(std::chrono::duration<double, std::micro>(stop - start).count());
    f.churn(chosen ? std::optional<std::string_view>(*chosen) : std::nullopt);
    state.ResumeTiming();
  }
  state.SetLabel("baseline: plain scan, qmesh");
  report_percentiles(state, samples_us, false);
}
BENCHMARK(select_by_scan)->Unit(benchmark::kMicrosecond)->Iterations(500);

/// One index update (job started or finished, heartbeat), as the scheduler does them.
void update_one(benchmark::State& state) {
  auto& f = shared_fleet();
  std::vector<double> samples_us;
  std::uint64_t n = 0;
  for (auto _ : state) {
    state.PauseTiming();
    const auto& id = f.ids[f.rng() % f.ids.size()];
    const load_report report{static_cast<std::uint32_t>(f.rng() % 100),
                             static_cast<std::uint32_t>(40 + f.rng() % 61)};
    state.ResumeTiming();
    const auto start = clock_type::now();
    switch (n++ % 3) {
      case 0: (void)f.index.job_started(id); break;
      case 1: (void)f.index.job_finished(id); break;
      default: (void)f.index.report_load(id, report); break;
    }
    const auto stop = clock_type::now();
    state.PauseTiming();
    samples_us.push_back(std::chrono::duration<double, std::micro>(stop - start).count());
    state.ResumeTiming();
  }
  report_percentiles(state, samples_us, false);
}
BENCHMARK(update_one)->Unit(benchmark::kMicrosecond)->Iterations(50'000);

/// A queue pass over 2,000 waiting jobs of every model and tier, with the fleet's free slots.
void queue_pass(benchmark::State& state) {
  auto& f = shared_fleet();
  std::vector<double> samples_us;
  std::size_t assigned_total = 0;
  std::int64_t now = 1'700'000'000'000'000;
  for (auto _ : state) {
    state.PauseTiming();
    job_queue queue;
    for (int i = 0; i < 2'000; ++i) {
      queued_job j{"job-" + std::to_string(i), model_name(popular_model(f.rng)),
                   static_cast<events::quality_tier>(f.rng() % 4),
                   priority_for(f.rng() % 5 == 0, static_cast<contribution_tier>(f.rng() % 7)),
                   now, now + 60'000'000, "", ""};
      (void)queue.push(std::move(j), f.index, now);  // an unservable job is simply left out
    }
    state.ResumeTiming();
    const auto start = clock_type::now();
    const auto assigned = queue.pop_assignable(f.index, {selection_policy::qmesh, f.rng()}, now);
    const auto stop = clock_type::now();
    state.PauseTiming();
    samples_us.push_back(std::chrono::duration<double, std::micro>(stop - start).count());
    assigned_total += assigned.size();
    for (const auto& a : assigned) (void)f.index.job_finished(a.provider_id);
    now += 1'000;
    state.ResumeTiming();
  }
  state.counters["assigned_per_pass"] =
      static_cast<double>(assigned_total) / static_cast<double>(std::max<std::size_t>(1, samples_us.size()));
  report_percentiles(state, samples_us, false);
}
BENCHMARK(queue_pass)->Unit(benchmark::kMicrosecond)->Iterations(50);

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  std::printf("scheduler_bench: %zu providers online, %zu models; goal per selection: p50 <= %.0f us, "
              "p99 <= %.0f us (select_one: 0 qmesh, 1 cheapest, 2 fastest, 3 p2c)\n",
              providers_online, model_count, goal_p50_us, goal_p99_us);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
