#pragma once
/// A small Prometheus registry with no global state: counters, gauges (set, or sampled from a
/// callback at scrape time) and histograms with fixed buckets, each in a family with a fixed list
/// of label names. Updating a series is one relaxed atomic operation; finding a series by its
/// label values takes the family's lock, so hot paths look a series up once and keep the
/// reference. scrape() renders the text exposition format 0.0.4.

#include <array>
#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace gpustream::gateway {

/// Upper bounds for time-to-first-token histograms, seconds (250 µs … 10 s: what the gateway adds
/// is a fraction of a millisecond when idle).
inline constexpr std::array<double, 15> ttft_buckets_seconds{0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                                                             0.1,     0.25,   0.5,   1,      2.5,   5,    10};

/// A count that only goes up.
class counter {
 public:
  void increment(std::uint64_t by = 1) noexcept { value_.fetch_add(by, std::memory_order_relaxed); }
  [[nodiscard]] std::uint64_t value() const noexcept { return value_.load(std::memory_order_relaxed); }

 private:
  std::atomic<std::uint64_t> value_{0};
};

/// A value that goes up and down.
class gauge {
 public:
  void set(double value) noexcept { value_.store(value, std::memory_order_relaxed); }
  void add(double delta) noexcept { value_.fetch_add(delta, std::memory_order_relaxed); }
  [[nodiscard]] double value() const noexcept { return value_.load(std::memory_order_relaxed); }

 private:
  std::atomic<double> value_{0};
};

/// Observations counted into fixed buckets (upper bounds inclusive), with their sum and count.
class histogram {
 public:
  /// `upper_bounds` strictly increasing and finite; +Inf is implied.
  explicit histogram(std::span<const double> upper_bounds);

  /// Counts `value` in the first bucket whose bound is ≥ value. NaN is ignored.
  void observe(double value) noexcept;

  struct snapshot {
    std::vector<std::uint64_t> cumulative;  ///< per bound, then +Inf; each includes the ones before
    std::uint64_t count = 0;                ///< equals cumulative.back()
    double sum = 0;
  };
  /// A view for rendering; count and +Inf agree even while observations race with it.
  [[nodiscard]] snapshot read() const;

  [[nodiscard]] std::span<const double> upper_bounds() const noexcept { return bounds_; }

 private:
  std::vector<double> bounds_;
  std::unique_ptr<std::atomic<std::uint64_t>[]> buckets_;  // bounds_.size() + 1, not cumulative
  std::atomic<double> sum_{0};
};

struct metrics_options {
  /// Most label-value combinations per family. Further combinations all land in one series whose
  /// label values are all "_other", so a caller passing unbounded values (say, raw paths) cannot
  /// grow memory or the scrape without bound. Default: 1000.
  std::size_t series_max = 1000;
};

/// The series of one metric name, one per combination of label values.
template <class Metric>
class metric_family {
 public:
  /// The series for `label_values` (one per label name, in order), created on first use. The
  /// reference stays valid as long as the registry. Takes a lock: on hot paths keep the result.
  [[nodiscard]] Metric& with(std::initializer_list<std::string_view> label_values) {
    return with(std::span<const std::string_view>(label_values.begin(), label_values.size()));
  }
  [[nodiscard]] Metric& with(std::span<const std::string_view> label_values);

  /// The series without labels (for a family registered with no label names).
  [[nodiscard]] Metric& get() { return with(std::span<const std::string_view>{}); }

  [[nodiscard]] const std::string& name() const noexcept { return name_; }

 private:
  friend class metrics_registry;
  metric_family(std::string name, std::string help, std::vector<std::string> label_names,
                std::vector<double> upper_bounds, std::size_t series_max);
  std::unique_ptr<Metric> make() const;
  void render(std::string& out) const;

  std::string name_;
  std::string help_;
  std::vector<std::string> label_names_;
  std::vector<double> upper_bounds_;  // histograms only
  std::size_t series_max_;
  mutable std::mutex mutex_;
  std::map<std::vector<std::string>, std::unique_ptr<Metric>> series_;  // sorted: a stable scrape
};

using counter_family = metric_family<counter>;
using gauge_family = metric_family<gauge>;
using histogram_family = metric_family<histogram>;

class metrics_registry {
 public:
  explicit metrics_registry(metrics_options options = {});
  ~metrics_registry();
  metrics_registry(const metrics_registry&) = delete;
  metrics_registry& operator=(const metrics_registry&) = delete;

  // Registration. Names follow Prometheus' rules ([a-zA-Z_:][a-zA-Z0-9_:]*, labels without ':' and
  // not starting with "__", "le" reserved) and are unique in the registry; breaking them is a bug.
  // A family without label names has its one series from the start, so it is scraped as 0.

  [[nodiscard]] counter_family& add_counter(std::string name, std::string help,
                                            std::vector<std::string> label_names = {});
  [[nodiscard]] gauge_family& add_gauge(std::string name, std::string help, std::vector<std::string> label_names = {});
  /// A gauge without labels whose value is `sample()` at each scrape. `sample` runs on the
  /// scraping thread under the registry's lock: it must be quick and must not use the registry.
  void add_gauge_callback(std::string name, std::string help, std::function<double()> sample);
  /// The same for a counter: `sample()` must never decrease.
  void add_counter_callback(std::string name, std::string help, std::function<double()> sample);
  [[nodiscard]] histogram_family& add_histogram(std::string name, std::string help,
                                                std::span<const double> upper_bounds,
                                                std::vector<std::string> label_names = {});

  /// Every family in registration order, in the text exposition format 0.0.4
  /// (Content-Type: text/plain; version=0.0.4).
  [[nodiscard]] std::string scrape() const;

 private:
  struct entry;
  void add_callback(std::string name, std::string help, std::string_view type, std::function<double()> sample);
  void check_new_name(const std::string& name, const std::vector<std::string>& label_names, bool histogram) const;

  metrics_options options_;
  mutable std::mutex mutex_;
  std::vector<std::unique_ptr<entry>> entries_;
};

/// The content type of scrape()'s text.
inline constexpr std::string_view metrics_content_type = "text/plain; version=0.0.4; charset=utf-8";

extern template class metric_family<counter>;
extern template class metric_family<gauge>;
extern template class metric_family<histogram>;

}  // namespace gpustream::gateway
