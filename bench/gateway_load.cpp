// gateway_load: a load generator for OpenAI-compatible streamed chat completions. It keeps C
// streams busy (one keep-alive connection each) for D seconds or N requests, checks every answer
// (the expected number of content chunks and text, a finish reason, a usage chunk, [DONE]) and
// prints TTFT and total latency percentiles and completions per second. With --idle-streams it
// instead opens N streams that stay idle (their upstream answers slowly) and reads a process's
// RSS before and while they are open. bench/gateway_load.sh runs it against the test upstream
// directly and through `gpustream serve` + `gpustream provider`; figures: docs/performance.md.
//
// One io_context on --threads threads, one strand per connection; buffers are per connection and
// reused, and each SSE event is parsed by Boost.JSON into a fixed per-connection arena, so a token
// costs no heap allocation on the generator's side.

#include <boost/asio/connect.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/write.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/http/buffer_body.hpp>
#include <boost/beast/http/parser.hpp>
#include <boost/beast/http/read.hpp>
#include <boost/json/monotonic_resource.hpp>
#include <boost/json/parser.hpp>
#include <boost/json/value.hpp>
#include <CLI/CLI.hpp>

#include <algorithm>
#include <array>
#include <atomic>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include <sys/resource.h>

namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
namespace json = boost::json;
using tcp = asio::ip::tcp;
using steady = std::chrono::steady_clock;

/// Largest response header block accepted, bytes.
constexpr std::uint32_t response_header_bytes_max = 64 * 1024;
/// Largest response body accepted, bytes (a 64-token answer is about 20 KiB).
constexpr std::uint64_t response_body_bytes_max = 64ull * 1024 * 1024;
/// Longest SSE line or event accepted, bytes.
constexpr std::size_t event_bytes_max = 1024 * 1024;
/// Bytes of a non-200 answer's body kept for the error message.
constexpr std::size_t error_body_bytes_max = 2048;
/// Error messages kept (and printed) per connection; all errors are counted.
constexpr std::size_t error_messages_max = 5;
/// Per-connection body read buffer, bytes; idle streams use the smaller one.
constexpr std::size_t body_buffer_bytes = 16 * 1024;
constexpr std::size_t idle_body_buffer_bytes = 1024;
/// Per-connection arena for one SSE event's JSON; bigger events fall back to the heap.
constexpr std::size_t json_arena_bytes = 16 * 1024;
/// Deepest JSON nesting accepted in an event.
constexpr std::size_t json_depth_max = 64;
/// Idle streams being connected at once, so the listener's backlog never overflows.
constexpr std::size_t idle_opening_max = 256;

/// The command line; each flag's help in main() says the same. Defaults as written.
struct options {
  std::string url;                   ///< base URL, e.g. http://127.0.0.1:8080/v1; required
  std::string key;                   ///< API key for Authorization: Bearer; none when empty
  std::uint32_t concurrency = 1;     ///< streams kept busy at once, one keep-alive connection each
  double duration_s = 10;            ///< measured seconds, after the warm-up
  std::uint64_t requests = 0;        ///< this many requests instead of a duration; 0: by duration
  double warmup_s = 1;               ///< seconds run but not measured (duration runs only)
  std::uint32_t tokens = 64;         ///< max_tokens asked for, and content chunks expected
  std::string model = "test-model";  ///< model id asked for
  unsigned threads = 1;              ///< I/O threads running the connections
  bool check_text = true;            ///< compare the text with the test upstream's "tok0 tok1 …"
  double timeout_s = 60;             ///< longest one request may take before it is an error
  std::uint64_t errors_max = 100;    ///< the run stops after this many errors
  std::uint32_t idle_streams = 0;    ///< idle-streams mode when non-zero: streams to open
  double hold_s = 10;                ///< seconds the idle streams stay open
  double open_timeout_s = 120;       ///< longest wait for every idle stream's answer head
  int rss_pid = 0;                   ///< process whose VmRSS the idle mode reads; 0: none
};

/// What every connection shares and never changes during a run.
struct run_plan {
  tcp::endpoint endpoint;
  std::string request;        // the whole HTTP request, written as is
  std::string expected_text;  // "tok0 tok1 … " as the test upstream answers, when checked
  std::uint32_t tokens = 0;
  bool check_text = true;
  steady::duration request_timeout{};
};

enum class error_kind : std::uint8_t { connect, write, read, timeout, http_status, protocol, incomplete, wrong, count };

constexpr std::array<const char*, static_cast<std::size_t>(error_kind::count)> error_names{
    "connect", "write", "read", "timeout", "http_status", "protocol", "incomplete", "wrong_content"};

/// Shared by the connections of a load run: who may start another request, and when to stop.
struct run_state {
  steady::time_point start;
  steady::time_point warmup_end;
  steady::time_point deadline;  // by-duration runs: no request starts after it
  std::uint64_t requests_max = 0;  // by-count runs: this many requests, then stop
  std::uint64_t errors_max = 0;
  std::atomic<std::uint64_t> tickets{0};
  std::atomic<std::uint64_t> errors{0};
  std::atomic<bool> aborted{false};

