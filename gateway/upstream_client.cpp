#include "gateway/upstream_client.hpp"

#include <boost/asio/bind_executor.hpp>
#include <boost/asio/connect.hpp>
#include <boost/asio/dispatch.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/write.hpp>
#include <boost/beast/core/error.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/http/buffer_body.hpp>
#include <boost/beast/http/error.hpp>
#include <boost/beast/http/parser.hpp>
#include <boost/beast/http/read.hpp>
#include <boost/json/monotonic_resource.hpp>
#include <boost/json/parse.hpp>
#include <boost/json/serialize.hpp>
#include <boost/json/value.hpp>

#include <algorithm>
#include <array>
#include <atomic>
#include <charconv>
#include <limits>
#include <mutex>

#include "base/text.hpp"

namespace gpustream::gateway {
namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
namespace json = boost::json;
using tcp = asio::ip::tcp;
using steady = std::chrono::steady_clock;

/// Body bytes handed over per read. SSE events are small; a bigger piece only waits longer.
constexpr std::size_t read_piece_bytes = 4096;
/// Most bytes of a non-200 answer's body read to find the backend's error message.
constexpr std::size_t error_body_bytes_max = 64 * 1024;
/// Most bytes of the backend's own message kept in an upstream_error.
constexpr std::size_t error_message_bytes_max = 500;
/// Deepest JSON nesting accepted from the backend.
constexpr std::size_t json_depth_max = 64;
/// Stack scratch for parsing one SSE event's JSON without touching the heap.
constexpr std::size_t event_scratch_bytes = 4096;

struct parsed_url {
  std::string host;
  std::string port;
  std::string path;  // without a trailing "/", may be empty
};

expected<parsed_url, std::string> parse_base_url(std::string_view url) {
  constexpr std::string_view scheme = "http://";
  const std::string quoted = "\"" + redacted_url(url) + "\"";
  if (!url.starts_with(scheme)) {
    return unexpected("upstream base_url must start with http:// (only plain HTTP is supported): " + quoted);
  }
  url.remove_prefix(scheme.size());
  const auto slash = url.find('/');
  const std::string_view authority = url.substr(0, slash);
  std::string_view path = slash == std::string_view::npos ? std::string_view{} : url.substr(slash);
  if (path.find_first_of("?#") != std::string_view::npos) {
    return unexpected("upstream base_url must not carry a query or fragment: " + quoted);
  }
  while (path.ends_with('/')) path.remove_suffix(1);
  if (authority.find('@') != std::string_view::npos) {
    return unexpected("upstream base_url must not carry credentials (send a key as api_key: gpustream provider --backend-api-key): " + quoted);
  }
  std::string_view host = authority;
  std::string_view port = "80";
  if (authority.starts_with('[')) {  // IPv6 literal
    const auto close = authority.find(']');
    if (close == std::string_view::npos) return unexpected("upstream base_url has a bad IPv6 host: " + quoted);
    host = authority.substr(1, close - 1);
    const std::string_view rest = authority.substr(close + 1);
    if (!rest.empty()) {
      if (!rest.starts_with(':')) return unexpected("upstream base_url has a bad port: " + quoted);
      port = rest.substr(1);
    }
  } else if (const auto colon = authority.rfind(':'); colon != std::string_view::npos) {
    host = authority.substr(0, colon);
    port = authority.substr(colon + 1);
  }
  if (host.empty()) return unexpected("upstream base_url has no host: " + quoted);
  unsigned number = 0;
  const auto [end, ec] = std::from_chars(port.data(), port.data() + port.size(), number);
  if (ec != std::errc{} || end != port.data() + port.size() || number == 0 || number > 65535) {
    return unexpected("upstream base_url has a bad port: " + quoted);
  }
  return parsed_url{std::string(host), std::string(port), std::string(path)};
}

/// Whether an HTTP status says the backend judged the request itself invalid: 400, 413 and 422.
/// The other 4xx are the provider's own setup or state: 401 and 403 a key the backend wants, 404
/// a model it advertised and no longer serves, 408 and 429 a timeout or an overload.
bool request_refused(unsigned http_status) {
  return http_status == 400 || http_status == 413 || http_status == 422;
}

upstream_error make_error(upstream_error_kind kind, std::string message, unsigned http_status = 0) {
  const bool request_at_fault = kind == upstream_error_kind::http_status && request_refused(http_status);
  return upstream_error{kind, std::move(message), http_status, !request_at_fault};
}

/// Whether a refusal's body (a 400, 413 or 422) blames the model rather than the request: its
/// OpenAI error names `"param":"model"` (LM Studio's "No models loaded" once its model was
/// unloaded), or says LM Studio's "Failed to load model" (e.g. out of memory). The agent asks its
/// backend only for models it advertised, so that is the provider's state, not the client's fault.
bool blames_the_model(std::string_view body) {
  boost::system::error_code ec;
  json::parse_options options;
  options.max_depth = json_depth_max;
  const json::value value = json::parse(body, ec, {}, options);
  if (ec || !value.is_object()) return false;
  const auto* error = value.get_object().if_contains("error");
  if (error == nullptr) return false;
  const json::string* message = nullptr;
  if (error->is_string()) message = &error->get_string();
  if (const auto* object = error->if_object()) {
    if (const auto* param = object->if_contains("param"); param && param->is_string() && param->get_string() == "model") {
      return true;
    }
    if (const auto* text = object->if_contains("message"); text && text->is_string()) message = &text->get_string();
  }
  if (message == nullptr) return false;
  const std::string_view text(message->data(), message->size());
  return text.starts_with("No models loaded") || text.starts_with("Failed to load model");
}

/// Pydantic's messages (vLLM, FastAPI) quote the value they refused after "input_value=", up to
/// ", input_type=": that is the client's request, prompt and all, which the agent neither logs
/// nor sends on. It is cut out.
std::string without_input_values(std::string_view text) {
  constexpr std::string_view marker = "input_value=";
  constexpr std::string_view next = ", input_type=";
  std::string out;
  for (std::size_t at = text.find(marker); at != std::string_view::npos; at = text.find(marker)) {
    out += text.substr(0, at + marker.size());
    out += "(withheld)";
    const std::size_t end = text.find(next, at);
    text = end == std::string_view::npos ? std::string_view() : text.substr(end);
  }
  out += text;
  return out;
}

std::string truncated(std::string_view text) {
  return without_input_values(text).substr(0, error_message_bytes_max);
}

/// FastAPI's validation errors: `"detail": [{"loc": [...], "msg": "...", "input": ...}]`. Each
/// item's place and message, never its `input` (the client's request).
std::string detail_list_text(const json::array& details) {
  std::string text;
  for (const auto& item : details) {
    const auto* object = item.if_object();
    if (object == nullptr) continue;
    if (!text.empty()) text += "; ";
    if (const auto* loc = object->if_contains("loc"); loc && loc->is_array()) {
      std::string place;
      for (const auto& part : loc->get_array()) {
        if (!place.empty()) place += '.';
        place += part.is_string() ? std::string(part.get_string()) : json::serialize(part);
      }
      if (!place.empty()) text += place + ": ";
    }
    const auto* message = object->if_contains("msg");
    text += message && message->is_string() ? std::string(message->get_string()) : std::string("invalid");
    if (text.size() >= error_message_bytes_max) break;
  }
  return text.empty() ? std::string("(no message)") : truncated(text);
}

/// The message inside an OpenAI-style `error` member: an object with `message`, or a string.
std::string error_text(const json::value& error) {
  if (error.is_string()) return truncated(error.get_string());
  if (const auto* object = error.if_object()) {
    if (const auto* message = object->if_contains("message"); message && message->is_string()) {
      return truncated(message->get_string());
    }
  }
  return "(no message)";
}

/// The backend's message in a non-200 answer: `{"error":{"message":…}}` (OpenAI, vLLM, LM
/// Studio), `{"error":"…"}` (Ollama), `{"message":…}` or `{"detail":…}` (FastAPI), else the text.
std::string error_body_message(std::string_view body) {
  boost::system::error_code ec;
  json::parse_options options;
  options.max_depth = json_depth_max;
  const json::value value = json::parse(body, ec, {}, options);
  if (!ec) {
    if (const auto* object = value.if_object()) {
      if (const auto* error = object->if_contains("error")) return error_text(*error);
      for (const char* key : {"message", "detail"}) {
        if (const auto* text = object->if_contains(key); text && text->is_string()) {
          return truncated(text->get_string());
        }
      }
      if (const auto* details = object->if_contains("detail"); details && details->is_array()) {
        return detail_list_text(details->get_array());
      }
    }
    // A JSON body of another shape may hold anything, the request included: not shown.
    return "(a JSON body of " + std::to_string(body.size()) + " bytes, in a shape not known)";
  }
  // Nor one cut short (or kept only in part, past error_body_bytes_max): it may be a message
  // quoting the request whose end never came.
  if (const auto start = body.find_first_not_of(" \t\r\n");
      start != std::string_view::npos && (body[start] == '{' || body[start] == '[')) {
    return "(an incomplete JSON body of " + std::to_string(body.size()) + " bytes, not shown)";
  }
  std::string text = truncated(body);
  for (char& c : text) {
    if (static_cast<unsigned char>(c) < 0x20) c = ' ';
  }
  return text.empty() ? std::string("(empty body)") : text;
}

std::uint32_t to_u32(const json::value* value) {
  if (value == nullptr) return 0;
  constexpr auto top = std::numeric_limits<std::uint32_t>::max();
  if (value->is_int64()) return static_cast<std::uint32_t>(std::clamp<std::int64_t>(value->get_int64(), 0, top));
  if (value->is_uint64()) return static_cast<std::uint32_t>(std::min<std::uint64_t>(value->get_uint64(), top));
  if (value->is_double()) {
    return static_cast<std::uint32_t>(std::clamp(value->get_double(), 0.0, static_cast<double>(top)));
  }
  return 0;
}

std::optional<upstream_usage> read_usage(const json::object& object) {
  const auto* usage = object.if_contains("usage");
  if (usage == nullptr || !usage->is_object()) return std::nullopt;
  const auto& fields = usage->get_object();
  return upstream_usage{to_u32(fields.if_contains("prompt_tokens")), to_u32(fields.if_contains("completion_tokens"))};
}

/// What one choice of a completion (chunk or whole) says: its text, a reasoning model's thinking,
/// and finish_reason.
struct choice_view {
  std::string_view text;
  std::string_view reasoning;
  const json::string* finish_reason = nullptr;
};

/// choices[] entry with index 0 (the only one asked for); `delta.content` (chat chunk),
/// `message.content` (chat) or `text` (completions); the thinking in `reasoning_content`
/// (llama.cpp server, vLLM, LM Studio, DeepSeek) or `reasoning` (Ollama, newer vLLM) beside content.
std::optional<choice_view> first_choice(const json::object& object) {
  const auto* choices = object.if_contains("choices");
  if (choices == nullptr || !choices->is_array()) return std::nullopt;
  for (const auto& entry : choices->get_array()) {
    const auto* choice = entry.if_object();
    if (choice == nullptr) continue;
    if (const auto* index = choice->if_contains("index"); index && to_u32(index) != 0) continue;
    choice_view view;
    for (const char* holder : {"delta", "message"}) {
      if (const auto* part = choice->if_contains(holder); part && part->is_object()) {
        if (const auto* content = part->get_object().if_contains("content"); content && content->is_string()) {
          view.text = content->get_string();
        }
        for (const char* name : {"reasoning_content", "reasoning"}) {
          const auto* thinking = part->get_object().if_contains(name);
          if (thinking != nullptr && thinking->is_string() && !thinking->get_string().empty()) {
            view.reasoning = thinking->get_string();
            break;
          }
        }
      }
    }
    if (const auto* text = choice->if_contains("text"); text && text->is_string()) view.text = text->get_string();
    if (const auto* reason = choice->if_contains("finish_reason"); reason && reason->is_string()) {
      view.finish_reason = &reason->get_string();
    }
    return view;
  }
  return std::nullopt;
}

upstream_model model_entry(const json::object& model) {
  upstream_model out;
  if (const auto* id = model.if_contains("id"); id != nullptr && id->is_string()) out.id = id->get_string();
  for (const char* key : {"context_length", "max_model_len", "loaded_context_length", "max_context_length"}) {
    if (const auto value = to_u32(model.if_contains(key)); value != 0) {
      out.context_length_tokens = value;
      return out;
    }
  }
  if (const auto* meta = model.if_contains("meta"); meta && meta->is_object()) {
    out.context_length_tokens = to_u32(meta->get_object().if_contains("n_ctx_train"));
    out.context_is_trained = out.context_length_tokens != 0;
  }
  return out;
}

}  // namespace

