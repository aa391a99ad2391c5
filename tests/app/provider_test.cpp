// The provider agent: its pure rules (the concurrency probe's steps, UTF-8 splitting, option
// checks) and the whole agent in process, between a coordinator written inside the test (a Beast
// WebSocket server speaking link frames) and the real test upstream run as a child process.
#include "app/provider.hpp"

#include <gtest/gtest.h>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/redirect_error.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/http/read.hpp>
#include <boost/beast/http/string_body.hpp>
#include <boost/beast/http/write.hpp>
#include <boost/beast/websocket/stream.hpp>
#include <boost/json/parse.hpp>
#include <boost/json/serialize.hpp>
#include <boost/json/value.hpp>

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <functional>
#include <future>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "domain/provider.hpp"
#include "gateway/link_codec.hpp"

extern char** environ;

namespace gpustream::app {
namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
namespace json = boost::json;
namespace websocket = beast::websocket;
namespace link = gateway::link;
using tcp = asio::ip::tcp;
using namespace std::chrono_literals;

/// Generous: the waits end on real events long before; hitting it fails the test.
constexpr auto wait_deadline = 20s;

// --- pure parts ---------------------------------------------------------------------------------

constexpr std::chrono::microseconds measurable = 50ms;

/// A level that lasted long enough to be compared.
probe_level level(std::uint32_t concurrency, double tokens_per_second, bool failed = false) {
  return {.concurrency = concurrency,
          .failed = failed,
          .tokens_per_second = tokens_per_second,
          .duration = 200ms};
}

TEST(next_probe_step, doubles_up_to_the_flag_and_ends_on_it) {
  std::vector<probe_level> measured;
  std::vector<std::uint32_t> levels;
  for (;;) {
    const auto step = next_probe_step(measured, 6, measurable);
    if (step.done) {
      EXPECT_EQ(step.sustained, 6u);
      break;
    }
    levels.push_back(step.next_concurrency);
    measured.push_back(level(step.next_concurrency, 100.0 * step.next_concurrency));
  }
  EXPECT_EQ(levels, (std::vector<std::uint32_t>{1, 2, 4, 6}));
}

TEST(next_probe_step, stops_before_a_failed_level) {
  const std::vector<probe_level> measured = {level(1, 100), level(2, 200), level(4, 0, true)};
  const auto step = next_probe_step(measured, 8, measurable);
  EXPECT_TRUE(step.done);
  EXPECT_EQ(step.sustained, 2u);
}

TEST(next_probe_step, stops_when_throughput_gains_ten_percent_or_less) {
  auto step = next_probe_step({level(1, 100), level(2, 180), level(4, 198)}, 16, measurable);
  EXPECT_TRUE(step.done);
  EXPECT_EQ(step.sustained, 2u) << "198 is 10% above 180, not more";
  step = next_probe_step({level(1, 100), level(2, 180), level(4, 199)}, 16, measurable);
  EXPECT_FALSE(step.done);
  EXPECT_EQ(step.next_concurrency, 8u);
}

TEST(next_probe_step, levels_too_short_to_measure_count_as_improving) {
  auto quick = level(4, 150);
  quick.duration = 2ms;
  auto step = next_probe_step({level(1, 100), level(2, 180), quick}, 16, measurable);
  EXPECT_FALSE(step.done) << "a 2 ms level says nothing about the backend's capacity";
  EXPECT_EQ(step.next_concurrency, 8u);
  auto failed_quick = level(8, 0, true);
  failed_quick.duration = 1ms;
  step = next_probe_step({level(1, 100), level(2, 180), quick, failed_quick}, 16, measurable);
  EXPECT_TRUE(step.done) << "a failure counts however short";
  EXPECT_EQ(step.sustained, 4u);
}

TEST(next_probe_step, a_flag_of_one_needs_no_probe_and_a_failed_first_level_says_one) {
  auto step = next_probe_step({}, 1, measurable);
  EXPECT_TRUE(step.done);
  EXPECT_EQ(step.sustained, 1u);
  step = next_probe_step({level(1, 0, true)}, 8, measurable);
  EXPECT_TRUE(step.done);
  EXPECT_EQ(step.sustained, 1u);
}

TEST(split_utf8, cuts_only_between_characters) {
  const std::string text = "aé世🙂b";  // 1 + 2 + 3 + 4 + 1 bytes
  for (std::size_t bytes_max = 4; bytes_max <= text.size() + 1; ++bytes_max) {
    std::string joined;
    for (const auto piece : split_utf8(text, bytes_max)) {
      EXPECT_LE(piece.size(), bytes_max);
      EXPECT_NE(static_cast<unsigned char>(piece.front()) & 0xC0, 0x80) << "starts mid-character";
      joined += piece;
    }
    EXPECT_EQ(joined, text);
  }
  EXPECT_TRUE(split_utf8("", 10).empty());
  EXPECT_EQ(split_utf8("🙂", 2).size(), 1u) << "a character longer than the limit goes whole";
}

TEST(resolve_provider_options, completes_and_checks_the_flags) {
  provider_options options;
  options.coordinator = "ws://127.0.0.1:8080";
  options.token = "t";
  options.backend = "openai=http://127.0.0.1:1234/v1";
  options.name = "rig\n1";
  auto resolved = resolve_provider_options(options);
  ASSERT_TRUE(resolved) << resolved.error();
  EXPECT_EQ(resolved->link.url, "ws://127.0.0.1:8080/v1/providers/link");
  EXPECT_EQ(resolved->upstream.base_url, "http://127.0.0.1:1234/v1");
  EXPECT_EQ(resolved->link.bearer_token, "t");
  EXPECT_NE(resolved->link.user_agent.find("rig_1"), std::string::npos) << resolved->link.user_agent;

  options.coordinator = "ws://h:1/custom/path";
  resolved = resolve_provider_options(options);
  ASSERT_TRUE(resolved) << resolved.error();
  EXPECT_EQ(resolved->link.url, "ws://h:1/custom/path");

  auto broken = options;
  broken.backend = "http://127.0.0.1:1234/v1";
  EXPECT_FALSE(resolve_provider_options(broken));
  broken = options;
  broken.backend = "builtin=model.gguf";
  EXPECT_FALSE(resolve_provider_options(broken));
  // The hello names the backend: a URL past the link's limit could never be said, and the agent
  // would link, fail its hello and link again for ever.
  const std::size_t url_max = options.link.limits.url_bytes_max;
  auto longest = options;
  longest.backend = "openai=http://127.0.0.1:1234/";
  longest.backend += std::string(url_max - (longest.backend.size() - 7), 'v');
  EXPECT_TRUE(resolve_provider_options(longest)) << "a URL of url_bytes_max bytes";
  broken = longest;
  broken.backend += 'v';
  const auto too_long = resolve_provider_options(broken);
  ASSERT_FALSE(too_long);
  EXPECT_NE(too_long.error().find(std::to_string(url_max + 1) + " bytes"), std::string::npos) << too_long.error();
  // So could one that is not UTF-8 (nor is a URL anything but printable ASCII).
  for (const char* url : {"openai=http://127.0.0.1:1234/v1/\xff", "openai=http://h\xc3\xa9.example/v1",
                          "openai=http://127.0.0.1:1234/v 1"}) {
    broken = options;
    broken.backend = url;
    const auto unprintable = resolve_provider_options(broken);
    ASSERT_FALSE(unprintable) << url;
    EXPECT_NE(unprintable.error().find("printable ASCII"), std::string::npos) << unprintable.error();
  }
  broken = options;
  broken.token.clear();
  const auto no_token = resolve_provider_options(broken);
  ASSERT_FALSE(no_token);
  EXPECT_NE(no_token.error().find("GPUSTREAM_PROVIDER_TOKEN"), std::string::npos);
  broken = options;
  broken.probe_tokens = 0;
  EXPECT_FALSE(resolve_provider_options(broken));
  broken = options;
  broken.probe_tokens_max = broken.probe_tokens - 1;  // a level 1 run again could only ask for fewer
  const auto fewer = resolve_provider_options(broken);
  ASSERT_FALSE(fewer);
  EXPECT_NE(fewer.error().find("probe_tokens_max"), std::string::npos) << fewer.error();
  broken.probe_tokens_max = broken.probe_tokens;
  EXPECT_TRUE(resolve_provider_options(broken)) << "no rerun, but a probe";
  broken = options;
  broken.max_concurrency = 0;
  EXPECT_FALSE(resolve_provider_options(broken));
  auto most = options;
  most.max_concurrency = 256;  // what the coordinator takes for one model
  EXPECT_TRUE(resolve_provider_options(most));
  broken.max_concurrency = 257;
  const auto too_many = resolve_provider_options(broken);
  ASSERT_FALSE(too_many);
  EXPECT_NE(too_many.error().find("from 1 to 256"), std::string::npos) << too_many.error();
  broken = options;
  broken.coordinator = "http://h:1";
  EXPECT_FALSE(resolve_provider_options(broken));
  broken = options;
  broken.price_per_mtok_micros = -1;
  EXPECT_FALSE(resolve_provider_options(broken));
  auto dearest = options;
  dearest.price_per_mtok_micros = 1'000'000'000;  // what the coordinator takes
  EXPECT_TRUE(resolve_provider_options(dearest));
  broken.price_per_mtok_micros = 1'000'000'001;
  const auto too_dear = resolve_provider_options(broken);
  ASSERT_FALSE(too_dear);
  EXPECT_NE(too_dear.error().find("--price-per-mtok must be from 0 to 1000000000"), std::string::npos) << too_dear.error();
  auto widest = options;
  widest.context_length_tokens = 16'777'216;
  EXPECT_TRUE(resolve_provider_options(widest));
  broken = options;
  broken.context_length_tokens = 16'777'217;
  const auto too_wide = resolve_provider_options(broken);
  ASSERT_FALSE(too_wide);
  EXPECT_NE(too_wide.error().find("--context-length must be at most 16777216 tokens"), std::string::npos) << too_wide.error();
}

// --- the test upstream as a child process -------------------------------------------------------

class upstream_process {
 public:
  /// Listens on 127.0.0.1:`port` (0: a free one).
  explicit upstream_process(std::vector<std::string> arguments, std::uint16_t port = 0) {
    int fds[2];
    if (::pipe2(fds, O_CLOEXEC) != 0) return;
    std::vector<std::string> all{GPUSTREAM_TEST_UPSTREAM, "--listen", "127.0.0.1:" + std::to_string(port), "--threads",
                                 "2"};
    all.insert(all.end(), arguments.begin(), arguments.end());
    std::vector<char*> argv;
    for (auto& argument : all) argv.push_back(argument.data());
    argv.push_back(nullptr);
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_adddup2(&actions, fds[1], STDOUT_FILENO);
    const int spawned =
        ::posix_spawn(&pid_, GPUSTREAM_TEST_UPSTREAM, &actions, nullptr, argv.data(), environ);
    posix_spawn_file_actions_destroy(&actions);
    ::close(fds[1]);
    out_ = fds[0];
    if (spawned != 0) {
      pid_ = -1;
      return;
    }
    read_port();
  }

