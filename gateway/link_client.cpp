#include "gateway/link_client.hpp"

#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/core/tcp_stream.hpp>
#include <boost/beast/http/string_body.hpp>
#include <boost/beast/websocket/stream.hpp>
#include <boost/json/parse.hpp>
#include <boost/json/value.hpp>

#include <algorithm>
#include <cmath>
#include <deque>
#include <span>
#include <utility>
#include <vector>

#include "base/text.hpp"
#include "gateway/idle_watch.hpp"
#include "gateway/link_codec.hpp"
#include "gateway/upstream_client.hpp"  // redacted_url

namespace gpustream::gateway {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace websocket = beast::websocket;
using tcp = asio::ip::tcp;

// -------------------------------------------------------------------------------------------------
// Backoff and URLs: pure.

std::chrono::milliseconds backoff_delay(const backoff_options& options, std::uint32_t attempt,
                                        std::mt19937_64& rng) {
  const double cap = static_cast<double>(std::max<std::int64_t>(options.delay_max.count(), 0));
  double delay = static_cast<double>(std::max<std::int64_t>(options.delay_initial.count(), 0)) *
                 std::pow(std::max(options.factor, 1.0), static_cast<double>(attempt));
  // pow may overflow to infinity for a long run of failures; min() brings it back to the cap.
  if (!(delay < cap)) delay = cap;
  const double jitter = std::clamp(options.jitter_fraction, 0.0, 1.0);
  const double draw = std::generate_canonical<double, 53>(rng);  // uniform in [0, 1)
  return std::chrono::milliseconds(std::llround(delay * (1.0 - jitter * draw)));
}

namespace {

bool starts_with_ignoring_case(std::string_view text, std::string_view prefix) {
  if (text.size() < prefix.size()) return false;
  for (std::size_t i = 0; i < prefix.size(); ++i) {
    const auto lower = static_cast<char>(text[i] >= 'A' && text[i] <= 'Z' ? text[i] - 'A' + 'a' : text[i]);
    if (lower != prefix[i]) return false;
  }
  return true;
}

expected<std::uint16_t, std::string> parse_port(std::string_view digits, std::string_view url) {
  if (digits.empty() || digits.size() > 5 ||
      !std::all_of(digits.begin(), digits.end(), [](char c) { return c >= '0' && c <= '9'; })) {
    return unexpected{"the port of " + redacted_url(url) + " is not a number from 1 to 65535"};
  }
  const unsigned long value = std::stoul(std::string(digits));
  if (value == 0 || value > 65535) {
    return unexpected{"the port of " + redacted_url(url) + " is not a number from 1 to 65535"};
  }
  return static_cast<std::uint16_t>(value);
}

}  // namespace

expected<ws_url, std::string> parse_ws_url(std::string_view url) {
  if (starts_with_ignoring_case(url, "wss://")) {
    return unexpected{std::string("wss:// is not supported by this agent (plain TCP only): use ws:// "
                                  "or a local TLS-terminating proxy")};
  }
  if (!starts_with_ignoring_case(url, "ws://")) {
    return unexpected{"the coordinator URL must start with ws://, got \"" + redacted_url(url) + "\""};
  }
  const std::string_view rest = url.substr(5);
  const std::size_t authority_end = std::min(rest.find('/'), rest.find('?'));
  const std::string_view authority = rest.substr(0, authority_end);
  ws_url parsed;
  if (authority_end != std::string_view::npos) {
    parsed.target = std::string(rest.substr(authority_end));
    if (parsed.target.front() == '?') parsed.target.insert(0, "/");
  }
  if (authority.find('@') != std::string_view::npos) {
    return unexpected{std::string("the coordinator URL must not carry credentials; use --token")};
  }
  std::string_view port_digits;
  if (!authority.empty() && authority.front() == '[') {
    const std::size_t close = authority.find(']');
    if (close == std::string_view::npos) {
      return unexpected{"unbalanced [ in the host of " + redacted_url(url)};
    }
    parsed.host = std::string(authority.substr(1, close - 1));
    const std::string_view after = authority.substr(close + 1);
    if (!after.empty()) {
      if (after.front() != ':') return unexpected{"unexpected text after ] in " + redacted_url(url)};
      port_digits = after.substr(1);
      if (port_digits.empty()) return unexpected{"empty port in " + redacted_url(url)};
    }
  } else {
    const std::size_t colon = authority.rfind(':');
    if (colon != std::string_view::npos && authority.find(':') != colon) {
      return unexpected{"an IPv6 host must be written in brackets (ws://[::1]:8080) in " + redacted_url(url)};
    }
    parsed.host = std::string(authority.substr(0, colon));
    if (colon != std::string_view::npos) {
      port_digits = authority.substr(colon + 1);
      if (port_digits.empty()) return unexpected{"empty port in " + redacted_url(url)};
    }
  }
  if (parsed.host.empty()) return unexpected{"no host in " + redacted_url(url)};
  if (!port_digits.empty()) {
    auto port = parse_port(port_digits, url);
    if (!port) return unexpected{port.error()};
    parsed.port = *port;
  }
  return parsed;
}

std::string_view to_string(link_disconnect_kind kind) noexcept {
  switch (kind) {
    case link_disconnect_kind::connect_failed:
      return "connect_failed";
    case link_disconnect_kind::rejected:
      return "rejected";
    case link_disconnect_kind::closed_by_peer:
      return "closed_by_peer";
    case link_disconnect_kind::connection_lost:
      return "connection_lost";
    case link_disconnect_kind::protocol_error:
      return "protocol_error";
    case link_disconnect_kind::dropped:
      return "dropped";
  }
  return "unknown";
}

// -------------------------------------------------------------------------------------------------
// The client.

namespace {

using ws_stream = websocket::stream<beast::tcp_stream>;

/// One connection attempt and, once it succeeded, the connection. Handlers hold it by shared_ptr,
/// so a connection being torn down stays valid until its last handler has run.
struct connection {
  connection(asio::io_context& io, std::uint64_t generation, std::chrono::milliseconds idle_timeout)
      : ws(io), deadline(io), idle(io.get_executor(), idle_timeout), generation(generation) {}