  bool take_ticket(steady::time_point now) {
    if (aborted.load(std::memory_order_relaxed)) return false;
    if (requests_max != 0) return tickets.fetch_add(1, std::memory_order_relaxed) < requests_max;
    return now < deadline;
  }

  void count_error() {
    if (errors.fetch_add(1, std::memory_order_relaxed) + 1 >= errors_max) aborted.store(true);
  }
};

struct sample {
  std::int64_t ttft_us = 0;
  std::int64_t total_us = 0;
};

/// Results of one connection, merged after the run.
struct tally {
  std::vector<sample> samples;      // requests started after the warm-up
  std::uint64_t completed = 0;      // correct answers, warm-up included
  std::uint64_t in_window = 0;      // correct answers that ended inside the measured window
  std::uint64_t chunks = 0;         // content chunks received in correct answers
  std::uint64_t connects = 0;
  steady::time_point last_end{};
  std::array<std::uint64_t, static_cast<std::size_t>(error_kind::count)> errors{};
  std::vector<std::string> messages;  // the first error_messages_max error messages
};

json::parse_options event_parse_options() {
  json::parse_options parse;
  parse.max_depth = json_depth_max;
  return parse;
}

void set_no_delay(tcp::socket& socket) {
  beast::error_code ignored;
  socket.set_option(tcp::no_delay(true), ignored);  // requests are small writes: no Nagle delay
}

/// Reads the streamed answer of one request: SSE framing, then each event's JSON, and checks
/// it against the plan. Reused from request to request; allocates only when an event is
/// bigger than the arena.
class answer_reader {
 public:
  explicit answer_reader(const run_plan& plan)
      : plan_(plan), parser_(json::storage_ptr(), event_parse_options(), parser_temp_.data(), parser_temp_.size()) {
    line_.reserve(4096);
    data_.reserve(4096);
  }

  void reset() {
    line_.clear();
    data_.clear();
    data_pending_ = false;
    done_ = false;
    finish_seen_ = false;
    usage_completion_tokens_.reset();
    chunks_ = 0;
    text_offset_ = 0;
    first_content_.reset();
    problem_.clear();
  }

  /// Feeds body bytes; false (with problem() set) when the answer is malformed.
  [[nodiscard]] bool feed(std::string_view bytes) {
    while (!bytes.empty()) {
      const auto newline = bytes.find('\n');
      if (newline == std::string_view::npos) {
        if (line_.size() + bytes.size() > event_bytes_max) return broken(error_kind::protocol, "an SSE line over 1 MiB");
        line_.append(bytes);
        return true;
      }
      std::string_view line = bytes.substr(0, newline);
      if (!line_.empty()) {
        line_.append(line);
        line = line_;
      }
      bytes.remove_prefix(newline + 1);
      if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
      const bool ok = on_line(line);
      line_.clear();
      if (!ok) return false;
    }
    return true;
  }

  /// After the body ended: false (with problem() set) unless the answer was whole and right.
  [[nodiscard]] bool finish() {
    if (!line_.empty() || data_pending_) return broken(error_kind::incomplete, "the stream ended inside an event");
    if (!done_) return broken(error_kind::incomplete, "no data: [DONE] at the end, after " + std::to_string(chunks_) +
                                                          " content chunks");
    if (chunks_ != plan_.tokens) {
      return broken(error_kind::wrong, std::to_string(chunks_) + " content chunks, expected " +
                                           std::to_string(plan_.tokens));
    }
    if (plan_.check_text && text_offset_ != plan_.expected_text.size()) {
      return broken(error_kind::wrong, "the answer's text is shorter than the upstream's");
    }
    if (!finish_seen_) return broken(error_kind::incomplete, "no chunk carried a finish_reason");
    if (!usage_completion_tokens_) return broken(error_kind::incomplete, "no usage chunk");
    if (*usage_completion_tokens_ != plan_.tokens) {
      return broken(error_kind::wrong, "usage.completion_tokens " + std::to_string(*usage_completion_tokens_) +
                                           ", expected " + std::to_string(plan_.tokens));
    }
    return true;
  }

  [[nodiscard]] std::optional<steady::time_point> first_content() const { return first_content_; }
  [[nodiscard]] std::uint32_t chunks() const { return chunks_; }
  [[nodiscard]] error_kind problem_kind() const { return problem_kind_; }
  [[nodiscard]] const std::string& problem() const { return problem_; }

 private:
  bool broken(error_kind kind, std::string message) {
    problem_kind_ = kind;
    problem_ = std::move(message);
    return false;
  }

  bool on_line(std::string_view line) {
    if (line.empty()) {  // the end of an event
      if (!data_pending_) return true;
      data_pending_ = false;
      const bool ok = on_event(data_);
      data_.clear();
      return ok;
    }
    if (line.front() == ':') return true;  // a comment (keep-alive)
    const auto colon = line.find(':');
    const std::string_view field = line.substr(0, colon);
    std::string_view value = colon == std::string_view::npos ? std::string_view{} : line.substr(colon + 1);
    if (!value.empty() && value.front() == ' ') value.remove_prefix(1);
    if (field != "data") return true;  // event, id, retry: not used by OpenAI's streams
    if (data_pending_) data_.push_back('\n');
    data_.append(value);
    data_pending_ = true;
    if (data_.size() > event_bytes_max) return broken(error_kind::protocol, "an SSE event over 1 MiB");
    return true;
  }

