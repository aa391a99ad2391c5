#include "app/serve.hpp"

#include <caf/actor_system.hpp>
#include <caf/actor_system_config.hpp>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cctype>
#include <charconv>
#include <csignal>
#include <condition_variable>
#include <mutex>
#include <optional>
#include <span>
#include <thread>
#include <utility>
#include <pthread.h>

#include "actors/errors.hpp"
#include "actors/ledger_claims.hpp"
#include "actors/runtime.hpp"
#include "app/open_files.hpp"
#include "gateway/node.hpp"

namespace gpustream::app {
namespace {

struct host_port {
  std::string host;
  std::uint16_t port = 0;
};

expected<host_port, std::string> parse_host_port(const std::string& text) {
  const auto not_host_port = [&text] {
    return unexpected{"--http must be HOST:PORT, e.g. 127.0.0.1:8080 or [::1]:8080, not '" + text + "'"};
  };
  // An IPv6 address goes in brackets ([::1]:8080), as in a URL: unbracketed, its colons leave the
  // port unclear and the click URLs made from it would be no URLs.
  std::string host;
  std::size_t colon = 0;
  if (text.starts_with('[')) {
    const auto close = text.find(']');
    if (close == std::string::npos || close == 1 || close + 1 >= text.size() || text[close + 1] != ':') {
      return not_host_port();
    }
    host = text.substr(1, close - 1);
    colon = close + 1;
  } else {
    colon = text.find(':');
    if (colon == std::string::npos || colon == 0 || text.find(':', colon + 1) != std::string::npos) {
      return not_host_port();
    }
    host = text.substr(0, colon);
  }
  if (colon + 1 == text.size()) return not_host_port();
  const std::string port_text = text.substr(colon + 1);
  // Decimal digits only: no sign or space, which a looser parse would take ("+80", " 80", "-0").
  unsigned long port = 0;
  const auto [end, ec] = std::from_chars(port_text.data(), port_text.data() + port_text.size(), port);
  if (ec != std::errc{} || end != port_text.data() + port_text.size() || port > 65535) {
    return unexpected{"--http port must be 0 to 65535, not '" + port_text + "'"};
  }
  return host_port{std::move(host), static_cast<std::uint16_t>(port)};
}

std::string lowercase(std::string text) {
  std::transform(text.begin(), text.end(), text.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return text;
}

/// The scheme ("http" or "https", lowercase) and what follows "://", or why `url` has none.
expected<std::pair<std::string, std::string>, std::string> split_http_url(const std::string& url) {
  const auto separator = url.find("://");
  const auto scheme = separator == std::string::npos ? std::string{} : lowercase(url.substr(0, separator));
  if (scheme != "http" && scheme != "https") return unexpected{std::string("it must begin with http:// or https://")};
  const auto rest = url.substr(separator + 3);
  if (rest.empty() || rest.front() == '/' || rest.front() == ':') return unexpected{std::string("it names no host")};
  return std::pair{scheme, rest};
}

}  // namespace

/// --public-url as click URLs are made from it: http(s)://HOST[:PORT][/PATH], without the trailing
/// slash that would make every click path begin with "//" (which the gateway does not route).
expected<std::string, std::string> checked_public_url(const std::string& url) {
  auto parts = split_http_url(url);
  if (!parts) return unexpected{"--public-url '" + url + "': " + parts.error() + ", e.g. https://gpu.example.com"};
  auto rest = parts->second;
  if (rest.find_first_of("?#") != std::string::npos) {
    return unexpected{"--public-url '" + url + "': click URLs are made by appending /a/c/<id>, so it may hold no "
                      "query or fragment"};
  }
  while (rest.size() > 1 && rest.back() == '/') rest.pop_back();
  return parts->first + "://" + rest;
}

/// A --cors-origin as browsers send Origin: scheme://host[:port], lowercase, no path. An origin
/// written otherwise ("*", a trailing slash, capitals) would match no request.
expected<std::string, std::string> checked_origin(const std::string& origin) {
  auto parts = split_http_url(origin);
  auto rest = parts ? parts->second : std::string{};
  if (parts && rest.size() > 1 && rest.back() == '/') rest.pop_back();
  if (!parts || rest.find_first_of("/?#*") != std::string::npos) {
    return unexpected{"--cors-origin '" + origin + "': an origin is scheme://host[:port] as a browser sends it, "
                      "e.g. https://app.example.com (no path, no wildcard)"};
  }
  // A browser leaves the scheme's default port out of Origin.
  rest = lowercase(rest);
  const std::string default_port = parts->first == "https" ? ":443" : ":80";
  if (rest.size() > default_port.size() && rest.ends_with(default_port)) rest.resize(rest.size() - default_port.size());
  return parts->first + "://" + rest;
}

/// The signals that stop serve (SIGINT, SIGTERM, and SIGHUP: its terminal closed), blocked in
/// every thread and taken by a thread of their own from the start: the first asks serve to stop,
/// also while it still starts (it stops after the step under way), and a second one stops the
/// process at once, by its default action, whatever serve is doing (a long start, a drain).
class stop_signals {
 public:
  /// Call before any other thread starts: threads inherit the blocked set.
  stop_signals() {
    sigemptyset(&set_);
    for (const int signal : {SIGINT, SIGTERM, wake_signal}) sigaddset(&set_, signal);
    // Not under nohup, which ignores it: a blocked signal is taken by sigwait even when ignored.
    struct sigaction hang_up {};
    if (sigaction(SIGHUP, nullptr, &hang_up) == 0 && hang_up.sa_handler != SIG_IGN) sigaddset(&set_, SIGHUP);
    pthread_sigmask(SIG_BLOCK, &set_, nullptr);
    thread_ = std::thread([this] { watch(); });
  }
  ~stop_signals() {
    {
      std::lock_guard lock(mutex_);
      closing_ = true;
    }
    pthread_kill(thread_.native_handle(), wake_signal);
    thread_.join();
  }
  stop_signals(const stop_signals&) = delete;
  stop_signals& operator=(const stop_signals&) = delete;

