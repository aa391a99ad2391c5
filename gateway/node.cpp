#include "gateway/node.hpp"

#include <caf/actor_system.hpp>
#include <caf/event_based_actor.hpp>
#include <caf/send.hpp>
#include <spdlog/spdlog.h>

#include "actors/errors.hpp"
#include "base/text.hpp"
#include "actors/runtime.hpp"
#include "domain/job.hpp"
#include "domain/ledger.hpp"
#include "domain/provider.hpp"
#include "domain/user.hpp"
#include "gateway/actor_ad_source.hpp"
#include "gateway/actor_bridge.hpp"
#include "gateway/admin_api.hpp"
#include "gateway/cors.hpp"
#include "gateway/directory.hpp"
#include "gateway/link_codec.hpp"
#include "gateway/metrics.hpp"
#include "gateway/provider_api.hpp"
#include "gateway/secrets.hpp"
#include "gateway/url.hpp"
#include "storage/event_store.hpp"

namespace gpustream::gateway {
namespace {

/// Why a job live when the server stopped failed (node::impl::fail_jobs_left_live).
constexpr std::string_view stopped_while_live = "the server stopped while the job was live; nothing is billed";

/// Most requests in flight at once while node::start closes what a stop left open.
constexpr std::size_t left_open_in_flight_max = 256;

http_response api_error_response(const api_error& error) {
  return {error.status, "application/json", error_body(error), {}};
}

/// Counts a request's answer by endpoint and status as it goes out, and adds the headers every
/// answer to it carries (CORS).
class counted_reply final : public http_reply {
 public:
  counted_reply(std::shared_ptr<http_reply> inner, counter_family& requests, std::string endpoint, http_headers extra)
      : inner_(std::move(inner)), requests_(requests), endpoint_(std::move(endpoint)), extra_(std::move(extra)) {}
  void send(http_response response) override {
    count(response.status);
    response.headers.insert(response.headers.end(), extra_.begin(), extra_.end());
    inner_->send(std::move(response));
  }
  void start_stream(unsigned status, std::string content_type, http_headers headers) override {
    count(status);
    headers.insert(headers.end(), extra_.begin(), extra_.end());
    inner_->start_stream(status, std::move(content_type), std::move(headers));
  }
  void write(std::string data) override { inner_->write(std::move(data)); }
  void finish() override { inner_->finish(); }
  void on_close(std::function<void()> callback) override {
    // A client that leaves before its answer started is counted once, as 499 (nginx's "client
    // closed request"): a slow answer's clients giving up must show in the requests metric.
    inner_->on_close([counted = counted_, &requests = requests_, endpoint = endpoint_, callback = std::move(callback)] {
      if (!counted->exchange(true)) requests.with({endpoint, "499"}).increment();
      if (callback) callback();
    });
  }

 private:
  void count(unsigned status) {
    if (counted_->exchange(true)) return;
    requests_.with({endpoint_, std::to_string(status)}).increment();
  }
  std::shared_ptr<http_reply> inner_;
  counter_family& requests_;
  std::string endpoint_;
  http_headers extra_;
  /// Counted already (its answer began, or its client left): shared with the close callback,
  /// which may run on another thread and after this reply is gone.
  std::shared_ptr<std::atomic<bool>> counted_ = std::make_shared<std::atomic<bool>>(false);
};

}  // namespace

class node::impl {
 public:
  impl(caf::actor_system& system, const actors::runtime& runtime, std::shared_ptr<storage::event_store> store,
       std::shared_ptr<directory> who, node_options options)
      : system_(system), runtime_(runtime), store_(std::move(store)), directory_(std::move(who)),
        options_(std::move(options)),
        bridge_(system, options_.bridge_actors), limiter_(options_.rate) {
    cors_.allowed_origins = options_.cors_origins;
    register_metrics();
  }

  ~impl() {
    // First everything that calls into the server from actor threads (answers, link frames, admin
    // answers) and back into the parts below: once these are gone, nothing but the server's own
    // threads touches them. Then the server, whose threads still call in until then.
    refresh_stop_ = true;
    bridge_.stop();
    if (links_) links_->stop();
    if (relay_) relay_->stop();
    if (admin_) admin_->stop();
    serving_ = nullptr;
    server_.reset();  // no new requests, no link frames
  }

