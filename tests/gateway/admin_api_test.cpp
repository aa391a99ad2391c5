// The admin API and the provider's own page on the real actor runtime (a temporary buffered store,
// a real actor system): every endpoint, authentication, validation, read-your-writes of new keys
// and tokens, request timeouts, and the directory rebuilt after a restart equal to the live one.
#include <boost/json.hpp>
#include <caf/actor_system.hpp>
#include <caf/actor_system_config.hpp>
#include <caf/scoped_actor.hpp>
#include <caf/send.hpp>
#include <caf/typed_event_based_actor.hpp>
#include <gtest/gtest.h>
#include <stdlib.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <future>
#include <string>
#include <vector>

#include "actors/ad_server.hpp"
#include "actors/errors.hpp"
#include "actors/payout_runner.hpp"
#include "actors/runtime.hpp"
#include "base/text.hpp"
#include "events/codec.hpp"
#include "gateway/admin_api.hpp"
#include "gateway/directory.hpp"
#include "gateway/provider_api.hpp"
#include "gateway/secrets.hpp"
#include "storage/event_store.hpp"

namespace gpustream::gateway {
namespace {

namespace json = boost::json;
using namespace std::chrono_literals;

/// Generous: only a broken handler comes near it.
constexpr auto wait_max = 30s;
const std::string admin_token = "admin-secret-for-tests";

class temp_dir {
 public:
  temp_dir() {
    std::string pattern = (std::filesystem::temp_directory_path() / "admin_api_test_XXXXXX").string();
    GPUSTREAM_ENSURE(::mkdtemp(pattern.data()) != nullptr);
    path_ = pattern;
  }
  ~temp_dir() {
    std::error_code ignored;
    std::filesystem::remove_all(path_, ignored);
  }
  temp_dir(const temp_dir&) = delete;
  temp_dir& operator=(const temp_dir&) = delete;
  [[nodiscard]] const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
};

struct test_config : caf::actor_system_config {
  test_config() { actors::add_error_categories(*this); }
};

/// A ledger that takes every request and never answers: for the timeout path.
actors::ledger_actor::behavior_type silent_ledger(actors::ledger_actor::pointer self) {
  return {
      [self](domain::ledger::command&) { return self->make_response_promise<actors::command_reply>(); },
      [self](std::vector<domain::ledger::command>&) {
        return self->make_response_promise<actors::command_reply>();
      },
      [self](actors::state_atom) { return self->make_response_promise<domain::ledger::state>(); },
      [](actors::passivate_atom) {},
      [self](actors::ledger_aggregate::query&) {
        return self->make_response_promise<actors::ledger_aggregate::answer>();
      },
  };
}

class admin_api_test : public ::testing::Test {
 protected:
  admin_api_test() : system_(config_) { start(); }

  ~admin_api_test() override {
    stop();
    EXPECT_EQ(replies_.load(), requests_.load()) << "every request is answered exactly once";
  }

  void start(admin_api_options options = {}) {
    storage::store_options store_options;
    store_options.mode = storage::durability::buffered;
    auto opened = storage::event_store::open(dir_.path(), store_options);
    GPUSTREAM_ENSURE(opened.has_value());
    store_ = std::move(*opened);
    actors::runtime_options runtime_options;
    runtime_options.payouts.run_interval = 0ms;  // only when asked
    runtime_ = actors::start_runtime(system_, store_, runtime_options);
    auto directory_opened = directory::open(store_);
    GPUSTREAM_ENSURE(directory_opened.has_value());
    directory_ = std::move(*directory_opened);
    if (options.admin_token.empty()) options.admin_token = admin_token;
    make_api(std::move(options));
    provider_api_ = std::make_unique<provider_api>(directory_);
  }

  void make_api_with_a_silent_ledger();

  void make_api(admin_api_options options, std::optional<actors::ledger_actor> ledger = {}) {
    auto peers = admin_peers_of(runtime_);
    if (ledger) peers.ledger = *ledger;
    api_ = std::make_unique<admin_api>(system_, std::move(peers), directory_, std::move(options));
  }

  void stop() {
    api_.reset();
    provider_api_.reset();
    runtime_.stop();
    for (const auto& extra : extra_actors_) caf::anon_send_exit(extra, caf::exit_reason::user_shutdown);
    system_.await_all_actors_done();
    directory_.reset();
    store_.reset();
  }

  /// Sends a request to the admin API and waits for its answer.
  http_response call(const std::string& method, const std::string& target,
                     const std::string& body = "",
                     std::optional<std::string> authorization = "Bearer " + admin_token,
                     const std::string& remote_address = "127.0.0.1") {
    http_request request;
    request.method = method;
    request.target = target;
    request.body = body;
    request.remote_address = remote_address;
    if (authorization) request.headers["authorization"] = *authorization;
    return answer_of([&](auto reply) { api_->handle(request, std::move(reply)); });
  }

  /// A POST with an Idempotency-Key header.
  http_response post_once(const std::string& target, const std::string& body, const std::string& idempotency_key) {
    http_request request;
    request.method = "POST";
    request.target = target;
    request.body = body;
    request.remote_address = "127.0.0.1";
    request.headers["authorization"] = "Bearer " + admin_token;
    request.headers["idempotency-key"] = idempotency_key;
    return answer_of([&](auto reply) { api_->handle(request, std::move(reply)); });
  }

  /// GET /v1/providers/me (or `method`) with a provider token.
  http_response me(std::optional<std::string> token, const std::string& method = "GET",
                   const std::string& target = "/v1/providers/me") {
    http_request request;
    request.method = method;
    request.target = target;
    if (token) request.headers["authorization"] = "Bearer " + *token;
    return answer_of([&](auto reply) { provider_api_->handle(request, std::move(reply)); });
  }

  template <class Handle>
  http_response answer_of(Handle handle) {
    ++requests_;
    auto promise = std::make_shared<std::promise<http_response>>();
    auto answered = std::make_shared<std::atomic<bool>>(false);
    auto future = promise->get_future();
    handle([this, promise, answered](http_response response) {
      ++replies_;
      if (!answered->exchange(true)) promise->set_value(std::move(response));
    });
    if (future.wait_for(wait_max) != std::future_status::ready) {
      ADD_FAILURE() << "no answer within " << wait_max.count() << " s";
      return {};
    }
    return future.get();
  }

  /// Waits until the directory has applied everything in the log.
  void catch_up() {
    ASSERT_TRUE(directory_->wait_for_position(store_->last_position(), wait_max));
  }

  template <class T, class Dest, class... Ts>
  T ask(const Dest& dest, Ts&&... xs) {
    caf::scoped_actor self{system_};
    T result{};
    self->request(dest, caf::timespan{wait_max}, std::forward<Ts>(xs)...)
        .receive([&](T& value) { result = std::move(value); },
                 [&](caf::error& failure) { ADD_FAILURE() << actors::describe(failure); });
    return result;
  }

  /// A user made through the API: (id, api key).
  std::pair<std::string, std::string> make_user(const std::string& body) {
    const auto response = call("POST", "/admin/users", body);
    EXPECT_EQ(response.status, 201u) << response.body;
    const auto answer = json::parse(response.body).as_object();
    return {std::string(answer.at("id").as_string()), std::string(answer.at("api_key").as_string())};
  }

  /// A provider made through the API: (id, token, owner).
  std::tuple<std::string, std::string, std::string> make_provider(const std::string& body) {
    const auto response = call("POST", "/admin/providers", body);
    EXPECT_EQ(response.status, 201u) << response.body;
    const auto answer = json::parse(response.body).as_object();
    return {std::string(answer.at("id").as_string()), std::string(answer.at("token").as_string()),
            std::string(answer.at("owner_user_id").as_string())};
  }

