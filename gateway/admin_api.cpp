#include "gateway/admin_api.hpp"

#include <boost/json.hpp>
#include <boost/json/basic_parser_impl.hpp>
#include <caf/actor_system.hpp>
#include <caf/event_based_actor.hpp>
#include <caf/send.hpp>
#include <spdlog/logger.h>
#include <spdlog/spdlog.h>

#include <arpa/inet.h>
#include <netinet/in.h>

#include <algorithm>
#include <array>
#include <charconv>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <utility>
#include <variant>
#include <vector>

#include "actors/errors.hpp"
#include "actors/runtime.hpp"
#include "base/text.hpp"
#include "domain/job.hpp"
#include "domain/ledger.hpp"
#include "domain/payout.hpp"
#include "domain/user.hpp"
#include "gateway/actor_bridge.hpp"
#include "gateway/directory.hpp"
#include "gateway/openai_api.hpp"
#include "gateway/provider_api.hpp"
#include "gateway/secrets.hpp"
#include "gateway/url.hpp"

namespace gpustream::gateway {

namespace {

namespace json = boost::json;
using reply_function = std::function<void(http_response)>;

std::int64_t system_now_us() {
  return std::chrono::duration_cast<std::chrono::microseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

// -- Responses. ---------------------------------------------------------------------------------

http_response error_response(unsigned status, std::string message, std::string param = {}) {
  http_response response;
  response.status = status;
  response.body = error_body(make_api_error(status, std::move(message), std::move(param)));
  if (status == 401) response.headers.emplace_back("WWW-Authenticate", "Bearer");
  return response;
}

http_response json_response(unsigned status, const json::value& body) {
  http_response response;
  response.status = status;
  response.body = json::serialize(body);
  return response;
}

/// The answer to a refused or failed actor request, `what` naming what was being done.
http_response failure_response(const caf::error& failure, std::string_view what,
                               std::chrono::milliseconds timeout) {
  const std::string doing(what);
  if (const auto refused = actors::domain_error_of(failure)) {
    switch (refused->code) {
      case domain::errc::invalid_argument:
        return error_response(400, doing + " was refused: " + refused->message);
      case domain::errc::not_found:
        return error_response(404, doing + " was refused: " + refused->message);
      case domain::errc::already_exists:
      case domain::errc::invalid_state:
      case domain::errc::insufficient_funds:
      case domain::errc::limit_exceeded:  // a fixed limit, which the message names: no retry passes it
        return error_response(409, doing + " was refused: " + refused->message);
      case domain::errc::quota_exceeded: {
        auto response = error_response(429, doing + " was refused: " + refused->message);
        response.headers.emplace_back("Retry-After", "60");
        return response;
      }
      case domain::errc::busy: {  // a queue is full now
        auto response = error_response(503, doing + " must wait: " + refused->message);
        response.headers.emplace_back("Retry-After", "1");
        return response;
      }
      default:
        return error_response(503, doing + " failed: " + refused->message);
    }
  }
  if (failure == caf::make_error(caf::sec::request_timeout)) {
    return error_response(503, doing + " took longer than " + std::to_string(timeout.count()) +
                                   " ms (request_timeout); the platform is overloaded or stopping");
  }
  if (actors::storage_error_of(failure)) {
    return error_response(503, doing + " could not be stored: " + actors::describe(failure));
  }
  return error_response(500, doing + " failed: " + actors::describe(failure));
}

// -- Reading requests. --------------------------------------------------------------------------

/// A failed validation: the response to send.
using invalid = unexpected<http_response>;

template <class T>
using checked = expected<T, http_response>;

/// Who the wrong-token throttle counts guesses of, for a peer's address: an IPv4 address as it is
/// (also written IPv4-mapped), an IPv6 address by its /64, which one host usually holds whole:
/// counted by address, each of its 2^64 addresses would bring a fresh budget of guesses.
std::string guesser_of(const std::string& address) {
  in6_addr v6{};
  if (::inet_pton(AF_INET6, address.c_str(), &v6) != 1) return address;
  char text[INET6_ADDRSTRLEN] = {};
  if (IN6_IS_ADDR_V4MAPPED(&v6)) {
    if (::inet_ntop(AF_INET, &v6.s6_addr[12], text, sizeof text) == nullptr) return address;
    return text;
  }
  std::memset(&v6.s6_addr[8], 0, 8);
  if (::inet_ntop(AF_INET6, &v6, text, sizeof text) == nullptr) return address;
  return std::string(text) + "/64";
}

/// A field's name as an error message quotes it: at most 64 bytes, cut at a character's start.
std::string printable_field(std::string_view name) {
  return name.size() <= 64 ? std::string(name) : std::string(utf8_prefix(name, 64)) + "...";
}

/// A basic_parser handler that notes the first key an object holds twice (boost::json::parse
/// keeps the last of them, silently).
class repeated_key_finder {
 public:
  static constexpr std::size_t max_array_size = -1;
  static constexpr std::size_t max_object_size = -1;
  static constexpr std::size_t max_string_size = -1;
  static constexpr std::size_t max_key_size = -1;

  bool on_document_begin(boost::system::error_code&) { return true; }
  bool on_document_end(boost::system::error_code&) { return true; }
  bool on_array_begin(boost::system::error_code&) { return true; }
  bool on_array_end(std::size_t, boost::system::error_code&) { return true; }
  bool on_object_begin(boost::system::error_code&) {
    keys_.emplace_back();
    return true;
  }
  bool on_object_end(std::size_t, boost::system::error_code&) {
    keys_.pop_back();
    return true;
  }
  bool on_string_part(json::string_view, std::size_t, boost::system::error_code&) { return true; }
  bool on_string(json::string_view, std::size_t, boost::system::error_code&) { return true; }
  bool on_key_part(json::string_view part, std::size_t, boost::system::error_code&) {
    key_.append(part.data(), part.size());
    return true;
  }
  bool on_key(json::string_view last, std::size_t, boost::system::error_code& ec) {
    key_.append(last.data(), last.size());
    if (!keys_.back().insert(key_).second) {
      repeated = std::move(key_);
      ec = json::error::extra_data;  // stops the parse: one repeated key is enough to refuse
      return false;
    }
    key_.clear();
    return true;
  }
  bool on_number_part(json::string_view, boost::system::error_code&) { return true; }
  bool on_int64(std::int64_t, json::string_view, boost::system::error_code&) { return true; }
  bool on_uint64(std::uint64_t, json::string_view, boost::system::error_code&) { return true; }
  bool on_double(double, json::string_view, boost::system::error_code&) { return true; }
  bool on_bool(bool, boost::system::error_code&) { return true; }
  bool on_null(boost::system::error_code&) { return true; }
  bool on_comment_part(json::string_view, boost::system::error_code&) { return true; }
  bool on_comment(json::string_view, boost::system::error_code&) { return true; }

  std::optional<std::string> repeated;

 private:
  std::vector<std::set<std::string, std::less<>>> keys_;  ///< the keys so far of each open object
  std::string key_;
};

/// The first key that an object of `body`, JSON that parses, holds twice.
std::optional<std::string> repeated_key(std::string_view body, const json::parse_options& options) {
  json::basic_parser<repeated_key_finder> parser(options);
  boost::system::error_code ec;
  (void)parser.write_some(false, body.data(), body.size(), ec);
  return std::move(parser.handler().repeated);
}

/// The 400 for a `what` (a field, a query parameter) named `name` that is none of `known`, which
/// it lists.
http_response unknown_name(std::string_view what, std::string_view name, std::initializer_list<std::string_view> known) {
  std::string names;
  for (const auto k : known) names += (names.empty() ? "" : ", ") + std::string(k);
  const std::string shown = printable_field(name);
  return error_response(400,
                        "unknown " + std::string(what) + " '" + shown + "'; " +
                            (names.empty() ? "this endpoint takes none" : "the " + std::string(what) + "s are: " + names),
                        shown);
}

/// The body as a JSON object whose every field is one of `fields`: a misspelt field ("credit" for
/// "credit_micros") is refused rather than read as absent, which would create a user without
/// its credit. A field given twice is refused too: JSON parsers disagree on which one counts.
checked<json::object> parse_object(std::string_view body, std::size_t depth_max,
                                   std::initializer_list<std::string_view> fields) {
  json::parse_options options;
  options.max_depth = depth_max;
  boost::system::error_code ec;
  auto parsed = json::parse(body, ec, json::storage_ptr(), options);
  if (ec) {
    return invalid{error_response(400, "the body is not valid JSON (at most " +
                                           std::to_string(depth_max) +
                                           " levels deep): " + ec.message())};
  }
  if (!parsed.is_object()) return invalid{error_response(400, "the body must be a JSON object")};
  if (const auto repeated = repeated_key(body, options)) {
    return invalid{error_response(400, "field '" + printable_field(*repeated) + "' is given twice; give each field once",
                                  printable_field(*repeated))};
  }
  for (const auto& field : parsed.as_object()) {
    if (std::find(fields.begin(), fields.end(), field.key()) != fields.end()) continue;
    return invalid{unknown_name("field", field.key(), fields)};
  }
  return std::move(parsed.as_object());
}

/// The body of a request that takes none: empty, or an empty JSON object. Anything else is
/// refused, so that a field the endpoint does not know (one provider's id for a payout run, a
/// dry run) is never taken as honoured.
checked<std::monostate> no_body(const http_request& request, std::size_t depth_max) {
  if (request.body.empty()) return std::monostate{};
  auto body = parse_object(request.body, depth_max, {});
  if (!body) return invalid{std::move(body).error()};
  return std::monostate{};
}

checked<std::optional<std::string>> optional_string(const json::object& body, std::string_view name,
                                                    std::size_t bytes_max) {
  const auto* found = body.if_contains(name);
  if (found == nullptr || found->is_null()) return std::optional<std::string>{};
  if (!found->is_string()) {
    return invalid{error_response(400, std::string(name) + " must be a string", std::string(name))};
  }
  const auto& text = found->get_string();
  if (text.size() > bytes_max) {
    return invalid{error_response(400,
                                  std::string(name) + " is " + std::to_string(text.size()) +
                                      " bytes long; at most " + std::to_string(bytes_max) +
                                      " are allowed",
                                  std::string(name))};
  }
  return std::optional<std::string>{std::string(text)};
}

checked<std::string> required_string(const json::object& body, std::string_view name,
                                     std::size_t bytes_max) {
  auto text = optional_string(body, name, bytes_max);
  if (!text) return invalid{std::move(text).error()};
  if (!text->has_value() || (*text)->empty()) {
    return invalid{error_response(400, std::string(name) + " is required (a non-empty string)",
                                  std::string(name))};
  }
  return std::move(**text);
}

checked<std::optional<std::int64_t>> optional_integer(const json::object& body,
                                                      std::string_view name, std::int64_t min,
                                                      std::int64_t max) {
  const auto* found = body.if_contains(name);
  if (found == nullptr || found->is_null()) return std::optional<std::int64_t>{};
  std::optional<std::int64_t> value;
  if (found->is_int64()) value = found->get_int64();
  if (found->is_uint64() &&
      found->get_uint64() <= static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max())) {
    value = static_cast<std::int64_t>(found->get_uint64());
  }
  if (!value || *value < min || *value > max) {
    return invalid{error_response(400,
                                  std::string(name) + " must be an integer from " +
                                      std::to_string(min) + " to " + std::to_string(max),
                                  std::string(name))};
  }
  return value;
}

checked<std::int64_t> required_integer(const json::object& body, std::string_view name,
                                       std::int64_t min, std::int64_t max) {
  auto value = optional_integer(body, name, min, max);
  if (!value) return invalid{std::move(value).error()};
  if (!value->has_value()) {
    return invalid{error_response(400, std::string(name) + " is required (an integer)",
                                  std::string(name))};
  }
  return **value;
}

/// Longest Idempotency-Key, bytes.
constexpr std::size_t idempotency_key_bytes_max = 255;

/// The labels of the keys the admin API issues: with the user (its create, and the create's
/// retries), and by a replacement. A create's retry replaces only keys of the first kind. (Keys
/// issued before the two were told apart are labelled "issued by the admin API".)
constexpr std::string_view created_key_label = "issued with the user (POST /admin/users)";
constexpr std::string_view replacement_key_label = "issued by POST /admin/users/<id>/key";

/// The id a create gives what it creates: with an `Idempotency-Key` header, one derived from it
/// (and `kind`), so that a retried request (after a timeout whose work went on) names the same
/// user, provider or campaign, and its creation and money are recorded once; otherwise a new one.
checked<std::string> id_for(const http_request& request, std::string_view prefix, std::string_view kind) {
  const auto key = request.header("idempotency-key");
  if (key.empty()) {
    auto fresh = new_id(prefix);
    if (!fresh) return invalid{error_response(503, "the server could not make an id; try again")};
    return std::move(*fresh);
  }
  if (key.size() > idempotency_key_bytes_max ||
      !std::all_of(key.begin(), key.end(), [](unsigned char c) { return c > 0x20 && c < 0x7f; })) {
    return invalid{error_response(400, "Idempotency-Key must be 1 to " + std::to_string(idempotency_key_bytes_max) +
                                           " visible ASCII characters",
                                  "Idempotency-Key")};
  }
  return derived_id(prefix, "gpustream/admin/" + std::string(kind) + "/" + std::string(key));
}

checked<std::vector<std::string>> string_list(const json::object& body, std::string_view name,
                                              std::size_t count_max, std::size_t bytes_max) {
  std::vector<std::string> out;
  const auto* found = body.if_contains(name);
  if (found == nullptr || found->is_null()) return out;
  const auto* list = found->if_array();
  if (list == nullptr || list->size() > count_max) {
    return invalid{error_response(400,
                                  std::string(name) + " must be an array of at most " +
                                      std::to_string(count_max) + " strings",
                                  std::string(name))};
  }
  for (const auto& item : *list) {
    if (!item.is_string() || item.get_string().size() > bytes_max) {
      return invalid{error_response(400,
                                    std::string(name) + " must hold strings of at most " +
                                        std::to_string(bytes_max) + " bytes",
                                    std::string(name))};
    }
    out.emplace_back(item.get_string());
  }
  return out;
}

/// The query parameters of `target`, each one of `known` and given once: another name (a misspelt
/// filter, which would list everything) or one given twice (which value counts?) is refused, as
/// a body's unknown or repeated field is.
checked<std::map<std::string, std::string>> query_params(std::string_view target,
                                                         std::initializer_list<std::string_view> known) {
  std::map<std::string, std::string> out;
  const auto start = target.find('?');
  if (start == std::string_view::npos) return out;
  auto query = target.substr(start + 1);
  while (!query.empty()) {
    const auto end = query.find('&');
    const auto pair = query.substr(0, end);
    const auto equals = pair.find('=');
    auto name = percent_decode(pair.substr(0, equals), plus_sign::space);
    auto value = equals == std::string_view::npos ? std::string() : percent_decode(pair.substr(equals + 1), plus_sign::space);
    if (!pair.empty()) {
      if (std::find(known.begin(), known.end(), name) == known.end()) {
        return invalid{unknown_name("query parameter", name, known)};
      }
      if (!out.emplace(name, std::move(value)).second) {
        return invalid{error_response(400, "query parameter '" + name + "' is given twice; give it once", name)};
      }
    }
    if (end == std::string_view::npos) break;
    query.remove_prefix(end + 1);
  }
  return out;
}

checked<std::size_t> limit_param(const std::map<std::string, std::string>& params,
                                 std::size_t default_limit, std::size_t max) {
  const auto found = params.find("limit");
  if (found == params.end()) return std::min(default_limit, max);
  std::size_t value = 0;
  const auto& text = found->second;
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (ec != std::errc{} || end != text.data() + text.size() || value == 0 || value > max) {
    return invalid{error_response(
        400, "limit must be an integer from 1 to " + std::to_string(max), "limit")};
  }
  return value;
}

/// A listing's query: its parameters and its page size.
struct listing_query {
  std::map<std::string, std::string> params;
  std::size_t limit = 0;
  /// The parameter `name`, empty when not given.
  [[nodiscard]] std::string param(const std::string& name) const {
    const auto found = params.find(name);
    return found == params.end() ? std::string() : found->second;
  }
};

/// The query of a listing that takes the parameters `known` (limit among them): its page size is
/// `limit`, default_limit when not given, at most max.
checked<listing_query> listing_query_of(std::string_view target, std::initializer_list<std::string_view> known,
                                        std::size_t default_limit, std::size_t max) {
  auto params = query_params(target, known);
  if (!params) return invalid{std::move(params).error()};
  auto limit = limit_param(*params, default_limit, max);
  if (!limit) return invalid{std::move(limit).error()};
  return listing_query{std::move(*params), *limit};
}

std::optional<domain::job_status> job_status_named(std::string_view name) {
  static constexpr std::array states{domain::job_status::submitted, domain::job_status::queued,
                                     domain::job_status::assigned,  domain::job_status::streaming,
                                     domain::job_status::completed, domain::job_status::failed,
                                     domain::job_status::cancelled};
  for (const auto state : states) {
    if (domain::to_string(state) == name) return state;
  }
  return std::nullopt;
}

std::string_view tier_name(events::user_tier tier) noexcept {
  return tier == events::user_tier::premium ? "premium" : "free";
}

std::string_view failure_name(events::failure_reason reason) noexcept {
  using r = events::failure_reason;
  switch (reason) {
    case r::no_provider: return "no_provider";
    case r::deadline_exceeded: return "deadline_exceeded";
    case r::all_providers_failed: return "all_providers_failed";
    case r::prompt_too_long: return "prompt_too_long";
    case r::insufficient_funds: return "insufficient_funds";
    case r::upstream_error: return "upstream_error";
    case r::internal: return "internal";
    case r::quota_exceeded: return "quota_exceeded";
  }
  return "unknown";
}

json::object job_json(const job_entry& j) {
  json::object out{{"id", j.job_id},
                   {"user_id", j.user_id},
                   {"model", j.model},
                   {"state", domain::to_string(j.status)},
                   {"premium", j.premium},
                   {"attempt", j.attempt},
                   {"prompt_tokens", j.prompt_tokens},
                   {"max_tokens", j.max_tokens},
                   {"completion_tokens", j.completion_tokens},
                   {"submitted_at_us", j.submitted_at_us},
                   {"gross_micros", j.gross_micros},
                   {"platform_fee_micros", j.platform_fee_micros},
                   {"ad_micros", j.ad_micros}};
  out["provider_id"] = j.provider_id.empty() ? json::value(nullptr) : json::value(j.provider_id);
  out["finished_at_us"] = j.finished_at_us == 0 ? json::value(nullptr) : json::value(j.finished_at_us);
  out["prompt_tokens_billed"] = j.prompt_tokens_billed == 0 ? json::value(nullptr) : json::value(j.prompt_tokens_billed);
  if (j.status == domain::job_status::failed) out["failure_reason"] = failure_name(j.failure);
  return out;
}

json::object live_json(const provider_live_state& live) {
  return {{"active_jobs", live.active_jobs},
          {"queued_jobs", live.queued_jobs},
          {"load_percent", live.load_percent},
          {"health_percent", live.health_percent},
          {"tokens_per_second_milli", live.tokens_per_second_milli}};
}

/// The deposit id of a user's initial credit; with it, a repeated deposit is applied once.
std::string initial_deposit_id(std::string_view user_id) {
  return "initial-" + std::string(user_id);
}

}  // namespace

// -------------------------------------------------------------------------------------------------

class admin_api::impl : public std::enable_shared_from_this<impl> {
 public:
  impl(caf::actor_system& system, admin_peers peers, std::shared_ptr<directory> directory,
       admin_api_options options)
      : system_(system),
        peers_(std::move(peers)),
        directory_(std::move(directory)),
        options_(std::move(options)),
        token_configured_(!options_.admin_token.empty()),
        token_digest_(sha256(options_.admin_token)),
        failed_auth_(options_.failed_auth),
        log_(spdlog::default_logger()->clone("admin")) {
    GPUSTREAM_ENSURE(directory_ != nullptr);
    GPUSTREAM_ENSURE(options_.list_limit_max > 0);
    options_.admin_token.clear();  // only the digest is kept
    if (!options_.clock_us) options_.clock_us = system_now_us;
  }

