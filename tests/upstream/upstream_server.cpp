/// gpustream_test_upstream: a small deterministic OpenAI-compatible server for tests and
/// benchmarks. It answers `GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions`
/// (streamed and not) with the text "tok0 tok1 …", one token per SSE chunk, at a configured pace,
/// and can fail, drop mid-stream, refuse beyond a concurrency limit, continue an answer begun
/// elsewhere and report usage the ways real servers do. `GET /stats` counts requests and
/// cancellations. See README.md beside this file.
///
/// Built for speed as much as for tests, because benchmarks compare going through gpustream with
/// coming here directly: several I/O threads, one strand per connection, asio timers for pacing,
/// reused per-connection buffers, responses written as raw HTTP/1.1 chunks.

#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/signal_set.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/write.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/http/parser.hpp>
#include <boost/beast/http/read.hpp>
#include <boost/beast/http/string_body.hpp>
#include <boost/json/parse.hpp>
#include <boost/json/serialize.hpp>
#include <boost/json/value.hpp>
#include <CLI/CLI.hpp>

#include <algorithm>
#include <array>
#include <atomic>
#include <cctype>
#include <charconv>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <ctime>
#include <iostream>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
namespace json = boost::json;
using tcp = asio::ip::tcp;
using steady = std::chrono::steady_clock;

/// Largest request header block and body accepted, bytes.
constexpr std::uint32_t request_header_bytes_max = 64 * 1024;
constexpr std::uint64_t request_body_bytes_max = 8 * 1024 * 1024;
/// Most bytes a client may send while its answer is still being written (pipelining); more
/// closes the connection.
constexpr std::size_t pipelined_bytes_max = 64 * 1024;
/// Bytes read at once while watching a connection for the client going away.
constexpr std::size_t watch_read_bytes = 4096;
/// Most tokens sent in one write when several are due at once (always with --token-interval-us 0,
/// or when the server fell behind its pace).
constexpr std::uint32_t tokens_per_write_max = 64;
/// Deepest JSON nesting accepted in a request.
constexpr std::size_t json_depth_max = 64;

/// lifetime: the final usage counts the completion tokens of every answer so far, this one's
/// included (a server whose counter never resets).
enum class usage_mode { correct, zero, cumulative, lifetime, none };

/// Which server's way of telling its context window it imitates: in /v1/models (openai, as vLLM
/// and OpenRouter do), or only in its own API: Ollama's POST /api/show, LM Studio's GET
/// /api/v0/models, llama.cpp server's GET /props (whose /v1/models gives the larger window the
/// model was trained with, meta.n_ctx_train).
enum class flavor { openai, ollama, lmstudio, llamacpp };

/// What a chat continuing its trailing assistant message ("continue_final_message") answers:
/// restart: the same answer as any other, from tok0; resume: the rest of the answer, as a model
/// continuing its own text would, from tok<k> (k = the words of that assistant message) up to
/// --tokens in all.
enum class continuation_mode { restart, resume };

/// The window the models were trained with, where a flavor reports one besides the served one.
constexpr std::uint32_t trained_context_length = 131'072;

struct settings {
  std::string host = "127.0.0.1";
  std::uint16_t port = 0;
  std::vector<std::string> models{"test-model"};
  std::uint32_t context_length = 4096;
  std::uint32_t tokens = 16;
  std::uint32_t first_token_ms = 0;
  std::uint32_t token_interval_us = 0;
  /// With a token interval: an answer's later tokens go at the ticks of one clock shared by all
  /// answers (one tick per interval), as a server decoding its answers together in one batch
  /// (vLLM, llama.cpp server's slots) emits them; without it each answer keeps its own pace.
  bool decode_steps = false;
  /// The shared clock's epoch: ticks are at decode_epoch + k * token_interval.
  steady::time_point decode_epoch = steady::now();
  unsigned fail_status = 0;                       // 0: answer normally
  std::vector<std::string> chatless_models;        // refused with 400 for a chat, as an embedding model is
  std::optional<std::uint32_t> drop_after_tokens;  // close mid-stream after this many tokens
  continuation_mode continuation = continuation_mode::restart;
  usage_mode usage = usage_mode::correct;
  flavor kind = flavor::openai;
  /// A streamed chat answer's first tokens go in delta.reasoning_content, as a reasoning model's
  /// server sends its thinking; usage counts them.
  std::uint32_t reasoning_tokens = 0;
  std::uint32_t max_concurrent = 0;  // 0: no limit
  /// The model loads on the first completion: that one, and any that come while it loads, start
  /// this long after it came (LM Studio and Ollama load a model on first use).
  std::uint32_t load_ms = 0;
  /// Most answers running at once; the others wait in line for a slot (Ollama's
  /// OLLAMA_NUM_PARALLEL) rather than being refused (max_concurrent). 0: no limit.
  std::uint32_t parallel = 0;
  /// The finish_reason of an answer max_tokens does not cut (other servers' words, e.g. "eos").
  std::string finish_reason = "stop";
  std::uint32_t connections_max = 20000;
  unsigned threads = 1;
  /// When set, every request needs "Authorization: Bearer <api_key>" (vLLM's --api-key); 401 without.
  std::string api_key;
};

struct counters {
  std::atomic<std::uint64_t> requests{0};   // completion requests received
  std::atomic<std::uint64_t> tokens_answered{0};  // completion tokens of every answer (--usage lifetime)
  std::atomic<std::int64_t> active{0};      // completions being answered now
  std::atomic<std::uint64_t> cancelled{0};  // client closed before the answer was complete
  std::atomic<std::uint64_t> completed{0};  // answers whose last write was issued
  std::atomic<std::uint64_t> rejected{0};   // 429 for --max-concurrent
  std::atomic<std::uint64_t> dropped{0};    // closed on purpose by --drop-after-tokens
  std::atomic<std::uint64_t> continued{0};  // chats asked to continue their trailing assistant message
  /// Words of the trailing assistant message of the last chat counted in `continued`; -1 before
  /// the first.
  std::atomic<std::int64_t> last_continued_from{-1};
  std::atomic<std::int64_t> connections{0};            // open now
  std::atomic<std::uint64_t> connections_accepted{0};  // ever
};