  ws_stream ws;
  asio::steady_timer deadline;  // bounds resolve + connect + upgrade
  idle_watch idle;              // once up: pings a silent coordinator, gives up a gone one
  beast::flat_buffer buffer;
  websocket::response_type response;  // the server's answer to the upgrade
  std::deque<std::vector<std::uint8_t>> queue;
  std::size_t queued_bytes = 0;  // the queue's bytes and the open batch's estimate
  bool batch_deltas = false;
  std::vector<link::delta> batch;  // deltas held behind the queue while a write is in flight
  std::size_t batch_firsts = 0;    // the jobs' first deltas at the batch's front (send_first)
  std::size_t batch_bytes = 0;     // their encoded size, estimated from above
  bool writing = false;
  std::chrono::steady_clock::time_point up_since{};
  std::uint64_t generation;
};

/// Printable start of an untrusted text (a server's error body) for a message; at most `bytes_max`.
std::string printable_prefix(std::string_view text, std::size_t bytes_max) {
  std::string out;
  for (char c : text.substr(0, bytes_max)) {
    out.push_back(c >= 0x20 && c < 0x7f ? c : ' ');
  }
  if (text.size() > bytes_max) out += "…";
  return out;
}

/// The message of an OpenAI-shaped error body ({"error":{"message":…}}), else the body's start.
std::string error_body_message(const std::string& body) {
  constexpr std::size_t shown_bytes_max = 300;
  boost::system::error_code ec;
  const auto value = boost::json::parse(body, ec);
  if (!ec && value.is_object()) {
    if (const auto* error = value.as_object().if_contains("error"); error && error->is_object()) {
      if (const auto* message = error->as_object().if_contains("message");
          message && message->is_string()) {
        return printable_prefix(message->as_string(), shown_bytes_max);
      }
    }
  }
  return printable_prefix(body, shown_bytes_max);
}

}  // namespace

class link_client::impl : public std::enable_shared_from_this<impl> {
 public:
  impl(asio::io_context& io, link_client_options options, ws_url url, link_client_callbacks callbacks)
      : io_(io),
        options_(std::move(options)),
        url_(std::move(url)),
        callbacks_(std::move(callbacks)),
        resolver_(io),
        retry_timer_(io),
        rng_(options_.seed != 0 ? options_.seed : std::random_device{}()) {}

