#include "gateway/directory.hpp"

#include <spdlog/logger.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <array>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <iterator>
#include <map>
#include <mutex>
#include <set>
#include <shared_mutex>
#include <stop_token>
#include <thread>
#include <unordered_map>
#include <utility>

#include "domain/provider.hpp"
#include "events/codec.hpp"
#include "gateway/secrets.hpp"
#include "storage/event_store.hpp"

namespace gpustream::gateway {

namespace {

/// Digests are uniformly random already: their first bytes are a good hash.
struct digest_hash {
  std::size_t operator()(const events::sha256_digest& digest) const noexcept {
    std::size_t h = 0;
    std::memcpy(&h, digest.data(), sizeof h);
    return h;
  }
};

/// The streams the directory folds, by prefix (ARCHITECTURE.md's stream names).
enum class stream_kind : std::uint8_t { user, provider, job, campaign, payout, ledger, other };

struct stream_name {
  stream_kind kind = stream_kind::other;
  std::string_view id;  ///< the aggregate id after the prefix (empty for the ledger)
};

stream_name classify(std::string_view stream) noexcept {
  static constexpr std::array<std::pair<std::string_view, stream_kind>, 5> prefixes{{
      {"user-", stream_kind::user},
      {"provider-", stream_kind::provider},
      {"job-", stream_kind::job},
      {"campaign-", stream_kind::campaign},
      {"payout-", stream_kind::payout},
  }};
  if (stream == "ledger") return {stream_kind::ledger, {}};
  for (const auto& [prefix, kind] : prefixes) {
    if (stream.size() > prefix.size() && stream.substr(0, prefix.size()) == prefix) {
      return {kind, stream.substr(prefix.size())};
    }
  }
  return {};
}

/// Moves `last` to `version` if the event at `version` is new; false when it was applied.
bool advance(std::uint64_t& last, std::uint64_t version) noexcept {
  if (version <= last) return false;
  last = version;
  return true;
}

struct user_record {
  events::user_tier tier = events::user_tier::free;
  std::uint64_t version = 0;
  std::map<std::string, events::sha256_digest> keys;  ///< unrevoked, by key id
};

struct key_owner {
  std::string user_id;
  std::string key_id;
};

struct provider_record {
  domain::provider::state state;
  std::uint64_t version = 0;
};

struct provider_money {
  std::int64_t balance_micros = 0;
  std::int64_t earned_micros = 0;
  std::int64_t paid_out_micros = 0;
};

struct payout_record {
  payout_entry entry;
  std::uint64_t version = 0;
};

struct campaign_record {
  campaign_entry entry;
  std::uint64_t version = 0;
};

struct job_record {
  job_entry entry;
  std::uint64_t version = 0;
  std::uint64_t age = 0;       ///< submission order: larger is newer
  std::uint64_t finished = 0;  ///< finishing order; 0 while live
};

constexpr std::size_t job_status_count = static_cast<std::size_t>(domain::job_status::cancelled) + 1;

constexpr std::string_view provider_account_prefix = "provider-";
constexpr std::string_view job_group_prefix = "job-";

/// The values of `map`, in its order, at most `max`.
template <class Map>
std::vector<typename Map::mapped_type> first_values(const Map& map, std::size_t max) {
  std::vector<typename Map::mapped_type> out;
  for (const auto& [key, value] : map) {
    if (out.size() >= max) break;
    out.push_back(value);
  }
  return out;
}

}  // namespace

class directory::impl {
 public:
  impl(std::shared_ptr<storage::event_store> store, directory_options options)
      : store_(std::move(store)),
        options_(options),
        log_(spdlog::default_logger()->clone("directory")) {}

  // -- Building and following the log. ---------------------------------------------------------

  expected<void, storage::error> read_log() {
    // Through a subscription, which checks that the positions follow on: a gap (damage on disk)
    // refuses the open rather than leaving out what the missing records held.
    auto subscription = store_->subscribe(0);
    for (;;) {
      auto chunk = subscription.next(options_.read_events_max, std::chrono::milliseconds(0));
      if (!chunk) return unexpected{chunk.error()};
      if (chunk->empty()) break;
      const auto decoded = decode(*chunk);
      std::unique_lock lock(mutex_);
      apply_decoded(decoded);
    }
    set_position(subscription.position());
    return {};
  }

  void start() {
    thread_ = std::jthread([this](std::stop_token stop) { follow(stop); });
  }

  void stop() {
    if (!thread_.joinable()) return;
    thread_.request_stop();
    retry_cv_.notify_all();
    thread_.join();
  }

