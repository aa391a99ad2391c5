#include "gateway/http_server.hpp"

#include "base/ensure.hpp"
#include "base/text.hpp"
#include "gateway/idle_watch.hpp"
#include "gateway/write_buffer.hpp"

#include <boost/asio/dispatch.hpp>
#include <boost/asio/ip/basic_resolver.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <boost/beast/websocket.hpp>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <deque>
#include <map>
#include <condition_variable>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

namespace gpustream::gateway {
namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
namespace websocket = beast::websocket;
using tcp = asio::ip::tcp;
using steady = std::chrono::steady_clock;

/// Most bytes one asynchronous write offers the socket (write_in_flight).
constexpr std::size_t write_piece_bytes_max = 256 * 1024;

/// One unit of connections_max, held by whichever session owns the socket.
class connection_slot {
 public:
  explicit connection_slot(std::atomic<std::size_t>& open) : open_(&open) {}
  connection_slot(connection_slot&& other) noexcept : open_(std::exchange(other.open_, nullptr)) {}
  connection_slot& operator=(connection_slot&&) = delete;
  ~connection_slot() {
    if (open_ != nullptr) open_->fetch_sub(1);
  }

 private:
  std::atomic<std::size_t>* open_;
};

/// Header values come partly from outside (an advertiser's URL): a CR or LF would split the header.
std::string header_safe(std::string_view value) {
  std::string out(value);
  for (auto& c : out) {
    if (c == '\r' || c == '\n') c = ' ';
  }
  return out;
}

/// Whether the connection stays open after an answer, and how the answer says so: HTTP/1.1 keeps
/// it by default, HTTP/1.0 only when the answer says keep-alive (or the client waits for the close).
enum class connection_after : std::uint8_t { close, keep, keep_http10 };

/// An answer with no body whatever its headers say (RFC 9110 8.6): no Content-Length or -Type.
bool bodiless(unsigned status) { return status < 200 || status == 204 || status == 304; }

std::string status_line_and_headers(unsigned status, std::string_view content_type,
                                    const http_headers& headers, connection_after connection) {
  std::string out = "HTTP/1.1 " + std::to_string(status) + " ";
  out += http::obsolete_reason(static_cast<http::status>(status));
  out += "\r\nServer: gpustream\r\n";
  if (!bodiless(status)) out += "Content-Type: " + header_safe(content_type) + "\r\n";
  for (const auto& [name, value] : headers) {
    out += header_safe(name) + ": " + header_safe(value) + "\r\n";
  }
  if (connection == connection_after::close) out += "Connection: close\r\n";
  if (connection == connection_after::keep_http10) out += "Connection: keep-alive\r\n";
  return out;
}

/// The whole answer; without its body for a HEAD request, whose Content-Length is still the body's.
std::string serialize(const http_response& response, connection_after connection, bool head = false) {
  std::string out = status_line_and_headers(response.status, response.content_type, response.headers, connection);
  if (bodiless(response.status)) return out + "\r\n";
  out += "Content-Length: " + std::to_string(response.body.size()) + "\r\n\r\n";
  if (!head) out += response.body;
  return out;
}

/// Whether `ec` says the bytes were not an HTTP request (rather than the connection failing).
bool is_malformed_request(const beast::error_code& ec) {
  static const auto& category = http::make_error_code(http::error::bad_method).category();
  return ec.category() == category && ec != http::error::end_of_stream && ec != http::error::partial_message;
}

http_response json_error(unsigned status, std::string_view message, std::string_view type) {
  return {status, "application/json",
          std::string(R"({"error":{"message":")") + std::string(message) + R"(","type":")" +
              std::string(type) + R"(","param":null,"code":null}})",
          {}};
}

/// The peer's address, or empty when the socket has none (it was closed meanwhile).
std::string remote_address_of(const tcp::socket& socket) {
  beast::error_code ec;
  const auto remote = socket.remote_endpoint(ec);
  return ec ? std::string() : remote.address().to_string();
}

/// The request without its body.
http_request head_of(const http::request<http::string_body>& message, std::string_view remote_address) {
  http_request request;
  request.method = std::string(message.method_string());
  request.target = std::string(message.target());
  for (const auto& field : message) {
    std::string name(field.name_string());
    for (auto& c : name) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    request.headers.emplace(std::move(name), std::string(field.value()));
  }
  request.remote_address = remote_address;
  return request;
}

http_request to_request(http::request<http::string_body>&& message, std::string_view remote_address) {
  http_request request = head_of(message, remote_address);
  request.body = std::move(message.body());
  return request;
}

class websocket_session;

/// The server's started WebSocket connections, until they end. Their callbacks (set when a
/// connection starts) usually capture whoever owns the connection, which holds the connection: a
/// cycle that only the connection's end breaks. A server that goes away while connections are
/// open breaks it here. A connection never started holds no callbacks and is not kept. Thread-safe.
class websocket_registry {
 public:
  void add(const std::shared_ptr<websocket_session>& ws) {
    std::lock_guard lock(mutex_);
    open_[ws.get()] = ws;
  }
  void remove(const websocket_session* ws) {
    std::lock_guard lock(mutex_);
    open_.erase(ws);
  }
  std::size_t size() {
    std::lock_guard lock(mutex_);
    return open_.size();
  }
  /// Drops the callbacks of every connection still open. Only once the I/O threads are gone.
  void release_all();

 private:
  std::mutex mutex_;
  std::map<const websocket_session*, std::weak_ptr<websocket_session>> open_;
};