  void start() {
    GPUSTREAM_ENSURE(state_ == state::idle);
    connect();
  }

  void stop() {
    if (state_ == state::stopped) return;
    const bool was_connected = state_ == state::connected;
    state_ = state::stopped;
    ++generation_;
    retry_timer_.cancel();
    resolver_.cancel();
    if (auto conn = std::exchange(conn_, nullptr)) {
      conn->deadline.cancel();
      conn->idle.cancel();
      if (was_connected) {
        close_gracefully(conn, websocket::close_code::going_away, "agent stopping");
      } else {
        close_socket(*conn);
      }
    }
  }

  expected<void, link_send_error> send(const link::frame& f, bool first_of_job = false) {
    if (state_ != state::connected) {
      return unexpected{link_send_error{link_send_errc::not_connected,
                                        "the link to the coordinator is not up"}};
    }
    auto& conn = *conn_;
    if (const auto* d = std::get_if<link::delta>(&f); d != nullptr && conn.batch_deltas && conn.writing) {
      return hold(conn, *d, first_of_job);
    }
    close_batch(conn);  // whatever is held goes before this frame
    return enqueue(conn, f);
  }

  void drop(std::uint16_t close_code, std::string reason) {
    if (state_ != state::connected) return;
    auto conn = conn_;
    end_connection(conn, link_disconnect{.kind = link_disconnect_kind::dropped,
                                         .message = reason,
                                         .close_code = close_code});
    close_gracefully(conn, close_code, reason);
  }

  void batch_deltas(bool enabled) noexcept {
    if (conn_) conn_->batch_deltas = enabled;
  }

  bool connected() const noexcept { return state_ == state::connected; }
  std::size_t queued_bytes() const noexcept { return conn_ ? conn_->queued_bytes : 0; }

 private:
  enum class state { idle, connecting, connected, waiting, stopped };
  using connection_ptr = std::shared_ptr<connection>;

  /// An upper bound of the bytes `d` adds to a `deltas` frame: its list element (a data word for
  /// the attempt and two pointers), its two texts, each NUL-terminated and padded to whole words,
  /// and a landing pad (at most two words) for each text, should it start a new segment of the
  /// message.
  static std::size_t batch_item_bytes(const link::delta& d) {
    const auto padded = [](std::size_t n) { return (n + 1 + 7) / 8 * 8; };
    return 24 + padded(d.job_id.size()) + padded(d.text.size()) + 2 * 16;
  }

  /// An upper bound of a `deltas` frame's bytes besides its items: the segment table (a few dozen
  /// segments at most: Cap'n Proto grows them geometrically), the root pointer, Frame, Deltas and
  /// the list's pointer.
  static constexpr std::size_t batch_frame_bytes = 256;

  expected<void, link_send_error> hold(connection& conn, const link::delta& d, bool first_of_job) {
    const std::size_t item_bytes = batch_item_bytes(d);
    if (batch_frame_bytes + item_bytes > options_.limits.frame_bytes_max) {
      // Too big to hold in a batch: it goes on its own (or is refused as too large), after the
      // deltas already held.
      close_batch(conn);
      return enqueue(conn, d);
    }
    if (conn.batch.size() == options_.limits.batch_deltas_max ||
        batch_frame_bytes + conn.batch_bytes + item_bytes > options_.limits.frame_bytes_max) {
      close_batch(conn);
    }
    if (conn.queued_bytes + item_bytes > options_.send_queue_bytes_max) return queue_full(conn, item_bytes);
    if (first_of_job) {
      // Ahead of the later deltas held with it, behind the first ones held before it. No delta of
      // its job can be among those it passes: it is its job's first.
      conn.batch.insert(conn.batch.begin() + static_cast<std::ptrdiff_t>(conn.batch_firsts), d);
      ++conn.batch_firsts;
    } else {
      conn.batch.push_back(d);
    }
    conn.batch_bytes += item_bytes;
    conn.queued_bytes += item_bytes;
    return {};
  }

