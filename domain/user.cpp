#include "domain/user.hpp"

#include <algorithm>
#include <utility>

#include "domain/time.hpp"

namespace gpustream::domain {

namespace {

std::string quoted(std::string_view text) { return "\"" + std::string(text) + "\""; }

expected<void, error> check_text(std::string_view what, std::string_view text,
                                 std::size_t length_max, bool may_be_empty) {
  if (!may_be_empty && text.empty()) return refuse(errc::invalid_argument, std::string(what) + " is empty");
  if (text.size() > length_max)
    return refuse(errc::invalid_argument, std::string(what) + " is " + std::to_string(text.size()) +
                                              " bytes long; at most " + std::to_string(length_max) +
                                              " are allowed");
  return {};
}

std::vector<std::uint8_t> to_bytes(const events::sha256_digest& digest) {
  return {digest.begin(), digest.end()};
}

using events_list = std::vector<events::event>;

decision on(const user_state& s, const create_user& c, std::int64_t now_us, const user_options& o) {
  if (auto ok = check_text("user id", c.user_id, o.id_length_max, false); !ok) return unexpected{ok.error()};
  if (auto ok = check_text("display name", c.display_name, o.text_length_max, true); !ok)
    return unexpected{ok.error()};
  if (s.created) {
    if (s.user_id == c.user_id && s.display_name == c.display_name && s.tier == c.tier) return events_list{};
    return refuse(errc::already_exists, "user " + quoted(s.user_id) + " already exists with other details; " +
                                            "change the tier with change_user_tier");
  }
  return events_list{events::user_created{c.user_id, c.display_name, c.tier, now_us}};
}

/// true when `c` is a new key the user may be issued, false when it repeats the active key of its
/// id (no event). Unless `replacing` (every other key is revoked with it), the user must hold
/// fewer than active_api_keys_max active keys.
expected<bool, error> key_is_new(const user_state& s, const issue_api_key& c, const user_options& o, bool replacing) {
  if (auto ok = check_text("key id", c.key_id, o.id_length_max, false); !ok) return unexpected{ok.error()};
  if (auto ok = check_text("key label", c.label, o.text_length_max, true); !ok) return unexpected{ok.error()};
  if (std::all_of(c.key_hash.begin(), c.key_hash.end(), [](std::uint8_t b) { return b == 0; }))
    return refuse(errc::invalid_argument, "the key digest is all zeros; pass the SHA-256 of the secret key");
  const auto hash = to_bytes(c.key_hash);
  if (auto it = s.api_keys.find(c.key_id); it != s.api_keys.end()) {
    if (it->second.revoked)
      return refuse(errc::invalid_state, "key " + quoted(c.key_id) + " was revoked; issue a key with a new id");
    if (it->second.key_hash == hash && it->second.label == c.label) return false;
    return refuse(errc::already_exists, "key id " + quoted(c.key_id) + " is already used by another key");
  }
  std::size_t active = 0;
  for (const auto& [key_id, key] : s.api_keys) {
    if (key.key_hash == hash)
      return refuse(errc::already_exists, "this digest already belongs to key " + quoted(key_id));
    if (!key.revoked) ++active;
  }
  if (!replacing && active >= o.active_api_keys_max)
    return refuse(errc::limit_exceeded, "user " + quoted(s.user_id) + " already holds " + std::to_string(active) +
                                            " active keys, the most allowed; revoke one first");
  return true;
}

decision on(const user_state& s, const issue_api_key& c, std::int64_t now_us, const user_options& o) {
  auto is_new = key_is_new(s, c, o, false);
  if (!is_new) return unexpected{is_new.error()};
  if (!*is_new) return events_list{};
  return events_list{events::api_key_issued{s.user_id, c.key_id, c.key_hash, c.label, now_us}};
}

decision on(const user_state& s, const replace_api_keys& c, std::int64_t now_us, const user_options& o) {
  if (auto ok = check_text("revocation reason", c.reason, o.text_length_max, true); !ok)
    return unexpected{ok.error()};
  auto is_new = key_is_new(s, issue_api_key{c.key_id, c.key_hash, c.label}, o, true);
  if (!is_new) return unexpected{is_new.error()};
  events_list out;
  for (const auto& [key_id, key] : s.api_keys) {
    if (key.revoked || key_id == c.key_id) continue;
    if (c.same_label_only && key.label != c.label) {
      return refuse(errc::invalid_state, "user " + quoted(s.user_id) + " holds key " + quoted(key_id) + " labelled " +
                                             quoted(key.label) + ", which this replacement of " + quoted(c.label) +
                                             " keys must not revoke");
    }
    out.push_back(events::api_key_revoked{s.user_id, key_id, c.reason, now_us});
  }
  if (*is_new) out.push_back(events::api_key_issued{s.user_id, c.key_id, c.key_hash, c.label, now_us});
  return out;
}

decision on(const user_state& s, const revoke_api_key& c, std::int64_t now_us, const user_options& o) {
  if (auto ok = check_text("revocation reason", c.reason, o.text_length_max, true); !ok)
    return unexpected{ok.error()};
  auto it = s.api_keys.find(c.key_id);
  if (it == s.api_keys.end())
    return refuse(errc::not_found, "user " + quoted(s.user_id) + " has no key " + quoted(c.key_id));
  if (it->second.revoked) return events_list{};
  return events_list{events::api_key_revoked{s.user_id, c.key_id, c.reason, now_us}};
}

decision on(const user_state& s, const change_user_tier& c, std::int64_t now_us, const user_options&) {
  if (s.tier == c.tier) return events_list{};
  return events_list{events::user_tier_changed{s.user_id, c.tier, now_us}};
}

decision on(const user_state& s, const credit_user& c, std::int64_t now_us, const user_options& o) {
  if (auto ok = check_text("deposit id", c.deposit_id, o.id_length_max, false); !ok) return unexpected{ok.error()};
  if (c.amount_micros <= 0 || c.amount_micros > o.deposit_micros_max)
    return refuse(errc::invalid_argument, "deposit of " + std::to_string(c.amount_micros) +
                                              " micro-USD is outside 1 .. " + std::to_string(o.deposit_micros_max));
  if (auto it = s.deposits.find(c.deposit_id); it != s.deposits.end()) {
    if (it->second == c.amount_micros) return events_list{};
    return refuse(errc::already_exists, "deposit " + quoted(c.deposit_id) + " was credited with " +
                                            std::to_string(it->second) + " micro-USD, not " +
                                            std::to_string(c.amount_micros));
  }
  return events_list{events::user_credited{s.user_id, c.deposit_id, c.amount_micros, now_us}};
}

decision on(const user_state& s, const record_free_usage& c, std::int64_t now_us, const user_options& o) {
  if (auto ok = check_text("job id", c.job_id, o.id_length_max, false); !ok) return unexpected{ok.error()};
  if (c.tokens == 0 || c.tokens > o.job_tokens_max)
    return refuse(errc::invalid_argument, "job usage of " + std::to_string(c.tokens) + " tokens is outside 1 .. " +
                                              std::to_string(o.job_tokens_max));
  if (c.used_at_us < 0 || c.used_at_us > now_us)
    return refuse(errc::invalid_argument, "usage of job " + quoted(c.job_id) + " at " + std::to_string(c.used_at_us) +
                                              " us is outside 0 .. now (" + std::to_string(now_us) + " us)");
  if (auto it = s.recent_usage.find(c.job_id); it != s.recent_usage.end()) {
    if (it->second.tokens == c.tokens) return events_list{};
    return refuse(errc::already_exists, "job " + quoted(c.job_id) + " already recorded " +
                                            std::to_string(it->second.tokens) + " tokens, not " +
                                            std::to_string(c.tokens));
  }
  const std::int64_t used_at_us = c.used_at_us != 0 ? c.used_at_us : now_us;
  return events_list{events::free_tokens_used{s.user_id, c.job_id, c.tokens, used_at_us}};
}

/// Counts usage against the day it happened; a new day starts from zero and forgets usage older
/// than yesterday.
void apply_usage(user_state& s, const events::free_tokens_used& e) {
  const std::int64_t day = utc_day(e.used_at_us);
  if (day > s.usage_day) {
    s.usage_day = day;
    s.free_tokens_today = 0;
    std::erase_if(s.recent_usage, [day](const auto& entry) { return entry.second.day < day - 1; });
  }
  if (day == s.usage_day) s.free_tokens_today += e.tokens;
  s.recent_usage.emplace(e.job_id, free_usage_state{day, e.tokens});
}

void apply(user_state& s, const events::event& e) {
  if (const auto* created = std::get_if<events::user_created>(&e)) {
    if (s.created) return;
    s.created = true;
    s.user_id = created->user_id;
    s.display_name = created->display_name;
    s.tier = created->tier;
    s.created_at_us = created->created_at_us;
  } else if (const auto* issued = std::get_if<events::api_key_issued>(&e)) {
    if (issued->user_id != s.user_id) return;
    s.api_keys.emplace(issued->key_id,
                       api_key_state{to_bytes(issued->key_hash), issued->label, issued->issued_at_us, false, {}, 0});
  } else if (const auto* revoked = std::get_if<events::api_key_revoked>(&e)) {
    auto it = s.api_keys.find(revoked->key_id);
    if (revoked->user_id != s.user_id || it == s.api_keys.end() || it->second.revoked) return;
    it->second.revoked = true;
    it->second.revoke_reason = revoked->reason;
    it->second.revoked_at_us = revoked->revoked_at_us;
  } else if (const auto* changed = std::get_if<events::user_tier_changed>(&e)) {
    if (changed->user_id == s.user_id) s.tier = changed->tier;
  } else if (const auto* credited = std::get_if<events::user_credited>(&e)) {
    if (credited->user_id == s.user_id) s.deposits.emplace(credited->deposit_id, credited->amount_micros);
  } else if (const auto* used = std::get_if<events::free_tokens_used>(&e)) {
    if (used->user_id == s.user_id && !s.recent_usage.contains(used->job_id)) apply_usage(s, *used);
  }
}

}  // namespace

user_state user::evolve(state s, const events::event& e) {
  apply(s, e);
  return s;
}

decision user::decide(const state& s, const command& c, std::int64_t now_us) {
  return decide(s, c, now_us, user_options{});
}

decision user::decide(const state& s, const command& c, std::int64_t now_us, const user_options& options) {
  if (!s.created && !std::holds_alternative<create_user>(c))
    return refuse(errc::not_found, "no user has been created on this stream; create it first");
  return std::visit([&](const auto& command) { return on(s, command, now_us, options); }, c);
}

std::int64_t free_tokens_left(const user_state& s, std::int64_t now_us, const user_options& options) {
  if (s.tier == events::user_tier::premium) return options.free_tokens_per_day;
  const std::int64_t used = s.usage_day == utc_day(now_us) ? s.free_tokens_today : 0;
  return std::max<std::int64_t>(0, options.free_tokens_per_day - used);
}

expected<void, error> admit_free_job(const user_state& s, std::int64_t requested_tokens, std::int64_t held_tokens,
                                     std::int64_t now_us, const user_options& options) {
  if (!s.created) return refuse(errc::not_found, "no such user; create it first");
  if (requested_tokens <= 0)
    return refuse(errc::invalid_argument,
                  "a job must request at least one token, not " + std::to_string(requested_tokens));
  if (s.tier == events::user_tier::premium) return {};
  const std::int64_t used = s.usage_day == utc_day(now_us) ? s.free_tokens_today : 0;
  const std::int64_t held = std::max<std::int64_t>(held_tokens, 0);
  if (used + held + requested_tokens > options.free_tokens_per_day)
    return refuse(errc::quota_exceeded,
                  "free tier: " + std::to_string(used) + " tokens used today + " + std::to_string(held) +
                      " held by jobs in progress + " + std::to_string(requested_tokens) +
                      " requested would exceed the daily quota of " + std::to_string(options.free_tokens_per_day) +
                      " tokens; ask for fewer tokens, wait for the next UTC day or upgrade to premium");
  return {};
}

std::string active_key_id(const user_state& s, const events::sha256_digest& key_hash) {
  const auto hash = to_bytes(key_hash);
  for (const auto& [key_id, key] : s.api_keys)
    if (!key.revoked && key.key_hash == hash) return key_id;
  return {};
}

}  // namespace gpustream::domain
