// The ad auction (domain::run_auction) for a free-tier answer: every cached campaign is scored
// against the prompt's words. Campaigns carry keywords and categories none of the prompt's words
// match (the usual case, and the most work: nothing stops a scan early); the prompt is the most
// the auction reads (prompt_bytes_max, 16 KiB) of distinct words, some in the category table.
//
//   ./build/bench/auction_bench --benchmark_repetitions=3 --benchmark_report_aggregates_only=true

#include <benchmark/benchmark.h>

#include <string>
#include <vector>

#include "domain/auction.hpp"

namespace {

using namespace gpustream;

std::vector<domain::campaign_state> campaigns(std::size_t count, std::size_t categories) {
  std::vector<domain::campaign_state> out(count);
  for (std::size_t i = 0; i < count; ++i) {
    auto& c = out[i];
    c.created = true;
    c.campaign_id = "c" + std::to_string(i);
    c.cpm_bid_micros = 2'000'000;
    c.keywords = {"keyword" + std::to_string(i)};
    for (std::size_t k = 0; k < categories; ++k) c.categories.push_back("category" + std::to_string(k));
  }
  return out;
}

/// `bytes_max` bytes of distinct words, every tenth one a word the category table knows.
std::string prompt(std::size_t bytes_max) {
  const char* known[] = {"gpu", "travel", "recipes", "stocks", "python"};
  std::string text;
  for (std::size_t i = 0; text.size() < bytes_max; ++i) {
    text += i % 10 == 0 ? std::string(known[(i / 10) % 5]) : "word" + std::to_string(i);
    text += ' ';
  }
  text.resize(bytes_max);
  return text;
}

void auction(benchmark::State& state) {
  const auto all = campaigns(static_cast<std::size_t>(state.range(0)), static_cast<std::size_t>(state.range(1)));
  const domain::auction_options options;
  const auto text = prompt(options.prompt_bytes_max);
  for (auto _ : state) {
    auto choice = domain::run_auction(all, text, "u1", 1'700'000'000'000'000, options);
    benchmark::DoNotOptimize(choice);
  }
  state.counters["campaigns"] = static_cast<double>(state.range(0));
}

}  // namespace

BENCHMARK(auction)->Args({100, 3})->Args({1'000, 3})->Args({10'000, 3})->Unit(benchmark::kMillisecond);

BENCHMARK_MAIN();