  bool on_event(std::string_view data) {
    if (done_) return broken(error_kind::protocol, "an event after data: [DONE]");
    if (data == "[DONE]") {
      done_ = true;
      return true;
    }
    json::monotonic_resource arena(arena_.data(), arena_.size());
    parser_.reset(json::storage_ptr(&arena));
    beast::error_code ec;
    parser_.write(data, ec);
    if (ec) return broken(error_kind::protocol, "an event that is not JSON: " + ec.message());
    const json::value event = parser_.release();
    const auto* object = event.if_object();
    if (object == nullptr) return broken(error_kind::protocol, "an event that is not a JSON object");
    if (const auto* error = object->if_contains("error")) {
      return broken(error_kind::wrong, "an in-band error: " + json_text(*error));
    }
    if (const auto* choices = object->if_contains("choices"); choices && choices->is_array()) {
      for (const auto& choice : choices->get_array()) {
        if (!on_choice(choice)) return false;
      }
    }
    if (const auto* usage = object->if_contains("usage"); usage && usage->is_object()) {
      const auto* completion = usage->get_object().if_contains("completion_tokens");
      if (completion == nullptr || !completion->is_number()) {
        return broken(error_kind::protocol, "usage without completion_tokens");
      }
      usage_completion_tokens_ = completion->to_number<std::uint64_t>();
    }
    return true;
  }

  bool on_choice(const json::value& choice) {
    const auto* object = choice.if_object();
    if (object == nullptr) return broken(error_kind::protocol, "a choice that is not an object");
    if (const auto* delta = object->if_contains("delta"); delta && delta->is_object()) {
      if (const auto* content = delta->get_object().if_contains("content"); content && content->is_string()) {
        const std::string_view text = content->get_string();
        if (!text.empty() && !on_content(text)) return false;
      }
    }
    if (const auto* reason = object->if_contains("finish_reason"); reason && reason->is_string()) {
      const std::string_view why = reason->get_string();
      if (why != "stop" && why != "length") {
        return broken(error_kind::wrong, "finish_reason " + std::string(why.substr(0, 64)));
      }
      finish_seen_ = true;
    }
    return true;
  }

  bool on_content(std::string_view text) {
    if (!first_content_) first_content_ = steady::now();
    ++chunks_;
    if (!plan_.check_text) return true;
    const std::string_view expected = plan_.expected_text;
    if (expected.substr(text_offset_, text.size()) != text) {
      return broken(error_kind::wrong, "content chunk " + std::to_string(chunks_) + " reads \"" +
                                           std::string(text.substr(0, 64)) + "\", expected \"" +
                                           std::string(expected.substr(text_offset_, 64)) + "\"");
    }
    text_offset_ += text.size();
    return true;
  }

  static std::string json_text(const json::value& value) {
    if (const auto* object = value.if_object()) {
      if (const auto* message = object->if_contains("message"); message && message->is_string()) {
        return std::string(message->get_string().subview(0, std::min<std::size_t>(message->get_string().size(), 300)));
      }
    }
    return "(no message)";
  }

  const run_plan& plan_;
  std::array<unsigned char, 4096> parser_temp_{};
  std::array<unsigned char, json_arena_bytes> arena_{};
  json::parser parser_;
  std::string line_;  // a line split across reads
  std::string data_;  // the data lines of the event being read
  bool data_pending_ = false;
  bool done_ = false;
  bool finish_seen_ = false;
  std::optional<std::uint64_t> usage_completion_tokens_;
  std::uint32_t chunks_ = 0;
  std::size_t text_offset_ = 0;
  std::optional<steady::time_point> first_content_;
  error_kind problem_kind_ = error_kind::protocol;
  std::string problem_;
};

/// One keep-alive connection sending the plan's request again and again while the run lasts.
class load_connection {
 public:
  load_connection(asio::io_context& io, const run_plan& plan, run_state& state)
      : socket_(asio::make_strand(io)), timer_(socket_.get_executor()), plan_(plan), state_(state), reader_(plan) {
    result_.samples.reserve(4096);
  }

  void start() {
    asio::post(socket_.get_executor(), [this] { next(); });
  }

  [[nodiscard]] const tally& result() const { return result_; }

 private:
  void next() {
    const auto now = steady::now();
    if (!state_.take_ticket(now)) return close();
    begin_ = now;
    in_request_ = true;
    timed_out_ = false;
    reader_.reset();
    status_ = 0;
    error_body_.clear();
    arm_timer();
    if (socket_.is_open()) return write_request();
    socket_.async_connect(plan_.endpoint, [this](beast::error_code ec) {
      if (ec) return fail(error_kind::connect, "connect: " + ec.message());
      set_no_delay(socket_);
      ++result_.connects;
      write_request();
    });
  }