std::string_view reason_phrase(unsigned status) {
  return http::obsolete_reason(static_cast<http::status>(status));
}

std::string_view error_type(unsigned status) {
  switch (status) {
    case 400: return "invalid_request_error";
    case 401: return "authentication_error";
    case 403: return "permission_error";
    case 404: return "not_found_error";
    case 429: return "rate_limit_error";
    default: return status >= 500 ? "server_error" : "invalid_request_error";
  }
}

std::string error_body(unsigned status, std::string_view message, std::string_view code = {}) {
  json::object error;
  error["message"] = message;
  error["type"] = error_type(status);
  error["param"] = nullptr;
  if (code.empty()) {
    error["code"] = nullptr;
  } else {
    error["code"] = code;
  }
  return json::serialize(json::object{{"error", std::move(error)}});
}

std::uint32_t count_words(std::string_view text) {
  std::uint32_t words = 0;
  bool in_word = false;
  for (const char c : text) {
    const bool space = c == ' ' || c == '\n' || c == '\t' || c == '\r';
    if (!space && !in_word) ++words;
    in_word = !space;
  }
  return words;
}

/// Whitespace-separated words in a message's content or a prompt: a string, or an array of
/// strings or text parts.
std::uint32_t content_words(const json::value& value) {
  if (value.is_string()) return count_words(value.get_string());
  if (!value.is_array()) return 0;
  std::uint32_t words = 0;
  for (const auto& part : value.get_array()) {
    if (part.is_string()) words += count_words(part.get_string());
    if (const auto* object = part.if_object()) {
      if (const auto* text = object->if_contains("text"); text && text->is_string()) {
        words += count_words(text->get_string());
      }
    }
  }
  return words;
}

/// prompt_tokens as this server reports them: whitespace-separated words in the messages'
/// contents (strings or text parts) or in the prompt (a string or strings).
std::uint32_t prompt_words(const json::object& request) {
  std::uint32_t words = 0;
  if (const auto* messages = request.if_contains("messages"); messages && messages->is_array()) {
    for (const auto& message : messages->get_array()) {
      if (const auto* object = message.if_object()) {
        if (const auto* content = object->if_contains("content")) words += content_words(*content);
      }
    }
  }
  if (const auto* prompt = request.if_contains("prompt")) words += content_words(*prompt);
  return words;
}

std::optional<std::uint64_t> non_negative(const json::value* value) {
  if (value == nullptr) return std::nullopt;
  if (value->is_int64() && value->get_int64() >= 0) return static_cast<std::uint64_t>(value->get_int64());
  if (value->is_uint64()) return value->get_uint64();
  return std::nullopt;
}

void append_number(std::string& out, std::uint64_t value) {
  std::array<char, 24> digits;
  const auto [end, ec] = std::to_chars(digits.data(), digits.data() + digits.size(), value);
  (void)ec;  // 24 digits always hold a 64-bit number
  out.append(digits.data(), end);
}

/// `list`'s comma-separated model ids, in order, empty ones left out.
std::vector<std::string> split_models(std::string_view list) {
  std::vector<std::string> ids;
  for (std::size_t start = 0; start <= list.size();) {
    const auto comma = std::min(list.find(',', start), list.size());
    if (comma > start) ids.emplace_back(list.substr(start, comma - start));
    start = comma + 1;
  }
  return ids;
}

std::string models_body(const settings& config, const std::vector<std::string>& ids) {
  json::array data;
  for (const auto& id : ids) {
    json::object model{{"id", id}, {"object", "model"}, {"created", 0}, {"owned_by", "gpustream-test"}};
    if (config.kind == flavor::openai) model["context_length"] = config.context_length;
    if (config.kind == flavor::llamacpp) model["meta"] = json::object{{"n_ctx_train", trained_context_length}};
    data.push_back(std::move(model));
  }
  return json::serialize(json::object{{"object", "list"}, {"data", std::move(data)}});
}

/// The flavor's own answer about context windows at `path`, or nothing (404).
std::optional<std::string> own_api_body(const settings& config, const std::vector<std::string>& ids,
                                        std::string_view path, bool get, std::string_view body) {
  if (config.kind == flavor::llamacpp && path == "/props" && get) {
    return json::serialize(json::object{{"default_generation_settings", json::object{{"n_ctx", config.context_length}}},
                                        {"total_slots", 1}});
  }
  if (config.kind == flavor::lmstudio && path == "/api/v0/models" && get) {
    json::array data;
    for (const auto& id : ids) {
      data.push_back(json::object{{"id", id}, {"object", "model"}, {"state", "loaded"},
                                  {"max_context_length", trained_context_length},
                                  {"loaded_context_length", config.context_length}});
    }
    return json::serialize(json::object{{"object", "list"}, {"data", std::move(data)}});
  }
  if (config.kind == flavor::ollama && path == "/api/show" && !get) {
    boost::system::error_code ec;
    const auto request = json::parse(body, ec);
    const auto* model = !ec && request.is_object() ? request.get_object().if_contains("model") : nullptr;
    if (model == nullptr || !model->is_string() ||
        std::find(ids.begin(), ids.end(), model->get_string()) == ids.end()) {
      return std::nullopt;
    }
    return json::serialize(json::object{
        {"parameters", "num_ctx                        " + std::to_string(config.context_length) + "\nstop \"<|eot|>\""},
        {"model_info", json::object{{"general.architecture", "llama"}, {"llama.context_length", trained_context_length}}}});
  }
  return std::nullopt;
}