/// A WebSocket connection after the handshake: one read loop, a bounded queue of outgoing
/// messages, everything on the connection's strand.
class websocket_session : public websocket_connection,
                          public std::enable_shared_from_this<websocket_session> {
 public:
  websocket_session(beast::tcp_stream stream, connection_slot slot, const http_server_options& options,
                    websocket_registry& registry)
      : ws_(std::move(stream)), slot_(std::move(slot)), options_(options), registry_(registry),
        idle_(ws_.get_executor(), options.websocket_idle_timeout), close_timer_(ws_.get_executor()) {}

  void accept(http::request<http::string_body> request, std::function<void(std::shared_ptr<websocket_connection>)> on_open) {
    // The HTTP read deadline of the upgrade request must not end the WebSocket: its own
    // timeouts (below) take over.
    beast::get_lowest_layer(ws_).expires_never();
    ws_.binary(true);
    ws_.read_message_max(options_.websocket_message_bytes_max);
    // Beast bounds the handshake; a silent peer afterwards is noticed by idle_ (see idle_watch.hpp).
    auto timeouts = websocket::stream_base::timeout::suggested(beast::role_type::server);
    timeouts.idle_timeout = websocket::stream_base::none();
    timeouts.keep_alive_pings = false;
    ws_.set_option(timeouts);
    ws_.control_callback([this](websocket::frame_type, beast::string_view) { idle_.heard(); });
    auto owned = std::make_shared<http::request<http::string_body>>(std::move(request));
    ws_.async_accept(*owned, [self = shared_from_this(), owned, on_open = std::move(on_open)](beast::error_code ec) {
      if (ec) return;  // handshake failed: the peer is gone, nothing was opened
      self->idle_.heard();
      self->watch_idle();
      try {
        on_open(self);
      } catch (const std::exception& e) {  // process edge: a handler bug ends this link, not the server
        self->begin_close(websocket::close_code::internal_error, std::string("the server failed to open the link: ") + e.what());
      }
    });
  }

  void start(std::function<void(std::string_view)> on_message, std::function<void(std::string)> on_closed) override {
    asio::post(ws_.get_executor(), [self = shared_from_this(), on_message = std::move(on_message),
                                    on_closed = std::move(on_closed)]() mutable {
      self->on_message_ = std::move(on_message);
      self->on_closed_ = std::move(on_closed);
      self->registry_.add(self);
      self->reading_ = true;
      self->read();
    });
  }

  void send(std::string message) override {
    asio::post(ws_.get_executor(), [self = shared_from_this(), message = std::move(message)]() mutable {
      if (self->closing_) return;
      if (self->queued_bytes_ + message.size() > self->options_.websocket_send_queue_bytes_max) {
        constexpr std::string_view why = "send queue full: peer too slow";
        self->begin_close(websocket::close_code::policy_error, why);
        // Its close waits behind what it does not take, up to websocket_close_wait_max: its owner
        // learns now, rather than go on sending (a provider link taking offers it cannot deliver).
        return self->tell_closed(std::string(why));
      }
      self->queued_bytes_ += message.size();
      self->queue_.push_back(std::move(message));
      self->write_next();
    });
  }

  void close(std::uint16_t code, std::string reason) override {
    asio::post(ws_.get_executor(), [self = shared_from_this(), code, reason = std::move(reason)] {
      self->begin_close(static_cast<websocket::close_code>(code), reason);
    });
  }

  /// The server is gone (its I/O threads too): drops the callbacks without calling them.
  void release() {
    released_ = true;
    on_message_ = nullptr;
    on_closed_ = nullptr;
  }

 private:
  void read() {
    ws_.async_read(buffer_, [self = shared_from_this()](beast::error_code ec, std::size_t) {
      if (ec) return self->closed(ec);
      self->idle_.heard();
      if (self->reported_ || self->released_) return;  // over already (a failed write), or released
      // Closing: what the peer still sends is read (the closing handshake needs the read loop, and
      // the loop reports the end: its owner may have been told already, see tell_closed) and
      // dropped.
      const auto data = self->buffer_.cdata();
      try {
        if (!self->closing_ && self->on_message_) {
          self->on_message_(std::string_view(static_cast<const char*>(data.data()), data.size()));
        }
      } catch (const std::exception& e) {  // process edge: a handler bug ends this link, not the server
        self->begin_close(websocket::close_code::internal_error, std::string("the server failed on a message: ") + e.what());
      }
      self->buffer_.consume(self->buffer_.size());
      self->read();
    });
  }

  /// Pings a peer silent for half the idle timeout; drops one silent for all of it (a dead peer
  /// would not complete a closing handshake, so the socket is closed at once).
  void watch_idle() {
    auto self = shared_from_this();
    idle_.watch(ws_, self, [self] { return self->reported_; }, [self] {
      if (self->local_reason_.empty()) {
        self->local_reason_ =
            "nothing received for " + std::to_string(self->idle_.idle_timeout().count()) + " ms: the peer is gone";
      }
      beast::error_code ignored;
      beast::get_lowest_layer(self->ws_).socket().close(ignored);  // the read loop reports it
    });
  }

  void write_next() {
    if (writing_) return;
    if (queue_.empty()) {
      if (close_pending_) send_close();
      return;
    }
    writing_ = true;
    ws_.async_write(asio::buffer(queue_.front()), [self = shared_from_this()](beast::error_code ec, std::size_t) {
      GPUSTREAM_ENSURE(!self->queue_.empty());  // the message just written stays queued until here
      self->writing_ = false;
      self->queued_bytes_ -= self->queue_.front().size();
      self->queue_.pop_front();
      if (ec) return self->closed(ec);
      self->write_next();
    });
  }

  void begin_close(websocket::close_code code, std::string_view reason) {
    if (closing_) return;
    closing_ = true;
    close_reason_ = websocket::close_reason(code, utf8_prefix(reason, 123));  // a close frame's reason is at most 123 bytes
    local_reason_ = std::string(reason);
    // One write at a time: the message being written goes out whole before the close frame (its
    // bytes stay queued until the write is done); those queued behind it are dropped.
    close_pending_ = true;
    const std::size_t in_flight = writing_ ? 1 : 0;
    while (queue_.size() > in_flight) {
      queued_bytes_ -= queue_.back().size();
      queue_.pop_back();
    }
    if (!writing_) return send_close();
    close_timer_.expires_after(options_.websocket_close_wait_max);
    close_timer_.async_wait([self = shared_from_this()](beast::error_code ec) {
      if (ec || self->reported_ || !self->writing_) return;
      self->local_reason_ += " (the peer took nothing for " +
                             std::to_string(self->options_.websocket_close_wait_max.count()) + " ms: dropped)";
      beast::error_code ignored;
      beast::get_lowest_layer(self->ws_).socket().close(ignored);  // the read loop reports it
    });
  }

  void send_close() {
    close_pending_ = false;
    ws_.async_close(close_reason_, [self = shared_from_this()](beast::error_code ec) {
      // Otherwise the read loop sees the peer's close frame, if one runs: a connection closed by
      // its owner before start() has none, and ends here.
      if (ec || !self->reading_) self->closed(ec);
    });
  }

  void closed(beast::error_code ec) {
    if (reported_) return;
    reported_ = true;
    std::string reason = local_reason_;
    if (reason.empty()) {
      reason = ec == websocket::error::closed ? "peer closed: " + std::string(ws_.reason().reason.c_str())
                                              : ec.message();
    }
    idle_.cancel();
    close_timer_.cancel();
    registry_.remove(this);
    tell_closed(std::move(reason));
  }

  /// Calls the close handler, once (none after the first call). Dropping the callbacks breaks the
  /// cycle with whoever they capture (usually the owner of this connection).
  void tell_closed(std::string reason) {
    auto on_closed = std::move(on_closed_);
    on_message_ = nullptr;
    on_closed_ = nullptr;
    if (!on_closed) return;
    try {
      on_closed(std::move(reason));
    } catch (const std::exception& e) {  // process edge: a handler bug must not kill the server
      spdlog::error("http: a WebSocket's close handler failed: {}", e.what());
    }
  }

  websocket::stream<beast::tcp_stream> ws_;
  connection_slot slot_;
  const http_server_options& options_;
  websocket_registry& registry_;
  beast::flat_buffer buffer_;
  std::deque<std::string> queue_;
  std::size_t queued_bytes_ = 0;
  bool writing_ = false;
  bool reading_ = false;  ///< start() began the read loop
  bool closing_ = false;
  bool close_pending_ = false;
  bool reported_ = false;
  bool released_ = false;  ///< release(): the server is gone
  websocket::close_reason close_reason_;
  std::string local_reason_;
  std::function<void(std::string_view)> on_message_;
  std::function<void(std::string)> on_closed_;
  idle_watch idle_;  ///< declared after ws_, whose executor it runs on
  asio::steady_timer close_timer_;  ///< bounds a close waiting for a write (websocket_close_wait_max)
};

