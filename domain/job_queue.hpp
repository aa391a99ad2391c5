#pragma once
/// The scheduler's queue of jobs waiting for a provider: bounded, ordered by priority and age
/// (priority.hpp), every job with a deadline. Pure: time and random draws are parameters.
///
/// How it never gets stuck: jobs are grouped by what they need (model, quality tier, price cap,
/// context window, and for a job with a cost cap the tokens it quotes). All jobs of a group have
/// the same candidates, so when the group's first job finds no provider, none of the group can,
/// and a pass moves on to the other groups instead of waiting behind it; when no provider of the
/// model and tier takes work at all, it skips their other groups too. A pass visits
/// the groups' first jobs in priority order and assigns until no group can be served (or
/// `assignments_per_pass_max` is reached). So after a pass that returns fewer assignments than
/// the limit, no queued job has a provider that accepts work, but for one whose answer broke off
/// (avoided_strictly): it waits for another provider that may take work later, and takes its own
/// only when there is none; and every job leaves the queue by
/// assignment, expiry at its deadline, cancellation, or rejection when nobody can serve it.
///
/// Iteration orders are those of std::map/std::set over (service time, arrival number) and
/// (model, quality): deterministic, so replaying the same calls gives the same assignments.

#include <cstdint>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <tuple>
#include <utility>
#include <vector>

#include "base/expected.hpp"
#include "domain/aggregate.hpp"
#include "domain/pricing.hpp"
#include "domain/selection.hpp"
#include "events/event.hpp"

namespace gpustream::domain {

struct queued_job {
  std::string job_id;
  std::string model;
  events::quality_tier quality = events::quality_tier::low;
  std::int32_t priority = 0;           ///< head start in ms (priority_for)
  std::int64_t queued_at_us = 0;       ///< when the job first entered the queue (age)
  std::int64_t deadline_at_us = 0;     ///< when it fails with deadline_exceeded if still queued
  std::string preferred_provider_id;   ///< sticky session; empty for none
  /// The provider the job last failed on: chosen again only when no other provider can take the
  /// job now, or (avoided_strictly) at all. The groups keep a strictly avoided provider apart, so
  /// a group's best job finding no candidate still means none for the group.
  std::string avoided_provider_id;
  /// The answer began on avoided_provider_id and broke off there: while another provider may take
  /// the job (busy or declining now; not draining or unreachable), the job waits for one rather
  /// than go back to that one.
  bool avoided_strictly = false;
  /// A job admitted before, coming back (reassigned, declined untried, stalled): it is not refused
  /// for a full queue, since it is counted among the scheduler's live jobs already; refusing it
  /// would fail an answer under way for the sake of jobs that arrived after it.
  bool returning = false;
  /// The most the job may cost, micro-USD (none: no cap): only a provider whose price quotes the job
  /// (quote_max_micros of its prompt and max_tokens at the queue's pricing) at most this takes
  /// it. A premium job's cap is the quote held against its user's balance (after a failover,
  /// what is left of it, with max_tokens what is left to produce), so that no provider that came
  /// online later at a higher price bills more than was held.
  std::optional<std::int64_t> cost_max_micros{};
  /// The highest price per million tokens, input and output alike, the job may go to: the
  /// client's x_gpustream.max_price_micros, or for a free job the most the platform pays when
  /// that is lower (see price_cap_is_platforms); none: any.
  std::optional<std::int64_t> price_max_micros_per_mtok{};
  /// The price cap is the most the platform pays for a free job, not the client's own.
  bool price_cap_is_platforms = false;
  /// The context window the job needs, prompt and completion together: only an offer that
  /// serves the model with at least this window (or an unknown one) takes it. 0: any.
  std::uint32_t context_tokens_min = 0;
  std::uint32_t prompt_tokens = 0;  ///< with a cap: what it quotes
  std::uint32_t max_tokens = 0;     ///< with a cap: what it quotes
  /// A free job's user: no provider this user owns takes it, since the platform's subsidy would
  /// pay the user's own GPU for the user's own work. Empty (a premium job, which its user pays
  /// for): any owner's.
  std::string owner_excluded{};