/// When answers start: after the model's load (settings::load_ms), in one of `parallel` slots.
/// A slot is held for an answer's planned time, also when its client leaves early. Shared by all
/// sessions; thread-safe.
class engine_schedule {
 public:
  explicit engine_schedule(const settings& config)
      : load_(std::chrono::milliseconds(config.load_ms)), free_at_(config.parallel) {}

  /// When an answer that arrives at `now` and runs for `duration` once started may start.
  steady::time_point start(steady::time_point now, steady::duration duration) {
    // Neither knob set (the benchmarks' case): no lock on every completion.
    if (load_ == steady::duration::zero() && free_at_.empty()) return now;
    std::lock_guard lock(mutex_);
    if (!loaded_at_) loaded_at_ = now + load_;
    steady::time_point at = std::max(now, *loaded_at_);
    if (free_at_.empty()) return at;
    const auto slot = std::min_element(free_at_.begin(), free_at_.end());
    at = std::max(at, *slot);
    *slot = at + duration;
    return at;
  }

 private:
  const steady::duration load_;
  std::mutex mutex_;
  std::optional<steady::time_point> loaded_at_;
  std::vector<steady::time_point> free_at_;  ///< one per slot
};

enum class completion_kind { chat, text };

/// One completion being answered: what it asked for and how far the answer got.
struct answer_plan {
  completion_kind kind = completion_kind::chat;
  bool stream = false;
  bool include_usage = false;
  std::uint32_t tokens = 0;  // tokens in the answer
  std::uint32_t first_token = 0;  // the number of its first token: tok<first_token>
  std::uint32_t prompt_tokens = 0;
  std::string finish_reason;
  std::string id;      // "chatcmpl-<n>" or "cmpl-<n>", n counting requests
  std::string model;
  std::string prefix;  // `data: {"id":…,"choices":[` shared by every chunk of the answer
};

/// The models served now: --models at start, changed by POST /control/models (a backend loading
/// or unloading one). Shared by every connection's thread.
class live_models {
 public:
  struct snapshot {
    std::vector<std::string> ids;
    std::string body;  ///< GET /v1/models
  };
  live_models(const settings& config, std::vector<std::string> ids) : config_(config) { set(std::move(ids)); }
  std::shared_ptr<const snapshot> get() const {
    std::lock_guard lock(mutex_);
    return current_;
  }
  void set(std::vector<std::string> ids) {
    auto next = std::make_shared<snapshot>();
    next->body = models_body(config_, ids);
    next->ids = std::move(ids);
    std::lock_guard lock(mutex_);
    current_ = std::move(next);
  }

 private:
  const settings& config_;
  mutable std::mutex mutex_;
  std::shared_ptr<const snapshot> current_;
};

/// One client connection: reads requests in turn; answers each, streaming when asked to.
class session : public std::enable_shared_from_this<session> {
 public:
  session(tcp::socket socket, const settings& config, counters& stats, engine_schedule& schedule,
          live_models& models)
      : socket_(std::move(socket)),
        timer_(socket_.get_executor()),
        config_(config),
        stats_(stats),
        schedule_(schedule),
        models_(models) {
    stats_.connections.fetch_add(1, std::memory_order_relaxed);
    stats_.connections_accepted.fetch_add(1, std::memory_order_relaxed);
  }
  ~session() { stats_.connections.fetch_sub(1, std::memory_order_relaxed); }

  void start() {
    beast::error_code ignored;
    socket_.set_option(tcp::no_delay(true), ignored);  // tokens are small writes: no Nagle delay
    read_request();
  }

 private:
  void read_request() {
    parser_.emplace();
    parser_->header_limit(request_header_bytes_max);
    parser_->body_limit(request_body_bytes_max);
    http::async_read(socket_, buffer_, *parser_,
                     [self = shared_from_this()](beast::error_code ec, std::size_t) { self->on_request(ec); });
  }

  void on_request(beast::error_code ec) {
    if (ec == http::error::body_limit) return answer(413, error_body(413, "request body too large"), false);
    if (ec == http::error::header_limit) return answer(431, error_body(431, "request headers too large"), false);
    if (ec) return close();
    auto& request = parser_->get();
    keep_alive_ = request.keep_alive();
    std::string_view path = request.target();
    path = path.substr(0, path.find('?'));
    const bool get = request.method() == http::verb::get;
    const bool post = request.method() == http::verb::post;
    if (!config_.api_key.empty() && request[http::field::authorization] != "Bearer " + config_.api_key) {
      return answer(401, error_body(401, "Unauthorized: a missing or wrong API key"), keep_alive_);
    }
    const auto models = models_.get();
    if (path == "/v1/models" && get) return answer(200, models->body, keep_alive_);
    if (path == "/control/models" && post) {
      auto ids = split_models(request.body());
      if (ids.empty()) return answer(400, error_body(400, "name at least one model, comma-separated"), keep_alive_);
      models_.set(std::move(ids));
      return answer(200, models_.get()->body, keep_alive_);
    }
    if (auto own = own_api_body(config_, models->ids, path, get, request.body())) {
      return answer(200, std::move(*own), keep_alive_);
    }
    if (path == "/stats" && get) return answer(200, stats_body(), keep_alive_);
    if (path == "/v1/chat/completions" && post) return completion(completion_kind::chat, request.body());
    if (path == "/v1/completions" && post) return completion(completion_kind::text, request.body());
    if (path == "/v1/models" || path == "/stats" || path == "/v1/chat/completions" || path == "/v1/completions") {
      return answer(405, error_body(405, "method not allowed"), keep_alive_);
    }
    answer(404, error_body(404, "unknown path " + std::string(path.substr(0, 200))), keep_alive_);
  }

