// CORS limited to configured origins: allowed origins are echoed, others get no Access-Control-*
// header, preflights are recognised and answered with methods, headers and max-age.
#include "gateway/cors.hpp"

#include <gtest/gtest.h>

namespace gpustream::gateway {
namespace {

using headers = std::vector<std::pair<std::string, std::string>>;

const cors_policy policy{{"https://app.example.com", "http://localhost:5173"}};

bool has_access_control_header(const cors_answer& answer) {
  for (const auto& [name, value] : answer.headers) {
    if (name.starts_with("Access-Control-")) return true;
  }
  return false;
}

TEST(cors, an_allowed_origin_is_echoed_on_actual_requests) {
  const auto answer = evaluate_cors(policy, "https://app.example.com", "POST");
  EXPECT_FALSE(answer.preflight);
  EXPECT_EQ(answer.headers, (headers{{"Access-Control-Allow-Origin", "https://app.example.com"},
                                     {"Access-Control-Expose-Headers", "Retry-After, x-should-retry"},
                                     {"Vary", "Origin"}}));
  EXPECT_EQ(evaluate_cors(policy, "http://localhost:5173", "GET").headers.front().second, "http://localhost:5173");
}

TEST(cors, an_origin_not_configured_gets_no_cors_headers) {
  for (const std::string_view origin :
       {"https://evil.example", "https://app.example.com.evil.example", "http://app.example.com",
        "https://APP.example.com", "https://app.example.com/", "null", "*"}) {
    const auto answer = evaluate_cors(policy, origin, "POST");
    EXPECT_FALSE(has_access_control_header(answer)) << origin;
    // Only Vary, so a shared cache does not hand this answer to an allowed origin or vice versa.
    EXPECT_EQ(answer.headers, (headers{{"Vary", "Origin"}})) << origin;
  }
  const auto preflight = evaluate_cors(policy, "https://evil.example", "OPTIONS", "POST", "authorization");
  EXPECT_TRUE(preflight.preflight);
  EXPECT_FALSE(has_access_control_header(preflight));
}

TEST(cors, without_origin_or_policy_there_is_nothing_to_add) {
  EXPECT_TRUE(evaluate_cors(policy, "", "POST").headers.empty());
  EXPECT_TRUE(evaluate_cors(cors_policy{}, "https://app.example.com", "POST").headers.empty());
  const auto preflight = evaluate_cors(cors_policy{}, "https://app.example.com", "OPTIONS", "POST");
  EXPECT_TRUE(preflight.preflight);
  EXPECT_TRUE(preflight.headers.empty());
}

TEST(cors, a_preflight_is_answered_with_methods_headers_and_max_age) {
  const auto answer = evaluate_cors(policy, "https://app.example.com", "OPTIONS", "POST", "authorization,content-type");
  EXPECT_TRUE(answer.preflight);
  EXPECT_EQ(answer.headers, (headers{{"Access-Control-Allow-Origin", "https://app.example.com"},
                                     {"Access-Control-Allow-Methods", "GET, POST, OPTIONS"},
                                     {"Access-Control-Allow-Headers", "Authorization, Content-Type"},
                                     {"Access-Control-Max-Age", "600"},
                                     {"Vary", "Origin"}}));
  cors_policy short_cache = policy;
  short_cache.max_age = std::chrono::seconds(5);
  EXPECT_EQ(evaluate_cors(short_cache, "https://app.example.com", "OPTIONS", "GET").headers[3].second, "5");
}

TEST(cors, only_options_with_a_requested_method_is_a_preflight) {
  EXPECT_FALSE(evaluate_cors(policy, "https://app.example.com", "OPTIONS").preflight);
  EXPECT_FALSE(evaluate_cors(policy, "https://app.example.com", "POST", "POST").preflight);
  EXPECT_TRUE(evaluate_cors(policy, "https://app.example.com", "OPTIONS", "POST").preflight);
}

TEST(cors, headers_the_openai_browser_sdk_asks_for_are_allowed) {
  const auto answer =
      evaluate_cors(policy, "https://app.example.com", "OPTIONS", "POST",
                    "authorization, content-type, x-stainless-arch, X-Stainless-Lang,x-stainless-retry-count, "
                    "x-stainless-arch");
  ASSERT_EQ(answer.headers.size(), 5u);
  EXPECT_EQ(answer.headers[2],
            (std::pair<std::string, std::string>{"Access-Control-Allow-Headers",
                                                 "Authorization, Content-Type, x-stainless-arch, x-stainless-lang, "
                                                 "x-stainless-retry-count"}));
}

TEST(cors, malformed_or_too_many_requested_headers_get_only_the_base_list) {
  const auto malformed = evaluate_cors(policy, "https://app.example.com", "OPTIONS", "POST", "x-ok, bad header");
  EXPECT_EQ(malformed.headers[2].second, "Authorization, Content-Type");
  const auto injected = evaluate_cors(policy, "https://app.example.com", "OPTIONS", "POST", "x-a\r\nSet-Cookie: a=b");
  EXPECT_EQ(injected.headers[2].second, "Authorization, Content-Type");

  cors_policy few = policy;
  few.request_headers_max = 2;
  EXPECT_EQ(evaluate_cors(few, "https://app.example.com", "OPTIONS", "POST", "x-a, x-b").headers[2].second,
            "Authorization, Content-Type, x-a, x-b");
  EXPECT_EQ(evaluate_cors(few, "https://app.example.com", "OPTIONS", "POST", "x-a, x-b, x-c").headers[2].second,
            "Authorization, Content-Type");
}

}  // namespace
}  // namespace gpustream::gateway
