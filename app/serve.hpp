#pragma once
/// `gpustream serve`: opens the embedded event store and serves HTTP until SIGINT or SIGTERM.

#include <filesystem>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "base/expected.hpp"
#include "storage/event_store.hpp"

namespace gpustream::app {

struct serve_options {
  /// Data directory of the embedded RocksDB event store. Default: ./data.
  std::filesystem::path data = "data";
  /// HOST:PORT to listen on. Default: 127.0.0.1:8080.
  std::string http = "127.0.0.1:8080";
  /// Default: sync.
  storage::durability mode = storage::durability::sync;
  /// Bearer token of the admin API; empty: the admin API answers 503 to everyone. Also from
  /// GPUSTREAM_ADMIN_TOKEN.
  std::string admin_token;
  /// Requests per minute per API key, and the burst. Default: 600 and 100.
  std::uint32_t rate_per_minute = 600;
  std::uint32_t rate_burst = 100;
  /// Origins allowed to call the API from a browser. Default: none.
  std::vector<std::string> cors_origins;
  /// Provider heartbeat interval, ms; a link silent for 3 intervals is stale. Default: 1000.
  std::uint32_t heartbeat_ms = 1000;
  /// The address clients reach this node at (click URLs). Default: http://HOST:PORT.
  std::string public_url;
  /// Threads running the HTTP/WebSocket I/O. Default: 2.
  std::size_t http_threads = 2;
  /// Threads running the actor system's workers; 0: one per core. Default: 0.
  std::size_t actor_threads = 0;
  /// A streamed answer's first token is written at once, later ones together at most once per
  /// this many ms; 0: each at once. Default: 5.
  std::uint32_t stream_flush_ms = 5;
  /// `sync` durability under load: fsyncs of the event log at most one per this many µs on
  /// average, after a few back to back (store_options::sync_interval); 0: each at once.
  /// Default: 3000.
  std::uint32_t sync_interval_us = 3000;
  /// Most live jobs (waiting, streaming or finishing) this node holds; one more is refused with
  /// 429 server_busy. Default: 100,000.
  std::size_t live_jobs_max = 100'000;
  /// On SIGINT or SIGTERM, live answers may finish for up to this many seconds; those still running
  /// then are cut short, billed for what their providers produced. Default: 30.
  std::uint32_t drain_s = 30;
};

/// --public-url as click URLs are made from it: http(s)://HOST[:PORT][/PATH] without trailing
/// slashes; or why it cannot be one.
[[nodiscard]] expected<std::string, std::string> checked_public_url(const std::string& url);
/// A --cors-origin as browsers send Origin (scheme://host[:port], lowercase, no trailing slash);
/// or why it can match no request ("*", a path).
[[nodiscard]] expected<std::string, std::string> checked_origin(const std::string& origin);

/// Shortest admin token serve takes: one that cannot be guessed.
inline constexpr std::size_t admin_token_bytes_min = 16;

/// Whether `token` can be the admin API's token: empty (no admin API), or at least
/// admin_token_bytes_min printable ASCII characters without spaces (a client sends no other).
/// The reason never quotes the token.
[[nodiscard]] expected<void, std::string> checked_admin_token(std::string_view token);

/// Runs until a termination signal; returns the process exit code.
[[nodiscard]] int run_serve(const serve_options& options);

}  // namespace gpustream::app