  std::string stats_body() const {
    const auto continued_from = stats_.last_continued_from.load();
    return json::serialize(json::object{{"requests", stats_.requests.load()},
                                        {"active", stats_.active.load()},
                                        {"cancelled", stats_.cancelled.load()},
                                        {"completed", stats_.completed.load()},
                                        {"rejected", stats_.rejected.load()},
                                        {"dropped", stats_.dropped.load()},
                                        {"continued", stats_.continued.load()},
                                        {"last_continued_from", continued_from < 0 ? json::value(nullptr)
                                                                                   : json::value(continued_from)},
                                        {"connections", stats_.connections.load()},
                                        {"connections_accepted", stats_.connections_accepted.load()}});
  }

  // ---- whole answers

  /// Writes a whole response; `then_next` reads the next request afterwards, else closes.
  void answer(unsigned status, std::string body, bool then_next, std::string_view extra_headers = {}) {
    head_.clear();
    head_.append("HTTP/1.1 ");
    append_number(head_, status);
    head_.append(" ").append(reason_phrase(status));
    head_.append("\r\nContent-Type: application/json\r\nContent-Length: ");
    append_number(head_, body.size());
    head_.append("\r\n").append(extra_headers);
    if (!then_next) head_.append("Connection: close\r\n");
    head_.append("\r\n");
    body_ = std::move(body);
    const std::array<asio::const_buffer, 2> pieces{asio::buffer(head_), asio::buffer(body_)};
    asio::async_write(socket_, pieces, [self = shared_from_this(), then_next](beast::error_code ec, std::size_t) {
      if (ec || !then_next) return self->finish_connection();
      self->read_request();
    });
  }

  void answer_error(unsigned status, std::string_view message, std::string_view code = {},
                    std::string_view extra_headers = {}) {
    answer(status, error_body(status, message, code), keep_alive_, extra_headers);
  }

  // ---- completions

  void completion(completion_kind kind, std::string_view body) {
    const auto number = stats_.requests.fetch_add(1, std::memory_order_relaxed) + 1;
    if (config_.fail_status != 0) {
      return answer_error(config_.fail_status, "test upstream: configured to fail every completion with HTTP " +
                                                   std::to_string(config_.fail_status));
    }
    boost::system::error_code ec;
    json::parse_options options;
    options.max_depth = json_depth_max;
    const json::value value = json::parse(body, ec, {}, options);
    if (ec || !value.is_object()) return answer_error(400, "request body is not a JSON object");
    const auto& request = value.get_object();
    const auto* model = request.if_contains("model");
    if (model == nullptr || !model->is_string()) return answer_error(400, "you must provide a model parameter");
    const std::string_view model_id = model->get_string();
    const auto models = models_.get();
    if (std::find(models->ids.begin(), models->ids.end(), model_id) == models->ids.end()) {
      return answer_error(404, "The model `" + std::string(model_id.substr(0, 200)) + "` does not exist",
                          "model_not_found");
    }
    if (std::find(config_.chatless_models.begin(), config_.chatless_models.end(), model_id) !=
        config_.chatless_models.end()) {
      return answer_error(400, "\"" + std::string(model_id) + "\" does not support chat");
    }
    const char* needed = kind == completion_kind::chat ? "messages" : "prompt";
    if (!request.contains(needed)) return answer_error(400, std::string("you must provide ") + needed);
    std::uint32_t first_token = 0;
    if (kind == completion_kind::chat) {
      const auto continuing = check_continuation(request);
      if (!continuing.refusal.empty()) return answer_error(400, continuing.refusal);
      if (continuing.asked) {
        if (config_.continuation == continuation_mode::resume) {
          // Resumed from the prefix's word count, which must then be this server's own words:
          // a prefix of the right length but other text (reordered, another job's) is refused.
          std::string expected;
          for (std::uint32_t i = 0; i < continuing.prefix_tokens; ++i) expected += "tok" + std::to_string(i) + " ";
          if (continuing.prefix_text != expected) {
            return answer_error(400, "test upstream: the assistant prefix to continue is not \"tok0 ... tok" +
                                         std::to_string(continuing.prefix_tokens) + "\" but \"" +
                                         continuing.prefix_text.substr(0, 200) + "\"");
          }
          first_token = continuing.prefix_tokens;
        }
        stats_.last_continued_from.store(continuing.prefix_tokens);
        stats_.continued.fetch_add(1);
      }
    }
    const auto now_active = stats_.active.fetch_add(1) + 1;
    if (config_.max_concurrent != 0 && now_active > static_cast<std::int64_t>(config_.max_concurrent)) {
      stats_.active.fetch_sub(1);
      stats_.rejected.fetch_add(1, std::memory_order_relaxed);
      return answer_error(429, "test upstream: more than " + std::to_string(config_.max_concurrent) +
                                   " concurrent completions", {}, "Retry-After: 1\r\n");
    }
    plan(kind, request, model_id, number, first_token);
    live_ = true;
    const auto answer_time = first_token_delay() + token_interval() * (plan_.tokens > 0 ? plan_.tokens - 1 : 0);
    start_ = schedule_.start(steady::now(), answer_time);
    watch();
    if (plan_.stream) return write_stream_head();
    wait_until(start_ + answer_time, [self = shared_from_this()] { self->write_whole_completion(); });
  }

  struct continuation {
    bool asked = false;   ///< "continue_final_message": true
    std::string refusal;  ///< why vLLM would refuse the request; empty when it would not
    std::uint32_t prefix_tokens = 0;  ///< accepted: the words of the assistant message continued
    std::string prefix_text = {};     ///< accepted: that message's content, when it is a string
  };