std::string redacted_url(std::string_view url) {
  const auto query = std::min(url.find_first_of("?#"), url.size());
  std::string shown(url.substr(0, query));
  const auto scheme = shown.find("://");
  const auto start = scheme == std::string::npos ? 0 : scheme + 3;
  const auto end = std::min(shown.find('/', start), shown.size());
  if (const auto at = shown.substr(start, end - start).rfind('@'); at != std::string::npos) {
    shown.replace(start, at + 1, "***@");
  }
  if (query < url.size()) shown += "?***";
  return shown;
}

expected<std::vector<upstream_model>, upstream_error> parse_models(std::string_view body, std::size_t models_max) {
  boost::system::error_code ec;
  json::parse_options options;
  options.max_depth = json_depth_max;
  const json::value value = json::parse(body, ec, {}, options);
  const json::value* data = nullptr;
  if (!ec && value.is_object()) data = value.get_object().if_contains("data");
  if (data == nullptr || !data->is_array()) {
    return unexpected(make_error(upstream_error_kind::protocol,
                                 "upstream models list is not JSON of the form {\"data\":[…]}"));
  }
  std::vector<upstream_model> models;
  for (const auto& entry : data->get_array()) {
    if (models.size() == models_max) break;
    const auto* model = entry.if_object();
    if (model == nullptr) continue;
    auto parsed = model_entry(*model);
    if (parsed.id.empty()) continue;
    models.push_back(std::move(parsed));
  }
  return models;
}