  void follow(const std::stop_token& stop) {
    auto subscription = store_->subscribe(position());
    while (!stop.stop_requested()) {
      auto batch = subscription.next(options_.read_events_max, options_.subscription_wait_max);
      if (!batch) {
        const bool damaged = batch.error().code == storage::errc::corruption;
        if (damaged && !damage_logged_) {
          damage_logged_ = true;
          log_->error("the event log is damaged, and the directory cannot read past position {}: {}; "
                      "/healthz answers 503 until it can (run `gpustream replay --verify` on a copy)",
                      subscription.position(), batch.error().message);
        } else if (!damaged) {
          log_->warn("reading the event log failed, retrying in {} ms: {}", options_.read_retry_wait.count(),
                     batch.error().message);
        }
        {
          std::lock_guard lock(problem_mutex_);
          read_problem_ = batch.error().message;
        }
        std::unique_lock lock(retry_mutex_);
        retry_cv_.wait_for(lock, stop, options_.read_retry_wait, [] { return false; });
        continue;
      }
      if (read_problem()) {
        std::lock_guard lock(problem_mutex_);
        read_problem_.reset();
      }
      damage_logged_ = false;
      if (batch->empty()) continue;
      const auto decoded = decode(*batch);
      {
        std::unique_lock lock(mutex_);
        apply_decoded(decoded);
      }
      set_position(batch->back().position);
    }
  }

  void apply_committed(std::string_view stream, std::uint64_t version_after,
                       std::span<const events::event> events) {
    if (events.empty()) return;
    GPUSTREAM_ENSURE(version_after >= events.size());
    const std::uint64_t first = version_after - events.size() + 1;
    std::uint64_t last = 0;
    {
      std::unique_lock lock(mutex_);
      last = version_of(stream);
      if (first <= last + 1) {
        apply_events(stream, first, events);
        return;
      }
    }
    // Events before these are missing here (the subscription has not reached them yet): read
    // them outside the lock, then apply everything in order. What the subscription applies
    // meanwhile is skipped by version.
    const std::uint64_t gap = first - 1 - last;
    if (gap > options_.gap_events_max) return;  // the subscription will bring all of them
    // In parts: the store reads at most its own read_events_max, and a part of the gap left
    // unread would be skipped for good (these events' versions pass it).
    std::vector<events::record> missing;
    for (std::uint64_t from = last + 1; from < first;) {
      auto part = store_->read_stream(stream, from, first - 1, first - from);
      if (!part) {
        log_->warn("reading {} events of stream {} failed; the subscription will bring them: {}", gap,
                   stream, part.error().message);
        return;
      }
      if (part->empty()) break;
      from = part->back().version + 1;
      std::move(part->begin(), part->end(), std::back_inserter(missing));
    }
    if (missing.size() != gap) return;  // not all in the log yet: the subscription brings them
    const auto decoded = decode(missing);
    std::unique_lock lock(mutex_);
    for (const auto& r : decoded) {
      if (r.version > version_of(stream)) ++events_filled_;
    }
    apply_decoded(decoded);
    apply_events(stream, first, events);
  }

  // -- Position. -------------------------------------------------------------------------------

  std::optional<std::string> read_problem() const {
    std::lock_guard lock(problem_mutex_);
    return read_problem_;
  }

  std::uint64_t position() const {
    std::lock_guard lock(position_mutex_);
    return position_;
  }

  bool wait_for_position(std::uint64_t target, std::chrono::milliseconds wait_max) const {
    std::unique_lock lock(position_mutex_);
    return position_cv_.wait_for(lock, wait_max, [&] { return position_ >= target; });
  }

  // -- Lookups. --------------------------------------------------------------------------------

  std::optional<user_entry> user_by_api_key(std::string_view key) const {
    const auto digest = sha256(key);
    std::shared_lock lock(mutex_);
    const auto owner = keys_.find(digest);
    if (owner == keys_.end()) return std::nullopt;
    const auto user = users_.find(owner->second.user_id);
    if (user == users_.end()) return std::nullopt;
    return user_entry{user->first, user->second.tier};
  }

  std::optional<provider_entry> provider_by_token(std::string_view token) const {
    const auto digest = sha256(token);
    std::shared_lock lock(mutex_);
    const auto id = tokens_.find(digest);
    if (id == tokens_.end()) return std::nullopt;
    return provider_locked(id->second);
  }

  bool token_is_of(const events::sha256_digest& token_hash, std::string_view provider_id) const {
    std::shared_lock lock(mutex_);
    const auto id = tokens_.find(token_hash);
    return id != tokens_.end() && id->second == provider_id;
  }

  std::int64_t contribution_score(std::string_view user_id) const {
    std::shared_lock lock(mutex_);
    const auto owned = owned_.find(user_id);
    if (owned == owned_.end()) return 0;
    std::int64_t best = 0;
    for (const auto& provider_id : owned->second) {
      const auto p = providers_.find(provider_id);
      if (p != providers_.end()) best = std::max(best, p->second.state.score);
    }
    return best;
  }

  std::optional<user_entry> user(std::string_view user_id) const {
    std::shared_lock lock(mutex_);
    const auto u = users_.find(user_id);
    if (u == users_.end()) return std::nullopt;
    return user_entry{u->first, u->second.tier};
  }