void websocket_registry::release_all() {
  std::vector<std::shared_ptr<websocket_session>> still_open;
  {
    std::lock_guard lock(mutex_);
    for (auto& [key, weak] : open_) {
      if (auto ws = weak.lock()) still_open.push_back(std::move(ws));
    }
    open_.clear();
  }
  for (auto& ws : still_open) ws->release();  // outside the lock: the callbacks' owners may go
}

class session;

/// The calls that end answers (send, finish) on their way to their connections' strands, and
/// writes under way: a stopping server lets them finish (for a while) before its I/O threads go,
/// so that an answer's last bytes, given just before the stop (a drain's cut), are not dropped
/// unsent. A stream's pieces are not counted (no cost per token): each strand runs its calls in
/// order, so those before a counted finish have run when it has.
class pending_calls {
 public:
  void begin() noexcept { count_.fetch_add(1); }
  void end() {
    if (count_.fetch_sub(1) == 1 && waiting_.load()) {
      std::lock_guard lock(mutex_);
      none_left_.notify_all();
    }
  }
  /// Waits until none is left, at most `wait_max`; false when some still are. From now on the
  /// server is stopping: it takes no new connection, and no new request reaches its handler.
  bool wait_none(std::chrono::milliseconds wait_max) {
    stopping_.store(true);
    waiting_.store(true);
    std::unique_lock lock(mutex_);
    return none_left_.wait_for(lock, wait_max, [this] { return count_.load() == 0; });
  }
  [[nodiscard]] bool stopping() const noexcept { return stopping_.load(std::memory_order_relaxed); }

 private:
  std::atomic<std::size_t> count_{0};
  std::atomic<bool> stopping_{false};
  std::atomic<bool> waiting_{false};
  std::mutex mutex_;
  std::condition_variable none_left_;
};

/// The server's flush tick. The streamed pieces that connections hold back (see
/// stream_flush_interval) are all written when one timer fires, rather than each connection
/// arming a timer of its own: on a busy server that is one timer and one wake-up per interval
/// instead of one per stream. Thread-safe.
class flush_clock {
 public:
  flush_clock(asio::io_context& io, std::chrono::microseconds interval) : timer_(io), interval_(interval) {}

  /// Writes `held`'s pieces at the next tick, at most one interval from now.
  void hold(std::shared_ptr<session> held);

 private:
  void tick();