std::string_view to_string(upstream_error_kind kind) noexcept {
  switch (kind) {
    case upstream_error_kind::connect: return "connect";
    case upstream_error_kind::timeout: return "timeout";
    case upstream_error_kind::http_status: return "http_status";
    case upstream_error_kind::protocol: return "protocol";
    case upstream_error_kind::too_large: return "too_large";
    case upstream_error_kind::dropped: return "dropped";
    case upstream_error_kind::backend: return "backend";
  }
  return "unknown";
}

// ---------------------------------------------------------------------------------------------
// SSE parsing

bool upstream_sse_parser::within_limit(std::size_t pending_bytes) {
  if (data_.size() + pending_bytes <= event_bytes_max_) return true;
  failed_ = true;
  return false;
}

expected<void, std::string> upstream_sse_parser::feed(
    std::string_view bytes, const std::function<bool(std::string_view data)>& on_event) {
  const auto too_big = [this] {
    return unexpected("an upstream event exceeds event_bytes_max (" + std::to_string(event_bytes_max_) + " bytes)");
  };
  if (failed_) return too_big();
  if (bytes.empty()) return {};
  std::size_t at = 0;
  if (after_cr_ && bytes.front() == '\n') at = 1;  // the "\n" of a "\r\n" split across reads
  after_cr_ = false;
  while (at < bytes.size()) {
    const auto end = find_line_break(bytes, at);
    if (end == std::string_view::npos) {
      if (!within_limit(line_.size() + bytes.size() - at)) return too_big();
      line_.append(bytes.substr(at));
      return {};
    }
    std::string_view line = bytes.substr(at, end - at);
    if (!line_.empty()) {  // the line began in an earlier read
      line_.append(line);
      line = line_;
    }
    if (!within_limit(line.size())) return too_big();
    at = end + 1;
    if (bytes[end] == '\r') {
      if (at < bytes.size() && bytes[at] == '\n') {
        ++at;
      } else if (at == bytes.size()) {
        after_cr_ = true;
      }
    }
    const bool go_on = take_line(line, on_event);
    line_.clear();
    if (!go_on) return {};
    if (failed_) return too_big();
  }
  return {};
}

void upstream_sse_parser::finish(const std::function<bool(std::string_view data)>& on_event) {
  if (failed_) return;  // feed() reported it
  // feed() already judged the pending line against the limit.
  const std::string line = std::exchange(line_, {});
  if (!line.empty() && !take_line(line, on_event)) return;
  (void)take_line({}, on_event);  // the blank line that ends the event, if one is pending
}