  temp_dir dir_;
  test_config config_;
  caf::actor_system system_;
  std::shared_ptr<storage::event_store> store_;
  actors::runtime runtime_;
  std::vector<caf::actor> extra_actors_;
  std::shared_ptr<directory> directory_;
  std::unique_ptr<admin_api> api_;
  std::unique_ptr<provider_api> provider_api_;
  std::atomic<int> requests_{0};
  std::atomic<int> replies_{0};
};

json::object error_of(const http_response& response) {
  return json::parse(response.body).as_object().at("error").as_object();
}

bool has_header(const http_response& response, std::string_view name, std::string_view value) {
  for (const auto& [n, v] : response.headers) {
    if (n == name && v == value) return true;
  }
  return false;
}

/// Expects a 400 whose `param` names `field`.
void expect_invalid(const http_response& response, std::string_view field) {
  EXPECT_EQ(response.status, 400u) << response.body;
  if (response.status != 400) return;
  const auto error = error_of(response);
  EXPECT_EQ(error.at("type").as_string(), "invalid_request_error");
  EXPECT_EQ(error.at("param"), json::value(field)) << response.body;
}

// -- Authentication and routing. ------------------------------------------------------------------

TEST_F(admin_api_test, without_a_configured_token_every_admin_request_is_503_saying_how_to_set_one) {
  admin_api_options options;  // no token
  make_api(options);
  for (const auto& [method, target] : {std::pair{"POST", "/admin/users"}, std::pair{"GET", "/admin/jobs"}}) {
    const auto response = call(method, target, "{}");
    EXPECT_EQ(response.status, 503u);
    const auto error = error_of(response);
    EXPECT_NE(std::string(error.at("message").as_string()).find("--admin-token"), std::string::npos);
    EXPECT_EQ(error.at("type").as_string(), "server_error");
  }
}

TEST_F(admin_api_test, a_missing_or_wrong_admin_token_is_401) {
  for (const std::optional<std::string>& authorization :
       {std::optional<std::string>{}, std::optional<std::string>{"Bearer wrong"},
        std::optional<std::string>{"Bearer " + admin_token + "x"},
        std::optional<std::string>{"Basic " + admin_token}, std::optional<std::string>{"Bearer "}}) {
    const auto response = call("GET", "/admin/providers", "", authorization);
    EXPECT_EQ(response.status, 401u) << authorization.value_or("(none)");
    EXPECT_EQ(error_of(response).at("type").as_string(), "invalid_request_error");
    EXPECT_TRUE(has_header(response, "WWW-Authenticate", "Bearer"));
  }
  // Nothing was created by the refused requests.
  EXPECT_EQ(call("POST", "/admin/users", "{}", "Bearer nope").status, 401u);
  EXPECT_EQ(directory_->counts().users, 0u);
}

TEST_F(admin_api_test, an_address_sending_wrong_tokens_is_refused_even_the_right_one_for_a_while) {
  admin_api_options options;
  options.admin_token = admin_token;
  options.failed_auth = {1, 3, 100};  // 3 wrong tokens at once, then one a minute
  make_api(options);
  const std::string guesser = "192.0.2.7";
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(call("GET", "/admin/jobs", "", "Bearer guess" + std::to_string(i), guesser).status, 401u) << i;
  }
  // A missing token is no guess: it is not counted.
  EXPECT_EQ(call("GET", "/admin/jobs", "", std::nullopt, "192.0.2.8").status, 401u);
  for (const std::string& authorization : std::vector<std::string>{"Bearer guess3", "Bearer " + admin_token}) {
    const auto refused = call("GET", "/admin/jobs", "", authorization, guesser);
    EXPECT_EQ(refused.status, 429u) << authorization;
    EXPECT_TRUE(has_header(refused, "Retry-After", "60")) << authorization;
    EXPECT_NE(std::string(error_of(refused).at("message").as_string()).find("too many wrong admin tokens from 192.0.2.7"),
              std::string::npos);
  }
  // Another address is not held back by the first one's guesses.
  EXPECT_EQ(call("GET", "/admin/jobs", "", "Bearer " + admin_token, "192.0.2.8").status, 200u);
}

TEST_F(admin_api_test, an_ipv6_guesser_is_counted_by_its_64_and_an_ipv4_mapped_one_as_its_ipv4_address) {
  // A host holds a whole /64: counted by address, each of its addresses brought fresh guesses.
  admin_api_options options;
  options.admin_token = admin_token;
  options.failed_auth = {1, 3, 100};
  make_api(options);
  for (int i = 0; i < 3; ++i) {
    const auto address = "2001:db8:0:1::" + std::to_string(i + 1);
    EXPECT_EQ(call("GET", "/admin/jobs", "", "Bearer guess" + std::to_string(i), address).status, 401u) << address;
  }
  const auto refused = call("GET", "/admin/jobs", "", "Bearer guess3", "2001:db8:0:1:ffff::9");
  EXPECT_EQ(refused.status, 429u);
  EXPECT_NE(std::string(error_of(refused).at("message").as_string()).find("from 2001:db8:0:1::/64"),
            std::string::npos)
      << refused.body;
  EXPECT_EQ(call("GET", "/admin/jobs", "", "Bearer " + admin_token, "2001:db8:0:2::1").status, 200u)
      << "the next /64 is another host";

  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(call("GET", "/admin/jobs", "", "Bearer guess" + std::to_string(i), "192.0.2.9").status, 401u) << i;
  }
  EXPECT_EQ(call("GET", "/admin/jobs", "", "Bearer guess", "::ffff:192.0.2.9").status, 429u)
      << "the same IPv4 address written IPv4-mapped";
}

TEST_F(admin_api_test, unknown_paths_are_404_and_wrong_methods_405_with_allow) {
  EXPECT_EQ(call("GET", "/admin/nothing").status, 404u);
  EXPECT_EQ(call("GET", "/admin").status, 404u);
  const auto users = call("GET", "/admin/users");
  EXPECT_EQ(users.status, 405u);
  EXPECT_TRUE(has_header(users, "Allow", "POST"));
  const auto providers = call("DELETE", "/admin/providers");
  EXPECT_EQ(providers.status, 405u);
  EXPECT_TRUE(has_header(providers, "Allow", "GET, HEAD, POST"));
  EXPECT_TRUE(has_header(call("POST", "/admin/jobs"), "Allow", "GET, HEAD"));
  EXPECT_TRUE(has_header(call("POST", "/admin/accounts"), "Allow", "GET, HEAD"));
  EXPECT_TRUE(has_header(call("GET", "/admin/payouts/run"), "Allow", "POST"));
  EXPECT_TRUE(has_header(call("GET", "/admin/campaigns"), "Allow", "POST"));
  EXPECT_EQ(call("HEAD", "/admin/payouts/run").status, 405u) << "a HEAD runs nothing";
}

TEST_F(admin_api_test, a_head_is_answered_as_its_get) {
  for (const char* path : {"/admin/providers", "/admin/jobs", "/admin/accounts"}) {
    const auto get = call("GET", path);
    const auto head = call("HEAD", path);
    EXPECT_EQ(get.status, 200u) << path;
    EXPECT_EQ(head.status, 200u) << path;
    EXPECT_EQ(head.body, get.body) << path << ": the HTTP server leaves the body out, with its length";
  }
  EXPECT_EQ(call("HEAD", "/admin/jobs", "", "Bearer wrong").status, 401u) << "a HEAD needs the token too";
}