  std::mutex mutex_;
  asio::steady_timer timer_;  ///< armed under mutex_
  std::chrono::microseconds interval_;
  std::vector<std::shared_ptr<session>> held_;  ///< under mutex_
  bool armed_ = false;                          ///< under mutex_
};

/// The reply handed to a handler: forwards to its session, tagged with the request it answers.
class reply_handle final : public http_reply {
 public:
  reply_handle(std::shared_ptr<session> owner, std::uint64_t request) : owner_(std::move(owner)), request_(request) {}
  void send(http_response response) override;
  void start_stream(unsigned status, std::string content_type, http_headers headers) override;
  void write(std::string data) override;
  void finish() override;
  void on_close(std::function<void()> callback) override;

 private:
  std::shared_ptr<session> owner_;
  std::uint64_t request_;
};

/// One client connection: reads requests in turn; while one is answered it watches the socket so
/// that a client going away is noticed at once (and the handler told), not at the next write.
class session : public std::enable_shared_from_this<session> {
 public:
  session(tcp::socket socket, connection_slot slot, const http_server_options& options,
          const http_handler& handler, const websocket_handler& upgrade, std::atomic<std::uint64_t>& writes,
          flush_clock& clock, websocket_registry& websockets, pending_calls& calls)
      : stream_(std::move(socket)),
        slot_(std::move(slot)),
        buffer_(options.header_bytes_max + watch_read_bytes),
        options_(options),
        handler_(handler),
        upgrade_(upgrade),
        writes_(writes),
        clock_(clock),
        websockets_(websockets),
        calls_(calls) {}

  void start() {
    remote_address_ = remote_address_of(stream_.socket());  // once per connection, not per request
    beast::error_code ec;
    stream_.socket().non_blocking(true, ec);
    direct_writes_ = !ec;  // write_next's direct writes must never block the I/O thread
    read();
  }

  void reject_busy() {
    busy_ = true;
    keep_alive_ = false;
    auto busy = json_error(503, "too many open connections; retry later", "server_error");
    busy.headers.emplace_back("Retry-After", "1");  // clients that honour it back off
    if (options_.on_refusal) options_.on_refusal(nullptr, busy);
    queue(serialize(busy, connection_after::close));
    complete_ = true;
    write_next();
  }

  // Called on the strand through reply_handle.
  void send(std::uint64_t request, http_response response) {
    if (!answering(request) || started_) return;
    started_ = true;
    complete_ = true;
    queue(serialize(response, connection(), head_));
    write_next();
  }

  void start_stream(std::uint64_t request, unsigned status, std::string content_type, http_headers headers) {
    if (!answering(request) || started_) return;
    started_ = true;
    headers.emplace_back("Cache-Control", "no-cache");
    // HTTP/1.0 has no chunked encoding: the answer's end is the connection's.
    if (chunked_) headers.emplace_back("Transfer-Encoding", "chunked");
    else keep_alive_ = false;
    queue(status_line_and_headers(status, content_type, headers, connection()) + "\r\n");
    flush_soon();  // or sooner, with the first piece when that follows at once
  }

  void write(std::uint64_t request, std::string data) {
    if (!answering(request) || !started_ || complete_ || data.empty()) return;
    char size[20];
    const int n = chunked_ ? std::snprintf(size, sizeof size, "%zx\r\n", data.size()) : 0;
    const std::size_t queued = pending_.size() + static_cast<std::size_t>(n) + data.size() + (chunked_ ? 2 : 0);
    // A client that does not read: what waits for it, queued or being written, is bounded, and
    // so is the queue's buffer.
    const auto limit = options_.stream_buffer_bytes_max;
    if (queued + in_flight_.untaken() > limit) return gone();
    // Below half the limit the queue grows as strings do (doubling stays under it).
    if (queued > pending_.capacity() && 2 * pending_.capacity() > limit) grow_queue(pending_, queued, limit);
    pending_.append(size, static_cast<std::size_t>(n));
    pending_ += data;
    if (chunked_) pending_ += "\r\n";
    if (options_.stream_flush_interval.count() == 0) return flush_soon();
    if (!piece_written_) {
      // The answer's first piece (its first token) is written now, not after the handlers queued
      // for this connection: on a busy server that trip through the I/O queue is most of the
      // time the token spends in `serve`.
      piece_written_ = true;
      return write_next();
    }
    // Later pieces go at most once per stream_flush_interval: a fast stream costs a bounded
    // number of writes (and of reads at the client), whatever its token rate.
    if (steady::now() >= last_write_ + options_.stream_flush_interval) return flush_soon();
    if (held_) return;
    held_ = true;
    clock_.hold(shared_from_this());
  }

  /// The flush clock's tick, on the strand: the pieces held back go out now.
  void flush_held() {
    held_ = false;
    write_next();
  }

  void finish(std::uint64_t request) {
    if (!answering(request) || !started_ || complete_) return;
    complete_ = true;
    if (chunked_) queue("0\r\n\r\n");
    write_next();
  }

  void on_close(std::uint64_t request, std::function<void()> callback) {
    if (request != request_) return;
    if (gone_) return callback();
    close_callbacks_.push_back(std::move(callback));
  }

  asio::any_io_executor executor() { return stream_.get_executor(); }
  pending_calls& calls() { return calls_; }

 private:
  bool answering(std::uint64_t request) const { return request == request_ && !gone_; }

  void read() {
    parser_.emplace();
    parser_->header_limit(static_cast<std::uint32_t>(options_.header_bytes_max));
    parser_->body_limit(options_.body_bytes_max);
    stream_.expires_after(options_.idle_timeout);
    http::async_read_header(stream_, buffer_, *parser_,
                            [self = shared_from_this()](beast::error_code ec, std::size_t) { self->on_header(ec); });
  }