  /// Moves the held deltas, if any, to the queue as one frame (a lone delta as itself).
  void close_batch(connection& conn) {
    if (conn.batch.empty()) return;
    auto bytes = conn.batch.size() == 1 ? link::encode(conn.batch.front())
                                        : link::encode(link::deltas{std::move(conn.batch)});
    GPUSTREAM_ENSURE(bytes.size() <= batch_frame_bytes + conn.batch_bytes);
    conn.queued_bytes = conn.queued_bytes - conn.batch_bytes + bytes.size();
    conn.batch.clear();
    conn.batch_firsts = 0;
    conn.batch_bytes = 0;
    conn.queue.push_back(std::move(bytes));
  }

  expected<void, link_send_error> queue_full(const connection& conn, std::size_t more) const {
    return unexpected{link_send_error{
        link_send_errc::queue_full,
        "the send queue holds " + std::to_string(conn.queued_bytes) + " bytes; " + std::to_string(more) +
            " more would exceed its limit of " + std::to_string(options_.send_queue_bytes_max)}};
  }

  expected<void, link_send_error> enqueue(connection& conn, const link::frame& f) {
    auto bytes = link::encode(f);
    if (bytes.size() > options_.limits.frame_bytes_max) {
      return unexpected{link_send_error{
          link_send_errc::frame_too_large,
          std::string(link::frame_name(f)) + " frame of " + std::to_string(bytes.size()) +
              " bytes exceeds the frame limit of " +
              std::to_string(options_.limits.frame_bytes_max)}};
    }
    if (conn.queued_bytes + bytes.size() > options_.send_queue_bytes_max) return queue_full(conn, bytes.size());
    conn.queued_bytes += bytes.size();
    conn.queue.push_back(std::move(bytes));
    if (!conn.writing) write(conn_);
    return {};
  }

  /// A handler of an older attempt, or one that runs after stop(), does nothing.
  bool stale(const connection& conn) const noexcept {
    return state_ == state::stopped || conn.generation != generation_;
  }

  void connect() {
    state_ = state::connecting;
    auto conn = std::make_shared<connection>(io_, ++generation_, options_.idle_timeout);
    conn_ = conn;
    conn->deadline.expires_after(options_.connect_timeout);
    conn->deadline.async_wait([self = shared_from_this(), conn](boost::system::error_code ec) {
      if (ec || self->stale(*conn) || self->state_ != state::connecting) return;
      self->resolver_.cancel();
      self->fail_attempt(conn, link_disconnect_kind::connect_failed,
                         "no connection to " + self->authority() + " within " +
                             std::to_string(self->options_.connect_timeout.count()) + " ms");
    });
    resolver_.async_resolve(
        url_.host, std::to_string(url_.port),
        [self = shared_from_this(), conn](boost::system::error_code ec,
                                          tcp::resolver::results_type results) {
          if (self->stale(*conn)) return;
          if (ec) {
            self->fail_attempt(conn, link_disconnect_kind::connect_failed,
                               "resolving " + self->url_.host + ": " + ec.message());
            return;
          }
          beast::get_lowest_layer(conn->ws).async_connect(
              results, [self, conn](boost::system::error_code ec, const tcp::endpoint&) {
                self->on_tcp_connected(conn, ec);
              });
        });
  }