  void handle(const http_request& request, reply_function reply) {
    if (auto refused = authenticate(request)) {
      reply(std::move(*refused));
      return;
    }
    route(request, std::move(reply));
  }

 private:
  std::optional<http_response> authenticate(const http_request& request) {
    if (!token_configured_) {
      return error_response(503,
                            "the admin API is disabled: no admin token is configured; start "
                            "`gpustream serve` with --admin-token TOKEN or set "
                            "GPUSTREAM_ADMIN_TOKEN");
    }
    const auto token = bearer_token(request.header("authorization"));
    // Compared under the throttle's lock: concurrent guesses from one address are judged one after
    // another, so none gets past a budget spent by the others.
    bool wrong = false;
    const std::string guesser = guesser_of(request.remote_address);
    const auto throttled = failed_auth_.check_if(guesser, rate_limiter::clock::now(), [&] {
      wrong = !token.empty() && !secret_matches(token, token_digest_);
      return wrong;
    });
    if (!throttled.allowed) {
      auto response = error_response(429, "too many wrong admin tokens from " + guesser +
                                              "; retry after " + std::to_string(throttled.retry_after_seconds) + " s");
      response.headers.emplace_back("Retry-After", std::to_string(throttled.retry_after_seconds));
      return response;
    }
    if (token.empty()) {
      return error_response(401, "missing admin token: send Authorization: Bearer <admin token>");
    }
    if (wrong) {
      log_->warn("wrong admin token from {} ({} request)", request.remote_address, request.method);
      return error_response(401, "wrong admin token");
    }
    return std::nullopt;
  }

