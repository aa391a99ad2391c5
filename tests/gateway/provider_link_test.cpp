// The server side of the provider link on a real node (a temporary buffered store, the real actor
// runtime, the HTTP server on a loopback port): agents made of the link client say hello with the
// same provider's token, and a chat request shows which link the provider's jobs go to.
#include <boost/asio/connect.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/http/read.hpp>
#include <boost/beast/http/string_body.hpp>
#include <boost/beast/http/write.hpp>
#include <boost/beast/websocket/stream.hpp>
#include <boost/json.hpp>
#include <caf/actor_system.hpp>
#include <caf/actor_system_config.hpp>
#include <caf/scoped_actor.hpp>
#include <gtest/gtest.h>
#include <poll.h>
#include <stdlib.h>

#include <chrono>
#include <condition_variable>
#include <filesystem>
#include <functional>
#include <future>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "actors/atoms.hpp"
#include "actors/errors.hpp"
#include "actors/runtime.hpp"
#include "base/ensure.hpp"
#include "gateway/link_client.hpp"
#include "gateway/link_codec.hpp"
#include "gateway/node.hpp"
#include "storage/event_store.hpp"
#include "storage/fault_injector.hpp"
#include "tests/storage/store_testing.hpp"

namespace gpustream::gateway {
namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
namespace websocket = beast::websocket;
namespace json = boost::json;
using tcp = asio::ip::tcp;
using namespace std::chrono_literals;

/// Generous: the waits end on real events long before; hitting it fails the test.
constexpr auto wait_deadline = 20s;
/// The node's: short, so that the test of a click the ad server does not answer is quick.
constexpr auto click_answer_wait_max = 300ms;
const std::string admin_token = "admin-secret-for-tests";
const std::string model = "m";

using storage::testing::temp_dir;

struct test_config : caf::actor_system_config {
  test_config() { actors::add_error_categories(*this); }
};

struct http_answer {
  unsigned status = 0;  ///< 0: no answer within the call's wait
  std::string body;
  std::string location;
};

/// One request on its own connection, answered in full, or status 0 when no answer came within
/// `answer_wait_max` (0: no bound).
http_answer call(std::uint16_t port, http::verb method, const std::string& target, const std::string& body,
                 const std::string& bearer, std::chrono::milliseconds answer_wait_max = {}) {
  asio::io_context io;
  tcp::socket socket(io);
  asio::connect(socket, tcp::resolver(io).resolve("127.0.0.1", std::to_string(port)));
  http::request<http::string_body> request{method, target, 11};
  request.set(http::field::host, "127.0.0.1");
  request.set(http::field::authorization, "Bearer " + bearer);
  request.set(http::field::content_type, "application/json");
  request.body() = body;
  request.prepare_payload();
  http::write(socket, request);
  if (answer_wait_max.count() > 0) {  // Asio's blocking read would wait on past SO_RCVTIMEO
    pollfd answer{.fd = socket.native_handle(), .events = POLLIN, .revents = 0};
    if (::poll(&answer, 1, static_cast<int>(answer_wait_max.count())) != 1) return {};
  }
  beast::flat_buffer buffer;
  http::response<http::string_body> response;
  beast::error_code failed;
  http::read(socket, buffer, response, failed);
  if (failed) return {};
  return {response.result_int(), response.body(), std::string(response[http::field::location])};
}

link::hello hello_with(std::uint32_t context_length_tokens) {
  return {.agent_version = "test",
          .backend = events::backend_kind::openai,
          .backend_url = "http://127.0.0.1:1/v1",
          .gpus = {},
          .models = {{.model_name = model,
                      .context_length_tokens = context_length_tokens,
                      .quantisation = "Q8_0",
                      .input_price_micros_per_mtok = 1,
                      .output_price_micros_per_mtok = 2,
                      .max_concurrency = 1}},
          .max_concurrency = 1};
}

/// An agent: a link client on its own io thread that says `hello` on connecting and answers each
/// offer with `answer_text` in one delta and a done. It does not come back after a disconnect
/// within a test (its backoff waits a minute), so every disconnect it records is one.
class agent {
 public:
  /// `say_hello` false: it links and says nothing (a link not yet past its hello).
  agent(std::uint16_t port, const std::string& token, link::hello hello, std::string answer_text,
        bool say_hello = true)
      : hello_(std::move(hello)), answer_text_(std::move(answer_text)), thread_([this] { io_.run(); }) {
    link_client_options options;
    options.url = "ws://127.0.0.1:" + std::to_string(port) + "/v1/providers/link";
    options.bearer_token = token;
    options.backoff.delay_initial = 60s;
    options.backoff.delay_max = 60s;
    options.seed = 7;
    on_io([&] {
      auto created = link_client::create(io_, std::move(options),
                                         {.on_connected = [this, say_hello] {
                                            if (say_hello) (void)client_->send(hello_);
                                            update([this] { ++connects_; });
                                          },
                                          .on_frame = [this](link::frame f) { on_frame(std::move(f)); },
                                          .on_disconnected = [this](const link_disconnect& d) {
                                            update([&] { disconnects_.push_back(d); });
                                          }});
      GPUSTREAM_ENSURE(created.has_value());
      client_ = std::move(*created);
      client_->start();
    });
  }
  ~agent() {
    on_io([this] { client_.reset(); });
    work_.reset();
    thread_.join();
  }
  agent(const agent&) = delete;
  agent& operator=(const agent&) = delete;