  void on_tcp_connected(const connection_ptr& conn, boost::system::error_code ec) {
    if (stale(*conn)) return;
    if (ec) {
      fail_attempt(conn, link_disconnect_kind::connect_failed,
                   "connecting to " + authority() + ": " + ec.message());
      return;
    }
    // Deltas are small and latency matters more than packet count.
    beast::get_lowest_layer(conn->ws).socket().set_option(tcp::no_delay(true), ec);
    // Beast bounds the handshake; once up, conn->idle watches for silence (see idle_watch.hpp).
    websocket::stream_base::timeout timeouts{};
    timeouts.handshake_timeout = options_.connect_timeout;
    timeouts.idle_timeout = websocket::stream_base::none();
    timeouts.keep_alive_pings = false;
    conn->ws.set_option(timeouts);
    // Each link frame goes out as one WebSocket frame (Beast would cut a big one into 4 KiB
    // fragments and let a close frame in between): a drop's close waits for the frame being
    // written, so the coordinator gets it whole.
    conn->ws.auto_fragment(false);
    connection* raw = conn.get();  // the stream is a member of the connection: it cannot outlive it
    conn->ws.control_callback([raw](websocket::frame_type, beast::string_view) { raw->idle.heard(); });
    conn->ws.set_option(websocket::stream_base::decorator(
        [authorization = "Bearer " + options_.bearer_token,
         agent = options_.user_agent](websocket::request_type& request) {
          request.set(beast::http::field::authorization, authorization);
          request.set(beast::http::field::user_agent, agent);
        }));
    conn->ws.read_message_max(options_.limits.frame_bytes_max);
    conn->ws.binary(true);
    conn->ws.async_handshake(conn->response, authority(), url_.target,
                             [self = shared_from_this(), conn](boost::system::error_code ec) {
                               self->on_handshake(conn, ec);
                             });
  }

  void on_handshake(const connection_ptr& conn, boost::system::error_code ec) {
    if (stale(*conn)) return;
    if (ec == websocket::error::upgrade_declined) {
      const unsigned status = conn->response.result_int();
      fail_attempt(conn, link_disconnect_kind::rejected,
                   "the coordinator refused the link: HTTP " + std::to_string(status) + " " +
                       std::string(conn->response.reason()) + ": " +
                       error_body_message(conn->response.body()),
                   status);
      return;
    }
    if (ec) {
      fail_attempt(conn, link_disconnect_kind::connect_failed,
                   "WebSocket upgrade with " + authority() + ": " + ec.message());
      return;
    }
    conn->deadline.cancel();
    conn->response = {};
    state_ = state::connected;
    conn->up_since = std::chrono::steady_clock::now();
    conn->idle.heard();
    watch_idle(conn);
    read(conn);
    callbacks_.on_connected();
  }

  void read(const connection_ptr& conn) {
    conn->ws.async_read(conn->buffer, [self = shared_from_this(), conn](
                                          boost::system::error_code ec, std::size_t) {
      self->on_read(conn, ec);
    });
  }

  void on_read(const connection_ptr& conn, boost::system::error_code ec) {
    if (stale(*conn)) return;
    if (ec) {
      on_read_failed(conn, ec);
      return;
    }
    conn->idle.heard();
    if (conn->ws.got_text()) {
      protocol_failure(conn, websocket::close_code::bad_payload,
                       "the coordinator sent a text message; the link carries binary frames only");
      return;
    }
    const auto data = conn->buffer.cdata();
    auto decoded = link::decode(
        std::span(static_cast<const std::uint8_t*>(data.data()), data.size()), options_.limits);
    conn->buffer.consume(conn->buffer.size());
    if (!decoded) {
      protocol_failure(conn, link::websocket_close_code(decoded.error().code),
                       "the coordinator sent a bad frame: " + decoded.error().message);
      return;
    }
    callbacks_.on_frame(std::move(*decoded));
    if (!stale(*conn)) read(conn);  // the callback may have dropped or stopped the link
  }

