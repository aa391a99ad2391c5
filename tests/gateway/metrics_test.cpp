// The Prometheus registry: the exact text exposition format for counters, gauges, callback gauges
// and histograms, label escaping, the series bound, and updates racing with scrapes.
#include "gateway/metrics.hpp"

#include <gtest/gtest.h>

#include <array>
#include <limits>
#include <thread>
#include <vector>

namespace gpustream::gateway {
namespace {

TEST(metrics, an_empty_registry_scrapes_as_nothing) {
  metrics_registry registry;
  EXPECT_EQ(registry.scrape(), "");
}

TEST(metrics, counters_with_labels_render_sorted_by_label_values) {
  metrics_registry registry;
  auto& requests = registry.add_counter("gpustream_requests_total", "Requests answered, by endpoint and status.",
                                        {"endpoint", "status"});
  requests.with({"chat", "200"}).increment();
  requests.with({"chat", "200"}).increment(2);
  requests.with({"chat", "429"}).increment();
  requests.with({"completions", "200"}).increment();
  EXPECT_EQ(registry.scrape(),
            "# HELP gpustream_requests_total Requests answered, by endpoint and status.\n"
            "# TYPE gpustream_requests_total counter\n"
            "gpustream_requests_total{endpoint=\"chat\",status=\"200\"} 3\n"
            "gpustream_requests_total{endpoint=\"chat\",status=\"429\"} 1\n"
            "gpustream_requests_total{endpoint=\"completions\",status=\"200\"} 1\n");
  EXPECT_EQ(requests.with({"chat", "200"}).value(), 3u);
  EXPECT_EQ(&requests.with({"chat", "200"}), &requests.with({"chat", "200"}));
}

TEST(metrics, families_without_labels_show_zero_from_the_start_and_keep_registration_order) {
  metrics_registry registry;
  auto& tokens = registry.add_counter("gpustream_tokens_total", "Completion tokens streamed.");
  auto& queued = registry.add_gauge("gpustream_queue_depth", "Jobs waiting for a provider.");
  // Registered and never updated: scraped as they are.
  (void)registry.add_counter("gpustream_failovers_total", "Jobs moved mid-answer.");
  (void)registry.add_gauge("gpustream_providers_online", "Providers by model.", {"model"});
  EXPECT_EQ(registry.scrape(),
            "# HELP gpustream_tokens_total Completion tokens streamed.\n"
            "# TYPE gpustream_tokens_total counter\n"
            "gpustream_tokens_total 0\n"
            "# HELP gpustream_queue_depth Jobs waiting for a provider.\n"
            "# TYPE gpustream_queue_depth gauge\n"
            "gpustream_queue_depth 0\n"
            "# HELP gpustream_failovers_total Jobs moved mid-answer.\n"
            "# TYPE gpustream_failovers_total counter\n"
            "gpustream_failovers_total 0\n"
            "# HELP gpustream_providers_online Providers by model.\n"
            "# TYPE gpustream_providers_online gauge\n");
  tokens.get().increment(18446744073709551615u);
  queued.get().set(7);
  queued.get().add(-2.5);
  const std::string text = registry.scrape();
  EXPECT_NE(text.find("gpustream_tokens_total 18446744073709551615\n"), std::string::npos) << text;
  EXPECT_NE(text.find("gpustream_queue_depth 4.5\n"), std::string::npos) << text;
}

TEST(metrics, gauge_callbacks_are_sampled_at_each_scrape) {
  metrics_registry registry;
  double providers = 3;
  registry.add_gauge_callback("gpustream_providers_online", "Providers with a live link.", [&] { return providers; });
  EXPECT_EQ(registry.scrape(),
            "# HELP gpustream_providers_online Providers with a live link.\n"
            "# TYPE gpustream_providers_online gauge\n"
            "gpustream_providers_online 3\n");
  providers = 0.25;
  EXPECT_NE(registry.scrape().find("gpustream_providers_online 0.25\n"), std::string::npos);
}

TEST(metrics, counter_callbacks_are_sampled_at_each_scrape_and_typed_as_counters) {
  metrics_registry registry;
  double writes = 12;
  registry.add_counter_callback("gpustream_http_writes_total", "Writes to clients.", [&] { return writes; });
  EXPECT_EQ(registry.scrape(),
            "# HELP gpustream_http_writes_total Writes to clients.\n"
            "# TYPE gpustream_http_writes_total counter\n"
            "gpustream_http_writes_total 12\n");
  writes = 40;
  EXPECT_NE(registry.scrape().find("gpustream_http_writes_total 40\n"), std::string::npos);
}

TEST(metrics, special_float_values_use_prometheus_spelling) {
  metrics_registry registry;
  auto& value = registry.add_gauge("g", "h");
  value.get().set(std::numeric_limits<double>::infinity());
  EXPECT_NE(registry.scrape().find("g +Inf\n"), std::string::npos);
  value.get().set(-std::numeric_limits<double>::infinity());
  EXPECT_NE(registry.scrape().find("g -Inf\n"), std::string::npos);
  value.get().set(std::numeric_limits<double>::quiet_NaN());
  EXPECT_NE(registry.scrape().find("g NaN\n"), std::string::npos);
  value.get().set(1e-7);
  EXPECT_NE(registry.scrape().find("g 1e-07\n"), std::string::npos);
  value.get().set(0.0005);  // plain decimals between 1e-6 and 1e15
  EXPECT_NE(registry.scrape().find("g 0.0005\n"), std::string::npos);
  value.get().set(123456.25);
  EXPECT_NE(registry.scrape().find("g 123456.25\n"), std::string::npos);
  value.get().set(2e15);
  EXPECT_NE(registry.scrape().find("g 2e+15\n"), std::string::npos);
}

TEST(metrics, ttft_histogram_renders_cumulative_buckets_sum_and_count_exactly) {
  metrics_registry registry;
  auto& ttft = registry.add_histogram("gpustream_ttft_seconds", "Time to first token.", ttft_buckets_seconds);
  auto& series = ttft.get();
  series.observe(0.0005);                                    // ≤ 0.0005
  series.observe(0.001);                                     // bounds are inclusive: ≤ 0.001
  series.observe(0.003);                                     // ≤ 0.005
  series.observe(0.75);                                      // ≤ 1
  series.observe(42);                                        // only +Inf
  series.observe(std::numeric_limits<double>::quiet_NaN());  // ignored
  EXPECT_EQ(registry.scrape(),
            "# HELP gpustream_ttft_seconds Time to first token.\n"
            "# TYPE gpustream_ttft_seconds histogram\n"
            "gpustream_ttft_seconds_bucket{le=\"0.00025\"} 0\n"
            "gpustream_ttft_seconds_bucket{le=\"0.0005\"} 1\n"
            "gpustream_ttft_seconds_bucket{le=\"0.001\"} 2\n"
            "gpustream_ttft_seconds_bucket{le=\"0.0025\"} 2\n"
            "gpustream_ttft_seconds_bucket{le=\"0.005\"} 3\n"
            "gpustream_ttft_seconds_bucket{le=\"0.01\"} 3\n"
            "gpustream_ttft_seconds_bucket{le=\"0.025\"} 3\n"
            "gpustream_ttft_seconds_bucket{le=\"0.05\"} 3\n"
            "gpustream_ttft_seconds_bucket{le=\"0.1\"} 3\n"
            "gpustream_ttft_seconds_bucket{le=\"0.25\"} 3\n"
            "gpustream_ttft_seconds_bucket{le=\"0.5\"} 3\n"
            "gpustream_ttft_seconds_bucket{le=\"1\"} 4\n"
            "gpustream_ttft_seconds_bucket{le=\"2.5\"} 4\n"
            "gpustream_ttft_seconds_bucket{le=\"5\"} 4\n"
            "gpustream_ttft_seconds_bucket{le=\"10\"} 4\n"
            "gpustream_ttft_seconds_bucket{le=\"+Inf\"} 5\n"
            "gpustream_ttft_seconds_sum 42.7545\n"
            "gpustream_ttft_seconds_count 5\n");
}

TEST(metrics, labelled_histograms_put_le_last) {
  metrics_registry registry;
  const std::array<double, 2> bounds{0.5, 1};
  auto& latency = registry.add_histogram("latency_seconds", "Latency.", bounds, {"model"});
  latency.with({"m"}).observe(0.75);
  EXPECT_EQ(registry.scrape(),
            "# HELP latency_seconds Latency.\n"
            "# TYPE latency_seconds histogram\n"
            "latency_seconds_bucket{model=\"m\",le=\"0.5\"} 0\n"
            "latency_seconds_bucket{model=\"m\",le=\"1\"} 1\n"
            "latency_seconds_bucket{model=\"m\",le=\"+Inf\"} 1\n"
            "latency_seconds_sum{model=\"m\"} 0.75\n"
            "latency_seconds_count{model=\"m\"} 1\n");
}

TEST(metrics, label_values_and_help_are_escaped) {
  metrics_registry registry;
  auto& family = registry.add_counter("c_total", "Line one\nback\\slash \"quoted\"", {"path"});
  family.with({"a\"b\\c\nd"}).increment();
  EXPECT_EQ(registry.scrape(),
            "# HELP c_total Line one\\nback\\\\slash \"quoted\"\n"
            "# TYPE c_total counter\n"
            "c_total{path=\"a\\\"b\\\\c\\nd\"} 1\n");
}

TEST(metrics, series_beyond_series_max_share_one_other_series) {
  metrics_registry registry(metrics_options{2});
  auto& family = registry.add_counter("c_total", "h", {"a", "b"});
  family.with({"1", "x"}).increment();
  family.with({"2", "x"}).increment();
  family.with({"3", "x"}).increment();
  family.with({"4", "y"}).increment(5);
  family.with({"1", "x"}).increment();  // existing series still count on their own
  EXPECT_EQ(registry.scrape(),
            "# HELP c_total h\n"
            "# TYPE c_total counter\n"
            "c_total{a=\"1\",b=\"x\"} 2\n"
            "c_total{a=\"2\",b=\"x\"} 1\n"
            "c_total{a=\"_other\",b=\"_other\"} 6\n");
}

TEST(metrics, updates_from_many_threads_all_count_while_scrapes_run) {
  metrics_registry registry;
  auto& requests = registry.add_counter("requests_total", "h", {"endpoint"});
  auto& ttft = registry.add_histogram("ttft_seconds", "h", ttft_buckets_seconds);
  auto& depth = registry.add_gauge("depth", "h");
  constexpr int threads_count = 4;
  constexpr int per_thread = 20000;
  std::vector<std::thread> threads;
  for (int t = 0; t < threads_count; ++t) {
    threads.emplace_back([&] {
      counter& mine = requests.with({"chat"});
      histogram& series = ttft.get();
      gauge& level = depth.get();
      for (int i = 0; i < per_thread; ++i) {
        mine.increment();
        series.observe(0.5);
        level.add(1);
      }
    });
  }
  // Scrapes while they count see counts that only grow, never past what is counted in all.
  const std::uint64_t observations_total = std::uint64_t{threads_count} * per_thread;
  std::uint64_t seen = 0;
  std::size_t scrapes = 0;
  for (; scrapes < 20; ++scrapes) {
    const auto snapshot = ttft.get().read();
    EXPECT_GE(snapshot.count, seen);
    EXPECT_LE(snapshot.count, observations_total);
    seen = snapshot.count;
    EXPECT_FALSE(registry.scrape().empty());
  }
  for (auto& thread : threads) thread.join();
  const std::uint64_t total = threads_count * per_thread;
  EXPECT_EQ(requests.with({"chat"}).value(), total);
  const auto snapshot = ttft.get().read();
  EXPECT_EQ(snapshot.count, total);
  EXPECT_EQ(snapshot.sum, 0.5 * static_cast<double>(total));
  EXPECT_EQ(depth.get().value(), static_cast<double>(total));
}

}  // namespace
}  // namespace gpustream::gateway
