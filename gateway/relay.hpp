#pragma once
/// The relay carries one answer from a provider's link to the client that asked for it. It holds
/// the live jobs of this node: the client's request (prompts never reach the log: the relay keeps
/// them in memory only while the job is live), its reply stream, the answer so far (for a failover
/// after the first token) and its ad. The scheduler decides who serves a job; the relay moves the
/// words and reports what happened to the scheduler, which persists it and bills it.
///
/// Threads: API handlers (Beast), link sessions (Beast), and actor continuations (CAF) all call
/// in; each live job has its own mutex, the table another. Include only in .cpp files (CAF).

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "actors/scheduler.hpp"
#include "gateway/http_server.hpp"
#include "gateway/link_frames.hpp"
#include "gateway/openai_api.hpp"

namespace gpustream::gateway {

class actor_bridge;

/// Where free-tier answers get their ad (the ad server actor in production). Callbacks may run
/// on any thread.
class ad_source {
 public:
  virtual ~ad_source() = default;
  /// Picks and reserves an ad for the job, or none.
  virtual void pick(std::string job_id, std::string user_id, std::string prompt_text,
                    std::function<void(std::optional<ad_info>)> done) = 0;
  /// The ad went out with the answer: records the impression and gives its charge, or none when
  /// it could not be recorded (then the ad must not be shown).
  virtual void served(std::string impression_id,
                      std::function<void(std::optional<domain::ad_charge>)> done) = 0;
  /// The reserved ad will not be shown.
  virtual void release(std::string impression_id, std::string reason) = 0;
  /// The impression served() recorded did not go out with a settled answer (the scheduler refused
  /// the result, the client left before it completed), or served() could not tell whether it
  /// recorded it: nobody pays for it, so it is taken back (voided if recorded, released if only
  /// reserved).
  virtual void unserved(std::string impression_id, std::string reason) = 0;
};

/// What the relay reports for metrics. Every member may be empty.
struct relay_observer {
  /// An answer's first token: the time since its request arrived, and since its (latest) offer to
  /// a provider went out (the provider's round trip: the link both ways, the agent, its backend).
  std::function<void(std::chrono::microseconds ttft, std::chrono::microseconds since_offer)> first_token;
  /// An answer's time to first token as its provider's agent measured and reported it (from
  /// receiving the offer to its backend's first token): the part of since_offer spent in the
  /// agent and its backend rather than on the link.
  std::function<void(std::chrono::microseconds)> provider_ttft;
  std::function<void(std::uint32_t tokens)> completion_tokens;
  std::function<void(domain::job_status)> job_ended;
};

struct relay_options {
  /// Most live jobs (waiting, streaming, finishing) on this node; one more gets a 429-style
  /// refusal before anything is recorded. Default: 100,000.
  std::size_t live_jobs_max = 100'000;
  /// Most bytes of a prompt an ad's auction reads (its prompt_bytes_max): an ad's pick is given
  /// no more. Default: 16 KiB, the auction's default.
  std::size_t ad_prompt_bytes_max = 16'384;
  /// How often a client's cancel is retried while the scheduler is still recording the job's
  /// queueing, and the wait between tries. Default: 100 tries, 5 ms apart.
  std::uint32_t cancel_retries_max = 100;
  std::chrono::milliseconds cancel_retry_wait{5};
  /// When a provider's link is lost while answers it finished wait for their ads, the most its
  /// offline notice waits for their results, which must reach the scheduler first. Default: 2 s.
  std::chrono::milliseconds offline_wait_max{2'000};
  /// Largest request JSON an offer may carry (the request with, after a failover, the answer so
  /// far); the node sets it from its link limits (link::offer_request_bytes_max). A failover whose
  /// continuation would be larger fails the job, through no provider's fault: no agent could take
  /// the frame. Default: that of the default link limits, 1 MiB less 4 KiB.
  std::size_t offer_request_bytes_max = link::offer_request_bytes_max(link::codec_limits{});
  /// An answer is cut off (finish_reason "length", its provider told to stop) once its pieces pass
  /// what its backend should produce (relay_job::answer_tokens_max) by this share of it, and by
  /// at least overrun_pieces_min: a backend that ignores max_tokens, or never stops, neither runs
  /// on unpaid (the bill stops at the budget) nor grows an answer without bound. The slack allows
  /// for pieces that are not whole tokens. Defaults: 25 %, 16 pieces.
  std::uint32_t overrun_percent = 25;
  std::uint32_t overrun_pieces_min = 16;
  /// An answer is cut off the same way once its attempt's bytes (thinking included) pass its
  /// piece limit times piece_bytes_average_max, or answer_bytes_max: a piece is a token or a few,
  /// and an agent sending huge pieces (up to 64 KiB each on the link) neither bills few tokens for
  /// much text nor fills the node's memory, whatever context window its model claims.
  /// Defaults: 128 bytes a piece on average, 4 MiB.
  std::uint32_t piece_bytes_average_max = 128;
  std::size_t answer_bytes_max = 4 * 1024 * 1024;
  /// An answer whose provider sent a piece and then nothing for this long, its link alive, is
  /// taken from it as failed (the provider's fault) and continues on another provider: an agent
  /// fails a silent backend itself sooner (after 120 s by default), so only a broken agent gets
  /// here. Checked every silence_check_interval. Defaults: 300 s, 1 s.
  std::chrono::milliseconds piece_silence_max{300'000};
  std::chrono::milliseconds silence_check_interval{1'000};
  relay_observer observer;
};

/// A provider as a link session announces it: what it serves, for /v1/models and context checks.
struct online_offers {
  std::string provider_id;
  std::vector<events::model_offer> models;
};

/// A job as the API hands it over: who asks, what, and where the answer goes.
struct relay_job {
  std::string job_id;
  std::string user_id;
  bool premium = false;
  std::int64_t contribution_score = 0;
  completion_request request;
  std::uint32_t prompt_tokens = 0;  ///< estimated; what the job is billed for its prompt
  /// The most completion tokens the job may produce: max_tokens, or what the context leaves.
  std::uint32_t completion_budget = 0;
  /// The most the backend should produce: the max_tokens it was sent, or else the model's context
  /// window (its own bound; the budget, from the node's estimate of the prompt, may be less than
  /// what the context really leaves). An answer past it (relay_options::overrun_percent) is cut
  /// off. 0: the budget.
  std::uint32_t answer_tokens_max = 0;
  std::shared_ptr<http_reply> reply;
};

class relay {
 public:
  relay(caf::actor_system& system, actor_bridge& bridge, actors::scheduler_actor scheduler,
        ad_source* ads, relay_options options = {});
  /// Stops (see stop()).
  ~relay();
  relay(const relay&) = delete;
  relay& operator=(const relay&) = delete;

  // -- From the API. --------------------------------------------------------------------------

  /// Submits the job to the scheduler and answers the client when it ends (streamed or whole).
  void submit(relay_job job);

  /// Models served by online providers, with context length (the largest among them: a request
  /// goes only to a provider whose window holds it) and price range.
  [[nodiscard]] std::vector<model_listing> models() const;
  /// The context length a request for `model` must fit (the largest online; the scheduler sends
  /// it to a provider whose own window holds it), or nothing when no online provider serves it.
  [[nodiscard]] std::optional<std::uint32_t> context_length(const std::string& model) const;
  /// Live jobs now.
  [[nodiscard]] std::size_t live_jobs() const;

  // -- From the provider links. ---------------------------------------------------------------

  void provider_online(online_offers offers);
  void provider_offline(const std::string& provider_id);
  /// The scheduler offered `job_id` to `provider_id`: the frame to send, or nothing when the job
  /// is no longer live here (its client left, or its answer finished or ended meanwhile); the
  /// scheduler is then asked to cancel it. Nothing either for an offer of an attempt older than
  /// the job's current one.
  [[nodiscard]] std::optional<link::offer> take_offer(const std::string& provider_id,
                                                      const actors::job_offer& offer);
  /// The scheduler took `job_id` away from `provider_id` (and cancels it there): that provider's
  /// later deltas, done or error for it are ignored until the job is offered to it again.
  void revoke(const std::string& provider_id, const std::string& job_id);
  void delta(const std::string& provider_id, link::delta d);
  void done(const std::string& provider_id, const link::done& d);
  void failed(const std::string& provider_id, const link::job_error& e);
  /// The link of `provider_id` is gone: its jobs go back to the scheduler (continuing elsewhere
  /// with the answer so far); then the scheduler is told the provider is offline.
  void link_lost(const std::string& provider_id);
  /// A newer link of `provider_id` took over from an older one (the agent reconnected): the jobs
  /// of the old link, which the agent dropped with it, go back to the scheduler as in link_lost;
  /// the provider stays online. Call before the new link's hello is processed.
  void link_replaced(const std::string& provider_id);

  /// For a node about to stop: takes no more jobs (503 server_shutting_down), waits up to
  /// `wait_max` for the live ones to end, then cuts short those still answering: the scheduler
  /// cancels each, billing the tokens its client got (none of a whole answer, which the client
  /// never sees; unlike a client that left, it did not choose to stop), and its client gets an
  /// error (in-band, with the usage billed, once its stream started). Waits up to
  /// `cancel_wait_max` more for those to be recorded. Returns how many answers it cut short.
  /// Call before stop(), while the bridge and the server run.
  std::size_t drain(std::chrono::milliseconds wait_max, std::chrono::milliseconds cancel_wait_max);

  /// Stops the relay's watcher and waits until it is gone (the scheduler's reports of jobs it
  /// ended are dropped from then on), then lets go of the live jobs and their replies, whose
  /// connections belong to the server: call it while the server runs. The bridge's actors, which
  /// run the relay's continuations, must be stopped first (actor_bridge::stop). Idempotent.
  void stop();

  class impl;

 private:
  std::shared_ptr<impl> impl_;
};

}  // namespace gpustream::gateway
