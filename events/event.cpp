#include "events/event.hpp"

#include <array>

namespace gpustream::events {

namespace {

/// Names in type-number order. The codec checks at compile time that the variant's order matches
/// the capnp union, and tests/events/golden_test checks these names against the union's members.
constexpr std::array<std::string_view, event_type_count> type_names = {
    "user_created",          "api_key_issued",       "api_key_revoked",
    "user_tier_changed",     "user_credited",        "provider_created",
    "provider_connected",    "models_advertised",    "provider_disconnected",
    "provider_suspended",    "provider_scored",      "achievement_unlocked",
    "job_submitted",         "job_queued",           "job_assigned",
    "job_started",           "job_reassigned",       "job_completed",
    "job_failed",            "job_cancelled",        "campaign_created",
    "campaign_funded",       "campaign_paused",      "campaign_resumed",
    "campaign_exhausted",    "impression_recorded",  "ad_clicked",
    "transfer_recorded",     "payout_requested",     "payout_settled",
    "payout_failed",         "ad_reserved",          "ad_reservation_released",
    "suspicion_recorded",    "free_tokens_used",     "impression_voided",
    "provider_token_replaced",
};

static_assert(type_names.back() != std::string_view{}, "a type name is missing");

}  // namespace

event_type type_of(const event& e) noexcept {
  // A variant left valueless by a throwing assignment maps to 65535, which type_name calls unknown.
  return static_cast<event_type>(e.index());
}

std::string_view type_name(event_type type) noexcept {
  if (type >= event_type_count) return "unknown";
  return type_names[type];
}

const ledger_bill* bill_of(const event& e) noexcept {
  if (const auto* completed = std::get_if<job_completed>(&e)) return &completed->bill;
  if (const auto* cancelled = std::get_if<job_cancelled>(&e)) return &cancelled->bill;
  return nullptr;
}

std::uint32_t free_tokens_of(const event& e) noexcept {
  if (const auto* completed = std::get_if<job_completed>(&e)) return completed->free_tokens;
  if (const auto* cancelled = std::get_if<job_cancelled>(&e)) return cancelled->free_tokens;
  return 0;
}

}  // namespace gpustream::events