  void on_read_failed(const connection_ptr& conn, boost::system::error_code ec) {
    if (ec == websocket::error::closed) {
      const auto& reason = conn->ws.reason();
      end_connection(conn, link_disconnect{
                               .kind = link_disconnect_kind::closed_by_peer,
                               .message = "the coordinator closed the link (" +
                                          std::to_string(reason.code) + ")" +
                                          (reason.reason.empty()
                                               ? std::string()
                                               : ": " + printable_prefix(std::string_view(reason.reason.data(),
                                                                                  reason.reason.size()),
                                                                 123)),
                               .close_code = reason.code});
      return;
    }
    if (ec == websocket::error::message_too_big) {
      // Beast has already sent close 1009 and torn the connection down.
      end_connection(conn, link_disconnect{
                               .kind = link_disconnect_kind::protocol_error,
                               .message = "the coordinator sent a message larger than " +
                                          std::to_string(options_.limits.frame_bytes_max) +
                                          " bytes",
                               .close_code = websocket::close_code::too_big});
      return;
    }
    close_socket(*conn);
    end_connection(conn, link_disconnect{.kind = link_disconnect_kind::connection_lost,
                                         .message = "the connection to the coordinator broke: " + ec.message()});
  }

  /// Pings a coordinator silent for half the idle timeout; gives up one silent for all of it.
  void watch_idle(const connection_ptr& conn) {
    auto self = shared_from_this();
    conn->idle.watch(conn->ws, conn, [self, conn] { return self->stale(*conn); }, [self, conn] {
      self->close_socket(*conn);
      self->end_connection(conn, link_disconnect{.kind = link_disconnect_kind::connection_lost,
                                                 .message = "nothing received from the coordinator for " +
                                                            std::to_string(self->options_.idle_timeout.count()) +
                                                            " ms"});
    });
  }

  void protocol_failure(const connection_ptr& conn, std::uint16_t close_code, std::string message) {
    end_connection(conn, link_disconnect{.kind = link_disconnect_kind::protocol_error,
                                         .message = message,
                                         .close_code = close_code});
    close_gracefully(conn, close_code, message);
  }

  void write(const connection_ptr& conn) {
    conn->writing = true;
    conn->ws.async_write(asio::buffer(conn->queue.front()),
                         [self = shared_from_this(), conn](boost::system::error_code ec, std::size_t) {
                           self->on_written(conn, ec);
                         });
  }

  void on_written(const connection_ptr& conn, boost::system::error_code ec) {
    conn->writing = false;
    if (stale(*conn)) return;
    if (ec) {
      close_socket(*conn);
      end_connection(conn, link_disconnect{
                               .kind = link_disconnect_kind::connection_lost,
                               .message = "writing to the coordinator failed: " + ec.message()});
      return;
    }
    conn->queued_bytes -= conn->queue.front().size();
    conn->queue.pop_front();
    if (conn->queue.empty()) close_batch(*conn);  // what was held while this write was in flight
    if (!conn->queue.empty()) write(conn);
  }

  /// An attempt failed before the link was up.
  void fail_attempt(const connection_ptr& conn, link_disconnect_kind kind, std::string message,
                    unsigned http_status = 0) {
    close_socket(*conn);
    end_connection(conn, link_disconnect{.kind = kind, .message = std::move(message),
                                         .http_status = http_status});
  }

  /// Ends `conn` (already closed or closing), schedules the next attempt and reports.
  void end_connection(const connection_ptr& conn, link_disconnect report) {
    report.was_connected = state_ == state::connected;
    ++generation_;  // every handler of `conn` is stale from here on
    conn->deadline.cancel();
    conn->idle.cancel();
    // The frame being written stays until its write is done: the write reads it as it goes.
    const std::size_t in_flight = conn->writing ? 1 : 0;
    conn->queue.resize(std::min(conn->queue.size(), in_flight));
    conn->batch.clear();
    conn->batch_bytes = 0;
    conn->queued_bytes = 0;
    conn_.reset();
    if (report.was_connected &&
        std::chrono::steady_clock::now() - conn->up_since >= options_.backoff.stable_after) {
      attempt_ = 0;
    }
    report.retry_in = backoff_delay(options_.backoff, attempt_, rng_);
    // Past 64 doublings every wait is delay_max anyway; stop counting so nothing overflows.
    attempt_ = std::min<std::uint32_t>(attempt_ + 1, 64);
    state_ = state::waiting;
    retry_timer_.expires_after(report.retry_in);
    retry_timer_.async_wait(
        [self = shared_from_this(), generation = generation_](boost::system::error_code ec) {
          if (ec || self->state_ != state::waiting || self->generation_ != generation) return;
          self->connect();
        });
    callbacks_.on_disconnected(report);
  }