  std::optional<provider_entry> provider(std::string_view provider_id) const {
    std::shared_lock lock(mutex_);
    return provider_locked(provider_id);
  }

  std::optional<job_entry> job(std::string_view job_id) const {
    std::shared_lock lock(mutex_);
    const auto j = jobs_.find(std::string(job_id));
    if (j == jobs_.end()) return std::nullopt;
    return j->second.entry;
  }

  std::optional<campaign_entry> campaign(std::string_view campaign_id) const {
    std::shared_lock lock(mutex_);
    const auto found = campaigns_.find(campaign_id);
    if (found == campaigns_.end()) return std::nullopt;
    return found->second.entry;
  }

  std::vector<provider_entry> providers(std::size_t max, std::string_view after) const {
    std::shared_lock lock(mutex_);
    std::vector<provider_entry> out;
    for (auto it = providers_.upper_bound(after); it != providers_.end() && out.size() < max; ++it) {
      if (auto entry = provider_locked(it->first)) out.push_back(std::move(*entry));
    }
    return out;
  }

  std::optional<std::vector<job_entry>> jobs(std::optional<domain::job_status> status, std::size_t max,
                                             std::string_view after) const {
    std::shared_lock lock(mutex_);
    std::uint64_t older_than = std::numeric_limits<std::uint64_t>::max();
    if (!after.empty()) {
      const auto found = jobs_.find(std::string(after));
      if (found == jobs_.end()) return std::nullopt;
      older_than = found->second.age;
    }
    std::vector<job_entry> out;
    auto take = [&](std::uint64_t age) {
      const auto id = jobs_by_age_.find(age);
      GPUSTREAM_ENSURE(id != jobs_by_age_.end());
      out.push_back(jobs_.at(id->second).entry);
    };
    if (status) {
      const auto& ages = by_status_[static_cast<std::size_t>(*status)];
      for (auto it = std::make_reverse_iterator(ages.lower_bound(older_than)); it != ages.rend() && out.size() < max;
           ++it) {
        take(*it);
      }
    } else {
      for (auto it = std::make_reverse_iterator(jobs_by_age_.lower_bound(older_than));
           it != jobs_by_age_.rend() && out.size() < max; ++it) {
        take(it->first);
      }
    }
    return out;
  }

  std::vector<payout_entry> payouts_of(std::string_view provider_id, std::size_t max) const {
    std::shared_lock lock(mutex_);
    std::vector<payout_entry> out;
    const auto ids = payouts_by_provider_.find(provider_id);
    if (ids == payouts_by_provider_.end()) return out;
    for (auto it = ids->second.rbegin(); it != ids->second.rend() && out.size() < max; ++it) {
      out.push_back(payouts_.at(*it).entry);
    }
    return out;
  }

  std::vector<campaign_entry> campaigns(std::size_t max) const {
    std::shared_lock lock(mutex_);
    std::vector<campaign_entry> out;
    for (const auto& [id, record] : campaigns_) {
      if (out.size() >= max) break;
      out.push_back(record.entry);
    }
    return out;
  }

  std::vector<unsettled_bill> unsettled_bills(std::size_t max) const {
    std::shared_lock lock(mutex_);
    return first_values(unsettled_, max);
  }

  std::vector<unrecorded_usage> unrecorded_free_usage(std::size_t max) const {
    std::shared_lock lock(mutex_);
    return first_values(unrecorded_usage_, max);
  }

  directory_counts counts() const {
    directory_counts c;
    {
      std::shared_lock lock(mutex_);
      c.unsettled_bills = unsettled_.size();
      c.unrecorded_free_usage = unrecorded_usage_.size();
      c.users = users_.size();
      c.active_api_keys = keys_.size();
      for (const auto& [id, record] : providers_) {
        if (!record.state.exists) continue;
        ++c.providers;
        if (record.state.online) ++c.providers_online;
      }
      c.campaigns = campaigns_.size();
      c.jobs = jobs_.size();
      c.jobs_forgotten = jobs_forgotten_;
      c.events_skipped = events_skipped_;
      c.events_filled = events_filled_;
    }
    c.position = position();
    return c;
  }

  directory_contents contents() const {
    std::shared_lock lock(mutex_);
    directory_contents out;
    for (const auto& [id, record] : users_) {
      directory_contents::user u{{id, record.tier}, {}};
      for (const auto& [key_id, digest] : record.keys) u.api_key_hashes.push_back(digest);
      out.users.push_back(std::move(u));
    }
    for (const auto& [id, record] : providers_) {
      if (auto entry = provider_locked(id)) out.providers.push_back(std::move(*entry));
    }
    for (const auto& [provider_id, ids] : payouts_by_provider_) {
      for (const auto& id : ids) out.payouts.push_back(payouts_.at(id).entry);
    }
    for (const auto& [id, record] : campaigns_) out.campaigns.push_back(record.entry);
    for (const auto& [age, id] : jobs_by_age_) out.jobs.push_back(jobs_.at(id).entry);
    out.unsettled_bills = first_values(unsettled_, unsettled_.size());
    out.unrecorded_free_usage = first_values(unrecorded_usage_, unrecorded_usage_.size());
    return out;
  }