  [[nodiscard]] bool wait_welcome() {
    return wait_until([this] { return welcomed_; });
  }
  /// Until it is welcomed or its link ends; whether it was welcomed.
  [[nodiscard]] bool wait_welcome_or_disconnect() {
    (void)wait_until([this] { return welcomed_ || !disconnects_.empty(); });
    std::lock_guard lock(mutex_);
    return welcomed_;
  }
  /// Until its hello went out.
  [[nodiscard]] bool wait_connected() {
    return wait_until([this] { return connects_ > 0; });
  }
  /// Sends `f` on the link now; false when the link could not take it.
  bool send(link::frame f) {
    bool sent = false;
    on_io([&] { sent = client_->send(std::move(f)).has_value(); });
    return sent;
  }
  [[nodiscard]] std::optional<link_disconnect> wait_disconnect() {
    if (!wait_until([this] { return !disconnects_.empty(); })) return std::nullopt;
    std::lock_guard lock(mutex_);
    return disconnects_.front();
  }
  [[nodiscard]] std::size_t disconnects() {
    std::lock_guard lock(mutex_);
    return disconnects_.size();
  }
  [[nodiscard]] std::size_t offers() {
    std::lock_guard lock(mutex_);
    return offers_;
  }

 private:
  void on_frame(link::frame f) {
    if (std::holds_alternative<link::welcome>(f)) update([this] { welcomed_ = true; });
    const auto* offer = std::get_if<link::offer>(&f);
    if (offer == nullptr) return;
    update([this] { ++offers_; });
    (void)client_->send(link::delta{.job_id = offer->job_id, .text = answer_text_, .attempt = offer->attempt});
    (void)client_->send(link::done{.job_id = offer->job_id,
                                   .finish_reason = "stop",
                                   .completion_tokens_counted = 1,
                                   .ttft_us = 100,
                                   .total_us = 200,
                                   .attempt = offer->attempt});
  }
  template <class F>
  void on_io(F&& f) {
    std::packaged_task<void()> task(std::forward<F>(f));
    auto done = task.get_future();
    asio::post(io_, [&task] { task(); });
    done.get();
  }
  template <class F>
  void update(F&& f) {
    {
      std::lock_guard lock(mutex_);
      f();
    }
    changed_.notify_all();
  }
  [[nodiscard]] bool wait_until(const std::function<bool()>& predicate) {
    std::unique_lock lock(mutex_);
    return changed_.wait_for(lock, wait_deadline, predicate);
  }

  const link::hello hello_;
  const std::string answer_text_;
  std::mutex mutex_;
  std::condition_variable changed_;
  bool welcomed_ = false;                   ///< guarded by mutex_
  std::size_t connects_ = 0;                ///< guarded by mutex_
  std::size_t offers_ = 0;                  ///< guarded by mutex_
  std::vector<link_disconnect> disconnects_;  ///< guarded by mutex_
  asio::io_context io_;
  std::optional<asio::executor_work_guard<asio::io_context::executor_type>> work_{io_.get_executor()};
  std::unique_ptr<link_client> client_;
  std::thread thread_;
};

/// A bare WebSocket on the link, authenticated with `token`: its messages go out exactly as
/// given, so a test can send bytes no link client would. Its reads give up after the deadline.
class raw_link {
 public:
  raw_link(std::uint16_t port, const std::string& token) : ws_(io_) {
    asio::connect(ws_.next_layer(), tcp::resolver(io_).resolve("127.0.0.1", std::to_string(port)));
    ws_.set_option(websocket::stream_base::decorator(
        [token](websocket::request_type& request) { request.set(http::field::authorization, "Bearer " + token); }));
    ws_.handshake("127.0.0.1", "/v1/providers/link");
    ws_.binary(true);
  }
  void send(const link::frame& frame) { send_bytes(link::encode(frame)); }
  void send_bytes(const std::vector<std::uint8_t>& bytes) { ws_.write(asio::buffer(bytes)); }
  /// Reads until the server's welcome; false when the link ended first.
  [[nodiscard]] bool wait_welcome() {
    for (;;) {
      beast::flat_buffer buffer;
      if (read_within_deadline(buffer)) return false;
      const auto* data = static_cast<const std::uint8_t*>(buffer.data().data());
      auto frame = link::decode({data, buffer.size()}, {});
      if (frame && std::holds_alternative<link::welcome>(*frame)) return true;
    }
  }
  /// Reads until the server closes the link; its close frame's code and reason (code 0 when the
  /// link ended otherwise, or the deadline passed).
  [[nodiscard]] websocket::close_reason wait_closed() {
    for (;;) {
      beast::flat_buffer buffer;
      const auto ec = read_within_deadline(buffer);
      if (ec == websocket::error::closed) return ws_.reason();
      if (ec) return {};
    }
  }