  void on_header(beast::error_code ec) {
    if (!ec) {
      const auto& message = parser_->get();
      // A body framed by a coding other than chunked last (or by any coding in HTTP/1.0) would be
      // read as having none, and its bytes as the next request: a proxy in front that frames it
      // otherwise would see another request than this server (RFC 9112 6.3: 400 and close).
      if (message.find(http::field::transfer_encoding) != message.end() &&
          (!parser_->chunked() || message.version() < 11)) {
        return refuse(json_error(400,
                                 "Transfer-Encoding must end with chunked, and only in HTTP/1.1; send the "
                                 "body as it is with Content-Length, or chunked",
                                 "invalid_request_error"),
                      nullptr);
      }
      header_fields_ = static_cast<std::size_t>(std::distance(message.begin(), message.end()));
    }
    if (ec || parser_->is_done()) return on_read(ec);
    // A client that asks before sending its body (curl does above 1 KiB) gets the go-ahead now
    // rather than waiting its own timeout (a second for curl); not in HTTP/1.0, which has no 100
    // (RFC 9110 10.1.1). A body over body_bytes_max was refused with the header already. The
    // previous answer is all written by now, so these few bytes fit the socket's buffer; if not,
    // the client still sends after its timeout. Part of them would corrupt the answer: the
    // connection closes then.
    if (beast::iequals(parser_->get()[http::field::expect], "100-continue") && parser_->get().version() >= 11) {
      static constexpr std::string_view go_ahead = "HTTP/1.1 100 Continue\r\n\r\n";
      beast::error_code ignored;
      const std::size_t written = stream_.socket().write_some(asio::buffer(go_ahead), ignored);
      if (written > 0 && written < go_ahead.size()) return gone();
    }
    http::async_read(stream_, buffer_, *parser_,
                     [self = shared_from_this()](beast::error_code ec, std::size_t) { self->on_read(ec); });
  }

  void on_read(beast::error_code ec) {
    if (ec == http::error::header_limit) {
      return refuse(json_error(431, "request headers exceed header_bytes_max", "invalid_request_error"), nullptr);
    }
    if (ec == http::error::buffer_overflow) {
      // Beast bounds neither a chunk's size line nor the trailer: the buffer's bound does.
      const auto head = head_of(parser_->get(), remote_address_);  // its headers were read whole
      return refuse(json_error(431,
                               "a chunk size line or the trailer of the chunked request body exceeds "
                               "header_bytes_max (" + std::to_string(options_.header_bytes_max) + " bytes)",
                               "invalid_request_error"),
                    &head);
    }
    if (ec == http::error::body_limit) {
      const auto head = head_of(parser_->get(), remote_address_);  // its headers were read whole
      return refuse(json_error(413, "request body exceeds body_bytes_max", "invalid_request_error"), &head);
    }
    if (is_malformed_request(ec)) {
      return refuse(json_error(400, "malformed HTTP request: " + ec.message(), "invalid_request_error"), nullptr);
    }
    if (ec) return gone();
    if (calls_.stopping()) {  // its handler's parts may be stopped already
      return refuse(json_error(503, "the server is stopping; retry on another", "server_error"), nullptr);
    }
    auto& message = parser_->get();
    // A chunked body's trailer fields land among the headers, where they must not count as any
    // (RFC 9110 6.5.1): a trailer could add an Authorization or Origin that a proxy in front never
    // saw in the header block. No client of this API sends one.
    if (static_cast<std::size_t>(std::distance(message.begin(), message.end())) != header_fields_) {
      return refuse(json_error(400, "trailer fields after a chunked body are not accepted", "invalid_request_error"),
                    nullptr);
    }
    if (upgrade_ && websocket::is_upgrade(message)) return on_upgrade(parser_->release());
    keep_alive_ = message.keep_alive();
    head_ = message.method() == http::verb::head;
    chunked_ = message.version() >= 11;
    auto request = to_request(std::move(message), remote_address_);
    ++request_;
    started_ = false;
    complete_ = false;
    close_callbacks_.clear();
    stream_.expires_never();  // the handler may take its time; the watch notices a client leaving
    watch();
    // The handler may answer before it returns (a streamed answer's calls run at once on this
    // thread), and the connection then moves on to its next request: a late 500 names this one.
    const std::uint64_t answered = request_;
    // The handler takes the request: a 500 for its exception keeps what on_refusal needs to count
    // it and give it the headers of its path and origin (CORS), as the handler's own answers get
    // (the remote address is the connection's, set only if it is needed).
    http_request thrown_head{.method = request.method, .target = request.target, .headers = {}, .body = {},
                             .remote_address = {}};
    if (const auto origin = request.headers.find("origin"); origin != request.headers.end()) {
      thrown_head.headers.emplace(*origin);
    }
    try {
      handler_(std::move(request), std::make_shared<reply_handle>(shared_from_this(), answered));
    } catch (const std::exception&) {  // process edge: a handler bug must not kill the server
      if (!answering(answered) || started_) return;  // it answered before it threw
      auto failed = json_error(500, "internal error", "server_error");
      thrown_head.remote_address = remote_address_;
      if (options_.on_refusal) options_.on_refusal(&thrown_head, failed);
      send(answered, std::move(failed));
    }
  }

  void on_upgrade(http::request<http::string_body> message) {
    const auto head = head_of(message, remote_address_);
    websocket_decision decision;
    try {
      decision = upgrade_(head);
    } catch (const std::exception&) {  // process edge: a handler bug must not kill the server
      decision = json_error(500, "internal error", "server_error");
    }
    if (auto* refused = std::get_if<http_response>(&decision)) return refuse(std::move(*refused), &head);
    auto ws = std::make_shared<websocket_session>(std::move(stream_), std::move(slot_), options_, websockets_);
    ws->accept(std::move(message), std::move(std::get<websocket_accept>(decision).on_open));
  }