  /// vLLM's rules for continuing a chat's trailing assistant message: "continue_final_message"
  /// needs "add_generation_prompt" false (its default is true) and an assistant message last.
  static continuation check_continuation(const json::object& request) {
    const auto flag = [&](std::string_view name, bool absent) {
      const auto* value = request.if_contains(name);
      return value != nullptr && value->is_bool() ? value->get_bool() : absent;
    };
    if (!flag("continue_final_message", false)) return {};
    if (flag("add_generation_prompt", true)) {
      return {true, "Cannot set both `continue_final_message` and `add_generation_prompt` to True."};
    }
    const auto& messages = request.at("messages");
    const bool assistant_last = messages.is_array() && !messages.get_array().empty() &&
                                messages.get_array().back().is_object() && [&] {
                                  const auto* role = messages.get_array().back().get_object().if_contains("role");
                                  return role != nullptr && role->is_string() && role->get_string() == "assistant";
                                }();
    if (!assistant_last) return {true, "continue_final_message needs the final message to be from the assistant"};
    const auto* content = messages.get_array().back().get_object().if_contains("content");
    return {true, {}, content != nullptr ? content_words(*content) : 0,
            content != nullptr && content->is_string() ? std::string(content->get_string()) : std::string()};
  }

  /// Plans the answer to request `number`: tok<first_token> up to tok<--tokens - 1>, fewer when
  /// max_tokens is smaller.
  void plan(completion_kind kind, const json::object& request, std::string_view model, std::uint64_t number,
            std::uint32_t first_token) {
    plan_.kind = kind;
    const auto* stream = request.if_contains("stream");
    plan_.stream = stream != nullptr && stream->is_bool() && stream->get_bool();
    plan_.include_usage = false;
    if (const auto* stream_options = request.if_contains("stream_options"); stream_options && stream_options->is_object()) {
      const auto* include = stream_options->get_object().if_contains("include_usage");
      plan_.include_usage = include != nullptr && include->is_bool() && include->get_bool();
    }
    auto max_tokens = non_negative(request.if_contains("max_tokens"));
    if (!max_tokens) max_tokens = non_negative(request.if_contains("max_completion_tokens"));
    plan_.first_token = std::min(first_token, config_.tokens);
    plan_.tokens = config_.tokens - plan_.first_token;
    plan_.finish_reason = config_.finish_reason;
    if (max_tokens && *max_tokens < plan_.tokens) {
      plan_.tokens = static_cast<std::uint32_t>(*max_tokens);
      plan_.finish_reason = "length";
    }
    plan_.prompt_tokens = prompt_words(request);
    sent_ = 0;
    const bool chat = kind == completion_kind::chat;
    plan_.id.assign(chat ? "chatcmpl-" : "cmpl-");
    append_number(plan_.id, number);
    plan_.model.assign(model);
    plan_.prefix.assign(R"(data: {"id":")").append(plan_.id);
    plan_.prefix.append(chat ? R"(","object":"chat.completion.chunk","created":)" : R"(","object":"text_completion","created":)");
    append_number(plan_.prefix, static_cast<std::uint64_t>(std::time(nullptr)));
    plan_.prefix.append(R"(,"model":)").append(json::serialize(json::string(model))).append(R"(,"choices":[)");
  }

  std::chrono::microseconds first_token_delay() const { return std::chrono::milliseconds(config_.first_token_ms); }
  std::chrono::microseconds token_interval() const { return std::chrono::microseconds(config_.token_interval_us); }

  template <class Step>
  void wait_until(steady::time_point when, Step step) {
    if (when <= steady::now()) return step();
    timer_.expires_at(when);
    timer_.async_wait([self = shared_from_this(), step = std::move(step)](beast::error_code ec) {
      if (ec || !self->live_) return;
      step();
    });
  }

  // ---- streamed answers: one HTTP chunk per write, one token per SSE event

  void write_stream_head() {
    head_.assign("HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
                 "Transfer-Encoding: chunked\r\n");
    if (!keep_alive_) head_.append("Connection: close\r\n");
    head_.append("\r\n");
    asio::async_write(socket_, asio::buffer(head_),
                      [self = shared_from_this()](beast::error_code ec, std::size_t) { self->on_stream_written(ec); });
  }

  void on_stream_written(beast::error_code ec) {
    if (!live_) return;
    if (ec) return client_gone();
    if (stream_over_) return end_answer();
    const auto next = sent_ < plan_.tokens ? token_due(sent_) : steady::now();
    wait_until(next, [self = shared_from_this()] { self->write_stream_step(); });
  }

  steady::time_point token_due(std::uint32_t index) const {
    const auto due = start_ + first_token_delay() + token_interval() * index;
    if (!config_.decode_steps || index == 0 || config_.token_interval_us == 0) return due;
    // The first tick of the shared decode clock at or after `due`.
    const auto interval = token_interval();
    const auto since_epoch = due - config_.decode_epoch;
    return config_.decode_epoch + ((since_epoch + interval - steady::duration(1)) / interval) * interval;
  }

