#pragma once
/// The provider's own page: `GET /v1/providers/me` (or HEAD) with `Authorization: Bearer <provider token>`
/// answers what the platform knows about that provider (status, level, score, jobs, achievements,
/// the models it advertises), its earnings (ledger balance, total earned, total paid out) and its
/// newest payouts, all from the directory. A missing or unknown token is a 401 in OpenAI's error
/// shape. The answer never contains the token.
///
/// Also the JSON of one provider, shared with the admin API's provider listing.

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>

#include "gateway/directory.hpp"
#include "gateway/http_server.hpp"

namespace gpustream::gateway {

struct provider_api_options {
  /// Most payouts listed, newest first. Default: 20.
  std::size_t payouts_listed_max = 20;
  /// Source of `now` (for "suspended"), microseconds since the Unix epoch. Default: the system
  /// clock.
  std::function<std::int64_t()> clock_us;
};

class provider_api {
 public:
  explicit provider_api(std::shared_ptr<const directory> directory,
                        provider_api_options options = {});

  /// Answers GET and HEAD /v1/providers/me (405 for another method, 404 for another path). Calls `reply`
  /// exactly once, before it returns.
  void handle(const http_request& request, std::function<void(http_response)> reply) const;

 private:
  std::shared_ptr<const directory> directory_;
  provider_api_options options_;
};

/// "suspended" while a suspension runs at `now_us`, else "online" or "offline".
[[nodiscard]] std::string_view provider_status(const provider_entry& provider,
                                               std::int64_t now_us) noexcept;

/// The snake_case name of an achievement, e.g. "ten_fast_jobs".
[[nodiscard]] std::string_view achievement_name(events::achievement_kind kind) noexcept;

/// "requested", "settled" or "failed" ("none" for a payout that does not exist).
[[nodiscard]] std::string_view payout_status_name(domain::payout_status status) noexcept;

/// One provider as a JSON object: id, name, owner_user_id, status, level, score, jobs
/// {succeeded, failed}, achievements, models, earnings {balance_micros, earned_micros,
/// paid_out_micros}, created_at_us / connected_at_us / suspended_until_at_us (microseconds since
/// the epoch; null when not applicable).
[[nodiscard]] std::string provider_json(const provider_entry& provider, std::int64_t now_us);

}  // namespace gpustream::gateway