  /// Sends a close frame of an ended connection (after the frame being written, if any) and lets
  /// Beast finish the closing handshake on its own; nothing of it is reported. A coordinator that
  /// reads nothing would hold the close behind that write for ever, and Beast's own close timeout
  /// only starts once the close frame is sent: the socket is closed after connect_timeout anyway.
  void close_gracefully(const connection_ptr& conn, std::uint16_t code, std::string_view reason) {
    websocket::close_reason why(code);
    // A close frame's reason is at most 123 bytes.
    const auto kept = utf8_prefix(reason, why.reason.max_size());
    why.reason.assign(kept.data(), kept.size());
    conn->ws.async_close(why, [conn](boost::system::error_code) {
      conn->deadline.cancel();
      close_socket(*conn);
    });
    conn->deadline.expires_after(options_.connect_timeout);
    conn->deadline.async_wait([conn](boost::system::error_code ec) {
      if (!ec) close_socket(*conn);
    });
  }

  static void close_socket(connection& conn) {
    boost::system::error_code ignored;
    beast::get_lowest_layer(conn.ws).socket().close(ignored);
  }

  std::string authority() const {
    const bool ipv6 = url_.host.find(':') != std::string::npos;
    return (ipv6 ? "[" + url_.host + "]" : url_.host) + ":" + std::to_string(url_.port);
  }

  asio::io_context& io_;
  link_client_options options_;
  ws_url url_;
  link_client_callbacks callbacks_;
  tcp::resolver resolver_;
  asio::steady_timer retry_timer_;
  std::mt19937_64 rng_;
  state state_ = state::idle;
  std::uint64_t generation_ = 0;  // bumped per attempt, per ended connection and at stop
  std::uint32_t attempt_ = 0;     // failed attempts (or short connections) in a row
  connection_ptr conn_;
};

expected<std::unique_ptr<link_client>, std::string> link_client::create(
    asio::io_context& io, link_client_options options, link_client_callbacks callbacks) {
  auto url = parse_ws_url(options.url);
  if (!url) return unexpected{url.error()};
  if (options.bearer_token.empty()) return unexpected{std::string("the provider token is empty")};
  if (!callbacks.on_connected || !callbacks.on_frame || !callbacks.on_disconnected) {
    return unexpected{std::string("link_client needs all three callbacks")};
  }
  auto state = std::make_shared<impl>(io, std::move(options), std::move(*url), std::move(callbacks));
  return std::unique_ptr<link_client>(new link_client(std::move(state)));
}

link_client::link_client(std::shared_ptr<impl> state) : impl_(std::move(state)) {}

link_client::~link_client() { impl_->stop(); }

void link_client::start() { impl_->start(); }

void link_client::stop() { impl_->stop(); }

expected<void, link_send_error> link_client::send(const link::frame& f) { return impl_->send(f); }

expected<void, link_send_error> link_client::send_first(const link::delta& d) { return impl_->send(d, true); }

void link_client::batch_deltas(bool enabled) noexcept { impl_->batch_deltas(enabled); }

void link_client::drop(std::uint16_t close_code, std::string reason) {
  impl_->drop(close_code, std::move(reason));
}

bool link_client::connected() const noexcept { return impl_->connected(); }

std::size_t link_client::queued_bytes() const noexcept { return impl_->queued_bytes(); }

}  // namespace gpustream::gateway
