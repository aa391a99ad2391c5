#include "gateway/metrics.hpp"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <variant>

#include "base/ensure.hpp"

namespace gpustream::gateway {

namespace {

/// Prometheus float text: "+Inf", "-Inf", "NaN", or the shortest text that reads back exactly,
/// in plain decimals between 1e-6 and 1e15 (bucket bounds read "0.0005", not "5e-04").
void append_number(std::string& out, double value) {
  if (std::isnan(value)) {
    out += "NaN";
  } else if (std::isinf(value)) {
    out += value > 0 ? "+Inf" : "-Inf";
  } else {
    std::array<char, 64> text{};
    const double magnitude = std::fabs(value);
    const auto format = magnitude == 0 || (magnitude >= 1e-6 && magnitude < 1e15) ? std::chars_format::fixed
                                                                                  : std::chars_format::general;
    const auto written = std::to_chars(text.data(), text.data() + text.size(), value, format);
    out.append(text.data(), written.ptr);
  }
}

void append_number(std::string& out, std::uint64_t value) {
  out += std::to_string(value);
}

/// Label values escape backslash, double quote and line feed; HELP text backslash and line feed.
void append_escaped(std::string& out, std::string_view text, bool quote) {
  for (const char c : text) {
    if (c == '\\') {
      out += "\\\\";
    } else if (c == '\n') {
      out += "\\n";
    } else if (quote && c == '"') {
      out += "\\\"";
    } else {
      out += c;
    }
  }
}

/// `{a="x",b="y"}` (or nothing when there are no labels), with an optional trailing `le`.
void append_labels(std::string& out, const std::vector<std::string>& names, const std::vector<std::string>& values,
                   std::string_view le = {}) {
  if (names.empty() && le.empty()) return;
  out += '{';
  for (std::size_t i = 0; i < names.size(); ++i) {
    if (i > 0) out += ',';
    out += names[i];
    out += "=\"";
    append_escaped(out, values[i], true);
    out += '"';
  }
  if (!le.empty()) {
    if (!names.empty()) out += ',';
    out += "le=\"";
    out += le;
    out += '"';
  }
  out += '}';
}

void append_header(std::string& out, std::string_view name, std::string_view help, std::string_view type) {
  out += "# HELP ";
  out += name;
  out += ' ';
  append_escaped(out, help, false);
  out += "\n# TYPE ";
  out += name;
  out += ' ';
  out += type;
  out += '\n';
}

bool valid_name(std::string_view name, bool allow_colon) {
  if (name.empty()) return false;
  auto letter = [](char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_'; };
  for (std::size_t i = 0; i < name.size(); ++i) {
    const char c = name[i];
    const bool ok = letter(c) || (allow_colon && c == ':') || (i > 0 && c >= '0' && c <= '9');
    if (!ok) return false;
  }
  return true;
}

template <class Metric>
constexpr std::string_view type_name() {
  if constexpr (std::is_same_v<Metric, counter>) return "counter";
  if constexpr (std::is_same_v<Metric, gauge>) return "gauge";
  if constexpr (std::is_same_v<Metric, histogram>) return "histogram";
}

void render_series(std::string& out, const std::string& name, const std::vector<std::string>& label_names,
                   const std::vector<std::string>& values, const counter& metric) {
  out += name;
  append_labels(out, label_names, values);
  out += ' ';
  append_number(out, metric.value());
  out += '\n';
}

void render_series(std::string& out, const std::string& name, const std::vector<std::string>& label_names,
                   const std::vector<std::string>& values, const gauge& metric) {
  out += name;
  append_labels(out, label_names, values);
  out += ' ';
  append_number(out, metric.value());
  out += '\n';
}

void render_series(std::string& out, const std::string& name, const std::vector<std::string>& label_names,
                   const std::vector<std::string>& values, const histogram& metric) {
  const histogram::snapshot snapshot = metric.read();
  const auto bounds = metric.upper_bounds();
  for (std::size_t i = 0; i <= bounds.size(); ++i) {
    std::string le;
    if (i < bounds.size()) {
      append_number(le, bounds[i]);
    } else {
      le = "+Inf";
    }
    out += name;
    out += "_bucket";
    append_labels(out, label_names, values, le);
    out += ' ';
    append_number(out, snapshot.cumulative[i]);
    out += '\n';
  }
  out += name;
  out += "_sum";
  append_labels(out, label_names, values);
  out += ' ';
  append_number(out, snapshot.sum);
  out += '\n';
  out += name;
  out += "_count";
  append_labels(out, label_names, values);
  out += ' ';
  append_number(out, snapshot.count);
  out += '\n';
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// histogram

histogram::histogram(std::span<const double> upper_bounds)
    : bounds_(upper_bounds.begin(), upper_bounds.end()),
      buckets_(std::make_unique<std::atomic<std::uint64_t>[]>(bounds_.size() + 1)) {
  for (std::size_t i = 0; i < bounds_.size(); ++i) {
    GPUSTREAM_ENSURE(std::isfinite(bounds_[i]));
    GPUSTREAM_ENSURE(i == 0 || bounds_[i - 1] < bounds_[i]);
  }
}

void histogram::observe(double value) noexcept {
  if (std::isnan(value)) return;
  const auto bucket = std::lower_bound(bounds_.begin(), bounds_.end(), value) - bounds_.begin();
  buckets_[static_cast<std::size_t>(bucket)].fetch_add(1, std::memory_order_relaxed);
  sum_.fetch_add(value, std::memory_order_relaxed);
}

histogram::snapshot histogram::read() const {
  snapshot result;
  result.cumulative.reserve(bounds_.size() + 1);
  std::uint64_t total = 0;
  for (std::size_t i = 0; i <= bounds_.size(); ++i) {
    total += buckets_[i].load(std::memory_order_relaxed);
    result.cumulative.push_back(total);
  }
  result.count = total;
  result.sum = sum_.load(std::memory_order_relaxed);
  return result;
}

// ---------------------------------------------------------------------------------------------
// metric_family

template <class Metric>
metric_family<Metric>::metric_family(std::string name, std::string help, std::vector<std::string> label_names,
                                     std::vector<double> upper_bounds, std::size_t series_max)
    : name_(std::move(name)),
      help_(std::move(help)),
      label_names_(std::move(label_names)),
      upper_bounds_(std::move(upper_bounds)),
      series_max_(series_max) {
  if (label_names_.empty()) series_.emplace(std::vector<std::string>{}, make());
}

template <class Metric>
std::unique_ptr<Metric> metric_family<Metric>::make() const {
  if constexpr (std::is_same_v<Metric, histogram>) {
    return std::make_unique<histogram>(upper_bounds_);
  } else {
    return std::make_unique<Metric>();
  }
}

template <class Metric>
Metric& metric_family<Metric>::with(std::span<const std::string_view> label_values) {
  // The wrong number of label values is a bug in the caller, not an input to validate.
  GPUSTREAM_ENSURE(label_values.size() == label_names_.size());
  std::vector<std::string> key(label_values.begin(), label_values.end());
  std::lock_guard lock(mutex_);
  if (auto found = series_.find(key); found != series_.end()) return *found->second;
  if (series_.size() >= series_max_) {
    key.assign(label_names_.size(), "_other");
    if (auto found = series_.find(key); found != series_.end()) return *found->second;
  }
  return *series_.emplace(std::move(key), make()).first->second;
}

template <class Metric>
void metric_family<Metric>::render(std::string& out) const {
  append_header(out, name_, help_, type_name<Metric>());
  std::lock_guard lock(mutex_);
  for (const auto& [values, metric] : series_) render_series(out, name_, label_names_, values, *metric);
}

template class metric_family<counter>;
template class metric_family<gauge>;
template class metric_family<histogram>;

// ---------------------------------------------------------------------------------------------
// metrics_registry

struct metrics_registry::entry {
  /// A series without labels whose value is read at each scrape.
  struct callback_metric {
    std::string name;
    std::string help;
    std::string_view type;  ///< "gauge" or "counter"
    std::function<double()> sample;
  };
  std::variant<std::unique_ptr<counter_family>, std::unique_ptr<gauge_family>, std::unique_ptr<histogram_family>,
               callback_metric>
      metric;

  [[nodiscard]] std::string_view name() const {
    return std::visit(
        [](const auto& value) -> std::string_view {
          if constexpr (std::is_same_v<std::decay_t<decltype(value)>, callback_metric>) {
            return value.name;
          } else {
            return value->name();
          }
        },
        metric);
  }
};

metrics_registry::metrics_registry(metrics_options options) : options_(options) {
  GPUSTREAM_ENSURE(options_.series_max >= 1);
}

metrics_registry::~metrics_registry() = default;

void metrics_registry::check_new_name(const std::string& name, const std::vector<std::string>& label_names,
                                      bool histogram) const {
  GPUSTREAM_ENSURE(valid_name(name, true));
  for (const auto& label : label_names) {
    GPUSTREAM_ENSURE(valid_name(label, false));
    GPUSTREAM_ENSURE(!label.starts_with("__"));
    GPUSTREAM_ENSURE(!(histogram && label == "le"));
  }
  for (const auto& existing : entries_) GPUSTREAM_ENSURE(existing->name() != name);
}

counter_family& metrics_registry::add_counter(std::string name, std::string help,
                                              std::vector<std::string> label_names) {
  std::lock_guard lock(mutex_);
  check_new_name(name, label_names, false);
  auto family = std::unique_ptr<counter_family>(
      new counter_family(std::move(name), std::move(help), std::move(label_names), {}, options_.series_max));
  counter_family& result = *family;
  entries_.push_back(std::make_unique<entry>(entry{std::move(family)}));
  return result;
}

gauge_family& metrics_registry::add_gauge(std::string name, std::string help, std::vector<std::string> label_names) {
  std::lock_guard lock(mutex_);
  check_new_name(name, label_names, false);
  auto family = std::unique_ptr<gauge_family>(
      new gauge_family(std::move(name), std::move(help), std::move(label_names), {}, options_.series_max));
  gauge_family& result = *family;
  entries_.push_back(std::make_unique<entry>(entry{std::move(family)}));
  return result;
}

void metrics_registry::add_gauge_callback(std::string name, std::string help, std::function<double()> sample) {
  add_callback(std::move(name), std::move(help), "gauge", std::move(sample));
}

void metrics_registry::add_counter_callback(std::string name, std::string help, std::function<double()> sample) {
  add_callback(std::move(name), std::move(help), "counter", std::move(sample));
}

void metrics_registry::add_callback(std::string name, std::string help, std::string_view type,
                                    std::function<double()> sample) {
  GPUSTREAM_ENSURE(sample != nullptr);
  std::lock_guard lock(mutex_);
  check_new_name(name, {}, false);
  entries_.push_back(std::make_unique<entry>(
      entry{entry::callback_metric{std::move(name), std::move(help), type, std::move(sample)}}));
}

histogram_family& metrics_registry::add_histogram(std::string name, std::string help,
                                                  std::span<const double> upper_bounds,
                                                  std::vector<std::string> label_names) {
  for (std::size_t i = 0; i < upper_bounds.size(); ++i) {
    GPUSTREAM_ENSURE(std::isfinite(upper_bounds[i]));
    GPUSTREAM_ENSURE(i == 0 || upper_bounds[i - 1] < upper_bounds[i]);
  }
  std::lock_guard lock(mutex_);
  check_new_name(name, label_names, true);
  auto family = std::unique_ptr<histogram_family>(
      new histogram_family(std::move(name), std::move(help), std::move(label_names),
                           std::vector<double>(upper_bounds.begin(), upper_bounds.end()), options_.series_max));
  histogram_family& result = *family;
  entries_.push_back(std::make_unique<entry>(entry{std::move(family)}));
  return result;
}

std::string metrics_registry::scrape() const {
  std::string out;
  std::lock_guard lock(mutex_);
  for (const auto& item : entries_) {
    std::visit(
        [&out](const auto& value) {
          if constexpr (std::is_same_v<std::decay_t<decltype(value)>, entry::callback_metric>) {
            append_header(out, value.name, value.help, value.type);
            out += value.name;
            out += ' ';
            append_number(out, value.sample());
            out += '\n';
          } else {
            value->render(out);
          }
        },
        item->metric);
  }
  return out;
}

}  // namespace gpustream::gateway