  std::size_t drain(std::chrono::milliseconds wait_max) {
    // The cancels of the answers cut short are appends: a few ms each, also under sync.
    constexpr std::chrono::milliseconds cancels_wait_max{5'000};
    draining_ = true;
    if (!relay_) return 0;
    const std::size_t cut = relay_->drain(wait_max, cancels_wait_max);
    if (const std::size_t left = relay_->live_jobs(); left > 0) {
      spdlog::error("{} answers were still live {} s after the others were cut short (their ends may not be "
                    "recorded): the next start fails a job whose end is not, and bills nothing for it",
                    left, std::chrono::duration_cast<std::chrono::seconds>(cancels_wait_max).count());
    }
    return cut;
  }

  expected<void, std::string> start() {
    close_what_a_stop_left_open();
    load_campaigns();
    // The relay and links are built first, the server last: requests only arrive once it runs.
    ads_ = std::make_unique<actor_ad_source>(bridge_, runtime_.ad_server, actor_ad_source_options{options_.ad_pick_wait_max});
    if (!options_.public_url.empty()) ads_->set_click_base(options_.public_url + std::string(click_path));
    relay_options relaying = options_.relay;
    relaying.offer_request_bytes_max = link::offer_request_bytes_max(options_.link.limits);
    relaying.observer.first_token = [this](std::chrono::microseconds ttft, std::chrono::microseconds since_offer) {
      ttft_->get().observe(static_cast<double>(ttft.count()) / 1e6);
      offer_to_first_token_->get().observe(static_cast<double>(since_offer.count()) / 1e6);
    };
    relaying.observer.provider_ttft = [this](std::chrono::microseconds ttft) {
      provider_ttft_->get().observe(static_cast<double>(ttft.count()) / 1e6);
    };
    relaying.observer.completion_tokens = [this](std::uint32_t tokens) { tokens_->get().increment(tokens); };
    relaying.observer.job_ended = [this](domain::job_status status) {
      jobs_ended_->with({domain::to_string(status)}).increment();
    };
    relay_ = std::make_unique<relay>(system_, bridge_, runtime_.scheduler, ads_.get(), std::move(relaying));
    links_ = std::make_unique<provider_links>(system_, bridge_, runtime_, *directory_, *relay_, options_.link);
    admin_api_options admin;
    admin.admin_token = std::exchange(options_.admin_token, {});  // the admin API keeps its digest only
    admin.live_state = [this](const std::string& provider_id) -> std::optional<provider_live_state> {
      const auto beat = links_ ? links_->last_heartbeat(provider_id) : std::nullopt;
      if (!beat) return std::nullopt;
      return provider_live_state{beat->active_jobs, beat->queued_jobs, beat->load_percent, beat->health_percent,
                                 beat->tokens_per_second_milli};
    };
    admin_ = std::make_unique<admin_api>(system_, admin_peers_of(runtime_), directory_, std::move(admin));
    provider_api_ = std::make_unique<provider_api>(directory_);
    auto http = options_.http;
    http.on_refusal = [this](const http_request* head, http_response& response) { refused(head, response); };
    // The click URL names the port, which port 0 picks at the bind: it is set before any request
    // arrives, so no ad goes out with a click URL missing its address.
    http.on_listening = [this](std::uint16_t port) {
      if (!options_.public_url.empty()) return;
      const bool ipv6 = options_.http.host.find(':') != std::string::npos;
      const std::string host = ipv6 ? "[" + options_.http.host + "]" : options_.http.host;
      ads_->set_click_base("http://" + host + ":" + std::to_string(port) + std::string(click_path));
    };
    auto server = http_server::start(
        std::move(http), [this](http_request r, std::shared_ptr<http_reply> reply) { route(std::move(r), std::move(reply)); },
        [this](const http_request& r) -> websocket_decision {
          if (r.path() != "/v1/providers/link") {
            return http_response{404, "application/json", error_body(make_api_error(404, "no WebSocket endpoint at this path")), {}};
          }
          return links_->upgrade(r);
        });
    if (!server) return unexpected{server.error()};
    server_ = std::move(server.value());
    serving_ = server_.get();
    refresh_gauges();
    return {};
  }

  std::uint16_t port() const noexcept { return server_ ? server_->port() : 0; }
  provider_link_counts link_counts() const noexcept { return links_ ? links_->counts() : provider_link_counts{}; }

 private:
  void register_metrics() {
    requests_ = &metrics_.add_counter("gpustream_http_requests_total", "HTTP requests answered, by endpoint and status",
                                      {"endpoint", "status"});
    tokens_ = &metrics_.add_counter("gpustream_completion_tokens_total", "Completion tokens relayed to clients");
    jobs_ended_ = &metrics_.add_counter("gpustream_jobs_ended_total", "Jobs ended on this node, by status", {"status"});
    ttft_ = &metrics_.add_histogram("gpustream_time_to_first_token_seconds",
                                    "From receiving a completion request to its first token", ttft_buckets_seconds);
    offer_to_first_token_ = &metrics_.add_histogram(
        "gpustream_offer_to_first_token_seconds",
        "From offering a job to a provider to its first token (the link both ways, the agent, its backend)",
        ttft_buckets_seconds);
    provider_ttft_ = &metrics_.add_histogram(
        "gpustream_provider_ttft_seconds",
        "Time to first token as the provider's agent reports it (from receiving the offer to its backend's first "
        "token), for answers that completed",
        ttft_buckets_seconds);
    queued_ = &metrics_.add_gauge("gpustream_queue_depth", "Jobs waiting for a provider (scheduler)");
    running_ = &metrics_.add_gauge("gpustream_jobs_running", "Jobs assigned or streaming (scheduler)");
    bills_retrying_ = &metrics_.add_gauge(
        "gpustream_job_bills_retrying",
        "Jobs' bills whose ledger group the store failed to take, retried with their holds kept (scheduler)");
    metrics_.add_gauge_callback("gpustream_providers_online", "Providers linked to this node and online (their hello recorded)",
                                [this] { return static_cast<double>(links_ ? links_->online() : 0); });
    metrics_.add_counter_callback("gpustream_link_heartbeats_forwarded_total",
                                  "Agents' heartbeats passed on to the scheduler",
                                  [this] { return static_cast<double>(link_counts().heartbeats_forwarded); });
    metrics_.add_counter_callback(
        "gpustream_link_heartbeats_skipped_total",
        "Agents' heartbeats kept but not passed on to the scheduler: nothing new, and sooner than half an interval",
        [this] { return static_cast<double>(link_counts().heartbeats_skipped); });
    metrics_.add_gauge_callback(
        "gpustream_job_bills_unsettled",
        "Jobs' bills the log holds without their ledger groups (settled at start; above 0 for long: refused)",
        [this] { return static_cast<double>(directory_->counts().unsettled_bills); });
    metrics_.add_gauge_callback(
        "gpustream_free_usage_unrecorded",
        "Free jobs' ends the log holds without their quota usage (recorded at start; above 0 for long: refused)",
        [this] { return static_cast<double>(directory_->counts().unrecorded_free_usage); });
    metrics_.add_gauge_callback("gpustream_live_jobs", "Requests in flight on this node",
                                [this] { return static_cast<double>(relay_ ? relay_->live_jobs() : 0); });
    metrics_.add_gauge_callback("gpustream_http_connections_open", "Open HTTP and WebSocket connections",
                                [this] {
                                  const http_server* server = serving_;
                                  return static_cast<double>(server ? server->connections_open() : 0);
                                });
    metrics_.add_counter_callback("gpustream_http_writes_total",
                                  "Writes that sent HTTP answers to clients (tokens that arrive together share one)",
                                  [this] {
                                    const http_server* server = serving_;
                                    return static_cast<double>(server ? server->writes() : 0);
                                  });
    // The event store's group commit: appends per group and fsyncs per group say what durability costs.
    metrics_.add_counter_callback("gpustream_store_groups_total", "Append groups the event store committed",
                                  [this] { return static_cast<double>(store_->stats().groups); });
    metrics_.add_counter_callback("gpustream_store_appends_total", "Appends committed in those groups",
                                  [this] { return static_cast<double>(store_->stats().grouped_appends); });
    metrics_.add_counter_callback("gpustream_store_events_written_total", "Events written to the event log",
                                  [this] { return static_cast<double>(store_->stats().written_events); });
    metrics_.add_counter_callback("gpustream_store_syncs_total", "Event log fsyncs (sync durability)",
                                  [this] { return static_cast<double>(store_->stats().syncs); });
  }

  // -- What a stop left open (node::start, before any request is served). ----------------------

  /// Closes what the log says is open but a stop ended: bills without their ledger groups, free
  /// usage not counted against its user's quota, jobs that were live, providers that were online,
  /// payouts half done. Each step goes through the actor that owns the aggregate, as at run time,
  /// so it is recorded and checked like any other.
  void close_what_a_stop_left_open() {
    settle_unsettled_bills();
    record_unrecorded_free_usage();
    fail_jobs_left_live();
    take_offline_providers_left_online();
    complete_payouts_half_done();
  }

  /// Payouts a stop cut between their ledger movement and their event (which `replay --verify`
  /// reports until then): the payout runner's first run completes them, and pays what is due. It
  /// runs here, before a request is served, so that a stop soon after this start leaves none (the
  /// runner then runs every hour; serve's does not run by itself at once). A run that takes
  /// longer than left_open_wait_max goes on meanwhile.
  void complete_payouts_half_done() {
    auto completed = std::make_shared<std::size_t>(0);
    const auto ran = bridge_.ask_all(1, 1, [this, completed](caf::event_based_actor* actor, std::size_t, auto done) {
      actor->request(runtime_.payout_runner, options_.left_open_wait_max, actors::run_atom::value)
          .then(
              [done, completed](const actors::payout_report& report) {
                for (const auto& payout : report.payouts) *completed += payout.reconciled ? 1 : 0;
                for (const auto& problem : report.problems) spdlog::error("payouts: {}", problem);
                done(true);
              },
              [done](caf::error& failure) {
                spdlog::error("payouts: the run completing those a stop left half done did not answer (it goes on "
                              "meanwhile): {}",
                              actors::describe(failure));
                done(false);
              });
    });
    if (ran == 1 && *completed > 0) {
      spdlog::info("completed {} payouts that the server stopped half done", *completed);
    }
  }

  /// Bills of jobs whose end the log holds without its ledger group (a stop between the two
  /// appends, or a group the ledger refused then): each goes to the ledger as recorded. The ledger
  /// applies a group at most once, so one settled meanwhile changes nothing. One not settled now
  /// goes to the scheduler, which retries it (holding what its premium user pays meanwhile) until
  /// the ledger takes or refuses it; one refused stays unsettled (counted in
  /// gpustream_job_bills_unsettled) for the next start, its reason logged.
  void settle_unsettled_bills() {
    auto bills = std::make_shared<const std::vector<unsettled_bill>>(
        directory_->unsettled_bills(std::numeric_limits<std::size_t>::max()));
    if (bills->empty()) return;
    spdlog::info("settling {} job bills that the log holds without their ledger groups", bills->size());
    const auto settled = bridge_.ask_all(bills->size(), left_open_in_flight_max, [this, bills](caf::event_based_actor* actor, std::size_t i, auto done) {
      actor->request(runtime_.ledger, options_.left_open_wait_max, domain::ledger::command{domain::from_bill((*bills)[i].bill)})
          .then([done](const actors::command_reply&) { done(true); },
                [this, done, bills, i](caf::error& failure) {
                  const auto& unsettled = (*bills)[i];
                  std::int64_t amount = 0;
                  for (const auto& t : unsettled.bill.transfers) amount += t.amount_micros;
                  const auto transfers = unsettled.bill.transfers.size();
                  spdlog::error("job {}'s bill ({} micro-USD in {} transfer{}) is still unsettled: {}",
                                unsettled.job_id, amount, transfers, transfers == 1 ? "" : "s",
                                actors::describe(failure));
                  // Not taken now (the ledger busy, its store failing, no answer in time): the
                  // scheduler tries it again, holding what its user pays until the ledger takes
                  // it, so that jobs admitted meanwhile cannot spend that money. A refusal is final.
                  const auto refused = actors::domain_error_of(failure);
                  if (!refused || refused->code == domain::errc::busy) {
                    caf::anon_send(runtime_.scheduler, actors::settle_atom::value, unsettled.job_id, unsettled.bill);
                  }
                  done(false);
                });
    });
    spdlog::info("settled {} of {} job bills", settled, bills->size());
  }

  /// Free tokens of jobs whose end the log holds without their usage on the user's stream (a stop
  /// between the two appends): each is recorded against the day the job ended. The user records a
  /// job's usage at most once, so one recorded meanwhile changes nothing.
  void record_unrecorded_free_usage() {
    auto usage = std::make_shared<const std::vector<unrecorded_usage>>(
        directory_->unrecorded_free_usage(std::numeric_limits<std::size_t>::max()));
    if (usage->empty()) return;
    const auto recorded = bridge_.ask_all(usage->size(), left_open_in_flight_max, [this, usage](caf::event_based_actor* actor, std::size_t i, auto done) {
      const auto& u = (*usage)[i];
      actor->request(runtime_.users, options_.left_open_wait_max, u.user_id,
                     domain::user::command{domain::record_free_usage{u.job_id, u.tokens, u.ended_at_us}})
          .then([done](const actors::command_reply&) { done(true); },
                [done, usage, i](caf::error& failure) {
                  const auto& u = (*usage)[i];
                  spdlog::error("job {}'s {} free tokens could not be counted against user {}'s quota: {}", u.job_id,
                                u.tokens, u.user_id, actors::describe(failure));
                  done(false);
                });
    });
    spdlog::info("counted {} of {} free jobs' tokens that the log holds without their usage", recorded,
                 usage->size());
  }

  /// Jobs the log holds as live (submitted, queued, assigned, streaming): their clients'
  /// connections and the scheduler's holds went with the process that stopped, and no one will
  /// end them. They fail as the platform's fault, billing nothing (the issue's rule for a failed job),
  /// and an ad impression recorded for one is taken back: no bill will pay for it.
  void fail_jobs_left_live() {
    auto live = std::make_shared<std::vector<gateway::job_entry>>();
    for (const auto status : {domain::job_status::submitted, domain::job_status::queued, domain::job_status::assigned,
                              domain::job_status::streaming}) {
      auto jobs = directory_->jobs(status, std::numeric_limits<std::size_t>::max());
      live->insert(live->end(), std::make_move_iterator(jobs.begin()), std::make_move_iterator(jobs.end()));
    }
    if (live->empty()) return;
    const auto failed = bridge_.ask_all(live->size(), left_open_in_flight_max, [this, live](caf::event_based_actor* actor, std::size_t i, auto done) {
      // Its impression first: a job failed before its impression is taken back would not be
      // found live again at the next start, should taking it back fail now.
      auto fail_job = [this, actor, done, live, i] {
        actor->request(runtime_.jobs, options_.left_open_wait_max, (*live)[i].job_id,
                       domain::job::command{domain::fail_job{events::failure_reason::internal, std::string(stopped_while_live)}})
            .then([done](const actors::command_reply&) { done(true); },
                  [done, live, i](caf::error& failure) {
                    spdlog::error("job {}, live when the server stopped, could not be failed: {}", (*live)[i].job_id,
                                  actors::describe(failure));
                    done(false);
                  });
      };
      const auto& job = (*live)[i];
      if (job.impression_id.empty()) return fail_job();
      actor->request(runtime_.ad_server, options_.left_open_wait_max, actors::unserved_atom::value, job.impression_id,
                     std::string(stopped_while_live))
          .then([fail_job](bool) { fail_job(); },
                [fail_job, done, live, i](caf::error& failure) {
                  const auto& job = (*live)[i];
                  // Clicked (its ad was seen) or past the campaign's memory: it stays recorded,
                  // with no bill to pay for it.
                  const auto refused = actors::domain_error_of(failure);
                  if (refused && (refused->code == domain::errc::invalid_state || refused->code == domain::errc::not_found)) {
                    spdlog::warn("ad impression {} of job {}, live when the server stopped, stays recorded: {}",
                                 job.impression_id, job.job_id, refused->message);
                    return fail_job();
                  }
                  spdlog::error("ad impression {} of job {}, live when the server stopped, could not be taken "
                                "back (the next start tries again): {}",
                                job.impression_id, job.job_id, actors::describe(failure));
                  done(false);
                });
    });
    spdlog::info("failed {} of {} jobs that were live when the server stopped", failed, live->size());
  }

  /// Providers the log holds as online: their links went with the process that stopped. Their
  /// agents reconnect on their own (with backoff), and each link records its provider online again.
  void take_offline_providers_left_online() {
    auto online = std::make_shared<std::vector<std::string>>();
    for (const auto& p : directory_->providers(std::numeric_limits<std::size_t>::max())) {
      if (p.online) online->push_back(p.provider_id);
    }
    if (online->empty()) return;
    const auto offline = bridge_.ask_all(online->size(), left_open_in_flight_max, [this, online](caf::event_based_actor* actor, std::size_t i, auto done) {
      actor->request(runtime_.providers, options_.left_open_wait_max, (*online)[i],
                     domain::provider::command{domain::provider::disconnect{events::disconnect_reason::connection_lost,
                                                                            "the server stopped"}})
          .then([done](const actors::command_reply&) { done(true); },
                [done, online, i](caf::error& failure) {
                  spdlog::error("provider {}, online when the server stopped, could not be taken offline: {}",
                                (*online)[i], actors::describe(failure));
                  done(false);
                });
    });
    spdlog::info("took {} of {} providers offline whose links ended when the server stopped", offline, online->size());
  }

  /// The scheduler's counts, once a second, for the queue gauges (a scrape must not wait on actors).
  void refresh_gauges() {
    if (refresh_stop_) return;
    bridge_.run_later(std::chrono::milliseconds(1000), [this](caf::event_based_actor* actor) {
      if (refresh_stop_) return;
      actor->request(runtime_.scheduler, caf::infinite, actors::count_atom::value)
          .then(
              [this](const actors::scheduler_counts& counts) {
                queued_->get().set(static_cast<double>(counts.queued));
                running_->get().set(static_cast<double>(counts.running));
                bills_retrying_->get().set(static_cast<double>(counts.settlements_retrying));
                refresh_gauges();
              },
              [this](caf::error&) { refresh_gauges(); });
    });
  }

  /// The ad server learns of every campaign before the first request is served, so free-tier
  /// answers right after a start carry ads as later ones do. A load that takes longer than
  /// left_open_wait_max goes on meanwhile.
  void load_campaigns() {
    std::vector<std::string> ids;
    for (const auto& c : directory_->campaigns(std::numeric_limits<std::size_t>::max())) ids.push_back(c.campaign_id);
    if (ids.empty()) return;
    bridge_.ask_all(1, 1, [this, ids = std::move(ids)](caf::event_based_actor* actor, std::size_t, auto done) {
      actor->request(runtime_.ad_server, options_.left_open_wait_max, actors::load_atom::value, ids)
          .then(
              [done](std::size_t loaded) {
                spdlog::info("ads: campaigns loaded={}", loaded);
                done(true);
              },
              [done](caf::error& failure) {
                spdlog::error("ads: campaigns not loaded before serving (a load still under way goes on): {}",
                              actors::describe(failure));
                done(false);
              });
    });
  }

  /// Browsers may call the client API (/v1/...) from the configured origins only.
  cors_answer cors_for(const http_request& request) const {
    cors_answer cors;
    const std::string_view path = request.path();
    if (path.starts_with("/v1/") && !request.header("origin").empty()) {
      cors = evaluate_cors(cors_, request.header("origin"), request.method,
                           request.header("access-control-request-method"),
                           request.header("access-control-request-headers"));
    } else if (path.starts_with("/v1/") && !cors_.allowed_origins.empty()) {
      // The answer would differ with an Origin: a shared cache must not hand this one to a
      // browser's request, nor a browser's to this client.
      cors.headers.emplace_back("Vary", "Origin");
    }
    return cors;
  }

  /// An answer the server made itself (see http_server_options::on_refusal): counted, and with
  /// CORS headers as the handler's answers, so that a browser page reads a 413 as a 413.
  void refused(const http_request* head, http_response& response) {
    const std::string endpoint = head ? endpoint_of(std::string(head->path())) : "other";
    requests_->with({endpoint, std::to_string(response.status)}).increment();
    if (!head) return;
    auto cors = cors_for(*head);
    response.headers.insert(response.headers.end(), cors.headers.begin(), cors.headers.end());
  }

  void route(http_request request, std::shared_ptr<http_reply> raw) {
    const std::string path(request.path());
    const std::string endpoint = endpoint_of(path);
    auto cors = cors_for(request);
    auto reply = std::make_shared<counted_reply>(std::move(raw), *requests_, endpoint, std::move(cors.headers));
    auto whole = [reply](http_response r) { reply->send(std::move(r)); };
    if (cors.preflight) return whole({204, "text/plain", "", {}});
    if (path == "/v1/chat/completions" || path == "/v1/completions") return completion(std::move(request), reply);
    if (path == "/healthz") {
      if (!request.reads()) return whole(method_not_allowed(request, "GET, HEAD"));
      const auto position = std::to_string(store_->last_position());
      if (draining_) {  // a load balancer sends new work elsewhere
        return whole({503, "application/json",
                      R"({"status":"draining","last_position":)" + position +
                          R"(,"problem":"the node is stopping: live answers finish, new ones are refused"})",
                      {}});
      }
      if (directory_->read_problem()) {  // its words (file names) go to the log, not to anyone who asks
        return whole({503, "application/json",
                      R"({"status":"degraded","last_position":)" + position +
                          R"(,"problem":"the directory cannot read the event log on; see the server's log"})",
                      {}});
      }
      return whole({200, "application/json", R"({"status":"ok","last_position":)" + position + "}", {}});
    }
    if (path == "/metrics") {
      if (!request.reads()) return whole(method_not_allowed(request, "GET, HEAD"));
      return whole({200, "text/plain; version=0.0.4", metrics_.scrape(), {}});
    }
    if (path == "/v1/models") return models(request, reply);
    // Percent-decoding may make bytes that are no UTF-8, which the 404 would echo into its JSON.
    if (path.starts_with("/v1/models/")) {
      return model(request, reply, utf8_repaired(percent_decode(path.substr(11))));
    }
    if (path == "/v1/providers/me") return provider_api_->handle(request, whole);
    if (path.starts_with("/admin/")) return admin_->handle(request, whole);
    if (path.starts_with(click_path)) {
      // A click is recorded: only a browser following the link counts, not a link checker's HEAD,
      // nor a browser fetching it ahead of a click that may never come.
      if (request.method != "GET") return whole(method_not_allowed(request, "GET"));
      if (prefetch(request)) {
        return whole(api_error_response(make_api_error(
            503, "an ad's click link is not prefetched: it records a click when followed")));
      }
      return click(path.substr(click_path.size()), reply);
    }
    whole(api_error_response(make_api_error(404, "no such endpoint: " + request.method + " " + path)));
  }

  /// A request a browser makes ahead of a navigation that may not follow (a link hovered, a page's
  /// speculation rules, rel=prefetch): `Sec-Purpose: prefetch`, or the older `Purpose: prefetch`.
  static bool prefetch(const http_request& request) {
    for (const char* name : {"sec-purpose", "purpose", "x-purpose", "x-moz"}) {
      if (request.header(name).find("prefetch") != std::string_view::npos) return true;
    }
    return false;
  }

  static std::string endpoint_of(const std::string& path) {
    for (const char* known : {"/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/providers/me", "/healthz",
                              "/metrics"}) {
      if (path == known) return known;
    }
    if (path.starts_with("/v1/models/")) return "/v1/models/{id}";
    if (path.starts_with("/admin/")) return "/admin";
    if (path.starts_with(click_path)) return "/a/c";
    return "other";
  }

  /// 405, with the Allow header RFC 9110 asks for.
  static http_response method_not_allowed(const http_request& request, std::string_view allowed) {
    auto response = api_error_response(make_api_error(
        405, std::string(request.path()) + " answers " + std::string(allowed) + " only, not " + request.method));
    response.headers.emplace_back("Allow", std::string(allowed));
    return response;
  }

  void models(const http_request& request, const std::shared_ptr<http_reply>& reply) {
    if (!request.reads()) return reply->send(method_not_allowed(request, "GET, HEAD"));
    if (!authenticate(request, *reply)) return;
    const auto listing = relay_->models();
    reply->send({200, "application/json", models_json(listing), {}});
  }

  void model(const http_request& request, const std::shared_ptr<http_reply>& reply, const std::string& id) {
    if (!request.reads()) return reply->send(method_not_allowed(request, "GET, HEAD"));
    if (!authenticate(request, *reply)) return;
    for (const auto& m : relay_->models()) {
      if (m.id == id) return reply->send({200, "application/json", model_json(m), {}});
    }
    reply->send(api_error_response(
        make_api_error(404, "The model '" + id + "' does not exist or no provider serves it now", "model", "model_not_found")));
  }

  /// The user of the request's API key, or an answer (401) already sent.
  std::optional<user_entry> authenticate(const http_request& request, http_reply& reply) {
    const auto key = bearer_token(request.header("authorization"));
    if (key.empty()) {
      reply.send(api_error_response(make_api_error(
          401, "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.", {}, "missing_api_key")));
      return std::nullopt;
    }
    auto user = directory_->user_by_api_key(key);
    if (!user) reply.send(api_error_response(make_api_error(401, "Incorrect API key provided.", {}, "invalid_api_key")));
    return user;
  }

  void completion(http_request request, const std::shared_ptr<http_reply>& reply) {
    if (request.method != "POST") return reply->send(method_not_allowed(request, "POST"));
    auto user = authenticate(request, *reply);
    if (!user) return;
    const auto rate = limiter_.check(user->user_id, rate_limiter::clock::now());
    if (!rate.allowed) {
      auto response = api_error_response(make_api_error(
          429, "Rate limit reached for this API key: " + std::to_string(options_.rate.requests_per_minute) +
                   " requests per minute. Retry after " + std::to_string(rate.retry_after_seconds) + " s.",
          {}, "rate_limit_exceeded"));
      response.headers.emplace_back("Retry-After", std::to_string(rate.retry_after_seconds));
      return reply->send(std::move(response));
    }
    const bool chat = request.path() == "/v1/chat/completions";
    auto parsed = chat ? parse_chat_request(request.body, options_.api) : parse_completion_request(request.body, options_.api);
    if (!parsed) return reply->send(api_error_response(parsed.error()));
    auto& body = parsed.value();
    const auto context = relay_->context_length(body.model);
    if (!context) {
      return reply->send(api_error_response(make_api_error(
          404, "The model '" + body.model + "' does not exist or no provider serves it now; GET /v1/models lists those served",
          "model", "model_not_found")));
    }
    if (auto fits = check_context(body, *context); !fits) return reply->send(api_error_response(fits.error()));
    // The provider link carries the request in one frame; a quarter of it stays free for the
    // answer so far, which a failover appends.
    const auto link_bytes_max = link::offer_request_bytes_max(options_.link.limits);
    if (const auto size = upstream_body(body).size(); size > link_bytes_max / 4 * 3) {
      return reply->send(api_error_response(make_api_error(
          413, "the request is " + std::to_string(size) + " bytes as sent to a provider; at most " +
                   std::to_string(link_bytes_max / 4 * 3) + " are accepted",
          body.kind == request_kind::chat ? "messages" : "prompt", "request_too_large")));
    }
    auto job_id = new_id("j_", 16);
    if (!job_id) return reply->send(api_error_response(make_api_error(500, "no job id: " + job_id.error().message)));
    relay_job job;
    job.job_id = std::move(job_id.value());
    job.user_id = user->user_id;
    job.premium = user->tier == events::user_tier::premium;
    job.contribution_score = directory_->contribution_score(user->user_id);
    job.prompt_tokens = estimate_prompt_tokens(body);
    const std::uint32_t left = *context > job.prompt_tokens ? *context - job.prompt_tokens : 1;
    if (!job.premium && !body.max_tokens && left > options_.free_max_tokens_default) {
      body.max_tokens = options_.free_max_tokens_default;
    }
    // Without the client's max_tokens the backend keeps its own limit: a budget from our estimate
    // of the prompt could exceed what its context really leaves (vLLM refuses such a request).
    // An answer past the budget is billed at the budget (the scheduler clamps it). A model whose
    // context leaves more than the API's own bound on max_tokens gets that bound.
    job.completion_budget = body.max_tokens.value_or(std::min(left, options_.api.max_tokens_max));
    job.answer_tokens_max = body.max_tokens.value_or(*context);
    job.request = std::move(body);
    job.reply = reply;
    relay_->submit(std::move(job));
  }

  void click(const std::string& impression_id, const std::shared_ptr<http_reply>& reply) {
    // Anyone may follow a click URL, and each campaign id asked about wakes its campaign's actor
    // (a store read, kept until idle): made-up ids are answered here. The directory follows the
    // log within milliseconds of a campaign's creation, long before an ad of it can be clicked;
    // while it cannot read on, the ad server decides.
    const auto campaign = directory_->campaign(actors::campaign_of_impression(impression_id));
    if (!campaign && !directory_->read_problem()) {
      reply->send(api_error_response(make_api_error(
          404, "no ad impression '" + utf8_repaired(impression_id) + "': it names no campaign")));
      return;
    }
    // Where the person goes when the ad server cannot say in time (or cannot record the click):
    // the campaign's page, the click uncounted; a click moves no money.
    std::string fallback_url = campaign ? campaign->url : std::string();
    bridge_.run([this, impression_id, reply, fallback_url = std::move(fallback_url)](caf::event_based_actor* actor) {
      actor->request(runtime_.ad_server, options_.click_answer_wait_max, actors::click_atom::value, impression_id)
          .then([reply, impression_id](const actors::click_redirect& redirect) {
                  if (!redirect.unrecorded.empty()) {  // the person still reaches the advertiser
                    spdlog::warn("ads: click on impression={} not recorded: {}", utf8_repaired(impression_id),
                                 redirect.unrecorded);
                  }
                  reply->send({302, "text/plain", "", {{"Location", redirect.url}}});
                },
                [reply, impression_id, fallback_url](caf::error& failure) {
                  const auto refusal = actors::domain_error_of(failure);
                  if (refusal && refusal->code != domain::errc::busy) {
                    const unsigned status = refusal->code == domain::errc::not_found ? 404 : 400;
                    return reply->send(api_error_response(make_api_error(
                        status, "no ad impression '" + utf8_repaired(impression_id) + "': " + refusal->message)));
                  }
                  // The ad server is busy, failed, or did not answer within click_answer_wait_max.
                  if (!fallback_url.empty()) {
                    spdlog::warn("ads: click on impression={} redirected without the ad server's answer; it may "
                                 "go uncounted: {}",
                                 utf8_repaired(impression_id), actors::describe(failure));
                    return reply->send({302, "text/plain", "", {{"Location", fallback_url}}});
                  }
                  // Its words stay here: the store's may name files.
                  spdlog::error("ads: click on impression={} not recorded: {}", utf8_repaired(impression_id),
                                actors::describe(failure));
                  auto busy = api_error_response(make_api_error(503, "the click could not be recorded now; retry shortly"));
                  busy.headers.emplace_back("Retry-After", "1");
                  reply->send(std::move(busy));
                });
    });
  }

  caf::actor_system& system_;
  const actors::runtime& runtime_;
  std::shared_ptr<storage::event_store> store_;
  std::shared_ptr<directory> directory_;
  node_options options_;
  actor_bridge bridge_;
  rate_limiter limiter_;
  cors_policy cors_;
  metrics_registry metrics_;
  counter_family* requests_ = nullptr;
  counter_family* tokens_ = nullptr;
  counter_family* jobs_ended_ = nullptr;
  histogram_family* ttft_ = nullptr;
  histogram_family* offer_to_first_token_ = nullptr;
  histogram_family* provider_ttft_ = nullptr;
  gauge_family* queued_ = nullptr;
  gauge_family* running_ = nullptr;
  gauge_family* bills_retrying_ = nullptr;
  std::atomic<bool> refresh_stop_{false};
  std::atomic<bool> draining_{false};  ///< drain() has begun: /healthz answers 503
  std::unique_ptr<actor_ad_source> ads_;
  std::unique_ptr<relay> relay_;
  std::unique_ptr<provider_links> links_;
  std::unique_ptr<admin_api> admin_;
  std::unique_ptr<provider_api> provider_api_;
  /// server_ for its own threads' scrapes, which may run while start() sets it and the
  /// destructor resets it: the unique_ptr itself is not read there. Declared before server_, it
  /// outlives it.
  std::atomic<const http_server*> serving_{nullptr};
  std::unique_ptr<http_server> server_;  ///< last: destroyed first
};

expected<std::unique_ptr<node>, std::string> node::start(caf::actor_system& system, const actors::runtime& runtime,
                                                         std::shared_ptr<storage::event_store> store,
                                                         node_options options) {
  auto who = directory::open(store);
  if (!who) return unexpected{"cannot read the directory from the event log: " + who.error().message};
  auto state = std::make_unique<impl>(system, runtime, std::move(store),
                                      std::shared_ptr<directory>(std::move(who.value())), std::move(options));
  if (auto started = state->start(); !started) return unexpected{started.error()};
  return std::unique_ptr<node>(new node(std::move(state)));
}

node::node(std::unique_ptr<impl> state) : impl_(std::move(state)) {}
node::~node() = default;
std::uint16_t node::port() const noexcept { return impl_->port(); }
provider_link_counts node::link_counts() const noexcept { return impl_->link_counts(); }
std::size_t node::drain(std::chrono::milliseconds wait_max) { return impl_->drain(wait_max); }

}  // namespace gpustream::gateway
