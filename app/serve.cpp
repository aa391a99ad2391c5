#include "app/serve.hpp"

#include <caf/actor_system.hpp>
#include <caf/actor_system_config.hpp>
#include <spdlog/spdlog.h>

#include <csignal>
#include <pthread.h>

#include "actors/errors.hpp"
#include "actors/runtime.hpp"
#include "gateway/http_server.hpp"

namespace gpustream::app {
namespace {

struct host_port {
  std::string host;
  std::uint16_t port = 0;
};

expected<host_port, std::string> parse_host_port(const std::string& text) {
  const auto colon = text.rfind(':');
  if (colon == std::string::npos || colon == 0 || colon + 1 == text.size()) {
    return unexpected{"--http must be HOST:PORT, e.g. 127.0.0.1:8080, not '" + text + "'"};
  }
  const std::string port_text = text.substr(colon + 1);
  unsigned long port = 0;
  try {
    std::size_t used = 0;
    port = std::stoul(port_text, &used);
    if (used != port_text.size()) port = 70000;
  } catch (const std::exception&) {
    port = 70000;
  }
  if (port > 65535) return unexpected{"--http port must be 0 to 65535, not '" + port_text + "'"};
  return host_port{text.substr(0, colon), static_cast<std::uint16_t>(port)};
}

gateway::http_response route(const gateway::http_request& request, const storage::event_store& store) {
  const auto path = request.target.substr(0, request.target.find('?'));
  if (path == "/healthz") {
    if (request.method != "GET") return {405, "application/json", R"({"error":{"message":"use GET"}})"};
    return {200, "application/json",
            R"({"status":"ok","last_position":)" + std::to_string(store.last_position()) + "}"};
  }
  return {404, "application/json",
          R"({"error":{"message":"no such endpoint","type":"invalid_request_error"}})"};
}

}  // namespace

int run_serve(const serve_options& options) {
  auto logger = spdlog::default_logger()->clone("serve");
  auto address = parse_host_port(options.http);
  if (!address) {
    logger->error("{}", address.error());
    return 2;
  }
  // Block the termination signals before any thread starts, so that only sigwait below sees them.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  storage::store_options store_options;
  store_options.mode = options.mode;
  auto opened = storage::event_store::open(options.data, store_options);
  if (!opened) {
    logger->error("cannot open the event store: {}", opened.error().message);
    return 1;
  }
  std::shared_ptr<storage::event_store> store = std::move(opened.value());
  // The actor runtime: store actor, aggregates, ledger and scheduler. Stopped before the system
  // (whose destructor waits for every actor) goes out of scope.
  caf::actor_system_config caf_config;
  actors::add_error_categories(caf_config);
  caf::actor_system system(caf_config);
  const auto runtime = actors::start_runtime(system, store);
  struct stop_at_exit {
    const actors::runtime& r;
    ~stop_at_exit() { r.stop(); }
  } stopper{runtime};
  gateway::http_server_options http_options;
  http_options.host = address->host;
  http_options.port = address->port;
  auto& store_ref = *store;
  auto server = gateway::http_server::start(
      http_options, [&store_ref](gateway::http_request r, std::shared_ptr<gateway::http_reply> reply) {
        reply->send(route(r, store_ref));
      });
  if (!server) {
    logger->error("{}", server.error());
    return 1;
  }
  logger->info("listening http={}:{} data={} durability={} last_position={}", address->host,
               (*server)->port(), options.data.string(),
               options.mode == storage::durability::sync ? "sync" : "buffered",
               store_ref.last_position());
  int signal = 0;
  sigwait(&signals, &signal);
  logger->info("stopping signal={}", signal);
  return 0;
}

}  // namespace gpustream::app
