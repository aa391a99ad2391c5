#pragma once
/// Provider selection: the index of online providers and the pluggable policies that run over it.
///
/// The index is the scheduler's soft state. It is fed from two sources: the provider aggregate
/// (`listing_for`: offers, level, score, suspension; after every provider event) and the link's
/// heartbeats and the scheduler itself (load, health, jobs started and finished, speed samples).
/// None of it reaches the log except through the choices it makes, so it may be rebuilt at will.
///
/// Organisation (why a selection takes microseconds with 10,000 providers online): providers are
/// grouped by model, and within a model by level; each (model, level) group keeps only providers
/// that accept work right now (not suspended, not overloaded, a free slot), in ordered sets, one
/// per policy order, plus a vector for random draws. A selection looks at the front of at most
/// seven sets (one per level at or above the tier's minimum); each update re-ranks one provider
/// in the groups of the models it offers.
///
/// Policies, over the candidates (serve the model, level at least the quality tier's minimum,
/// accept work, not the excluded provider):
///   - qmesh (default): an idle candidate (no jobs, light load) if any, the healthiest first;
///     otherwise the highest weight: 60% queue availability + 30% health + 10% performance
///     history (the score, capped); ties broken by price, then by provider id.
///   - cheapest: lowest price (input + output, per million tokens), then most free slots.
///   - fastest: lowest estimated latency for `fastest_reference_tokens` from the offer's TTFT and
///     throughput EWMAs, then price.
///   - power_of_two: two distinct candidates drawn with the request's random draw; the one with
///     more free capacity (then health, then id) wins.
/// A preferred provider (sticky session) is chosen before any policy when it is a candidate and
/// its health is at least `sticky_health_min_percent`.

#include <array>
#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include "base/expected.hpp"
#include "domain/aggregate.hpp"
#include "domain/provider.hpp"
#include "domain/scoring.hpp"
#include "events/event.hpp"