// -- Users. ---------------------------------------------------------------------------------------

TEST_F(admin_api_test, a_new_users_key_works_the_moment_the_request_returns_and_its_credit_is_in_the_ledger) {
  const auto response = call("POST", "/admin/users", R"({"tier":"premium","credit_micros":5000000})");
  ASSERT_EQ(response.status, 201u) << response.body;
  const auto answer = json::parse(response.body).as_object();
  const std::string id(answer.at("id").as_string());
  const std::string key(answer.at("api_key").as_string());
  EXPECT_EQ(id.substr(0, 2), "u_");
  EXPECT_EQ(key.substr(0, 4), "gsk_");
  EXPECT_EQ(key.size(), 47u);
  EXPECT_EQ(answer.at("tier").as_string(), "premium");
  EXPECT_EQ(answer.at("credit_micros").as_int64(), 5000000);

  // No waiting for the subscription: read-your-writes.
  EXPECT_EQ(directory_->user_by_api_key(key), (user_entry{id, events::user_tier::premium}));

  const auto accounts = call("GET", "/admin/accounts");
  ASSERT_EQ(accounts.status, 200u) << accounts.body;
  const auto listed = json::parse(accounts.body).as_object();
  EXPECT_EQ(listed.at("total_micros").as_int64(), 0) << "balances sum to zero";
  bool found = false;
  for (const auto& row : listed.at("data").as_array()) {
    if (row.at("account").as_string() == "user-" + id) {
      found = true;
      EXPECT_EQ(row.at("balance_micros").as_int64(), 5000000);
    }
  }
  EXPECT_TRUE(found) << accounts.body;

  // The user's stream records the deposit, and the key is stored only as its digest.
  const auto user = ask<domain::user_state>(runtime_.users, id, actors::state_atom::value);
  EXPECT_EQ(user.deposits.size(), 1u);
  EXPECT_EQ(user.tier, events::user_tier::premium);
  auto log = store_->read_all(1, 10'000);
  ASSERT_TRUE(log.has_value());
  bool digest_stored = false;
  for (const auto& r : *log) {
    EXPECT_EQ(r.payload.find(key), std::string::npos) << "the secret key reached the log";
    EXPECT_EQ(r.payload.find(key.substr(4)), std::string::npos) << "the secret key reached the log";
    auto event = events::decode_payload(r.type, {reinterpret_cast<const std::byte*>(r.payload.data()),
                                                 r.payload.size()});
    ASSERT_TRUE(event.has_value());
    if (const auto* issued = std::get_if<events::api_key_issued>(&*event)) {
      digest_stored = issued->key_hash == sha256(key);
    }
  }
  EXPECT_TRUE(digest_stored);
}

TEST_F(admin_api_test, a_free_user_without_credit_moves_no_money) {
  const auto [id, key] = make_user(R"({"tier":"free"})");
  EXPECT_EQ(directory_->user_by_api_key(key), (user_entry{id, events::user_tier::free}));
  const auto [other, other_key] = make_user("{}");  // free is the default
  EXPECT_EQ(directory_->user(other)->tier, events::user_tier::free);
  const auto accounts = json::parse(call("GET", "/admin/accounts").body).as_object();
  EXPECT_TRUE(accounts.at("data").as_array().empty());
}

TEST_F(admin_api_test, user_fields_are_validated_by_name) {
  expect_invalid(call("POST", "/admin/users", R"({"tier":"gold"})"), "tier");
  expect_invalid(call("POST", "/admin/users", R"({"tier":1})"), "tier");
  expect_invalid(call("POST", "/admin/users", R"({"credit_micros":-1})"), "credit_micros");
  expect_invalid(call("POST", "/admin/users", R"({"credit_micros":1.5})"), "credit_micros");
  expect_invalid(call("POST", "/admin/users", R"({"credit_micros":"100"})"), "credit_micros");
  expect_invalid(call("POST", "/admin/users", R"({"credit_micros":100000000001})"), "credit_micros");
  expect_invalid(call("POST", "/admin/users", R"({"display_name":7})"), "display_name");
  // A misspelt field is refused, not read as absent (a premium user without its credit).
  const auto misspelt = call("POST", "/admin/users", R"({"tier":"premium","credit":5000000})");
  expect_invalid(misspelt, "credit");
  EXPECT_NE(misspelt.body.find("unknown field 'credit'; the fields are: tier, credit_micros, display_name"),
            std::string::npos)
      << misspelt.body;
  expect_invalid(call("POST", "/admin/users", R"({"display_name":")" + std::string(201, 'x') + "\"}"),
                 "display_name");
  // A field given twice is refused: a reader of the body may take the first, the parser the last.
  const auto twice = call("POST", "/admin/users", R"({"tier":"free","credit_micros":0,"credit_micros":100000000})");
  expect_invalid(twice, "credit_micros");
  EXPECT_NE(twice.body.find("field 'credit_micros' is given twice; give each field once"), std::string::npos)
      << twice.body;
  // Also spelt differently (escaped), and in a campaign's body.
  expect_invalid(call("POST", "/admin/users", R"({"tier":"free","t\u0069er":"premium"})"), "tier");
  const auto keywords_twice =
      call("POST", "/admin/campaigns",
           R"({"advertiser":"a","title":"t","text":"x","url":"https://a.example","keywords":["k"],)"
           R"("categories":[],"cpm_bid_micros":1000,"budget_micros":1000000,"daily_budget_micros":1000000,)"
           R"("frequency_cap_per_day":3,"keywords":["again"]})");
  expect_invalid(keywords_twice, "keywords");
  EXPECT_NE(keywords_twice.body.find("given twice"), std::string::npos) << keywords_twice.body;
  // Keys of different objects may repeat: refused for the field's type, not as given twice.
  const auto nested = call("POST", "/admin/users", R"({"tier":{"x":1},"display_name":{"x":1}})");
  EXPECT_EQ(nested.status, 400u) << nested.body;
  EXPECT_EQ(nested.body.find("given twice"), std::string::npos) << nested.body;
  // A long field name is cut at a character's start: the 64th byte is inside the 'é'.
  const auto long_name = call("POST", "/admin/users", "{\"" + std::string(63, 'a') + "\xC3\xA9\":1}");
  EXPECT_EQ(long_name.status, 400u);
  EXPECT_TRUE(valid_utf8(long_name.body)) << long_name.body;
  EXPECT_NE(long_name.body.find("unknown field '" + std::string(63, 'a') + "...'"), std::string::npos)
      << long_name.body;
  for (const std::string body : {"", "not json", "[1,2]", R"({"a":[[[[[[[[[1]]]]]]]]]})"}) {
    const auto response = call("POST", "/admin/users", body);
    EXPECT_EQ(response.status, 400u) << body;
    EXPECT_EQ(error_of(response).at("type").as_string(), "invalid_request_error");
  }
  EXPECT_EQ(directory_->counts().users, 0u) << "nothing is created by an invalid request";
}

// -- Providers and their own page. ------------------------------------------------------------------