  /// Writes every token that is due by now (one when the pace is kept), each as its own event.
  void write_stream_step() {
    const auto& drop = config_.drop_after_tokens;
    const std::uint32_t last = drop ? std::min(*drop, plan_.tokens) : plan_.tokens;
    if (drop && sent_ >= last) return drop_connection();
    payload_.clear();
    const auto now = steady::now();
    for (std::uint32_t batch = 0; sent_ < last && batch < tokens_per_write_max; ++batch) {
      if (batch > 0 && token_due(sent_) > now) break;
      if (sent_ == 0 && plan_.kind == completion_kind::chat) {
        append_event(R"({"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}])", 0);
      }
      append_token_event();
      ++sent_;
    }
    // With --drop-after-tokens the answer never finishes: the connection closes instead.
    if (sent_ == plan_.tokens && !drop) {
      append_finish();
      count_completed();
    }
    chunk_size_.clear();
    append_hex(chunk_size_, payload_.size());
    chunk_size_.append("\r\n");
    const std::string_view tail = stream_over_ ? "\r\n0\r\n\r\n" : "\r\n";
    const std::array<asio::const_buffer, 3> pieces{asio::buffer(chunk_size_), asio::buffer(payload_),
                                                   asio::buffer(tail.data(), tail.size())};
    asio::async_write(socket_, pieces,
                      [self = shared_from_this()](beast::error_code ec, std::size_t) { self->on_stream_written(ec); });
  }

  static void append_hex(std::string& out, std::size_t value) {
    std::array<char, 20> digits;
    const auto [end, ec] = std::to_chars(digits.data(), digits.data() + digits.size(), value, 16);
    (void)ec;  // 20 hex digits always hold a size_t
    out.append(digits.data(), end);
  }

  void append_token_event() {
    std::array<char, 40> token;
    char* end = std::copy_n("tok", 3, token.data());
    const std::uint32_t number = plan_.first_token + sent_;
    end = std::to_chars(end, token.data() + token.size(), number).ptr;
    *end++ = ' ';
    const std::string_view text(token.data(), static_cast<std::size_t>(end - token.data()));
    payload_.append(plan_.prefix);
    if (plan_.kind == completion_kind::text) payload_.append(R"({"index":0,"text":")");
    else if (number < config_.reasoning_tokens) payload_.append(R"({"index":0,"delta":{"reasoning_content":")");
    else payload_.append(R"({"index":0,"delta":{"content":")");
    payload_.append(text);
    payload_.append(plan_.kind == completion_kind::chat ? R"("},"logprobs":null,"finish_reason":null}])"
                                                        : R"(","logprobs":null,"finish_reason":null}])");
    append_chunk_usage(sent_ + 1);
    payload_.append("}\n\n");
  }

  /// `choices` (already closed) plus the usage member and the end of the event.
  void append_event(std::string_view choices, std::uint32_t completion_tokens) {
    payload_.append(plan_.prefix).append(choices);
    append_chunk_usage(completion_tokens);
    payload_.append("}\n\n");
  }

  /// Per-chunk usage: null as OpenAI sends it when usage was asked for, or the running totals in
  /// the cumulative mode some servers have.
  void append_chunk_usage(std::uint32_t completion_tokens) {
    if (!plan_.include_usage || config_.usage == usage_mode::none) return;
    if (config_.usage != usage_mode::cumulative) {
      payload_.append(R"(,"usage":null)");
      return;
    }
    append_usage_member(plan_.prompt_tokens, completion_tokens);
  }

  void append_usage_member(std::uint32_t prompt_tokens, std::uint32_t completion_tokens) {
    payload_.append(R"(,"usage":{"prompt_tokens":)");
    append_number(payload_, prompt_tokens);
    payload_.append(R"(,"completion_tokens":)");
    append_number(payload_, completion_tokens);
    payload_.append(R"(,"total_tokens":)");
    append_number(payload_, std::uint64_t{prompt_tokens} + completion_tokens);
    payload_.append("}");
  }

  void append_finish() {
    std::string choices = plan_.kind == completion_kind::chat ? R"({"index":0,"delta":{},"logprobs":null,"finish_reason":")"
                                                              : R"({"index":0,"text":"","logprobs":null,"finish_reason":")";
    choices.append(plan_.finish_reason).append("\"}]");
    append_event(choices, plan_.tokens);
    if (plan_.include_usage && config_.usage != usage_mode::none) {
      payload_.append(plan_.prefix).append("]");
      const bool zero = config_.usage == usage_mode::zero;
      append_usage_member(zero ? 0 : plan_.prompt_tokens, zero ? 0 : completion_tokens_reported());
      payload_.append("}\n\n");
    }
    payload_.append("data: [DONE]\n\n");
  }

  /// The completion tokens the final usage reports, zero aside.
  std::uint32_t completion_tokens_reported() {
    if (config_.usage != usage_mode::lifetime) return plan_.tokens;
    const auto total = stats_.tokens_answered.fetch_add(plan_.tokens) + plan_.tokens;
    return static_cast<std::uint32_t>(std::min<std::uint64_t>(total, UINT32_MAX));
  }

  // ---- non-streamed answers

  void write_whole_completion() {
    if (config_.drop_after_tokens) return drop_connection();
    json::object out;
    const bool chat = plan_.kind == completion_kind::chat;
    std::string text;
    for (std::uint32_t i = 0; i < plan_.tokens; ++i) {
      text.append("tok").append(std::to_string(plan_.first_token + i)).append(" ");
    }
    json::object choice{{"index", 0}, {"logprobs", nullptr}, {"finish_reason", plan_.finish_reason}};
    if (chat) {
      choice["message"] = json::object{{"role", "assistant"}, {"content", text}};
    } else {
      choice["text"] = text;
    }
    out["id"] = plan_.id;
    out["object"] = chat ? "chat.completion" : "text_completion";
    out["created"] = static_cast<std::uint64_t>(std::time(nullptr));
    out["model"] = plan_.model;
    out["choices"] = json::array{std::move(choice)};
    if (config_.usage != usage_mode::none) {
      const bool zero = config_.usage == usage_mode::zero;
      const std::uint32_t prompt = zero ? 0 : plan_.prompt_tokens;
      const std::uint32_t completion = zero ? 0 : completion_tokens_reported();
      out["usage"] = json::object{{"prompt_tokens", prompt},
                                  {"completion_tokens", completion},
                                  {"total_tokens", std::uint64_t{prompt} + completion}};
    }
    count_completed();
    head_.assign("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: ");
    body_ = json::serialize(out);
    append_number(head_, body_.size());
    head_.append(keep_alive_ ? "\r\n\r\n" : "\r\nConnection: close\r\n\r\n");
    const std::array<asio::const_buffer, 2> pieces{asio::buffer(head_), asio::buffer(body_)};
    asio::async_write(socket_, pieces,
                      [self = shared_from_this()](beast::error_code ec, std::size_t) { self->on_stream_written(ec); });
  }

  // ---- the end of an answer

  /// While an answer is being written, a read stays pending so that a client going away is seen
  /// at once, even between tokens. Bytes that arrive belong to the next request.
  void watch() {
    watching_ = true;
    socket_.async_read_some(buffer_.prepare(watch_read_bytes),
                            [self = shared_from_this()](beast::error_code ec, std::size_t bytes) {
                              self->on_watch(ec, bytes);
                            });
  }

  void on_watch(beast::error_code ec, std::size_t bytes) {
    watching_ = false;
    if (!ec) buffer_.commit(bytes);
    if (live_) {
      if (ec) return client_gone();
      if (buffer_.size() > pipelined_bytes_max) return close();
      return watch();
    }
    // The answer is over: end_answer() cancelled this read, or the next request began.
    if (!socket_.is_open()) return;
    if (ec && ec != asio::error::operation_aborted) return close();
    read_request();
  }

  void client_gone() {
    // A client leaving while the last write is on its way got its answer: counted completed.
    if (!stream_over_) {
      stats_.active.fetch_sub(1);
      stats_.cancelled.fetch_add(1);
    }
    live_ = false;
    stream_over_ = false;
    close();
  }

  void drop_connection() {
    live_ = false;
    stats_.active.fetch_sub(1);
    stats_.dropped.fetch_add(1);
    close();
  }

  /// The answer's last write is being issued: it stops being active and counts as completed now,
  /// not when the write is done, so that a client that has read the answer's end (a test reading
  /// /stats after [DONE]) always finds it counted.
  void count_completed() {
    stream_over_ = true;
    stats_.active.fetch_sub(1);
    stats_.completed.fetch_add(1);
  }

  void end_answer() {
    live_ = false;
    stream_over_ = false;
    if (!keep_alive_) return finish_connection();
    if (!watching_) return read_request();
    // The next request may already sit in buffer_ (read by the watch before this write's
    // completion ran): stop the watch; its handler reads the next request either way.
    beast::error_code ignored;
    socket_.cancel(ignored);
  }

  void finish_connection() {
    beast::error_code ignored;
    socket_.shutdown(tcp::socket::shutdown_send, ignored);  // the client may be gone already
    if (!watching_) close();
  }

  void close() {
    live_ = false;
    timer_.cancel();
    beast::error_code ignored;
    socket_.close(ignored);
  }

  tcp::socket socket_;
  asio::steady_timer timer_;
  const settings& config_;
  counters& stats_;
  engine_schedule& schedule_;
  live_models& models_;
  beast::flat_buffer buffer_;
  std::optional<http::request_parser<http::string_body>> parser_;
  bool keep_alive_ = true;

  answer_plan plan_;
  steady::time_point start_;
  std::uint32_t sent_ = 0;
  bool live_ = false;         // an answer is being written and counts as active
  bool stream_over_ = false;  // the last write of the answer is on its way (counted completed)
  bool watching_ = false;

  std::string head_;        // reused between answers so a busy connection allocates little
  std::string body_;
  std::string payload_;
  std::string chunk_size_;
};

