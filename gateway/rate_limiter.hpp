#pragma once
/// A per-key request rate limit: a token bucket per key (requests per minute, refilled continuously,
/// holding at most `burst`), bounded in the number of keys it tracks. Time is passed in, so tests
/// and simulations drive it without a clock. Thread-safe.

#include <chrono>
#include <cstdint>
#include <functional>
#include <list>
#include <mutex>
#include <string>
#include <string_view>
#include <unordered_map>

namespace gpustream::gateway {

struct rate_limiter_options {
  /// Sustained rate each key may keep up, requests per minute. Must be ≥ 1. Default: 60.
  std::uint32_t requests_per_minute = 60;
  /// Requests a key that has been idle long enough may make at once. Must be ≥ 1. Default: 20.
  std::uint32_t burst = 20;
  /// Most keys tracked at once. Beyond it the least recently used key is forgotten, which at worst
  /// grants that key a fresh burst. Default: 100 000.
  std::size_t keys_max = 100'000;
};

/// The answer for one request.
struct rate_decision {
  bool allowed = true;
  /// When refused: seconds until the next request of this key will be allowed, rounded up, ≥ 1
  /// (the value for a Retry-After header). 0 when allowed.
  std::uint32_t retry_after_seconds = 0;
};

class rate_limiter {
 public:
  using clock = std::chrono::steady_clock;

  explicit rate_limiter(rate_limiter_options options = {});

  /// Takes one token from `key`'s bucket if it has one. `key` should identify the account (an
  /// account id or a key's hash), not the secret itself. `now` must not go backwards for a key by
  /// much; if it does, the request is judged at the key's latest time.
  [[nodiscard]] rate_decision check(std::string_view key, clock::time_point now);

  /// For a request that costs a token only after it has been looked at (a wrong password, not a
  /// right one): refused, without calling `costs`, when `key`'s bucket is empty; otherwise calls
  /// `costs()` and takes a token when it returns true. The limiter's lock is held throughout, so
  /// concurrent callers are judged one after another: an empty bucket lets no further `costs`
  /// through. A key whose requests cost nothing is not tracked; a refused key counts as recently
  /// used (it keeps its empty bucket rather than be forgotten). `costs` must not call the limiter.
  [[nodiscard]] rate_decision check_if(std::string_view key, clock::time_point now,
                                       const std::function<bool()>& costs);

  /// Keys tracked now (≤ keys_max).
  [[nodiscard]] std::size_t keys() const;

  [[nodiscard]] const rate_limiter_options& options() const noexcept { return options_; }

 private:
  // The bucket is kept as GCRA's "theoretical arrival time" (TAT): the time at which the bucket
  // would be full again. One time point per key, exact integer arithmetic, no refill loop.
  struct entry {
    std::string key;
    clock::time_point full_at;
  };
  using lru_list = std::list<entry>;  // most recently used at the back

  // check() with the lock held.
  [[nodiscard]] rate_decision take(std::string_view key, clock::time_point now);
  // The answer for a bucket full again at `full_at`: allowed, or refused with the wait.
  [[nodiscard]] rate_decision judge(clock::time_point full_at, clock::time_point now) const;

  rate_limiter_options options_;
  clock::duration interval_;   // time to earn one token
  clock::duration tolerance_;  // (burst - 1) intervals: how far ahead of now full_at may run
  mutable std::mutex mutex_;
  lru_list entries_;
  // Keys are views into the list's strings, whose nodes never move.
  std::unordered_map<std::string_view, lru_list::iterator> index_;
};

}  // namespace gpustream::gateway