  void arm_timer() {
    const auto generation = ++generation_;
    timer_.expires_after(plan_.request_timeout);
    timer_.async_wait([this, generation](beast::error_code ec) {
      if (ec || generation != generation_ || !in_request_) return;
      timed_out_ = true;
      beast::error_code ignored;
      socket_.close(ignored);  // the pending operation fails and reports the timeout
    });
  }

  void write_request() {
    asio::async_write(socket_, asio::buffer(plan_.request), [this](beast::error_code ec, std::size_t) {
      if (ec) return fail(error_kind::write, "write: " + ec.message());
      read_header();
    });
  }

  void read_header() {
    parser_.emplace();
    parser_->header_limit(response_header_bytes_max);
    parser_->body_limit(response_body_bytes_max);
    http::async_read_header(socket_, buffer_, *parser_, [this](beast::error_code ec, std::size_t) {
      if (ec) return fail(error_kind::read, "reading the response head: " + ec.message());
      const auto& head = parser_->get();
      status_ = head.result_int();
      if (status_ == 200 && !head[http::field::content_type].starts_with("text/event-stream")) {
        return fail(error_kind::protocol,
                    "HTTP 200 with Content-Type \"" + std::string(head[http::field::content_type]) + "\"");
      }
      read_body();
    });
  }

  void read_body() {
    auto& body = parser_->get().body();
    body.data = body_buffer_.data();
    body.size = body_buffer_.size();
    body.more = true;
    http::async_read_some(socket_, buffer_, *parser_, [this](beast::error_code ec, std::size_t) { on_body(ec); });
  }

  void on_body(beast::error_code ec) {
    if (ec == http::error::need_buffer) ec = {};
    if (ec) {
      return fail(error_kind::read, "reading the body after " + std::to_string(reader_.chunks()) +
                                        " content chunks: " + ec.message());
    }
    const std::size_t filled = body_buffer_.size() - parser_->get().body().size;
    const std::string_view bytes(body_buffer_.data(), filled);
    if (status_ != 200) {
      error_body_.append(bytes.substr(0, error_body_bytes_max - std::min(error_body_.size(), error_body_bytes_max)));
    } else if (!reader_.feed(bytes)) {
      return fail(reader_.problem_kind(), reader_.problem());
    }
    if (parser_->is_done()) return complete();
    read_body();
  }

  void complete() {
    const auto end = steady::now();
    in_request_ = false;
    timer_.cancel();
    if (!parser_->keep_alive()) close_socket();
    if (status_ != 200) return fail(error_kind::http_status, "HTTP " + std::to_string(status_) + ": " + error_body_);
    if (!reader_.finish()) return fail(reader_.problem_kind(), reader_.problem());
    ++result_.completed;
    result_.chunks += reader_.chunks();
    result_.last_end = std::max(result_.last_end, end);
    if (end >= state_.warmup_end && (state_.requests_max != 0 || end <= state_.deadline)) ++result_.in_window;
    if (begin_ >= state_.warmup_end) {
      const auto micros = [this](steady::time_point t) {
        return std::chrono::duration_cast<std::chrono::microseconds>(t - begin_).count();
      };
      result_.samples.push_back({micros(*reader_.first_content()), micros(end)});
    }
    next();
  }

  /// Counts the error, drops the connection (its state is unknown) and goes on with another
  /// request from a fresh stack.
  void fail(error_kind kind, std::string message) {
    in_request_ = false;
    timer_.cancel();
    if (timed_out_) {
      kind = error_kind::timeout;
      message = "no complete answer within the timeout (" + message + ")";
    }
    ++result_.errors[static_cast<std::size_t>(kind)];
    if (result_.messages.size() < error_messages_max) {
      result_.messages.push_back(std::string(error_names[static_cast<std::size_t>(kind)]) + ": " + message);
    }
    state_.count_error();
    close_socket();
    asio::post(socket_.get_executor(), [this] { next(); });
  }

  void close_socket() {
    beast::error_code ignored;
    socket_.shutdown(tcp::socket::shutdown_both, ignored);
    socket_.close(ignored);
    buffer_.clear();
  }

  void close() {
    timer_.cancel();
    close_socket();
  }

  tcp::socket socket_;
  asio::steady_timer timer_;
  const run_plan& plan_;
  run_state& state_;
  answer_reader reader_;
  beast::flat_buffer buffer_{response_header_bytes_max + body_buffer_bytes};
  std::array<char, body_buffer_bytes> body_buffer_{};
  std::optional<http::response_parser<http::buffer_body>> parser_;
  steady::time_point begin_{};
  unsigned status_ = 0;
  std::string error_body_;
  std::uint64_t generation_ = 0;
  bool in_request_ = false;
  bool timed_out_ = false;
  tally result_;
};

// ---- the idle-streams mode

/// Reads a process's resident set size, KiB, from /proc/PID/status.
std::optional<std::uint64_t> rss_kib(int pid) {
  std::ifstream status("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(status, line)) {
    if (!line.starts_with("VmRSS:")) continue;  // "VmRSS:   12345 kB"
    const auto digits = line.find_first_of("0123456789");
    std::uint64_t kib = 0;
    if (digits == std::string::npos ||
        std::from_chars(line.data() + digits, line.data() + line.size(), kib).ec != std::errc{}) {
      return std::nullopt;
    }
    return kib;
  }
  return std::nullopt;
}

