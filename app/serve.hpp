#pragma once
/// `gpustream serve`: opens the embedded event store and serves HTTP until SIGINT or SIGTERM.

#include <filesystem>
#include <string>

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
};

/// Runs until a termination signal; returns the process exit code.
[[nodiscard]] int run_serve(const serve_options& options);

}  // namespace gpustream::app