  void route(const http_request& request, reply_function reply) {
    const auto path = request.path();
    const bool get = request.reads();
    const bool post = request.method == "POST";
    // Only the listings take query parameters: any other request that gives one is refused, once
    // its path and method are found (a wrong one still gets 404 or 405).
    const auto without_query = [&](auto handle) {
      if (auto none = query_params(request.target, {}); !none) return reply(std::move(none).error());
      handle();
    };
    if (path == "/admin/users") {
      if (post) return without_query([&] { create_user(request, std::move(reply)); });
      return not_allowed(request, "POST", std::move(reply));
    }
    if (path == "/admin/providers") {
      if (get) return list_providers(request, std::move(reply));
      if (post) return without_query([&] { create_provider(request, std::move(reply)); });
      return not_allowed(request, "GET, HEAD, POST", std::move(reply));
    }
    if (path == "/admin/campaigns") {
      if (post) return without_query([&] { create_campaign(request, std::move(reply)); });
      return not_allowed(request, "POST", std::move(reply));
    }
    if (path == "/admin/jobs") {
      if (get) return list_jobs(request, std::move(reply));
      return not_allowed(request, "GET, HEAD", std::move(reply));
    }
    if (path == "/admin/accounts") {
      if (get) return list_accounts(request, std::move(reply));
      return not_allowed(request, "GET, HEAD", std::move(reply));
    }
    if (path == "/admin/payouts/run") {
      if (post) return without_query([&] { run_payouts(request, std::move(reply)); });
      return not_allowed(request, "POST", std::move(reply));
    }
    if (path == "/admin/payouts/last") {
      if (get) return without_query([&] { last_payout_run(std::move(reply)); });
      return not_allowed(request, "GET, HEAD", std::move(reply));
    }
    if (auto step = payout_step_of(path)) {
      if (post) return without_query([&] { step_payout(request, std::move(step->first), step->second, std::move(reply)); });
      return not_allowed(request, "POST", std::move(reply));
    }
    if (auto provider_id = id_between(path, "/admin/providers/", "/token")) {
      if (post) return without_query([&] { replace_provider_token(request, std::move(*provider_id), std::move(reply)); });
      return not_allowed(request, "POST", std::move(reply));
    }
    if (auto user_id = id_between(path, "/admin/users/", "/key")) {
      if (post) return without_query([&] { replace_user_key(request, std::move(*user_id), std::move(reply)); });
      return not_allowed(request, "POST", std::move(reply));
    }
    reply(error_response(404, "no such admin endpoint: " + std::string(path)));
  }