class idle_run;

/// One stream opened and then left waiting for its answer.
class idle_stream {
 public:
  idle_stream(asio::io_context& io, const run_plan& plan, idle_run& owner)
      : socket_(io), plan_(plan), owner_(owner) {}

  void open();
  void close() {
    closing_ = true;
    beast::error_code ignored;
    socket_.close(ignored);
  }
  [[nodiscard]] bool open_now() const { return open_ && !ended_; }
  [[nodiscard]] bool got_bytes() const { return body_bytes_ > 0; }

 private:
  void watch();

  tcp::socket socket_;
  const run_plan& plan_;
  idle_run& owner_;
  beast::flat_buffer buffer_{response_header_bytes_max + idle_body_buffer_bytes};
  std::array<char, idle_body_buffer_bytes> body_buffer_{};
  std::optional<http::response_parser<http::buffer_body>> parser_;
  std::uint64_t body_bytes_ = 0;  ///< after the first piece
  bool first_piece_seen_ = false;
  bool open_ = false;
  bool ended_ = false;
  bool closing_ = false;
};

/// Opens the streams (at most idle_opening_max connecting at once), holds them, reports.
/// Runs on one thread.
class idle_run {
 public:
  idle_run(asio::io_context& io, const run_plan& plan, const options& config) : config_(config), timer_(io) {
    streams_.reserve(config.idle_streams);
    for (std::uint32_t i = 0; i < config.idle_streams; ++i) streams_.push_back(std::make_unique<idle_stream>(io, plan, *this));
  }

  void start() {
    if (config_.rss_pid != 0) rss_before_ = rss_kib(config_.rss_pid);
    begin_ = steady::now();
    timer_.expires_after(std::chrono::duration_cast<steady::duration>(std::chrono::duration<double>(config_.open_timeout_s)));
    timer_.async_wait([this](beast::error_code ec) {
      if (ec || holding_) return;
      std::printf("idle: only %zu of %zu streams settled within %.0f s (%zu open, %zu failed)\n", settled_,
                  streams_.size(), config_.open_timeout_s, opened_, failed_);
      open_timed_out_ = true;
      end();
    });
    while (launched_ < streams_.size() && launched_ < idle_opening_max) streams_[launched_++]->open();
  }

  /// A stream got its answer's head (opened) or failed.
  void settled(bool opened, const std::string& why) {
    if (ended_) return;  // closed by end(): not a result
    ++settled_;
    if (opened) {
      ++opened_;
    } else {
      ++failed_;
      if (messages_.size() < error_messages_max) messages_.push_back(why);
    }
    if (launched_ < streams_.size()) streams_[launched_++]->open();
    if (settled_ == streams_.size() && !open_timed_out_) hold();
  }

  [[nodiscard]] bool passed() const { return passed_; }

 private:
  void hold() {
    holding_ = true;
    const double open_s = std::chrono::duration<double>(steady::now() - begin_).count();
    if (config_.rss_pid != 0) rss_open_ = rss_kib(config_.rss_pid);
    std::printf("idle: %zu of %zu streams open after %.2f s, %zu failed; holding them %.0f s\n", opened_,
                streams_.size(), open_s, failed_, config_.hold_s);
    std::fflush(stdout);
    timer_.expires_after(std::chrono::duration_cast<steady::duration>(std::chrono::duration<double>(config_.hold_s)));
    timer_.async_wait([this](beast::error_code ec) {
      if (ec) return;
      if (config_.rss_pid != 0) rss_held_ = rss_kib(config_.rss_pid);
      end();
    });
  }

  void end() {
    ended_ = true;
    timer_.cancel();
    std::size_t still_open = 0;
    std::size_t with_bytes = 0;
    for (const auto& stream : streams_) {
      still_open += stream->open_now() ? 1 : 0;
      with_bytes += stream->got_bytes() ? 1 : 0;
    }
    for (const auto& stream : streams_) stream->close();
    for (const auto& message : messages_) std::printf("  error: %s\n", message.c_str());
    std::printf("idle: %zu streams still open at the end of the hold; %zu received more than their first piece while idle\n",
                still_open, with_bytes);
    const auto before = rss_before_.value_or(0);
    const auto during = std::max(rss_open_.value_or(0), rss_held_.value_or(0));
    double per_stream = 0;
    if (config_.rss_pid != 0 && opened_ > 0 && during >= before) {
      per_stream = static_cast<double>(during - before) / static_cast<double>(opened_);
    }
    if (config_.rss_pid != 0) {
      std::printf("idle: pid %d VmRSS %llu KiB before, %llu KiB once open, %llu KiB at the end of the hold: "
                  "%.1f KiB per open stream\n",
                  config_.rss_pid, static_cast<unsigned long long>(before),
                  static_cast<unsigned long long>(rss_open_.value_or(0)),
                  static_cast<unsigned long long>(rss_held_.value_or(0)), per_stream);
    }
    std::printf("IDLE streams=%zu open=%zu failed=%zu still_open=%zu received_bytes=%zu rss_before_kib=%llu "
                "rss_open_kib=%llu rss_held_kib=%llu kib_per_stream=%.1f\n",
                streams_.size(), opened_, failed_, still_open, with_bytes, static_cast<unsigned long long>(before),
                static_cast<unsigned long long>(rss_open_.value_or(0)),
                static_cast<unsigned long long>(rss_held_.value_or(0)), per_stream);
    passed_ = !open_timed_out_ && failed_ == 0 && still_open == streams_.size() &&
              (config_.rss_pid == 0 || (rss_before_ && rss_open_ && rss_held_));
  }