  /// Answers `response` and closes; `head` is the request's, when it was read.
  void refuse(http_response response, const http_request* head) {
    keep_alive_ = false;
    ++request_;
    started_ = true;
    complete_ = true;
    if (options_.on_refusal) options_.on_refusal(head, response);
    // A HEAD's answer carries no body, a refusal's included (the request line may be all that
    // was read of it).
    const bool to_head = head != nullptr ? head->method == "HEAD" : parser_ && parser_->get().method() == http::verb::head;
    queue(serialize(response, connection_after::close, to_head));
    write_next();
  }

  /// What becomes of the connection after the current answer.
  connection_after connection() const {
    if (!keep_alive_) return connection_after::close;
    return chunked_ ? connection_after::keep : connection_after::keep_http10;  // chunked_: HTTP/1.1
  }

  /// Reads while an answer is pending: end of stream means the client went away; bytes (a
  /// pipelined request) stay in the buffer for the next parse, up to header_bytes_max. Past that
  /// they are dropped and the connection closes after this answer (a client resends pipelined
  /// requests left unanswered), and the watch goes on: a client leaving is still noticed at once,
  /// and a connection holds no more than a header's worth of what comes early.
  void watch() {
    // Up to a header block and one read may have come behind the request (see buffer_): past a
    // header block's worth it is dropped now, so that this read fits the buffer's bound.
    if (buffer_.size() >= options_.header_bytes_max) {
      keep_alive_ = false;
      buffer_.consume(buffer_.size());
    }
    watching_ = true;
    stream_.expires_never();  // not a write's deadline, which is set while no read is pending
    stream_.async_read_some(buffer_.prepare(watch_read_bytes), [self = shared_from_this()](beast::error_code ec, std::size_t n) {
      self->watching_ = false;
      if (self->lingering_) return self->start_drain();
      if (ec == asio::error::operation_aborted && self->read_next_) {
        self->read_next_ = false;
        return self->read();
      }
      if (ec) return self->gone();
      self->buffer_.commit(n);
      if (self->read_next_) {
        self->read_next_ = false;
        return self->read();
      }
      self->watch();
    });
  }

  void queue(std::string bytes) { pending_ += bytes; }

  /// Writes the queued pieces once the handlers already queued for this connection have run. A
  /// busy server then sends the tokens that reached it together in one system call (fewer, larger
  /// segments for both ends); an idle one pays one trip through the I/O queue.
  void flush_soon() {
    if (flush_queued_) return;
    flush_queued_ = true;
    asio::post(stream_.get_executor(), [self = shared_from_this()] {
      self->flush_queued_ = false;
      self->write_next();
    });
  }

  void write_next() {
    if (writing_ || gone_) return;
    if (pending_.empty()) {
      if (complete_) next_request();
      return;
    }
    last_write_ = steady::now();
    // Most pieces (a token's SSE event) fit in the socket's send buffer: written at once, they
    // cost one system call and no reactor operation or completion handler.
    writes_.fetch_add(1, std::memory_order_relaxed);
    if (direct_writes_) {
      beast::error_code ec;
      const std::size_t sent = stream_.socket().write_some(asio::buffer(pending_), ec);
      if (ec && ec != asio::error::would_block && ec != asio::error::try_again) return gone();
      if (sent == pending_.size()) {
        pending_.clear();
        if (complete_) next_request();
        return;
      }
      pending_.erase(0, sent);  // the rest waits until the socket takes more
    }
    writing_ = true;
    calls_.begin();  // ended when the write is
    in_flight_.start(std::move(pending_));  // pending_ starts again empty, without a buffer
    write_in_flight();
  }

  /// Writes the rest of in_flight_, then what is pending by then. A client that stops reading
  /// must not hold its connection for ever: the write fails (and the connection closes) when the
  /// client takes nothing for idle_timeout. The deadline is set again for every piece the socket
  /// takes (as nginx's send_timeout), so a slow client that keeps reading is not cut in the middle
  /// of a long write; connections_max bounds how many such clients there can be.
  ///
  /// The socket takes a write before its completion runs here, behind whatever handlers were
  /// queued for this connection meanwhile; until then the write's bytes count as untaken (by the
  /// stream buffer limit). Each write is at most write_piece_bytes_max, so that count is never
  /// more than that behind what the client really has still to take.
  void write_in_flight() {
    stream_.expires_after(options_.idle_timeout);
    const auto rest = in_flight_.rest();
    stream_.async_write_some(asio::buffer(rest.data(), std::min(rest.size(), write_piece_bytes_max)),
                             [self = shared_from_this()](beast::error_code ec, std::size_t written) {
                               if (!ec && written < self->in_flight_.untaken()) {
                                 self->in_flight_.took(written);
                                 return self->write_in_flight();
                               }
                               self->writing_ = false;
                               self->in_flight_.clear();
                               if (ec) {
                                 self->gone();
                               } else {
                                 self->write_next();
                               }
                               self->calls_.end();
                             });
  }

  void next_request() {
    complete_ = false;
    started_ = false;
    piece_written_ = false;
    ++request_;  // late calls on the old reply are ignored
    close_callbacks_.clear();
    if (!keep_alive_) return linger();
    if (watching_) {
      read_next_ = true;
      beast::error_code ec;
      stream_.socket().cancel(ec);  // the watch ends and starts the next read
      return;
    }
    read();
  }