 private:
  // -- Applying (callers hold mutex_ exclusively). --------------------------------------------

  /// A record with its event decoded (none: it does not decode). Records are decoded before the
  /// lock is taken, so that lookups wait only for the applying.
  struct decoded_record {
    std::string_view stream;  ///< the record's
    std::uint64_t version = 0;
    std::optional<events::event> event;
  };

  /// `records`' events, decoded; they must outlive the result.
  std::vector<decoded_record> decode(std::span<const events::record> records) const {
    std::vector<decoded_record> out;
    out.reserve(records.size());
    for (const auto& r : records) {
      const auto* bytes = reinterpret_cast<const std::byte*>(r.payload.data());
      auto decoded = events::decode_payload(r.type, {bytes, r.payload.size()});
      if (!decoded) {
        // A newer build's event, most likely: the directory cannot know what it means, and the
        // aggregates that own the stream are the authority anyway.
        log_->warn("skipping event {} of stream {} (type {}): it does not decode", r.version, r.stream,
                   r.type);
        out.push_back({r.stream, r.version, std::nullopt});
        continue;
      }
      out.push_back({r.stream, r.version, std::move(*decoded)});
    }
    return out;
  }

  /// With the lock held.
  void apply_decoded(std::span<const decoded_record> records) {
    for (const auto& r : records) {
      if (r.event) {
        apply(r.stream, r.version, *r.event);
      } else {
        ++events_skipped_;
      }
    }
  }

  void apply_events(std::string_view stream, std::uint64_t first,
                    std::span<const events::event> events) {
    for (std::size_t i = 0; i < events.size(); ++i) apply(stream, first + i, events[i]);
  }

  std::uint64_t version_of(std::string_view stream) const {
    const auto name = classify(stream);
    auto of = [&](const auto& records) -> std::uint64_t {
      const auto it = records.find(name.id);
      return it == records.end() ? 0 : it->second.version;
    };
    switch (name.kind) {
      case stream_kind::user: return of(users_);
      case stream_kind::provider: return of(providers_);
      case stream_kind::campaign: return of(campaigns_);
      case stream_kind::ledger: return ledger_version_;
      case stream_kind::job: {
        const auto it = jobs_.find(std::string(name.id));
        return it == jobs_.end() ? 0 : it->second.version;
      }
      case stream_kind::payout: {
        const auto it = payouts_.find(std::string(name.id));
        return it == payouts_.end() ? 0 : it->second.version;
      }
      case stream_kind::other: return 0;
    }
    return 0;
  }

  void apply(std::string_view stream, std::uint64_t version, const events::event& e) {
    const auto name = classify(stream);
    switch (name.kind) {
      case stream_kind::user: apply_user(name.id, version, e); break;
      case stream_kind::provider: apply_provider(name.id, version, e); break;
      case stream_kind::job: apply_job(name.id, version, e); break;
      case stream_kind::campaign: apply_campaign(name.id, version, e); break;
      case stream_kind::payout: apply_payout(name.id, version, e); break;
      case stream_kind::ledger:
        if (!advance(ledger_version_, version)) return;
        if (const auto* t = std::get_if<events::transfer_recorded>(&e)) apply_transfer(*t);
        break;
      case stream_kind::other: break;
    }
  }

  void apply_user(std::string_view id, std::uint64_t version, const events::event& e) {
    if (const auto* created = std::get_if<events::user_created>(&e)) {
      auto& record = users_.try_emplace(std::string(id)).first->second;
      if (!advance(record.version, version)) return;
      record.tier = created->tier;
      return;
    }
    const auto found = users_.find(id);
    if (found == users_.end()) return;
    auto& record = found->second;
    if (!advance(record.version, version)) return;
    if (const auto* issued = std::get_if<events::api_key_issued>(&e)) {
      record.keys[issued->key_id] = issued->key_hash;
      keys_[issued->key_hash] = key_owner{found->first, issued->key_id};
    } else if (const auto* revoked = std::get_if<events::api_key_revoked>(&e)) {
      const auto key = record.keys.find(revoked->key_id);
      if (key == record.keys.end()) return;
      keys_.erase(key->second);
      record.keys.erase(key);
    } else if (const auto* changed = std::get_if<events::user_tier_changed>(&e)) {
      record.tier = changed->tier;
    } else if (const auto* used = std::get_if<events::free_tokens_used>(&e)) {
      if (unrecorded_usage_.erase(used->job_id) == 0) note_usage_ahead(used->job_id);
    }
  }

