#pragma once
/// The domain half of `gpustream replay --verify`: rebuilds every aggregate from the log, one event
/// at a time in log order, and checks the invariants the platform promises on the way:
///
///   - the log is in order: each stream's versions are gapless from 1, global positions increase;
///   - every stream is of a known kind (user-, provider-, job-, campaign-, payout-<id>, "ledger"),
///     holds only events of its kind, and each event names the stream's own id;
///   - users, providers and campaigns start with their creation event, and have only one;
///   - every job and payout event applies to the state before it (nothing after a terminal state,
///     no transition its lifecycle does not allow), and a job stays consistent (domain::check);
///   - no campaign ever has spent + reserved more than min(funded, budget), nor funded above its
///     budget; at the end every campaign passes domain::check and the ledger's ad spend of each
///     campaign stays within its budget;
///   - the ledger: no transfer id twice, each transfer applicable (positive, allowed route), after
///     every linked group the touched accounts within their rules (no forbidden negative balance,
///     no provider paid out more than it earned) and the running total zero; at the end the full
///     check (all balances sum to zero), and every payout agrees with its ledger movements;
///   - a job's bill (events::ledger_bill, recorded with its end) fits the job: a premium job's
///     user or a free job's subsidy pays providers the job ran on, which pay the fee; an ad only
///     on a free job; no deposit or payout;
///   - a job's bill names the job's own group, and
///     the ledger applies that group as the bill says, transfer for transfer, or not at all: a
///     bill whose group the log does not hold yet (a stop between the two appends, settled when
///     `serve` starts) is counted, not a violation;
///   - a job's free tokens (recorded with its end) are its prompt and completion, only for a free
///     job, and its user's stream records them as the end says, or not yet: usage the log does not
///     hold yet (recorded when `serve` starts) is counted, not a violation.
///
/// Pure: the caller reads the log (and snapshots) and feeds the events in. The states it rebuilds
/// are the ones the actors hold, so the caller can compare them with the actors' snapshots
/// ("live state equals rebuilt state"): `state_of` right after `apply` is the state at that
/// version. Memory: one small state per stream; a job is reduced to its status once it has ended
/// (at the next `apply`), since nothing may change it any more. The ledger keeps every transfer,
/// as the ledger actor does.

#include <array>
#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "base/expected.hpp"
#include "domain/campaign.hpp"
#include "domain/job.hpp"
#include "domain/ledger.hpp"
#include "domain/payout.hpp"
#include "domain/provider.hpp"
#include "domain/user.hpp"
#include "events/event.hpp"

namespace gpustream::domain {

/// The aggregate a stream holds, by the prefix of its name.
enum class stream_kind : std::uint8_t { user, provider, job, campaign, payout, ledger };

[[nodiscard]] std::string_view to_string(stream_kind kind) noexcept;

/// A stream name split into its kind and the aggregate id after the prefix ("" for the ledger).
struct stream_name {
  stream_kind kind = stream_kind::ledger;
  std::string_view id;  ///< points into the name that was classified
};

/// Classifies "user-<id>", "provider-<id>", "job-<id>", "campaign-<id>", "payout-<id>" (non-empty
/// <id>) and "ledger"; refuses (invalid_argument) any other name.
[[nodiscard]] expected<stream_name, error> classify_stream(std::string_view stream);

/// The kind of stream an event belongs in.
[[nodiscard]] stream_kind stream_kind_of(const events::event& event) noexcept;

/// The invariants the verifier checks, each named in a violation.
enum class invariant : std::uint8_t {
  log_order,             ///< versions gapless from 1 per stream, global positions increasing
  stream_kind,           ///< a known stream kind holding only its own events, naming its own id
  aggregate_lifecycle,   ///< users, providers, campaigns: created first, and once
  job_lifecycle,         ///< every job event applies to the job's state before it
  job_consistency,       ///< domain::check(job_state) after every job event
  campaign_budget,       ///< spent + reserved <= min(funded, budget); ledger ad spend <= budget
  campaign_consistency,  ///< domain::check(campaign_state) at the end
  payout_lifecycle,      ///< every payout event applies to the payout's state before it
  ledger,                ///< the ledger's rules: ids once, routes, balances, sums to zero
  payouts_match_ledger,  ///< domain::check_payouts_against_ledger at the end
  job_bill,              ///< a job's bill names its group and the ledger applies it as recorded
  free_usage,            ///< a job's free tokens are its own, recorded on its user's stream as its end says
  live_state,            ///< a snapshot equals the state rebuilt up to its version (the caller's)
};

[[nodiscard]] std::string_view to_string(invariant which) noexcept;

/// The first broken invariant and where: the event at which it broke, or for a check at the end,
/// the last event of the stream concerned.
struct verify_violation {
  invariant broken = invariant::log_order;
  std::string stream;
  std::uint64_t version = 0;   ///< stream version of that event (0: the stream has none)
  std::uint64_t position = 0;  ///< global position of that event (0: none)
  std::string message;         ///< what broke, naming ids and the numbers involved
};

/// "invariant <name> violated in stream <s> at version <v> (position <p>): <message>".
[[nodiscard]] std::string describe(const verify_violation& violation);

/// What a sound log rebuilt into.
struct verify_counts {
  std::uint64_t events = 0;
  std::uint64_t users = 0;
  std::uint64_t providers = 0;
  std::uint64_t campaigns = 0;
  std::uint64_t jobs = 0;
  /// Indexed by job_status (none is always 0: a job stream starts with its submission).
  std::array<std::uint64_t, 8> jobs_by_status{};
  std::uint64_t payouts = 0;
  std::uint64_t payouts_requested = 0;  ///< still open
  std::uint64_t payouts_settled = 0;
  std::uint64_t payouts_failed = 0;
  std::uint64_t ledger_transfers = 0;
  std::uint64_t ledger_groups = 0;
  std::uint64_t ledger_accounts = 0;
  /// Jobs' bills whose ledger group the log does not hold (yet): `serve` settles them at start.
  std::uint64_t job_bills_unsettled = 0;
  /// Free jobs' ends whose usage the user's stream does not hold (yet): `serve` records it at start.
  std::uint64_t free_usage_unrecorded = 0;

