#pragma once
/// The HTTP/1.1 and WebSocket server on Boost.Beast: keep-alive, bounded headers and bodies, a
/// bounded number of open connections, idle timeouts, asynchronous handlers that answer whole or
/// stream (SSE), and WebSocket upgrades. Beast stays behind this header.

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

#include "base/expected.hpp"

namespace gpustream::gateway {

using http_headers = std::vector<std::pair<std::string, std::string>>;

struct http_request {
  std::string method;  ///< "GET", "POST", …
  std::string target;  ///< path and query, e.g. "/healthz"
  std::map<std::string, std::string> headers;  ///< lower-case names
  std::string body;
  std::string remote_address;  ///< the peer's IP address, for logs and limits

  /// A GET or a HEAD: a HEAD is answered as its GET would be, and the server leaves the body out
  /// (RFC 9110 §9.3.2), so the endpoints that read answer both.
  [[nodiscard]] bool reads() const noexcept { return method == "GET" || method == "HEAD"; }
  /// The path without the query.
  [[nodiscard]] std::string_view path() const noexcept {
    return std::string_view(target).substr(0, target.find('?'));
  }
  /// A header's value, or "" when absent. `name` is lower-case.
  [[nodiscard]] std::string_view header(const std::string& name) const {
    const auto it = headers.find(name);
    return it == headers.end() ? std::string_view{} : std::string_view(it->second);
  }
};

struct http_response {
  unsigned status = 200;
  std::string content_type = "application/json";
  std::string body;
  http_headers headers;  ///< extra headers, e.g. Retry-After, Location, CORS
};

/// The answering side of one request. Thread-safe: every call is carried to the connection's own
/// strand, so handlers may answer from any thread, later. Exactly one of send() or
/// start_stream()…finish() should be used; calls after the answer is complete or after the client
/// went away are ignored. A reply holds its connection, which belongs to the server: every reply
/// must be let go of before the server is destroyed.
class http_reply {
 public:
  virtual ~http_reply() = default;
  /// Sends a whole response.
  virtual void send(http_response response) = 0;
  /// Starts a streamed (chunked) response, e.g. `text/event-stream` for SSE.
  virtual void start_stream(unsigned status, std::string content_type, http_headers headers) = 0;
  /// Queues one piece of a streamed response. It is written once the connection has run the calls
  /// already queued for it, together with every piece queued meanwhile: a busy server sends fewer,
  /// larger writes, an idle one each piece on its own. A client that lets more than
  /// stream_buffer_bytes_max pile up is disconnected. Called on one of the server's I/O threads
  /// (a provider link's delta) while the connection is idle, it runs before returning, with no
  /// trip through the I/O queue; so do start_stream and finish.
  virtual void write(std::string data) = 0;
  /// Ends a streamed response; the connection then serves its next request.
  virtual void finish() = 0;
  /// Calls `callback` once, on the connection's strand, if the client goes away before the answer
  /// is complete (at once when it already has); never inside a call on this reply, so a caller
  /// may hold a lock that the callback takes.
  virtual void on_close(std::function<void()> callback) = 0;
};

using http_handler = std::function<void(http_request, std::shared_ptr<http_reply>)>;

/// One open WebSocket connection (binary messages). Thread-safe like http_reply.
class websocket_connection {
 public:
  virtual ~websocket_connection() = default;
  /// Starts reading. Messages arrive one at a time on the connection's strand; `on_closed` is
  /// called once with the reason when the connection ends, from either side.
  virtual void start(std::function<void(std::string_view message)> on_message,
                     std::function<void(std::string reason)> on_closed) = 0;
  /// Queues a binary message. A peer that lets more than websocket_send_queue_bytes_max pile up
  /// is disconnected (close code 1008).
  virtual void send(std::string message) = 0;
  /// Closes with a WebSocket close code (1000 normal, 1002 protocol error, 1008 policy, 1009 too
  /// big) and a reason (at most 123 bytes are sent).
  virtual void close(std::uint16_t code, std::string reason) = 0;
};

/// The server accepted an upgrade: on_open runs on the connection's strand once the handshake
/// is done.
struct websocket_accept {
  std::function<void(std::shared_ptr<websocket_connection>)> on_open;
};

/// What to do with an upgrade request: refuse it with an HTTP response, or accept it.
using websocket_decision = std::variant<http_response, websocket_accept>;
using websocket_handler = std::function<websocket_decision(const http_request&)>;

struct http_server_options {
  /// Address to listen on. Default: 127.0.0.1 (loopback only).
  std::string host = "127.0.0.1";
  /// TCP port; 0 picks a free one (see http_server::port()). Default: 8080.
  std::uint16_t port = 8080;
  /// Threads running the I/O loop. Default: 1.
  std::size_t threads = 1;
  /// Largest request header block, bytes; larger gets 431. Default: 16 KiB.
  std::size_t header_bytes_max = 16 * 1024;
  /// Largest request body, bytes; larger gets 413. Default: 1 MiB.
  std::size_t body_bytes_max = 1024 * 1024;
  /// Most open connections (WebSocket ones included); more get a 503 and are closed. Default: 10,000.
  std::size_t connections_max = 10'000;
  /// A connection with no complete request for this long is closed, and so is one whose client
  /// takes none of a pending write (a whole answer, or the pieces of a streamed one that the
  /// socket's buffers could not hold) for this long; a client that keeps taking some is not cut,
  /// however long the write lasts. Default: 30 s.
  std::chrono::seconds idle_timeout{30};
  /// After an answer that ends the connection (a refused request, `Connection: close`), what the
  /// client still sends is read and dropped for at most this long, so that the answer is not lost
  /// to a connection reset. Default: 5 s.
  std::chrono::milliseconds linger_timeout{5'000};
  /// The same for a connection refused as busy (past connections_max), which holds a descriptor
  /// beyond connections_max while it lingers: a flood of them must not use up the process's
  /// files. At most linger_timeout. Default: 250 ms.
  std::chrono::milliseconds busy_linger_timeout{250};
  /// When the server stops, what handlers handed to their replies before (and the writes under
  /// way) may go out for at most this long before the connections are dropped. Default: 1 s.
  std::chrono::milliseconds stop_writes_wait_max{1'000};
  /// A streamed answer's first piece is written at once; later ones are written at most once per
  /// this interval, together (0: each at once), on one clock shared by all connections, so a piece
  /// waits at most this long. Bounds the writes a fast stream costs. Default: 5 ms.
  std::chrono::microseconds stream_flush_interval{5'000};
  /// Most bytes of a streamed response waiting for a slow client (queued, or in a write the
  /// socket has not taken yet); more closes the connection. The queue's buffer grows no larger, and
  /// a write in flight lets go of what the socket took as it goes (write_buffer.hpp), so a slow
  /// client holds at most about 8/7 of this in memory, not nearly twice it. Default: 4 MiB.
  std::size_t stream_buffer_bytes_max = 4 * 1024 * 1024;
  /// Largest WebSocket message received; larger closes the connection with 1009. Default: 1 MiB.
  std::size_t websocket_message_bytes_max = 1024 * 1024;
  /// Most bytes queued for a WebSocket peer. Default: 16 MiB.
  std::size_t websocket_send_queue_bytes_max = 16 * 1024 * 1024;
  /// A WebSocket peer silent for half this long is pinged; silent for this long, it is dropped.
  /// Default: 60 s.
  std::chrono::milliseconds websocket_idle_timeout{60'000};
  /// Longest a WebSocket the server closes (its send queue full, a policy close) waits for the
  /// message being written before its close frame can go: a peer that stops reading never lets it
  /// end, and heartbeats it still sends keep it from going idle. Past it the connection is
  /// dropped. Default: 10 s.
  std::chrono::milliseconds websocket_close_wait_max{10'000};
  /// Called on each answer the server makes itself (a request over a limit or malformed, too
  /// many connections, an upgrade refused, a handler that threw) before it goes out, with the
  /// request's head when it was read (its body left out; of a handler that threw, only its method,
  /// target, Origin and remote address) and otherwise null: to count it and add
  /// the headers every answer carries (CORS), as the handler's own answers get. Default: none.
  std::function<void(const http_request* head, http_response& response)> on_refusal;
  /// Called once with the port bound (the one port 0 picked) before the first connection is
  /// accepted: what requests need to know of it is set before any arrives. Default: none.
  std::function<void(std::uint16_t port)> on_listening;
};

class http_server {
 public:
  /// Binds and starts serving on background threads. Fails with a message naming the address.
  /// Without a websocket handler, upgrade requests are treated as plain requests.
  [[nodiscard]] static expected<std::unique_ptr<http_server>, std::string> start(
      http_server_options options, http_handler handler, websocket_handler upgrade = {});
  ~http_server();  ///< stops accepting, closes connections, joins the threads
  http_server(const http_server&) = delete;
  http_server& operator=(const http_server&) = delete;

  /// The port actually bound (useful with port 0).
  [[nodiscard]] std::uint16_t port() const noexcept;
  /// Connections open now (HTTP and WebSocket).
  [[nodiscard]] std::size_t connections_open() const noexcept;
  /// WebSocket connections started and not yet ended (each holds its owner's callbacks).
  [[nodiscard]] std::size_t websockets_started() const;
  /// Writes that sent HTTP answers to clients since start (WebSocket messages not counted). Streamed
  /// pieces that reach a connection before it gets round to writing share one write.
  [[nodiscard]] std::uint64_t writes() const noexcept;

  class impl;

 private:
  explicit http_server(std::unique_ptr<impl> state);
  std::unique_ptr<impl> impl_;
};

}  // namespace gpustream::gateway