class server {
 public:
  explicit server(settings config)
      : config_(std::move(config)),
        models_(config_, config_.models),
        io_(static_cast<int>(config_.threads)),
        acceptor_(io_),
        retry_timer_(io_),
        signals_(io_, SIGINT, SIGTERM) {}

  bool listen() {
    beast::error_code ec;
    const auto address = asio::ip::make_address(config_.host, ec);
    if (ec) {
      std::cerr << "gpustream_test_upstream: bad host " << config_.host << "\n";
      return false;
    }
    const tcp::endpoint endpoint(address, config_.port);
    acceptor_.open(endpoint.protocol(), ec);
    if (!ec) acceptor_.set_option(asio::socket_base::reuse_address(true), ec);
    if (!ec) acceptor_.bind(endpoint, ec);
    if (!ec) acceptor_.listen(asio::socket_base::max_listen_connections, ec);
    if (ec) {
      std::cerr << "gpustream_test_upstream: cannot listen on " << config_.host << ":" << config_.port << ": "
                << ec.message() << "\n";
      return false;
    }
    return true;
  }

  void run() {
    const auto bound = acceptor_.local_endpoint();
    std::cout << "listening " << bound.address().to_string() << ":" << bound.port() << std::endl;
    signals_.async_wait([this](beast::error_code, int) { io_.stop(); });
    accept();
    std::vector<std::thread> threads;
    for (unsigned i = 1; i < config_.threads; ++i) threads.emplace_back([this] { io_.run(); });
    io_.run();
    for (auto& thread : threads) thread.join();
  }

 private:
  void accept() {
    acceptor_.async_accept(asio::make_strand(io_), [this](beast::error_code ec, tcp::socket socket) {
      if (ec) {
        // Out of descriptors, say: wait a moment instead of spinning on the error.
        std::cerr << "gpustream_test_upstream: accept failed: " << ec.message() << "\n";
        retry_timer_.expires_after(std::chrono::milliseconds(50));
        retry_timer_.async_wait([this](beast::error_code) { accept(); });
        return;
      }
      if (stats_.connections.load() < static_cast<std::int64_t>(config_.connections_max)) {
        std::make_shared<session>(std::move(socket), config_, stats_, schedule_, models_)->start();
      }  // else the socket closes here
      accept();
    });
  }

  settings config_;
  counters stats_;
  engine_schedule schedule_{config_};
  live_models models_;
  asio::io_context io_;
  tcp::acceptor acceptor_;
  asio::steady_timer retry_timer_;
  asio::signal_set signals_;
};