  const options& config_;
  asio::steady_timer timer_;
  std::vector<std::unique_ptr<idle_stream>> streams_;
  std::size_t launched_ = 0;
  std::size_t settled_ = 0;
  std::size_t opened_ = 0;
  std::size_t failed_ = 0;
  std::vector<std::string> messages_;
  steady::time_point begin_{};
  bool holding_ = false;
  bool open_timed_out_ = false;
  bool ended_ = false;
  bool passed_ = false;
  std::optional<std::uint64_t> rss_before_, rss_open_, rss_held_;
};

void idle_stream::open() {
  socket_.async_connect(plan_.endpoint, [this](beast::error_code ec) {
    if (ec) return owner_.settled(false, "connect: " + ec.message());
    set_no_delay(socket_);
    asio::async_write(socket_, asio::buffer(plan_.request), [this](beast::error_code ec, std::size_t) {
      if (ec) return owner_.settled(false, "write: " + ec.message());
      parser_.emplace();
      parser_->header_limit(response_header_bytes_max);
      parser_->body_limit(response_body_bytes_max);
      http::async_read_header(socket_, buffer_, *parser_, [this](beast::error_code ec, std::size_t) {
        if (ec) return owner_.settled(false, "reading the response head: " + ec.message());
        const unsigned status = parser_->get().result_int();
        if (status != 200) {
          return owner_.settled(false, "HTTP " + std::to_string(status) + " (body not read; see the server's log)");
        }
        open_ = true;
        owner_.settled(true, {});
        watch();
      });
    });
  });
}

/// Keeps a read pending so that an answer that starts, or a stream the server ends, is seen.
void idle_stream::watch() {
  auto& body = parser_->get().body();
  body.data = body_buffer_.data();
  body.size = body_buffer_.size();
  body.more = true;
  http::async_read_some(socket_, buffer_, *parser_, [this](beast::error_code ec, std::size_t) {
    if (ec == http::error::need_buffer) ec = {};
    if (ec || closing_) {
      ended_ = true;
      return;
    }
    // The first piece (the answer's first token) opens the stream; what comes after it is not idle.
    const std::size_t got = body_buffer_.size() - parser_->get().body().size;
    if (got > 0 && std::exchange(first_piece_seen_, true)) body_bytes_ += got;
    if (parser_->is_done()) {
      ended_ = true;
      return;
    }
    watch();
  });
}

// ---- set-up and report

struct parsed_url {
  std::string host;
  std::string port;
  std::string path;  // without a trailing slash
};

std::optional<parsed_url> parse_url(std::string_view url) {
  constexpr std::string_view scheme = "http://";
  if (!url.starts_with(scheme)) return std::nullopt;
  url.remove_prefix(scheme.size());
  const auto slash = url.find('/');
  const std::string_view authority = url.substr(0, slash);
  std::string_view path = slash == std::string_view::npos ? std::string_view{} : url.substr(slash);
  while (path.ends_with('/')) path.remove_suffix(1);
  const auto colon = authority.rfind(':');
  parsed_url out;
  out.host = std::string(authority.substr(0, colon));
  out.port = colon == std::string_view::npos ? "80" : std::string(authority.substr(colon + 1));
  out.path = std::string(path);
  if (out.host.empty() || out.port.empty()) return std::nullopt;
  return out;
}

std::string request_text(const parsed_url& url, const options& config) {
  // The prompt is fixed, so every request costs the same; only its length reaches any log.
  const std::string body = R"({"model":")" + config.model +
                           R"(","messages":[{"role":"user","content":"Count for me, one word at a time."}],)"
                           R"("max_tokens":)" + std::to_string(config.tokens) +
                           R"(,"stream":true,"stream_options":{"include_usage":true}})";
  std::string request = "POST " + url.path + "/chat/completions HTTP/1.1\r\nHost: " + url.host + ":" + url.port +
                        "\r\nContent-Type: application/json\r\nAccept: text/event-stream\r\n";
  if (!config.key.empty()) request += "Authorization: Bearer " + config.key + "\r\n";
  request += "Content-Length: " + std::to_string(body.size()) + "\r\n\r\n" + body;
  return request;
}

std::string expected_text(std::uint32_t tokens) {
  std::string text;
  for (std::uint32_t i = 0; i < tokens; ++i) text += "tok" + std::to_string(i) + " ";
  return text;
}