TEST_F(admin_api_test, a_new_providers_token_works_at_once_with_or_without_an_owner) {
  const auto [id, token, owner] = make_provider(R"({"name":"rig one"})");
  EXPECT_EQ(id.substr(0, 2), "p_");
  EXPECT_EQ(token.substr(0, 4), "gsp_");
  EXPECT_EQ(token.size(), 47u);
  const auto found = directory_->provider_by_token(token);
  ASSERT_TRUE(found.has_value());
  EXPECT_EQ(found->provider_id, id);
  EXPECT_EQ(found->name, "rig one");
  EXPECT_TRUE(directory_->user(owner).has_value()) << "a provider without owner gets a new one";

  const auto [user, key] = make_user("{}");
  const auto [second, second_token, second_owner] =
      make_provider(R"({"name":"rig two","owner_user_id":")" + user + "\"}");
  EXPECT_EQ(second_owner, user);
  EXPECT_EQ(directory_->provider_by_token(second_token)->owner_user_id, user);

  expect_invalid(call("POST", "/admin/providers", R"({"name":"x","owner_user_id":"u_nobody"})"),
                 "owner_user_id");
  expect_invalid(call("POST", "/admin/providers", R"({})"), "name");
  expect_invalid(call("POST", "/admin/providers", R"({"name":""})"), "name");
  expect_invalid(call("POST", "/admin/providers", R"({"name":["x"]})"), "name");
  expect_invalid(call("POST", "/admin/providers", R"({"name":"x","owner":"u_1"})"), "owner");
  expect_invalid(call("POST", "/admin/providers", R"({"name":")" + std::string(201, 'n') + "\"}"), "name");
  EXPECT_EQ(directory_->counts().providers, 2u);
}

TEST_F(admin_api_test, a_providers_token_is_replaced_and_only_the_new_one_opens_its_link) {
  const auto created = call("POST", "/admin/providers", R"({"name":"rig-1"})");
  ASSERT_EQ(created.status, 201u) << created.body;
  const auto first = json::parse(created.body).as_object();
  const std::string id(first.at("id").as_string());
  const std::string old_token(first.at("token").as_string());
  const auto replaced = call("POST", "/admin/providers/" + id + "/token", "");
  ASSERT_EQ(replaced.status, 201u) << replaced.body;
  const auto answer = json::parse(replaced.body).as_object();
  EXPECT_EQ(answer.at("id").as_string(), id);
  const std::string new_token(answer.at("token").as_string());
  EXPECT_NE(new_token, old_token);
  ASSERT_TRUE(directory_->provider_by_token(new_token));
  EXPECT_EQ(directory_->provider_by_token(new_token)->provider_id, id);
  EXPECT_FALSE(directory_->provider_by_token(old_token)) << "the old token opens nothing";
  EXPECT_TRUE(directory_->token_is_of(sha256(new_token), id));
  EXPECT_FALSE(directory_->token_is_of(sha256(old_token), id));
  EXPECT_EQ(call("POST", "/admin/providers/p_nobody/token", "").status, 404u);
  EXPECT_EQ(call("GET", "/admin/providers/" + id + "/token", "").status, 405u);
  EXPECT_EQ(call("POST", "/admin/providers/" + id + "/x/token", "").status, 404u);
}

TEST_F(admin_api_test, a_users_keys_are_replaced_by_one_new_key_and_only_it_works) {
  const auto created = call("POST", "/admin/users", R"({"tier":"premium"})");
  ASSERT_EQ(created.status, 201u) << created.body;
  const auto first = json::parse(created.body).as_object();
  const std::string id(first.at("id").as_string());
  const std::string old_key(first.at("api_key").as_string());
  const auto replaced = call("POST", "/admin/users/" + id + "/key", "{}");
  ASSERT_EQ(replaced.status, 201u) << replaced.body;
  const auto answer = json::parse(replaced.body).as_object();
  EXPECT_EQ(answer.at("id").as_string(), id);
  const std::string new_key(answer.at("api_key").as_string());
  EXPECT_EQ(new_key.substr(0, 4), "gsk_");
  EXPECT_NE(new_key, old_key);
  EXPECT_EQ(directory_->user_by_api_key(new_key), (user_entry{id, events::user_tier::premium}));
  EXPECT_FALSE(directory_->user_by_api_key(old_key)) << "the old key works no more, at once";
  catch_up();
  EXPECT_FALSE(directory_->user_by_api_key(old_key)) << "nor once the log is read";
  const auto state = ask<domain::user_state>(runtime_.users, id, actors::state_atom::value);
  std::size_t active = 0;
  for (const auto& [key_id, key] : state.api_keys) active += key.revoked ? 0 : 1;
  EXPECT_EQ(active, 1u);
  EXPECT_FALSE(state.api_keys.at(std::string(answer.at("key_id").as_string())).revoked);

  EXPECT_EQ(call("POST", "/admin/users/u_nobody/key", "").status, 404u);
  EXPECT_EQ(call("GET", "/admin/users/" + id + "/key").status, 405u);
  EXPECT_EQ(call("POST", "/admin/users/" + id + "/key", R"({"key":"mine"})").status, 400u) << "no body but {}";
  EXPECT_EQ(call("POST", "/admin/users/" + id + "/key?now=1", "").status, 400u);
  EXPECT_EQ(call("POST", "/admin/users/" + id + "/x/key", "").status, 404u);
}

