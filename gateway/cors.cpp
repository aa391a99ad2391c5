#include "gateway/cors.hpp"

#include <algorithm>
#include <cctype>

namespace gpustream::gateway {

namespace {

constexpr std::string_view base_allowed_headers = "Authorization, Content-Type";

/// An HTTP token (RFC 9110 tchar): what a header name may contain.
bool is_token(std::string_view text) {
  if (text.empty()) return false;
  return std::all_of(text.begin(), text.end(), [](unsigned char c) {
    return std::isalnum(c) != 0 ||
           std::string_view("!#$%&'*+-.^_`|~").find(static_cast<char>(c)) != std::string_view::npos;
  });
}

std::string lower(std::string_view text) {
  std::string result(text);
  std::transform(result.begin(), result.end(), result.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return result;
}

std::string_view trim(std::string_view text) {
  while (!text.empty() && (text.front() == ' ' || text.front() == '\t')) text.remove_prefix(1);
  while (!text.empty() && (text.back() == ' ' || text.back() == '\t')) text.remove_suffix(1);
  return text;
}

/// "Authorization, Content-Type" plus the requested names (lower-case, deduplicated), or only the
/// base list when the request names a malformed header or too many.
std::string allowed_headers(std::string_view requested, std::size_t names_max) {
  std::vector<std::string> names;
  while (!requested.empty()) {
    const auto comma = requested.find(',');
    const std::string_view name = trim(requested.substr(0, comma));
    requested = comma == std::string_view::npos ? std::string_view{} : requested.substr(comma + 1);
    if (name.empty()) continue;
    if (!is_token(name) || names.size() >= names_max) return std::string(base_allowed_headers);
    std::string lowered = lower(name);
    if (lowered == "authorization" || lowered == "content-type") continue;
    if (std::find(names.begin(), names.end(), lowered) == names.end()) names.push_back(std::move(lowered));
  }
  std::string result(base_allowed_headers);
  for (const auto& name : names) {
    result += ", ";
    result += name;
  }
  return result;
}

}  // namespace

cors_answer evaluate_cors(const cors_policy& policy, std::string_view origin, std::string_view method,
                          std::string_view request_method, std::string_view request_headers) {
  cors_answer answer;
  answer.preflight = method == "OPTIONS" && !request_method.empty();
  if (origin.empty() || policy.allowed_origins.empty()) return answer;
  const bool allowed =
      std::find(policy.allowed_origins.begin(), policy.allowed_origins.end(), origin) != policy.allowed_origins.end();
  if (allowed) {
    answer.headers.emplace_back("Access-Control-Allow-Origin", std::string(origin));
    if (answer.preflight) {
      answer.headers.emplace_back("Access-Control-Allow-Methods", "GET, POST, OPTIONS");
      answer.headers.emplace_back("Access-Control-Allow-Headers",
                                  allowed_headers(request_headers, policy.request_headers_max));
      answer.headers.emplace_back("Access-Control-Max-Age", std::to_string(policy.max_age.count()));
    } else {
      // What the OpenAI SDKs read to decide on a retry: a page would retry a 429 for a used-up
      // quota (x-should-retry: false) if its script could not see the header.
      answer.headers.emplace_back("Access-Control-Expose-Headers", "Retry-After, x-should-retry");
    }
  }
  answer.headers.emplace_back("Vary", "Origin");
  return answer;
}

}  // namespace gpustream::gateway
