#pragma once
/// The user aggregate (stream user-<id>): the account, its API keys, the deposits credited to it and
/// the free tier's daily token quota. The prepaid balance is not here: the ledger derives it from
/// transfers; this aggregate only remembers which deposit ids it has credited, so that a deposit
/// reported twice is credited once.

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "base/expected.hpp"
#include "domain/aggregate.hpp"
#include "events/event.hpp"

namespace gpustream::domain {

/// Limits of the user aggregate. The defaults are what production runs with.
struct user_options {
  /// Prompt + completion tokens a free-tier user may use per UTC day (day = at_us / 86'400'000'000).
  /// Default: 100,000.
  std::int64_t free_tokens_per_day = 100'000;
  /// API keys a user may hold unrevoked at once. Default: 32.
  std::size_t active_api_keys_max = 32;
  /// Longest user id, key id, deposit id or job id, in bytes. Default: 128.
  std::size_t id_length_max = 128;
  /// Longest display name, key label or revocation reason, in bytes. Default: 200.
  std::size_t text_length_max = 200;
  /// Largest single deposit, micro-USD. Default: 100,000 USD.
  std::int64_t deposit_micros_max = 100'000'000'000;
  /// Most tokens one job may record against the free quota. Default: 2,097,152.
  std::uint32_t job_tokens_max = 2'097'152;
};

/// One API key of a user. Only the SHA-256 digest of the secret is kept.
struct api_key_state {
  std::vector<std::uint8_t> key_hash;  ///< 32 bytes: SHA-256 of the secret key
  std::string label;
  std::int64_t issued_at_us = 0;
  bool revoked = false;
  std::string revoke_reason;
  std::int64_t revoked_at_us = 0;

  bool operator==(const api_key_state&) const = default;
};

template <class Inspector>
auto inspect(Inspector& f, api_key_state& x) {
  return f(x.key_hash, x.label, x.issued_at_us, x.revoked, x.revoke_reason, x.revoked_at_us);
}

/// Free-tier usage recorded for one job, remembered so that recording it again adds nothing.
struct free_usage_state {
  std::int64_t day = 0;       ///< UTC day the usage counted against
  std::uint32_t tokens = 0;

  bool operator==(const free_usage_state&) const = default;
};

template <class Inspector>
auto inspect(Inspector& f, free_usage_state& x) {
  return f(x.day, x.tokens);
}

struct user_state {
  bool created = false;
  std::string user_id;
  std::string display_name;
  events::user_tier tier = events::user_tier::free;
  std::int64_t created_at_us = 0;
  std::map<std::string, api_key_state> api_keys;  ///< by key id, revoked keys included
  std::map<std::string, std::int64_t> deposits;   ///< deposit id -> amount credited, micro-USD
  std::int64_t usage_day = 0;          ///< the UTC day free_tokens_today counts
  std::int64_t free_tokens_today = 0;  ///< free-tier tokens recorded on usage_day
  /// Usage by job id, for today and yesterday only (older entries are dropped when a new day's
  /// usage arrives), so the map stays as small as one day of jobs.
  std::map<std::string, free_usage_state> recent_usage;

  bool operator==(const user_state&) const = default;
};

template <class Inspector>
auto inspect(Inspector& f, user_state& x) {
  return f(x.created, x.user_id, x.display_name, x.tier, x.created_at_us, x.api_keys, x.deposits,
           x.usage_day, x.free_tokens_today, x.recent_usage);
}

// Commands. Only create_user names the user: the others apply to the stream's user.

struct create_user {
  std::string user_id;
  std::string display_name;
  events::user_tier tier = events::user_tier::free;
};

/// The caller hashes the secret and shows it to the user once; only the digest reaches the log.
struct issue_api_key {
  std::string key_id;
  events::sha256_digest key_hash{};
  std::string label;
};

struct revoke_api_key {
  std::string key_id;
  std::string reason;
};

/// Revokes every active key of the user but this one and issues this one (unless it is issued
/// already), in one decision: the key that replaces keys that leaked or were lost. Two replacements
/// at once leave one key active, whichever is decided last.
struct replace_api_keys {
  std::string key_id;
  events::sha256_digest key_hash{};
  std::string label;
  std::string reason;  ///< recorded with each revocation
  /// Revokes only the active keys labelled `label`, and is refused (invalid_state) while the user
  /// holds an active key labelled otherwise: a retried create replaces its earlier attempts' keys,
  /// never a key issued since by a replacement. Default: false, every other key.
  bool same_label_only = false;
};

struct change_user_tier {
  events::user_tier tier = events::user_tier::free;
};

/// Money that came in from outside. The deposit id is the idempotency key.
struct credit_user {
  std::string deposit_id;
  std::int64_t amount_micros = 0;
};

/// Tokens a free job consumed (prompt + completion), counted against the UTC day of `used_at_us`
/// (0: of `now_us`). Recorded even when it takes the day over the quota: the tokens were served.
struct record_free_usage {
  std::string job_id;
  std::uint32_t tokens = 0;
  /// When the job ended, for usage recorded later than that (`serve` at start, for an end a stop
  /// left without its usage). At most now. Default: 0, now.
  std::int64_t used_at_us = 0;
};

struct user {
  using state = user_state;
  using command = std::variant<create_user, issue_api_key, revoke_api_key, replace_api_keys, change_user_tier,
                               credit_user, record_free_usage>;
  static constexpr std::uint32_t snapshot_version = 1;

  [[nodiscard]] static state evolve(state s, const events::event& e);
  [[nodiscard]] static decision decide(const state& s, const command& c, std::int64_t now_us);
  [[nodiscard]] static decision decide(const state& s, const command& c, std::int64_t now_us,
                                       const user_options& options);
};

static_assert(aggregate<user>);

/// Free-tier tokens left to the user on the UTC day of `now_us` (0 when the quota is used up;
/// never negative). Premium users have no quota: the result is the quota itself.
[[nodiscard]] std::int64_t free_tokens_left(const user_state& s, std::int64_t now_us,
                                            const user_options& options);

/// Admits a job of `requested_tokens` (prompt + max_tokens) for the user: always for premium
/// users; for free users only while the day's recorded usage, plus `held_tokens` (what the
/// user's jobs admitted and not yet recorded may still use), plus the request stays within the
/// quota (errc::quota_exceeded otherwise, naming the numbers). Emits nothing: usage is recorded
/// with record_free_usage once the job is done.
[[nodiscard]] expected<void, error> admit_free_job(const user_state& s,
                                                   std::int64_t requested_tokens,
                                                   std::int64_t held_tokens,
                                                   std::int64_t now_us,
                                                   const user_options& options);

/// The id of the user's unrevoked key whose digest is `key_hash`; empty when there is none.
[[nodiscard]] std::string active_key_id(const user_state& s, const events::sha256_digest& key_hash);

}  // namespace gpustream::domain
