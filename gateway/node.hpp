#pragma once
/// The gateway of one node: the HTTP/WebSocket server and everything behind its routes: the
/// OpenAI-compatible API, the provider link, the admin API, the provider's own page, ad clicks,
/// metrics. app/ starts it beside the actor runtime. Heavy headers stay in node.cpp.

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "base/expected.hpp"
#include "gateway/http_server.hpp"
#include "gateway/openai_api.hpp"
#include "gateway/provider_link.hpp"
#include "gateway/rate_limiter.hpp"
#include "gateway/relay.hpp"

namespace caf {
class actor_system;
}

namespace gpustream::actors {
struct runtime;
}

namespace gpustream::storage {
class event_store;
}

namespace gpustream::gateway {

struct node_options {
  http_server_options http;
  /// The admin API's bearer token; empty: the admin API answers 503.
  std::string admin_token;
  /// The address clients reach this node at, for click-tracking URLs, e.g. "http://127.0.0.1:8080".
  /// Default: "http://" + http.host + ":" + the bound port.
  std::string public_url;
  api_limits api;
  /// max_tokens of a free user's request that names none (or what the model's context leaves,
  /// when less), and sent to the backend so the answer ends there (finish_reason "length"): a
  /// free answer's budget is held against the user's daily quota before it runs, and without a
  /// bound the hold would be all the context leaves (up to 131,072 tokens, more than a day's
  /// quota). Default: 4,096.
  std::uint32_t free_max_tokens_default = 4096;
  /// Per API key. Default: 600 requests per minute, bursts of 100.
  rate_limiter_options rate{600, 100, 100'000};
  /// Origins allowed to call the API from a browser (CORS). Default: none.
  std::vector<std::string> cors_origins;
  provider_link_options link;
  relay_options relay;
  /// Longest wait for the ad server to pick a free-tier answer's ad; past it the answer goes
  /// without one (see actor_ad_source_options::pick_wait_max). Default: 1 s.
  std::chrono::milliseconds ad_pick_wait_max{1000};
  /// Longest wait for the ad server to record a click (its campaign's append). Past it, as when
  /// the ad server is busy or fails, the person goes to the campaign's page anyway and the click
  /// may go uncounted (it moves no money). Default: 2 s.
  std::chrono::milliseconds click_answer_wait_max{2000};
  /// Longest wait for each step node::start takes to close what a stop left open (a bill
  /// settled, a job failed, a provider taken offline). Default: 10 s.
  std::chrono::milliseconds left_open_wait_max{10'000};
  /// Actors carrying requests from Beast's threads into the actor system. Default: 2.
  std::size_t bridge_actors = 2;
};

class node {
 public:
  /// Opens the directory on `store`; closes what a stop left open in the log (settles the jobs'
  /// bills it finds without their ledger groups, fails the jobs that were live, takes offline the
  /// providers that were online); starts the gateway's parts and the server. `system` and
  /// `runtime` must outlive the node.
  [[nodiscard]] static expected<std::unique_ptr<node>, std::string> start(
      caf::actor_system& system, const actors::runtime& runtime, std::shared_ptr<storage::event_store> store,
      node_options options);
  /// Stops the parts behind the server first (the bridge, links, relay and admin API: nothing
  /// calls into the server from actor threads any more; a request still in their hands gets no
  /// answer), then the server. Call drain() before, so that answers end first.
  ~node();
  node(const node&) = delete;
  node& operator=(const node&) = delete;

  [[nodiscard]] std::uint16_t port() const noexcept;
  /// Before a stop: takes no more completions (503; /healthz answers 503 "draining"), lets the live answers finish for up to
  /// `wait_max`, then cuts short those still running, billing what their providers produced
  /// (relay::drain). Returns how many it cut short.
  std::size_t drain(std::chrono::milliseconds wait_max);
  /// What the provider links passed on (also in /metrics).
  [[nodiscard]] provider_link_counts link_counts() const noexcept;

  class impl;

 private:
  explicit node(std::unique_ptr<impl> state);
  std::unique_ptr<impl> impl_;
};

}  // namespace gpustream::gateway