TEST_F(admin_api_test, providers_are_listed_with_their_live_state_when_wired) {
  const auto [first, first_token, first_owner] = make_provider(R"({"name":"a"})");
  const auto [second, second_token, second_owner] = make_provider(R"({"name":"b"})");
  admin_api_options options;
  options.admin_token = admin_token;
  options.live_state = [id = first](const std::string& provider_id) -> std::optional<provider_live_state> {
    if (provider_id != id) return std::nullopt;
    return provider_live_state{1, 2, 42, 90, 12'500};
  };
  make_api(options);
  // The first provider goes online (its link's hello, as the link session would send it).
  domain::provider::command connect = domain::provider::connect{{}, events::backend_kind::openai,
                                                                "http://127.0.0.1:1234/v1", "test"};
  (void)ask<actors::command_reply>(runtime_.providers, first, std::move(connect));
  catch_up();

  const auto response = call("GET", "/admin/providers");
  ASSERT_EQ(response.status, 200u) << response.body;
  const auto data = json::parse(response.body).as_object().at("data").as_array();
  ASSERT_EQ(data.size(), 2u);
  for (const auto& row : data) {
    const auto& p = row.as_object();
    if (p.at("id").as_string() == first) {
      EXPECT_EQ(p.at("status").as_string(), "online");
      EXPECT_EQ(p.at("live").at("load_percent").as_int64(), 42);
      EXPECT_EQ(p.at("live").at("tokens_per_second_milli").as_int64(), 12'500);
    } else {
      EXPECT_EQ(p.at("id").as_string(), second);
      EXPECT_EQ(p.at("status").as_string(), "offline");
      EXPECT_FALSE(p.contains("live"));
    }
    EXPECT_EQ(p.at("level").as_string(), "Bronze");
    EXPECT_FALSE(p.contains("token"));
  }
  const auto page = json::parse(call("GET", "/admin/providers?limit=1").body);
  ASSERT_EQ(page.at("data").as_array().size(), 1u);
  EXPECT_TRUE(page.at("has_more").as_bool());
  const std::string shown(page.at("data").as_array()[0].at("id").as_string());
  const auto next = json::parse(call("GET", "/admin/providers?limit=1&after=" + shown).body);
  ASSERT_EQ(next.at("data").as_array().size(), 1u);
  EXPECT_NE(next.at("data").as_array()[0].at("id").as_string(), shown);
  EXPECT_FALSE(next.at("has_more").as_bool());
  expect_invalid(call("GET", "/admin/providers?limit=0"), "limit");
  expect_invalid(call("GET", "/admin/providers?limit=abc"), "limit");
  expect_invalid(call("GET", "/admin/providers?limit=1001"), "limit");
}

TEST_F(admin_api_test, the_provider_page_shows_earnings_and_the_payouts_a_run_requested) {
  const auto [user, key] = make_user(R"({"tier":"premium","credit_micros":30000000})");
  const auto [provider, token, owner] = make_provider(R"({"name":"rig"})");

  auto page = me(token);
  ASSERT_EQ(page.status, 200u) << page.body;
  auto body = json::parse(page.body).as_object();
  EXPECT_EQ(body.at("id").as_string(), provider);
  EXPECT_EQ(body.at("status").as_string(), "offline");
  EXPECT_EQ(body.at("level").as_string(), "Bronze");
  EXPECT_EQ(body.at("earnings").at("balance_micros").as_int64(), 0);
  EXPECT_TRUE(body.at("payouts").as_array().empty());
  EXPECT_EQ(page.body.find(token), std::string::npos);

  // A premium job's settlement pays the provider 20 USD minus a 2 USD fee.
  domain::ledger::command settle = domain::record_transfers{
      "job-j1",
      {{"job-j1/usage", "user-" + user, "provider-" + provider, 20'000'000,
        events::transfer_kind::usage, "j1"},
       {"job-j1/platform_fee", "provider-" + provider, "platform", 2'000'000,
        events::transfer_kind::platform_fee, "j1"}}};
  (void)ask<actors::command_reply>(runtime_.ledger, std::move(settle));

  // A run takes no body and no query: one provider's or a dry run, asked so, would pay everyone
  // due for real.
  expect_invalid(call("POST", "/admin/payouts/run", R"({"provider_id":")" + provider + R"("})"), "provider_id");
  expect_invalid(call("POST", "/admin/payouts/run?dry_run=1"), "dry_run");
  EXPECT_EQ(call("POST", "/admin/payouts/run", "[]").status, 400u);

  // 18 USD is over the 10 USD threshold: the run requests a payout of all of it (so the refused
  // runs paid nothing).
  const auto run = call("POST", "/admin/payouts/run", "{}");
  ASSERT_EQ(run.status, 200u) << run.body;
  const auto report = json::parse(run.body).as_object();
  ASSERT_EQ(report.at("payouts").as_array().size(), 1u) << run.body;
  const auto& payout = report.at("payouts").as_array()[0].as_object();
  EXPECT_EQ(payout.at("provider_id").as_string(), provider);
  EXPECT_EQ(payout.at("amount_micros").as_int64(), 18'000'000);
  EXPECT_EQ(payout.at("status").as_string(), "requested");
  EXPECT_TRUE(report.at("problems").as_array().empty());

  catch_up();
  page = me(token);
  ASSERT_EQ(page.status, 200u);
  body = json::parse(page.body).as_object();
  EXPECT_EQ(body.at("earnings").at("earned_micros").as_int64(), 18'000'000);
  EXPECT_EQ(body.at("earnings").at("paid_out_micros").as_int64(), 18'000'000);
  EXPECT_EQ(body.at("earnings").at("balance_micros").as_int64(), 0);
  ASSERT_EQ(body.at("payouts").as_array().size(), 1u);
  EXPECT_EQ(body.at("payouts").as_array()[0].at("status").as_string(), "requested");
  EXPECT_EQ(body.at("payouts").as_array()[0].at("amount_micros").as_int64(), 18'000'000);

  // A second run finds nothing due.
  const auto again = json::parse(call("POST", "/admin/payouts/run").body).as_object();
  EXPECT_TRUE(again.at("payouts").as_array().empty());
}

TEST_F(admin_api_test, the_provider_page_lists_the_newest_payouts_up_to_payouts_listed_max) {
  const auto [provider, token, owner] = make_provider(R"({"name":"rig"})");
  // Three payouts on the provider's streams (the page reads them; no money needs to move here).
  for (int n = 1; n <= 3; ++n) {
    domain::payout::command request = domain::request_payout{"pay-" + std::to_string(n), provider, n * 1'000'000, false,
                                                              10'000'000};
    EXPECT_EQ(ask<actors::command_reply>(runtime_.payouts, "pay-" + std::to_string(n), std::move(request)).version, 1u);
  }
  catch_up();
  provider_api_ = std::make_unique<provider_api>(directory_, provider_api_options{.payouts_listed_max = 2, .clock_us = {}});
  const auto page = me(token);
  ASSERT_EQ(page.status, 200u) << page.body;
  const auto payouts = json::parse(page.body).at("payouts").as_array();
  ASSERT_EQ(payouts.size(), 2u) << page.body;
  EXPECT_EQ(payouts[0].at("amount_micros").as_int64(), 3'000'000) << "newest first";
  EXPECT_EQ(payouts[1].at("amount_micros").as_int64(), 2'000'000);
}

TEST_F(admin_api_test, a_create_retried_with_its_idempotency_key_moves_its_money_once) {
  // A create whose answer timed out (503) went on; its retry must not make a second user with a
  // second credit, or a second campaign with a second escrow.
  const std::string user_body = R"({"tier":"premium","credit_micros":5000000})";
  const auto first = post_once("/admin/users", user_body, "order-77");
  ASSERT_EQ(first.status, 201u) << first.body;
  const auto again = post_once("/admin/users", user_body, "order-77");
  ASSERT_EQ(again.status, 201u) << again.body;
  const auto user = json::parse(first.body).at("id").as_string();
  EXPECT_EQ(json::parse(again.body).at("id").as_string(), user) << "the same user";
  EXPECT_NE(json::parse(again.body).at("api_key"), json::parse(first.body).at("api_key"))
      << "a new key: the first answer's may never have arrived";
  catch_up();
  EXPECT_FALSE(directory_->user_by_api_key(std::string(json::parse(first.body).at("api_key").as_string())))
      << "the retry's key replaces the earlier attempt's";
  EXPECT_TRUE(directory_->user_by_api_key(std::string(json::parse(again.body).at("api_key").as_string())));
  const auto another = post_once("/admin/users", user_body, "order-78");
  ASSERT_EQ(another.status, 201u) << another.body;
  EXPECT_NE(json::parse(another.body).at("id").as_string(), user) << "another key, another user";
  for (const std::string other : {R"({"tier":"free","credit_micros":5000000})", R"({"tier":"premium","credit_micros":6000000})"}) {
    const auto refused = post_once("/admin/users", other, "order-77");
    EXPECT_EQ(refused.status, 409u) << "the key names another request: " << refused.body;
    EXPECT_EQ(refused.body.find("api_key"), std::string::npos) << "no key for a refused request: " << refused.body;
  }
  // Its key replaced since (the first key leaked), a late retry of the create is refused: it would
  // revoke the replacement, which it never issued.
  const auto replaced = call("POST", "/admin/users/" + std::string(user) + "/key", "{}");
  ASSERT_EQ(replaced.status, 201u) << replaced.body;
  const auto late = post_once("/admin/users", user_body, "order-77");
  EXPECT_EQ(late.status, 409u) << late.body;
  EXPECT_NE(late.body.find("replaced since with POST /admin/users/" + std::string(user) + "/key"), std::string::npos)
      << late.body;
  EXPECT_EQ(late.body.find("api_key"), std::string::npos) << "no key for a refused request: " << late.body;
  catch_up();
  EXPECT_TRUE(directory_->user_by_api_key(std::string(json::parse(replaced.body).at("api_key").as_string())))
      << "the replacement still works";

  const std::string campaign_body = R"({"advertiser":"acme","title":"T","text":"t","url":"https://a.example",
      "keywords":["gpu"],"cpm_bid_micros":2000000,"budget_micros":7000000})";
  const auto campaign = post_once("/admin/campaigns", campaign_body, "io-1");
  ASSERT_EQ(campaign.status, 201u) << campaign.body;
  const auto campaign_again = post_once("/admin/campaigns", campaign_body, "io-1");
  ASSERT_EQ(campaign_again.status, 201u) << campaign_again.body;
  EXPECT_EQ(json::parse(campaign_again.body).at("id"), json::parse(campaign.body).at("id"));

  auto balance = [&](const std::string& account) {
    const auto listed = json::parse(call("GET", "/admin/accounts?prefix=" + account).body);
    return listed.at("data").as_array().empty() ? std::int64_t{0}
                                                 : listed.at("data").as_array()[0].at("balance_micros").as_int64();
  };
  EXPECT_EQ(balance("user-" + std::string(user)), 5'000'000) << "credited once";
  EXPECT_EQ(balance("campaign-" + std::string(json::parse(campaign.body).at("id").as_string())), 7'000'000)
      << "escrowed once";
  EXPECT_EQ(balance("external"), -5'000'000 - 5'000'000 - 7'000'000) << "order-78's user, order-77's once, one campaign";

  // A provider's token is shown once: a retry is refused rather than given another.
  const auto provider = post_once("/admin/providers", R"({"name":"rig"})", "rig-1");
  ASSERT_EQ(provider.status, 201u) << provider.body;
  const auto provider_again = post_once("/admin/providers", R"({"name":"rig"})", "rig-1");
  EXPECT_EQ(provider_again.status, 409u) << provider_again.body;
  const std::string provider_id(json::parse(provider.body).at("id").as_string());
  EXPECT_NE(provider_again.body.find("get a new token with POST /admin/providers/" + provider_id + "/token"),
            std::string::npos)
      << provider_again.body;
  EXPECT_EQ(error_of(provider_again).at("param"), json::value("Idempotency-Key")) << provider_again.body;
  // The same key with other details names the key, not the owner it made.
  const auto renamed = post_once("/admin/providers", R"({"name":"rig 2"})", "rig-1");
  EXPECT_EQ(renamed.status, 409u) << renamed.body;
  EXPECT_EQ(error_of(renamed).at("param"), json::value("Idempotency-Key")) << renamed.body;
  EXPECT_NE(renamed.body.find("(provider " + provider_id + ") had other details"), std::string::npos)
      << renamed.body;

  expect_invalid(post_once("/admin/users", user_body, std::string(256, 'k')), "Idempotency-Key");
  expect_invalid(post_once("/admin/users", user_body, "two words"), "Idempotency-Key");
}

