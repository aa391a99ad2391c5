#include "domain/job_queue.hpp"

#include <algorithm>
#include <limits>
#include <optional>
#include <set>
#include <string_view>
#include <utility>

#include "domain/priority.hpp"

namespace gpustream::domain {

namespace {

/// SplitMix64: spreads a seed and a counter into a well-mixed 64-bit draw.
std::uint64_t mix(std::uint64_t seed, std::uint64_t counter) noexcept {
  std::uint64_t z = seed + (counter + 1) * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

std::string job_problem(const queued_job& job, std::int64_t now_us,
                        const job_queue_options& options) {
  if (job.job_id.empty()) return "a queued job needs an id";
  const std::string which = "job " + job.job_id;
  if (job.model.empty()) return which + " names no model";
  if (job.queued_at_us > now_us) {
    return which + " claims to have been queued at " + std::to_string(job.queued_at_us) +
           " us, after now (" + std::to_string(now_us) + " us)";
  }
  if (job.deadline_at_us <= now_us) {
    return which + " has a deadline (" + std::to_string(job.deadline_at_us) +
           " us) that is not after now (" + std::to_string(now_us) + " us)";
  }
  if (job.cost_max_micros && *job.cost_max_micros < 0) {
    return which + " has a negative cost cap (" + std::to_string(*job.cost_max_micros) + " micro-USD)";
  }
  if (job.price_max_micros_per_mtok && *job.price_max_micros_per_mtok < 0) {
    return which + " has a negative price cap (" + std::to_string(*job.price_max_micros_per_mtok) +
           " micro-USD per million tokens)";
  }
  if (job.priority < 0 || job.priority > options.priority_ms_max) {
    return which + " has priority " + std::to_string(job.priority) + "; it must lie in 0.." +
           std::to_string(options.priority_ms_max);
  }
  return {};
}

std::string_view quality_name(events::quality_tier quality) noexcept {
  switch (quality) {
    case events::quality_tier::low: return "low";
    case events::quality_tier::standard: return "standard";
    case events::quality_tier::high: return "high";
    case events::quality_tier::ultra: return "ultra";
  }
  return "unknown";
}

std::string unservable_message(const queued_job& job, const selection_options& options) {
  const auto tier = static_cast<std::size_t>(job.quality);
  std::string message = "no online provider serves model " + job.model + " at quality tier " +
                        std::string(quality_name(job.quality));
  if (tier < options.quality_level_min.size()) {
    message += " (needs a " + std::string(level_name(options.quality_level_min[tier])) +
               " provider or better)";
  }
  if (job.price_max_micros_per_mtok) {
    message += " priced at most " + std::to_string(*job.price_max_micros_per_mtok) + " micro-USD per million tokens" +
               (job.price_cap_is_platforms ? " (the most the free tier pays)" : " (x_gpustream.max_price_micros)");
  }
  if (job.cost_max_micros) {
    message += " for at most " + std::to_string(*job.cost_max_micros) + " micro-USD (" +
               std::to_string(job.prompt_tokens) + " prompt tokens and up to " + std::to_string(job.max_tokens) +
               " completion tokens)";
  }
  if (job.context_tokens_min != 0) {
    message += " with a context window of at least " + std::to_string(job.context_tokens_min) +
               " tokens (the prompt and max_tokens)";
  }
  if (job.price_cap_is_platforms) return message + "; try another model";
  if (job.cost_max_micros || job.price_max_micros_per_mtok) {
    return message + "; allow a higher price, ask for fewer tokens, or try another model";
  }
  if (job.context_tokens_min != 0) return message + "; shorten the prompt or max_tokens, or try another model";
  return message + "; try another model or a lower quality tier";
}

}  // namespace

job_queue::job_queue(job_queue_options options) : options_(options) {}

job_queue::group_key job_queue::group_of(const queued_job& job) {
  const std::int64_t price_max = job.price_max_micros_per_mtok.value_or(-1);
  std::string avoided = job.avoided_strictly ? job.avoided_provider_id : std::string();
  if (!job.cost_max_micros) {
    return {job.model, job.quality, -1, price_max, 0, 0, job.context_tokens_min, std::move(avoided),
            job.owner_excluded};
  }
  return {job.model,         job.quality,    *job.cost_max_micros,     price_max,
          job.prompt_tokens, job.max_tokens, job.context_tokens_min, std::move(avoided),
          job.owner_excluded};
}

candidate_filter job_queue::admits(const queued_job& job) const {
  if (!job.cost_max_micros && !job.price_max_micros_per_mtok && job.context_tokens_min == 0 &&
      job.owner_excluded.empty()) {
    return {};
  }
  return [this, cost_max = job.cost_max_micros, price_max = job.price_max_micros_per_mtok, quality = job.quality,
          prompt = job.prompt_tokens, max_tokens = job.max_tokens, window = job.context_tokens_min,
          owner_excluded = job.owner_excluded](const online_provider& provider, const online_offer& offer) {
    if (!owner_excluded.empty() && provider.owner_user_id == owner_excluded) return false;
    if (offer.context_length_tokens != 0 && offer.context_length_tokens < window) return false;
    if (price_max && (offer.input_price_micros_per_mtok > *price_max || offer.output_price_micros_per_mtok > *price_max)) {
      return false;
    }
    if (!cost_max) return true;
    const auto quote = quote_max_micros({offer.input_price_micros_per_mtok, offer.output_price_micros_per_mtok},
                                        quality, prompt, max_tokens, options_.pricing);
    return quote && *quote <= *cost_max;
  };
}

expected<void, error> job_queue::push(queued_job job, const selection_index& index,
                                      std::int64_t now_us) {
  if (auto problem = job_problem(job, now_us, options_); !problem.empty()) {
    return refuse(errc::invalid_argument, std::move(problem));
  }
  if (job.deadline_at_us - now_us > options_.deadline_us_max) {
    return refuse(errc::limit_exceeded,
                  "job " + job.job_id + " asks to wait up to " +
                      std::to_string((job.deadline_at_us - now_us) / 1'000) + " ms; at most " +
                      std::to_string(options_.deadline_us_max / 1'000) + " ms are allowed");
  }
  if (by_id_.contains(job.job_id)) {
    return refuse(errc::already_exists, "job " + job.job_id + " is already queued");
  }
  if (!index.can_serve(job.model, job.quality, {}, admits(job))) {
    if (!job.owner_excluded.empty()) {
      auto anyones = job;
      anyones.owner_excluded.clear();
      if (index.can_serve(job.model, job.quality, {}, admits(anyones))) {
        return refuse(errc::no_provider,
                      "the only online providers that could serve job " + job.job_id + " (model " + job.model +
                          ") are owned by its user " + job.owner_excluded +
                          ", and the free tier does not pay a user's own GPU; use a premium key, or try "
                          "another model");
      }
    }
    return refuse(errc::no_provider, unservable_message(job, index.options()));
  }
  if (jobs_.size() >= options_.jobs_queued_max && !job.returning) {
    return refuse(errc::busy,
                  "the queue holds " + std::to_string(jobs_.size()) + " jobs, its limit; job " +
                      job.job_id + " cannot wait, try again shortly");
  }
  const order_key order{service_at_us(job.priority, job.queued_at_us), arrivals_++};
  by_id_.emplace(job.job_id, order);
  groups_[group_of(job)].insert(order);
  by_deadline_.emplace(job.deadline_at_us, order);
  jobs_.emplace(order, std::move(job));
  return {};
}

void job_queue::erase(std::map<order_key, queued_job>::iterator it) {
  const auto& job = it->second;
  const auto order = it->first;
  const auto group = groups_.find(group_of(job));
  GPUSTREAM_ENSURE(group != groups_.end());
  const auto in_group = group->second.erase(order);
  if (group->second.empty()) groups_.erase(group);
  const auto by_deadline = by_deadline_.erase({job.deadline_at_us, order});
  const auto by_id = by_id_.erase(job.job_id);
  // Each index holds each queued job exactly once.
  GPUSTREAM_ENSURE(in_group == 1);
  GPUSTREAM_ENSURE(by_deadline == 1);
  GPUSTREAM_ENSURE(by_id == 1);
  jobs_.erase(it);
}

std::vector<assignment> job_queue::pop_assignable(selection_index& index, const assign_options& how,
                                                  std::int64_t now_us) {
  using group_iterator = std::map<group_key, std::set<order_key>>::iterator;
  // The first job of `group` at or after `from` whose deadline has not passed.
  const auto next_live = [&](group_iterator group, order_key from) -> std::optional<order_key> {
    for (auto it = group->second.lower_bound(from); it != group->second.end(); ++it) {
      if (jobs_.at(*it).deadline_at_us > now_us) return *it;
    }
    return std::nullopt;
  };
  std::map<order_key, group_iterator> heads;  // each group's next job, in queue order
  for (auto group = groups_.begin(); group != groups_.end(); ++group) {
    if (auto first = next_live(group, {std::numeric_limits<std::int64_t>::min(), 0})) heads.emplace(*first, group);
  }
  std::vector<assignment> assigned;
  std::uint64_t draws = 0;
  // A model and tier whose providers all are full (or declining) stay so for the rest of the pass,
  // which only takes slots: their other groups (other caps, windows) are not tried one by one.
  std::set<std::pair<std::string_view, events::quality_tier>> full;
  while (!heads.empty() && assigned.size() < options_.assignments_per_pass_max) {
    const auto [order, group] = *heads.begin();
    heads.erase(heads.begin());
    const auto job = jobs_.find(order);
    const auto& waiting = job->second;
    if (full.contains({waiting.model, waiting.quality})) continue;
    const std::uint64_t draw = mix(how.random_seed, draws++);
    const auto admitted = admits(waiting);
    auto chosen = index.select({waiting.model, waiting.quality, how.policy, draw,
                                waiting.preferred_provider_id, waiting.avoided_provider_id, admitted});
    if (!chosen && !waiting.avoided_provider_id.empty() &&
        (!waiting.avoided_strictly ||
         !index.may_take_work(waiting.model, waiting.quality, waiting.avoided_provider_id, admitted))) {
      chosen = index.select({waiting.model, waiting.quality, how.policy, draw,
                             waiting.preferred_provider_id, {}, admitted});
    }
    // No candidate for the group's best job is none for the whole group: it waits for the
    // next pass, and the other groups go on.
    if (!chosen) {
      if (!index.select({waiting.model, waiting.quality, how.policy, draw, {}, {}, {}})) {
        full.emplace(waiting.model, waiting.quality);
      }
      continue;
    }
    std::string provider_id(*chosen);
    const bool started = index.job_started(provider_id);
    GPUSTREAM_ENSURE(started);  // select() returned a listed provider
    const auto next = next_live(group, {order.first, order.second + 1});
    assigned.push_back({waiting, std::move(provider_id)});
    erase(job);
    if (next) heads.emplace(*next, group);
  }
  return assigned;
}

std::vector<queued_job> job_queue::expire(std::int64_t now_us) {
  std::vector<queued_job> expired;
  while (!by_deadline_.empty() && by_deadline_.begin()->first <= now_us) {
    const auto it = jobs_.find(by_deadline_.begin()->second);
    expired.push_back(it->second);
    erase(it);
  }
  return expired;
}

std::vector<queued_job> job_queue::take_unservable(const selection_index& index) {
  std::vector<order_key> orders;
  for (const auto& [key, members] : groups_) {
    // Every job of a group has the same candidates: its first one speaks for all.
    const auto& first = jobs_.at(*members.begin());
    const auto admitted = admits(first);
    // An answer that broke off waits only for a provider that may take work (its own included,
    // which it goes back to when no other may): a draining one would keep it until its drain ends.
    const bool servable = first.avoided_strictly
                              ? index.may_take_work(std::get<0>(key), std::get<1>(key), {}, admitted)
                              : index.can_serve(std::get<0>(key), std::get<1>(key), {}, admitted);
    if (servable) continue;
    orders.insert(orders.end(), members.begin(), members.end());
  }
  std::sort(orders.begin(), orders.end());
  std::vector<queued_job> taken;
  taken.reserve(orders.size());
  for (const auto& order : orders) {
    const auto it = jobs_.find(order);
    taken.push_back(it->second);
    erase(it);
  }
  return taken;
}

bool job_queue::remove(std::string_view job_id) {
  const auto id = by_id_.find(job_id);
  if (id == by_id_.end()) return false;
  erase(jobs_.find(id->second));
  return true;
}

bool job_queue::contains(std::string_view job_id) const { return by_id_.contains(job_id); }

std::int64_t job_queue::next_deadline_at_us() const noexcept {
  return by_deadline_.empty() ? 0 : by_deadline_.begin()->first;
}

std::vector<queued_job> job_queue::jobs_in_order() const {
  std::vector<queued_job> jobs;
  jobs.reserve(jobs_.size());
  for (const auto& [order, job] : jobs_) jobs.push_back(job);
  return jobs;
}

}  // namespace gpustream::domain
