#include "events/codec.hpp"

#include <capnp/message.h>
#include <capnp/serialize.h>
#include <kj/exception.h>
#include <kj/io.h>

#include <array>
#include <cstring>
#include <type_traits>
#include <utility>

#include "base/ensure.hpp"
#include "events/capnp_values.hpp"
#include "events/schema/events.capnp.h"

namespace gpustream::events {

namespace {

// ---------------------------------------------------------------------------------------------
// Type numbers of the C++ structs, derived from their position in the `event` variant.

template <class T, class... Ts>
constexpr std::size_t index_in(const std::variant<Ts...>*) noexcept {
  constexpr std::array<bool, sizeof...(Ts)> same = {std::is_same_v<T, Ts>...};
  for (std::size_t i = 0; i < same.size(); ++i) {
    if (same[i]) return i;
  }
  return same.size();
}

template <class T>
constexpr event_type type_number_v =
    static_cast<event_type>(index_in<T>(static_cast<const event*>(nullptr)));

// ---------------------------------------------------------------------------------------------
// Text, Data and digests.

using capnp_values::to_std;
using capnp_values::to_wire;

capnp::Data::Reader to_wire(const sha256_digest& digest) { return {digest.data(), digest.size()}; }

sha256_digest digest_from_wire(capnp::Data::Reader data) {
  // Throws kj::Exception like any other malformed message; decode_payload turns it into an error.
  KJ_REQUIRE(data.size() == sizeof(sha256_digest), "a SHA-256 digest must be 32 bytes", data.size());
  sha256_digest digest{};
  std::memcpy(digest.data(), data.begin(), digest.size());
  return digest;
}

// ---------------------------------------------------------------------------------------------
// Enums: each C++ enum mirrors a capnp enum. `last` is the last enumerant on both sides, checked at
// compile time, so that an enumerant appended to only one side breaks the build.

template <class E>
struct enum_mirror;

#define GPUSTREAM_ENUM_MIRROR(cpp_enum, wire_enum, cpp_last, wire_last)              \
  template <>                                                                       \
  struct enum_mirror<cpp_enum> {                                                    \
    using wire = schema::wire_enum;                                                 \
    static constexpr cpp_enum last = cpp_enum::cpp_last;                            \
  };                                                                                \
  static_assert(static_cast<unsigned>(schema::wire_enum::wire_last) ==              \
                    static_cast<unsigned>(cpp_enum::cpp_last),                      \
                #cpp_enum " and schema::" #wire_enum " must have the same enumerants")

GPUSTREAM_ENUM_MIRROR(user_tier, UserTier, premium, PREMIUM);
GPUSTREAM_ENUM_MIRROR(backend_kind, BackendKind, builtin, BUILTIN);
GPUSTREAM_ENUM_MIRROR(disconnect_reason, DisconnectReason, protocol_error, PROTOCOL_ERROR);
GPUSTREAM_ENUM_MIRROR(provider_level, ProviderLevel, master, MASTER);
GPUSTREAM_ENUM_MIRROR(achievement_kind, AchievementKind, hour_of_uptime, HOUR_OF_UPTIME);
GPUSTREAM_ENUM_MIRROR(quality_tier, QualityTier, ultra, ULTRA);
GPUSTREAM_ENUM_MIRROR(reassign_reason, ReassignReason, provider_declined, PROVIDER_DECLINED);
GPUSTREAM_ENUM_MIRROR(failure_reason, FailureReason, quota_exceeded, QUOTA_EXCEEDED);
GPUSTREAM_ENUM_MIRROR(cancelled_by, CancelledBy, platform, PLATFORM);
GPUSTREAM_ENUM_MIRROR(transfer_kind, TransferKind, payout, PAYOUT);
GPUSTREAM_ENUM_MIRROR(suspicion_kind, SuspicionKind, token_count_mismatch, TOKEN_COUNT_MISMATCH);

#undef GPUSTREAM_ENUM_MIRROR

template <class E>
typename enum_mirror<E>::wire to_wire(E value) {
  return static_cast<typename enum_mirror<E>::wire>(static_cast<std::uint16_t>(value));
}

/// An enumerant this build does not know (appended by a newer gpustream) makes the payload
/// undecodable rather than turning into a value no switch handles.
template <class E>
E from_wire(typename enum_mirror<E>::wire value) {
  const auto raw = static_cast<std::uint16_t>(value);
  KJ_REQUIRE(raw <= static_cast<std::uint16_t>(enum_mirror<E>::last),
             "unknown enumerant, probably written by a newer gpustream", raw);
  return static_cast<E>(raw);
}

// ---------------------------------------------------------------------------------------------
// Nested value structs.

void write(schema::GpuInfo::Builder b, const gpu_info& v) { capnp_values::write_gpu_info(b, v); }
gpu_info read(schema::GpuInfo::Reader r) { return capnp_values::read_gpu_info(r); }
void write(schema::ModelOffer::Builder b, const model_offer& v) { capnp_values::write_model_offer(b, v); }
model_offer read(schema::ModelOffer::Reader r) { return capnp_values::read_model_offer(r); }

void write(schema::SuspicionCounters::Builder b, const suspicion_counters& v) {
  b.setUnreasonablyFastJobs(v.unreasonably_fast_jobs);
  b.setAbortedJobs(v.aborted_jobs);
  b.setTokenCountMismatches(v.token_count_mismatches);
}

suspicion_counters read(schema::SuspicionCounters::Reader r) {
  return {.unreasonably_fast_jobs = r.getUnreasonablyFastJobs(),
          .aborted_jobs = r.getAbortedJobs(),
          .token_count_mismatches = r.getTokenCountMismatches()};
}

void write(schema::BilledTransfer::Builder b, const billed_transfer& v) {
  b.setTransferId(to_wire(v.transfer_id));
  b.setDebitAccount(to_wire(v.debit_account));
  b.setCreditAccount(to_wire(v.credit_account));
  b.setAmountMicros(v.amount_micros);
  b.setKind(to_wire(v.kind));
  b.setReference(to_wire(v.reference));
}

billed_transfer read(schema::BilledTransfer::Reader r) {
  return {.transfer_id = to_std(r.getTransferId()),
          .debit_account = to_std(r.getDebitAccount()),
          .credit_account = to_std(r.getCreditAccount()),
          .amount_micros = r.getAmountMicros(),
          .kind = from_wire<transfer_kind>(r.getKind()),
          .reference = to_std(r.getReference())};
}

// ---------------------------------------------------------------------------------------------
// Lists (after the element overloads of write/read, which the templates must see).

template <class T, class ListBuilder>
void write_list(ListBuilder list, const std::vector<T>& values) {
  for (unsigned i = 0; i < values.size(); ++i) write(list[i], values[i]);
}

template <class T, class ListReader>
std::vector<T> read_list(ListReader list) {
  std::vector<T> values;
  values.reserve(list.size());
  for (auto element : list) values.push_back(read(element));
  return values;
}

unsigned list_size(std::size_t size) {
  GPUSTREAM_ENSURE(size < (std::size_t{1} << 29));  // capnp's limit on list elements
  return static_cast<unsigned>(size);
}

void write_texts(capnp::List<capnp::Text>::Builder list, const std::vector<std::string>& values) {
  for (unsigned i = 0; i < values.size(); ++i) list.set(i, to_wire(values[i]));
}

std::vector<std::string> read_texts(capnp::List<capnp::Text>::Reader list) {
  std::vector<std::string> values;
  values.reserve(list.size());
  for (auto text : list) values.push_back(to_std(text));
  return values;
}

// ---------------------------------------------------------------------------------------------
// Users and API keys.

void write(schema::UserCreated::Builder b, const user_created& e) {
  b.setUserId(to_wire(e.user_id));
  b.setDisplayName(to_wire(e.display_name));
  b.setTier(to_wire(e.tier));
  b.setCreatedAtUs(e.created_at_us);
}

user_created read(schema::UserCreated::Reader r) {
  return {.user_id = to_std(r.getUserId()),
          .display_name = to_std(r.getDisplayName()),
          .tier = from_wire<user_tier>(r.getTier()),
          .created_at_us = r.getCreatedAtUs()};
}

void write(schema::ApiKeyIssued::Builder b, const api_key_issued& e) {
  b.setUserId(to_wire(e.user_id));
  b.setKeyId(to_wire(e.key_id));
  b.setKeyHash(to_wire(e.key_hash));
  b.setLabel(to_wire(e.label));
  b.setIssuedAtUs(e.issued_at_us);
}

api_key_issued read(schema::ApiKeyIssued::Reader r) {
  return {.user_id = to_std(r.getUserId()),
          .key_id = to_std(r.getKeyId()),
          .key_hash = digest_from_wire(r.getKeyHash()),
          .label = to_std(r.getLabel()),
          .issued_at_us = r.getIssuedAtUs()};
}

void write(schema::ApiKeyRevoked::Builder b, const api_key_revoked& e) {
  b.setUserId(to_wire(e.user_id));
  b.setKeyId(to_wire(e.key_id));
  b.setReason(to_wire(e.reason));
  b.setRevokedAtUs(e.revoked_at_us);
}

api_key_revoked read(schema::ApiKeyRevoked::Reader r) {
  return {.user_id = to_std(r.getUserId()),
          .key_id = to_std(r.getKeyId()),
          .reason = to_std(r.getReason()),
          .revoked_at_us = r.getRevokedAtUs()};
}

void write(schema::UserTierChanged::Builder b, const user_tier_changed& e) {
  b.setUserId(to_wire(e.user_id));
  b.setTier(to_wire(e.tier));
  b.setChangedAtUs(e.changed_at_us);
}

user_tier_changed read(schema::UserTierChanged::Reader r) {
  return {.user_id = to_std(r.getUserId()),
          .tier = from_wire<user_tier>(r.getTier()),
          .changed_at_us = r.getChangedAtUs()};
}

void write(schema::UserCredited::Builder b, const user_credited& e) {
  b.setUserId(to_wire(e.user_id));
  b.setDepositId(to_wire(e.deposit_id));
  b.setAmountMicros(e.amount_micros);
  b.setCreditedAtUs(e.credited_at_us);
}

user_credited read(schema::UserCredited::Reader r) {
  return {.user_id = to_std(r.getUserId()),
          .deposit_id = to_std(r.getDepositId()),
          .amount_micros = r.getAmountMicros(),
          .credited_at_us = r.getCreditedAtUs()};
}

// ---------------------------------------------------------------------------------------------
// Providers.

void write(schema::ProviderCreated::Builder b, const provider_created& e) {
  b.setProviderId(to_wire(e.provider_id));
  b.setOwnerUserId(to_wire(e.owner_user_id));
  b.setName(to_wire(e.name));
  b.setTokenHash(to_wire(e.token_hash));
  b.setCreatedAtUs(e.created_at_us);
}

provider_created read(schema::ProviderCreated::Reader r) {
  return {.provider_id = to_std(r.getProviderId()),
          .owner_user_id = to_std(r.getOwnerUserId()),
          .name = to_std(r.getName()),
          .token_hash = digest_from_wire(r.getTokenHash()),
          .created_at_us = r.getCreatedAtUs()};
}

void write(schema::ProviderTokenReplaced::Builder b, const provider_token_replaced& e) {
  b.setProviderId(to_wire(e.provider_id));
  b.setTokenHash(to_wire(e.token_hash));
  b.setReplacedAtUs(e.replaced_at_us);
}

provider_token_replaced read(schema::ProviderTokenReplaced::Reader r) {
  return {.provider_id = to_std(r.getProviderId()),
          .token_hash = digest_from_wire(r.getTokenHash()),
          .replaced_at_us = r.getReplacedAtUs()};
}

void write(schema::ProviderConnected::Builder b, const provider_connected& e) {
  b.setProviderId(to_wire(e.provider_id));
  write_list(b.initGpus(list_size(e.gpus.size())), e.gpus);
  b.setBackend(to_wire(e.backend));
  b.setBackendUrl(to_wire(e.backend_url));
  b.setAgentVersion(to_wire(e.agent_version));
  b.setConnectedAtUs(e.connected_at_us);
}

provider_connected read(schema::ProviderConnected::Reader r) {
  return {.provider_id = to_std(r.getProviderId()),
          .gpus = read_list<gpu_info>(r.getGpus()),
          .backend = from_wire<backend_kind>(r.getBackend()),
          .backend_url = to_std(r.getBackendUrl()),
          .agent_version = to_std(r.getAgentVersion()),
          .connected_at_us = r.getConnectedAtUs()};
}

void write(schema::ModelsAdvertised::Builder b, const models_advertised& e) {
  b.setProviderId(to_wire(e.provider_id));
  write_list(b.initModels(list_size(e.models.size())), e.models);
  b.setAdvertisedAtUs(e.advertised_at_us);
}

models_advertised read(schema::ModelsAdvertised::Reader r) {
  return {.provider_id = to_std(r.getProviderId()),
          .models = read_list<model_offer>(r.getModels()),
          .advertised_at_us = r.getAdvertisedAtUs()};
}

void write(schema::ProviderDisconnected::Builder b, const provider_disconnected& e) {
  b.setProviderId(to_wire(e.provider_id));
  b.setReason(to_wire(e.reason));
  b.setDetail(to_wire(e.detail));
  b.setDisconnectedAtUs(e.disconnected_at_us);
}

provider_disconnected read(schema::ProviderDisconnected::Reader r) {
  return {.provider_id = to_std(r.getProviderId()),
          .reason = from_wire<disconnect_reason>(r.getReason()),
          .detail = to_std(r.getDetail()),
          .disconnected_at_us = r.getDisconnectedAtUs()};
}

void write(schema::ProviderSuspended::Builder b, const provider_suspended& e) {
  b.setProviderId(to_wire(e.provider_id));
  b.setReason(to_wire(e.reason));
  write(b.initCounters(), e.counters);
  b.setSuspendedAtUs(e.suspended_at_us);
  b.setSuspendedUntilAtUs(e.suspended_until_at_us);
}

provider_suspended read(schema::ProviderSuspended::Reader r) {
  return {.provider_id = to_std(r.getProviderId()),
          .reason = to_std(r.getReason()),
          .counters = read(r.getCounters()),
          .suspended_at_us = r.getSuspendedAtUs(),
          .suspended_until_at_us = r.getSuspendedUntilAtUs()};
}

void write(schema::ProviderScored::Builder b, const provider_scored& e) {
  b.setProviderId(to_wire(e.provider_id));
  b.setJobId(to_wire(e.job_id));
  b.setSpeedPoints(e.speed_points);
  b.setComplexityPoints(e.complexity_points);
  b.setSuccessPoints(e.success_points);
  b.setTotalScore(e.total_score);
  b.setLevel(to_wire(e.level));
  b.setScoredAtUs(e.scored_at_us);
}

provider_scored read(schema::ProviderScored::Reader r) {
  return {.provider_id = to_std(r.getProviderId()),
          .job_id = to_std(r.getJobId()),
          .speed_points = r.getSpeedPoints(),
          .complexity_points = r.getComplexityPoints(),
          .success_points = r.getSuccessPoints(),
          .total_score = r.getTotalScore(),
          .level = from_wire<provider_level>(r.getLevel()),
          .scored_at_us = r.getScoredAtUs()};
}

void write(schema::AchievementUnlocked::Builder b, const achievement_unlocked& e) {
  b.setProviderId(to_wire(e.provider_id));
  b.setAchievement(to_wire(e.achievement));
  b.setUnlockedAtUs(e.unlocked_at_us);
}

achievement_unlocked read(schema::AchievementUnlocked::Reader r) {
  return {.provider_id = to_std(r.getProviderId()),
          .achievement = from_wire<achievement_kind>(r.getAchievement()),
          .unlocked_at_us = r.getUnlockedAtUs()};
}

// ---------------------------------------------------------------------------------------------
// Jobs.

void write(schema::JobSubmitted::Builder b, const job_submitted& e) {
  b.setJobId(to_wire(e.job_id));
  b.setUserId(to_wire(e.user_id));
  b.setModel(to_wire(e.model));
  b.setQuality(to_wire(e.quality));
  b.setPromptTokens(e.prompt_tokens);
  b.setMaxTokens(e.max_tokens);
  b.setMaxPriceMicros(e.max_price_micros);
  b.setPremium(e.premium);
  b.setConversationId(to_wire(e.conversation_id));
  b.setSubmittedAtUs(e.submitted_at_us);
}

job_submitted read(schema::JobSubmitted::Reader r) {
  return {.job_id = to_std(r.getJobId()),
          .user_id = to_std(r.getUserId()),
          .model = to_std(r.getModel()),
          .quality = from_wire<quality_tier>(r.getQuality()),
          .prompt_tokens = r.getPromptTokens(),
          .max_tokens = r.getMaxTokens(),
          .max_price_micros = r.getMaxPriceMicros(),
          .premium = r.getPremium(),
          .conversation_id = to_std(r.getConversationId()),
          .submitted_at_us = r.getSubmittedAtUs()};
}

void write(schema::JobQueued::Builder b, const job_queued& e) {
  b.setJobId(to_wire(e.job_id));
  b.setPriority(e.priority);
  b.setDeadlineAtUs(e.deadline_at_us);
  b.setQueuedAtUs(e.queued_at_us);
}

job_queued read(schema::JobQueued::Reader r) {
  return {.job_id = to_std(r.getJobId()),
          .priority = r.getPriority(),
          .deadline_at_us = r.getDeadlineAtUs(),
          .queued_at_us = r.getQueuedAtUs()};
}

void write(schema::JobAssigned::Builder b, const job_assigned& e) {
  b.setJobId(to_wire(e.job_id));
  b.setProviderId(to_wire(e.provider_id));
  b.setAttempt(e.attempt);
  b.setAssignedAtUs(e.assigned_at_us);
}

job_assigned read(schema::JobAssigned::Reader r) {
  return {.job_id = to_std(r.getJobId()),
          .provider_id = to_std(r.getProviderId()),
          .attempt = r.getAttempt(),
          .assigned_at_us = r.getAssignedAtUs()};
}

void write(schema::JobStarted::Builder b, const job_started& e) {
  b.setJobId(to_wire(e.job_id));
  b.setProviderId(to_wire(e.provider_id));
  b.setFirstTokenAtUs(e.first_token_at_us);
}

job_started read(schema::JobStarted::Reader r) {
  return {.job_id = to_std(r.getJobId()),
          .provider_id = to_std(r.getProviderId()),
          .first_token_at_us = r.getFirstTokenAtUs()};
}

void write(schema::JobReassigned::Builder b, const job_reassigned& e) {
  b.setJobId(to_wire(e.job_id));
  b.setFromProviderId(to_wire(e.from_provider_id));
  b.setReason(to_wire(e.reason));
  b.setTokensSoFar(e.tokens_so_far);
  b.setReassignedAtUs(e.reassigned_at_us);
}

job_reassigned read(schema::JobReassigned::Reader r) {
  return {.job_id = to_std(r.getJobId()),
          .from_provider_id = to_std(r.getFromProviderId()),
          .reason = from_wire<reassign_reason>(r.getReason()),
          .tokens_so_far = r.getTokensSoFar(),
          .reassigned_at_us = r.getReassignedAtUs()};
}

/// A job end's bill: left out when nothing is owed, so an end without one has the shape it had
/// before bills were recorded.
template <class Builder>
void write_bill(Builder b, const ledger_bill& bill) {
  if (bill == ledger_bill{}) return;
  auto written = b.initBill();
  written.setGroupId(to_wire(bill.group_id));
  write_list(written.initTransfers(list_size(bill.transfers.size())), bill.transfers);
}

template <class Reader>
ledger_bill read_bill(Reader r) {
  if (!r.hasBill()) return {};
  return {.group_id = to_std(r.getBill().getGroupId()),
          .transfers = read_list<billed_transfer>(r.getBill().getTransfers())};
}

void write(schema::JobCompleted::Builder b, const job_completed& e) {
  b.setJobId(to_wire(e.job_id));
  b.setProviderId(to_wire(e.provider_id));
  b.setPromptTokens(e.prompt_tokens);
  b.setCompletionTokens(e.completion_tokens);
  b.setProviderReportedTokens(e.provider_reported_tokens);
  b.setTimeToFirstTokenUs(e.time_to_first_token_us);
  b.setTotalUs(e.total_us);
  b.setCompletedAtUs(e.completed_at_us);
  write_bill(b, e.bill);
  b.setFreeTokens(e.free_tokens);
  b.setPromptTokensBilled(e.prompt_tokens_billed);
}

job_completed read(schema::JobCompleted::Reader r) {
  return {.job_id = to_std(r.getJobId()),
          .provider_id = to_std(r.getProviderId()),
          .prompt_tokens = r.getPromptTokens(),
          .completion_tokens = r.getCompletionTokens(),
          .provider_reported_tokens = r.getProviderReportedTokens(),
          .time_to_first_token_us = r.getTimeToFirstTokenUs(),
          .total_us = r.getTotalUs(),
          .completed_at_us = r.getCompletedAtUs(),
          .bill = read_bill(r),
          .free_tokens = r.getFreeTokens(),
          .prompt_tokens_billed = r.getPromptTokensBilled()};
}

void write(schema::JobFailed::Builder b, const job_failed& e) {
  b.setJobId(to_wire(e.job_id));
  b.setReason(to_wire(e.reason));
  b.setMessage(to_wire(e.message));
  b.setFailedAtUs(e.failed_at_us);
}

job_failed read(schema::JobFailed::Reader r) {
  return {.job_id = to_std(r.getJobId()),
          .reason = from_wire<failure_reason>(r.getReason()),
          .message = to_std(r.getMessage()),
          .failed_at_us = r.getFailedAtUs()};
}

void write(schema::JobCancelled::Builder b, const job_cancelled& e) {
  b.setJobId(to_wire(e.job_id));
  b.setBy(to_wire(e.by));
  b.setTokensProduced(e.tokens_produced);
  b.setCancelledAtUs(e.cancelled_at_us);
  write_bill(b, e.bill);
  b.setFreeTokens(e.free_tokens);
}

job_cancelled read(schema::JobCancelled::Reader r) {
  return {.job_id = to_std(r.getJobId()),
          .by = from_wire<cancelled_by>(r.getBy()),
          .tokens_produced = r.getTokensProduced(),
          .cancelled_at_us = r.getCancelledAtUs(),
          .bill = read_bill(r),
          .free_tokens = r.getFreeTokens()};
}

// ---------------------------------------------------------------------------------------------
// Campaigns.

void write(schema::CampaignCreated::Builder b, const campaign_created& e) {
  b.setCampaignId(to_wire(e.campaign_id));
  b.setAdvertiser(to_wire(e.advertiser));
  b.setTitle(to_wire(e.title));
  b.setText(to_wire(e.text));
  b.setUrl(to_wire(e.url));
  write_texts(b.initKeywords(list_size(e.keywords.size())), e.keywords);
  write_texts(b.initCategories(list_size(e.categories.size())), e.categories);
  b.setCpmBidMicros(e.cpm_bid_micros);
  b.setBudgetMicros(e.budget_micros);
  b.setDailyBudgetMicros(e.daily_budget_micros);
  b.setFrequencyCapPerDay(e.frequency_cap_per_day);
  b.setCreatedAtUs(e.created_at_us);
}

campaign_created read(schema::CampaignCreated::Reader r) {
  return {.campaign_id = to_std(r.getCampaignId()),
          .advertiser = to_std(r.getAdvertiser()),
          .title = to_std(r.getTitle()),
          .text = to_std(r.getText()),
          .url = to_std(r.getUrl()),
          .keywords = read_texts(r.getKeywords()),
          .categories = read_texts(r.getCategories()),
          .cpm_bid_micros = r.getCpmBidMicros(),
          .budget_micros = r.getBudgetMicros(),
          .daily_budget_micros = r.getDailyBudgetMicros(),
          .frequency_cap_per_day = r.getFrequencyCapPerDay(),
          .created_at_us = r.getCreatedAtUs()};
}

void write(schema::CampaignFunded::Builder b, const campaign_funded& e) {
  b.setCampaignId(to_wire(e.campaign_id));
  b.setAmountMicros(e.amount_micros);
  b.setFundedAtUs(e.funded_at_us);
}

campaign_funded read(schema::CampaignFunded::Reader r) {
  return {.campaign_id = to_std(r.getCampaignId()),
          .amount_micros = r.getAmountMicros(),
          .funded_at_us = r.getFundedAtUs()};
}

void write(schema::CampaignPaused::Builder b, const campaign_paused& e) {
  b.setCampaignId(to_wire(e.campaign_id));
  b.setReason(to_wire(e.reason));
  b.setPausedAtUs(e.paused_at_us);
}

campaign_paused read(schema::CampaignPaused::Reader r) {
  return {.campaign_id = to_std(r.getCampaignId()),
          .reason = to_std(r.getReason()),
          .paused_at_us = r.getPausedAtUs()};
}

void write(schema::CampaignResumed::Builder b, const campaign_resumed& e) {
  b.setCampaignId(to_wire(e.campaign_id));
  b.setResumedAtUs(e.resumed_at_us);
}

campaign_resumed read(schema::CampaignResumed::Reader r) {
  return {.campaign_id = to_std(r.getCampaignId()), .resumed_at_us = r.getResumedAtUs()};
}

void write(schema::CampaignExhausted::Builder b, const campaign_exhausted& e) {
  b.setCampaignId(to_wire(e.campaign_id));
  b.setSpentMicros(e.spent_micros);
  b.setExhaustedAtUs(e.exhausted_at_us);
}

campaign_exhausted read(schema::CampaignExhausted::Reader r) {
  return {.campaign_id = to_std(r.getCampaignId()),
          .spent_micros = r.getSpentMicros(),
          .exhausted_at_us = r.getExhaustedAtUs()};
}

void write(schema::ImpressionRecorded::Builder b, const impression_recorded& e) {
  b.setImpressionId(to_wire(e.impression_id));
  b.setCampaignId(to_wire(e.campaign_id));
  b.setJobId(to_wire(e.job_id));
  b.setUserId(to_wire(e.user_id));
  b.setPriceMicros(e.price_micros);
  b.setRecordedAtUs(e.recorded_at_us);
}

impression_recorded read(schema::ImpressionRecorded::Reader r) {
  return {.impression_id = to_std(r.getImpressionId()),
          .campaign_id = to_std(r.getCampaignId()),
          .job_id = to_std(r.getJobId()),
          .user_id = to_std(r.getUserId()),
          .price_micros = r.getPriceMicros(),
          .recorded_at_us = r.getRecordedAtUs()};
}

void write(schema::AdClicked::Builder b, const ad_clicked& e) {
  b.setImpressionId(to_wire(e.impression_id));
  b.setCampaignId(to_wire(e.campaign_id));
  b.setClickedAtUs(e.clicked_at_us);
}

ad_clicked read(schema::AdClicked::Reader r) {
  return {.impression_id = to_std(r.getImpressionId()),
          .campaign_id = to_std(r.getCampaignId()),
          .clicked_at_us = r.getClickedAtUs()};
}

// ---------------------------------------------------------------------------------------------
// Ledger.

void write(schema::TransferRecorded::Builder b, const transfer_recorded& e) {
  b.setTransferId(to_wire(e.transfer_id));
  b.setDebitAccount(to_wire(e.debit_account));
  b.setCreditAccount(to_wire(e.credit_account));
  b.setAmountMicros(e.amount_micros);
  b.setKind(to_wire(e.kind));
  b.setReference(to_wire(e.reference));
  b.setLinkedGroupId(to_wire(e.linked_group_id));
  b.setRecordedAtUs(e.recorded_at_us);
}

transfer_recorded read(schema::TransferRecorded::Reader r) {
  return {.transfer_id = to_std(r.getTransferId()),
          .debit_account = to_std(r.getDebitAccount()),
          .credit_account = to_std(r.getCreditAccount()),
          .amount_micros = r.getAmountMicros(),
          .kind = from_wire<transfer_kind>(r.getKind()),
          .reference = to_std(r.getReference()),
          .linked_group_id = to_std(r.getLinkedGroupId()),
          .recorded_at_us = r.getRecordedAtUs()};
}

// ---------------------------------------------------------------------------------------------
// Payouts.

void write(schema::PayoutRequested::Builder b, const payout_requested& e) {
  b.setPayoutId(to_wire(e.payout_id));
  b.setProviderId(to_wire(e.provider_id));
  b.setAmountMicros(e.amount_micros);
  b.setAutomatic(e.automatic);
  b.setRequestedAtUs(e.requested_at_us);
}

payout_requested read(schema::PayoutRequested::Reader r) {
  return {.payout_id = to_std(r.getPayoutId()),
          .provider_id = to_std(r.getProviderId()),
          .amount_micros = r.getAmountMicros(),
          .automatic = r.getAutomatic(),
          .requested_at_us = r.getRequestedAtUs()};
}

void write(schema::PayoutSettled::Builder b, const payout_settled& e) {
  b.setPayoutId(to_wire(e.payout_id));
  b.setExternalReference(to_wire(e.external_reference));
  b.setSettledAtUs(e.settled_at_us);
}

payout_settled read(schema::PayoutSettled::Reader r) {
  return {.payout_id = to_std(r.getPayoutId()),
          .external_reference = to_std(r.getExternalReference()),
          .settled_at_us = r.getSettledAtUs()};
}

void write(schema::PayoutFailed::Builder b, const payout_failed& e) {
  b.setPayoutId(to_wire(e.payout_id));
  b.setReason(to_wire(e.reason));
  b.setFailedAtUs(e.failed_at_us);
}

payout_failed read(schema::PayoutFailed::Reader r) {
  return {.payout_id = to_std(r.getPayoutId()),
          .reason = to_std(r.getReason()),
          .failed_at_us = r.getFailedAtUs()};
}

// ---------------------------------------------------------------------------------------------
// Appended later (type numbers 31 and up).

void write(schema::AdReserved::Builder b, const ad_reserved& e) {
  b.setReservationId(to_wire(e.reservation_id));
  b.setCampaignId(to_wire(e.campaign_id));
  b.setJobId(to_wire(e.job_id));
  b.setUserId(to_wire(e.user_id));
  b.setPriceMicros(e.price_micros);
  b.setReservedAtUs(e.reserved_at_us);
  b.setExpiresAtUs(e.expires_at_us);
}

ad_reserved read(schema::AdReserved::Reader r) {
  return {.reservation_id = to_std(r.getReservationId()),
          .campaign_id = to_std(r.getCampaignId()),
          .job_id = to_std(r.getJobId()),
          .user_id = to_std(r.getUserId()),
          .price_micros = r.getPriceMicros(),
          .reserved_at_us = r.getReservedAtUs(),
          .expires_at_us = r.getExpiresAtUs()};
}

void write(schema::AdReservationReleased::Builder b, const ad_reservation_released& e) {
  b.setReservationId(to_wire(e.reservation_id));
  b.setCampaignId(to_wire(e.campaign_id));
  b.setReason(to_wire(e.reason));
  b.setReleasedAtUs(e.released_at_us);
}

ad_reservation_released read(schema::AdReservationReleased::Reader r) {
  return {.reservation_id = to_std(r.getReservationId()),
          .campaign_id = to_std(r.getCampaignId()),
          .reason = to_std(r.getReason()),
          .released_at_us = r.getReleasedAtUs()};
}

void write(schema::ImpressionVoided::Builder b, const impression_voided& e) {
  b.setImpressionId(to_wire(e.impression_id));
  b.setCampaignId(to_wire(e.campaign_id));
  b.setReason(to_wire(e.reason));
  b.setVoidedAtUs(e.voided_at_us);
}

impression_voided read(schema::ImpressionVoided::Reader r) {
  return {.impression_id = to_std(r.getImpressionId()),
          .campaign_id = to_std(r.getCampaignId()),
          .reason = to_std(r.getReason()),
          .voided_at_us = r.getVoidedAtUs()};
}

void write(schema::SuspicionRecorded::Builder b, const suspicion_recorded& e) {
  b.setProviderId(to_wire(e.provider_id));
  b.setJobId(to_wire(e.job_id));
  b.setKind(to_wire(e.kind));
  write(b.initCounters(), e.counters);
  b.setRecordedAtUs(e.recorded_at_us);
}

suspicion_recorded read(schema::SuspicionRecorded::Reader r) {
  return {.provider_id = to_std(r.getProviderId()),
          .job_id = to_std(r.getJobId()),
          .kind = from_wire<suspicion_kind>(r.getKind()),
          .counters = read(r.getCounters()),
          .recorded_at_us = r.getRecordedAtUs()};
}

void write(schema::FreeTokensUsed::Builder b, const free_tokens_used& e) {
  b.setUserId(to_wire(e.user_id));
  b.setJobId(to_wire(e.job_id));
  b.setTokens(e.tokens);
  b.setUsedAtUs(e.used_at_us);
}

free_tokens_used read(schema::FreeTokensUsed::Reader r) {
  return {.user_id = to_std(r.getUserId()),
          .job_id = to_std(r.getJobId()),
          .tokens = r.getTokens(),
          .used_at_us = r.getUsedAtUs()};
}

// ---------------------------------------------------------------------------------------------
// The union: which member of `Event` holds each C++ struct. The static_assert is the compile-time
// proof that the variant's order is the union's ordinal order.

template <class T>
struct union_member;

#define GPUSTREAM_UNION_MEMBER(cpp_type, Member, WHICH)                                 \
  template <>                                                                          \
  struct union_member<cpp_type> {                                                      \
    static auto init(schema::Event::Builder b) { return b.init##Member(); }            \
    static auto get(schema::Event::Reader r) { return r.get##Member(); }               \
  };                                                                                   \
  static_assert(static_cast<event_type>(schema::Event::WHICH) == type_number_v<cpp_type>, \
                #cpp_type " must sit at its union ordinal in the event variant")

GPUSTREAM_UNION_MEMBER(user_created, UserCreated, USER_CREATED);
GPUSTREAM_UNION_MEMBER(api_key_issued, ApiKeyIssued, API_KEY_ISSUED);
GPUSTREAM_UNION_MEMBER(api_key_revoked, ApiKeyRevoked, API_KEY_REVOKED);
GPUSTREAM_UNION_MEMBER(user_tier_changed, UserTierChanged, USER_TIER_CHANGED);
GPUSTREAM_UNION_MEMBER(user_credited, UserCredited, USER_CREDITED);
GPUSTREAM_UNION_MEMBER(provider_created, ProviderCreated, PROVIDER_CREATED);
GPUSTREAM_UNION_MEMBER(provider_connected, ProviderConnected, PROVIDER_CONNECTED);
GPUSTREAM_UNION_MEMBER(models_advertised, ModelsAdvertised, MODELS_ADVERTISED);
GPUSTREAM_UNION_MEMBER(provider_disconnected, ProviderDisconnected, PROVIDER_DISCONNECTED);
GPUSTREAM_UNION_MEMBER(provider_suspended, ProviderSuspended, PROVIDER_SUSPENDED);
GPUSTREAM_UNION_MEMBER(provider_scored, ProviderScored, PROVIDER_SCORED);
GPUSTREAM_UNION_MEMBER(achievement_unlocked, AchievementUnlocked, ACHIEVEMENT_UNLOCKED);
GPUSTREAM_UNION_MEMBER(job_submitted, JobSubmitted, JOB_SUBMITTED);
GPUSTREAM_UNION_MEMBER(job_queued, JobQueued, JOB_QUEUED);
GPUSTREAM_UNION_MEMBER(job_assigned, JobAssigned, JOB_ASSIGNED);
GPUSTREAM_UNION_MEMBER(job_started, JobStarted, JOB_STARTED);
GPUSTREAM_UNION_MEMBER(job_reassigned, JobReassigned, JOB_REASSIGNED);
GPUSTREAM_UNION_MEMBER(job_completed, JobCompleted, JOB_COMPLETED);
GPUSTREAM_UNION_MEMBER(job_failed, JobFailed, JOB_FAILED);
GPUSTREAM_UNION_MEMBER(job_cancelled, JobCancelled, JOB_CANCELLED);
GPUSTREAM_UNION_MEMBER(campaign_created, CampaignCreated, CAMPAIGN_CREATED);
GPUSTREAM_UNION_MEMBER(campaign_funded, CampaignFunded, CAMPAIGN_FUNDED);
GPUSTREAM_UNION_MEMBER(campaign_paused, CampaignPaused, CAMPAIGN_PAUSED);
GPUSTREAM_UNION_MEMBER(campaign_resumed, CampaignResumed, CAMPAIGN_RESUMED);
GPUSTREAM_UNION_MEMBER(campaign_exhausted, CampaignExhausted, CAMPAIGN_EXHAUSTED);
GPUSTREAM_UNION_MEMBER(impression_recorded, ImpressionRecorded, IMPRESSION_RECORDED);
GPUSTREAM_UNION_MEMBER(ad_clicked, AdClicked, AD_CLICKED);
GPUSTREAM_UNION_MEMBER(transfer_recorded, TransferRecorded, TRANSFER_RECORDED);
GPUSTREAM_UNION_MEMBER(payout_requested, PayoutRequested, PAYOUT_REQUESTED);
GPUSTREAM_UNION_MEMBER(payout_settled, PayoutSettled, PAYOUT_SETTLED);
GPUSTREAM_UNION_MEMBER(payout_failed, PayoutFailed, PAYOUT_FAILED);
GPUSTREAM_UNION_MEMBER(ad_reserved, AdReserved, AD_RESERVED);
GPUSTREAM_UNION_MEMBER(ad_reservation_released, AdReservationReleased, AD_RESERVATION_RELEASED);
GPUSTREAM_UNION_MEMBER(suspicion_recorded, SuspicionRecorded, SUSPICION_RECORDED);
GPUSTREAM_UNION_MEMBER(free_tokens_used, FreeTokensUsed, FREE_TOKENS_USED);
GPUSTREAM_UNION_MEMBER(impression_voided, ImpressionVoided, IMPRESSION_VOIDED);
GPUSTREAM_UNION_MEMBER(provider_token_replaced, ProviderTokenReplaced, PROVIDER_TOKEN_REPLACED);

#undef GPUSTREAM_UNION_MEMBER

/// Reads the union member of type number I; one entry per type in the dispatch table below.
template <std::size_t I>
event read_member(schema::Event::Reader root) {
  using value_type = std::variant_alternative_t<I, event>;
  return event{std::in_place_index<I>, read(union_member<value_type>::get(root))};
}

using member_reader = event (*)(schema::Event::Reader);

template <std::size_t... I>
constexpr std::array<member_reader, sizeof...(I)> make_member_readers(std::index_sequence<I...>) {
  return {&read_member<I>...};
}

constexpr auto member_readers = make_member_readers(std::make_index_sequence<event_type_count>{});

// ---------------------------------------------------------------------------------------------
// Decoding.

/// First segment of an encode, in words: large enough that typical events fit in one segment.
constexpr unsigned encode_first_segment_words = 128;
/// Unaligned payloads up to this size are copied to the stack rather than the heap, bytes.
constexpr std::size_t unaligned_stack_bytes_max = 1024;

decode_error malformed(event_type type, std::string what) {
  std::string message = "malformed payload of event type ";
  message += std::to_string(type);
  message += " (";
  message += type_name(type);
  message += "): ";
  message += what;
  return {decode_errc::malformed, std::move(message)};
}

expected<event, decode_error> decode_words(event_type type, kj::ArrayPtr<const capnp::word> words) {
  try {
    capnp::ReaderOptions options;
    options.traversalLimitInWords = payload_traversal_words_max;
    capnp::FlatArrayMessageReader reader(words, options);
    if (reader.getEnd() != words.end()) {
      const auto trailing = static_cast<std::size_t>(words.end() - reader.getEnd());
      return unexpected{malformed(type, std::to_string(trailing) + " words after the message")};
    }
    const auto root = reader.getRoot<schema::Event>();
    const auto tag = static_cast<event_type>(root.which());
    if (tag != type) {
      return unexpected{decode_error{
          decode_errc::type_mismatch,
          "the envelope says event type " + std::to_string(type) + " (" +
              std::string(type_name(type)) + ") but the payload holds type " +
              std::to_string(tag) + " (" + std::string(type_name(tag)) + ")"}};
    }
    return member_readers[type](root);
  } catch (const kj::Exception& failure) {
    return unexpected{malformed(type, failure.getDescription().cStr())};
  }
}

}  // namespace

std::string encode_payload(const event& e) {
  capnp::MallocMessageBuilder message(encode_first_segment_words);
  auto root = message.initRoot<schema::Event>();
  std::visit(
      [&root](const auto& value) {
        write(union_member<std::decay_t<decltype(value)>>::init(root), value);
      },
      e);
  std::string bytes(capnp::computeSerializedSizeInWords(message) * sizeof(capnp::word), '\0');
  kj::ArrayOutputStream out(kj::arrayPtr(reinterpret_cast<kj::byte*>(bytes.data()), bytes.size()));
  capnp::writeMessage(out, message);
  GPUSTREAM_ENSURE(out.getArray().size() == bytes.size());
  return bytes;
}

expected<event, decode_error> decode_payload(event_type type, std::span<const std::byte> bytes) {
  if (type >= event_type_count) {
    return unexpected{decode_error{
        decode_errc::unknown_type,
        "event type " + std::to_string(type) + " is unknown to this build, which knows types 0 to " +
            std::to_string(event_type_count - 1) +
            "; it was probably written by a newer gpustream"}};
  }
  if (bytes.empty() || bytes.size() % sizeof(capnp::word) != 0) {
    return unexpected{malformed(type, std::to_string(bytes.size()) +
                                          " bytes are not a whole, non-zero number of 8-byte words")};
  }
  const std::size_t word_count = bytes.size() / sizeof(capnp::word);
  const auto address = reinterpret_cast<std::uintptr_t>(bytes.data());
  if (address % alignof(capnp::word) == 0) {
    return decode_words(type, {reinterpret_cast<const capnp::word*>(bytes.data()), word_count});
  }
  if (bytes.size() <= unaligned_stack_bytes_max) {
    alignas(capnp::word) std::array<std::byte, unaligned_stack_bytes_max> copy;
    std::memcpy(copy.data(), bytes.data(), bytes.size());
    return decode_words(type, {reinterpret_cast<const capnp::word*>(copy.data()), word_count});
  }
  auto copy = kj::heapArray<capnp::word>(word_count);
  std::memcpy(copy.begin(), bytes.data(), bytes.size());
  return decode_words(type, {copy.begin(), copy.size()});
}

}  // namespace gpustream::events