  ~upstream_process() {
    if (pid_ > 0) {
      ::kill(pid_, SIGTERM);
      int status = 0;
      ::waitpid(pid_, &status, 0);
    }
    if (out_ >= 0) ::close(out_);
  }

  [[nodiscard]] bool ready() const { return port_ != 0; }
  [[nodiscard]] std::uint16_t port() const { return port_; }
  [[nodiscard]] std::string base_url() const {
    return "http://127.0.0.1:" + std::to_string(port_) + "/v1";
  }

  /// The models it serves from now on (POST /control/models): a backend loading or unloading one.
  void serve_models(const std::string& ids) const {
    const auto response = exchange(http::verb::post, "/control/models", ids);
    EXPECT_EQ(response.result_int(), 200u) << response.body();
  }

  /// One counter of GET /stats.
  [[nodiscard]] std::int64_t stat(const char* name) const {
    const auto response = exchange(http::verb::get, "/stats", "");
    return json::parse(response.body()).as_object().at(name).to_number<std::int64_t>();
  }

  /// Polls a /stats counter (a real counter, not the passing of time) until it reaches `value`.
  [[nodiscard]] bool wait_stat(const char* name, std::int64_t value) const {
    const auto deadline = std::chrono::steady_clock::now() + wait_deadline;
    while (std::chrono::steady_clock::now() < deadline) {
      if (stat(name) == value) return true;
      std::this_thread::yield();
    }
    return false;
  }

 private:
  /// One request on its own connection, answered in full.
  http::response<http::string_body> exchange(http::verb method, const char* target, const std::string& body) const {
    asio::io_context io;
    tcp::socket socket(io);
    socket.connect(tcp::endpoint(asio::ip::make_address("127.0.0.1"), port_));
    http::request<http::string_body> request{method, target, 11};
    request.set(http::field::host, "127.0.0.1");
    request.keep_alive(false);
    if (!body.empty()) {
      request.body() = body;
      request.prepare_payload();
    }
    http::write(socket, request);
    beast::flat_buffer buffer;
    http::response<http::string_body> response;
    http::read(socket, buffer, response);
    return response;
  }

  void read_port() {
    std::string line;
    const auto deadline = std::chrono::steady_clock::now() + wait_deadline;
    while (line.find('\n') == std::string::npos && std::chrono::steady_clock::now() < deadline) {
      pollfd ready{out_, POLLIN, 0};
      if (::poll(&ready, 1, 100) <= 0) continue;
      char piece[256];
      const auto got = ::read(out_, piece, sizeof piece);
      if (got <= 0) return;
      line.append(piece, static_cast<std::size_t>(got));
    }
    const auto colon = line.rfind(':');
    if (!line.starts_with("listening ") || colon == std::string::npos) return;
    port_ = static_cast<std::uint16_t>(std::stoul(line.substr(colon + 1)));
  }

  pid_t pid_ = -1;
  int out_ = -1;
  std::uint16_t port_ = 0;
};

// --- a coordinator inside the test --------------------------------------------------------------

/// Accepts agents on 127.0.0.1, records what they send, lets the test send frames to the latest
/// connection or drop it. With `refuse_status` set, answers every upgrade with that status.
class fake_coordinator {
 public:
  struct received {
    int connection = 0;
    link::frame frame;
  };

  explicit fake_coordinator(unsigned refuse_status = 0) : refuse_status_(refuse_status) {
    acceptor_.open(tcp::v4());
    acceptor_.set_option(tcp::acceptor::reuse_address(true));
    acceptor_.bind({asio::ip::make_address("127.0.0.1"), 0});
    acceptor_.listen();
    asio::co_spawn(io_, accept_loop(), asio::detached);
    thread_ = std::thread([this] { io_.run(); });
  }

  ~fake_coordinator() {
    io_.stop();
    thread_.join();
  }

  [[nodiscard]] std::string url() const {
    return "ws://127.0.0.1:" + std::to_string(acceptor_.local_endpoint().port());
  }

  /// Sends `f` to the latest connection and waits until it is written.
  void send(const link::frame& f) {
    auto bytes = std::make_shared<std::vector<std::uint8_t>>(link::encode(f));
    std::promise<boost::system::error_code> written;
    asio::post(io_, [&] {
      current_->async_write(asio::buffer(*bytes), [&, bytes](boost::system::error_code ec, std::size_t) {
        written.set_value(ec);
      });
    });
    const auto ec = written.get_future().get();
    ASSERT_FALSE(ec) << ec.message();
  }

  /// Closes the latest connection with `code` and `reason`, and waits until the close is sent.
  void close(std::uint16_t code, const std::string& reason) {
    std::promise<void> done;
    asio::post(io_, [&] {
      current_->async_close(websocket::close_reason(static_cast<websocket::close_code>(code), reason), [&](boost::system::error_code) { done.set_value(); });
    });
    done.get_future().get();
  }

  /// Closes the latest connection abruptly, as a crashed coordinator would.
  void drop() {
    std::promise<void> done;
    asio::post(io_, [&] {
      boost::system::error_code ignored;
      current_->next_layer().close(ignored);
      done.set_value();
    });
    done.get_future().get();
  }