TEST_F(admin_api_test, a_requested_payout_is_settled_or_failed_by_the_payment_rails_word) {
  // Without settle_at_once a payout stays requested, its money in payouts_in_flight, until the
  // operator says what the payment did.
  const auto [user, key] = make_user(R"({"tier":"premium","credit_micros":60000000})");
  const auto [first, first_token, first_owner] = make_provider(R"({"name":"rig-1"})");
  const auto [second, second_token, second_owner] = make_provider(R"({"name":"rig-2"})");
  for (const auto& provider : {first, second}) {
    domain::ledger::command earn = domain::record_transfers{
        "job-" + provider, {{"job-" + provider + "/usage", "user-" + user, "provider-" + provider, 20'000'000,
                             events::transfer_kind::usage, provider}}};
    ASSERT_TRUE(ask<actors::command_reply>(runtime_.ledger, std::move(earn)).version > 0);
  }
  const auto run = call("POST", "/admin/payouts/run");
  ASSERT_EQ(run.status, 200u) << run.body;
  std::map<std::string, std::string> payout_of;
  const auto report = json::parse(run.body);
  for (const auto& p : report.at("payouts").as_array()) {
    payout_of[std::string(p.at("provider_id").as_string())] = std::string(p.at("id").as_string());
  }
  ASSERT_EQ(payout_of.size(), 2u) << run.body;
  const auto last = call("GET", "/admin/payouts/last");
  ASSERT_EQ(last.status, 200u) << last.body;
  EXPECT_EQ(json::parse(last.body), json::parse(run.body)) << "the last run's report, again";

  auto balance = [&](const std::string& account) {
    const auto listed = json::parse(call("GET", "/admin/accounts?prefix=" + account).body);
    for (const auto& row : listed.at("data").as_array()) {
      if (row.at("account").as_string() == account) return row.at("balance_micros").as_int64();
    }
    return std::int64_t{0};
  };
  EXPECT_EQ(balance("payouts_in_flight"), 40'000'000);

  const auto settle_path = "/admin/payouts/" + payout_of[first] + "/settle";
  const auto settled = call("POST", settle_path, R"({"external_reference":"wire-123"})");
  ASSERT_EQ(settled.status, 200u) << settled.body;
  EXPECT_EQ(json::parse(settled.body).at("status").as_string(), "settled");
  EXPECT_EQ(json::parse(settled.body).at("amount_micros").as_int64(), 20'000'000);
  EXPECT_EQ(call("POST", settle_path, R"({"external_reference":"wire-123"})").status, 200u) << "a repeat changes nothing";
  const auto other_reference = call("POST", settle_path, R"({"external_reference":"wire-456"})");
  EXPECT_EQ(other_reference.status, 409u) << other_reference.body;
  EXPECT_EQ(call("POST", "/admin/payouts/" + payout_of[first] + "/fail", R"({"reason":"bounced"})").status, 409u)
      << "a settled payout cannot fail";

  const auto failed = call("POST", "/admin/payouts/" + payout_of[second] + "/fail", R"({"reason":"account closed"})");
  ASSERT_EQ(failed.status, 200u) << failed.body;
  EXPECT_EQ(json::parse(failed.body).at("status").as_string(), "failed");
  EXPECT_EQ(balance("payouts_in_flight"), 0);
  EXPECT_EQ(balance("provider-" + second), 20'000'000) << "a failed payout's money returns to its provider";
  EXPECT_EQ(balance("provider-" + first), 0);
  EXPECT_EQ(json::parse(call("GET", "/admin/accounts").body).at("total_micros").as_int64(), 0);

  EXPECT_EQ(call("POST", "/admin/payouts/auto-nobody-1/settle", R"({"external_reference":"x"})").status, 404u);
  expect_invalid(call("POST", settle_path, R"({})"), "external_reference");
  expect_invalid(call("POST", settle_path, R"({"reason":"x"})"), "reason");
  expect_invalid(call("POST", settle_path, R"({"external_reference":")" + std::string(300, 'r') + R"("})"),
                 "external_reference");
  EXPECT_TRUE(has_header(call("GET", settle_path), "Allow", "POST"));
  EXPECT_TRUE(has_header(call("POST", "/admin/payouts/last"), "Allow", "GET, HEAD"));
  EXPECT_EQ(call("POST", "/admin/payouts/" + payout_of[first] + "/refund", "{}").status, 404u);
  EXPECT_EQ(call("POST", settle_path, R"({"external_reference":"wire-123"})", "Bearer wrong").status, 401u);
}

TEST_F(admin_api_test, the_provider_page_refuses_bad_tokens_methods_and_paths) {
  const auto [provider, token, owner] = make_provider(R"({"name":"rig"})");
  for (const std::optional<std::string>& bad : {std::optional<std::string>{},
                                                std::optional<std::string>{"gsp_wrong"},
                                                std::optional<std::string>{admin_token}}) {
    const auto response = me(bad);
    EXPECT_EQ(response.status, 401u);
    EXPECT_EQ(error_of(response).at("type").as_string(), "invalid_request_error");
  }
  EXPECT_EQ(me(token, "POST").status, 405u);
  EXPECT_EQ(me(token, "GET", "/v1/providers/you").status, 404u);
  EXPECT_EQ(me(token).status, 200u);
}