bool upstream_sse_parser::take_line(std::string_view line, const std::function<bool(std::string_view)>& on_event) {
  if (line.empty()) {  // a blank line ends the event
    if (!has_data_) return true;
    has_data_ = false;
    const bool go_on = on_event(data_);
    data_.clear();
    return go_on;
  }
  if (line.front() == ':') return true;  // a comment, often a keep-alive
  const auto colon = line.find(':');
  const std::string_view field = line.substr(0, colon);
  std::string_view value = colon == std::string_view::npos ? std::string_view{} : line.substr(colon + 1);
  if (value.starts_with(' ')) value.remove_prefix(1);
  if (field == "error") {
    // llama.cpp server reports a failure mid-stream in a field of its own, `error: {"code":…,
    // "message":…}`: read as the event `data: {"error":…}` that OpenAI's servers send.
    if (!within_limit(value.size() + 16)) return true;  // feed() reports the failure
    data_ = R"({"error":)" + (value.starts_with('{') ? std::string(value) : json::serialize(json::string(value))) + "}";
    has_data_ = true;
    return true;
  }
  if (field != "data") return true;  // event, id, retry: nothing a completion needs
  if (!within_limit(value.size() + 1)) return true;  // feed() reports the failure
  if (has_data_) data_.push_back('\n');
  data_.append(value);
  has_data_ = true;
  return true;
}

// ---------------------------------------------------------------------------------------------
// The client's shared state: where the backend is and the idle keep-alive connections.

class upstream_client::impl {
 public:
  impl(asio::io_context& io, upstream_options options, parsed_url url, std::optional<tcp::endpoint> endpoint)
      : io_(io), options_(std::move(options)), url_(std::move(url)), endpoint_(endpoint) {
    const bool default_port = url_.port == "80";
    const bool ipv6 = url_.host.find(':') != std::string::npos;
    const std::string host = ipv6 ? "[" + url_.host + "]" : url_.host;
    fixed_headers_ = "Host: " + host + (default_port ? "" : ":" + url_.port) + "\r\n";
    fixed_headers_ += "User-Agent: gpustream\r\nConnection: keep-alive\r\n";
    if (!options_.api_key.empty()) fixed_headers_ += "Authorization: Bearer " + options_.api_key + "\r\n";
  }

  asio::io_context& io() noexcept { return io_; }
  const upstream_options& options() const noexcept { return options_; }
  const parsed_url& url() const noexcept { return url_; }
  const std::optional<tcp::endpoint>& endpoint() const noexcept { return endpoint_; }
  std::string where() const { return url_.host + ":" + url_.port; }

  /// The request's head for `path` under the base URL's path, or (from_root) under its root:
  /// the base URL's path without a last "/v1", where LM Studio, Ollama and llama.cpp server
  /// answer their own APIs.
  std::string request_head(std::string_view method, std::string_view path, std::size_t body_bytes,
                           bool from_root = false) const {
    std::string_view base = url_.path;
    if (from_root && base.ends_with("/v1")) base.remove_suffix(3);
    std::string head;
    head.reserve(256);
    head.append(method).append(" ").append(base).append(path).append(" HTTP/1.1\r\n");
    head.append(fixed_headers_);
    if (method == "POST") {
      head.append("Content-Type: application/json\r\nAccept: text/event-stream, application/json\r\n");
      head.append("Content-Length: ").append(std::to_string(body_bytes)).append("\r\n");
    } else {
      head.append("Accept: application/json\r\n");
    }
    head.append("\r\n");
    return head;
  }

  std::optional<tcp::socket> take_idle() {
    std::lock_guard lock(idle_mutex_);
    if (idle_.empty()) return std::nullopt;
    tcp::socket socket = std::move(idle_.back());
    idle_.pop_back();
    return socket;
  }

  void give_back(tcp::socket socket) {
    std::lock_guard lock(idle_mutex_);
    if (idle_.size() < options_.idle_connections_max) idle_.push_back(std::move(socket));
    // else the socket closes as it goes out of scope
  }

 private:
  asio::io_context& io_;
  upstream_options options_;
  parsed_url url_;
  std::optional<tcp::endpoint> endpoint_;  // set when the host is a literal address
  std::string fixed_headers_;
  std::mutex idle_mutex_;
  std::vector<tcp::socket> idle_;
};

// ---------------------------------------------------------------------------------------------
// One exchange with the backend: connect (or reuse), send, read the answer as a stream or whole.

class upstream_request::impl : public std::enable_shared_from_this<upstream_request::impl> {
 public:
  using whole_handler = std::function<void(expected<std::string, upstream_error>)>;

  impl(std::shared_ptr<upstream_client::impl> client, std::string head, std::string body)
      : client_(std::move(client)),
        strand_(asio::make_strand(client_->io())),
        socket_(client_->io()),
        resolver_(strand_),
        timer_(strand_),
        head_(std::move(head)),
        body_(std::move(body)),
        sse_(client_->options().event_bytes_max) {}

  // Called on one of the io_context's threads (the agent takes offers on its only one), the
  // request is written now rather than after the handlers already queued: begin() only starts
  // operations, and no callback of the request runs before start_* returns.
  void start_stream(upstream_stream_handlers handlers) {
    handlers_ = std::move(handlers);
    asio::dispatch(strand_, [self = shared_from_this()] { self->begin(); });
  }

  void start_whole(whole_handler done) {
    whole_done_ = std::move(done);
    answer_ = answer::whole;
    asio::dispatch(strand_, [self = shared_from_this()] { self->begin(); });
  }

  void cancel() {
    {
      std::lock_guard lock(callback_mutex_);
      cancelled_ = true;
    }
    asio::dispatch(strand_, [self = shared_from_this()] { self->close(); });
  }

 private:
  enum class answer { stream, whole };                       // what the caller asked for
  enum class body_use { events, completion, collect, error };  // what the body turned out to be

  template <class Handler>
  auto on_strand(Handler&& handler) {
    return asio::bind_executor(strand_, std::forward<Handler>(handler));
  }

