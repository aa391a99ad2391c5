#include "gateway/rate_limiter.hpp"

#include <algorithm>

#include "base/ensure.hpp"

namespace gpustream::gateway {

rate_limiter::rate_limiter(rate_limiter_options options) : options_(options) {
  GPUSTREAM_ENSURE(options_.requests_per_minute >= 1);
  GPUSTREAM_ENSURE(options_.burst >= 1);
  // The tolerance, (burst - 1) intervals of up to a minute each, must fit the clock's ticks.
  GPUSTREAM_ENSURE(static_cast<clock::rep>(options_.burst - 1) <=
                   clock::duration::max() / std::chrono::duration_cast<clock::duration>(std::chrono::minutes(1)));
  GPUSTREAM_ENSURE(options_.keys_max >= 1);
  interval_ = std::chrono::duration_cast<clock::duration>(std::chrono::minutes(1)) / options_.requests_per_minute;
  tolerance_ = interval_ * (options_.burst - 1);
}

rate_decision rate_limiter::check(std::string_view key, clock::time_point now) {
  std::lock_guard lock(mutex_);
  return take(key, now);
}

rate_decision rate_limiter::check_if(std::string_view key, clock::time_point now, const std::function<bool()>& costs) {
  std::lock_guard lock(mutex_);
  if (const auto found = index_.find(key); found != index_.end()) {
    const rate_decision decision = judge(found->second->full_at, now);
    if (!decision.allowed) {
      // Still in use: a key refused again and again must not age out (and so come back with a
      // fresh budget) while other keys come and go.
      entries_.splice(entries_.end(), entries_, found->second);
      return decision;
    }
  }
  if (costs()) (void)take(key, now);  // allowed: the bucket was just judged to have a token
  return rate_decision{true, 0};
}

rate_decision rate_limiter::take(std::string_view key, clock::time_point now) {
  auto found = index_.find(key);
  if (found == index_.end()) {
    if (entries_.size() >= options_.keys_max) {
      // The least recently used key goes; it is also the one most likely to have refilled.
      index_.erase(entries_.front().key);
      entries_.pop_front();
    }
    entries_.push_back(entry{std::string(key), now});
    found = index_.emplace(entries_.back().key, std::prev(entries_.end())).first;
  } else {
    entries_.splice(entries_.end(), entries_, found->second);
  }
  entry& bucket = *found->second;
  const rate_decision decision = judge(bucket.full_at, now);
  // A bucket full before now has simply been idle: it holds `burst` tokens, no more.
  if (decision.allowed) bucket.full_at = std::max(bucket.full_at, now) + interval_;
  return decision;
}

rate_decision rate_limiter::judge(clock::time_point full_at, clock::time_point now) const {
  const clock::time_point start = std::max(full_at, now);
  if (start - now <= tolerance_) return rate_decision{true, 0};
  // Refused: the next token arrives when full_at - tolerance is reached.
  const clock::duration wait = start - tolerance_ - now;
  const auto seconds = std::chrono::ceil<std::chrono::seconds>(wait).count();
  return rate_decision{false, static_cast<std::uint32_t>(std::max<std::int64_t>(seconds, 1))};
}

std::size_t rate_limiter::keys() const {
  std::lock_guard lock(mutex_);
  return entries_.size();
}

}  // namespace gpustream::gateway
