#include "gateway/backend_context.hpp"

#include <boost/json.hpp>

#include <algorithm>
#include <limits>
#include <memory>
#include <string>
#include <utility>

namespace gpustream::gateway {
namespace {

namespace json = boost::json;

std::optional<json::object> parse_object(std::string_view body) {
  boost::system::error_code ec;
  json::parse_options options;
  options.max_depth = backend_answer_depth_max;
  auto value = json::parse(body, ec, {}, options);
  if (ec || !value.is_object()) return std::nullopt;
  return std::move(value.as_object());
}

/// A positive integer that fits a uint32, or nothing.
std::optional<std::uint32_t> positive(const json::value* value) {
  if (value == nullptr) return std::nullopt;
  std::uint64_t n = 0;
  if (value->is_int64() && value->get_int64() > 0) n = static_cast<std::uint64_t>(value->get_int64());
  if (value->is_uint64()) n = value->get_uint64();
  if (n == 0 || n > std::numeric_limits<std::uint32_t>::max()) return std::nullopt;
  return static_cast<std::uint32_t>(n);
}

/// The value of `name` in Ollama's "parameters" text: one "name value" pair per line.
std::optional<std::uint32_t> ollama_parameter(std::string_view parameters, std::string_view name) {
  while (!parameters.empty()) {
    const auto end = std::min(parameters.find('\n'), parameters.size());
    std::string_view line = parameters.substr(0, end);
    parameters.remove_prefix(std::min(end + 1, parameters.size()));
    if (!line.starts_with(name) || line.size() == name.size() || (line[name.size()] != ' ' && line[name.size()] != '\t')) {
      continue;
    }
    line.remove_prefix(name.size());
    const auto digits = line.find_first_not_of(" \t");
    if (digits == std::string_view::npos) return std::nullopt;
    std::uint64_t n = 0;
    for (const char c : line.substr(digits)) {
      if (c < '0' || c > '9') break;
      n = n * 10 + static_cast<std::uint64_t>(c - '0');
      if (n > std::numeric_limits<std::uint32_t>::max()) return std::nullopt;
    }
    return n == 0 ? std::nullopt : std::optional<std::uint32_t>(static_cast<std::uint32_t>(n));
  }
  return std::nullopt;
}

/// One search, from find_context_lengths' call to its `done`.
class context_search : public std::enable_shared_from_this<context_search> {
 public:
  context_search(upstream_client client, std::vector<upstream_model> models,
                 std::function<void(std::vector<upstream_model>)> done)
      : client_(std::move(client)), models_(std::move(models)), done_(std::move(done)) {}

  void start() {
    if (std::none_of(models_.begin(), models_.end(), [](const auto& m) { return unknown(m) || m.context_is_trained; })) {
      return finish();
    }
    client_.fetch_from_root("/props", std::nullopt, [self = shared_from_this()](auto body) {
      if (body) {
        if (const auto served = llama_cpp_served_context(*body)) {
          for (auto& m : self->models_) {
            if (!unknown(m) && !m.context_is_trained) continue;
            m.context_length_tokens = m.context_is_trained ? std::min(m.context_length_tokens, *served) : *served;
            m.context_is_trained = false;
          }
        }
      }
      self->ask_lm_studio();
    });
  }

 private:
  static bool unknown(const upstream_model& m) { return m.context_length_tokens == 0; }

  bool any_unknown() const { return std::any_of(models_.begin(), models_.end(), unknown); }

  void ask_lm_studio() {
    if (!any_unknown()) return finish();
    client_.fetch_from_root("/api/v0/models", std::nullopt, [self = shared_from_this()](auto body) {
      if (body) {
        const auto windows = lm_studio_served_contexts(*body);
        for (auto& m : self->models_) {
          const auto found = windows.find(m.id);
          if (unknown(m) && found != windows.end()) m.context_length_tokens = found->second;
        }
      }
      self->ask_ollama(0);
    });
  }

  void ask_ollama(std::size_t from) {
    const auto next = std::find_if(models_.begin() + static_cast<std::ptrdiff_t>(from), models_.end(), unknown);
    if (next == models_.end()) return finish();
    const auto index = static_cast<std::size_t>(next - models_.begin());
    auto request = json::serialize(json::object{{"model", next->id}});
    client_.fetch_from_root("/api/show", std::move(request), [self = shared_from_this(), index](auto body) {
      if (body) {
        if (const auto served = ollama_served_context(*body)) self->models_[index].context_length_tokens = *served;
      }
      self->ask_ollama(index + 1);
    });
  }

  void finish() {
    auto done = std::move(done_);
    done(std::move(models_));
  }

  upstream_client client_;
  std::vector<upstream_model> models_;
  std::function<void(std::vector<upstream_model>)> done_;
};

}  // namespace

std::optional<std::uint32_t> llama_cpp_served_context(std::string_view props_body) {
  const auto props = parse_object(props_body);
  if (!props) return std::nullopt;
  const auto* settings = props->if_contains("default_generation_settings");
  if (settings == nullptr || !settings->is_object()) return std::nullopt;
  return positive(settings->get_object().if_contains("n_ctx"));
}

std::map<std::string, std::uint32_t, std::less<>> lm_studio_served_contexts(std::string_view models_body) {
  std::map<std::string, std::uint32_t, std::less<>> windows;
  const auto list = parse_object(models_body);
  const auto* data = list ? list->if_contains("data") : nullptr;
  if (data == nullptr || !data->is_array()) return windows;
  for (const auto& item : data->get_array()) {
    const auto* entry = item.if_object();
    if (entry == nullptr) continue;
    const auto* id = entry->if_contains("id");
    if (id == nullptr || !id->is_string()) continue;
    std::optional<std::uint32_t> served = positive(entry->if_contains("loaded_context_length"));
    if (!served) {
      if (const auto trained = positive(entry->if_contains("max_context_length"))) {
        served = std::min(*trained, lm_studio_default_context_tokens);
      }
    }
    if (served) windows.try_emplace(std::string(id->get_string()), *served);
  }
  return windows;
}

std::optional<std::uint32_t> ollama_served_context(std::string_view show_body) {
  const auto show = parse_object(show_body);
  if (!show) return std::nullopt;
  const auto* info = show->if_contains("model_info");
  const auto* parameters = show->if_contains("parameters");
  if ((info == nullptr || !info->is_object()) && (parameters == nullptr || !parameters->is_string())) {
    return std::nullopt;  // not an answer of /api/show
  }
  std::optional<std::uint32_t> trained;
  if (info != nullptr && info->is_object()) {
    for (const auto& [key, value] : info->get_object()) {
      if (key.ends_with(".context_length")) trained = positive(&value);
    }
  }
  std::optional<std::uint32_t> num_ctx;
  if (parameters != nullptr && parameters->is_string()) num_ctx = ollama_parameter(parameters->get_string(), "num_ctx");
  const std::uint32_t served = num_ctx.value_or(ollama_default_context_tokens);
  return trained ? std::min(served, *trained) : served;
}

void find_context_lengths(upstream_client client, std::vector<upstream_model> models,
                          std::function<void(std::vector<upstream_model>)> done) {
  std::make_shared<context_search>(std::move(client), std::move(models), std::move(done))->start();
}

}  // namespace gpustream::gateway