  bool stopped() const noexcept { return cancelled_.load(std::memory_order_relaxed) || over_; }

  void begin() {
    if (stopped()) return;
    if (auto socket = client_->take_idle()) {
      socket_ = std::move(*socket);
      reused_ = true;
      return send();
    }
    connect();
  }

  void connect() {
    set_deadline(steady::now() + client_->options().connect_timeout);
    if (const auto& endpoint = client_->endpoint()) {
      socket_.async_connect(*endpoint, on_strand([self = shared_from_this()](beast::error_code ec) {
        self->on_connect(ec);
      }));
      return;
    }
    resolver_.async_resolve(
        client_->url().host, client_->url().port,
        on_strand([self = shared_from_this()](beast::error_code ec, tcp::resolver::results_type results) {
          if (ec) return self->on_connect(ec);
          asio::async_connect(self->socket_, results,
                              self->on_strand([self](beast::error_code ec2, const tcp::endpoint&) {
                                self->on_connect(ec2);
                              }));
        }));
  }

  void on_connect(beast::error_code ec) {
    if (stopped()) return;
    if (ec) {
      const std::string what = "cannot connect to upstream " + client_->where() + ": ";
      if (timed_out_) {
        return fail(make_error(upstream_error_kind::connect,
                               what + "timed out after " + std::to_string(client_->options().connect_timeout.count()) + " ms"));
      }
      auto error = make_error(upstream_error_kind::connect, what + ec.message());
      error.refused = ec == asio::error::connection_refused;
      return fail(std::move(error));
    }
    beast::error_code ignored;
    socket_.set_option(tcp::no_delay(true), ignored);  // tokens are small writes: no Nagle delay
    send();
  }

  void send() {
    touch();
    parser_.emplace();
    parser_->header_limit(static_cast<std::uint32_t>(
        std::min<std::size_t>(client_->options().header_bytes_max, std::numeric_limits<std::uint32_t>::max())));
    parser_->body_limit(body_bytes_max().second);
    buffer_.clear();
    const std::array<asio::const_buffer, 2> pieces{asio::buffer(head_), asio::buffer(body_)};
    asio::async_write(socket_, pieces, on_strand([self = shared_from_this()](beast::error_code ec, std::size_t) {
                        self->on_sent(ec);
                      }));
  }

  void on_sent(beast::error_code ec) {
    if (stopped()) return;
    if (ec) {
      if (may_retry()) return retry();
      return fail(failure(ec, "sending the request"));
    }
    http::async_read_header(socket_, buffer_, *parser_,
                            on_strand([self = shared_from_this()](beast::error_code ec2, std::size_t) {
                              self->on_header(ec2);
                            }));
  }

  // A kept-alive connection may have been closed by the backend while idle: if it fails before
  // a single byte of the answer came back, the request is sent again on a new connection.
  bool may_retry() const { return reused_ && !retried_ && !parser_->got_some() && !timed_out_; }

  void retry() {
    retried_ = true;
    reused_ = false;
    beast::error_code ignored;
    socket_.close(ignored);
    socket_ = tcp::socket(client_->io());
    connect();
  }

  void on_header(beast::error_code ec) {
    if (stopped()) return;
    if (ec) {
      if (may_retry()) return retry();
      return fail(failure(ec, "reading the response header"));
    }
    const auto& header = parser_->get();
    status_ = header.result_int();
    if (status_ != 200) {
      use_ = body_use::error;
    } else if (answer_ == answer::whole) {
      use_ = body_use::collect;
    } else {
      const auto type = header[http::field::content_type];
      if (type.starts_with("text/event-stream")) {
        use_ = body_use::events;
      } else if (type.find("json") != std::string_view::npos) {
        use_ = body_use::completion;
      } else {
        return fail(make_error(upstream_error_kind::protocol,
                               "upstream answered 200 with content type \"" + truncated(type) +
                                   "\", neither an event stream nor JSON"));
      }
    }
    touch();  // the body's silence, as use_ says (awaiting_first_event)
    if (parser_->is_done()) return on_body_complete();
    read_body();
  }

  void read_body() {
    auto& body = parser_->get().body();
    body.data = piece_.data();
    body.size = piece_.size();
    body.more = true;
    http::async_read_some(socket_, buffer_, *parser_,
                          on_strand([self = shared_from_this()](beast::error_code ec, std::size_t) {
                            self->on_body(ec);
                          }));
  }

  void on_body(beast::error_code ec) {
    touch();
    if (cancelled_.load(std::memory_order_relaxed)) return;
    if (ec == http::error::need_buffer) ec = {};
    const std::size_t got = piece_.size() - parser_->get().body().size;
    if (got > 0 && !consume(std::string_view(piece_.data(), got))) return;
    if (done_seen_ && !over_) return finish_after_done(ec);
    if (ec) {
      if (over_) return close();  // the answer was complete ([DONE] came); only the tail was lost
      if (use_ == body_use::events && !finish_reason_.empty()) {
        // The finish chunk came, then the connection broke before the body's proper end (a
        // server that closes without its last zero-length chunk): the answer is whole. A usage
        // event that was on its way is lost (a half-read event is never parsed): usage is then
        // what came before, often none, which the token cross-check takes as nothing to check.
        close();
        return deliver_done();
      }
      if (use_ == body_use::error) {
        // The status said it already: an error answer cut short (or stalled) is that answer, with
        // the message as far as it came. Reported as a broken connection, a refusal of the
        // request itself (400, 413, 422) would count against the provider and fail over.
        close();
        return fail(status_error());
      }
      return fail(failure(ec, "reading the response"));
    }
    if (parser_->is_done()) return on_body_complete();
    read_body();
  }