  /// Closes after the last answer without resetting the connection: closing a socket with unread
  /// bytes makes the kernel send a reset, which can destroy the answer before the client reads it
  /// (a 413 sent while the client is still writing its body). So the write side is shut, and
  /// what the client still sends is read and dropped until it closes too or linger_timeout passes.
  void linger() {
    lingering_ = true;
    beast::error_code ec;
    stream_.socket().shutdown(tcp::socket::shutdown_send, ec);  // the peer may be gone already
    if (ec) return gone();
    buffer_.clear();
    if (watching_) {
      stream_.socket().cancel(ec);  // the watch ends and starts the drain
      return;
    }
    start_drain();
  }

  void start_drain() {
    // With no read pending, so that reads get it.
    stream_.expires_after(busy_ ? std::min(options_.linger_timeout, options_.busy_linger_timeout) : options_.linger_timeout);
    drain();
  }

  void drain() {
    stream_.async_read_some(buffer_.prepare(watch_read_bytes), [self = shared_from_this()](beast::error_code ec, std::size_t) {
      if (ec) return self->gone();  // the client closed, or linger_timeout passed
      self->drain();
    });
  }

  void gone() {
    if (gone_) return;
    gone_ = true;
    // Posted, not called: gone() may run inside a dispatched write whose caller holds a lock that
    // the callbacks take.
    if (!close_callbacks_.empty()) {
      asio::post(stream_.get_executor(), [callbacks = std::move(close_callbacks_)] {
        for (const auto& callback : callbacks) {
          try {
            callback();
          } catch (const std::exception& e) {  // process edge: a handler bug must not kill the server
            spdlog::error("http: a request's close handler failed: {}", e.what());
          }
        }
      });
      close_callbacks_.clear();
    }
    beast::error_code ec;
    stream_.socket().close(ec);
  }

  /// Most bytes one read of the watch (or the drain after the last answer) takes.
  static constexpr std::size_t watch_read_bytes = 4096;

  beast::tcp_stream stream_;
  connection_slot slot_;
  std::size_t header_fields_ = 0;  ///< the current request's header fields, without a trailer's
  bool busy_ = false;              ///< refused past connections_max: a short linger
  /// What was read and not parsed yet: at most a header block and one read of the watch. Beast's
  /// parser bounds the header block itself, but not a chunked body's size lines or trailer.
  beast::flat_buffer buffer_;
  std::optional<http::request_parser<http::string_body>> parser_;
  const http_server_options& options_;
  const http_handler& handler_;
  const websocket_handler& upgrade_;
  std::atomic<std::uint64_t>& writes_;  ///< the server's count of writes to clients
  std::uint64_t request_ = 0;  ///< the request being answered; replies for others are ignored
  bool keep_alive_ = true;
  bool head_ = false;      ///< the request is a HEAD: its answer goes without a body
  bool chunked_ = true;    ///< a streamed answer goes in chunks (HTTP/1.1); else until the close
  bool started_ = false;   ///< the answer's first bytes are queued
  bool complete_ = false;  ///< the answer's last bytes are queued
  bool writing_ = false;
  bool direct_writes_ = false;  ///< the socket is non-blocking: write_next tries a write at once
  bool watching_ = false;
  bool read_next_ = false;
  bool lingering_ = false;  ///< the last answer is sent; reads are dropped until the client closes
  bool gone_ = false;
  bool flush_queued_ = false;  ///< a flush_soon is queued
  bool piece_written_ = false;  ///< the streamed answer's first piece is queued (later ones may wait)
  bool held_ = false;  ///< pieces wait for the flush clock's next tick
  steady::time_point last_write_{};  ///< when bytes last went to the socket
  flush_clock& clock_;  ///< the server's, which writes the pieces held for stream_flush_interval
  websocket_registry& websockets_;
  pending_calls& calls_;  ///< the server's; also counts this session's write under way
  std::string remote_address_;  ///< the peer's, read once when the connection starts
  std::string pending_;    ///< bytes queued behind the write in flight
  write_buffer in_flight_;  ///< the write the socket takes in pieces, if any
  std::vector<std::function<void()>> close_callbacks_;
};

void flush_clock::hold(std::shared_ptr<session> held) {
  std::lock_guard lock(mutex_);
  held_.push_back(std::move(held));
  if (armed_) return;
  armed_ = true;
  timer_.expires_after(interval_);
  timer_.async_wait([this](beast::error_code ec) {
    if (!ec) tick();  // otherwise the server is stopping
  });
}

void flush_clock::tick() {
  std::vector<std::shared_ptr<session>> due;
  {
    std::lock_guard lock(mutex_);
    armed_ = false;
    due.swap(held_);
  }
  for (auto& held : due) {
    asio::dispatch(held->executor(), [held] { held->flush_held(); });
  }
}

void reply_handle::send(http_response response) {
  owner_->calls().begin();
  asio::post(owner_->executor(), [owner = owner_, request = request_, response = std::move(response)]() mutable {
    owner->send(request, std::move(response));
    owner->calls().end();
  });
}

// The streaming calls (one per token) are dispatched, not posted: see http_reply::write. A whole
// answer (send) is one call per request and stays posted.
void reply_handle::start_stream(unsigned status, std::string content_type, http_headers headers) {
  asio::dispatch(owner_->executor(), [owner = owner_, request = request_, status, content_type = std::move(content_type),
                                      headers = std::move(headers)]() mutable {
    owner->start_stream(request, status, std::move(content_type), std::move(headers));
  });
}

void reply_handle::write(std::string data) {
  asio::dispatch(owner_->executor(), [owner = owner_, request = request_, data = std::move(data)]() mutable {
    owner->write(request, std::move(data));
  });
}