std::optional<settings> parse_arguments(int argc, char** argv) {
  settings config;
  CLI::App app{"Deterministic OpenAI-compatible server for gpustream's tests and benchmarks"};
  std::string listen = "127.0.0.1:0";
  std::string models = "test-model";
  std::string usage = "correct";
  unsigned fail_status = 0;
  std::uint32_t drop_after = 0;
  config.threads = std::max(1u, std::min(16u, std::thread::hardware_concurrency()));
  app.add_option("--listen", listen, "HOST:PORT to listen on; port 0 picks a free one")->capture_default_str();
  app.add_option("--models", models, "comma-separated model ids")->capture_default_str();
  app.add_option("--context-length", config.context_length, "context window served per model")->capture_default_str();
  app.add_option("--reasoning-tokens", config.reasoning_tokens,
                 "a streamed chat answer's first N tokens go in delta.reasoning_content")
      ->capture_default_str();
  std::string kind = "openai";
  app.add_option("--flavor", kind,
                 "where the window is told: openai (in /v1/models), ollama (POST /api/show), lmstudio "
                 "(GET /api/v0/models) or llamacpp (GET /props; /v1/models gives the trained window)")
      ->check(CLI::IsMember({"openai", "ollama", "lmstudio", "llamacpp"}))
      ->capture_default_str();
  app.add_option("--tokens", config.tokens, "tokens per answer (fewer when max_tokens is smaller)")->capture_default_str();
  app.add_option("--first-token-ms", config.first_token_ms, "delay before the first token")->capture_default_str();
  app.add_option("--token-interval-us", config.token_interval_us, "delay between tokens; 0 = as fast as possible")
      ->capture_default_str();
  app.add_flag("--decode-steps", config.decode_steps,
               "later tokens of all answers go at the ticks of one shared clock (one per token interval), "
               "as from a server decoding its answers in one batch");
  app.add_option("--fail-status", fail_status, "answer every completion with this HTTP status")
      ->check(CLI::Range(400u, 599u));
  std::string chatless;
  app.add_option("--chatless-models", chatless,
                 "comma-separated model ids refused with 400 for a completion, as embedding models are");
  auto* drop = app.add_option("--drop-after-tokens", drop_after,
                              "close the connection after this many tokens, before the answer ends");
  std::string continuation = "restart";
  app.add_option("--continuation", continuation,
                 "what a chat continuing its trailing assistant message (continue_final_message) answers: "
                 "restart (from tok0) or resume (from tok<k>, k = that message's words, to --tokens in all)")
      ->check(CLI::IsMember({"restart", "resume"}))
      ->capture_default_str();
  app.add_option("--usage", usage, "usage reporting: correct, zero, cumulative, lifetime or none")
      ->check(CLI::IsMember({"correct", "zero", "cumulative", "lifetime", "none"}))
      ->capture_default_str();
  app.add_option("--finish-reason", config.finish_reason,
                 "finish_reason of an answer that max_tokens does not cut (JSON-safe characters only)")
      ->check([](const std::string& value) {
        const bool plain = !value.empty() && value.size() <= 64 &&
                           std::all_of(value.begin(), value.end(), [](char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '_'; });
        return plain ? std::string() : std::string("letters, digits and _ only, 1 to 64 of them");
      })
      ->capture_default_str();
  app.add_option("--max-concurrent", config.max_concurrent, "answer 429 beyond this many concurrent completions; 0 = no limit")
      ->capture_default_str();
  app.add_option("--load-ms", config.load_ms, "the first completion (and any during it) waits this long: a model loaded on first use")
      ->capture_default_str();
  app.add_option("--parallel", config.parallel, "most answers at once; the others wait in line for a slot; 0 = no limit")
      ->capture_default_str();
  app.add_option("--api-key", config.api_key, "every request needs Authorization: Bearer KEY (401 without)");
  app.add_option("--connections-max", config.connections_max, "most open connections")->capture_default_str();
  app.add_option("--threads", config.threads, "I/O threads")->check(CLI::Range(1u, 64u))->capture_default_str();
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {  // process edge
    std::exit(app.exit(e));
  }
  const auto colon = listen.rfind(':');
  unsigned port = 0;
  const char* port_end = listen.data() + listen.size();
  if (colon == std::string::npos ||
      std::from_chars(listen.data() + colon + 1, port_end, port).ptr != port_end || port > 65535) {
    std::cerr << "gpustream_test_upstream: --listen wants HOST:PORT, got " << listen << "\n";
    return std::nullopt;
  }
  config.host = listen.substr(0, colon);
  config.port = static_cast<std::uint16_t>(port);
  config.models = split_models(models);
  if (config.models.empty()) {
    std::cerr << "gpustream_test_upstream: --models names no model\n";
    return std::nullopt;
  }
  config.fail_status = fail_status;
  config.chatless_models = split_models(chatless);
  config.kind = kind == "ollama" ? flavor::ollama : kind == "lmstudio" ? flavor::lmstudio
                : kind == "llamacpp" ? flavor::llamacpp : flavor::openai;
  if (drop->count() > 0) config.drop_after_tokens = drop_after;
  config.continuation = continuation == "resume" ? continuation_mode::resume : continuation_mode::restart;
  config.usage = usage == "zero"         ? usage_mode::zero
                 : usage == "cumulative" ? usage_mode::cumulative
                 : usage == "lifetime"   ? usage_mode::lifetime
                 : usage == "none"       ? usage_mode::none
                                         : usage_mode::correct;
  return config;
}

}  // namespace

int main(int argc, char** argv) {
  auto config = parse_arguments(argc, argv);
  if (!config) return 2;
  server upstream(std::move(*config));
  if (!upstream.listen()) return 1;
  upstream.run();
  return 0;
}