  /// `data: [DONE]` arrived. What is already buffered (usually the end of the chunked body) is
  /// parsed first, so that the connection is back in the pool before the caller hears of the end
  /// and sends its next request; a tail still in flight is drained in the background.
  void finish_after_done(beast::error_code ec) {
    if (!ec) parse_buffered();
    if (!ec && parser_->is_done()) {
      recycle();
      return deliver_done();
    }
    deliver_done();
    if (ec) return close();
    read_body();
  }

  void parse_buffered() {
    while (!parser_->is_done() && buffer_.size() > 0) {
      auto& body = parser_->get().body();
      body.data = piece_.data();  // bytes after [DONE] are not needed: overwritten at will
      body.size = piece_.size();
      body.more = true;
      beast::error_code ec;
      const auto used = parser_->put(buffer_.data(), ec);
      buffer_.consume(used);
      if (ec && ec != http::error::need_buffer) return;
      if (used == 0) return;
    }
  }

  /// Takes body bytes; false when the exchange has ended (failed, or collected enough).
  bool consume(std::string_view bytes) {
    switch (use_) {
      case body_use::events: {
        if (done_seen_) return true;  // draining what follows [DONE] so the connection can be reused
        const auto fed = sse_.feed(bytes, [this](std::string_view data) { return on_event(data); });
        if (!fed) {
          fail(make_error(upstream_error_kind::too_large, fed.error()));
          return false;
        }
        return !closed_;
      }
      case body_use::error:
        collected_.append(bytes.substr(0, error_body_bytes_max - std::min(error_body_bytes_max, collected_.size())));
        if (collected_.size() >= error_body_bytes_max) {
          fail(status_error());
          return false;
        }
        return true;
      case body_use::completion:
      case body_use::collect:
        collected_.append(bytes);  // bounded by the parser's body limit
        return true;
    }
    return true;
  }

  /// One SSE event's data; false stops the parser.
  bool on_event(std::string_view data) {
    if (!std::exchange(event_seen_, true)) touch();  // from now on idle_timeout applies
    if (data == "[DONE]") {
      done_seen_ = true;
      return false;
    }
    std::array<unsigned char, event_scratch_bytes> scratch;
    json::monotonic_resource memory(scratch.data(), scratch.size());
    json::parse_options options;
    options.max_depth = json_depth_max;
    boost::system::error_code ec;
    const json::value value = json::parse(data, ec, &memory, options);
    if (ec || !value.is_object()) {
      fail(make_error(upstream_error_kind::protocol, "upstream sent a stream event that is not a JSON object"));
      return false;
    }
    const auto& object = value.get_object();
    if (const auto* error = object.if_contains("error"); error && !error->is_null()) {
      auto failure = make_error(upstream_error_kind::backend, "upstream reported an error mid-stream: " + error_text(*error));
      // llama.cpp server says why with an HTTP-like code and its own type: a 400 of type
      // invalid_request_error or exceed_context_size_error (a prompt over the context) is the
      // request's fault, as the same status would be at the start. vLLM sends whatever failed in
      // its engine (out of memory, a crash) as a 400 "BadRequestError": the backend's fault.
      if (const auto* fields = error->if_object()) {
        const auto* type = fields->if_contains("type");
        const bool request_type = type != nullptr && type->is_string() &&
                                  (type->get_string() == "invalid_request_error" ||
                                   type->get_string() == "exceed_context_size_error");
        if (request_type && request_refused(to_u32(fields->if_contains("code")))) failure.upstream_fault = false;
      }
      fail(std::move(failure));
      return false;
    }
    if (auto usage = read_usage(object)) usage_ = usage;
    if (const auto choice = first_choice(object)) {
      if (choice->finish_reason != nullptr) finish_reason_ = *choice->finish_reason;
      if (!choice->reasoning.empty()) deliver_piece(handlers_.on_reasoning, choice->reasoning);
      if (!choice->text.empty()) deliver_piece(handlers_.on_delta, choice->text);
    }
    return !stopped();
  }

  /// The body was read to its end: the connection goes back to the pool first, then the caller
  /// hears the outcome (so that its next request can reuse the connection).
  void on_body_complete() {
    if (stopped()) return recycle();
    switch (use_) {
      case body_use::events:
        sse_.finish([this](std::string_view data) { return on_event(data); });
        if (closed_) return;  // the last event reported an error
        if (done_seen_) {
          recycle();
          return deliver_done();
        }
        // Some servers end the body right after the finish chunk without [DONE]: that is complete.
        if (finish_reason_.empty()) {
          return fail(make_error(upstream_error_kind::dropped,
                                 "upstream stream ended without [DONE] or a finish_reason"));
        }
        recycle();
        return deliver_done();
      case body_use::completion:
        return deliver_completion();
      case body_use::collect:
        recycle();
        return deliver_whole();
      case body_use::error:
        recycle();
        return deliver_error(status_error());
    }
  }

  /// A whole JSON completion (the backend ignored "stream": true): one delta, then done.
  void deliver_completion() {
    boost::system::error_code ec;
    json::parse_options options;
    options.max_depth = json_depth_max;
    const json::value value = json::parse(collected_, ec, {}, options);
    if (ec || !value.is_object()) {
      return fail(make_error(upstream_error_kind::protocol, "upstream answered with a JSON body that does not parse"));
    }
    const auto& object = value.get_object();
    if (const auto* error = object.if_contains("error"); error && !error->is_null()) {
      return fail(make_error(upstream_error_kind::backend, "upstream reported an error: " + error_text(*error)));
    }
    const auto choice = first_choice(object);
    if (!choice) {
      return fail(make_error(upstream_error_kind::protocol, "upstream completion has no choices"));
    }
    usage_ = read_usage(object);
    if (choice->finish_reason != nullptr) finish_reason_ = *choice->finish_reason;
    recycle();
    // One piece per token, as a stream's: whoever counts pieces counts the answer's tokens.
    const std::size_t thinking = choice->reasoning.size();
    const std::size_t bytes = thinking + choice->text.size();
    // Its usage when plausible (at most a token per two bytes: not a count added up over answers),
    // else an estimate.
    const bool plausible = usage_ && usage_->completion_tokens > 0 && usage_->completion_tokens <= (bytes + 1) / 2;
    const std::size_t tokens = plausible ? usage_->completion_tokens : (bytes + 3) / 4;
    const std::size_t thinking_tokens = bytes == 0 ? 0 : static_cast<std::size_t>(std::uint64_t{tokens} * thinking / bytes);
    deliver_pieces(handlers_.on_reasoning, choice->reasoning, thinking_tokens);
    deliver_pieces(handlers_.on_delta, choice->text, tokens - thinking_tokens);
    deliver_done();
  }