namespace gpustream::domain {

enum class selection_policy : std::uint8_t { qmesh, cheapest, fastest, power_of_two };

/// "qmesh", "cheapest", "fastest", "p2c".
[[nodiscard]] std::string_view to_string(selection_policy policy) noexcept;
/// The policy of a configuration name (as printed by to_string), or nothing.
[[nodiscard]] std::optional<selection_policy> selection_policy_from(std::string_view name) noexcept;

/// One model a provider offers, as the index needs it.
struct listed_offer {
  std::string model_name;
  std::int64_t input_price_micros_per_mtok = 0;
  std::int64_t output_price_micros_per_mtok = 0;
  std::uint32_t max_concurrency = 0;
  /// The window the provider serves the model with, prompt and completion together; 0: unknown
  /// (no job's window is checked against it).
  std::uint32_t context_length_tokens = 0;
};

/// What the provider aggregate tells the index about one provider.
struct provider_listing {
  std::string provider_id;
  events::provider_level level = events::provider_level::bronze;
  std::int64_t score = 0;
  bool suspended = false;
  std::vector<listed_offer> offers;
  /// When its latest suspension ends (0: never suspended), so that whoever lists it can lift it.
  std::int64_t suspended_until_at_us = 0;
  /// The user who registered it (its GPU's owner).
  std::string owner_user_id{};
};

/// The listing of a provider's current state at `now_us` (suspended counts at that instant).
[[nodiscard]] provider_listing listing_for(const provider::state& state, std::int64_t now_us);

/// A heartbeat's numbers. Values above 100 are read as 100.
struct load_report {
  std::uint32_t load_percent = 0;     ///< how busy the provider's GPUs are
  std::uint32_t health_percent = 100; ///< the provider's overall health, 100 = perfect
  /// It is stopping and takes no new job until it links again (see online_provider::draining).
  bool draining = false;
};

struct selection_options {
  health_thresholds health;
  /// Lowest provider level that serves each quality tier, indexed by events::quality_tier; the
  /// same rule as pricing_options::tiers[].level_min, whose defaults these mirror (app/ should
  /// copy them from there). Default: low Unverified, standard Bronze, high Silver, ultra Gold.
  std::array<events::provider_level, 4> quality_level_min{
      events::provider_level::unverified, events::provider_level::bronze,
      events::provider_level::silver, events::provider_level::gold};
  /// Weights of the qmesh score when no candidate is idle, in percent. Default: 60, 30, 10.
  std::int64_t availability_weight_percent = 60;
  std::int64_t health_weight_percent = 30;
  std::int64_t performance_weight_percent = 10;
  /// Score at which performance history counts in full. Default: 10,000 (Master).
  std::int64_t performance_score_full = 10'000;
  /// Completion length the fastest policy estimates latency for. Default: 256 tokens.
  std::int64_t fastest_reference_tokens = 256;
  /// Assumed for an offer not measured yet. Defaults: 1 s to the first token, 20 tokens/s.
  std::int64_t unmeasured_ttft_us = 1'000'000;
  std::int64_t unmeasured_tokens_per_second = 20;
  /// A new speed sample moves an EWMA by 1/ewma_samples of the difference. Default: 8.
  std::int64_t ewma_samples = 8;
  /// Lowest health at which a sticky session keeps its provider. Default: 50.
  std::uint32_t sticky_health_min_percent = 50;
  /// Most providers listed at once. Default: 100,000.
  std::size_t providers_online_max = 100'000;
  /// Most offers in one listing. Default: 64 (as provider_options::models_advertised_max).
  std::size_t offers_per_provider_max = 64;
};

/// One offer of an online provider, with its measured speed.
struct online_offer;
struct online_provider;

/// Whether a candidate may take the job, given the candidate and its offer of the requested model:
/// the offer within what the job may cost (its price cap) and its window, the provider not one the
/// job's free user owns (see job_queue); empty: every candidate may.
using candidate_filter = std::function<bool(const online_provider&, const online_offer&)>;

struct selection_request {
  std::string_view model;
  events::quality_tier quality = events::quality_tier::low;
  selection_policy policy = selection_policy::qmesh;
  std::uint64_t random_draw = 0;           ///< power_of_two only: a uniformly random value
  std::string_view preferred_provider_id;  ///< sticky session; empty for none
  std::string_view excluded_provider_id;   ///< never chosen (a provider the job failed on)
  candidate_filter admits{};               ///< only candidates it accepts are chosen
};

/// One offer of an online provider, with its measured speed.
struct online_offer {
  std::string model_name;
  std::int64_t input_price_micros_per_mtok = 0;
  std::int64_t output_price_micros_per_mtok = 0;
  std::uint32_t max_concurrency = 0;
  std::uint32_t context_length_tokens = 0;  ///< as listed_offer's
  bool measured = false;                 ///< false until the first speed sample
  std::int64_t ttft_ewma_us = 0;
  std::int64_t tokens_per_second_ewma = 0;
};

/// One online provider as the index sees it.
struct online_provider {
  std::string provider_id;
  std::string owner_user_id;  ///< as provider_listing's
  events::provider_level level = events::provider_level::bronze;
  std::int64_t score = 0;
  bool suspended = false;
  /// Its link is gone and its offline notice not in yet: it takes no new job (see
  /// selection_index::mark_unreachable).
  bool unreachable = false;
  /// It declined an offer (its agent counts its slots full, or refuses work for a reason of its
  /// own): no new job until it has news, a slot of its freed, a heartbeat or a new link (see
  /// selection_index::mark_declined).
  bool declined = false;
  /// Its agent is stopping (its heartbeat says so): it lets its running jobs finish and declines
  /// every offer, so it takes no new job until a heartbeat says otherwise or it links again. Unlike
  /// `declined`, a freed slot does not end this.
  bool draining = false;
  std::uint32_t load_percent = 0;
  std::uint32_t health_percent = 100;
  std::uint32_t active_jobs = 0;
  std::uint32_t concurrency_max = 0;  ///< the largest max_concurrency among its offers
  std::vector<online_offer> offers;
};

// The rules the index applies, exposed so that tests and tools can apply them by hand.

/// Whether the provider takes a new job now: not suspended, reachable, not declining or
/// draining, not overloaded, a free slot.
[[nodiscard]] bool accepts_work(const online_provider& p, const selection_options& options) noexcept;
/// Idle for qmesh: no job running and a light load.
[[nodiscard]] bool is_idle(const online_provider& p, const selection_options& options) noexcept;
/// Free slots as basis points of all slots (10,000 = all free), rounded down.
[[nodiscard]] std::int64_t availability_bp(const online_provider& p) noexcept;
/// The qmesh weight of a busy provider, in basis points times percent (at most 1,000,000).
[[nodiscard]] std::int64_t qmesh_weight(const online_provider& p,
                                        const selection_options& options) noexcept;
/// The price an offer is compared by: input plus output price per million tokens.
[[nodiscard]] std::int64_t price_key(const online_offer& offer) noexcept;
/// Estimated time for the reference completion on this offer, in microseconds.
[[nodiscard]] std::int64_t estimated_us(const online_offer& offer,
                                        const selection_options& options) noexcept;

/// The online providers, organised for selection. Not thread-safe: owned by the scheduler.
class selection_index {
 public:
  explicit selection_index(selection_options options = {});
  selection_index(const selection_index&) = delete;
  selection_index& operator=(const selection_index&) = delete;

