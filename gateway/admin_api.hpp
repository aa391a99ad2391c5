#pragma once
/// The admin HTTP API under /admin/*, for the platform's operator (issue 4's contract):
///
///   POST /admin/users      {"tier":"free"|"premium","credit_micros":N,"display_name"?}
///                          -> 201 {"id","api_key","key_id","tier","credit_micros"}
///   POST /admin/providers  {"name","owner_user_id"?} -> 201 {"id","token","owner_user_id"}
///                          (without an owner, a free user without API keys is created to own it)
///   POST /admin/campaigns  {"advertiser","title","text","url","keywords":[…],"categories":[…],
///                           "cpm_bid_micros","budget_micros","daily_budget_micros",
///                           "frequency_cap_per_day"} -> 201 {"id"}
///   GET  /admin/providers?limit=N          providers from the directory (+ live load if wired)
///   GET  /admin/jobs?state=S&limit=N       jobs, newest first, optionally in one state; a job's
///                                          money (gross, fee, ad) fills in when its ledger group
///                                          is recorded, a moment after its end
///   GET  /admin/accounts?prefix=P&limit=N  ledger balances, by account name
///   POST /admin/payouts/run                runs the automatic payouts now; returns the report
///                                          {"payouts":[{"id","provider_id","amount_micros",
///                                          "status","reconciled"}],"problems":[…]}
///
/// Every request needs `Authorization: Bearer <admin token>`, compared by SHA-256 digest in
/// constant time: missing or wrong is 401; no token configured is 503 (saying how to set one).
/// Errors are in OpenAI's shape; a bad field is a 400 naming it (`param`); unknown paths 404,
/// wrong methods 405 (with Allow); a HEAD is answered as its GET, without the body. Secrets (API keys, provider tokens) are returned once, stored
/// only as digests and never logged.
///
/// Requests that need the actors spawn one short-lived actor each, which asks them
/// asynchronously and calls `reply` when the answers are in (or with a 503 after
/// request_timeout): no I/O thread ever blocks on an actor. Users and providers created here are
/// applied to the directory before the reply, so a new key or token works at once.
///
/// Include this only where the gateway is wired (app/, tests): it pulls in CAF through the actor
/// handles.

#include <caf/fwd.hpp>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>

#include "actors/ad_server.hpp"
#include "actors/aggregates.hpp"
#include "actors/ledger_actor.hpp"
#include "actors/payout_runner.hpp"
#include "gateway/http_server.hpp"
#include "gateway/rate_limiter.hpp"

namespace gpustream::actors {
struct runtime;
}

namespace gpustream::gateway {

class directory;

/// What a provider's link reports now (its latest heartbeat), for the provider listing.
struct provider_live_state {
  std::uint32_t active_jobs = 0;
  std::uint32_t queued_jobs = 0;
  std::uint32_t load_percent = 0;
  std::uint32_t health_percent = 0;
  std::uint64_t tokens_per_second_milli = 0;
};

/// The actors the admin API asks.
struct admin_peers {
  actors::user_registry users;
  actors::provider_registry providers;
  actors::ledger_actor ledger;
  actors::ad_server_actor ads;
  actors::payout_runner_actor payouts;
};

/// The runtime's users, providers, ledger, ad server and payout runner.
[[nodiscard]] admin_peers admin_peers_of(const actors::runtime& runtime);

struct admin_api_options {
  /// The admin token. Empty: every admin request is answered 503 saying how to set one.
  std::string admin_token;
  /// Longest wait for each answer from an actor; then the request is answered 503.
  /// Default: 10 s.
  std::chrono::milliseconds request_timeout{10'000};
  /// Wrong admin tokens each remote address may send: `burst` at once, then `requests_per_minute`.
  /// Beyond it every admin request from that address, right token or not, is answered 429 with
  /// Retry-After, so the token cannot be guessed at network speed. An IPv6 address counts by its
  /// /64 (one host's whole range), an IPv4-mapped one as its IPv4 address. Each wrong token is
  /// logged with the address (never the token). Behind a proxy every client shares the proxy's address,
  /// so one client's wrong tokens hold the others back too. Default: 10 at once, then 10 a minute
  /// (one every 6 s); 10,000 addresses.
  rate_limiter_options failed_auth{10, 10, 10'000};
  /// Rows of a listing when `limit` is not given. Default: 100.
  std::size_t list_limit_default = 100;
  /// Most rows of a listing (`limit` above it is a 400). Default: 1,000.
  std::size_t list_limit_max = 1'000;
  /// Largest initial credit of a user, micro-USD. Default: 100,000 USD (the user aggregate's
  /// largest deposit).
  std::int64_t credit_micros_max = 100'000'000'000;
  /// Longest provider name or user display name, bytes. Default: 200.
  std::size_t name_bytes_max = 200;
  /// Deepest nesting of a request body. Default: 8.
  std::size_t json_depth_max = 8;
  /// Most keywords or categories of a campaign accepted before the campaign's own rules look at
  /// them (they allow 50 and 20). Default: 100.
  std::size_t campaign_words_max = 100;
  /// What a provider's link reports now; absent (or nothing for a provider): the listing shows
  /// only what the log says.
  std::function<std::optional<provider_live_state>(const std::string& provider_id)> live_state;
  /// Source of `now` (for "suspended"), microseconds since the Unix epoch. Default: the system
  /// clock.
  std::function<std::int64_t()> clock_us;
};

class admin_api {
 public:
  /// `system` must outlive every request handled (their actors run in it).
  admin_api(caf::actor_system& system, admin_peers peers, std::shared_ptr<directory> directory,
            admin_api_options options);
  /// Stops (see stop()).
  ~admin_api();
  admin_api(const admin_api&) = delete;
  admin_api& operator=(const admin_api&) = delete;

  /// Answers one request under /admin/. Calls `reply` exactly once: before returning when no actor
  /// is involved, else later from an actor's thread.
  void handle(const http_request& request, std::function<void(http_response)> reply) const;

  /// Stops the actors of requests still being answered and waits until they are gone (their
  /// replies are not sent); requests handled later are dropped the same way. For a node
  /// stopping: call it while the server runs. Idempotent.
  void stop();

  class impl;

 private:
  std::shared_ptr<impl> impl_;  ///< shared with the request actors still running
};

}  // namespace gpustream::gateway
