#include "domain/verifier.hpp"

#include <algorithm>
#include <cstddef>
#include <type_traits>
#include <utility>

namespace gpustream::domain {

namespace {

std::string quoted(std::string_view text) { return "\"" + std::string(text) + "\""; }
std::string micros(std::int64_t amount) { return std::to_string(amount) + " micro-USD"; }

/// The stream kind of each event type, by type number. A new event type must be given its kind
/// here: the static_assert below stops the build until it is.
constexpr std::array<stream_kind, 37> kind_by_type = {
    stream_kind::user,     stream_kind::user,     stream_kind::user,     stream_kind::user,
    stream_kind::user,                                                                   // 0-4
    stream_kind::provider, stream_kind::provider, stream_kind::provider, stream_kind::provider,
    stream_kind::provider, stream_kind::provider, stream_kind::provider,                // 5-11
    stream_kind::job,      stream_kind::job,      stream_kind::job,      stream_kind::job,
    stream_kind::job,      stream_kind::job,      stream_kind::job,      stream_kind::job,  // 12-19
    stream_kind::campaign, stream_kind::campaign, stream_kind::campaign, stream_kind::campaign,
    stream_kind::campaign, stream_kind::campaign, stream_kind::campaign,                // 20-26
    stream_kind::ledger,                                                                 // 27
    stream_kind::payout,   stream_kind::payout,   stream_kind::payout,                  // 28-30
    stream_kind::campaign, stream_kind::campaign,                                        // 31-32
    stream_kind::provider,                                                               // 33
    stream_kind::user,                                                                   // 34
    stream_kind::campaign,                                                               // 35
    stream_kind::provider,                                                               // 36
};
static_assert(kind_by_type.size() == events::event_type_count,
              "every event type needs its stream kind in kind_by_type");

template <class T, class Variant>
struct index_in;

template <class T, class... Ts>
struct index_in<T, std::variant<Ts...>> {
  static constexpr std::size_t value = [] {
    std::size_t index = 0;
    (void)((std::is_same_v<T, Ts> ? true : (++index, false)) || ...);
    return index;
  }();
};

template <class T>
constexpr stream_kind kind_of_type = kind_by_type[index_in<T, events::event>::value];

/// The aggregate id an event names: user_id, provider_id, job_id, campaign_id or payout_id as its
/// kind says; empty for a ledger event.
std::string_view owner_id(const events::event& event) {
  return std::visit(
      [](const auto& e) -> std::string_view {
        using type = std::decay_t<decltype(e)>;
        constexpr auto kind = kind_of_type<type>;
        if constexpr (kind == stream_kind::user) return e.user_id;
        if constexpr (kind == stream_kind::provider) return e.provider_id;
        if constexpr (kind == stream_kind::job) return e.job_id;
        if constexpr (kind == stream_kind::campaign) return e.campaign_id;
        if constexpr (kind == stream_kind::payout) return e.payout_id;
        return {};
      },
      event);
}

std::string event_name(const events::event& event) {
  return std::string(events::type_name(events::type_of(event)));
}

constexpr std::array<std::pair<std::string_view, stream_kind>, 5> prefixes = {{
    {"user-", stream_kind::user},
    {"provider-", stream_kind::provider},
    {"job-", stream_kind::job},
    {"campaign-", stream_kind::campaign},
    {"payout-", stream_kind::payout},
}};

/// The events that create users, providers and campaigns: each must be its stream's first and
/// only creation.
bool is_creation(const events::event& event) {
  return std::holds_alternative<events::user_created>(event) ||
         std::holds_alternative<events::provider_created>(event) ||
         std::holds_alternative<events::campaign_created>(event);
}

/// Why a user event would not apply to `s` (evolve would drop it), or "" if it applies.
std::string user_event_problem(const user_state& s, const events::event& event) {
  if (const auto* issued = std::get_if<events::api_key_issued>(&event)) {
    if (s.api_keys.contains(issued->key_id)) return "key " + quoted(issued->key_id) + " was issued before";
  } else if (const auto* revoked = std::get_if<events::api_key_revoked>(&event)) {
    const auto key = s.api_keys.find(revoked->key_id);
    if (key == s.api_keys.end()) return "key " + quoted(revoked->key_id) + " was never issued";
    if (key->second.revoked) return "key " + quoted(revoked->key_id) + " was revoked before";
  } else if (const auto* credited = std::get_if<events::user_credited>(&event)) {
    if (s.deposits.contains(credited->deposit_id))
      return "deposit " + quoted(credited->deposit_id) + " was credited before";
  } else if (const auto* used = std::get_if<events::free_tokens_used>(&event)) {
    if (s.recent_usage.contains(used->job_id))
      return "free usage of job " + quoted(used->job_id) + " was recorded before";
  }
  return {};
}

/// Why a campaign's ad event would not apply to `s` (evolve would drop it), or "" if it applies.
std::string ad_event_problem(const campaign_state& s, const events::event& event) {
  if (const auto* reserved = std::get_if<events::ad_reserved>(&event)) {
    if (s.reservations.contains(reserved->reservation_id) || s.impressions.contains(reserved->reservation_id))
      return "reservation " + quoted(reserved->reservation_id) + " was made before";
  } else if (const auto* recorded = std::get_if<events::impression_recorded>(&event)) {
    if (!s.reservations.contains(recorded->impression_id))
      return "impression " + quoted(recorded->impression_id) + " has no outstanding reservation";
  } else if (const auto* released = std::get_if<events::ad_reservation_released>(&event)) {
    if (!s.reservations.contains(released->reservation_id))
      return "reservation " + quoted(released->reservation_id) + " is not outstanding";
  } else if (const auto* voided = std::get_if<events::impression_voided>(&event)) {
    const auto impression = s.impressions.find(voided->impression_id);
    if (impression == s.impressions.end())
      return "voided impression " + quoted(voided->impression_id) + " is unknown or older than the click window";
    if (impression->second.clicked)
      return "voided impression " + quoted(voided->impression_id) + " was clicked";
  } else if (const auto* clicked = std::get_if<events::ad_clicked>(&event)) {
    const auto impression = s.impressions.find(clicked->impression_id);
    if (impression == s.impressions.end())
      return "impression " + quoted(clicked->impression_id) + " is unknown or older than the click window";
    if (impression->second.clicked) return "impression " + quoted(clicked->impression_id) + " was clicked before";
  }
  return {};
}

/// The money rule every campaign state must keep after every event; "" when it does. O(1).
std::string campaign_budget_problem(const campaign_state& s) {
  const std::string campaign = "campaign " + quoted(s.campaign_id) + ": ";
  if (s.funded_micros < 0 || s.spent_micros < 0 || s.reserved_micros < 0)
    return campaign + "negative funded " + micros(s.funded_micros) + ", spent " + micros(s.spent_micros) +
           " or reserved " + micros(s.reserved_micros);
  if (s.funded_micros > s.budget_micros)
    return campaign + "funded " + micros(s.funded_micros) + " above its budget " + micros(s.budget_micros);
  if (s.spent_micros + s.reserved_micros > spendable_micros(s))
    return campaign + "spent " + micros(s.spent_micros) + " + reserved " + micros(s.reserved_micros) +
           " exceed min(funded " + micros(s.funded_micros) + ", budget " + micros(s.budget_micros) + ")";
  return {};
}

/// An impression may turn at most the price its reservation held into spend.
std::string impression_price_problem(const campaign_state& s, const events::event& event) {
  const auto* recorded = std::get_if<events::impression_recorded>(&event);
  if (recorded == nullptr) return {};
  const auto reservation = s.reservations.find(recorded->impression_id);
  if (reservation == s.reservations.end() || recorded->price_micros <= reservation->second.price_micros) return {};
  return "campaign " + quoted(s.campaign_id) + ": impression " + quoted(recorded->impression_id) + " charged " +
         micros(recorded->price_micros) + ", more than the " + micros(reservation->second.price_micros) +
         " its reservation held";
}

std::string_view payout_status_name(payout_status status) {
  switch (status) {
    case payout_status::none: return "none";
    case payout_status::requested: return "requested";
    case payout_status::settled: return "settled";
    case payout_status::failed: return "failed";
  }
  return "unknown";
}

std::string joined(const std::vector<std::string>& parts) {
  std::string text;
  for (const auto& part : parts) text += (text.empty() ? "" : "; ") + part;
  return text;
}

}  // namespace

std::string_view to_string(stream_kind kind) noexcept {
  switch (kind) {
    case stream_kind::user: return "user";
    case stream_kind::provider: return "provider";
    case stream_kind::job: return "job";
    case stream_kind::campaign: return "campaign";
    case stream_kind::payout: return "payout";
    case stream_kind::ledger: return "ledger";
  }
  return "unknown";
}

std::string_view to_string(invariant which) noexcept {
  switch (which) {
    case invariant::log_order: return "log_order";
    case invariant::stream_kind: return "stream_kind";
    case invariant::aggregate_lifecycle: return "aggregate_lifecycle";
    case invariant::job_lifecycle: return "job_lifecycle";
    case invariant::job_consistency: return "job_consistency";
    case invariant::campaign_budget: return "campaign_budget";
    case invariant::campaign_consistency: return "campaign_consistency";
    case invariant::payout_lifecycle: return "payout_lifecycle";
    case invariant::ledger: return "ledger";
    case invariant::payouts_match_ledger: return "payouts_match_ledger";
    case invariant::job_bill: return "job_bill";
    case invariant::free_usage: return "free_usage";
    case invariant::live_state: return "live_state";
  }
  return "unknown";
}

expected<stream_name, error> classify_stream(std::string_view stream) {
  if (stream == "ledger") return stream_name{stream_kind::ledger, {}};
  for (const auto& [prefix, kind] : prefixes) {
    if (stream.starts_with(prefix) && stream.size() > prefix.size())
      return stream_name{kind, stream.substr(prefix.size())};
  }
  return refuse(errc::invalid_argument,
                "stream " + quoted(stream) +
                    " is of no known kind: expected user-, provider-, job-, campaign- or payout-<id>, or "
                    "\"ledger\"");
}

stream_kind stream_kind_of(const events::event& event) noexcept { return kind_by_type[event.index()]; }

std::string describe(const verify_violation& v) {
  return "invariant " + std::string(to_string(v.broken)) + " violated in stream " + quoted(v.stream) +
         " at version " + std::to_string(v.version) + " (position " + std::to_string(v.position) +
         "): " + v.message;
}

// ---------------------------------------------------------------------------------------------
// Applying one event.

domain_verifier::result domain_verifier::apply(std::string_view stream, std::uint64_t version,
                                               std::uint64_t position, const events::event& event) {
  if (failed_) return unexpected{violation_};
  release_ended_job();
  const where at{stream, version, position};
  if (position <= last_position_) {
    return fail(invariant::log_order, at,
                "global position " + std::to_string(position) + " follows " + std::to_string(last_position_) +
                    "; positions must increase");
  }
  last_position_ = position;
  ++events_;
  auto name = classify_stream(stream);
  if (!name) return fail(invariant::stream_kind, at, name.error().message);
  if (stream_kind_of(event) != name->kind) {
    return fail(invariant::stream_kind, at,
                "event " + event_name(event) + " belongs in a " + std::string(to_string(stream_kind_of(event))) +
                    " stream, not in a " + std::string(to_string(name->kind)) + " stream");
  }
  if (owner_id(event) != name->id) {
    return fail(invariant::stream_kind, at,
                "event " + event_name(event) + " names " + std::string(to_string(name->kind)) + " " +
                    quoted(owner_id(event)) + ", not the stream's own " + quoted(name->id));
  }
  return route(*name, at, event);
}

domain_verifier::result domain_verifier::check_order(std::uint64_t last_version, const where& at) {
  if (at.version == last_version + 1) return {};
  return fail(invariant::log_order, at,
              "version " + std::to_string(at.version) + " follows version " + std::to_string(last_version) +
                  "; versions must be gapless from 1");
}

domain_verifier::result domain_verifier::route(const stream_name& name, const where& at,
                                               const events::event& event) {
  switch (name.kind) {
    case stream_kind::user: return apply_user(at, event);
    case stream_kind::provider: return apply_provider(at, event);
    case stream_kind::job: return apply_job(at, event);
    case stream_kind::campaign: return apply_campaign(at, event);
    case stream_kind::payout: return apply_payout(at, event);
    case stream_kind::ledger: {
      if (auto ok = check_order(ledger_version_, at); !ok) return ok;
      return apply_transfer(at, std::get<events::transfer_recorded>(event));
    }
  }
  return fail(invariant::stream_kind, at, "unknown stream kind");
}

namespace {

/// Finds or adds the entry of `stream` in `map`.
template <class Map>
auto& entry_of(Map& map, std::string_view stream) {
  auto found = map.find(stream);
  if (found == map.end()) found = map.emplace(std::string(stream), typename Map::mapped_type{}).first;
  return found->second;
}

/// Whether `event` is in its place in a stream that must open with its creation event: the
/// creation at version 1 and nowhere else. "" when it is.
std::string creation_problem(std::string_view kind, std::uint64_t version, const events::event& event) {
  const bool creation = is_creation(event);
  if (version == 1 && !creation)
    return "the stream opens with " + event_name(event) + "; a " + std::string(kind) + " stream must open with its " +
           std::string(kind) + "_created";
  if (version != 1 && creation) return event_name(event) + " again at version " + std::to_string(version);
  return {};
}

}  // namespace

domain_verifier::result domain_verifier::apply_user(const where& at, const events::event& event) {
  auto& user = entry_of(users_, at.stream);
  if (auto ok = check_order(user.version, at); !ok) return ok;
  if (auto problem = creation_problem("user", at.version, event); !problem.empty())
    return fail(invariant::aggregate_lifecycle, at, problem);
  if (auto problem = user_event_problem(user.state, event); !problem.empty())
    return fail(invariant::aggregate_lifecycle, at, event_name(event) + " does not apply: " + problem);
  user.state = user::evolve(std::move(user.state), event);
  user.version = at.version;
  user.position = at.position;
  if (const auto* used = std::get_if<events::free_tokens_used>(&event)) return match_free_usage(at, *used);
  return {};
}

domain_verifier::result domain_verifier::apply_provider(const where& at, const events::event& event) {
  auto& entry = entry_of(providers_, at.stream);
  if (auto ok = check_order(entry.version, at); !ok) return ok;
  if (auto problem = creation_problem("provider", at.version, event); !problem.empty())
    return fail(invariant::aggregate_lifecycle, at, problem);
  entry.state = provider::evolve(std::move(entry.state), event);
  entry.version = at.version;
  entry.position = at.position;
  return {};
}

domain_verifier::result domain_verifier::apply_job(const where& at, const events::event& event) {
  if (const auto ended = ended_jobs_.find(at.stream); ended != ended_jobs_.end()) {
    return fail(invariant::job_lifecycle, at,
                event_name(event) + " after the job ended as " + std::string(to_string(ended->second.status)) +
                    " at version " + std::to_string(ended->second.version));
  }
  auto& entry = entry_of(jobs_, at.stream);
  if (auto ok = check_order(entry.version, at); !ok) return ok;
  // Every event decide emits changes the job; one that changes nothing broke the lifecycle (evolve
  // drops what cannot apply). A job's state is small, so the copy is cheap.
  auto next = job::evolve(entry.state, event);
  if (next == entry.state) {
    if (entry.state.status == job_status::none)
      return fail(invariant::job_lifecycle, at,
                  "the stream opens with " + event_name(event) + "; a job stream must open with job_submitted");
    return fail(invariant::job_lifecycle, at,
                event_name(event) + " does not apply to job " + quoted(entry.state.job_id) + " in status " +
                    std::string(to_string(entry.state.status)) + " (attempt " + std::to_string(entry.state.attempt) +
                    (entry.state.provider_id.empty() ? "" : ", provider " + quoted(entry.state.provider_id)) + ")");
  }
  entry.state = std::move(next);
  entry.version = at.version;
  entry.position = at.position;
  if (auto broken = check(entry.state); !broken.empty()) return fail(invariant::job_consistency, at, joined(broken));
  if (is_terminal(entry.state.status)) job_to_release_ = std::string(at.stream);
  if (auto ok = note_free_usage(at, entry.state, event); !ok) return ok;
  return note_bill(at, entry.state, event);
}

domain_verifier::result domain_verifier::note_free_usage(const where& at, const job_state& job,
                                                         const events::event& event) {
  const std::uint32_t tokens = events::free_tokens_of(event);
  if (tokens == 0) return {};
  if (job.premium)
    return fail(invariant::free_usage, at, "premium job " + quoted(job.job_id) + " counts " + std::to_string(tokens) +
                                               " free tokens; a premium job counts none");
  const std::uint64_t used = std::uint64_t{job.prompt_tokens_billed} + job.completion_tokens;
  if (tokens != used)
    return fail(invariant::free_usage, at, "job " + quoted(job.job_id) + " counts " + std::to_string(tokens) +
                                               " free tokens; its billed prompt and completion are " +
                                               std::to_string(used));
  open_usage_.insert_or_assign(job.job_id, open_usage{job.user_id, tokens});
  return {};
}

domain_verifier::result domain_verifier::match_free_usage(const where& at, const events::free_tokens_used& used) {
  const auto open = open_usage_.find(used.job_id);
  if (open == open_usage_.end()) return {};  // its end recorded no free tokens (older builds)
  if (open->second.user_id != used.user_id || open->second.tokens != used.tokens)
    return fail(invariant::free_usage, at, "user " + quoted(used.user_id) + " records " +
                                               std::to_string(used.tokens) + " free tokens of job " +
                                               quoted(used.job_id) + "; its end counts " +
                                               std::to_string(open->second.tokens) + " against user " +
                                               quoted(open->second.user_id));
  open_usage_.erase(open);
  return {};
}

namespace {

/// Why transfer `t` of a bill does not belong in the bill of `job`, or "": its pay comes from the
/// job's own user (premium) or the subsidy (free), goes to a provider the job ran on, which pays
/// the fee from it; an ad is paid for a free job only.
std::string bill_transfer_problem(const job_state& job, const events::billed_transfer& t) {
  const auto tried = [&](std::string_view account) {
    return std::any_of(job.providers_tried.begin(), job.providers_tried.end(),
                       [&](const std::string& p) { return account == provider_account(p); });
  };
  const std::string which = "the bill's transfer " + quoted(t.transfer_id) + " ";
  switch (t.kind) {
    case events::transfer_kind::usage:
      if (!job.premium) return which + "charges a user for a free job, which the subsidy pays";
      if (t.debit_account != user_account(job.user_id))
        return which + "charges " + quoted(t.debit_account) + ", not the job's user " + quoted(job.user_id);
      if (!tried(t.credit_account)) return which + "pays " + quoted(t.credit_account) + ", which the job never ran on";
      return {};
    case events::transfer_kind::free_tier_subsidy:
      if (job.premium) return which + "pays a premium job from the subsidy, which its user pays";
      if (!tried(t.credit_account)) return which + "pays " + quoted(t.credit_account) + ", which the job never ran on";
      return {};
    case events::transfer_kind::platform_fee:
      if (!tried(t.debit_account))
        return which + "takes a fee from " + quoted(t.debit_account) + ", which the job never ran on";
      return {};
    case events::transfer_kind::ad_spend:
      if (job.premium) return which + "pays an ad on a premium job; premium users never see ads";
      return {};
    case events::transfer_kind::deposit: return which + "is a deposit, which no job's bill holds";
    case events::transfer_kind::payout: return which + "is a payout, which no job's bill holds";
  }
  return which + "has an unknown kind";
}

}  // namespace

std::string domain_verifier::ad_spend_problem(const job_state& job, const events::billed_transfer& t) const {
  if (t.kind != events::transfer_kind::ad_spend) return {};
  // The ad was served (its impression recorded) before the answer ended and the bill was made.
  const std::string which = "the bill's ad transfer " + quoted(t.transfer_id) + " ";
  const auto campaign = campaigns_.find(t.debit_account);  // campaign accounts and streams: "campaign-<id>"
  if (campaign == campaigns_.end()) return which + "is paid by " + quoted(t.debit_account) + ", which is no campaign";
  const auto impression = campaign->second.state.impressions.find(t.reference);
  if (impression == campaign->second.state.impressions.end())
    return which + "pays for impression " + quoted(t.reference) + ", which " + quoted(t.debit_account) +
           " has not recorded (or took back)";
  if (impression->second.job_id != job.job_id)
    return which + "pays for impression " + quoted(t.reference) + " of job " + quoted(impression->second.job_id) +
           ", not of this job";
  if (impression->second.price_micros != t.amount_micros)
    return which + "moves " + micros(t.amount_micros) + " for impression " + quoted(t.reference) + ", recorded at " +
           micros(impression->second.price_micros);
  return {};
}

domain_verifier::result domain_verifier::note_bill(const where& at, const job_state& job, const events::event& event) {
  const auto* bill = events::bill_of(event);
  if (bill == nullptr || bill->transfers.empty()) return {};
  // Job streams and their groups share their names: "job-<id>".
  if (bill->group_id != at.stream)
    return fail(invariant::job_bill, at, "the job's bill names group " + quoted(bill->group_id) + ", not its own");
  open_bill open;
  for (const auto& t : bill->transfers) {
    if (auto problem = bill_transfer_problem(job, t); !problem.empty()) return fail(invariant::job_bill, at, problem);
    if (auto problem = ad_spend_problem(job, t); !problem.empty()) return fail(invariant::job_bill, at, problem);
    if (!open.left.emplace(t.transfer_id, t).second)
      return fail(invariant::job_bill, at, "the job's bill names transfer " + quoted(t.transfer_id) + " twice");
  }
  open_bills_.insert_or_assign(bill->group_id, std::move(open));
  return {};
}

domain_verifier::result domain_verifier::match_bill(const where& at, const events::transfer_recorded& recorded) {
  const auto open = open_bills_.find(recorded.linked_group_id);
  if (open == open_bills_.end()) {
    // Not a job's, or its end recorded no bill (older builds, or nothing to bill). A failed job
    // bills nothing, whatever the build: a group of its name moved money it must not have.
    const auto ended = ended_jobs_.find(recorded.linked_group_id);
    const auto live = jobs_.find(recorded.linked_group_id);
    const bool failed = (ended != ended_jobs_.end() && ended->second.status == job_status::failed) ||
                        (live != jobs_.end() && live->second.state.status == job_status::failed);
    if (failed)
      return fail(invariant::job_bill, at, "transfer " + quoted(recorded.transfer_id) + " of group " +
                                               quoted(recorded.linked_group_id) + " moves " +
                                               micros(recorded.amount_micros) +
                                               " for a job that failed; a failed job bills nothing");
    // A provider is paid for a job (and its fee taken) only in the group of a job that ended.
    const bool job_kind = recorded.kind == events::transfer_kind::usage ||
                          recorded.kind == events::transfer_kind::free_tier_subsidy ||
                          recorded.kind == events::transfer_kind::platform_fee;
    const bool ended_job = ended != ended_jobs_.end() || (live != jobs_.end() && is_terminal(live->second.state.status));
    if (job_kind && !ended_job)
      return fail(invariant::job_bill, at, "transfer " + quoted(recorded.transfer_id) + " pays for a job, but its group " +
                                               quoted(recorded.linked_group_id) + " is no job that ended");
    return {};
  }
  const auto billed = open->second.left.find(recorded.transfer_id);
  if (billed == open->second.left.end())
    return fail(invariant::job_bill, at, "transfer " + quoted(recorded.transfer_id) + " of group " +
                                             quoted(recorded.linked_group_id) + " is not in the bill its job recorded");
  const auto& b = billed->second;
  if (b != events::billed_transfer{recorded.transfer_id, recorded.debit_account, recorded.credit_account,
                                   recorded.amount_micros, recorded.kind, recorded.reference})
    return fail(invariant::job_bill, at, "transfer " + quoted(recorded.transfer_id) + " moves " +
                                             micros(recorded.amount_micros) + " from " + quoted(recorded.debit_account) +
                                             " to " + quoted(recorded.credit_account) + "; its job's bill says " +
                                             micros(b.amount_micros) + " from " + quoted(b.debit_account) + " to " +
                                             quoted(b.credit_account));
  open->second.left.erase(billed);
  open->second.partly_applied = true;
  return {};
}

domain_verifier::result domain_verifier::close_bill(const std::string& group_id) {
  const auto open = open_bills_.find(group_id);
  if (open == open_bills_.end() || !open->second.partly_applied) return {};
  // The ledger applies a group whole, so a group that took part of a bill lacks the rest.
  if (!open->second.left.empty())
    return fail(invariant::job_bill, where{"ledger", ledger_version_, ledger_position_},
                "the ledger's group " + quoted(group_id) + " lacks transfer " +
                    quoted(open->second.left.begin()->first) + " of its job's bill");
  open_bills_.erase(open);
  return {};
}

domain_verifier::result domain_verifier::apply_campaign(const where& at, const events::event& event) {
  auto& entry = entry_of(campaigns_, at.stream);
  if (auto ok = check_order(entry.version, at); !ok) return ok;
  if (auto problem = creation_problem("campaign", at.version, event); !problem.empty())
    return fail(invariant::aggregate_lifecycle, at, problem);
  if (auto problem = ad_event_problem(entry.state, event); !problem.empty())
    return fail(invariant::aggregate_lifecycle, at, event_name(event) + " does not apply: " + problem);
  if (auto problem = impression_price_problem(entry.state, event); !problem.empty())
    return fail(invariant::campaign_budget, at, problem);
  entry.state = campaign::evolve(std::move(entry.state), event);
  entry.version = at.version;
  entry.position = at.position;
  if (auto problem = campaign_budget_problem(entry.state); !problem.empty())
    return fail(invariant::campaign_budget, at, problem);
  return {};
}

domain_verifier::result domain_verifier::apply_payout(const where& at, const events::event& event) {
  auto& entry = entry_of(payouts_, at.stream);
  if (auto ok = check_order(entry.version, at); !ok) return ok;
  auto next = payout::evolve(entry.state, event);
  if (next == entry.state) {
    if (entry.state.status == payout_status::none)
      return fail(invariant::payout_lifecycle, at,
                  "the stream opens with " + event_name(event) + "; a payout stream must open with payout_requested");
    return fail(invariant::payout_lifecycle, at,
                event_name(event) + " does not apply to payout " + quoted(entry.state.payout_id) + ", already " +
                    std::string(payout_status_name(entry.state.status)));
  }
  entry.state = std::move(next);
  entry.version = at.version;
  entry.position = at.position;
  if (entry.state.amount_micros <= 0) {
    return fail(invariant::payout_lifecycle, at,
                "payout " + quoted(entry.state.payout_id) + " requests " + micros(entry.state.amount_micros) +
                    "; a payout must be positive");
  }
  return {};
}

void domain_verifier::release_ended_job() {
  if (job_to_release_.empty()) return;
  const auto found = jobs_.find(job_to_release_);
  GPUSTREAM_ENSURE(found != jobs_.end());
  ended_jobs_.emplace(found->first, ended_job{found->second.state.status, found->second.version, found->second.position});
  jobs_.erase(found);
  job_to_release_.clear();
}

// ---------------------------------------------------------------------------------------------
// The ledger, through ledger_verifier. A group's end is checked here before the next group's first
// transfer is applied, so that a violation found then is reported at the group's last transfer.

domain_verifier::result domain_verifier::apply_transfer(const where& at, const events::transfer_recorded& recorded) {
  if (recorded.linked_group_id != ledger_.group_id()) {
    if (auto ended = end_ledger_group(); !ended) return ended;
    if (auto closed = close_bill(std::string(ledger_.group_id())); !closed) return closed;
  }
  if (auto ok = ledger_.apply(recorded); !ok) return fail(invariant::ledger, at, ok.error().message);
  ledger_version_ = at.version;
  ledger_position_ = at.position;
  return match_bill(at, recorded);
}

domain_verifier::result domain_verifier::end_ledger_group() {
  if (auto ended = ledger_.end_group(); !ended) {
    return fail(invariant::ledger, where{"ledger", ledger_version_, ledger_position_}, ended.error().message);
  }
  return {};
}

domain_verifier::result domain_verifier::fail(invariant broken, const where& at, std::string message) {
  failed_ = true;
  violation_ = verify_violation{broken, std::string(at.stream), at.version, at.position, std::move(message)};
  return unexpected{violation_};
}

// ---------------------------------------------------------------------------------------------
// The end.

domain_verifier::result domain_verifier::check_campaign_spend_in_ledger() const {
  for (const auto& [account, amount] : ledger_.history().ad_spend()) {
    // Campaign accounts and campaign streams share their names: "campaign-<id>".
    const auto campaign = campaigns_.find(account);
    const std::int64_t budget = campaign == campaigns_.end() ? 0 : campaign->second.state.budget_micros;
    if (amount <= budget) continue;
    const where at = campaign == campaigns_.end() ? where{"ledger", ledger_version_, ledger_position_}
                                                  : where{account, campaign->second.version, campaign->second.position};
    return unexpected{verify_violation{
        invariant::campaign_budget, std::string(at.stream), at.version, at.position,
        "the ledger moved " + micros(amount) + " of ad spend out of " + quoted(account) + ", more than its budget " +
            micros(budget) + (campaign == campaigns_.end() ? " (no such campaign)" : "")}};
  }
  return {};
}

domain_verifier::result domain_verifier::finish_checks() {
  if (auto ended = end_ledger_group(); !ended) return ended;
  if (auto closed = close_bill(std::string(ledger_.group_id())); !closed) return closed;
  const where ledger_end{"ledger", ledger_version_, ledger_position_};
  if (auto ok = check_ledger(ledger_.state()); !ok) return fail(invariant::ledger, ledger_end, ok.error().message);
  std::vector<payout::state> payouts;
  payouts.reserve(payouts_.size());
  for (const auto& [stream, entry] : payouts_) payouts.push_back(entry.state);
  if (auto ok = check_payouts_against_ledger(ledger_.state(), payouts); !ok)
    return fail(invariant::payouts_match_ledger, ledger_end, ok.error().message);
  for (const auto& [stream, entry] : campaigns_) {
    if (auto broken = check(entry.state); !broken.empty())
      return fail(invariant::campaign_consistency, where{stream, entry.version, entry.position}, joined(broken));
  }
  if (auto ok = check_campaign_spend_in_ledger(); !ok) {
    failed_ = true;
    violation_ = ok.error();
    return ok;
  }
  for (const auto& [stream, entry] : jobs_) {
    // apply refuses a job stream whose first event is not its submission, so none is left at
    // status none; this catches a bug in that reasoning rather than in the log.
    if (entry.state.status == job_status::none)
      return fail(invariant::job_lifecycle, where{stream, entry.version, entry.position}, "job never submitted");
  }
  return {};
}

expected<verify_counts, verify_violation> domain_verifier::finish() {
  if (failed_) return unexpected{violation_};
  release_ended_job();
  if (auto ok = finish_checks(); !ok) return unexpected{ok.error()};
  verify_counts counts;
  counts.events = events_;
  counts.users = users_.size();
  counts.providers = providers_.size();
  counts.campaigns = campaigns_.size();
  counts.jobs = jobs_.size() + ended_jobs_.size();
  for (const auto& [stream, entry] : jobs_) ++counts.jobs_by_status[static_cast<std::size_t>(entry.state.status)];
  for (const auto& [stream, ended] : ended_jobs_) ++counts.jobs_by_status[static_cast<std::size_t>(ended.status)];
  counts.job_bills_unsettled = open_bills_.size();
  counts.free_usage_unrecorded = open_usage_.size();
  counts.payouts = payouts_.size();
  for (const auto& [stream, entry] : payouts_) {
    counts.payouts_requested += entry.state.status == payout_status::requested ? 1 : 0;
    counts.payouts_settled += entry.state.status == payout_status::settled ? 1 : 0;
    counts.payouts_failed += entry.state.status == payout_status::failed ? 1 : 0;
  }
  counts.ledger_transfers = ledger_.history().transfers();
  counts.ledger_groups = ledger_.history().groups();
  counts.ledger_accounts = ledger_.state().balances_micros.size();
  return counts;
}

// ---------------------------------------------------------------------------------------------
// Reading states back.

domain_verifier::state_view domain_verifier::state_of(std::string_view stream) const {
  auto name = classify_stream(stream);
  if (!name) return std::monostate{};
  auto find = [stream](const auto& map) -> decltype(&map.begin()->second.state) {
    const auto found = map.find(stream);
    return found == map.end() ? nullptr : &found->second.state;
  };
  switch (name->kind) {
    case stream_kind::user:
      if (auto* s = find(users_)) return s;
      break;
    case stream_kind::provider:
      if (auto* s = find(providers_)) return s;
      break;
    case stream_kind::job:
      if (auto* s = find(jobs_)) return s;
      break;
    case stream_kind::campaign:
      if (auto* s = find(campaigns_)) return s;
      break;
    case stream_kind::payout:
      if (auto* s = find(payouts_)) return s;
      break;
    case stream_kind::ledger:
      if (ledger_version_ > 0) return &ledger_.state();
      break;
  }
  return std::monostate{};
}

std::uint64_t domain_verifier::version_of(std::string_view stream) const {
  auto name = classify_stream(stream);
  if (!name) return 0;
  auto find = [stream](const auto& map) -> std::uint64_t {
    const auto found = map.find(stream);
    return found == map.end() ? 0 : found->second.version;
  };
  switch (name->kind) {
    case stream_kind::user: return find(users_);
    case stream_kind::provider: return find(providers_);
    case stream_kind::job: return std::max(find(jobs_), find(ended_jobs_));
    case stream_kind::campaign: return find(campaigns_);
    case stream_kind::payout: return find(payouts_);
    case stream_kind::ledger: return ledger_version_;
  }
  return 0;
}

}  // namespace gpustream::domain