  /// Adds a provider that came online, or updates one already listed (its load, health, running
  /// jobs and the speed of models it still offers are kept). `same_link`: the listing comes over
  /// the link that listed it before (its agent offers other models), so what that link said
  /// (declining, draining) holds; otherwise a new link starts afresh.
  [[nodiscard]] expected<void, error> list(const provider_listing& listing, bool same_link = false);
  /// Removes a provider that went offline. False when it was not listed.
  bool unlist(std::string_view provider_id);
  /// The provider's link is gone ahead of its going offline (results of its finished jobs are
  /// still on their way): it takes no new job, and keeps its running jobs, measures and health
  /// until it is unlisted, or listed again by a new link. False when it is not listed.
  bool mark_unreachable(std::string_view provider_id);
  /// The provider declined an offer without trying it (the job's slot already freed, so that this
  /// comes after the job_finished of that job): it takes no new job until one of its jobs ends, its next heartbeat, or
  /// it is listed again, so that the jobs waiting are not offered to it one after another while
  /// it is full (or refusing). False when it is not listed.
  bool mark_declined(std::string_view provider_id);
  /// A heartbeat: it ends a provider's declining (see mark_declined) and says whether it drains.
  /// False when the provider is not listed.
  bool report_load(std::string_view provider_id, const load_report& report);
  /// The provider's level and score after a job was scored (its link lists them once, at its
  /// hello). False when it is not listed.
  bool rescore(std::string_view provider_id, events::provider_level level, std::int64_t score);
  /// The provider was suspended (it takes no new job; its running jobs go on), or its suspension
  /// ended. False when it is not listed.
  bool set_suspended(std::string_view provider_id, bool suspended);
  /// The scheduler assigned a job to the provider (takes a slot). False when not listed.
  bool job_started(std::string_view provider_id);
  /// A job of the provider ended (frees a slot, and ends its declining). False when not listed or
  /// no job was running.
  bool job_finished(std::string_view provider_id);
  /// A speed sample of a completed job on one model. False when the offer is not listed.
  bool record_speed(std::string_view provider_id, std::string_view model, std::int64_t ttft_us,
                    std::int64_t tokens_per_second);

  /// The provider the request's policy picks, or nothing when no candidate accepts work now.
  /// The view stays valid until the index next changes.
  [[nodiscard]] std::optional<std::string_view> select(const selection_request& request) const;
  /// Whether any listed, unsuspended provider serves the model at the tier, busy or not: when
  /// false a job for it would wait for nothing and must be rejected.
  [[nodiscard]] bool can_serve(std::string_view model, events::quality_tier quality,
                               std::string_view excluded_provider_id = {}) const;
  /// The same, counting only providers that `admits` accepts (a scan of the model's
  /// providers up to the first that fits; an empty filter counts as the plain can_serve).
  [[nodiscard]] bool can_serve(std::string_view model, events::quality_tier quality,
                               std::string_view excluded_provider_id, const candidate_filter& admits) const;
  /// The same, leaving out providers that will take no new work on this link: draining ones and
  /// those whose link is lost (a full or declining one may take work later).
  [[nodiscard]] bool may_take_work(std::string_view model, events::quality_tier quality,
                                   std::string_view excluded_provider_id, const candidate_filter& admits) const;

  [[nodiscard]] const online_provider* find(std::string_view provider_id) const;
  /// Ids of every listed provider, in id order.
  [[nodiscard]] std::vector<std::string_view> provider_ids() const;
  [[nodiscard]] std::size_t size() const noexcept { return providers_.size(); }
  [[nodiscard]] const selection_options& options() const noexcept { return options_; }

 private:
  struct entry;
  [[nodiscard]] bool any_fits(std::string_view model, events::quality_tier quality, std::string_view excluded_provider_id,
                              const candidate_filter& admits, bool taking_work_only) const;