  void apply_provider(std::string_view id, std::uint64_t version, const events::event& e) {
    const auto* created = std::get_if<events::provider_created>(&e);
    auto found = providers_.find(id);
    if (found == providers_.end()) {
      if (created == nullptr) return;
      found = providers_.try_emplace(std::string(id)).first;
    }
    auto& record = found->second;
    if (!advance(record.version, version)) return;
    const bool existed = record.state.exists;
    const auto token_before = record.state.token_hash;
    record.state = domain::provider::evolve(std::move(record.state), e);
    if (created != nullptr && !existed && record.state.exists) {
      tokens_[created->token_hash] = found->first;
      owned_[created->owner_user_id].push_back(found->first);
    }
    if (const auto* replaced = std::get_if<events::provider_token_replaced>(&e);
        replaced != nullptr && record.state.token_hash != token_before) {
      events::sha256_digest old{};
      if (token_before.size() == old.size()) {
        std::copy(token_before.begin(), token_before.end(), old.begin());
        tokens_.erase(old);  // the old token opens nothing any more
      }
      tokens_[replaced->token_hash] = found->first;
    }
  }

  void apply_campaign(std::string_view id, std::uint64_t version, const events::event& e) {
    const auto* created = std::get_if<events::campaign_created>(&e);
    auto found = campaigns_.find(id);
    if (found == campaigns_.end()) {
      if (created == nullptr) return;
      found = campaigns_.try_emplace(std::string(id)).first;
    }
    auto& record = found->second;
    if (!advance(record.version, version)) return;
    if (created != nullptr) {
      record.entry = {created->campaign_id, created->advertiser, created->title,
                      created->created_at_us, created->url};
    } else if (const auto* shown = std::get_if<events::impression_recorded>(&e)) {
      const auto job = jobs_.find(shown->job_id);
      if (job == jobs_.end() || job->second.finished != 0) return;
      forget_impression(job->second);
      job->second.entry.impression_id = shown->impression_id;
      live_impressions_.insert_or_assign(shown->impression_id, shown->job_id);
    } else if (const auto* voided = std::get_if<events::impression_voided>(&e)) {
      const auto shown = live_impressions_.find(voided->impression_id);
      if (shown == live_impressions_.end()) return;
      forget_impression(jobs_.at(shown->second));
    }
  }

  /// The job's impression is settled or taken back: no longer the live job's to settle.
  void forget_impression(job_record& job) {
    if (job.entry.impression_id.empty()) return;
    live_impressions_.erase(job.entry.impression_id);
    job.entry.impression_id.clear();
  }

  void apply_payout(std::string_view id, std::uint64_t version, const events::event& e) {
    if (const auto* requested = std::get_if<events::payout_requested>(&e)) {
      if (payouts_.contains(std::string(id))) {
        advance(payouts_.at(std::string(id)).version, version);
        return;
      }
      auto& ids = payouts_by_provider_[requested->provider_id];
      if (ids.size() >= options_.payouts_per_provider_max && !ids.empty()) {
        payouts_.erase(ids.front());
        ids.pop_front();
      }
      if (options_.payouts_per_provider_max == 0) return;
      auto& record = payouts_[std::string(id)];
      record.version = version;
      record.entry = {requested->payout_id, requested->provider_id, requested->amount_micros,
                      requested->automatic, domain::payout_status::requested,
                      requested->requested_at_us, 0, {}, {}};
      ids.push_back(std::string(id));
      return;
    }
    const auto found = payouts_.find(std::string(id));
    if (found == payouts_.end()) return;  // forgotten (beyond payouts_per_provider_max)
    auto& record = found->second;
    if (!advance(record.version, version)) return;
    if (const auto* settled = std::get_if<events::payout_settled>(&e)) {
      record.entry.status = domain::payout_status::settled;
      record.entry.closed_at_us = settled->settled_at_us;
      record.entry.external_reference = settled->external_reference;
    } else if (const auto* failed = std::get_if<events::payout_failed>(&e)) {
      record.entry.status = domain::payout_status::failed;
      record.entry.closed_at_us = failed->failed_at_us;
      record.entry.failure_reason = failed->reason;
    }
  }

  /// Follows the ledger's provider_totals: earned counts usage and subsidy in, fees out; paid
  /// out counts payout requests out, failed payouts back in.
  void apply_transfer(const events::transfer_recorded& t) {
    using kind = events::transfer_kind;
    if (auto* credited = money_of(t.credit_account)) {
      credited->balance_micros += t.amount_micros;
      if (t.kind == kind::usage || t.kind == kind::free_tier_subsidy) {
        credited->earned_micros += t.amount_micros;
      } else if (t.kind == kind::payout) {
        credited->paid_out_micros -= t.amount_micros;
      }
    }
    if (auto* debited = money_of(t.debit_account)) {
      debited->balance_micros -= t.amount_micros;
      if (t.kind == kind::platform_fee) {
        debited->earned_micros -= t.amount_micros;
      } else if (t.kind == kind::payout) {
        debited->paid_out_micros += t.amount_micros;
      }
    }
    apply_job_money(t);
    if (!t.linked_group_id.empty()) unsettled_.erase(t.linked_group_id);
  }