// -- Campaigns. -----------------------------------------------------------------------------------

TEST_F(admin_api_test, a_campaign_is_created_through_the_ad_server_with_its_budget_in_escrow) {
  const auto response = call("POST", "/admin/campaigns", R"({
      "advertiser":"acme","title":"Fast GPUs","text":"Rent one today","url":"https://acme.example",
      "keywords":["gpu","cuda"],"categories":["hardware"],"cpm_bid_micros":2000000,
      "budget_micros":50000000,"daily_budget_micros":10000000,"frequency_cap_per_day":3})");
  ASSERT_EQ(response.status, 201u) << response.body;
  const std::string id(json::parse(response.body).at("id").as_string());
  EXPECT_EQ(id.substr(0, 2), "c_");
  const auto accounts =
      json::parse(call("GET", "/admin/accounts?prefix=campaign-").body).as_object();
  ASSERT_EQ(accounts.at("data").as_array().size(), 1u);
  EXPECT_EQ(accounts.at("data").as_array()[0].at("account").as_string(), "campaign-" + id);
  EXPECT_EQ(accounts.at("data").as_array()[0].at("balance_micros").as_int64(), 50'000'000);
  catch_up();
  EXPECT_TRUE(directory_->campaign(id).has_value());
}

TEST_F(admin_api_test, campaign_fields_are_validated_by_name_and_by_the_campaigns_rules) {
  const std::string valid_tail =
      R"("text":"t","url":"https://a.example","cpm_bid_micros":2000000,"budget_micros":5000000})";
  expect_invalid(call("POST", "/admin/campaigns", R"({"advertiser":"a",)" + valid_tail), "title");
  expect_invalid(call("POST", "/admin/campaigns", R"({"title":"t",)" + valid_tail), "advertiser");
  expect_invalid(call("POST", "/admin/campaigns",
                      R"({"advertiser":"a","title":"t","keywords":"gpu",)" + valid_tail),
                 "keywords");
  expect_invalid(call("POST", "/admin/campaigns",
                      R"({"advertiser":"a","title":"t","categories":[1],)" + valid_tail),
                 "categories");
  // campaign_words_max (100) bounds what is read at all; the campaign's own rules allow fewer.
  const auto words = [](int n) {
    std::string list = "[";
    for (int i = 0; i < n; ++i) list += (i > 0 ? ",\"w" : "\"w") + std::to_string(i) + "\"";
    return list + "]";
  };
  const auto too_many = call("POST", "/admin/campaigns", R"({"advertiser":"a","title":"t","keywords":)" + words(101) +
                                                             "," + valid_tail);
  expect_invalid(too_many, "keywords");
  EXPECT_NE(too_many.body.find("keywords must be an array of at most 100 strings"), std::string::npos) << too_many.body;
  const auto past_the_rules = call("POST", "/admin/campaigns",
                                   R"({"advertiser":"a","title":"t","keywords":)" + words(100) + "," + valid_tail);
  EXPECT_EQ(past_the_rules.status, 400u) << past_the_rules.body;
  EXPECT_EQ(past_the_rules.body.find("at most 100 strings"), std::string::npos) << past_the_rules.body;
  EXPECT_NE(past_the_rules.body.find("50"), std::string::npos) << "the campaign's keywords_max: " << past_the_rules.body;
  expect_invalid(call("POST", "/admin/campaigns",
                      R"({"advertiser":"a","title":"t","text":"t","url":"u","cpm_bid_micros":"1","budget_micros":5})"),
                 "cpm_bid_micros");
  expect_invalid(call("POST", "/admin/campaigns",
                      R"({"advertiser":"a","title":"t","text":"t","url":"u","cpm_bid_micros":2000000})"),
                 "budget_micros");
  expect_invalid(call("POST", "/admin/campaigns", R"({"advertiser":"a","title":"t","daily_budget":1,)" + valid_tail),
                 "daily_budget");
  expect_invalid(call("POST", "/admin/campaigns",
                      R"({"advertiser":"a","title":"t","frequency_cap_per_day":0,)" + valid_tail),
                 "frequency_cap_per_day");
  // Well-formed, but the campaign's own rules refuse it: a daily budget above the whole budget.
  const auto refused = call("POST", "/admin/campaigns",
                            R"({"advertiser":"a","title":"t","daily_budget_micros":9000000,)" +
                                valid_tail);
  EXPECT_EQ(refused.status, 400u) << refused.body;
  EXPECT_NE(refused.body.find("daily"), std::string::npos) << refused.body;
  const auto accounts = json::parse(call("GET", "/admin/accounts").body).as_object();
  EXPECT_TRUE(accounts.at("data").as_array().empty()) << "no money moved for a refused campaign";
}

// -- Jobs and accounts. ---------------------------------------------------------------------------

TEST_F(admin_api_test, jobs_are_listed_newest_first_optionally_in_one_state) {
  const auto now_us = actors::system_clock_us();
  for (const auto* id : {"j1", "j2", "j3"}) {
    std::vector<domain::job::command> commands{
        domain::submit_job{id, "u", "llama", events::quality_tier::standard, 10, 20, 0, false, ""},
        domain::queue_job{0, now_us + 60'000'000}};
    (void)ask<actors::command_reply>(runtime_.jobs, std::string(id), std::move(commands));
  }
  domain::job::command fail = domain::fail_job{events::failure_reason::no_provider, "none online"};
  (void)ask<actors::command_reply>(runtime_.jobs, std::string("j2"), std::move(fail));
  catch_up();

  auto ids = [&](const std::string& target) {
    const auto response = call("GET", target);
    EXPECT_EQ(response.status, 200u) << response.body;
    std::vector<std::string> out;
    const auto listed = json::parse(response.body);
    for (const auto& j : listed.at("data").as_array()) {
      out.emplace_back(j.at("id").as_string());
    }
    return out;
  };
  EXPECT_EQ(ids("/admin/jobs"), (std::vector<std::string>{"j3", "j2", "j1"}));
  EXPECT_EQ(ids("/admin/jobs?state=queued"), (std::vector<std::string>{"j3", "j1"}));
  EXPECT_EQ(ids("/admin/jobs?state=queued&limit=1"), (std::vector<std::string>{"j3"}));
  // Paged newest first: has_more says whether older ones follow, `after` the last one seen.
  EXPECT_TRUE(json::parse(call("GET", "/admin/jobs?limit=2").body).at("has_more").as_bool());
  EXPECT_EQ(ids("/admin/jobs?limit=2&after=j2"), (std::vector<std::string>{"j1"}));
  EXPECT_FALSE(json::parse(call("GET", "/admin/jobs?limit=2&after=j2").body).at("has_more").as_bool());
  EXPECT_EQ(ids("/admin/jobs?state=queued&after=j3"), (std::vector<std::string>{"j1"}));
  EXPECT_FALSE(json::parse(call("GET", "/admin/jobs?limit=3").body).at("has_more").as_bool());
  expect_invalid(call("GET", "/admin/jobs?after=j9"), "after");
  EXPECT_EQ(ids("/admin/jobs?state=failed"), (std::vector<std::string>{"j2"}));
  EXPECT_TRUE(ids("/admin/jobs?state=streaming").empty());
  const auto failed = json::parse(call("GET", "/admin/jobs?state=failed").body);
  EXPECT_EQ(failed.at("data").as_array()[0].at("failure_reason").as_string(), "no_provider");
  EXPECT_EQ(failed.at("data").as_array()[0].at("state").as_string(), "failed");
  expect_invalid(call("GET", "/admin/jobs?state=running"), "state");
  expect_invalid(call("GET", "/admin/jobs?limit=-1"), "limit");
  // A misspelt filter would list every job as if filtered; a repeated one, which value counts?
  expect_invalid(call("GET", "/admin/jobs?status=failed"), "status");
  expect_invalid(call("GET", "/admin/jobs?state=failed&state=queued"), "state");
  expect_invalid(call("GET", "/admin/providers?state=online"), "state");
  expect_invalid(call("GET", "/admin/accounts?prefx=user-"), "prefx");
  expect_invalid(call("GET", "/admin/payouts/last?limit=1"), "limit");
  EXPECT_NE(call("GET", "/admin/payouts/last?limit=1").body.find("this endpoint takes none"), std::string::npos);
  EXPECT_NE(call("GET", "/admin/jobs?status=failed").body.find("the query parameters are: limit, after, state"),
            std::string::npos);
  // A wrong path or method is named first.
  EXPECT_EQ(call("GET", "/admin/nope?x=1").status, 404u);
  EXPECT_EQ(call("POST", "/admin/jobs?state=failed").status, 405u);
  EXPECT_EQ(ids("/admin/jobs?state=failed&"), (std::vector<std::string>{"j2"})) << "an empty pair is no parameter";
}