  static void not_allowed(const http_request& request, std::string_view allowed,
                          reply_function reply) {
    auto response = error_response(405, std::string(request.path()) + " answers " +
                                            std::string(allowed) + " only, not " + request.method);
    response.headers.emplace_back("Allow", std::string(allowed));
    reply(std::move(response));
  }

  caf::timespan timeout() const { return options_.request_timeout; }

  // -- POST /admin/users ------------------------------------------------------------------------

  void create_user(const http_request& request, reply_function reply) {
    auto body = parse_object(request.body, options_.json_depth_max, {"tier", "credit_micros", "display_name"});
    if (!body) return reply(std::move(body).error());
    auto tier_text = optional_string(*body, "tier", 16);
    if (!tier_text) return reply(std::move(tier_text).error());
    auto tier = events::user_tier::free;
    if (tier_text->has_value() && **tier_text == "premium") {
      tier = events::user_tier::premium;
    } else if (tier_text->has_value() && **tier_text != "free") {
      return reply(error_response(400, "tier must be \"free\" or \"premium\"", "tier"));
    }
    auto credit = optional_integer(*body, "credit_micros", 0, options_.credit_micros_max);
    if (!credit) return reply(std::move(credit).error());
    auto display_name = optional_string(*body, "display_name", options_.name_bytes_max);
    if (!display_name) return reply(std::move(display_name).error());

    auto user_id = id_for(request, "u_", "user");
    if (!user_id) return reply(std::move(user_id).error());
    auto key = make_user_key();
    if (!key) return reply(std::move(key).error());
    // A retry with the same Idempotency-Key issues another key, which replaces those its earlier
    // attempts issued: their answers were lost (or the retry would not be), so nobody should hold a
    // key of this user but the one answered now. One decision: racing retries leave one key active.
    // A key issued since by POST /admin/users/<id>/key is not theirs: the retry is refused instead.
    auto first_key = replacing_keys(*key, std::string(created_key_label), "replaced by a retried request's key");
    first_key.same_label_only = true;
    std::vector<domain::user::command> commands{
        domain::create_user{*user_id, display_name->value_or(""), tier}, std::move(first_key)};
    user_created created{*user_id, key->id, std::move(key->secret), tier, credit->value_or(0)};
    const bool retryable = !request.header("idempotency-key").empty();
    auto self = shared_from_this();
    spawn_request([self, commands = std::move(commands), created = std::move(created), retryable,
                   display_name = display_name->value_or(""),
                   reply = std::move(reply)](caf::event_based_actor* actor) mutable {
      if (!retryable) return self->create_user_with(actor, std::move(commands), std::move(created), std::move(reply));
      // A retry is answered as its first attempt was (the same user, a new key, the credit once);
      // the same key on another request is refused before any key is issued.
      const auto user_id = created.user_id;
      actor->request(self->peers_.users, self->timeout(), user_id, actors::state_atom::value)
          .then(
              [self, actor, commands = std::move(commands), created, display_name,
               reply](const domain::user_state& state) mutable {
                const auto deposit = state.deposits.find(initial_deposit_id(created.user_id));
                const bool same = !state.created ||
                                  (state.tier == created.tier && state.display_name == display_name &&
                                   (deposit == state.deposits.end() || deposit->second == created.credit_micros));
                if (!same) {
                  return reply(error_response(409, "the Idempotency-Key names user " + created.user_id +
                                                       ", made by a request with other details (tier, display_name "
                                                       "or credit_micros); use a new key for a new request",
                                              "Idempotency-Key"));
                }
                const bool replaced_since = std::any_of(state.api_keys.begin(), state.api_keys.end(), [](const auto& key) {
                  return !key.second.revoked && key.second.label == replacement_key_label;
                });
                if (replaced_since) {  // the create was answered: only its answer could name the user
                  return reply(error_response(409, "the Idempotency-Key names user " + created.user_id +
                                                       ", whose key was replaced since with POST /admin/users/" +
                                                       created.user_id + "/key; a retry would revoke that key. Use a "
                                                       "new key for a new request",
                                              "Idempotency-Key"));
                }
                self->create_user_with(actor, std::move(commands), std::move(created), std::move(reply));
              },
              [self, reply](caf::error& failure) {
                reply(failure_response(failure, "reading the user", self->options_.request_timeout));
              });
    });
  }

