#pragma once
/// Cross-origin resource sharing, limited to configured origins: which headers to add to a
/// response for a request's Origin, and how to answer a preflight. An origin not configured gets
/// no Access-Control-* header at all, so the browser blocks the page from reading the answer.
/// Pure: the server asks, adds the headers and answers preflights with 204.

#include <chrono>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace gpustream::gateway {

struct cors_policy {
  /// Exact origins ("https://app.example.com", scheme://host[:port], no trailing slash) whose pages
  /// may call the API. Empty: CORS is off. "null" (sandboxed frames, file:// pages) should not be
  /// listed: any page can produce it. Default: none.
  std::vector<std::string> allowed_origins;
  /// How long a browser may cache a preflight answer. Default: 600 s (Chromium caps it at 7200).
  std::chrono::seconds max_age{600};
  /// Most request header names a preflight may ask for; a longer list is answered without them
  /// (the browser then refuses). Default: 32.
  std::size_t request_headers_max = 32;
};

/// What to do about CORS for one request.
struct cors_answer {
  /// Headers to add to the response; empty when the request is not cross-origin or not allowed.
  std::vector<std::pair<std::string, std::string>> headers;
  /// The request is a preflight (OPTIONS with Access-Control-Request-Method): answer it at once
  /// with 204 and `headers`, without authentication and without running the handler.
  bool preflight = false;
};

/// Decides CORS for a request with header values `origin` (Origin), `method`, and for preflights
/// `request_method` (Access-Control-Request-Method) and `request_headers`
/// (Access-Control-Request-Headers); absent headers are passed as empty.
/// - Allowed origin, actual request: Access-Control-Allow-Origin echoing the origin,
///   Access-Control-Expose-Headers: Retry-After, x-should-retry (so browser SDKs back off on a 429,
///   and do not retry one for a used-up quota), Vary: Origin.
/// - Allowed origin, preflight: Allow-Origin, Allow-Methods "GET, POST, OPTIONS", Allow-Headers
///   "Authorization, Content-Type" plus the well-formed names the browser asked for (the official
///   openai SDK sends x-stainless-* headers; the API authenticates by bearer token, never by
///   cookie, so no header grants an allowed page more than its token), Max-Age, Vary.
/// - Any other origin with CORS on: only Vary: Origin, so caches keep answers for different
///   origins apart. No Origin header, or CORS off: nothing.
[[nodiscard]] cors_answer evaluate_cors(const cors_policy& policy, std::string_view origin, std::string_view method,
                                        std::string_view request_method = {}, std::string_view request_headers = {});

}  // namespace gpustream::gateway