  /// `text` in `count` pieces of about equal size (at least one, at most one per byte), each
  /// ending on a UTF-8 character's boundary.
  void deliver_pieces(const std::function<void(std::string_view)>& handler, std::string_view text, std::size_t count) {
    if (text.empty()) return;
    count = std::clamp<std::size_t>(count, 1, text.size());
    std::size_t from = 0;
    for (std::size_t i = 1; i <= count && from < text.size(); ++i) {
      std::size_t to = i == count ? text.size() : std::max(from + 1, text.size() * i / count);
      while (to < text.size() && (static_cast<unsigned char>(text[to]) & 0xC0) == 0x80) ++to;
      deliver_piece(handler, text.substr(from, to - from));
      from = to;
    }
  }

  upstream_error status_error() const {
    auto error = make_error(upstream_error_kind::http_status,
                            "upstream answered HTTP " + std::to_string(status_) + ": " + error_body_message(collected_),
                            status_);
    if (!error.upstream_fault && blames_the_model(collected_)) error.upstream_fault = true;
    return error;
  }

  upstream_error failure(beast::error_code ec, std::string_view doing) const {
    const std::string at = " (" + std::string(doing) + " from " + client_->where() + ")";
    if (timed_out_) {
      return make_error(upstream_error_kind::timeout,
                        "no data from upstream for " + std::to_string(silence_allowed_.count()) + " ms" +
                            (awaiting_first_event() ? " before the first event" : "") + at);
    }
    if (ec == http::error::body_limit) {
      const auto [name, limit] = body_bytes_max();
      return make_error(upstream_error_kind::too_large, "upstream response exceeds " + std::string(name) + " (" +
                                                            std::to_string(limit) + " bytes)" + at);
    }
    if (ec == http::error::header_limit || ec == http::error::buffer_overflow) {
      return make_error(upstream_error_kind::too_large,
                        "upstream response header exceeds header_bytes_max (" +
                            std::to_string(client_->options().header_bytes_max) + " bytes)" + at);
    }
    if (ec == http::error::end_of_stream || ec == http::error::partial_message || ec == asio::error::eof ||
        ec == asio::error::connection_reset || ec == asio::error::broken_pipe ||
        ec == asio::error::connection_aborted || ec == asio::error::operation_aborted) {
      return make_error(upstream_error_kind::dropped, "upstream closed the connection before the answer was complete" + at);
    }
    if (ec.category() == http::make_error_code(http::error::bad_chunk).category()) {
      return make_error(upstream_error_kind::protocol, "malformed HTTP from upstream: " + ec.message() + at);
    }
    return make_error(upstream_error_kind::dropped, "upstream connection failed: " + ec.message() + at);
  }

  // ---- callbacks: under callback_mutex_, never after cancel() or a final callback

  /// A piece of the answer (`on_delta`) or of the thinking (`on_reasoning`) to `handler`.
  void deliver_piece(const std::function<void(std::string_view)>& handler, std::string_view text) {
    std::lock_guard lock(callback_mutex_);
    if (cancelled_ || over_) return;
    if (handler) handler(text);
  }

  void deliver_done() {
    std::lock_guard lock(callback_mutex_);
    if (cancelled_ || over_) return;
    over_ = true;
    if (handlers_.on_done) handlers_.on_done(finish_reason_, usage_);
  }

  void deliver_whole() {
    std::lock_guard lock(callback_mutex_);
    if (cancelled_ || over_) return;
    over_ = true;
    if (whole_done_) whole_done_(std::move(collected_));
  }

  void deliver_error(upstream_error error) {
    std::lock_guard lock(callback_mutex_);
    if (cancelled_ || over_) return;
    over_ = true;
    if (answer_ == answer::whole) {
      if (whole_done_) whole_done_(unexpected(std::move(error)));
    } else if (handlers_.on_error) {
      handlers_.on_error(std::move(error));
    }
  }

  void fail(upstream_error error) {
    close();
    deliver_error(std::move(error));
  }

  // ---- connection end

  /// Keeps the connection for the next request when the answer was read to its end.
  void recycle() {
    timer_.cancel();
    const bool reusable = !closed_ && !cancelled_ && parser_ && parser_->is_done() && parser_->keep_alive() &&
                          buffer_.size() == 0 && client_->options().idle_connections_max > 0;
    if (!reusable) return close();
    closed_ = true;
    client_->give_back(std::move(socket_));
  }

  void close() {
    closed_ = true;
    timer_.cancel();
    resolver_.cancel();
    beast::error_code ignored;
    socket_.shutdown(tcp::socket::shutdown_both, ignored);  // the backend may be gone already
    socket_.close(ignored);
  }

  // ---- deadlines: one timer, re-armed only when it fires early, so a busy stream costs no
  // timer operation per read