  struct user_created {
    std::string user_id;
    std::string key_id;
    std::string api_key;
    events::user_tier tier = events::user_tier::free;
    std::int64_t credit_micros = 0;
  };

  /// A failure after the user and its key were recorded: the answer still carries both (`id`,
  /// `api_key` beside `error`), since the key is shown only once and the user exists.
  static http_response with_the_key(http_response failure, const user_created& created) {
    boost::system::error_code ec;
    auto body = json::parse(failure.body, ec);
    if (ec || !body.is_object()) return failure;
    body.as_object()["id"] = created.user_id;
    body.as_object()["api_key"] = created.api_key;
    failure.body = json::serialize(body);
    return failure;
  }

  void create_user_with(caf::event_based_actor* actor, std::vector<domain::user::command> commands,
                        user_created created, reply_function reply) {
    auto self = shared_from_this();
    const auto user_id = created.user_id;
    actor->request(peers_.users, timeout(), user_id, std::move(commands))
        .then(
            [self, actor, created, reply](actors::command_reply& done) mutable {
              self->directory_->apply_committed("user-" + created.user_id, done.version,
                                                done.events);
              self->log_->info("created user {} tier={} key_id={}", created.user_id,
                               tier_name(created.tier), created.key_id);
              if (created.credit_micros == 0) {
                reply(user_answer(created));
                return;
              }
              self->deposit(actor, std::move(created), std::move(reply));
            },
            [self, reply](caf::error& failure) {
              reply(failure_response(failure, "creating the user", self->options_.request_timeout));
            });
  }

  /// The initial credit: the ledger moves the money in (external -> user-<id>), then the user's
  /// stream records the deposit. Both are idempotent under the deposit id.
  void deposit(caf::event_based_actor* actor, user_created created, reply_function reply) {
    auto self = shared_from_this();
    const auto deposit_id = initial_deposit_id(created.user_id);
    domain::ledger::command transfer =
        domain::user_deposit(deposit_id, created.user_id, created.credit_micros);
    actor->request(peers_.ledger, timeout(), std::move(transfer))
        .then(
            [self, actor, created, deposit_id, reply](actors::command_reply&) mutable {
              domain::user::command credit = domain::credit_user{deposit_id, created.credit_micros};
              const auto user_id = created.user_id;
              actor->request(self->peers_.users, self->timeout(), user_id, std::move(credit))
                  .then(
                      [self, created, reply](actors::command_reply& done) {
                        self->directory_->apply_committed("user-" + created.user_id, done.version,
                                                          done.events);
                        self->log_->info("credited user {} with {} micro-USD", created.user_id,
                                         created.credit_micros);
                        reply(user_answer(created));
                      },
                      [self, created, reply](caf::error& failure) {
                        reply(with_the_key(failure_response(failure,
                                                            "recording the credit of user " + created.user_id +
                                                                " (the ledger has the money; the user exists)",
                                                            self->options_.request_timeout),
                                           created));
                      });
            },
            [self, created, reply](caf::error& failure) {
              reply(with_the_key(failure_response(failure,
                                                  "moving the credit of user " + created.user_id +
                                                      " into the ledger (the user exists without credit)",
                                                  self->options_.request_timeout),
                                 created));
            });
  }

  static http_response user_answer(const user_created& created) {
    return json_response(201, json::object{{"id", created.user_id},
                                           {"api_key", created.api_key},
                                           {"key_id", created.key_id},
                                           {"tier", tier_name(created.tier)},
                                           {"credit_micros", created.credit_micros}});
  }

  // -- POST /admin/providers --------------------------------------------------------------------

  struct provider_created {
    std::string provider_id;
    std::string owner_user_id;
    std::string name;
    std::string token;
    bool new_owner = false;
  };

  void create_provider(const http_request& request, reply_function reply) {
    auto body = parse_object(request.body, options_.json_depth_max, {"name", "owner_user_id"});
    if (!body) return reply(std::move(body).error());
    auto name = required_string(*body, "name", options_.name_bytes_max);
    if (!name) return reply(std::move(name).error());
    auto owner = optional_string(*body, "owner_user_id", options_.name_bytes_max);
    if (!owner) return reply(std::move(owner).error());
    if (owner->has_value() && !directory_->user(**owner)) {
      return reply(error_response(400, "owner_user_id names no user: " + **owner, "owner_user_id"));
    }
    // A retry with the same Idempotency-Key names the same provider: its token was shown once, in
    // the first answer, so the retry is refused (409) rather than given another.
    auto provider_id = id_for(request, "p_", "provider");
    if (!provider_id) return reply(std::move(provider_id).error());
    auto owner_id = owner->has_value() ? checked<std::string>(**owner) : id_for(request, "u_", "provider-owner");
    if (!owner_id) return reply(std::move(owner_id).error());
    auto token = new_provider_token();
    if (!token) {
      log_->error("making a provider's token failed");
      return reply(error_response(503, "the server could not make a secret; try again"));
    }
    provider_created created{*provider_id, *owner_id, std::move(*name), std::move(*token),
                             !owner->has_value()};
    auto self = shared_from_this();
    spawn_request([self, created = std::move(created),
                   reply = std::move(reply)](caf::event_based_actor* actor) mutable {
      if (created.new_owner) {
        self->create_owner(actor, std::move(created), std::move(reply));
      } else {
        self->create_provider_with(actor, std::move(created), std::move(reply));
      }
    });
  }

  /// A provider needs an owner (whose contribution its score becomes): a free user without keys.
  void create_owner(caf::event_based_actor* actor, provider_created created, reply_function reply) {
    auto self = shared_from_this();
    domain::user::command create = domain::create_user{created.owner_user_id, created.name,
                                                       events::user_tier::free};
    const auto owner_id = created.owner_user_id;
    actor->request(peers_.users, timeout(), owner_id, std::move(create))
        .then(
            [self, actor, created, reply](actors::command_reply& done) mutable {
              self->directory_->apply_committed("user-" + created.owner_user_id, done.version,
                                                done.events);
              self->create_provider_with(actor, std::move(created), std::move(reply));
            },
            [self, provider_id = created.provider_id, reply](caf::error& failure) {
              const auto refused = actors::domain_error_of(failure);
              if (refused && refused->code == domain::errc::already_exists) {
                // The owner's id comes from the Idempotency-Key too: an earlier request with this
                // key and other details (another name) made it.
                return reply(error_response(
                    409, "an earlier request with this Idempotency-Key (provider " + provider_id +
                             ") had other details; send another Idempotency-Key to create another provider",
                    "Idempotency-Key"));
              }
              reply(failure_response(failure, "creating the provider's owner", self->options_.request_timeout));
            });
  }