  bool operator==(const verify_counts&) const = default;
};

/// Folds a log into every aggregate, checking the invariants above. Feed it every event of the log
/// in global order, then call finish. After the first violation it stops: every later call
/// returns that violation again.
class domain_verifier {
 public:
  using result = expected<void, verify_violation>;

  /// Checks and applies `event`, found at `version` of `stream` and global `position`.
  [[nodiscard]] result apply(std::string_view stream, std::uint64_t version,
                             std::uint64_t position, const events::event& event);

  /// The checks at the end of the log (see the top of this file); the counts, or the first
  /// violation.
  [[nodiscard]] expected<verify_counts, verify_violation> finish();

  /// A rebuilt state, by the type of its aggregate; monostate for a stream never applied, or a
  /// job reduced to its status since it ended.
  using state_view = std::variant<std::monostate, const user_state*, const provider::state*,
                                  const job_state*, const campaign_state*, const payout::state*,
                                  const ledger::state*>;

  /// The state of `stream` as rebuilt so far: right after apply, the state at that version.
  /// Valid until the next apply.
  [[nodiscard]] state_view state_of(std::string_view stream) const;

  /// The last version of `stream` applied; 0 for a stream never seen.
  [[nodiscard]] std::uint64_t version_of(std::string_view stream) const;

 private:
  template <class State>
  struct tracked {
    State state{};
    std::uint64_t version = 0;
    std::uint64_t position = 0;
  };
  /// What is left of a job once it ended.
  struct ended_job {
    job_status status = job_status::none;
    std::uint64_t version = 0;
    std::uint64_t position = 0;
  };
  template <class State>
  using streams = std::map<std::string, tracked<State>, std::less<>>;

  struct where {
    std::string_view stream;
    std::uint64_t version;
    std::uint64_t position;
  };

  [[nodiscard]] result check_order(std::uint64_t last_version, const where& at);
  [[nodiscard]] result route(const stream_name& name, const where& at, const events::event& event);
  [[nodiscard]] result apply_user(const where& at, const events::event& event);
  [[nodiscard]] result apply_provider(const where& at, const events::event& event);
  [[nodiscard]] result apply_job(const where& at, const events::event& event);
  [[nodiscard]] result apply_campaign(const where& at, const events::event& event);
  [[nodiscard]] result apply_payout(const where& at, const events::event& event);
  [[nodiscard]] result apply_transfer(const where& at, const events::transfer_recorded& recorded);
  [[nodiscard]] result note_bill(const where& at, const job_state& job, const events::event& event);
  /// What is wrong with a bill's ad spend `t` (none for another kind): it must pay, at its price,
  /// for an impression of this job that its campaign recorded.
  [[nodiscard]] std::string ad_spend_problem(const job_state& job, const events::billed_transfer& t) const;
  [[nodiscard]] result match_bill(const where& at, const events::transfer_recorded& recorded);
  [[nodiscard]] result close_bill(const std::string& group_id);
  [[nodiscard]] result note_free_usage(const where& at, const job_state& job, const events::event& event);
  [[nodiscard]] result match_free_usage(const where& at, const events::free_tokens_used& used);
  [[nodiscard]] result end_ledger_group();
  [[nodiscard]] result finish_checks();
  [[nodiscard]] result check_campaign_spend_in_ledger() const;
  void release_ended_job();
  [[nodiscard]] result fail(invariant broken, const where& at, std::string message);

  streams<user_state> users_;
  streams<provider::state> providers_;
  streams<job_state> jobs_;
  std::map<std::string, ended_job, std::less<>> ended_jobs_;
  std::string job_to_release_;  ///< a job that ended at the last apply, reduced at the next one
  streams<campaign_state> campaigns_;
  streams<payout::state> payouts_;
  /// A job's bill whose group the ledger has not applied (yet), or is applying: closed when the
  /// group ends.
  struct open_bill {
    std::map<std::string, events::billed_transfer, std::less<>> left;  ///< by transfer id
    bool partly_applied = false;
  };
  std::map<std::string, open_bill, std::less<>> open_bills_;  ///< by group id
  /// A free job's end whose usage its user's stream does not hold yet.
  struct open_usage {
    std::string user_id;
    std::uint32_t tokens = 0;
  };
  std::map<std::string, open_usage, std::less<>> open_usage_;  ///< by job id
  ledger_verifier ledger_;              ///< the ledger's own checks, state and history
  std::uint64_t ledger_version_ = 0;   ///< of the last transfer applied
  std::uint64_t ledger_position_ = 0;
  std::uint64_t last_position_ = 0;
  std::uint64_t events_ = 0;
  bool failed_ = false;
  verify_violation violation_;
};

}  // namespace gpustream::domain