 private:
  /// One message into `buffer`, or an error (timed_out after wait_deadline). Asynchronous: a
  /// blocking read polls on past SO_RCVTIMEO, so it would hang the test instead of failing it.
  beast::error_code read_within_deadline(beast::flat_buffer& buffer) {
    beast::error_code result = asio::error::timed_out;
    bool done = false;
    ws_.async_read(buffer, [&](beast::error_code ec, std::size_t) {
      result = ec;
      done = true;
    });
    io_.restart();
    io_.run_for(wait_deadline);
    if (!done) {
      ws_.next_layer().cancel();  // the read ends as aborted; the result stays timed_out
      io_.restart();
      io_.run();
      return asio::error::timed_out;
    }
    return result;
  }

  asio::io_context io_;
  websocket::stream<tcp::socket> ws_;
};

class provider_link_test : public ::testing::Test {
 protected:
  /// `advertise_interval_min`, `hello_interval_min`: the tests send advertise frames and hellos
  /// back to back, except those about their pace.
  explicit provider_link_test(std::chrono::milliseconds advertise_interval_min = std::chrono::milliseconds(0),
                              std::chrono::milliseconds hello_interval_min = std::chrono::milliseconds(0))
      : system_(config_) {
    // `sync`, on files that consult faults_: a test can make the store's fsyncs slow.
    storage::store_options store_options;
    store_options.faults = faults_;
    auto opened = storage::event_store::open(dir_.path(), store_options);
    GPUSTREAM_ENSURE(opened.has_value());
    store_ = std::move(*opened);
    runtime_ = actors::start_runtime(system_, store_);
    node_options options;
    options.http.host = "127.0.0.1";
    options.http.port = 0;
    options.admin_token = admin_token;
    // The test's agents send no heartbeats: no link may go stale however slow the machine. A
    // hello's answer may take a while on a loaded machine, but far less than this.
    options.link.stale_after = std::chrono::minutes(10);
    options.link.hello_answer_wait_max = std::chrono::milliseconds(1500);
    options.link.heartbeat_interval = std::chrono::milliseconds(100);  // the link's timer checks both
    options.link.advertise_interval_min = advertise_interval_min;
    options.link.hello_interval_min = hello_interval_min;
    options.click_answer_wait_max = click_answer_wait_max;
    auto started = node::start(system_, runtime_, store_, std::move(options));
    GPUSTREAM_ENSURE(started.has_value());
    node_ = std::move(*started);
    port_ = node_->port();
  }
  ~provider_link_test() override {
    node_.reset();
    runtime_.stop();
    system_.await_all_actors_done();
  }

  /// A new provider's token.
  std::string make_provider() {
    const auto answer = call(port_, http::verb::post, "/admin/providers", R"({"name":"p"})", admin_token);
    EXPECT_EQ(answer.status, 201u) << answer.body;
    return std::string(json::parse(answer.body).at("token").as_string());
  }
  /// A new premium user's API key.
  std::string make_user() {
    const auto answer = call(port_, http::verb::post, "/admin/users",
                             R"({"tier":"premium","credit_micros":10000000})", admin_token);
    EXPECT_EQ(answer.status, 201u) << answer.body;
    return std::string(json::parse(answer.body).at("api_key").as_string());
  }
  /// A chat completion's answer text, or the error body when it is refused.
  std::string chat(const std::string& api_key, const std::string& model_name = model) {
    const auto answer = call(port_, http::verb::post, "/v1/chat/completions",
                             R"({"model":")" + model_name + R"(","messages":[{"role":"user","content":"hi"}]})", api_key);
    if (answer.status != 200) return "HTTP " + std::to_string(answer.status) + ": " + answer.body;
    return std::string(json::parse(answer.body).at("choices").at(0).at("message").at("content").as_string());
  }