  void create_provider_with(caf::event_based_actor* actor, provider_created created,
                            reply_function reply) {
    auto self = shared_from_this();
    domain::provider::command create =
        domain::provider::create{created.provider_id, created.owner_user_id, created.name,
                                 sha256(created.token)};
    const auto provider_id = created.provider_id;
    actor->request(peers_.providers, timeout(), provider_id, std::move(create))
        .then(
            [self, created, reply](actors::command_reply& done) {
              self->directory_->apply_committed("provider-" + created.provider_id, done.version,
                                                done.events);
              self->log_->info("created provider {} owner={}", created.provider_id,
                               created.owner_user_id);
              reply(json_response(201, json::object{{"id", created.provider_id},
                                                    {"token", created.token},
                                                    {"owner_user_id", created.owner_user_id},
                                                    {"name", created.name}}));
            },
            [self, provider_id, reply](caf::error& failure) {
              auto response = failure_response(failure, "creating the provider", self->options_.request_timeout);
              const auto refused = actors::domain_error_of(failure);
              if (refused && refused->code == domain::errc::already_exists) {
                // A retry (its Idempotency-Key names this provider): the token went out once, with
                // the first answer, which may have been lost on the way.
                response = error_response(
                    409, "provider " + provider_id + " was created by an earlier request with this Idempotency-Key, "
                         "and its token shown once, in that request's answer; send another Idempotency-Key to create "
                         "another provider, or, if that answer was lost, get a new token with "
                         "POST /admin/providers/" + provider_id + "/token",
                    "Idempotency-Key");
              }
              reply(std::move(response));
            });
  }

  // -- POST /admin/campaigns --------------------------------------------------------------------

  checked<domain::create_campaign> parse_campaign(const json::object& body) const {
    constexpr std::size_t text_bytes_max = 4096;
    constexpr std::int64_t money_max = std::numeric_limits<std::int64_t>::max();
    domain::create_campaign c;
    for (auto [field, name] : {std::pair{&c.advertiser, "advertiser"}, std::pair{&c.title, "title"},
                               std::pair{&c.text, "text"}, std::pair{&c.url, "url"}}) {
      auto value = required_string(body, name, text_bytes_max);
      if (!value) return invalid{std::move(value).error()};
      *field = std::move(*value);
    }
    for (auto [field, name] :
         {std::pair{&c.keywords, "keywords"}, std::pair{&c.categories, "categories"}}) {
      auto value = string_list(body, name, options_.campaign_words_max, options_.name_bytes_max);
      if (!value) return invalid{std::move(value).error()};
      *field = std::move(*value);
    }
    auto bid = required_integer(body, "cpm_bid_micros", 1, money_max);
    if (!bid) return invalid{std::move(bid).error()};
    auto budget = required_integer(body, "budget_micros", 1, money_max);
    if (!budget) return invalid{std::move(budget).error()};
    auto daily = optional_integer(body, "daily_budget_micros", 1, money_max);
    if (!daily) return invalid{std::move(daily).error()};
    auto cap = optional_integer(body, "frequency_cap_per_day", 1,  // 0 would never show the ad
                                std::numeric_limits<std::uint32_t>::max());
    if (!cap) return invalid{std::move(cap).error()};
    c.cpm_bid_micros = *bid;
    c.budget_micros = *budget;
    c.daily_budget_micros = daily->value_or(*budget);
    if (cap->has_value()) c.frequency_cap_per_day = static_cast<std::uint32_t>(**cap);
    return c;
  }

  void create_campaign(const http_request& request, reply_function reply) {
    auto body = parse_object(request.body, options_.json_depth_max,
                             {"advertiser", "title", "text", "url", "keywords", "categories", "cpm_bid_micros",
                              "budget_micros", "daily_budget_micros", "frequency_cap_per_day"});
    if (!body) return reply(std::move(body).error());
    auto campaign = parse_campaign(*body);
    if (!campaign) return reply(std::move(campaign).error());
    auto id = id_for(request, "c_", "campaign");
    if (!id) return reply(std::move(id).error());
    campaign->campaign_id = std::move(*id);
    auto self = shared_from_this();
    spawn_request([self, campaign = std::move(*campaign),
                   reply = std::move(reply)](caf::event_based_actor* actor) mutable {
      actor->request(self->peers_.ads, self->timeout(), std::move(campaign))
          .then(
              [self, reply](std::string& campaign_id) {
                self->log_->info("created campaign {}", campaign_id);
                reply(json_response(201, json::object{{"id", campaign_id}}));
              },
              [self, reply](caf::error& failure) {
                reply(failure_response(failure, "creating the campaign",
                                       self->options_.request_timeout));
              });
    });
  }

  // -- Listings ---------------------------------------------------------------------------------

  checked<listing_query> listing(const http_request& request, std::initializer_list<std::string_view> known) const {
    return listing_query_of(request.target, known, options_.list_limit_default, options_.list_limit_max);
  }

  void list_providers(const http_request& request, reply_function reply) const {
    const auto query = listing(request, {"limit", "after"});
    if (!query) return reply(query.error());
    const auto now_us = options_.clock_us();
    auto listed = directory_->providers(query->limit + 1, query->param("after"));
    const bool has_more = listed.size() > query->limit;
    if (has_more) listed.pop_back();
    std::string body = "{\"object\":\"list\",\"data\":[";
    bool first = true;
    for (const auto& p : listed) {
      if (!first) body += ',';
      first = false;
      auto one = provider_json(p, now_us);
      std::optional<provider_live_state> live;
      if (options_.live_state && p.online) live = options_.live_state(p.provider_id);
      if (live) {
        // provider_json is one object: open it again to add what the link reports now.
        GPUSTREAM_ENSURE(!one.empty() && one.back() == '}');
        one.pop_back();
        one += ",\"live\":" + json::serialize(live_json(*live)) + "}";
      }
      body += one;
    }
    body += "],\"has_more\":" + std::string(has_more ? "true" : "false") + "}";
    http_response response;
    response.body = std::move(body);
    reply(std::move(response));
  }