  [[nodiscard]] bool wait_until(const std::function<bool()>& predicate) {
    std::unique_lock lock(mutex_);
    return changed_.wait_for(lock, wait_deadline, predicate);
  }

  /// Frames of type T received so far, on any connection.
  template <class T>
  std::vector<T> all() {
    std::lock_guard lock(mutex_);
    return all_locked<T>();
  }

  /// all(), with the lock held (inside wait_until's predicate).
  template <class T>
  std::vector<T> all_locked() const {
    std::vector<T> found;
    for (const auto& r : received_) {
      if (const auto* f = std::get_if<T>(&r.frame)) found.push_back(*f);
    }
    return found;
  }

  template <class T>
  std::size_t count() {
    return all<T>().size();
  }

  /// Must be called with the lock held (inside wait_until's predicate) or after the waits.
  template <class T>
  std::size_t count_locked() const {
    std::size_t n = 0;
    for (const auto& r : received_) n += std::holds_alternative<T>(r.frame) ? 1 : 0;
    return n;
  }

  /// Links that ended (closed by either side). With the lock held (inside wait_until's predicate).
  [[nodiscard]] int closed_locked() const { return closed_; }

  std::vector<std::string> authorizations() {
    std::lock_guard lock(mutex_);
    return authorizations_;
  }

  std::vector<std::string> user_agents() {
    std::lock_guard lock(mutex_);
    return user_agents_;
  }

 private:
  asio::awaitable<void> accept_loop() {
    for (int n = 0;; ++n) {
      auto socket = co_await acceptor_.async_accept(asio::use_awaitable);
      asio::co_spawn(io_, session(std::move(socket), n), asio::detached);
    }
  }

  asio::awaitable<void> session(tcp::socket socket, int n) {
    boost::system::error_code ec;
    beast::flat_buffer buffer;
    http::request<http::string_body> request;
    co_await http::async_read(socket, buffer, request, asio::redirect_error(asio::use_awaitable, ec));
    if (ec) co_return;
    record([&] {
      authorizations_.emplace_back(request[http::field::authorization]);
      user_agents_.emplace_back(request[http::field::user_agent]);
    });
    if (refuse_status_ != 0) {
      http::response<http::string_body> refusal(static_cast<http::status>(refuse_status_), 11);
      refusal.body() = R"({"error":{"message":"unknown provider token","type":"authentication_error"}})";
      refusal.prepare_payload();
      co_await http::async_write(socket, refusal, asio::redirect_error(asio::use_awaitable, ec));
      co_return;
    }
    auto ws = std::make_shared<websocket::stream<tcp::socket>>(std::move(socket));
    co_await ws->async_accept(request, asio::redirect_error(asio::use_awaitable, ec));
    if (ec) co_return;
    ws->binary(true);
    current_ = ws;
    for (;;) {
      beast::flat_buffer message;
      co_await ws->async_read(message, asio::redirect_error(asio::use_awaitable, ec));
      if (ec) {
        record([&] { ++closed_; });
        co_return;
      }
      const auto data = message.cdata();
      auto decoded = link::decode({static_cast<const std::uint8_t*>(data.data()), data.size()}, {});
      if (!decoded) {
        ADD_FAILURE() << "the agent sent a bad frame: " << decoded.error().message;
        co_return;
      }
      record([&] { received_.push_back({n, std::move(*decoded)}); });
    }
  }

  template <class F>
  void record(F&& f) {
    {
      std::lock_guard lock(mutex_);
      f();
    }
    changed_.notify_all();
  }

  unsigned refuse_status_;
  asio::io_context io_;
  tcp::acceptor acceptor_{io_};
  std::shared_ptr<websocket::stream<tcp::socket>> current_;
  std::thread thread_;
  std::mutex mutex_;
  std::condition_variable changed_;
  std::vector<received> received_;
  int closed_ = 0;
  std::vector<std::string> authorizations_;
  std::vector<std::string> user_agents_;
};

/// The agent on its own io thread.
class agent_runner {
 public:
  explicit agent_runner(provider_options options) : thread_([this] { io_.run(); }) {
    auto resolved = resolve_provider_options(std::move(options));
    EXPECT_TRUE(resolved) << (resolved ? "" : resolved.error());
    if (!resolved) return;
    on_io([&] {
      auto created = provider_agent::create(io_, std::move(*resolved), [this](int code) {
        std::lock_guard lock(mutex_);
        exit_code_ = code;
        exited_.notify_all();
      });
      EXPECT_TRUE(created);
      if (!created) return;
      agent_ = std::move(*created);
      agent_->start();
    });
  }

  ~agent_runner() {
    on_io([this] { agent_.reset(); });
    work_.reset();
    io_.stop();
    thread_.join();
  }

  std::optional<int> wait_exit() {
    std::unique_lock lock(mutex_);
    exited_.wait_for(lock, wait_deadline, [this] { return exit_code_.has_value(); });
    return exit_code_;
  }

  void drain(std::function<void()> drained) {
    on_io([&] { agent_->drain(std::move(drained)); });
  }
  /// provider_agent::drain and, in the same handler, stop (a second signal at once); then runs
  /// what they posted.
  void drain_and_stop(std::function<void()> drained) {
    on_io([&] {
      agent_->drain(std::move(drained));
      agent_->stop();
    });
    on_io([] {});
  }
  /// provider_agent::stop; then runs what it posted to the io thread (which runs in order).
  void stop() {
    on_io([this] { agent_->stop(); });
    on_io([] {});
  }

  /// provider_agent::drain, then stop() once drained, as run_provider does; then `drained`.
  void drain_then_stop(std::function<void()> drained) {
    on_io([&] {
      agent_->drain([this, drained = std::move(drained)] {
        agent_->stop();
        drained();
      });
    });
  }

 private:
  template <class F>
  void on_io(F&& f) {
    std::promise<void> done;
    asio::post(io_, [&] {
      f();
      done.set_value();
    });
    done.get_future().get();
  }