  provider_money* money_of(std::string_view account) {
    if (!account.starts_with(provider_account_prefix)) return nullptr;
    const auto id = account.substr(provider_account_prefix.size());
    auto found = money_.find(id);
    if (found == money_.end()) found = money_.try_emplace(std::string(id)).first;
    return &found->second;
  }

  void apply_job_money(const events::transfer_recorded& t) {
    if (!t.linked_group_id.starts_with(job_group_prefix)) return;
    const auto found = jobs_.find(t.linked_group_id.substr(job_group_prefix.size()));
    if (found == jobs_.end()) return;  // forgotten, or never seen
    auto& entry = found->second.entry;
    switch (t.kind) {
      case events::transfer_kind::usage:
      case events::transfer_kind::free_tier_subsidy: entry.gross_micros += t.amount_micros; break;
      case events::transfer_kind::platform_fee: entry.platform_fee_micros += t.amount_micros; break;
      case events::transfer_kind::ad_spend: entry.ad_micros += t.amount_micros; break;
      default: break;
    }
  }

  /// A job's end with a bill waits for its ledger group, which the log holds after it.
  void note_bill(std::string_view job_id, const events::event& e) {
    const auto* bill = events::bill_of(e);
    if (bill == nullptr || bill->transfers.empty()) return;
    unsettled_.insert_or_assign(bill->group_id, unsettled_bill{std::string(job_id), *bill});
  }

  // -- Jobs. -----------------------------------------------------------------------------------

  void apply_job(std::string_view id, std::uint64_t version, const events::event& e) {
    if (const auto* submitted = std::get_if<events::job_submitted>(&e)) {
      if (auto found = jobs_.find(std::string(id)); found != jobs_.end()) {
        advance(found->second.version, version);
        return;
      }
      add_job(id, version, *submitted);
      return;
    }
    // A forgotten job's events come once, in order, from the subscription: its bill still counts.
    const auto found = jobs_.find(std::string(id));
    if (found != jobs_.end() && !advance(found->second.version, version)) return;
    note_bill(id, e);
    if (found == jobs_.end()) return;  // forgotten
    std::visit([&](const auto& event) { on_job_event(found->second, event); }, e);
    note_free_usage(found->second.entry, e);
  }

  /// A job's end with free tokens waits for its usage, which the user's stream holds after it.
  void note_free_usage(const job_entry& job, const events::event& e) {
    const std::uint32_t tokens = events::free_tokens_of(e);
    if (tokens == 0) return;
    if (usage_ahead_.erase(job.job_id) > 0) return;  // its usage came first
    unrecorded_usage_.insert_or_assign(
        job.job_id, unrecorded_usage{job.job_id, job.user_id, tokens, job.finished_at_us});
  }

  /// A usage whose job's end has not been applied: a gap fill of the user's stream brought it
  /// ahead of the subscription (or its job is unknown here). Bounded by usage_ahead_max.
  void note_usage_ahead(const std::string& job_id) {
    if (options_.usage_ahead_max == 0 || !usage_ahead_.insert(job_id).second) return;
    usage_ahead_order_.push_back(job_id);
    while (usage_ahead_order_.size() > options_.usage_ahead_max) {
      usage_ahead_.erase(usage_ahead_order_.front());
      usage_ahead_order_.pop_front();
    }
  }

  void add_job(std::string_view id, std::uint64_t version, const events::job_submitted& e) {
    if (options_.jobs_max == 0) return;
    while (jobs_.size() >= options_.jobs_max) forget_one_job();
    job_record record;
    record.version = version;
    record.age = ++job_age_;
    record.entry.job_id = e.job_id;
    record.entry.user_id = e.user_id;
    record.entry.model = e.model;
    record.entry.status = domain::job_status::submitted;
    record.entry.premium = e.premium;
    record.entry.prompt_tokens = e.prompt_tokens;
    record.entry.max_tokens = e.max_tokens;
    record.entry.submitted_at_us = e.submitted_at_us;
    jobs_by_age_.emplace(record.age, std::string(id));
    by_status_[static_cast<std::size_t>(domain::job_status::submitted)].insert(record.age);
    jobs_.emplace(std::string(id), std::move(record));
  }

  /// Forgets the job that finished longest ago, or the oldest job when none has finished.
  void forget_one_job() {
    std::uint64_t age = 0;
    if (!finished_.empty()) {
      age = finished_.begin()->second;
      finished_.erase(finished_.begin());
    } else {
      GPUSTREAM_ENSURE(!jobs_by_age_.empty());
      age = jobs_by_age_.begin()->first;
    }
    const auto id = jobs_by_age_.find(age);
    GPUSTREAM_ENSURE(id != jobs_by_age_.end());
    const auto job = jobs_.find(id->second);
    GPUSTREAM_ENSURE(job != jobs_.end());
    by_status_[static_cast<std::size_t>(job->second.entry.status)].erase(age);
    forget_impression(job->second);
    jobs_.erase(job);
    jobs_by_age_.erase(id);
    ++jobs_forgotten_;
  }

