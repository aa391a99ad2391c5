#pragma once
/// A small HTTP/1.1 server on Boost.Beast: keep-alive, bounded headers and bodies, a bounded number
/// of open connections, idle timeouts. Requests are handed to one handler function. Beast stays
/// behind this header.

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>

#include "base/expected.hpp"

namespace gpustream::gateway {

struct http_request {
  std::string method;  ///< "GET", "POST", …
  std::string target;  ///< path and query, e.g. "/healthz"
  std::map<std::string, std::string> headers;  ///< lower-case names
  std::string body;
};

struct http_response {
  unsigned status = 200;
  std::string content_type = "application/json";
  std::string body;
};

using http_handler = std::function<http_response(const http_request&)>;

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
  /// Most open connections; more are closed at once after a 503. Default: 1024.
  std::size_t connections_max = 1024;
  /// A connection with no complete request for this long is closed. Default: 30 s.
  std::chrono::seconds idle_timeout{30};
};

class http_server {
 public:
  /// Binds and starts serving on background threads. Fails with a message naming the address.
  [[nodiscard]] static expected<std::unique_ptr<http_server>, std::string> start(
      http_server_options options, http_handler handler);
  ~http_server();  ///< stops accepting, closes connections, joins the threads
  http_server(const http_server&) = delete;
  http_server& operator=(const http_server&) = delete;

  /// The port actually bound (useful with port 0).
  [[nodiscard]] std::uint16_t port() const noexcept;

  class impl;

 private:
  explicit http_server(std::unique_ptr<impl> state);
  std::unique_ptr<impl> impl_;
};

}  // namespace gpustream::gateway