  /// Orders candidates within one set; ties go to the smaller provider id.
  struct rank_key {
    std::int64_t primary = 0;
    std::int64_t secondary = 0;
    const entry* who = nullptr;
    bool operator<(const rank_key& other) const noexcept;
  };

  /// The candidates of one model at one level.
  struct level_group {
    std::set<rank_key> idle;    ///< qmesh, idle: (-health, price)
    std::set<rank_key> busy;    ///< qmesh, not idle: (-weight, price)
    std::set<rank_key> cheap;   ///< (price, -availability)
    std::set<rank_key> fast;    ///< (estimated_us, price)
    std::vector<entry*> members;        ///< for random draws; order is arbitrary
    /// Listed and not suspended, accepting work or not (can_serve's candidates).
    std::set<const entry*> unsuspended;
  };

  static constexpr std::size_t level_count = 7;

  struct model_bucket {
    std::array<level_group, level_count> levels;
    std::uint32_t listings = 0;  ///< providers offering the model, suspended ones included
  };
  using bucket_map = std::map<std::string, model_bucket, std::less<>>;

  struct offer_place {
    bucket_map::iterator bucket;
    std::size_t member_position = 0;  ///< index in its level_group's members when ranked
  };

  struct entry {
    online_provider provider;
    std::vector<offer_place> places;  ///< one per offer, same order
    bool ranked = false;              ///< in its groups' sets (accepts work)
    bool counted = false;             ///< in its groups' `unsuspended` sets
    std::size_t counted_level = 0;    ///< the level of those groups, when counted
  };

  /// Where one offer of a provider sits in its group's sets.
  struct offer_keys {
    bool idle = false;  ///< in `idle` rather than `busy`
    rank_key qmesh;
    rank_key cheap;
    rank_key fast;
  };

  template <class Change>
  void change(entry& e, Change&& apply);
  [[nodiscard]] offer_keys keys_of(const entry& e, std::size_t offer) const;
  void withdraw(entry& e);
  void admit(entry& e);
  /// Into (out of) the `unsuspended` sets of its offers' groups at its level (at counted_level).
  void count(entry& e);
  void uncount(entry& e);
  void rank(entry& e);
  void unrank(entry& e);
  void attach_offers(entry& e);
  void detach_offers(entry& e);
  [[nodiscard]] level_group& group_of(const entry& e, std::size_t offer) const;

  /// Whether `e` may take the request's job: not excluded, and accepted by the request's filter.
  [[nodiscard]] static bool fits(const entry& e, const selection_request& request);
  [[nodiscard]] const entry* best_in(const model_bucket& bucket, std::size_t level_min,
                                     std::set<rank_key> level_group::*set,
                                     const selection_request& request) const;
  [[nodiscard]] const entry* draw_two(const model_bucket& bucket, std::size_t level_min,
                                      const selection_request& request) const;
  [[nodiscard]] bool sticky_fits(const entry& e, const model_bucket& bucket,
                                 std::size_t level_min) const;

  selection_options options_;
  std::map<std::string, entry, std::less<>> providers_;
  bucket_map models_;
};

/// Conversation -> provider, so a conversation returns to the provider that holds its prompt
/// cache. Bounded; the least recently used conversation is forgotten first.
struct sticky_options {
  /// Most conversations remembered. Default: 100,000.
  std::size_t conversations_max = 100'000;
  /// A conversation unused this long is forgotten. Default: 30 min.
  std::int64_t idle_us_max = 1'800'000'000;
};

class sticky_sessions {
 public:
  explicit sticky_sessions(sticky_options options = {}) : options_(options) {}

  /// The provider the conversation last ran on, unless unknown or idle too long. The view stays
  /// valid until the next `remember`.
  [[nodiscard]] std::optional<std::string_view> provider_for(std::string_view conversation_id,
                                                             std::int64_t now_us) const;
  /// Records where the conversation ran at `now_us`; forgets the least recently used one when
  /// the table is full. An empty conversation id is ignored.
  void remember(std::string_view conversation_id, std::string_view provider_id,
                std::int64_t now_us);
  [[nodiscard]] std::size_t size() const noexcept { return by_conversation_.size(); }

 private:
  struct session {
    std::string provider_id;
    std::int64_t used_at_us = 0;
  };

  sticky_options options_;
  std::map<std::string, session, std::less<>> by_conversation_;
  std::set<std::pair<std::int64_t, std::string>> by_use_;  ///< (used_at_us, conversation_id)
};

}  // namespace gpustream::domain