  void list_jobs(const http_request& request, reply_function reply) const {
    const auto query = listing(request, {"limit", "after", "state"});
    if (!query) return reply(query.error());
    std::optional<domain::job_status> state;
    if (const auto found = query->params.find("state"); found != query->params.end()) {
      state = job_status_named(found->second);
      if (!state) {
        return reply(error_response(400,
                                    "state must be one of submitted, queued, assigned, streaming, "
                                    "completed, failed, cancelled",
                                    "state"));
      }
    }
    const std::string after = query->param("after");
    auto listed = directory_->jobs(state, query->limit + 1, after);
    if (!listed) {
      return reply(error_response(400,
                                  "after names job " + after +
                                      ", which this node does not list (never seen, or forgotten among the "
                                      "oldest finished jobs); list again from the newest",
                                  "after"));
    }
    const bool has_more = listed->size() > query->limit;
    if (has_more) listed->pop_back();
    json::array data;
    for (const auto& j : *listed) data.emplace_back(job_json(j));
    reply(json_response(200, json::object{{"object", "list"}, {"data", std::move(data)}, {"has_more", has_more}}));
  }

  void list_accounts(const http_request& request, reply_function reply) {
    const auto listed = listing(request, {"limit", "prefix", "after"});
    if (!listed) return reply(listed.error());
    actors::ledger_aggregate::query query{.accounts_max = listed->limit};
    query.account_prefix = listed->param("prefix");
    query.accounts_after = listed->param("after");
    auto self = shared_from_this();
    spawn_request([self, query = std::move(query), limit = listed->limit,
                   reply = std::move(reply)](caf::event_based_actor* actor) mutable {
      actor->request(self->peers_.ledger, self->timeout(), std::move(query))
          .then(
              [limit, reply](actors::ledger_aggregate::answer& ledger) {
                reply(accounts_answer(ledger, limit));
              },
              [self, reply](caf::error& failure) {
                reply(failure_response(failure, "reading the ledger",
                                       self->options_.request_timeout));
              });
    });
  }

  /// A page of the ledger's accounts: the answer holds at most `limit` + 1 of them, the last
  /// only to tell that there are more.
  static http_response accounts_answer(const actors::ledger_aggregate::answer& ledger, std::size_t limit) {
    json::array data;
    for (const auto& [account, balance] : ledger.balances) {
      if (data.size() >= limit) break;
      data.emplace_back(json::object{{"account", account}, {"balance_micros", balance}});
    }
    return json_response(200, json::object{{"object", "list"},
                                           {"data", std::move(data)},
                                           {"has_more", ledger.balances.size() > limit},
                                           {"total_micros", ledger.balance_total_micros}});
  }

  // -- POST /admin/payouts/run ------------------------------------------------------------------

  void run_payouts(const http_request& request, reply_function reply) {
    if (auto none = no_body(request, options_.json_depth_max); !none) return reply(std::move(none).error());
    auto self = shared_from_this();
    spawn_request([self, reply = std::move(reply)](caf::event_based_actor* actor) mutable {
      actor->request(self->peers_.payouts, self->timeout(), actors::run_atom::value)
          .then(
              [self, reply](actors::payout_report& report) {
                self->log_->info("payout run: {} payouts, {} problems", report.payouts.size(),
                                 report.problems.size());
                reply(json_response(200, report_json(report)));
              },
              [self, reply](caf::error& failure) {
                reply(failure_response(failure, "running the payouts",
                                       self->options_.request_timeout));
              });
    });
  }

  // -- GET /admin/payouts/last -----------------------------------------------------------------

  /// The latest run's report, also of a run started by the timer, or of one asked for whose
  /// answer came after the request's timeout.
  void last_payout_run(reply_function reply) {
    auto self = shared_from_this();
    spawn_request([self, reply = std::move(reply)](caf::event_based_actor* actor) mutable {
      actor->request(self->peers_.payouts, self->timeout(), actors::state_atom::value)
          .then([reply](actors::payout_report& report) { reply(json_response(200, report_json(report))); },
                [self, reply](caf::error& failure) {
                  reply(failure_response(failure, "reading the last payout run", self->options_.request_timeout));
                });
    });
  }

  // -- POST /admin/providers/<id>/token, POST /admin/users/<id>/key ----------------------------

  /// The id of `prefix` <id> `suffix` (/admin/providers/<id>/token): one path segment.
  static std::optional<std::string> id_between(std::string_view path, std::string_view prefix,
                                               std::string_view suffix) {
    if (!path.starts_with(prefix) || !path.ends_with(suffix) || path.size() <= prefix.size() + suffix.size()) {
      return std::nullopt;
    }
    const auto id = path.substr(prefix.size(), path.size() - prefix.size() - suffix.size());
    if (id.find('/') != std::string_view::npos) return std::nullopt;
    return std::string(id);
  }

  /// A new API key for a user whose keys leaked or were lost: shown once, as at creation. Every
  /// other key of the user is revoked with it, in one decision, and fails its next request. Each
  /// call makes another.
  void replace_user_key(const http_request& request, std::string user_id, reply_function reply) {
    if (auto none = no_body(request, options_.json_depth_max); !none) return reply(std::move(none).error());
    if (!directory_->user(user_id)) {
      return reply(error_response(404, "no user " + user_id + "; create it with POST /admin/users"));
    }
    auto key = make_user_key();
    if (!key) return reply(std::move(key).error());
    auto self = shared_from_this();
    spawn_request([self, user_id = std::move(user_id), key = std::move(*key),
                   reply = std::move(reply)](caf::event_based_actor* actor) mutable {
      domain::user::command replace =
          replacing_keys(key, std::string(replacement_key_label), "replaced by POST /admin/users/<id>/key");
      actor->request(self->peers_.users, self->timeout(), user_id, std::move(replace))
          .then(
              [self, user_id, key, reply](actors::command_reply& done) {
                self->directory_->apply_committed("user-" + user_id, done.version, done.events);
                self->log_->info("replaced the keys of user {} with key_id={}", user_id, key.id);
                reply(json_response(201, json::object{{"id", user_id}, {"api_key", key.secret}, {"key_id", key.id}}));
              },
              [self, reply](caf::error& failure) {
                reply(failure_response(failure, "replacing the user's key", self->options_.request_timeout));
              });
    });
  }

  /// A user's new API key: its id and the secret, shown once.
  struct user_key {
    std::string id;
    std::string secret;
  };

  /// A new key, or the 503 when the system's randomness failed (logged).
  checked<user_key> make_user_key() const {
    auto key_id = new_id("k_");
    auto secret = new_api_key();
    if (!key_id || !secret) {
      log_->error("making a user's key failed: {}", !key_id ? key_id.error().message : secret.error().message);
      return invalid{error_response(503, "the server could not make a secret; try again")};
    }
    return user_key{std::move(*key_id), std::move(*secret)};
  }

  /// The command that issues `key` (only its digest is recorded) and revokes the user's others.
  static domain::replace_api_keys replacing_keys(const user_key& key, std::string label, std::string reason) {
    return domain::replace_api_keys{key.id, sha256(key.secret), std::move(label), std::move(reason)};
  }