  /// The largest body this request takes, and the option that sets it.
  std::pair<std::string_view, std::size_t> body_bytes_max() const {
    const auto& options = client_->options();
    if (answer_ == answer::whole) return {"list_bytes_max", options.list_bytes_max};
    return {"response_bytes_max", options.response_bytes_max};
  }

  /// Until a streamed answer's first event the backend may be reading a long prompt in silence.
  /// Not so an error answer or a whole JSON answer, whose header came once the body was ready.
  bool awaiting_first_event() const noexcept {
    return answer_ == answer::stream && use_ == body_use::events && !event_seen_;
  }

  void touch() {
    const auto& options = client_->options();
    silence_allowed_ = awaiting_first_event() ? options.first_token_timeout : options.idle_timeout;
    set_deadline(steady::now() + silence_allowed_);
  }

  void set_deadline(steady::time_point deadline) {
    deadline_ = deadline;
    if (closed_) return;
    if (timer_armed_ && armed_until_ <= deadline) return;  // fires first, then re-arms
    arm(deadline);
  }

  void arm(steady::time_point until) {
    timer_armed_ = true;
    armed_until_ = until;
    const auto generation = ++timer_generation_;
    timer_.expires_at(until);  // cancels a pending wait, whose handler then sees an old generation
    timer_.async_wait(on_strand([self = shared_from_this(), generation](beast::error_code ec) {
      self->on_timer(ec, generation);
    }));
  }

  void on_timer(beast::error_code ec, std::uint64_t generation) {
    if (generation != timer_generation_) return;
    timer_armed_ = false;
    if (ec == asio::error::operation_aborted || closed_) return;
    if (steady::now() < deadline_) return arm(deadline_);
    if (stopped()) return close();  // an answer already delivered whose tail never came
    timed_out_ = true;
    // Closing makes the pending connect or read complete with an error, reported as a timeout.
    beast::error_code ignored;
    resolver_.cancel();
    socket_.close(ignored);
  }

  std::shared_ptr<upstream_client::impl> client_;
  asio::strand<asio::io_context::executor_type> strand_;
  tcp::socket socket_;
  tcp::resolver resolver_;
  asio::steady_timer timer_;
  std::string head_;
  std::string body_;
  beast::flat_buffer buffer_;
  std::optional<http::response_parser<http::buffer_body>> parser_;
  std::array<char, read_piece_bytes> piece_;
  upstream_sse_parser sse_;

  answer answer_ = answer::stream;
  body_use use_ = body_use::events;
  upstream_stream_handlers handlers_;
  whole_handler whole_done_;
  std::string collected_;
  std::string finish_reason_;
  std::optional<upstream_usage> usage_;
  unsigned status_ = 0;

  steady::time_point deadline_;
  steady::time_point armed_until_;
  std::uint64_t timer_generation_ = 0;
  bool timer_armed_ = false;
  bool timed_out_ = false;
  bool reused_ = false;
  bool retried_ = false;
  bool closed_ = false;
  bool done_seen_ = false;  // `data: [DONE]` arrived
  bool event_seen_ = false;  // a streamed answer's first event arrived
  std::chrono::milliseconds silence_allowed_{0};  // what the last touch() allowed

  // Callbacks run under this lock so that cancel() from another thread waits for one in
  // progress; recursive because a callback may cancel its own request.
  std::recursive_mutex callback_mutex_;
  std::atomic<bool> cancelled_ = false;
  bool over_ = false;  // a final callback was delivered (guarded by callback_mutex_)
};

upstream_request::upstream_request(std::shared_ptr<impl> state) : impl_(std::move(state)) {}

void upstream_request::cancel() { impl_->cancel(); }

// ---------------------------------------------------------------------------------------------

upstream_client::upstream_client(std::shared_ptr<impl> state) : impl_(std::move(state)) {}

expected<upstream_client, std::string> upstream_client::create(asio::io_context& io, upstream_options options) {
  auto url = parse_base_url(options.base_url);
  if (!url) return unexpected(std::move(url).error());
  std::optional<tcp::endpoint> endpoint;
  beast::error_code ec;
  const auto address = asio::ip::make_address(url->host, ec);
  if (!ec) endpoint = tcp::endpoint(address, static_cast<std::uint16_t>(std::stoul(url->port)));
  return upstream_client(std::make_shared<impl>(io, std::move(options), std::move(*url), endpoint));
}

void upstream_client::list_models(
    std::function<void(expected<std::vector<upstream_model>, upstream_error>)> done) {
  auto request = std::make_shared<upstream_request::impl>(impl_, impl_->request_head("GET", "/models", 0), std::string());
  request->start_whole([done = std::move(done), models_max = impl_->options().models_max](
                           expected<std::string, upstream_error> body) {
    if (!body) return done(unexpected(std::move(body).error()));
    done(parse_models(*body, models_max));
  });
}

void upstream_client::fetch_from_root(std::string_view path, std::optional<std::string> body,
                                     std::function<void(expected<std::string, upstream_error>)> done) {
  const std::string_view method = body ? "POST" : "GET";
  std::string content = body ? std::move(*body) : std::string();
  auto head = impl_->request_head(method, path, content.size(), /*from_root=*/true);
  auto request = std::make_shared<upstream_request::impl>(impl_, std::move(head), std::move(content));
  request->start_whole(std::move(done));
}

std::shared_ptr<upstream_request> upstream_client::stream(std::string_view path, std::string body,
                                                          upstream_stream_handlers handlers) {
  auto head = impl_->request_head("POST", path, body.size());
  auto request = std::make_shared<upstream_request::impl>(impl_, std::move(head), std::move(body));
  request->start_stream(std::move(handlers));
  return std::make_shared<upstream_request>(request);
}

const upstream_options& upstream_client::options() const noexcept { return impl_->options(); }

}  // namespace gpustream::gateway