std::int64_t percentile(std::vector<std::int64_t>& values, double fraction) {
  if (values.empty()) return 0;
  // Nearest rank: the smallest value with at least `fraction` of the values at or below it.
  const auto rank = std::clamp<std::size_t>(
      static_cast<std::size_t>(std::ceil(fraction * static_cast<double>(values.size()))), 1, values.size());
  std::nth_element(values.begin(), values.begin() + static_cast<std::ptrdiff_t>(rank - 1), values.end());
  return values[rank - 1];
}

/// CPU seconds (user + system) this process has used, so a run shows what the generator itself
/// took from the machine's cores.
double own_cpu_s() {
  rusage usage{};
  if (getrusage(RUSAGE_SELF, &usage) != 0) return 0;
  const auto seconds = [](const timeval& t) { return static_cast<double>(t.tv_sec) + static_cast<double>(t.tv_usec) / 1e6; };
  return seconds(usage.ru_utime) + seconds(usage.ru_stime);
}

/// Merges the connections' results, prints them, and says whether the run was clean.
bool report(const std::vector<std::unique_ptr<load_connection>>& connections, const run_state& state,
            const options& config) {
  tally all;
  for (const auto& connection : connections) {
    const auto& one = connection->result();
    all.samples.insert(all.samples.end(), one.samples.begin(), one.samples.end());
    all.completed += one.completed;
    all.in_window += one.in_window;
    all.chunks += one.chunks;
    all.connects += one.connects;
    all.last_end = std::max(all.last_end, one.last_end);
    for (std::size_t k = 0; k < all.errors.size(); ++k) all.errors[k] += one.errors[k];
    for (const auto& message : one.messages) {
      if (all.messages.size() < 2 * error_messages_max) all.messages.push_back(message);
    }
  }
  std::uint64_t errors = 0;
  for (const auto count : all.errors) errors += count;
  std::vector<std::int64_t> ttft, total;
  ttft.reserve(all.samples.size());
  total.reserve(all.samples.size());
  for (const auto& s : all.samples) {
    ttft.push_back(s.ttft_us);
    total.push_back(s.total_us);
  }
  const double window_s =
      config.requests != 0 ? std::chrono::duration<double>(all.last_end - state.start).count()
                           : std::chrono::duration<double>(state.deadline - state.warmup_end).count();
  const double rate = window_s > 0 ? static_cast<double>(all.in_window) / window_s : 0;
  std::printf("completions %llu (measured %zu), errors %llu, connections opened %llu, content chunks per answer %.2f\n",
              static_cast<unsigned long long>(all.completed), all.samples.size(),
              static_cast<unsigned long long>(errors), static_cast<unsigned long long>(all.connects),
              all.completed ? static_cast<double>(all.chunks) / static_cast<double>(all.completed) : 0.0);
  if (errors != 0) {
    std::printf("errors by kind:");
    for (std::size_t k = 0; k < all.errors.size(); ++k) {
      if (all.errors[k] != 0) std::printf(" %s=%llu", error_names[k], static_cast<unsigned long long>(all.errors[k]));
    }
    std::printf("\n");
    for (const auto& message : all.messages) std::printf("  error: %s\n", message.c_str());
  }
  const auto ttft_p50 = percentile(ttft, 0.50), ttft_p99 = percentile(ttft, 0.99);
  const auto total_p50 = percentile(total, 0.50), total_p99 = percentile(total, 0.99);
  std::printf("ttft  p50 %lld us, p99 %lld us\ntotal p50 %lld us, p99 %lld us\ncompletions/s %.1f\n",
              static_cast<long long>(ttft_p50), static_cast<long long>(ttft_p99), static_cast<long long>(total_p50),
              static_cast<long long>(total_p99), rate);
  std::printf("RESULT concurrency=%u completions=%llu measured=%zu errors=%llu ttft_p50_us=%lld ttft_p99_us=%lld "
              "total_p50_us=%lld total_p99_us=%lld completions_per_s=%.1f cpu_s=%.2f\n",
              config.concurrency, static_cast<unsigned long long>(all.completed), all.samples.size(),
              static_cast<unsigned long long>(errors), static_cast<long long>(ttft_p50),
              static_cast<long long>(ttft_p99), static_cast<long long>(total_p50), static_cast<long long>(total_p99),
              rate, own_cpu_s());
  return errors == 0 && !all.samples.empty();
}

template <class Duration>
Duration seconds(double s) {
  return std::chrono::duration_cast<Duration>(std::chrono::duration<double>(s));
}

int run_load(const run_plan& plan, const options& config) {
  asio::io_context io(static_cast<int>(config.threads));
  run_state state;
  state.requests_max = config.requests;
  state.errors_max = config.errors_max;
  std::vector<std::unique_ptr<load_connection>> connections;
  connections.reserve(config.concurrency);
  for (std::uint32_t i = 0; i < config.concurrency; ++i) {
    connections.push_back(std::make_unique<load_connection>(io, plan, state));
  }
  state.start = steady::now();
  state.warmup_end = config.requests != 0 ? state.start : state.start + seconds<steady::duration>(config.warmup_s);
  state.deadline = state.warmup_end + seconds<steady::duration>(config.duration_s);
  for (auto& connection : connections) connection->start();
  std::vector<std::thread> threads;
  for (unsigned i = 1; i < config.threads; ++i) threads.emplace_back([&io] { io.run(); });
  io.run();
  for (auto& thread : threads) thread.join();
  if (state.aborted.load()) std::printf("stopped early: %llu errors reached --errors-max\n",
                                        static_cast<unsigned long long>(state.errors.load()));
  return report(connections, state, config) ? 0 : 1;
}