  /// A new link token for a provider whose token was lost (a create whose answer never arrived)
  /// or leaked: shown once, as at creation. The old one opens no link any more, and links open
  /// with it are closed within a heartbeat interval. Each call makes another.
  void replace_provider_token(const http_request& request, std::string provider_id, reply_function reply) {
    if (auto none = no_body(request, options_.json_depth_max); !none) return reply(std::move(none).error());
    if (!directory_->provider(provider_id)) {
      return reply(error_response(404, "no provider " + provider_id + "; create it with POST /admin/providers"));
    }
    auto token = new_provider_token();
    if (!token) {
      log_->error("making a provider's token failed");
      return reply(error_response(503, "the server could not make a secret; try again"));
    }
    auto self = shared_from_this();
    spawn_request([self, provider_id = std::move(provider_id), token = std::move(*token),
                   reply = std::move(reply)](caf::event_based_actor* actor) mutable {
      domain::provider::command replace = domain::provider::replace_token{sha256(token)};
      actor->request(self->peers_.providers, self->timeout(), provider_id, std::move(replace))
          .then(
              [self, provider_id, token, reply](actors::command_reply& done) {
                self->directory_->apply_committed("provider-" + provider_id, done.version, done.events);
                self->log_->info("replaced the token of provider {}", provider_id);
                reply(json_response(201, json::object{{"id", provider_id}, {"token", token}}));
              },
              [self, reply](caf::error& failure) {
                reply(failure_response(failure, "replacing the provider's token", self->options_.request_timeout));
              });
    });
  }

  // -- POST /admin/payouts/<id>/settle, POST /admin/payouts/<id>/fail ---------------------------

  enum class payout_step { settle, fail };

  /// The payout id and step of /admin/payouts/<id>/settle or /admin/payouts/<id>/fail.
  static std::optional<std::pair<std::string, payout_step>> payout_step_of(std::string_view path) {
    constexpr std::string_view prefix = "/admin/payouts/";
    if (!path.starts_with(prefix)) return std::nullopt;
    const auto rest = path.substr(prefix.size());
    const auto slash = rest.find('/');
    if (slash == std::string_view::npos || slash == 0) return std::nullopt;
    const auto step = rest.substr(slash + 1);
    if (step == "settle") return std::pair{std::string(rest.substr(0, slash)), payout_step::settle};
    if (step == "fail") return std::pair{std::string(rest.substr(0, slash)), payout_step::fail};
    return std::nullopt;
  }

  /// The payment rail's word on a requested payout: settled (the money leaves to `external`) or
  /// failed (it returns to the provider). Repeating a step with the same words changes nothing.
  void step_payout(const http_request& request, std::string payout_id, payout_step step, reply_function reply) {
    if (payout_id.size() > options_.name_bytes_max) {
      return reply(error_response(400, "the payout id is " + std::to_string(payout_id.size()) + " bytes long; at most " +
                                           std::to_string(options_.name_bytes_max) + " are allowed"));
    }
    const std::string_view field = step == payout_step::settle ? "external_reference" : "reason";
    auto body = parse_object(request.body, options_.json_depth_max, {field});
    if (!body) return reply(std::move(body).error());
    auto words = required_string(*body, field, domain::payout_text_length_max);
    if (!words) return reply(std::move(words).error());
    auto self = shared_from_this();
    spawn_request([self, payout_id = std::move(payout_id), words = std::move(*words), step,
                   reply = std::move(reply)](caf::event_based_actor* actor) mutable {
      auto on_entry = [self, reply, step](actors::payout_entry& entry) {
        self->log_->info("payout {} {} provider={} amount_micros={}", entry.payout_id,
                         step == payout_step::settle ? "settled" : "failed", entry.provider_id, entry.amount_micros);
        reply(json_response(200, entry_json(entry)));
      };
      auto on_failure = [self, reply, step](caf::error& failure) {
        reply(failure_response(failure, step == payout_step::settle ? "settling the payout" : "failing the payout",
                               self->options_.request_timeout));
      };
      if (step == payout_step::settle) {
        actor->request(self->peers_.payouts, self->timeout(), actors::settle_atom::value, std::move(payout_id), std::move(words))
            .then(std::move(on_entry), std::move(on_failure));
      } else {
        actor->request(self->peers_.payouts, self->timeout(), actors::fail_atom::value, std::move(payout_id), std::move(words))
            .then(std::move(on_entry), std::move(on_failure));
      }
    });
  }

  static json::object entry_json(const actors::payout_entry& p) {
    return {{"id", p.payout_id},
            {"provider_id", p.provider_id},
            {"amount_micros", p.amount_micros},
            {"status", payout_status_name(p.status)},
            {"reconciled", p.reconciled}};
  }

  static json::object report_json(const actors::payout_report& report) {
    json::array payouts;
    for (const auto& p : report.payouts) payouts.emplace_back(entry_json(p));
    json::array problems;
    for (const auto& problem : report.problems) problems.emplace_back(problem);
    return {{"payouts", std::move(payouts)}, {"problems", std::move(problems)}};
  }

  /// Spawns the actor that answers one request (it ends once its requests are answered),
  /// tracked so that stop() can wait for it.
  template <class Body>
  void spawn_request(Body body) {
    auto actor = system_.spawn(std::move(body));
    const auto id = actor.id();
    {
      std::lock_guard lock(running_mutex_);
      if (stopped_) {
        caf::anon_send_exit(actor, caf::exit_reason::user_shutdown);
        return;
      }
      running_.emplace(id, actor);
    }
    std::weak_ptr<impl> weak = shared_from_this();
    actor->attach_functor([weak, id] {  // at once if it has ended already
      if (auto self = weak.lock()) {
        std::lock_guard lock(self->running_mutex_);
        self->running_.erase(id);
      }
    });
  }

 public:
  void stop() {
    std::vector<caf::actor> running;
    {
      std::lock_guard lock(running_mutex_);
      stopped_ = true;
      for (auto& [id, actor] : running_) running.push_back(actor);
      running_.clear();
    }
    stop_and_wait(system_, running);
  }

 private:
  caf::actor_system& system_;
  std::mutex running_mutex_;
  std::map<caf::actor_id, caf::actor> running_;  ///< request actors not yet ended
  bool stopped_ = false;
  admin_peers peers_;
  std::shared_ptr<directory> directory_;
  admin_api_options options_;
  bool token_configured_;
  events::sha256_digest token_digest_;
  rate_limiter failed_auth_;  ///< wrong admin tokens, by remote address
  std::shared_ptr<spdlog::logger> log_;
};

admin_peers admin_peers_of(const actors::runtime& runtime) {
  return {runtime.users, runtime.providers, runtime.ledger, runtime.ad_server,
          runtime.payout_runner};
}

admin_api::admin_api(caf::actor_system& system, admin_peers peers,
                     std::shared_ptr<directory> directory, admin_api_options options)
    : impl_(std::make_shared<impl>(system, std::move(peers), std::move(directory),
                                   std::move(options))) {}

admin_api::~admin_api() { impl_->stop(); }

void admin_api::stop() { impl_->stop(); }

void admin_api::handle(const http_request& request, std::function<void(http_response)> reply) const {
  impl_->handle(request, std::move(reply));
}

}  // namespace gpustream::gateway