void reply_handle::finish() {
  owner_->calls().begin();
  asio::dispatch(owner_->executor(), [owner = owner_, request = request_] {
    owner->finish(request);
    owner->calls().end();
  });
}

void reply_handle::on_close(std::function<void()> callback) {
  asio::post(owner_->executor(), [owner = owner_, request = request_, callback = std::move(callback)]() mutable {
    owner->on_close(request, std::move(callback));
  });
}

}  // namespace

class http_server::impl {
 public:
  impl(http_server_options options, http_handler handler, websocket_handler upgrade)
      : options_(std::move(options)), handler_(std::move(handler)), upgrade_(std::move(upgrade)), acceptor_(io_) {}

  ~impl() {
    // What handlers gave their replies just before the stop goes out first (a drain's last
    // chunks): for at most stop_writes_wait_max, since a client that reads nothing holds its write.
    (void)calls_.wait_none(options_.stop_writes_wait_max);
    io_.stop();
    for (auto& t : threads_) t.join();
    websockets_.release_all();
  }

  expected<void, std::string> start() {
    beast::error_code ec;
    // A host name (e.g. localhost) listens on the first address it resolves to.
    tcp::resolver resolver(io_);
    const auto resolved = resolver.resolve(options_.host, std::to_string(options_.port),
                                           tcp::resolver::passive | tcp::resolver::numeric_service, ec);
    if (ec || resolved.empty()) {
      return unexpected{"cannot resolve listen address '" + options_.host + "': " + ec.message()};
    }
    const tcp::endpoint endpoint = resolved.begin()->endpoint();
    const std::string where = options_.host + ":" + std::to_string(options_.port);
    (void)acceptor_.open(endpoint.protocol(), ec);
    if (!ec) (void)acceptor_.set_option(asio::socket_base::reuse_address(true), ec);
    if (!ec) (void)acceptor_.bind(endpoint, ec);
    if (!ec) (void)acceptor_.listen(asio::socket_base::max_listen_connections, ec);
    if (ec) return unexpected{"cannot listen on " + where + ": " + ec.message()};
    port_ = acceptor_.local_endpoint().port();
    if (options_.on_listening) options_.on_listening(port_);
    accept();
    for (std::size_t i = 0; i < std::max<std::size_t>(1, options_.threads); ++i) {
      threads_.emplace_back([this] { io_.run(); });
    }
    return {};
  }

  std::uint16_t port() const noexcept { return port_; }
  std::size_t open() const noexcept { return open_.load(); }
  std::size_t websockets_started() { return websockets_.size(); }
  std::uint64_t writes() const noexcept { return writes_.load(std::memory_order_relaxed); }

 private:
  void accept() {
    acceptor_.async_accept(asio::make_strand(io_), [this](beast::error_code ec, tcp::socket socket) {
      if (ec == asio::error::operation_aborted) return;
      if (ec) {
        // Out of descriptors (EMFILE, ENFILE) or kernel memory: the connection stays in the listen
        // queue, so accepting again at once would fail again, at once, at a full core. Wait until
        // some connection may have closed, longer each time, as Go's net/http does.
        accept_backoff_ = std::clamp(accept_backoff_ * 2, accept_backoff_min, accept_backoff_max);
        accept_timer_.expires_after(accept_backoff_);
        accept_timer_.async_wait([this](beast::error_code waited) {
          if (!waited) accept();
        });
        return;
      }
      accept_backoff_ = {};
      if (calls_.stopping()) return;  // the socket closes here, and no accept is armed again
      (void)socket.set_option(tcp::no_delay(true), ec);  // tokens go out as they come
      const auto now_open = open_.fetch_add(1) + 1;
      auto s = std::make_shared<session>(std::move(socket), connection_slot(open_), options_, handler_, upgrade_,
                                         writes_, clock_, websockets_, calls_);
      if (now_open > options_.connections_max) s->reject_busy();
      else s->start();
      accept();
    });
  }

  // Declared before io_: sessions destroyed with io_ still refer to these.
  http_server_options options_;
  http_handler handler_;
  websocket_handler upgrade_;
  std::atomic<std::size_t> open_{0};
  std::atomic<std::uint64_t> writes_{0};
  websocket_registry websockets_;
  pending_calls calls_;
  asio::io_context io_;
  flush_clock clock_{io_, options_.stream_flush_interval};  ///< holds connections: destroyed before io_
  tcp::acceptor acceptor_;
  // Between a failed accept and the next (one accept is pending at a time, so no lock).
  static constexpr std::chrono::milliseconds accept_backoff_min{5}, accept_backoff_max{1'000};
  std::chrono::milliseconds accept_backoff_{};
  asio::steady_timer accept_timer_{io_};
  std::vector<std::thread> threads_;
  std::uint16_t port_ = 0;
};

expected<std::unique_ptr<http_server>, std::string> http_server::start(http_server_options options,
                                                                       http_handler handler,
                                                                       websocket_handler upgrade) {
  auto state = std::make_unique<impl>(std::move(options), std::move(handler), std::move(upgrade));
  if (auto started = state->start(); !started) return unexpected{started.error()};
  return std::unique_ptr<http_server>(new http_server(std::move(state)));
}

http_server::http_server(std::unique_ptr<impl> state) : impl_(std::move(state)) {}
http_server::~http_server() = default;
std::uint16_t http_server::port() const noexcept { return impl_->port(); }
std::size_t http_server::connections_open() const noexcept { return impl_->open(); }
std::size_t http_server::websockets_started() const { return impl_->websockets_started(); }
std::uint64_t http_server::writes() const noexcept { return impl_->writes(); }

}  // namespace gpustream::gateway