int run_idle(const run_plan& plan, const options& config) {
  asio::io_context io(1);
  idle_run run(io, plan, config);
  run.start();
  io.run();
  return run.passed() ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  options config;
  CLI::App app{"Load generator for OpenAI-compatible streamed chat completions (see bench/gateway_load.sh)"};
  app.add_option("--url", config.url, "base URL, e.g. http://127.0.0.1:8080/v1")->required();
  app.add_option("--key", config.key, "API key sent as Authorization: Bearer; none when empty");
  app.add_option("--concurrency", config.concurrency, "streams kept busy at once, one connection each")
      ->check(CLI::Range(1u, 100'000u))
      ->capture_default_str();
  auto* duration = app.add_option("--duration-s", config.duration_s, "measured seconds (after the warm-up)")
                       ->check(CLI::PositiveNumber)
                       ->capture_default_str();
  app.add_option("--requests", config.requests, "send this many requests instead of running for a duration")
      ->check(CLI::Range(std::uint64_t{1}, std::uint64_t{1'000'000'000}))
      ->excludes(duration);
  app.add_option("--warmup-s", config.warmup_s, "seconds before measuring (duration runs only)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app.add_option("--tokens", config.tokens, "max_tokens asked for, and content chunks expected per answer")
      ->check(CLI::Range(1u, 100'000u))
      ->capture_default_str();
  app.add_option("--model", config.model, "model id")->capture_default_str();
  app.add_option("--threads", config.threads, "I/O threads")->check(CLI::Range(1u, 2u))->capture_default_str();
  app.add_flag("!--no-text-check", config.check_text,
               "do not compare the text with the test upstream's \"tok0 tok1 …\" (other servers)");
  app.add_option("--timeout-s", config.timeout_s, "longest a request may take before it counts as an error")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--errors-max", config.errors_max, "stop the run after this many errors")
      ->check(CLI::Range(std::uint64_t{1}, std::uint64_t{1'000'000'000}))
      ->capture_default_str();
  auto* idle = app.add_option("--idle-streams", config.idle_streams,
                              "open this many streams, hold them idle for --hold-s, report (no load run)")
                   ->check(CLI::Range(1u, 1'000'000u));
  app.add_option("--hold-s", config.hold_s, "seconds the idle streams stay open")
      ->check(CLI::PositiveNumber)
      ->capture_default_str()
      ->needs(idle);
  app.add_option("--open-timeout-s", config.open_timeout_s, "longest wait for every idle stream's answer head")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--rss-pid", config.rss_pid, "process whose VmRSS is read before and while idle streams are open")
      ->needs(idle);
  CLI11_PARSE(app, argc, argv);

  const auto url = parse_url(config.url);
  if (!url) {
    std::fprintf(stderr, "gateway_load: --url wants http://HOST:PORT/PATH, got %s\n", config.url.c_str());
    return 2;
  }
  run_plan plan;
  {
    asio::io_context resolver_io;
    tcp::resolver resolver(resolver_io);
    beast::error_code ec;
    const auto endpoints = resolver.resolve(url->host, url->port, ec);
    if (ec || endpoints.empty()) {
      std::fprintf(stderr, "gateway_load: cannot resolve %s:%s: %s\n", url->host.c_str(), url->port.c_str(),
                   ec.message().c_str());
      return 2;
    }
    plan.endpoint = endpoints.begin()->endpoint();
  }
  plan.request = request_text(*url, config);
  plan.tokens = config.tokens;
  plan.check_text = config.check_text;
  if (config.check_text) plan.expected_text = expected_text(config.tokens);
  plan.request_timeout = seconds<steady::duration>(config.timeout_s);

  if (config.idle_streams != 0) {
    std::printf("gateway_load: %s, %u idle streams held %.0f s, model %s\n", config.url.c_str(), config.idle_streams,
                config.hold_s, config.model.c_str());
    std::fflush(stdout);
    return run_idle(plan, config);
  }
  if (config.requests != 0) {
    std::printf("gateway_load: %s, concurrency %u, %llu requests, %u tokens, model %s, %u thread(s)\n",
                config.url.c_str(), config.concurrency, static_cast<unsigned long long>(config.requests),
                config.tokens, config.model.c_str(), config.threads);
  } else {
    std::printf("gateway_load: %s, concurrency %u, %.1f s after %.1f s warm-up, %u tokens, model %s, %u thread(s)\n",
                config.url.c_str(), config.concurrency, config.duration_s, config.warmup_s, config.tokens,
                config.model.c_str(), config.threads);
  }
  std::fflush(stdout);
  return run_load(plan, config);
}