TEST_F(admin_api_test, accounts_are_filtered_by_prefix_and_bounded_by_limit) {
  (void)make_user(R"({"credit_micros":100})");
  (void)make_user(R"({"credit_micros":200})");
  const auto all = json::parse(call("GET", "/admin/accounts").body).as_object();
  EXPECT_EQ(all.at("data").as_array().size(), 3u);  // external and two users
  EXPECT_EQ(all.at("total_micros").as_int64(), 0);
  const auto users = json::parse(call("GET", "/admin/accounts?prefix=user-&limit=1").body).as_object();
  EXPECT_EQ(users.at("data").as_array().size(), 1u);
  EXPECT_TRUE(users.at("has_more").as_bool());
  // The next page starts after the last account of this one, and the last page says so.
  const std::string last(users.at("data").as_array()[0].at("account").as_string());
  const auto rest = json::parse(call("GET", "/admin/accounts?prefix=user-&limit=1&after=" + last).body).as_object();
  ASSERT_EQ(rest.at("data").as_array().size(), 1u);
  EXPECT_GT(std::string(rest.at("data").as_array()[0].at("account").as_string()), last);
  EXPECT_FALSE(rest.at("has_more").as_bool());
  EXPECT_EQ(rest.at("total_micros").as_int64(), 0) << "the whole ledger's sum, whatever the page";
  // An account named as the prefix itself comes once, not again after itself.
  const auto itself = json::parse(call("GET", "/admin/accounts?prefix=" + last + "&after=" + last).body).as_object();
  EXPECT_TRUE(itself.at("data").as_array().empty()) << json::serialize(itself);
  const auto past = json::parse(call("GET", "/admin/accounts?prefix=user-&after=user-~").body).as_object();
  EXPECT_TRUE(past.at("data").as_array().empty());
  const auto external = json::parse(call("GET", "/admin/accounts?prefix=external").body).as_object();
  ASSERT_EQ(external.at("data").as_array().size(), 1u);
  EXPECT_EQ(external.at("data").as_array()[0].at("balance_micros").as_int64(), -300);
}

/// The admin API in front of a ledger that never answers; requests time out after 200 ms.
void admin_api_test::make_api_with_a_silent_ledger() {
  auto silent = system_.spawn(silent_ledger);
  extra_actors_.push_back(caf::actor_cast<caf::actor>(silent));
  admin_api_options options;
  options.admin_token = admin_token;
  options.request_timeout = 200ms;
  make_api(options, silent);
}

TEST_F(admin_api_test, a_user_whose_credit_fails_after_it_was_created_gets_its_key_back_with_the_error) {
  make_api_with_a_silent_ledger();
  const auto response = call("POST", "/admin/users", R"({"tier":"premium","credit_micros":5000000})");
  EXPECT_EQ(response.status, 503u) << response.body;
  const auto body = json::parse(response.body).as_object();
  EXPECT_NE(body.at("error").at("message").as_string().find("the user exists without credit"), std::string::npos)
      << response.body;
  // The key is shown once: it comes back with the error, and it works.
  const std::string key(body.at("api_key").as_string());
  const auto user = directory_->user_by_api_key(key);
  ASSERT_TRUE(user) << "the key in the answer is the user's";
  EXPECT_EQ(user->user_id, body.at("id").as_string());
}

TEST_F(admin_api_test, an_actor_that_does_not_answer_gives_a_503_after_the_request_timeout) {
  make_api_with_a_silent_ledger();
  const auto start = std::chrono::steady_clock::now();
  const auto response = call("GET", "/admin/accounts");
  EXPECT_EQ(response.status, 503u) << response.body;
  EXPECT_NE(response.body.find("request_timeout"), std::string::npos) << response.body;
  EXPECT_GE(std::chrono::steady_clock::now() - start, 200ms);
}

// -- Restart. -------------------------------------------------------------------------------------

TEST_F(admin_api_test, after_a_restart_the_rebuilt_directory_equals_the_live_one) {
  const auto [user, key] = make_user(R"({"tier":"premium","credit_micros":40000000})");
  const auto [provider, token, owner] = make_provider(R"({"name":"rig","owner_user_id":")" + user + "\"}");
  (void)make_provider(R"({"name":"solo"})");
  const auto campaign = call("POST", "/admin/campaigns",
                             R"({"advertiser":"a","title":"t","text":"t","url":"https://a.example",
                                 "keywords":["gpu"],"cpm_bid_micros":2000000,"budget_micros":5000000})");
  ASSERT_EQ(campaign.status, 201u) << campaign.body;
  domain::ledger::command settle = domain::record_transfers{
      "job-j1",
      {{"job-j1/usage", "user-" + user, "provider-" + provider, 15'000'000,
        events::transfer_kind::usage, "j1"}}};
  (void)ask<actors::command_reply>(runtime_.ledger, std::move(settle));
  ASSERT_EQ(call("POST", "/admin/payouts/run").status, 200u);
  std::vector<domain::job::command> job{
      domain::submit_job{"j1", user, "llama", events::quality_tier::standard, 10, 20, 0, true, ""},
      domain::queue_job{0, actors::system_clock_us() + 60'000'000}};
  (void)ask<actors::command_reply>(runtime_.jobs, std::string("j1"), std::move(job));
  catch_up();
  const auto live = directory_->contents();
  EXPECT_EQ(live.users.size(), 2u);  // the user and the owner made for "solo"
  EXPECT_EQ(live.providers.size(), 2u);
  EXPECT_EQ(live.payouts.size(), 1u);
  EXPECT_EQ(live.jobs.size(), 1u);
  EXPECT_EQ(live.campaigns.size(), 1u);

  stop();
  start();
  EXPECT_EQ(directory_->contents(), live);
  EXPECT_EQ(directory_->user_by_api_key(key), (user_entry{user, events::user_tier::premium}));
  EXPECT_EQ(directory_->provider_by_token(token)->provider_id, provider);
  EXPECT_EQ(directory_->contribution_score(user), 0);
}

}  // namespace
}  // namespace gpustream::gateway