  void set_status(job_record& record, domain::job_status status, std::int64_t at_us = 0) {
    by_status_[static_cast<std::size_t>(record.entry.status)].erase(record.age);
    by_status_[static_cast<std::size_t>(status)].insert(record.age);
    record.entry.status = status;
    if (domain::is_terminal(status) && record.finished == 0) {
      forget_impression(record);
      record.finished = ++job_finished_;
      record.entry.finished_at_us = at_us;
      finished_.emplace(record.finished, record.age);
    }
  }

  void on_job_event(job_record& r, const events::job_queued&) {
    set_status(r, domain::job_status::queued);
  }
  void on_job_event(job_record& r, const events::job_assigned& e) {
    r.entry.provider_id = e.provider_id;
    r.entry.attempt = e.attempt;
    set_status(r, domain::job_status::assigned);
  }
  void on_job_event(job_record& r, const events::job_started& e) {
    r.entry.provider_id = e.provider_id;
    set_status(r, domain::job_status::streaming);
  }
  void on_job_event(job_record& r, const events::job_reassigned&) {
    r.entry.provider_id.clear();
    set_status(r, domain::job_status::queued);
  }
  void on_job_event(job_record& r, const events::job_completed& e) {
    r.entry.provider_id = e.provider_id;
    r.entry.prompt_tokens = e.prompt_tokens;
    r.entry.prompt_tokens_billed = events::billed_prompt_tokens(e);
    r.entry.completion_tokens = e.completion_tokens;
    set_status(r, domain::job_status::completed, e.completed_at_us);
  }
  void on_job_event(job_record& r, const events::job_failed& e) {
    r.entry.provider_id.clear();
    r.entry.failure = e.reason;
    set_status(r, domain::job_status::failed, e.failed_at_us);
  }
  void on_job_event(job_record& r, const events::job_cancelled& e) {
    r.entry.completion_tokens = e.tokens_produced;
    r.entry.prompt_tokens_billed = r.entry.prompt_tokens;  // a cancel bills the prompt as estimated
    set_status(r, domain::job_status::cancelled, e.cancelled_at_us);
  }
  template <class Other>
  void on_job_event(job_record&, const Other&) {}

  // -- Reading (callers hold mutex_). ----------------------------------------------------------

  std::optional<provider_entry> provider_locked(std::string_view provider_id) const {
    const auto found = providers_.find(provider_id);
    if (found == providers_.end() || !found->second.state.exists) return std::nullopt;
    const auto& s = found->second.state;
    provider_entry p;
    p.provider_id = s.provider_id;
    p.owner_user_id = s.owner_user_id;
    p.name = s.name;
    p.created_at_us = s.created_at_us;
    p.online = s.online;
    p.connected_at_us = s.online ? s.connected_at_us : 0;
    p.suspended_until_at_us = s.suspended_until_at_us;
    p.score = s.score;
    p.level = s.level;
    p.jobs_succeeded = s.jobs_succeeded;
    p.jobs_failed = s.jobs_failed;
    p.achievements.assign(s.achievements.begin(), s.achievements.end());
    for (const auto& o : s.offers) {
      p.models.push_back({o.model_name, o.context_length_tokens, o.quantisation,
                          o.input_price_micros_per_mtok, o.output_price_micros_per_mtok,
                          o.max_concurrency});
    }
    if (const auto money = money_.find(provider_id); money != money_.end()) {
      p.balance_micros = money->second.balance_micros;
      p.earned_micros = money->second.earned_micros;
      p.paid_out_micros = money->second.paid_out_micros;
    }
    return p;
  }

  void set_position(std::uint64_t position) {
    {
      std::lock_guard lock(position_mutex_);
      position_ = position;
    }
    position_cv_.notify_all();
  }

  std::shared_ptr<storage::event_store> store_;
  directory_options options_;
  std::shared_ptr<spdlog::logger> log_;