  bool operator==(const queued_job&) const = default;
};

struct assignment {
  queued_job job;
  std::string provider_id;
};

struct job_queue_options {
  /// Most jobs waiting at once; one more is refused with busy, but for a returning job (admitted
  /// before: the scheduler's jobs_live_max bounds those). Default: 10,000.
  std::size_t jobs_queued_max = 10'000;
  /// Most assignments one pop_assignable call makes, so a pass is short; call again when it
  /// returns this many. Default: 1,024.
  std::size_t assignments_per_pass_max = 1'024;
  /// Farthest deadline a job may ask for, from the time it is pushed. Default: 10 min.
  std::int64_t deadline_us_max = 600'000'000;
  /// Largest priority (head start) accepted. Default: 600,000 ms (10 min).
  std::int32_t priority_ms_max = 600'000;
  /// How a capped job's cost at a provider's price is quoted (queued_job::cost_max_micros).
  pricing_options pricing{};
};

/// How pop_assignable chooses providers.
struct assign_options {
  selection_policy policy = selection_policy::qmesh;
  /// Seeds the random draws of power_of_two: the n-th selection of a pass uses a value mixed from
  /// this and n. Ignored by the other policies.
  std::uint64_t random_seed = 0;
};

class job_queue {
 public:
  explicit job_queue(job_queue_options options = {});

  /// Queues a job. Refused: no_provider when no online provider can serve its model at its
  /// quality (it would wait for nothing), busy when the queue is full (a returning job excepted),
  /// invalid_argument for a malformed job (empty id or model, a deadline not after now or beyond
  /// deadline_us_max, a priority out of range, an arrival in the future), already_exists for a
  /// job id already queued.
  [[nodiscard]] expected<void, error> push(queued_job job, const selection_index& index,
                                           std::int64_t now_us);

  /// Assigns queued jobs to providers that accept work, best first, and takes them out of the
  /// queue. Each assignment is also recorded in `index` (job_started), so the pass respects
  /// concurrency slots; the scheduler calls index.job_finished when the job ends. Jobs whose
  /// deadline has passed are never assigned (expire() collects them).
  [[nodiscard]] std::vector<assignment> pop_assignable(selection_index& index,
                                                       const assign_options& how,
                                                       std::int64_t now_us);

  /// Takes out and returns every job whose deadline is at or before `now_us`, by deadline.
  [[nodiscard]] std::vector<queued_job> expire(std::int64_t now_us);

  /// Takes out and returns the jobs no online provider can serve any more (the last provider of
  /// their model or tier went away), in queue order: the scheduler fails them with no_provider.
  /// A job whose answer broke off (avoided_strictly) also goes when no provider may take work
  /// (selection_index::may_take_work: the others draining or unreachable, its own too).
  [[nodiscard]] std::vector<queued_job> take_unservable(const selection_index& index);

  /// Takes a job out (cancelled). False when it is not queued.
  bool remove(std::string_view job_id);

  [[nodiscard]] bool contains(std::string_view job_id) const;
  [[nodiscard]] std::size_t size() const noexcept { return jobs_.size(); }
  [[nodiscard]] bool empty() const noexcept { return jobs_.empty(); }
  /// The earliest deadline of a queued job (for the scheduler's timer), or 0 when empty.
  [[nodiscard]] std::int64_t next_deadline_at_us() const noexcept;
  /// Every queued job in the order passes consider them (service time, then arrival).
  [[nodiscard]] std::vector<queued_job> jobs_in_order() const;

 private:
  /// (service_at_us, arrival number): the queue's order; the arrival number breaks ties.
  using order_key = std::pair<std::int64_t, std::uint64_t>;
  /// (model, quality, cost_max_micros, price_max_micros_per_mtok, prompt_tokens, max_tokens,
  /// context_tokens_min, the provider avoided strictly, owner_excluded); -1 for a cap not set, the
  /// tokens 0 without a cost cap, and the provider empty unless avoided_strictly.
  using group_key = std::tuple<std::string, events::quality_tier, std::int64_t, std::int64_t, std::uint32_t,
                               std::uint32_t, std::uint32_t, std::string, std::string>;

  [[nodiscard]] static group_key group_of(const queued_job& job);
  /// The candidates a job's caps, window and owner_excluded admit; empty for a job without any.
  [[nodiscard]] candidate_filter admits(const queued_job& job) const;

  void erase(std::map<order_key, queued_job>::iterator it);

  job_queue_options options_;
  std::uint64_t arrivals_ = 0;
  std::map<order_key, queued_job> jobs_;
  std::map<std::string, order_key, std::less<>> by_id_;
  std::map<group_key, std::set<order_key>> groups_;
  std::set<std::pair<std::int64_t, order_key>> by_deadline_;  ///< (deadline_at_us, order)
};

}  // namespace gpustream::domain