  /// The first stop signal, once one came.
  [[nodiscard]] std::optional<int> received() const {
    std::lock_guard lock(mutex_);
    return first_;
  }
  /// Waits for the first stop signal and returns it.
  int wait() {
    std::unique_lock lock(mutex_);
    came_.wait(lock, [this] { return first_.has_value(); });
    return *first_;
  }

 private:
  /// Wakes the thread for its end; never sent from outside.
  static constexpr int wake_signal = SIGUSR1;

  void watch() {
    for (;;) {
      int signal = 0;
      if (sigwait(&set_, &signal) != 0) continue;
      std::lock_guard lock(mutex_);
      if (signal == wake_signal) {
        if (closing_) return;
        continue;
      }
      if (!first_) {
        first_ = signal;
        came_.notify_all();
        continue;
      }
      // The second: its default action, here, now.
      std::signal(signal, SIG_DFL);
      sigset_t just_it;
      sigemptyset(&just_it);
      sigaddset(&just_it, signal);
      pthread_sigmask(SIG_UNBLOCK, &just_it, nullptr);
      raise(signal);
    }
  }

  sigset_t set_{};
  mutable std::mutex mutex_;
  std::condition_variable came_;
  std::optional<int> first_;
  bool closing_ = false;
  std::thread thread_;
};

expected<void, std::string> checked_admin_token(std::string_view token) {
  if (token.empty()) return {};  // no admin API
  // Never quote the token: these messages go to the log.
  for (std::size_t i = 0; i < token.size(); ++i) {
    const auto byte = static_cast<unsigned char>(token[i]);
    if (byte < 0x21 || byte > 0x7E) {
      return unexpected{"--admin-token (or GPUSTREAM_ADMIN_TOKEN) must be printable ASCII without spaces: byte " +
                        std::to_string(i + 1) + " of " + std::to_string(token.size()) +
                        " is a space, a control character or not ASCII (an env file's trailing space or "
                        "newline?); no client could send it"};
    }
  }
  if (token.size() < admin_token_bytes_min) {
    return unexpected{"--admin-token (or GPUSTREAM_ADMIN_TOKEN) must be at least " +
                      std::to_string(admin_token_bytes_min) + " characters, not " + std::to_string(token.size()) +
                      ", so that it cannot be guessed; make one with `openssl rand -hex 16`"};
  }
  return {};
}

int run_serve(const serve_options& given) {
  auto logger = spdlog::default_logger()->clone("serve");
  serve_options options = given;
  if (auto token = checked_admin_token(options.admin_token); !token) {
    logger->error("{}", token.error());
    return 2;
  }
  auto address = parse_host_port(options.http);
  if (!address) {
    logger->error("{}", address.error());
    return 2;
  }
  if (!options.public_url.empty()) {
    auto url = checked_public_url(options.public_url);
    if (!url) {
      logger->error("{}", url.error());
      return 2;
    }
    options.public_url = *url;
  } else if (address->host == "0.0.0.0" || address->host == "::") {
    logger->warn("--http {} listens on every address, and the ads' click URLs name it as it is, which no "
                 "client can reach: set --public-url to the address clients use",
                 options.http);
  }
  for (auto& origin : options.cors_origins) {
    auto checked = checked_origin(origin);
    if (!checked) {
      logger->error("{}", checked.error());
      return 2;
    }
    origin = *checked;
  }
  stop_signals signals;  // before any other thread starts
  const auto stopped_while_starting = [&](std::string_view step) {
    const auto signal = signals.received();
    if (signal) logger->info("stopping signal={} while starting, {}", *signal, step);
    return signal.has_value();
  };
  // Before the store opens: it keeps each of its table files open, as many as the log has.
  const std::uint64_t files = raise_open_files_limit();

  storage::store_options store_options;
  store_options.mode = options.mode;
  store_options.sync_interval = std::chrono::microseconds(options.sync_interval_us);
  // A store from before appends claimed keys: its ledger's transfer and group ids are claimed
  // before anything is served, so that none can be applied again once the window forgets it.
  struct upgrade_counts {
    std::uint64_t claimed = 0;
    std::uint64_t repeated = 0;  // named again after an earlier claim: applied more than once
  };
  std::optional<upgrade_counts> upgrade;  // set once an upgrade starts
  store_options.format_1_claims = [&](const storage::event_store& store, const storage::claim_sink& claim) {
    logger->info("upgrading the event store from format 1: claiming the ledger's transfer and group ids");
    upgrade.emplace();
    return actors::claim_ledger_keys(store, [&](std::span<const storage::claimed_key> keys) {
      auto taken = claim(keys);
      if (taken) {
        upgrade->claimed += *taken;
        upgrade->repeated += keys.size() - *taken;
      }
      return taken;
    });
  };
  auto opened = storage::event_store::open(options.data, store_options);
  if (opened && upgrade) {
    logger->info("event store upgraded to format {}: {} keys claimed", storage::store_format_version,
                 upgrade->claimed);
    if (upgrade->repeated > 0) {
      logger->warn("the ledger's stream names {} transfer or group ids again after their first use: "
                   "each is claimed at its first use; `gpustream replay --data {} --verify` names the "
                   "transfers applied twice",
                   upgrade->repeated, options.data.string());
    }
  }
  if (!opened) {
    logger->error("cannot open the event store: {}", opened.error().message);
    return 1;
  }
  std::shared_ptr<storage::event_store> store = std::move(opened.value());
  if (stopped_while_starting("after opening the store")) return 0;
  // The actor runtime: store actor, aggregates, ledger and scheduler. Stopped before the system
  // (whose destructor waits for every actor) goes out of scope.
  caf::actor_system_config caf_config;
  actors::add_error_categories(caf_config);
  // An idle work-stealing worker spins briefly, then (by CAF's default) polls 500 times with a
  // 50 us sleep between polls before it waits on its condition variable: about 12,000 wake-ups a
  // second per worker whatever the load, taking cores the HTTP thread, the store's writer and the
  // providers' agents need. Without the polling phase a worker waits on its condition variable
  // right after the spin, and work sent from outside the actor system (Beast's threads, the
  // store) wakes it at once.
  caf_config.set("work-stealing.moderate-poll-attempts", 0);
  // CAF starts at least 4 workers whatever the machine; more workers than cores only add polling.
  caf_config.set("scheduler.max-threads",
                 options.actor_threads > 0 ? options.actor_threads
                                           : std::size_t{std::max(1u, std::thread::hardware_concurrency())});
  caf::actor_system system(caf_config);
  actors::runtime_options runtime_options;
  runtime_options.payouts.first_run_at_once = false;  // the node's start runs it, before serving
  const std::size_t ad_prompt_bytes_max = runtime_options.ads.auction.prompt_bytes_max;
  const auto runtime = actors::start_runtime(system, store, std::move(runtime_options));
  struct stop_at_exit {
    const actors::runtime& r;
    ~stop_at_exit() { r.stop(); }
  } stopper{runtime};
  if (stopped_while_starting("after starting the actors")) return 0;
  gateway::node_options node_options;
  node_options.http.host = address->host;
  node_options.http.port = address->port;
  node_options.http.threads = options.http_threads;
  node_options.http.stream_flush_interval = std::chrono::milliseconds(options.stream_flush_ms);
  node_options.relay.live_jobs_max = options.live_jobs_max;
  node_options.relay.ad_prompt_bytes_max = ad_prompt_bytes_max;  // what the ad server's auction reads
  const bool admin_api = !options.admin_token.empty();
  node_options.admin_token = std::exchange(options.admin_token, {});
  node_options.public_url = options.public_url;
  node_options.rate.requests_per_minute = options.rate_per_minute;
  node_options.rate.burst = options.rate_burst;
  node_options.cors_origins = options.cors_origins;
  node_options.link.heartbeat_interval = std::chrono::milliseconds(options.heartbeat_ms);
  node_options.link.stale_after = 3 * node_options.link.heartbeat_interval;
  // One descriptor per connection, from the same limit as the event store's files: the gateway
  // takes no more connections than leave the store its reserve (past them, a 503), or enough open
  // connections would make the store's next file fail to open, and every append with it.
  const std::uint64_t files_wanted = node_options.http.connections_max + open_files_reserve;
  if (files < files_wanted) {
    const std::uint64_t connections = connections_within(files);
    logger->warn("the open-files limit is {} (its hard limit; `ulimit -Hn`): the gateway takes at most {} "
                 "connections instead of {}, leaving {} files to the event store; raise it to {} or more "
                 "(`ulimit -n` in the shell that starts serve, LimitNOFILE= in a systemd unit)",
                 files, connections, node_options.http.connections_max, files - connections, files_wanted);
    node_options.http.connections_max = static_cast<std::size_t>(connections);
  }
  auto node = gateway::node::start(system, runtime, store, std::move(node_options));
  if (!node) {
    logger->error("{}", node.error());
    return 1;
  }
  if (!admin_api) {
    logger->warn("no admin token: the admin API answers 503 (set --admin-token or GPUSTREAM_ADMIN_TOKEN)");
  }
  logger->info("listening http={}:{} data={} durability={} last_position={}", address->host, (*node)->port(),
               options.data.string(), options.mode == storage::durability::sync ? "sync" : "buffered",
               store->last_position());
  // A second signal stops the process at once: what was acknowledged is in the log already, and
  // the next start closes what is left open.
  const int signal = signals.wait();
  logger->info("stopping signal={}: live answers may finish for up to {} s (a second signal stops at once)", signal,
               options.drain_s);
  const auto cut = (*node)->drain(std::chrono::seconds(options.drain_s));
  logger->info("stopped{}", cut == 0 ? std::string()
                                      : ": " + std::to_string(cut) +
                                            " answers cut short, each billed for what its provider produced once "
                                            "its end was recorded");
  return 0;
}

}  // namespace gpustream::app