  mutable std::shared_mutex mutex_;
  std::map<std::string, user_record, std::less<>> users_;
  std::unordered_map<events::sha256_digest, key_owner, digest_hash> keys_;
  std::map<std::string, provider_record, std::less<>> providers_;
  std::unordered_map<events::sha256_digest, std::string, digest_hash> tokens_;
  std::map<std::string, std::vector<std::string>, std::less<>> owned_;  ///< owner -> providers
  std::map<std::string, provider_money, std::less<>> money_;  ///< by provider id
  std::unordered_map<std::string, payout_record> payouts_;
  std::map<std::string, std::deque<std::string>, std::less<>> payouts_by_provider_;  ///< newest last
  std::map<std::string, campaign_record, std::less<>> campaigns_;
  std::unordered_map<std::string, job_record> jobs_;
  /// Impression id -> job id, for live jobs' impressions (job_entry::impression_id).
  std::unordered_map<std::string, std::string> live_impressions_;
  std::map<std::uint64_t, std::string> jobs_by_age_;  ///< age -> job id
  std::map<std::uint64_t, std::uint64_t> finished_;   ///< finishing order -> age
  std::array<std::set<std::uint64_t>, job_status_count> by_status_;  ///< ages per status
  std::uint64_t job_age_ = 0;
  std::uint64_t job_finished_ = 0;
  std::uint64_t jobs_forgotten_ = 0;
  std::uint64_t events_skipped_ = 0;
  std::uint64_t events_filled_ = 0;
  std::uint64_t ledger_version_ = 0;
  std::map<std::string, unsettled_bill, std::less<>> unsettled_;  ///< by ledger group id
  std::map<std::string, unrecorded_usage, std::less<>> unrecorded_usage_;  ///< by job id
  std::set<std::string, std::less<>> usage_ahead_;  ///< job ids: see note_usage_ahead
  std::deque<std::string> usage_ahead_order_;       ///< the same, oldest first

  mutable std::mutex position_mutex_;
  mutable std::condition_variable position_cv_;
  std::uint64_t position_ = 0;

  std::mutex retry_mutex_;
  std::condition_variable_any retry_cv_;
  mutable std::mutex problem_mutex_;
  std::optional<std::string> read_problem_;  ///< guarded by problem_mutex_
  bool damage_logged_ = false;               ///< the follower's own: damage is logged once as an error
  std::jthread thread_;  ///< last: stopped before anything it uses goes away
};

expected<std::unique_ptr<directory>, storage::error> directory::open(
    std::shared_ptr<storage::event_store> store, directory_options options) {
  GPUSTREAM_ENSURE(store != nullptr);
  GPUSTREAM_ENSURE(options.read_events_max > 0);
  auto state = std::make_unique<impl>(std::move(store), options);
  if (auto read = state->read_log(); !read) return unexpected{read.error()};
  state->start();
  return std::unique_ptr<directory>(new directory(std::move(state)));
}

directory::directory(std::unique_ptr<impl> state) : impl_(std::move(state)) {}

directory::~directory() { impl_->stop(); }

std::optional<user_entry> directory::user_by_api_key(std::string_view key) const {
  return impl_->user_by_api_key(key);
}
std::optional<provider_entry> directory::provider_by_token(std::string_view token) const {
  return impl_->provider_by_token(token);
}
bool directory::token_is_of(const events::sha256_digest& token_hash, std::string_view provider_id) const {
  return impl_->token_is_of(token_hash, provider_id);
}
std::int64_t directory::contribution_score(std::string_view user_id) const {
  return impl_->contribution_score(user_id);
}
std::optional<user_entry> directory::user(std::string_view user_id) const {
  return impl_->user(user_id);
}
std::optional<provider_entry> directory::provider(std::string_view provider_id) const {
  return impl_->provider(provider_id);
}
std::optional<job_entry> directory::job(std::string_view job_id) const { return impl_->job(job_id); }
std::optional<campaign_entry> directory::campaign(std::string_view campaign_id) const {
  return impl_->campaign(campaign_id);
}
std::vector<provider_entry> directory::providers(std::size_t max, std::string_view after) const {
  return impl_->providers(max, after);
}
std::vector<job_entry> directory::jobs(std::optional<domain::job_status> status,
                                       std::size_t max) const {
  return impl_->jobs(status, max, {}).value();
}
std::optional<std::vector<job_entry>> directory::jobs(std::optional<domain::job_status> status, std::size_t max,
                                                      std::string_view after) const {
  return impl_->jobs(status, max, after);
}
std::vector<payout_entry> directory::payouts_of(std::string_view provider_id,
                                                std::size_t max) const {
  return impl_->payouts_of(provider_id, max);
}
std::vector<campaign_entry> directory::campaigns(std::size_t max) const {
  return impl_->campaigns(max);
}
std::vector<unsettled_bill> directory::unsettled_bills(std::size_t max) const {
  return impl_->unsettled_bills(max);
}

std::vector<unrecorded_usage> directory::unrecorded_free_usage(std::size_t max) const {
  return impl_->unrecorded_free_usage(max);
}
directory_counts directory::counts() const { return impl_->counts(); }
directory_contents directory::contents() const { return impl_->contents(); }
void directory::apply_committed(std::string_view stream, std::uint64_t version_after,
                                std::span<const events::event> events) {
  impl_->apply_committed(stream, version_after, events);
}
std::uint64_t directory::position() const { return impl_->position(); }
std::optional<std::string> directory::read_problem() const { return impl_->read_problem(); }

bool directory::wait_for_position(std::uint64_t target, std::chrono::milliseconds wait_max) const {
  return impl_->wait_for_position(target, wait_max);
}

}  // namespace gpustream::gateway