  temp_dir dir_;
  std::shared_ptr<storage::fault_injector> faults_ = std::make_shared<storage::fault_injector>();
  test_config config_;
  caf::actor_system system_;
  std::shared_ptr<storage::event_store> store_;
  actors::runtime runtime_;
  std::unique_ptr<node> node_;
  std::uint16_t port_ = 0;
};

TEST_F(provider_link_test, a_newer_link_of_the_same_provider_takes_over_its_jobs) {
  const auto token = make_provider();
  const auto api_key = make_user();
  agent first(port_, token, hello_with(4096), "from the first link");
  ASSERT_TRUE(first.wait_welcome());
  EXPECT_EQ(chat(api_key), "from the first link");

  agent second(port_, token, hello_with(4096), "from the second link");
  ASSERT_TRUE(second.wait_welcome());
  const auto replaced = first.wait_disconnect();
  ASSERT_TRUE(replaced);
  EXPECT_EQ(replaced->close_code, link::close_code_replaced);
  EXPECT_NE(replaced->message.find("replaced by a newer link"), std::string::npos) << replaced->message;
  EXPECT_EQ(chat(api_key), "from the second link");
  EXPECT_EQ(first.offers(), 1u);
}

TEST_F(provider_link_test, a_hello_the_provider_would_refuse_leaves_its_working_link_in_place) {
  // A second agent started with the same token but an offer the platform refuses (here a window
  // of 0 tokens) used to take the link over before its hello was refused: the working link was
  // closed, and the provider left with no link at all, at each of the second agent's retries.
  const auto token = make_provider();
  const auto api_key = make_user();
  agent first(port_, token, hello_with(4096), "from the first link");
  ASSERT_TRUE(first.wait_welcome());

  agent refused(port_, token, hello_with(0), "never sent");
  const auto closed = refused.wait_disconnect();
  ASSERT_TRUE(closed);
  EXPECT_EQ(closed->kind, link_disconnect_kind::closed_by_peer);
  EXPECT_EQ(closed->close_code, 1008);
  EXPECT_NE(closed->message.find("context length of 0 tokens"), std::string::npos) << closed->message;

  EXPECT_EQ(chat(api_key), "from the first link");
  EXPECT_EQ(first.disconnects(), 0u);
  EXPECT_EQ(refused.offers(), 0u);
}

TEST_F(provider_link_test, a_hello_the_store_does_not_answer_within_hello_answer_wait_max_closes_the_link) {
  // Its agent sends nothing until the welcome, so stale_after cannot end a link whose hello hangs
  // (a store stuck in an fsync); this limit does.
  const auto token = make_provider();
  std::optional<link_disconnect> closed;
  {
    const auto held = faults_->hold_syncs_in_scope();  // until the link is closed
    agent waiting(port_, token, hello_with(4096), "never sent");
    closed = waiting.wait_disconnect();
  }
  ASSERT_TRUE(closed);
  EXPECT_EQ(closed->close_code, 1008);
  EXPECT_NE(closed->message.find("the hello was not answered within"), std::string::npos) << closed->message;
}

TEST_F(provider_link_test, heartbeats_do_not_stretch_the_wait_for_a_hellos_answer) {
  // hello_answer_wait_max (1.5 s here) counts from the hello: heartbeats sent meanwhile, taken but
  // not passed on, do not keep open a link whose hello hangs (here in the store's fsync, until
  // the link is closed).
  const auto token = make_provider();
  std::optional<link_disconnect> closed;
  {
    const auto held = faults_->hold_syncs_in_scope();
    agent waiting(port_, token, hello_with(4096), "never sent");
    ASSERT_TRUE(waiting.wait_connected());
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (waiting.disconnects() == 0 && std::chrono::steady_clock::now() < deadline) {
      waiting.send(link::heartbeat{});
      std::this_thread::sleep_for(std::chrono::milliseconds(100));  // an agent's pace, faster than any
    }
    // Closed while the heartbeats still came, not once they stopped.
    EXPECT_GT(waiting.disconnects(), 0u) << "the link stayed open for 10 s of heartbeats";
    closed = waiting.wait_disconnect();
  }
  ASSERT_TRUE(closed);
  EXPECT_EQ(closed->close_code, 1008);
  EXPECT_NE(closed->message.find("the hello was not answered within"), std::string::npos) << closed->message;
}

TEST_F(provider_link_test, heartbeats_sent_without_pause_reach_the_scheduler_only_when_new_or_due) {
  // Every link shares the one scheduler, and each report it takes starts an assignment pass.
  const auto token = make_provider();
  agent flooding(port_, token, hello_with(4096), "unused");
  ASSERT_TRUE(flooding.wait_welcome());
  const auto before = node_->link_counts();
  const auto received = [&](std::uint64_t n) {
    const auto c = node_->link_counts();
    return c.heartbeats_forwarded + c.heartbeats_skipped - before.heartbeats_forwarded - before.heartbeats_skipped >= n;
  };
  const auto wait_received = [&](std::uint64_t n) {
    const auto deadline = std::chrono::steady_clock::now() + wait_deadline;
    while (!received(n) && std::chrono::steady_clock::now() < deadline) std::this_thread::yield();
    return received(n);
  };
  constexpr std::uint64_t flood = 2000;
  const auto started = std::chrono::steady_clock::now();
  for (std::uint64_t i = 0; i < flood; ++i) {
    ASSERT_TRUE(flooding.send(link::heartbeat{.active_jobs = 0, .health_percent = 100}));
  }
  ASSERT_TRUE(wait_received(flood));
  const auto elapsed = std::chrono::steady_clock::now() - started;
  // One per half interval (50 ms here) at most, plus the first.
  const auto due = static_cast<std::uint64_t>(elapsed / std::chrono::milliseconds(50)) + 2;
  const auto forwarded = node_->link_counts().heartbeats_forwarded - before.heartbeats_forwarded;
  EXPECT_LE(forwarded, due) << "in " << std::chrono::duration_cast<std::chrono::milliseconds>(elapsed).count() << " ms";
  EXPECT_GE(forwarded, 1u);

  // Heartbeats that each say something new go on at most 8 times an interval (12.5 ms here).
  const auto news_before = node_->link_counts();
  const auto news_started = std::chrono::steady_clock::now();
  for (std::uint32_t i = 0; i < flood; ++i) {
    ASSERT_TRUE(flooding.send(link::heartbeat{.health_percent = i % 2 == 0 ? 90u : 91u}));
  }
  ASSERT_TRUE(wait_received(2 * flood));
  const auto news_elapsed = std::chrono::steady_clock::now() - news_started;
  const auto news_due = static_cast<std::uint64_t>(news_elapsed / std::chrono::microseconds(12'500)) + 2;
  const auto news_forwarded = node_->link_counts().heartbeats_forwarded - news_before.heartbeats_forwarded;
  EXPECT_LE(news_forwarded, news_due) << "in " << std::chrono::duration_cast<std::chrono::milliseconds>(news_elapsed).count()
                                      << " ms";
  // News after that wait goes on at once.
  std::this_thread::sleep_for(std::chrono::microseconds(12'500));
  const auto last_before = node_->link_counts();
  ASSERT_TRUE(flooding.send(link::heartbeat{.health_percent = 50}));
  ASSERT_TRUE(wait_received(2 * flood + 1));
  EXPECT_EQ(node_->link_counts().heartbeats_forwarded - last_before.heartbeats_forwarded, 1u);
  // A drain's start goes on at once, also right after other news.
  ASSERT_TRUE(flooding.send(link::heartbeat{.health_percent = 50, .draining = true}));
  ASSERT_TRUE(wait_received(2 * flood + 2));
  EXPECT_EQ(node_->link_counts().heartbeats_forwarded - last_before.heartbeats_forwarded, 2u);
}

TEST_F(provider_link_test, a_link_open_with_a_token_since_replaced_is_closed_and_the_new_token_links) {
  const auto created = call(port_, http::verb::post, "/admin/providers", R"({"name":"p"})", admin_token);
  ASSERT_EQ(created.status, 201u) << created.body;
  const auto provider = json::parse(created.body);
  const std::string id(provider.at("id").as_string());
  const std::string old_token(provider.at("token").as_string());
  const auto api_key = make_user();
  agent leaked(port_, old_token, hello_with(4096), "from the old token");
  ASSERT_TRUE(leaked.wait_welcome());
  EXPECT_EQ(chat(api_key), "from the old token");

  const auto replaced = call(port_, http::verb::post, "/admin/providers/" + id + "/token", "", admin_token);
  ASSERT_EQ(replaced.status, 201u) << replaced.body;
  const std::string new_token(json::parse(replaced.body).at("token").as_string());
  const auto closed = leaked.wait_disconnect();
  ASSERT_TRUE(closed) << "the link of the old token stays open";
  EXPECT_EQ(closed->close_code, 1008);
  EXPECT_NE(closed->message.find("this provider's token was replaced"), std::string::npos) << closed->message;

  agent renewed(port_, new_token, hello_with(4096), "from the new token");
  ASSERT_TRUE(renewed.wait_welcome());
  EXPECT_EQ(chat(api_key), "from the new token");
}

TEST_F(provider_link_test, a_frame_about_a_job_before_the_welcome_closes_that_link) {
  // A second agent with the same token, its hello still being checked, must not reach the jobs
  // of the provider's working link.
  const auto token = make_provider();
  std::optional<link_disconnect> closed;
  {
    const auto held = faults_->hold_syncs_in_scope();  // holds the hello's answer
    agent early(port_, token, hello_with(4096), "unused");
    ASSERT_TRUE(early.wait_connected());
    ASSERT_TRUE(early.send(link::delta{.job_id = "j-of-another-link", .text = "injected", .attempt = 1}));
    closed = early.wait_disconnect();
  }
  ASSERT_TRUE(closed);
  EXPECT_EQ(closed->close_code, 1008);
  EXPECT_NE(closed->message.find("no delta may come before the welcome"), std::string::npos) << closed->message;
}

TEST_F(provider_link_test, a_malformed_frame_closes_its_own_link_naming_why_and_harms_no_other) {
  const auto api_key = make_user();
  agent good(port_, make_provider(), hello_with(4096), "from the good link");
  ASSERT_TRUE(good.wait_welcome());
  raw_link bad(port_, make_provider());
  bad.send(hello_with(4096));
  ASSERT_TRUE(bad.wait_welcome());
  const std::string garbage = "this is no Cap'n Proto message at all";
  bad.send_bytes({garbage.begin(), garbage.end()});
  const auto closed = bad.wait_closed();
  EXPECT_EQ(closed.code, 1002) << closed.reason;
  EXPECT_FALSE(closed.reason.empty());
  // The other provider's link goes on and serves.
  EXPECT_EQ(chat(api_key), "from the good link");
  EXPECT_EQ(good.disconnects(), 0u);
}

TEST_F(provider_link_test, a_second_hello_or_a_frame_only_the_server_sends_closes_the_link) {
  struct case_t {
    link::frame frame;
    std::string reason;
  };
  const std::vector<case_t> cases{
      {hello_with(4096), "hello may be sent only once per link"},
      {link::offer{.job_id = "j", .request_json = "{}", .attempt = 1}, "an agent may not send offer"},
      {link::cancel{.job_id = "j"}, "an agent may not send cancel"},
  };
  for (const auto& c : cases) {
    agent sender(port_, make_provider(), hello_with(4096), "unused");
    ASSERT_TRUE(sender.wait_welcome());
    ASSERT_TRUE(sender.send(c.frame));
    const auto closed = sender.wait_disconnect();
    ASSERT_TRUE(closed) << c.reason;
    EXPECT_EQ(closed->close_code, 1008);
    EXPECT_NE(closed->message.find(c.reason), std::string::npos) << closed->message;
  }
}

TEST_F(provider_link_test, a_link_counts_as_online_in_the_metrics_only_once_its_hello_is_recorded) {
  const auto online_in_metrics = [&] {
    const auto body = call(port_, http::verb::get, "/metrics", "", "").body;
    const std::string name = "\ngpustream_providers_online ";
    const auto at = body.find(name);
    return at == std::string::npos ? -1 : std::stoi(body.substr(at + name.size()));
  };
  // The hello's recording hangs in its fsync, then fails: the link, adopted meanwhile, never goes
  // online, and every scrape until it closes says 0.
  const auto token = make_provider();
  faults_->set_fail_sync(true);
  int scrapes = 0;
  {
    const auto held = faults_->hold_syncs_in_scope();
    agent failing(port_, token, hello_with(4096), "unused");
    ASSERT_TRUE(failing.wait_connected());
    for (; scrapes < 3; ++scrapes) ASSERT_EQ(online_in_metrics(), 0) << "after " << scrapes << " scrapes";
    faults_->release_syncs();  // the fsync fails now
    while (failing.disconnects() == 0) {
      ASSERT_EQ(online_in_metrics(), 0) << "after " << scrapes << " scrapes";
      ++scrapes;
    }
  }
  faults_->set_fail_sync(false);
  // The same provider links again and counts once online: its actor recovers the log as the
  // reopened store holds it (it used to refuse this hello once, decided before the reopen).
  agent linked(port_, token, hello_with(4096), "unused");
  ASSERT_TRUE(linked.wait_welcome());
  EXPECT_EQ(online_in_metrics(), 1);
}

TEST_F(provider_link_test, a_hello_the_store_fails_to_record_is_closed_without_the_stores_words) {
  const auto token = make_provider();
  faults_->set_fail_sync(true);
  agent failing(port_, token, hello_with(4096), "unused");
  const auto closed = failing.wait_disconnect();
  faults_->set_fail_sync(false);
  ASSERT_TRUE(closed);
  EXPECT_EQ(closed->close_code, 1011);
  EXPECT_NE(closed->message.find("could not record the hello"), std::string::npos) << closed->message;
  EXPECT_EQ(closed->message.find(dir_.path().string()), std::string::npos) << closed->message;
  EXPECT_EQ(closed->message.find("storage"), std::string::npos) << closed->message;
}

TEST_F(provider_link_test, an_advertise_on_a_live_link_replaces_the_models_it_serves) {
  // Its backend unloaded one model and loaded another: the link goes on, with the new offer.
  const auto token = make_provider();
  const auto api_key = make_user();
  agent serving(port_, token, hello_with(4096), "answered");
  ASSERT_TRUE(serving.wait_welcome());
  ASSERT_EQ(chat(api_key), "answered");
  auto offer = hello_with(4096).models.front();
  offer.model_name = "m2";
  ASSERT_TRUE(serving.send(link::advertise{.models = {offer}}));
  // Recorded, then listed: poll the models list (no fixed wait).
  const auto models_listed = [&] {
    return std::string(json::serialize(json::parse(call(port_, http::verb::get, "/v1/models", "", api_key).body)));
  };
  const auto deadline = std::chrono::steady_clock::now() + wait_deadline;
  while (models_listed().find(R"("id":"m2")") == std::string::npos && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  const auto listed = models_listed();
  EXPECT_NE(listed.find(R"("id":"m2")"), std::string::npos) << listed;
  EXPECT_EQ(listed.find(R"("id":"m")"), std::string::npos) << listed;
  EXPECT_EQ(chat(api_key, "m2"), "answered");
  const auto gone = chat(api_key, "m");
  EXPECT_NE(gone.find("HTTP 404"), std::string::npos) << gone;
  EXPECT_EQ(serving.disconnects(), 0u);
  EXPECT_EQ(serving.offers(), 2u);

  // An offer the platform refuses closes the link, as at a hello.
  offer.context_length_tokens = 0;
  ASSERT_TRUE(serving.send(link::advertise{.models = {offer}}));
  const auto closed = serving.wait_disconnect();
  ASSERT_TRUE(closed);
  EXPECT_EQ(closed->close_code, 1008);
  EXPECT_NE(closed->message.find("context length of 0 tokens"), std::string::npos) << closed->message;
}

TEST_F(provider_link_test, no_model_is_offered_more_jobs_at_once_than_the_hellos_max_concurrency) {
  // The scheduler gives a provider at most its largest offer's max_concurrency; an agent running
  // 2 jobs at once over all its models must not be sent 8 because one model says 8.
  const auto token = make_provider();
  auto hello = hello_with(4096);
  hello.max_concurrency = 2;
  hello.models.front().max_concurrency = 8;
  agent capped(port_, token, hello, "unused");
  ASSERT_TRUE(capped.wait_welcome());
  const auto offered = [&] {
    const auto me = json::parse(call(port_, http::verb::get, "/v1/providers/me", "", token).body);
    std::vector<std::pair<std::string, std::int64_t>> out;
    for (const auto& m : me.at("models").as_array()) {
      out.emplace_back(std::string(m.at("model").as_string()), m.at("max_concurrency").to_number<std::int64_t>());
    }
    return out;
  };
  using offers = std::vector<std::pair<std::string, std::int64_t>>;
  EXPECT_EQ(offered(), (offers{{model, 2}}));
  // So is a later advertise; a model asking for fewer keeps its own.
  auto more = hello.models.front();
  more.model_name = "m2";
  auto fewer = hello.models.front();
  fewer.model_name = "m3";
  fewer.max_concurrency = 1;
  ASSERT_TRUE(capped.send(link::advertise{.models = {more, fewer}}));
  const auto deadline = std::chrono::steady_clock::now() + wait_deadline;
  while (offered().size() != 2 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  EXPECT_EQ(offered(), (offers{{"m2", 2}, {"m3", 1}}));
}

TEST_F(provider_link_test, links_past_links_per_provider_max_are_refused_and_others_are_not) {
  const auto token = make_provider();
  std::vector<std::unique_ptr<agent>> silent;
  for (int i = 0; i < 4; ++i) {  // links_per_provider_max: each one links and says nothing
    silent.push_back(std::make_unique<agent>(port_, token, hello_with(4096), "unused", false));
    ASSERT_TRUE(silent.back()->wait_connected());
  }
  agent fifth(port_, token, hello_with(4096), "unused");
  const auto refused = fifth.wait_disconnect();
  ASSERT_TRUE(refused);
  EXPECT_EQ(refused->kind, link_disconnect_kind::rejected);
  EXPECT_EQ(refused->http_status, 429);
  EXPECT_EQ(fifth.offers(), 0u);

  // Another provider's links are not counted with these.
  agent other(port_, make_provider(), hello_with(4096), "from the other provider");
  ASSERT_TRUE(other.wait_welcome());
  // One of the four gone, the provider may link again (once the server has seen it go: a link
  // refused before that is tried anew).
  silent.pop_back();
  const auto deadline = std::chrono::steady_clock::now() + wait_deadline;
  bool welcomed = false;
  while (!welcomed && std::chrono::steady_clock::now() < deadline) {
    agent again(port_, token, hello_with(4096), "answered");
    welcomed = again.wait_welcome_or_disconnect();
  }
  EXPECT_TRUE(welcomed);
}

class paced_provider_link_test : public provider_link_test {
 protected:
  paced_provider_link_test() : provider_link_test(std::chrono::minutes(1), std::chrono::minutes(1)) {}
};

TEST_F(paced_provider_link_test, advertise_frames_sooner_than_advertise_interval_min_close_the_link) {
  // Each one is recorded and relists the provider with the scheduler every link shares.
  const auto token = make_provider();
  agent eager(port_, token, hello_with(4096), "unused");
  ASSERT_TRUE(eager.wait_welcome());
  auto offer = hello_with(4096).models.front();
  offer.model_name = "m2";
  ASSERT_TRUE(eager.send(link::advertise{.models = {offer}}));
  ASSERT_TRUE(eager.send(link::advertise{.models = {offer}}));
  const auto closed = eager.wait_disconnect();
  ASSERT_TRUE(closed);
  EXPECT_EQ(closed->close_code, 1008);
  EXPECT_NE(closed->message.find("at most every 60000 ms"), std::string::npos) << closed->message;
}

TEST_F(paced_provider_link_test, a_hello_sooner_than_hello_interval_min_closes_its_link_and_not_the_providers_other) {
  // Each hello is recorded and relists the provider: an agent must not relink in a loop.
  const auto token = make_provider();
  const auto api_key = make_user();
  agent first(port_, token, hello_with(4096), "from the first link");
  ASSERT_TRUE(first.wait_welcome());
  agent second(port_, token, hello_with(4096), "from the second link");
  const auto closed = second.wait_disconnect();
  ASSERT_TRUE(closed);
  EXPECT_EQ(closed->close_code, 1008);
  EXPECT_NE(closed->message.find("less than 60000 ms ago (hello_interval_min)"), std::string::npos) << closed->message;
  EXPECT_EQ(chat(api_key), "from the first link");
  EXPECT_EQ(first.disconnects(), 0u);
}

TEST_F(provider_link_test, a_click_on_a_campaign_that_does_not_exist_wakes_no_campaign_actor) {
  // The click URL is open to anyone: each made-up campaign id used to start a campaign actor
  // (a store read, kept until idle), without bound.
  const auto created = call(port_, http::verb::post, "/admin/campaigns",
                            R"({"advertiser":"acme","title":"T","text":"X","url":"https://acme.example",)"
                            R"("keywords":["gpu"],"cpm_bid_micros":2000000,"budget_micros":5000000})",
                            admin_token);
  ASSERT_EQ(created.status, 201u) << created.body;
  caf::scoped_actor self(system_);
  const auto live_campaigns = [&] {
    std::size_t live = 0;
    self->request(runtime_.campaigns, wait_deadline, actors::count_atom::value)
        .receive([&](std::size_t n) { live = n; }, [&](caf::error& e) { ADD_FAILURE() << actors::describe(e); });
    return live;
  };
  const auto before = live_campaigns();
  for (const std::string made_up : {"made-up.j1", "made_up_2.j2", "no-dot"}) {
    const auto click = call(port_, http::verb::get, "/a/c/" + made_up, "", "");
    EXPECT_EQ(click.status, 404u) << made_up << ": " << click.body;
    EXPECT_NE(click.body.find("names no campaign"), std::string::npos) << click.body;
  }
  EXPECT_EQ(live_campaigns(), before);
}

TEST_F(provider_link_test, a_click_the_ad_server_cannot_record_in_time_still_leads_to_the_advertisers_page) {
  // The click's record waits on a disk that hangs: the person goes to the campaign's page after
  // click_answer_wait_max, uncounted, instead of waiting as long as the disk does.
  const auto created = call(port_, http::verb::post, "/admin/campaigns",
                            R"({"advertiser":"acme","title":"T","text":"X","url":"https://acme.example/landing",)"
                            R"("keywords":["gpu"],"cpm_bid_micros":2000000,"budget_micros":5000000})",
                            admin_token);
  ASSERT_EQ(created.status, 201u) << created.body;
  const auto user = call(port_, http::verb::post, "/admin/users", R"({"tier":"free"})", admin_token);
  ASSERT_EQ(user.status, 201u) << user.body;
  const std::string api_key(json::parse(user.body).at("api_key").as_string());
  agent serving(port_, make_provider(), hello_with(4096), "Rent the one with the most memory.");
  ASSERT_TRUE(serving.wait_welcome());
  const auto answer = call(port_, http::verb::post, "/v1/chat/completions",
                           R"({"model":")" + model + R"(","messages":[{"role":"user","content":"which gpu to rent?"}]})",
                           api_key);
  ASSERT_EQ(answer.status, 200u) << answer.body;
  const std::string url(json::parse(answer.body).at("x_gpustream").at("ad").at("url").as_string());
  const auto path = url.find("/a/c/");
  ASSERT_NE(path, std::string::npos) << url;

  http_answer click;
  {
    const auto held = faults_->hold_syncs_in_scope();  // the click's append cannot be acknowledged
    click = call(port_, http::verb::get, url.substr(path), "", "", wait_deadline);
  }
  EXPECT_EQ(click.status, 302u) << click.body;
  EXPECT_EQ(click.location, "https://acme.example/landing");
}

}  // namespace
}  // namespace gpustream::gateway
