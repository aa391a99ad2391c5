#include "gateway/provider_api.hpp"

#include <boost/json.hpp>

#include <chrono>

#include "domain/payout.hpp"
#include "domain/scoring.hpp"
#include "gateway/openai_api.hpp"
#include "gateway/secrets.hpp"

namespace gpustream::gateway {

namespace {

namespace json = boost::json;

std::int64_t system_now_us() {
  return std::chrono::duration_cast<std::chrono::microseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

json::value instant_or_null(std::int64_t at_us) {
  if (at_us == 0) return nullptr;
  return at_us;
}

json::object model_json(const events::model_offer& m) {
  return {{"model", m.model_name},
          {"context_length", m.context_length_tokens},
          {"quantisation", m.quantisation},
          {"input_price_micros_per_mtok", m.input_price_micros_per_mtok},
          {"output_price_micros_per_mtok", m.output_price_micros_per_mtok},
          {"max_concurrency", m.max_concurrency}};
}

json::object payout_json(const payout_entry& p) {
  json::object out{{"id", p.payout_id},
                   {"amount_micros", p.amount_micros},
                   {"status", payout_status_name(p.status)},
                   {"automatic", p.automatic},
                   {"requested_at_us", instant_or_null(p.requested_at_us)},
                   {"closed_at_us", instant_or_null(p.closed_at_us)}};
  if (p.status == domain::payout_status::settled) {
    out["external_reference"] = p.external_reference;
  }
  if (p.status == domain::payout_status::failed) out["failure_reason"] = p.failure_reason;
  return out;
}

json::object provider_object(const provider_entry& p, std::int64_t now_us) {
  json::array achievements;
  for (const auto kind : p.achievements) achievements.emplace_back(achievement_name(kind));
  json::array models;
  for (const auto& m : p.models) models.emplace_back(model_json(m));
  const bool suspended = p.suspended_until_at_us > now_us;
  return {{"id", p.provider_id},
          {"name", p.name},
          {"owner_user_id", p.owner_user_id},
          {"status", provider_status(p, now_us)},
          {"level", domain::level_name(p.level)},
          {"score", p.score},
          {"jobs", {{"succeeded", p.jobs_succeeded}, {"failed", p.jobs_failed}}},
          {"achievements", std::move(achievements)},
          {"models", std::move(models)},
          {"earnings",
           {{"balance_micros", p.balance_micros},
            {"earned_micros", p.earned_micros},
            {"paid_out_micros", p.paid_out_micros}}},
          {"created_at_us", instant_or_null(p.created_at_us)},
          {"connected_at_us", instant_or_null(p.online ? p.connected_at_us : 0)},
          {"suspended_until_at_us", instant_or_null(suspended ? p.suspended_until_at_us : 0)}};
}

http_response error_response(unsigned status, std::string message) {
  http_response response;
  response.status = status;
  response.body = error_body(make_api_error(status, std::move(message)));
  if (status == 401) response.headers.emplace_back("WWW-Authenticate", "Bearer");
  if (status == 405) response.headers.emplace_back("Allow", "GET, HEAD");
  return response;
}

}  // namespace

std::string_view provider_status(const provider_entry& provider, std::int64_t now_us) noexcept {
  if (provider.suspended_until_at_us > now_us) return "suspended";
  return provider.online ? "online" : "offline";
}

std::string_view achievement_name(events::achievement_kind kind) noexcept {
  switch (kind) {
    case events::achievement_kind::ten_fast_jobs: return "ten_fast_jobs";
    case events::achievement_kind::hundred_jobs: return "hundred_jobs";
    case events::achievement_kind::fifty_successes_in_a_row: return "fifty_successes_in_a_row";
    case events::achievement_kind::hour_of_uptime: return "hour_of_uptime";
  }
  return "unknown";
}

std::string_view payout_status_name(domain::payout_status status) noexcept {
  switch (status) {
    case domain::payout_status::none: return "none";
    case domain::payout_status::requested: return "requested";
    case domain::payout_status::settled: return "settled";
    case domain::payout_status::failed: return "failed";
  }
  return "unknown";
}

std::string provider_json(const provider_entry& provider, std::int64_t now_us) {
  return json::serialize(provider_object(provider, now_us));
}

provider_api::provider_api(std::shared_ptr<const directory> directory,
                           provider_api_options options)
    : directory_(std::move(directory)), options_(std::move(options)) {
  GPUSTREAM_ENSURE(directory_ != nullptr);
  if (!options_.clock_us) options_.clock_us = system_now_us;
}

void provider_api::handle(const http_request& request,
                          std::function<void(http_response)> reply) const {
  if (request.path() != "/v1/providers/me") {
    reply(error_response(404, "no such endpoint: " + std::string(request.path())));
    return;
  }
  if (!request.reads()) {
    reply(error_response(405, "/v1/providers/me answers GET, HEAD only, not " + request.method));
    return;
  }
  const auto token = bearer_token(request.header("authorization"));
  if (token.empty()) {
    reply(error_response(401, "missing provider token: send Authorization: Bearer <provider token>"));
    return;
  }
  const auto provider = directory_->provider_by_token(token);
  if (!provider) {
    reply(error_response(401, "unknown provider token"));
    return;
  }
  auto body = provider_object(*provider, options_.clock_us());
  json::array payouts;
  for (const auto& p : directory_->payouts_of(provider->provider_id, options_.payouts_listed_max)) {
    payouts.emplace_back(payout_json(p));
  }
  body["payouts"] = std::move(payouts);
  http_response response;
  response.body = json::serialize(body);
  reply(std::move(response));
}

}  // namespace gpustream::gateway