  asio::io_context io_{1};
  std::optional<asio::executor_work_guard<asio::io_context::executor_type>> work_{io_.get_executor()};
  std::unique_ptr<provider_agent> agent_;
  std::mutex mutex_;
  std::condition_variable exited_;
  std::optional<int> exit_code_;
  std::thread thread_;
};

provider_options agent_options(const fake_coordinator& coordinator, const upstream_process& upstream) {
  provider_options options;
  options.coordinator = coordinator.url();
  options.token = "provider-secret";
  options.backend = "openai=" + upstream.base_url();
  options.name = "rig-7";
  options.price_per_mtok_micros = 1'500'000;
  options.link.backoff.delay_initial = 20ms;
  options.link.backoff.delay_max = 100ms;
  return options;
}

std::string chat_request(const std::string& model) {
  return json::serialize(json::object{
      {"model", model},
      {"messages", json::array{json::object{{"role", "user"}, {"content", "hi"}}}},
      {"stream", true},
      {"stream_options", json::object{{"include_usage", true}}}});
}

/// Waits for the agent's hello, welcomes it (heartbeats every second), offers it job-1 (a chat on
/// m1) and waits for the answer's first delta; false when one of them does not come.
bool welcome_and_stream_job_1(fake_coordinator& coordinator) {
  if (!coordinator.wait_until([&] { return coordinator.count_locked<link::hello>() == 1; })) return false;
  coordinator.send(link::welcome{.provider_id = "prov-1", .heartbeat_interval_ms = 1000});
  coordinator.send(link::offer{.job_id = "job-1", .kind = link::job_kind::chat,
                               .request_json = chat_request("m1"), .attempt = 1});
  return coordinator.wait_until([&] { return coordinator.count_locked<link::delta>() >= 1; });
}

/// Waits for a heartbeat that says the agent drains; false when none comes.
bool wait_draining_heartbeat(fake_coordinator& coordinator) {
  return coordinator.wait_until([&] {
    const auto beats = coordinator.all_locked<link::heartbeat>();
    return std::any_of(beats.begin(), beats.end(), [](const link::heartbeat& h) { return h.draining; });
  });
}

// --- the agent end to end -----------------------------------------------------------------------

/// The max_concurrency an agent with a flag of 4 says hello with after probing a test upstream
/// started with `upstream_arguments`, asking `probe_tokens` an answer and comparing every level's
/// rate; `adjust` changes its options further. 0 when it never said hello.
std::uint32_t advertised_after_probe(std::vector<std::string> upstream_arguments, std::uint32_t probe_tokens,
                                     const std::function<void(provider_options&)>& adjust = {}) {
  upstream_process upstream(std::move(upstream_arguments));
  EXPECT_TRUE(upstream.ready());
  if (!upstream.ready()) return 0;
  fake_coordinator coordinator;
  auto options = agent_options(coordinator, upstream);
  options.max_concurrency = 4;
  options.probe_tokens = probe_tokens;
  options.probe_measurable_min = std::chrono::milliseconds(1);
  if (adjust) adjust(options);
  agent_runner agent(options);
  const bool said_hello = coordinator.wait_until([&] { return coordinator.count_locked<link::hello>() == 1; });
  EXPECT_TRUE(said_hello);
  return said_hello ? coordinator.all<link::hello>().front().max_concurrency : 0;
}

TEST(provider_agent, the_probe_counts_a_reasoning_models_thinking_with_or_without_the_backends_usage) {
  // Every token is thinking (delta.reasoning_content), which no content delta shows: counted by
  // content alone, each level would measure 0 tokens/s and the probe would settle on 1. 60 ms a
  // level: twice the streams do twice the tokens, clearly.
  for (const char* usage : {"correct", "none"}) {
    EXPECT_EQ(advertised_after_probe({"--context-length", "8192", "--tokens", "30", "--reasoning-tokens", "1000",
                                      "--token-interval-us", "2000", "--max-concurrent", "2", "--usage", usage},
                                     30),
              2u)
        << "the probe met the upstream's limit of 2, with usage " << usage;
  }
}

TEST(provider_agent, the_probe_is_not_fooled_by_a_models_load_or_by_a_usage_adding_up_every_answer) {
  // One answer at a time (the others wait in line), about 1 s each (a request's own overhead is
  // a small part of it, and so is a loaded machine's stall next to the probe's 10 %), and:
  // - 300 ms to load the model first. Were the load counted in level 1, two streams would look
  //   1.3 times faster than one, and the agent would advertise slots the backend does not have;
  // - each answer's usage reporting every token answered so far (the warm-up's too): taken as it
  //   is, a level of 2 would seem several times faster than a level of 1. It counts within the
  //   probe_tokens asked for.
  for (const auto& quirk : {std::vector<std::string>{"--load-ms", "300"}, std::vector<std::string>{"--usage", "lifetime"}}) {
    std::vector<std::string> arguments{"--context-length", "8192", "--tokens", "100", "--token-interval-us", "10000",
                                       "--parallel", "1"};
    arguments.insert(arguments.end(), quirk.begin(), quirk.end());
    EXPECT_EQ(advertised_after_probe(arguments, 100), 1u) << "two streams are no faster than one, with " << quirk[0];
  }
}

TEST(provider_agent, the_probes_warm_up_may_take_a_models_load_and_a_level_may_not_each_within_its_limit) {
  // 2 s to load the model, then one answer at a time, 500 ms each (a loaded machine's stall is
  // small next to it). A level may take 1.6 s: one that waits for the load fails it, and a probe
  // whose first level fails says nothing (the agent advertises its flag, 4); a warm-up that waits
  // for the load lets every level be measured (1; two answers one after the other take 1 s).
  for (const auto& [warm_up_ms, advertised] : {std::pair{5'000, 1u}, std::pair{200, 4u}}) {
    EXPECT_EQ(advertised_after_probe({"--context-length", "8192", "--tokens", "100", "--token-interval-us", "5000",
                                      "--load-ms", "2000", "--parallel", "1"},
                                     100,
                                     [warm_up_ms](provider_options& options) {
                                       options.probe_level_timeout = std::chrono::milliseconds(1'600);
                                       options.probe_warm_up_timeout = std::chrono::milliseconds(warm_up_ms);
                                     }),
              advertised)
        << "probe_warm_up_timeout " << warm_up_ms << " ms";
  }
}

TEST(provider_agent, a_model_that_refuses_a_chat_is_passed_over_by_the_probe_not_trusted_to_the_flag) {
  // An embedding model whose name does not say so, listed first (Ollama lists the newest first):
  // its 400 says nothing of the backend's concurrency. The next model is probed: one answer at a
  // time, about 1 s each (two one after the other take twice as long; a loaded machine's stall is
  // small next to it).
  EXPECT_EQ(advertised_after_probe({"--models", "bge-m3,m1", "--chatless-models", "bge-m3", "--context-length", "8192",
                                    "--tokens", "100", "--token-interval-us", "10000", "--parallel", "1"},
                                   100),
            1u)
      << "the agent advertised its flag (4): the probe stopped at the refusing model";
}

/// An agent that does not probe, on a test upstream started with `upstream_arguments`, linked to
/// a fake coordinator; `adjust` changes its options first.
struct unprobed_agent {
  explicit unprobed_agent(std::vector<std::string> upstream_arguments,
                          const std::function<void(provider_options&)>& adjust = {})
      : upstream(std::move(upstream_arguments)) {
    EXPECT_TRUE(upstream.ready());
    options = agent_options(coordinator, upstream);
    options.probe = false;
    if (adjust) adjust(options);
    agent.emplace(options);
  }
  /// Its hello, once it came (none: a failure is recorded).
  [[nodiscard]] std::optional<link::hello> hello() {
    if (!coordinator.wait_until([&] { return coordinator.count_locked<link::hello>() == 1; })) return std::nullopt;
    return coordinator.all<link::hello>().front();
  }

  upstream_process upstream;
  fake_coordinator coordinator;
  provider_options options;
  std::optional<agent_runner> agent;
};

TEST(provider_agent, a_model_the_backend_lists_twice_is_advertised_once) {
  // The coordinator refuses a hello that offers a model twice: the agent would link in vain forever.
  unprobed_agent world({"--models", "m1,m2,m1", "--context-length", "8192"});
  const auto hello = world.hello();
  ASSERT_TRUE(hello);
  ASSERT_EQ(hello->models.size(), 2u);
  EXPECT_EQ(hello->models[0].model_name, "m1");
  EXPECT_EQ(hello->models[1].model_name, "m2");
}

TEST(provider_agent, a_model_id_with_a_control_character_is_not_advertised) {
  // The coordinator refuses a hello offering it (it would forge log lines): the agent would never link.
  unprobed_agent world({"--models", "m1,bad\nid,m2", "--context-length", "8192"});
  const auto hello = world.hello();
  ASSERT_TRUE(hello);
  ASSERT_EQ(hello->models.size(), 2u);
  EXPECT_EQ(hello->models[0].model_name, "m1");
  EXPECT_EQ(hello->models[1].model_name, "m2");
}

TEST(provider_agent, a_window_over_what_the_coordinator_takes_is_advertised_as_its_largest) {
  // The coordinator refuses an offer claiming more: the agent would link in vain forever.
  unprobed_agent world({"--models", "m1", "--context-length", "20000000"});
  const auto hello = world.hello();
  ASSERT_TRUE(hello);
  ASSERT_EQ(hello->models.size(), 1u);
  EXPECT_EQ(hello->models[0].context_length_tokens, domain::provider_options{}.context_length_tokens_max);
}

/// The model names of an offer list, comma-separated.
std::string names_of(const std::vector<events::model_offer>& models) {
  std::string out;
  for (const auto& m : models) out += (out.empty() ? "" : ",") + m.model_name;
  return out;
}

TEST(provider_agent, a_model_the_backend_loads_or_unloads_is_advertised_on_the_live_link) {
  unprobed_agent world({"--models", "m1,m2", "--context-length", "8192"},
                       [](provider_options& options) { options.models_refresh_interval = 50ms; });
  auto& coordinator = world.coordinator;
  const auto hello = world.hello();
  ASSERT_TRUE(hello);
  EXPECT_EQ(names_of(hello->models), "m1,m2");
  coordinator.send(link::welcome{.provider_id = "prov-1", .heartbeat_interval_ms = 1000, .model_updates = true});

  world.upstream.serve_models("m2,m3");
  ASSERT_TRUE(coordinator.wait_until([&] { return coordinator.count_locked<link::advertise>() == 1; }));
  const auto advertised = coordinator.all<link::advertise>().front();
  EXPECT_EQ(names_of(advertised.models), "m2,m3");
  for (const auto& m : advertised.models) {
    EXPECT_EQ(m.context_length_tokens, 8192u);
    EXPECT_EQ(m.output_price_micros_per_mtok, 1'500'000);
    EXPECT_EQ(m.max_concurrency, world.options.max_concurrency);
  }
  EXPECT_EQ(coordinator.count_locked<link::hello>(), 1u) << "the link goes on";
}

TEST(provider_agent, a_job_the_backend_answers_404_lists_its_models_at_once) {
  // The periodic listing is ten minutes away: only the 404 can bring the advertise in time.
  unprobed_agent world({"--models", "m1,m2", "--context-length", "8192"}, [](provider_options& options) {
    options.models_refresh_interval = std::chrono::minutes(10);
    options.models_refresh_min = 0ms;
  });
  auto& coordinator = world.coordinator;
  ASSERT_TRUE(world.hello());
  coordinator.send(link::welcome{.provider_id = "prov-1", .heartbeat_interval_ms = 1000, .model_updates = true});
  ASSERT_TRUE(coordinator.wait_until([&] { return coordinator.count_locked<link::heartbeat>() >= 1; }));

  world.upstream.serve_models("m2");
  coordinator.send(link::offer{.job_id = "j1", .kind = link::job_kind::chat, .request_json = chat_request("m1"),
                               .attempt = 1});
  ASSERT_TRUE(coordinator.wait_until([&] { return coordinator.count_locked<link::advertise>() == 1; }));
  EXPECT_EQ(names_of(coordinator.all<link::advertise>().front().models), "m2");
  const auto errors = coordinator.all<link::job_error>();
  ASSERT_EQ(errors.size(), 1u);
  EXPECT_NE(errors.front().message.find("404"), std::string::npos) << errors.front().message;
}

TEST(provider_agent, the_probe_finds_one_slot_of_a_backend_too_fast_to_measure_with_its_first_token_count) {
  // One slot (the others wait in line) and 2 ms per token: 16 tokens take 32 ms, too short to
  // measure, and level 2 would be taken as sustained. Level 1 runs again with more tokens, and
  // level 2 shows no gain over it.
  upstream_process upstream({"--models", "m1", "--tokens", "1000", "--token-interval-us", "2000", "--parallel", "1"});
  ASSERT_TRUE(upstream.ready());
  fake_coordinator coordinator;
  auto options = agent_options(coordinator, upstream);
  options.max_concurrency = 4;
  options.probe_tokens = 16;
  agent_runner agent(options);
  ASSERT_TRUE(coordinator.wait_until([&] { return coordinator.count_locked<link::hello>() == 1; }));
  EXPECT_EQ(coordinator.all<link::hello>().front().max_concurrency, 1u) << "one slot";
}

TEST(provider_agent, probes_says_hello_heartbeats_and_streams_a_job) {
  // 2 ms per token: two streams really do twice the work of one, and a third is refused (429).
  upstream_process upstream({"--models", "m1,m2", "--context-length", "8192", "--tokens", "5",
                             "--token-interval-us", "2000", "--max-concurrent", "2"});
  ASSERT_TRUE(upstream.ready());
  fake_coordinator coordinator;
  auto options = agent_options(coordinator, upstream);
  options.max_concurrency = 4;
  options.probe_tokens = 5;
  agent_runner agent(options);

  ASSERT_TRUE(coordinator.wait_until([&] { return coordinator.count_locked<link::hello>() == 1; }));
  EXPECT_EQ(coordinator.authorizations().front(), "Bearer provider-secret");
  EXPECT_NE(coordinator.user_agents().front().find("rig-7"), std::string::npos);
  const auto hello = coordinator.all<link::hello>().front();
  EXPECT_EQ(hello.backend, events::backend_kind::openai);
  EXPECT_EQ(hello.backend_url, upstream.base_url());
  EXPECT_EQ(hello.max_concurrency, 2u) << "the probe met the upstream's limit of 2";
  ASSERT_EQ(hello.models.size(), 2u);
  EXPECT_EQ(hello.models[0].model_name, "m1");
  EXPECT_EQ(hello.models[1].model_name, "m2");
  for (const auto& model : hello.models) {
    EXPECT_EQ(model.context_length_tokens, 8192u);
    EXPECT_EQ(model.input_price_micros_per_mtok, 1'500'000);
    EXPECT_EQ(model.output_price_micros_per_mtok, 1'500'000);
  }

  coordinator.send(link::welcome{.provider_id = "prov-1", .heartbeat_interval_ms = 50});
  ASSERT_TRUE(coordinator.wait_until([&] { return coordinator.count_locked<link::heartbeat>() >= 2; }));
  EXPECT_EQ(coordinator.all<link::heartbeat>().front().active_jobs, 0u);
  EXPECT_EQ(coordinator.all<link::heartbeat>().front().health_percent, 100u);

  const auto requests_before = upstream.stat("requests");
  coordinator.send(link::offer{.job_id = "job-1", .kind = link::job_kind::chat,
                               .request_json = chat_request("m1"), .attempt = 3});
  ASSERT_TRUE(coordinator.wait_until([&] { return coordinator.count_locked<link::done>() == 1; }));
  std::string text;
  for (const auto& d : coordinator.all<link::delta>()) {
    EXPECT_EQ(d.job_id, "job-1");
    EXPECT_EQ(d.attempt, 3u) << "every frame about a job echoes its offer's attempt";
    text += d.text;
  }
  EXPECT_EQ(text, "tok0 tok1 tok2 tok3 tok4 ");
  const auto done = coordinator.all<link::done>().front();
  EXPECT_EQ(done.job_id, "job-1");
  EXPECT_EQ(done.finish_reason, "stop");
  EXPECT_EQ(done.attempt, 3u);
  EXPECT_EQ(done.completion_tokens_counted, 5u);
  EXPECT_EQ(done.completion_tokens_reported, 5u);
  EXPECT_GT(done.prompt_tokens_reported, 0u);
  EXPECT_GT(done.ttft_us, 0);
  EXPECT_LE(done.ttft_us, done.total_us);
  EXPECT_EQ(upstream.stat("requests"), requests_before + 1);
}

TEST(provider_agent, a_backend_usage_that_adds_up_answers_goes_as_unknown_not_as_a_mismatch) {
  // The coordinator suspends a provider whose reported counts keep missing the pieces it relayed.
  upstream_process upstream({"--models", "m1", "--tokens", "5", "--usage", "lifetime"});
  ASSERT_TRUE(upstream.ready());
  fake_coordinator coordinator;
  auto options = agent_options(coordinator, upstream);
  options.max_concurrency = 1;
  agent_runner agent(options);
  ASSERT_TRUE(coordinator.wait_until([&] { return coordinator.count_locked<link::hello>() == 1; }));
  coordinator.send(link::welcome{.provider_id = "prov-1", .heartbeat_interval_ms = 50});
  // Each answer is 5 pieces of 5 bytes: a count up to 27 passes the coordinator's check (the
  // bytes and 2 tokens more). The eighth answer's lifetime count is 40.
  for (std::uint32_t job = 1; job <= 8; ++job) {
    coordinator.send(link::offer{.job_id = "job-" + std::to_string(job), .kind = link::job_kind::chat,
                                 .request_json = chat_request("m1"), .attempt = 1});
    ASSERT_TRUE(coordinator.wait_until([&] { return coordinator.count_locked<link::done>() == job; })) << job;
  }
  const auto dones = coordinator.all<link::done>();
  for (const auto& done : dones) EXPECT_EQ(done.completion_tokens_counted, 5u) << done.job_id;
  EXPECT_EQ(dones.front().completion_tokens_reported, 5u) << "a count that matches goes on";
  EXPECT_EQ(dones.back().completion_tokens_reported, 0u) << "a count of every answer so far went on";
  EXPECT_GT(dones.back().prompt_tokens_reported, 0u);
}

TEST(provider_agent, refuses_beyond_capacity_cancels_on_request_and_on_link_loss_then_reconnects) {
  // Slow answers, so that jobs are still running when the test acts on them.
  upstream_process upstream({"--models", "m1", "--tokens", "1000", "--token-interval-us", "20000"});
  ASSERT_TRUE(upstream.ready());
  fake_coordinator coordinator;
  auto options = agent_options(coordinator, upstream);
  options.max_concurrency = 2;
  options.probe = false;
  agent_runner agent(options);
  ASSERT_TRUE(coordinator.wait_until([&] { return coordinator.count_locked<link::hello>() == 1; }));
  EXPECT_EQ(coordinator.all<link::hello>().front().max_concurrency, 2u);
  coordinator.send(link::welcome{.provider_id = "prov-1", .heartbeat_interval_ms = 1000});

  for (const char* id : {"job-1", "job-2", "job-3"}) {
    coordinator.send(link::offer{.job_id = id, .kind = link::job_kind::chat,
                                 .request_json = chat_request("m1"), .attempt = 1});
  }
  ASSERT_TRUE(coordinator.wait_until([&] { return coordinator.count_locked<link::job_error>() == 1; }));
  const auto refused = coordinator.all<link::job_error>().front();
  EXPECT_EQ(refused.job_id, "job-3");
  EXPECT_EQ(refused.attempt, 1u);
  EXPECT_FALSE(refused.upstream_fault);
  EXPECT_FALSE(refused.request_rejected) << "declined: the request was never shown to the backend";
  EXPECT_NE(refused.message.find("capacity"), std::string::npos) << refused.message;
  ASSERT_TRUE(upstream.wait_stat("active", 2));

  coordinator.send(link::cancel{.job_id = "job-1"});
  EXPECT_TRUE(upstream.wait_stat("cancelled", 1));
  // The coordinator offers job-1 again (its next attempt): the agent takes it, and what it sends
  // from then on carries the new attempt.
  const auto deltas_before = coordinator.count<link::delta>();
  coordinator.send(link::offer{.job_id = "job-1", .kind = link::job_kind::chat,
                               .request_json = chat_request("m1"), .attempt = 2});
  ASSERT_TRUE(coordinator.wait_until([&] {
    const auto deltas = coordinator.all_locked<link::delta>();
    return std::any_of(deltas.begin() + static_cast<std::ptrdiff_t>(deltas_before), deltas.end(),
                       [](const link::delta& d) { return d.job_id == "job-1" && d.attempt == 2; });
  }));
  EXPECT_EQ(coordinator.count<link::job_error>(), 1u) << "the new attempt was not refused";
  for (const auto& d : coordinator.all<link::delta>()) {
    if (d.job_id == "job-2") {
      EXPECT_EQ(d.attempt, 1u);
    }
  }

  coordinator.drop();  // job-2 and job-1's second attempt go with the link
  EXPECT_TRUE(upstream.wait_stat("cancelled", 3));
  EXPECT_TRUE(upstream.wait_stat("active", 0));
  ASSERT_TRUE(coordinator.wait_until([&] { return coordinator.count_locked<link::hello>() == 2; }))
      << "the agent reconnects and says hello again";
  EXPECT_EQ(coordinator.count<link::done>(), 0u);
}

/// An agent without its probe in front of a test upstream started with `upstream_arguments`,
/// welcomed by a fake coordinator (heartbeats every `heartbeat_ms`), that was sent one chat offer
/// and answered it with a job_error (`failed`; `ready` is false when any step did not happen).
struct agent_failing_one_offer {
  agent_failing_one_offer(std::vector<std::string> upstream_arguments, std::uint32_t heartbeat_ms)
      : upstream(std::move(upstream_arguments)), agent(without_probe(agent_options(coordinator, upstream))) {
    ready = upstream.ready() &&
            coordinator.wait_until([&] { return coordinator.count_locked<link::hello>() == 1; });
    if (!ready) return;
    coordinator.send(link::welcome{.provider_id = "prov-1", .heartbeat_interval_ms = heartbeat_ms});
    coordinator.send(link::offer{.job_id = "job-8", .kind = link::job_kind::chat,
                                 .request_json = chat_request("m1"), .attempt = 1});
    ready = coordinator.wait_until([&] { return coordinator.count_locked<link::job_error>() == 1; });
    if (ready) failed = coordinator.all<link::job_error>().front();
  }
  static provider_options without_probe(provider_options options) {
    options.probe = false;
    return options;
  }

  upstream_process upstream;
  fake_coordinator coordinator;
  agent_runner agent;
  bool ready = false;
  link::job_error failed;
};

TEST(provider_agent, a_backend_that_stops_answering_takes_the_provider_offline_until_it_is_back) {
  // LM Studio quit: every offer would fail at once, each counted against the provider until it is
  // suspended. The first goes back declined, and the agent leaves until the backend is back.
  std::optional<upstream_process> upstream(std::in_place, std::vector<std::string>{"--models", "m1"});
  ASSERT_TRUE(upstream->ready());
  const auto port = upstream->port();
  fake_coordinator coordinator;
  auto options = agent_options(coordinator, *upstream);
  options.probe = false;
  agent_runner agent(options);
  ASSERT_TRUE(coordinator.wait_until([&] { return coordinator.count_locked<link::hello>() == 1; }));
  coordinator.send(link::welcome{.provider_id = "prov-1", .heartbeat_interval_ms = 1000});
  upstream.reset();  // nothing listens at the backend's address now
  coordinator.send(link::offer{.job_id = "job-1", .kind = link::job_kind::chat,
                               .request_json = chat_request("m1"), .attempt = 1});
  ASSERT_TRUE(coordinator.wait_until([&] { return coordinator.count_locked<link::job_error>() == 1; }));
  const auto declined = coordinator.all<link::job_error>().front();
  EXPECT_EQ(declined.job_id, "job-1");
  EXPECT_FALSE(declined.upstream_fault) << "its request never reached a backend";
  EXPECT_FALSE(declined.request_rejected);
  EXPECT_NE(declined.message.find("does not answer"), std::string::npos) << declined.message;
  ASSERT_TRUE(coordinator.wait_until([&] { return coordinator.closed_locked() == 1; })) << "the agent went offline";
  EXPECT_EQ(coordinator.count<link::hello>(), 1u);
  // The backend is back at its address: the agent lists its models and links again.
  upstream.emplace(std::vector<std::string>{"--models", "m1,m2"}, port);
  ASSERT_TRUE(upstream->ready());
  ASSERT_TRUE(coordinator.wait_until([&] { return coordinator.count_locked<link::hello>() == 2; }));
  EXPECT_EQ(coordinator.all<link::hello>().back().models.size(), 2u) << "what the backend serves now";
}

TEST(provider_agent, a_drain_declines_new_offers_and_lets_running_answers_finish_within_its_limit) {
  // A stop (SIGTERM) drains first: an answer cut off counts against the provider.
  struct drain_case {
    const char* tokens;                   // the running answer's, 5 ms apart
    std::chrono::milliseconds drain_max;
    bool finished;                        // the answer ended before the drain did
  };
  for (const auto& c : {drain_case{"40", 10'000ms, true}, drain_case{"2000", 1'000ms, false}}) {
    SCOPED_TRACE(std::string("tokens ") + c.tokens);
    upstream_process upstream({"--models", "m1", "--tokens", c.tokens, "--token-interval-us", "5000"});
    ASSERT_TRUE(upstream.ready());
    fake_coordinator coordinator;
    auto options = agent_options(coordinator, upstream);
    options.probe = false;
    options.stop_drain_max = c.drain_max;
    agent_runner agent(options);
    ASSERT_TRUE(welcome_and_stream_job_1(coordinator));
    std::promise<void> drained;
    agent.drain_then_stop([&] { drained.set_value(); });
    // The coordinator is told at once, before the next heartbeat is due, so that it sends no
    // offer meanwhile.
    ASSERT_TRUE(wait_draining_heartbeat(coordinator));
    coordinator.send(link::offer{.job_id = "job-2", .kind = link::job_kind::chat,
                                 .request_json = chat_request("m1"), .attempt = 1});
    ASSERT_TRUE(coordinator.wait_until([&] { return coordinator.count_locked<link::job_error>() == 1; }));
    const auto declined = coordinator.all<link::job_error>().front();
    EXPECT_EQ(declined.job_id, "job-2");
    EXPECT_FALSE(declined.upstream_fault) << "declined: it goes to another provider";
    EXPECT_NE(declined.message.find("stopping"), std::string::npos) << declined.message;
    ASSERT_EQ(drained.get_future().wait_for(wait_deadline), std::future_status::ready);
    // Stopped: the link is closed after what was sent on it went out.
    ASSERT_TRUE(coordinator.wait_until([&] { return coordinator.closed_locked() == 1; }));
    if (c.finished) {
      EXPECT_EQ(coordinator.count<link::done>(), 1u) << "the last answer's done went out before the link closed";
      EXPECT_EQ(upstream.stat("completed"), 1);
    } else {
      EXPECT_EQ(coordinator.count<link::done>(), 0u) << "the limit passed with the answer still running";
      EXPECT_TRUE(upstream.wait_stat("cancelled", 1)) << "then the stop cut it off";
    }
  }
}

TEST(provider_agent, an_offer_of_a_running_job_leaves_its_attempt_running_or_replaces_it_with_a_later_one) {
  upstream_process upstream({"--models", "m1", "--tokens", "40", "--token-interval-us", "20000"});
  ASSERT_TRUE(upstream.ready());
  fake_coordinator coordinator;
  auto options = agent_options(coordinator, upstream);
  options.probe = false;
  agent_runner agent(options);
  ASSERT_TRUE(welcome_and_stream_job_1(coordinator));
  const auto offer = [&](std::uint32_t attempt) {
    coordinator.send(link::offer{.job_id = "job-1", .kind = link::job_kind::chat,
                                 .request_json = chat_request("m1"), .attempt = attempt});
  };
  // The same attempt again (a coordinator's mistake, a redelivery): refusing it would end the
  // attempt that runs, its request going on.
  offer(1);
  // A later attempt: the coordinator moved on, and the earlier request stops.
  offer(2);
  ASSERT_TRUE(upstream.wait_stat("cancelled", 1)) << "attempt 1 was not stopped";
  // An earlier attempt than the one that runs is refused, naming its own attempt.
  offer(1);
  ASSERT_TRUE(coordinator.wait_until([&] { return coordinator.count_locked<link::job_error>() == 1; }));
  EXPECT_EQ(coordinator.all<link::job_error>().front().attempt, 1u);
  ASSERT_TRUE(coordinator.wait_until([&] { return coordinator.count_locked<link::done>() == 1; }));
  EXPECT_EQ(coordinator.all<link::done>().front().attempt, 2u);
  EXPECT_EQ(coordinator.count<link::job_error>(), 1u) << "the same attempt offered again was refused";
  EXPECT_EQ(upstream.stat("completed"), 1);
}

TEST(provider_agent, a_stop_during_a_drain_never_calls_drained) {
  // Its owner may be gone by then (provider.hpp: a stop() before the drain ends means `drained`
  // is never called).
  upstream_process upstream({"--models", "m1", "--tokens", "2000", "--token-interval-us", "5000"});
  ASSERT_TRUE(upstream.ready());
  fake_coordinator coordinator;
  auto options = agent_options(coordinator, upstream);
  options.probe = false;
  agent_runner agent(options);
  ASSERT_TRUE(welcome_and_stream_job_1(coordinator));
  std::atomic<bool> drained{false};
  agent.drain([&] { drained = true; });
  ASSERT_TRUE(wait_draining_heartbeat(coordinator));
  agent.stop();
  EXPECT_FALSE(drained) << "the stop ended the running answer, and with it the drain";
  EXPECT_TRUE(upstream.wait_stat("cancelled", 1)) << "the running answer was cut off";
}

TEST(provider_agent, a_stop_right_after_a_drain_that_ended_at_once_never_calls_drained) {
  // Nothing to wait for (no job, no link yet): the drain's end is posted, and the stop comes first.
  upstream_process upstream({"--models", "m1"});
  ASSERT_TRUE(upstream.ready());
  fake_coordinator coordinator;
  auto options = agent_options(coordinator, upstream);
  options.probe = false;
  agent_runner agent(options);
  std::atomic<bool> drained{false};
  agent.drain_and_stop([&] { drained = true; });
  EXPECT_FALSE(drained);
}

TEST(provider_agent, a_request_the_backend_refuses_is_reported_as_rejected_not_as_a_fault) {
  agent_failing_one_offer run({"--models", "m1", "--fail-status", "400"}, 50);
  ASSERT_TRUE(run.ready);
  EXPECT_EQ(run.failed.job_id, "job-8");
  EXPECT_FALSE(run.failed.upstream_fault);
  EXPECT_TRUE(run.failed.request_rejected);
  EXPECT_NE(run.failed.message.find("400"), std::string::npos) << run.failed.message;
  // The backend's health is not blamed for the request.
  auto& coordinator = run.coordinator;
  const auto heartbeats_before = coordinator.count<link::heartbeat>();
  ASSERT_TRUE(coordinator.wait_until(
      [&] { return coordinator.count_locked<link::heartbeat>() >= heartbeats_before + 1; }));
  EXPECT_EQ(coordinator.all<link::heartbeat>().back().health_percent, 100u);
}

TEST(provider_agent, an_answer_the_backend_aborted_is_a_failure_of_the_backend_not_a_done) {
  // vLLM ends an answer its engine gave up on with finish_reason "abort".
  agent_failing_one_offer run({"--models", "m1", "--tokens", "4", "--finish-reason", "abort"}, 1000);
  ASSERT_TRUE(run.ready);
  EXPECT_TRUE(run.failed.upstream_fault);
  EXPECT_EQ(run.failed.tokens_so_far, 4u) << "the answer so far continues elsewhere";
  EXPECT_NE(run.failed.message.find("abort"), std::string::npos) << run.failed.message;
  EXPECT_EQ(run.coordinator.count<link::done>(), 0u);
}

TEST(provider_agent, a_busy_backend_declines_the_offer_without_a_fault_and_shows_in_its_health) {
  // Ollama's full queue (503), a rate limit in front of a backend (429): the job goes elsewhere,
  // and the provider's standing is not charged with an aborted answer.
  for (const std::string status : {"503", "429"}) {
    SCOPED_TRACE("HTTP " + status);
    agent_failing_one_offer run({"--models", "m1", "--fail-status", status}, 50);
    ASSERT_TRUE(run.ready);
    EXPECT_EQ(run.failed.job_id, "job-8");
    EXPECT_FALSE(run.failed.upstream_fault);
    EXPECT_FALSE(run.failed.request_rejected) << "declined: the request itself was not refused";
    EXPECT_EQ(run.failed.tokens_so_far, 0u);
    EXPECT_NE(run.failed.message.find("backend busy, http_status " + status), std::string::npos) << run.failed.message;
    auto& coordinator = run.coordinator;
    const auto heartbeats_before = coordinator.count<link::heartbeat>();
    ASSERT_TRUE(coordinator.wait_until(
        [&] { return coordinator.count_locked<link::heartbeat>() >= heartbeats_before + 1; }));
    EXPECT_EQ(coordinator.all<link::heartbeat>().back().health_percent, 0u) << "its health shows it";
  }
}

TEST(provider_agent, a_busy_backends_run_of_declines_ends_with_a_token_it_sends) {
  // One answer at a time: job-1 waits 1 s for its first token while three more offers are
  // refused (429), then streams for about 2 s, while a fourth is refused: busy, not broken.
  upstream_process upstream({"--models", "m1", "--max-concurrent", "1", "--first-token-ms", "1000", "--tokens", "50",
                             "--token-interval-us", "40000"});
  ASSERT_TRUE(upstream.ready());
  fake_coordinator coordinator;
  auto options = agent_options(coordinator, upstream);
  options.probe = false;
  options.max_concurrency = 8;
  agent_runner agent(options);
  ASSERT_TRUE(coordinator.wait_until([&] { return coordinator.count_locked<link::hello>() == 1; }));
  coordinator.send(link::welcome{.provider_id = "prov-1", .heartbeat_interval_ms = 1000});
  const auto offer = [&](int n) {
    coordinator.send(link::offer{.job_id = "job-" + std::to_string(n), .kind = link::job_kind::chat,
                                 .request_json = chat_request("m1"), .attempt = 1});
  };
  offer(1);
  ASSERT_TRUE(upstream.wait_stat("active", 1));
  for (int n = 2; n <= 4; ++n) offer(n);
  ASSERT_TRUE(coordinator.wait_until([&] { return coordinator.count_locked<link::job_error>() == 3; }));
  ASSERT_EQ(coordinator.count<link::delta>(), 0u) << "the three were refused before job-1's first token";
  ASSERT_TRUE(coordinator.wait_until([&] { return coordinator.count_locked<link::delta>() >= 1; }));
  offer(5);
  ASSERT_TRUE(coordinator.wait_until([&] { return coordinator.count_locked<link::job_error>() == 4; }));
  ASSERT_EQ(coordinator.count<link::done>(), 0u) << "job-1 still streamed when job-5 was refused";
  for (const auto& error : coordinator.all<link::job_error>()) {
    EXPECT_FALSE(error.upstream_fault) << error.job_id << ": " << error.message;
  }
}

TEST(provider_agent, a_backend_busy_offer_after_offer_is_taken_as_broken_after_busy_declines_in_a_row_max) {
  // A proxy answering 503 for a crashed server would otherwise decline an offer every heartbeat
  // for good, never counted against the provider.
  agent_failing_one_offer run({"--models", "m1", "--fail-status", "503"}, 50);
  ASSERT_TRUE(run.ready);
  ASSERT_FALSE(run.failed.upstream_fault) << "the first is declined";
  auto& coordinator = run.coordinator;
  for (std::uint32_t i = 2; i <= provider_options{}.busy_declines_in_a_row_max + 1; ++i) {
    coordinator.send(link::offer{.job_id = "job-" + std::to_string(8 + i), .kind = link::job_kind::chat,
                                 .request_json = chat_request("m1"), .attempt = 1});
    ASSERT_TRUE(coordinator.wait_until([&] { return coordinator.count_locked<link::job_error>() == i; }));
  }
  const auto errors = coordinator.all<link::job_error>();
  for (std::size_t i = 0; i + 1 < errors.size(); ++i) EXPECT_FALSE(errors[i].upstream_fault) << errors[i].job_id;
  EXPECT_TRUE(errors.back().upstream_fault) << "past busy_declines_in_a_row_max: " << errors.back().message;
}

TEST(provider_agent, a_failing_backend_is_reported_as_an_upstream_fault_and_in_its_health_for_a_while) {
  upstream_process upstream({"--models", "m1", "--fail-status", "500"});
  ASSERT_TRUE(upstream.ready());
  fake_coordinator coordinator;
  auto options = agent_options(coordinator, upstream);
  options.probe = false;
  options.health_window_age_max = 3'000ms;  // the 0 % heartbeat is seen well within it
  agent_runner agent(options);
  ASSERT_TRUE(coordinator.wait_until([&] { return coordinator.count_locked<link::hello>() == 1; }));
  coordinator.send(link::welcome{.provider_id = "prov-1", .heartbeat_interval_ms = 50});
  coordinator.send(link::offer{.job_id = "job-9", .kind = link::job_kind::completion,
                               .request_json = R"({"model":"m1","prompt":"hi","stream":true})"});
  ASSERT_TRUE(coordinator.wait_until([&] { return coordinator.count_locked<link::job_error>() == 1; }));
  const auto failed = coordinator.all<link::job_error>().front();
  EXPECT_EQ(failed.job_id, "job-9");
  EXPECT_TRUE(failed.upstream_fault);
  EXPECT_FALSE(failed.request_rejected);
  EXPECT_EQ(failed.tokens_so_far, 0u);
  EXPECT_NE(failed.message.find("500"), std::string::npos) << failed.message;
  // The next heartbeats show the failure in the health figure.
  const auto heartbeats_before = coordinator.count<link::heartbeat>();
  ASSERT_TRUE(coordinator.wait_until(
      [&] { return coordinator.count_locked<link::heartbeat>() >= heartbeats_before + 1; }));
  EXPECT_EQ(coordinator.all<link::heartbeat>().back().health_percent, 0u);
  // Once the failure is older than health_window_age_max, with no job since, it is forgotten:
  // a provider with low health gets few jobs, and could not mend its figure otherwise.
  EXPECT_TRUE(coordinator.wait_until([&] {
    const auto beats = coordinator.all_locked<link::heartbeat>();
    return !beats.empty() && beats.back().health_percent == 100;
  })) << "the failure was never forgotten";
}

TEST(provider_agent, sends_a_reasoning_models_thinking_marked_only_to_a_server_that_takes_it) {
  upstream_process upstream({"--models", "m1", "--context-length", "8192", "--tokens", "5", "--reasoning-tokens", "2"});
  ASSERT_TRUE(upstream.ready());
  for (const bool takes_reasoning : {true, false}) {
    SCOPED_TRACE(takes_reasoning ? "a server that takes thinking" : "an older server");
    fake_coordinator coordinator;
    auto options = agent_options(coordinator, upstream);
    options.probe = false;
    agent_runner agent(options);
    ASSERT_TRUE(coordinator.wait_until([&] { return coordinator.count_locked<link::hello>() == 1; }));
    coordinator.send(link::welcome{.provider_id = "prov-1", .heartbeat_interval_ms = 1000,
                                   .delta_batches = false, .reasoning_deltas = takes_reasoning});
    coordinator.send(link::offer{.job_id = "job-1", .kind = link::job_kind::chat,
                                 .request_json = chat_request("m1"), .attempt = 1});
    ASSERT_TRUE(coordinator.wait_until([&] { return coordinator.count_locked<link::done>() == 1; }));
    std::string thinking, answer;
    for (const auto& d : coordinator.all<link::delta>()) (d.reasoning ? thinking : answer) += d.text;
    EXPECT_EQ(answer, "tok2 tok3 tok4 ");
    // An older server would show the thinking as the answer: it gets none, and it is not counted.
    EXPECT_EQ(thinking, takes_reasoning ? "tok0 tok1 " : "");
    EXPECT_EQ(coordinator.all<link::done>().front().completion_tokens_counted, takes_reasoning ? 5u : 3u);
  }
}

TEST(provider_agent, a_refused_token_or_a_link_another_agent_took_over_ends_the_agent_with_exit_code_3) {
  // Neither is mended by linking again: a refused token stays refused, and two agents sharing a
  // token would take the link from each other in turns.
  for (const bool refused : {true, false}) {
    upstream_process upstream({"--models", "m1"});
    ASSERT_TRUE(upstream.ready());
    fake_coordinator coordinator(refused ? 401 : 0);
    auto options = agent_options(coordinator, upstream);
    options.probe = false;
    agent_runner agent(options);
    if (!refused) {
      ASSERT_TRUE(coordinator.wait_until([&] { return coordinator.count_locked<link::hello>() == 1; }));
      coordinator.send(link::welcome{.provider_id = "prov-1", .heartbeat_interval_ms = 1000});
      coordinator.close(link::close_code_replaced, "replaced by a newer link of the same provider");
    }
    EXPECT_EQ(agent.wait_exit(), exit_turned_away) << refused;
    EXPECT_EQ(coordinator.authorizations().size(), 1u) << "it does not link again: " << refused;
  }
}

}  // namespace
}  // namespace gpustream::app
