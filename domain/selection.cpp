#include "domain/selection.hpp"

#include <algorithm>
#include <set>
#include <tuple>
#include <utility>

namespace gpustream::domain {

namespace {

constexpr std::size_t level_index(events::provider_level level) noexcept {
  return static_cast<std::size_t>(level);
}

constexpr std::uint32_t percent(std::uint32_t value) noexcept { return std::min(value, 100u); }

/// Index into the level groups of the lowest level a tier accepts, or nothing for a tier this
/// build does not know (no provider serves it).
std::optional<std::size_t> level_min_for(events::quality_tier quality,
                                         const selection_options& options) noexcept {
  const auto tier = static_cast<std::size_t>(quality);
  if (tier >= options.quality_level_min.size()) return std::nullopt;
  return level_index(options.quality_level_min[tier]);
}

/// Folds one sample into an EWMA; the first sample is taken as it is.
std::int64_t fold(bool measured, std::int64_t average, std::int64_t sample, std::int64_t samples) {
  if (!measured) return sample;
  return average + (sample - average) / std::max<std::int64_t>(1, samples);
}

std::string listing_problem(const provider_listing& listing) {
  if (listing.provider_id.empty()) return "a listed provider needs an id";
  const std::string who = "provider " + listing.provider_id;
  std::set<std::string_view> names;
  for (const auto& offer : listing.offers) {
    if (offer.model_name.empty()) return who + " offers a model without a name";
    if (offer.max_concurrency == 0) {
      return who + " offers model " + offer.model_name + " with a max concurrency of 0";
    }
    if (offer.input_price_micros_per_mtok < 0 || offer.output_price_micros_per_mtok < 0) {
      return who + " offers model " + offer.model_name + " at a negative price";
    }
    if (!names.insert(offer.model_name).second) {
      return who + " offers model " + offer.model_name + " twice";
    }
  }
  return {};
}

}  // namespace

std::string_view to_string(selection_policy policy) noexcept {
  switch (policy) {
    case selection_policy::qmesh: return "qmesh";
    case selection_policy::cheapest: return "cheapest";
    case selection_policy::fastest: return "fastest";
    case selection_policy::power_of_two: return "p2c";
  }
  return "unknown";
}

std::optional<selection_policy> selection_policy_from(std::string_view name) noexcept {
  for (auto policy : {selection_policy::qmesh, selection_policy::cheapest,
                      selection_policy::fastest, selection_policy::power_of_two}) {
    if (to_string(policy) == name) return policy;
  }
  return std::nullopt;
}

provider_listing listing_for(const provider::state& state, std::int64_t now_us) {
  provider_listing listing{state.provider_id, state.level, state.score,
                           is_suspended(state, now_us), {}, state.suspended_until_at_us,
                           state.owner_user_id};
  for (const auto& offer : state.offers) {
    listing.offers.push_back({offer.model_name, offer.input_price_micros_per_mtok,
                              offer.output_price_micros_per_mtok, offer.max_concurrency,
                              offer.context_length_tokens});
  }
  return listing;
}

bool accepts_work(const online_provider& p, const selection_options& options) noexcept {
  return !p.suspended && !p.unreachable && !p.declined && !p.draining &&
         p.load_percent < options.health.overloaded_from_percent && p.active_jobs < p.concurrency_max;
}

bool is_idle(const online_provider& p, const selection_options& options) noexcept {
  return p.active_jobs == 0 && health_for_load(p.load_percent, options.health) == health_status::light;
}

std::int64_t availability_bp(const online_provider& p) noexcept {
  if (p.concurrency_max == 0) return 0;
  const std::int64_t free_slots = p.concurrency_max - std::min(p.active_jobs, p.concurrency_max);
  return free_slots * 10'000 / p.concurrency_max;
}

std::int64_t qmesh_weight(const online_provider& p, const selection_options& options) noexcept {
  const std::int64_t full = std::max<std::int64_t>(1, options.performance_score_full);
  const std::int64_t performance_bp = std::clamp<std::int64_t>(p.score, 0, full) * 10'000 / full;
  return options.availability_weight_percent * availability_bp(p) +
         options.health_weight_percent * static_cast<std::int64_t>(p.health_percent) * 100 +
         options.performance_weight_percent * performance_bp;
}

std::int64_t price_key(const online_offer& offer) noexcept {
  return offer.input_price_micros_per_mtok + offer.output_price_micros_per_mtok;
}

std::int64_t estimated_us(const online_offer& offer, const selection_options& options) noexcept {
  const std::int64_t ttft_us = offer.measured ? offer.ttft_ewma_us : options.unmeasured_ttft_us;
  const std::int64_t rate = std::max<std::int64_t>(
      1, offer.measured ? offer.tokens_per_second_ewma : options.unmeasured_tokens_per_second);
  return ttft_us + options.fastest_reference_tokens * 1'000'000 / rate;
}

// ---------------------------------------------------------------------------------------------
// selection_index: keeping the groups in step with the providers.

bool selection_index::rank_key::operator<(const rank_key& other) const noexcept {
  if (primary != other.primary) return primary < other.primary;
  if (secondary != other.secondary) return secondary < other.secondary;
  return who->provider.provider_id < other.who->provider.provider_id;
}

selection_index::selection_index(selection_options options) : options_(std::move(options)) {}

selection_index::level_group& selection_index::group_of(const entry& e, std::size_t offer) const {
  return e.places[offer].bucket->second.levels[level_index(e.provider.level)];
}

selection_index::offer_keys selection_index::keys_of(const entry& e, std::size_t offer) const {
  const auto& p = e.provider;
  const std::int64_t price = price_key(p.offers[offer]);
  offer_keys keys;
  keys.idle = is_idle(p, options_);
  keys.qmesh = keys.idle ? rank_key{-static_cast<std::int64_t>(p.health_percent), price, &e}
                         : rank_key{-qmesh_weight(p, options_), price, &e};
  keys.cheap = {price, -availability_bp(p), &e};
  keys.fast = {estimated_us(p.offers[offer], options_), price, &e};
  return keys;
}

void selection_index::rank(entry& e) {
  for (std::size_t i = 0; i < e.provider.offers.size(); ++i) {
    auto& group = group_of(e, i);
    const auto keys = keys_of(e, i);
    (keys.idle ? group.idle : group.busy).insert(keys.qmesh);
    group.cheap.insert(keys.cheap);
    group.fast.insert(keys.fast);
    e.places[i].member_position = group.members.size();
    group.members.push_back(&e);
  }
  e.ranked = true;
}

void selection_index::unrank(entry& e) {
  for (std::size_t i = 0; i < e.provider.offers.size(); ++i) {
    auto& group = group_of(e, i);
    // The same keys as rank() made: every change goes through change(), which unranks before
    // it touches a field the keys depend on.
    const auto keys = keys_of(e, i);
    const auto erased_qmesh = (keys.idle ? group.idle : group.busy).erase(keys.qmesh);
    const auto erased_cheap = group.cheap.erase(keys.cheap);
    const auto erased_fast = group.fast.erase(keys.fast);
    GPUSTREAM_ENSURE(erased_qmesh == 1);
    GPUSTREAM_ENSURE(erased_cheap == 1);
    GPUSTREAM_ENSURE(erased_fast == 1);
    // Swap-remove from the draw vector, telling the moved provider its new position.
    const std::size_t position = e.places[i].member_position;
    GPUSTREAM_ENSURE(position < group.members.size());
    GPUSTREAM_ENSURE(group.members[position] == &e);
    entry* moved = group.members.back();
    group.members[position] = moved;
    group.members.pop_back();
    if (moved != &e) {
      for (auto& place : moved->places) {
        if (place.bucket == e.places[i].bucket) place.member_position = position;
      }
    }
  }
  e.ranked = false;
}

void selection_index::withdraw(entry& e) {
  if (e.ranked) unrank(e);
  if (e.counted) uncount(e);
}

void selection_index::admit(entry& e) {
  if (e.provider.suspended) return;
  if (!e.counted) count(e);
  if (accepts_work(e.provider, options_)) rank(e);
}

void selection_index::count(entry& e) {
  e.counted_level = level_index(e.provider.level);
  for (auto& place : e.places) place.bucket->second.levels[e.counted_level].unsuspended.insert(&e);
  e.counted = true;
}

void selection_index::uncount(entry& e) {
  for (auto& place : e.places) place.bucket->second.levels[e.counted_level].unsuspended.erase(&e);
  e.counted = false;
}

void selection_index::attach_offers(entry& e) {
  GPUSTREAM_ENSURE(e.places.empty());
  for (const auto& offer : e.provider.offers) {
    auto bucket = models_.try_emplace(offer.model_name).first;
    ++bucket->second.listings;
    e.places.push_back({bucket, 0});
  }
}

void selection_index::detach_offers(entry& e) {
  GPUSTREAM_ENSURE(!e.ranked && !e.counted);
  for (auto& place : e.places) {
    if (--place.bucket->second.listings == 0) models_.erase(place.bucket);
  }
  e.places.clear();
}

template <class Change>
void selection_index::change(entry& e, Change&& apply) {
  if (e.ranked) unrank(e);
  apply(e.provider);
  // Most changes (a heartbeat, a job starting or ending) leave the provider counted where it was.
  if (e.counted && (e.provider.suspended || level_index(e.provider.level) != e.counted_level)) uncount(e);
  admit(e);
}

expected<void, error> selection_index::list(const provider_listing& listing, bool same_link) {
  if (listing.offers.size() > options_.offers_per_provider_max) {
    return refuse(errc::limit_exceeded,
                  "provider " + listing.provider_id + " lists " +
                      std::to_string(listing.offers.size()) + " models; at most " +
                      std::to_string(options_.offers_per_provider_max) + " are allowed");
  }
  if (auto problem = listing_problem(listing); !problem.empty()) {
    return refuse(errc::invalid_argument, std::move(problem));
  }
  auto it = providers_.find(listing.provider_id);
  if (it == providers_.end()) {
    if (providers_.size() >= options_.providers_online_max) {
      return refuse(errc::limit_exceeded,
                    "provider " + listing.provider_id + " cannot come online: " +
                        std::to_string(providers_.size()) + " providers are online, the most " +
                        "this scheduler holds is " + std::to_string(options_.providers_online_max));
    }
    it = providers_.try_emplace(listing.provider_id).first;
    it->second.provider.provider_id = listing.provider_id;
  }
  entry& e = it->second;
  withdraw(e);
  detach_offers(e);
  auto& p = e.provider;
  std::vector<online_offer> offers;
  p.concurrency_max = 0;
  for (const auto& listed : listing.offers) {
    online_offer offer{listed.model_name, listed.input_price_micros_per_mtok,
                       listed.output_price_micros_per_mtok, listed.max_concurrency,
                       listed.context_length_tokens};
    // A model offered again keeps what was measured about it.
    for (const auto& old : p.offers) {
      if (old.model_name != listed.model_name) continue;
      offer.measured = old.measured;
      offer.ttft_ewma_us = old.ttft_ewma_us;
      offer.tokens_per_second_ewma = old.tokens_per_second_ewma;
    }
    p.concurrency_max = std::max(p.concurrency_max, listed.max_concurrency);
    offers.push_back(std::move(offer));
  }
  p.offers = std::move(offers);
  p.level = listing.level;
  p.score = listing.score;
  p.suspended = listing.suspended;
  p.owner_user_id = listing.owner_user_id;
  if (!same_link) {
    p.unreachable = false;  // listed by a link
    p.declined = false;     // a new link's hello says what it has
    p.draining = false;
  }
  attach_offers(e);
  admit(e);
  return {};
}

bool selection_index::unlist(std::string_view provider_id) {
  auto it = providers_.find(provider_id);
  if (it == providers_.end()) return false;
  withdraw(it->second);
  detach_offers(it->second);
  providers_.erase(it);
  return true;
}

bool selection_index::mark_unreachable(std::string_view provider_id) {
  auto it = providers_.find(provider_id);
  if (it == providers_.end()) return false;
  change(it->second, [](online_provider& p) { p.unreachable = true; });
  return true;
}

bool selection_index::mark_declined(std::string_view provider_id) {
  auto it = providers_.find(provider_id);
  if (it == providers_.end()) return false;
  change(it->second, [](online_provider& p) { p.declined = true; });
  return true;
}

bool selection_index::report_load(std::string_view provider_id, const load_report& report) {
  auto it = providers_.find(provider_id);
  if (it == providers_.end()) return false;
  change(it->second, [&](online_provider& p) {
    p.declined = false;
    p.draining = report.draining;
    p.load_percent = percent(report.load_percent);
    p.health_percent = percent(report.health_percent);
  });
  return true;
}

bool selection_index::rescore(std::string_view provider_id, events::provider_level level, std::int64_t score) {
  auto it = providers_.find(provider_id);
  if (it == providers_.end()) return false;
  change(it->second, [&](online_provider& p) {
    p.level = level;
    p.score = score;
  });
  return true;
}

bool selection_index::set_suspended(std::string_view provider_id, bool suspended) {
  auto it = providers_.find(provider_id);
  if (it == providers_.end()) return false;
  change(it->second, [&](online_provider& p) { p.suspended = suspended; });
  return true;
}

bool selection_index::job_started(std::string_view provider_id) {
  auto it = providers_.find(provider_id);
  if (it == providers_.end()) return false;
  change(it->second, [](online_provider& p) { ++p.active_jobs; });
  return true;
}

bool selection_index::job_finished(std::string_view provider_id) {
  auto it = providers_.find(provider_id);
  if (it == providers_.end() || it->second.provider.active_jobs == 0) return false;
  change(it->second, [](online_provider& p) {
    --p.active_jobs;
    p.declined = false;
  });
  return true;
}

bool selection_index::record_speed(std::string_view provider_id, std::string_view model,
                                   std::int64_t ttft_us, std::int64_t tokens_per_second) {
  auto it = providers_.find(provider_id);
  if (it == providers_.end()) return false;
  auto& offers = it->second.provider.offers;
  const auto offer = std::find_if(offers.begin(), offers.end(),
                                  [&](const online_offer& o) { return o.model_name == model; });
  if (offer == offers.end()) return false;
  const auto index = static_cast<std::size_t>(offer - offers.begin());
  change(it->second, [&](online_provider& p) {
    auto& o = p.offers[index];
    o.ttft_ewma_us = fold(o.measured, o.ttft_ewma_us, std::max<std::int64_t>(0, ttft_us),
                          options_.ewma_samples);
    o.tokens_per_second_ewma = fold(o.measured, o.tokens_per_second_ewma,
                                    std::max<std::int64_t>(0, tokens_per_second),
                                    options_.ewma_samples);
    o.measured = true;
  });
  return true;
}

// ---------------------------------------------------------------------------------------------
// selection_index: choosing.

bool selection_index::fits(const entry& e, const selection_request& request) {
  if (e.provider.provider_id == request.excluded_provider_id) return false;
  if (!request.admits) return true;
  const auto offer = std::find_if(e.provider.offers.begin(), e.provider.offers.end(),
                                  [&](const online_offer& o) { return o.model_name == request.model; });
  return offer != e.provider.offers.end() && request.admits(e.provider, *offer);
}

const selection_index::entry* selection_index::best_in(const model_bucket& bucket,
                                                       std::size_t level_min,
                                                       std::set<rank_key> level_group::*set,
                                                       const selection_request& request) const {
  const rank_key* best = nullptr;
  for (std::size_t level = level_min; level < level_count; ++level) {
    // The front of each level's set, stepping over the excluded provider (at most once) and,
    // for a job with a filter (a price cap, a window, an owner left out), over those it refuses.
    for (const auto& key : bucket.levels[level].*set) {
      if (!fits(*key.who, request)) continue;
      if (best == nullptr || key < *best) best = &key;
      break;
    }
  }
  return best == nullptr ? nullptr : best->who;
}

const selection_index::entry* selection_index::draw_two(const model_bucket& bucket,
                                                        std::size_t level_min,
                                                        const selection_request& request) const {
  std::size_t count = 0;
  for (std::size_t level = level_min; level < level_count; ++level) {
    count += bucket.levels[level].members.size();
  }
  const auto at = [&](std::size_t index) -> const entry* {
    for (std::size_t level = level_min; level < level_count; ++level) {
      const auto& members = bucket.levels[level].members;
      if (index < members.size()) return members[index];
      index -= members.size();
    }
    GPUSTREAM_ENSURE(false);
    return nullptr;
  };
  const auto excluded = [&](const entry* e) { return !fits(*e, request); };
  if (count == 0) return nullptr;
  if (count == 1) return excluded(at(0)) ? nullptr : at(0);
  // Two distinct positions from one draw: the second skips over the first.
  const std::size_t first = request.random_draw % count;
  std::size_t second = (request.random_draw / count) % (count - 1);
  if (second >= first) ++second;
  const entry* a = at(first);
  const entry* b = at(second);
  // Neither drawn may take the job (its filter refuses both): the cheapest that may, if any.
  if (excluded(a) && excluded(b)) {
    return request.admits ? best_in(bucket, level_min, &level_group::cheap, request) : nullptr;
  }
  if (excluded(a)) return b;
  if (excluded(b)) return a;
  const auto order = [](const entry* e) {
    return std::make_tuple(-availability_bp(e->provider),
                           -static_cast<std::int64_t>(e->provider.health_percent));
  };
  if (order(a) != order(b)) return order(a) < order(b) ? a : b;
  return a->provider.provider_id < b->provider.provider_id ? a : b;
}

bool selection_index::sticky_fits(const entry& e, const model_bucket& bucket,
                                  std::size_t level_min) const {
  const auto& p = e.provider;
  if (!accepts_work(p, options_) || level_index(p.level) < level_min) return false;
  if (p.health_percent < options_.sticky_health_min_percent) return false;
  return std::any_of(e.places.begin(), e.places.end(),
                     [&](const offer_place& place) { return &place.bucket->second == &bucket; });
}

std::optional<std::string_view> selection_index::select(const selection_request& request) const {
  const auto bucket = models_.find(request.model);
  const auto level_min = level_min_for(request.quality, options_);
  if (bucket == models_.end() || !level_min) return std::nullopt;
  if (!request.preferred_provider_id.empty() &&
      request.preferred_provider_id != request.excluded_provider_id) {
    const auto preferred = providers_.find(request.preferred_provider_id);
    if (preferred != providers_.end() && sticky_fits(preferred->second, bucket->second, *level_min) &&
        fits(preferred->second, request)) {
      return std::string_view(preferred->first);
    }
  }
  const entry* chosen = nullptr;
  const auto& b = bucket->second;
  switch (request.policy) {
    case selection_policy::qmesh:
      chosen = best_in(b, *level_min, &level_group::idle, request);
      if (chosen == nullptr) {
        chosen = best_in(b, *level_min, &level_group::busy, request);
      }
      break;
    case selection_policy::cheapest:
      chosen = best_in(b, *level_min, &level_group::cheap, request);
      break;
    case selection_policy::fastest:
      chosen = best_in(b, *level_min, &level_group::fast, request);
      break;
    case selection_policy::power_of_two:
      chosen = draw_two(b, *level_min, request);
      break;
  }
  if (chosen == nullptr) return std::nullopt;
  return std::string_view(chosen->provider.provider_id);
}

bool selection_index::can_serve(std::string_view model, events::quality_tier quality,
                                std::string_view excluded_provider_id) const {
  const auto bucket = models_.find(model);
  const auto level_min = level_min_for(quality, options_);
  if (bucket == models_.end() || !level_min) return false;
  std::size_t candidates = 0;
  for (std::size_t level = *level_min; level < level_count; ++level) {
    candidates += bucket->second.levels[level].unsuspended.size();
  }
  if (const auto* excluded = excluded_provider_id.empty() ? nullptr : find(excluded_provider_id)) {
    const bool counted = !excluded->suspended && static_cast<std::size_t>(excluded->level) >= *level_min &&
                         std::any_of(excluded->offers.begin(), excluded->offers.end(),
                                     [&](const online_offer& o) { return o.model_name == model; });
    if (counted) candidates -= 1;
  }
  return candidates > 0;
}

bool selection_index::can_serve(std::string_view model, events::quality_tier quality,
                                std::string_view excluded_provider_id, const candidate_filter& admits) const {
  if (!admits) return can_serve(model, quality, excluded_provider_id);
  return any_fits(model, quality, excluded_provider_id, admits, false);
}

bool selection_index::may_take_work(std::string_view model, events::quality_tier quality,
                                    std::string_view excluded_provider_id, const candidate_filter& admits) const {
  return any_fits(model, quality, excluded_provider_id, admits, true);
}

bool selection_index::any_fits(std::string_view model, events::quality_tier quality,
                               std::string_view excluded_provider_id, const candidate_filter& admits,
                               bool taking_work_only) const {
  const auto level_min = level_min_for(quality, options_);
  const auto bucket = models_.find(model);
  if (!level_min || bucket == models_.end()) return false;
  const selection_request request{.model = model,
                                  .quality = quality,
                                  .policy = selection_policy::qmesh,
                                  .random_draw = 0,
                                  .preferred_provider_id = {},
                                  .excluded_provider_id = excluded_provider_id,
                                  .admits = admits};
  // The model's providers only, stopping at the first that fits (most do).
  for (std::size_t level = *level_min; level < level_count; ++level) {
    const auto& candidates = bucket->second.levels[level].unsuspended;
    if (std::any_of(candidates.begin(), candidates.end(), [&](const entry* e) {
          if (taking_work_only && (e->provider.draining || e->provider.unreachable)) return false;
          return fits(*e, request);
        })) {
      return true;
    }
  }
  return false;
}

const online_provider* selection_index::find(std::string_view provider_id) const {
  const auto it = providers_.find(provider_id);
  return it == providers_.end() ? nullptr : &it->second.provider;
}

std::vector<std::string_view> selection_index::provider_ids() const {
  std::vector<std::string_view> ids;
  ids.reserve(providers_.size());
  for (const auto& [id, e] : providers_) ids.emplace_back(id);
  return ids;
}

// ---------------------------------------------------------------------------------------------
// sticky_sessions

std::optional<std::string_view> sticky_sessions::provider_for(std::string_view conversation_id,
                                                              std::int64_t now_us) const {
  const auto it = by_conversation_.find(conversation_id);
  if (it == by_conversation_.end()) return std::nullopt;
  if (now_us - it->second.used_at_us >= options_.idle_us_max) return std::nullopt;
  return std::string_view(it->second.provider_id);
}

void sticky_sessions::remember(std::string_view conversation_id, std::string_view provider_id,
                               std::int64_t now_us) {
  if (conversation_id.empty()) return;
  if (auto it = by_conversation_.find(conversation_id); it != by_conversation_.end()) {
    by_use_.erase({it->second.used_at_us, it->first});
    it->second = {std::string(provider_id), now_us};
    by_use_.emplace(now_us, it->first);
    return;
  }
  // Forget conversations idle too long, then the least recently used while the table is full.
  while (!by_use_.empty() && (now_us - by_use_.begin()->first >= options_.idle_us_max ||
                              by_conversation_.size() >= options_.conversations_max)) {
    by_conversation_.erase(by_use_.begin()->second);
    by_use_.erase(by_use_.begin());
  }
  if (options_.conversations_max == 0) return;
  by_conversation_.emplace(std::string(conversation_id), session{std::string(provider_id), now_us});
  by_use_.emplace(now_us, std::string(conversation_id));
}

}  // namespace gpustream::domain
