/// The OpenAI-compatible upstream client against the real test upstream (tests/upstream), run as
/// a child process, and its SSE parser on its own.

#include "gateway/upstream_client.hpp"

#include <boost/asio/connect.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/write.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/http/read.hpp>
#include <boost/beast/http/string_body.hpp>
#include <boost/beast/http/write.hpp>
#include <boost/json/parse.hpp>
#include <boost/json/serialize.hpp>
#include <boost/json/value.hpp>
#include <gtest/gtest.h>

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <cstring>
#include <future>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "gateway/backend_context.hpp"
#include "gateway/openai_api.hpp"

extern char** environ;

namespace gpustream::gateway {
namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
namespace json = boost::json;
using tcp = asio::ip::tcp;
using namespace std::chrono_literals;

/// How long any test waits for something that should happen within milliseconds.
constexpr auto generous = 10s;

/// The test upstream as a child process on a free loopback port; SIGTERM when destroyed.
class upstream_process {
 public:
  static std::unique_ptr<upstream_process> start(std::vector<std::string> arguments,
                                                 std::string listen = "127.0.0.1:0") {
    auto process = std::unique_ptr<upstream_process>(new upstream_process);
    if (!process->spawn(std::move(arguments), std::move(listen))) return nullptr;
    return process;
  }

  ~upstream_process() {
    if (pid_ > 0) {
      ::kill(pid_, SIGTERM);
      int status = 0;
      ::waitpid(pid_, &status, 0);
    }
    if (out_ >= 0) ::close(out_);
  }

  std::uint16_t port() const { return port_; }
  std::string base_url() const { return "http://127.0.0.1:" + std::to_string(port_) + "/v1"; }

  /// GET /stats, synchronously.
  json::object stats() const {
    asio::io_context io;
    tcp::socket socket(io);
    socket.connect(tcp::endpoint(asio::ip::make_address("127.0.0.1"), port_));
    http::request<http::string_body> request{http::verb::get, "/stats", 11};
    request.set(http::field::host, "127.0.0.1");
    request.keep_alive(false);
    http::write(socket, request);
    beast::flat_buffer buffer;
    http::response<http::string_body> response;
    http::read(socket, buffer, response);
    return json::parse(response.body()).as_object();
  }

  std::int64_t stat(const char* name) const { return stats().at(name).to_number<std::int64_t>(); }

  /// Waits until a /stats counter reaches `value`; how long it took, or nullopt past the deadline.
  std::optional<std::chrono::milliseconds> wait_stat(const char* name, std::int64_t value) const {
    const auto start = std::chrono::steady_clock::now();
    while (std::chrono::steady_clock::now() - start < generous) {
      if (stat(name) == value) {
        return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - start);
      }
      std::this_thread::yield();  // polling a real counter, not waiting for time to pass
    }
    return std::nullopt;
  }

 private:
  upstream_process() = default;

  bool spawn(std::vector<std::string> arguments, std::string listen) {
    int fds[2];
    if (::pipe2(fds, O_CLOEXEC) != 0) return false;
    std::vector<std::string> all{GPUSTREAM_TEST_UPSTREAM, "--listen", listen, "--threads", "2"};
    all.insert(all.end(), arguments.begin(), arguments.end());
    std::vector<char*> argv;
    for (auto& argument : all) argv.push_back(argument.data());
    argv.push_back(nullptr);
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_adddup2(&actions, fds[1], STDOUT_FILENO);
    const int spawned = ::posix_spawn(&pid_, GPUSTREAM_TEST_UPSTREAM, &actions, nullptr, argv.data(), environ);
    posix_spawn_file_actions_destroy(&actions);
    ::close(fds[1]);
    out_ = fds[0];
    if (spawned != 0) {
      pid_ = -1;
      return false;
    }
    return read_port();
  }

  bool read_port() {
    std::string line;
    const auto deadline = std::chrono::steady_clock::now() + generous;
    while (line.find('\n') == std::string::npos && std::chrono::steady_clock::now() < deadline) {
      pollfd ready{out_, POLLIN, 0};
      if (::poll(&ready, 1, 100) <= 0) continue;
      char piece[256];
      const auto got = ::read(out_, piece, sizeof piece);
      if (got <= 0) return false;
      line.append(piece, static_cast<std::size_t>(got));
    }
    const auto colon = line.rfind(':');
    if (!line.starts_with("listening ") || colon == std::string::npos) return false;
    port_ = static_cast<std::uint16_t>(std::stoul(line.substr(colon + 1)));
    return port_ != 0;
  }

  pid_t pid_ = -1;
  int out_ = -1;
  std::uint16_t port_ = 0;
};

/// An io_context run by background threads for the test's lifetime.
class io_threads {
 public:
  explicit io_threads(int count = 2) : work_(asio::make_work_guard(io_)) {
    for (int i = 0; i < count; ++i) threads_.emplace_back([this] { io_.run(); });
  }
  ~io_threads() {
    work_.reset();
    io_.stop();
    for (auto& thread : threads_) thread.join();
  }
  asio::io_context& io() { return io_; }

 private:
  asio::io_context io_;
  asio::executor_work_guard<asio::io_context::executor_type> work_;
  std::vector<std::thread> threads_;
};

/// Everything one stream reported, with waits on it.
class stream_log {
 public:
  upstream_stream_handlers handlers() {
    return {[this](std::string_view text) {
              record([&] {
                deltas_.emplace_back(text);
                pieces_.push_back("content:" + std::string(text));
                delta_times_.push_back(std::chrono::steady_clock::now());
              });
            },
            [this](std::string finish_reason, std::optional<upstream_usage> usage) {
              record([&] {
                ++finals_;
                finish_reason_ = std::move(finish_reason);
                usage_ = usage;
              });
            },
            [this](upstream_error error) {
              record([&] {
                ++finals_;
                error_ = std::move(error);
              });
            },
            [this](std::string_view text) {
              record([&] {
                reasoning_.emplace_back(text);
                pieces_.push_back("reasoning:" + std::string(text));
              });
            }};
  }

  /// The thinking pieces, in order.
  std::vector<std::string> reasoning() const {
    std::lock_guard lock(mutex_);
    return reasoning_;
  }
  /// Thinking ("reasoning:…") and answer ("content:…") pieces as they came.
  std::vector<std::string> pieces() const {
    std::lock_guard lock(mutex_);
    return pieces_;
  }

  bool wait_final() {
    std::unique_lock lock(mutex_);
    return changed_.wait_for(lock, generous, [this] { return finals_ > 0; });
  }
  bool wait_deltas(std::size_t count) {
    std::unique_lock lock(mutex_);
    return changed_.wait_for(lock, generous, [&] { return deltas_.size() >= count; });
  }

  std::vector<std::string> deltas() const {
    std::lock_guard lock(mutex_);
    return deltas_;
  }
  /// When each delta arrived.
  std::vector<std::chrono::steady_clock::time_point> delta_times() const {
    std::lock_guard lock(mutex_);
    return delta_times_;
  }
  int finals() const {
    std::lock_guard lock(mutex_);
    return finals_;
  }
  std::optional<std::string> finish_reason() const {
    std::lock_guard lock(mutex_);
    return finish_reason_;
  }
  std::optional<upstream_usage> usage() const {
    std::lock_guard lock(mutex_);
    return usage_;
  }
  std::optional<upstream_error> error() const {
    std::lock_guard lock(mutex_);
    return error_;
  }

 private:
  // Notifies under the lock: the waiter may destroy the log as soon as it wakes.
  template <class F>
  void record(F change) {
    std::lock_guard lock(mutex_);
    change();
    changed_.notify_all();
  }

  std::vector<std::string> reasoning_;
  std::vector<std::string> pieces_;
  mutable std::mutex mutex_;
  std::condition_variable changed_;
  std::vector<std::string> deltas_;
  std::vector<std::chrono::steady_clock::time_point> delta_times_;
  int finals_ = 0;
  std::optional<std::string> finish_reason_;
  std::optional<upstream_usage> usage_;
  std::optional<upstream_error> error_;
};

std::vector<std::string> expected_tokens(int count) {
  std::vector<std::string> tokens;
  for (int i = 0; i < count; ++i) tokens.push_back("tok" + std::to_string(i) + " ");
  return tokens;
}

std::string chat_body(std::optional<int> max_tokens = std::nullopt, bool stream = true,
                      std::string model = "test-model") {
  json::object body{{"model", model},
                    {"messages", json::array{json::object{{"role", "system"}, {"content", "be brief"}},
                                             json::object{{"role", "user"}, {"content", "say three words"}}}},
                    {"stream", stream},
                    {"stream_options", json::object{{"include_usage", true}}}};
  if (max_tokens) body["max_tokens"] = *max_tokens;
  return json::serialize(body);
}

constexpr std::uint32_t chat_body_prompt_words = 5;  // "be brief" + "say three words"

/// Options with one field set, the rest at their defaults.
template <class Field, class Value>
upstream_options options_with(Field upstream_options::*field, Value value) {
  upstream_options options;
  options.*field = value;
  return options;
}

upstream_client make_client(asio::io_context& io, const upstream_process& upstream,
                            upstream_options options = {}) {
  options.base_url = upstream.base_url();
  auto client = upstream_client::create(io, std::move(options));
  GPUSTREAM_ENSURE(client.has_value());
  return std::move(client).value();
}

// ---- the SSE parser alone

std::vector<std::string> parse_in_pieces(std::string_view input, const std::vector<std::size_t>& cuts,
                                         std::size_t event_bytes_max = 1024) {
  upstream_sse_parser parser(event_bytes_max);
  std::vector<std::string> events;
  std::size_t at = 0;
  auto pieces = cuts;
  pieces.push_back(input.size());
  for (const auto cut : pieces) {
    const auto fed = parser.feed(input.substr(at, cut - at), [&](std::string_view data) {
      events.emplace_back(data);
      return true;
    });
    EXPECT_TRUE(fed.has_value());
    at = cut;
  }
  return events;
}

TEST(UpstreamSseParser, EventsComeOutWhereverTheBytesAreSplit) {
  const std::string input =
      ": keep-alive comment\n"
      "data: {\"a\":1}\n\n"
      "event: message\r\nid: 7\r\ndata: first line\r\ndata:second line\r\n\r\n"
      "data: cr only\r\rdata\n\n"
      "retry: 10\n"
      "data: [DONE]\n\n";
  const std::vector<std::string> expected{"{\"a\":1}", "first line\nsecond line", "cr only", "", "[DONE]"};
  EXPECT_EQ(parse_in_pieces(input, {}), expected);
  for (std::size_t cut = 1; cut < input.size(); ++cut) {
    EXPECT_EQ(parse_in_pieces(input, {cut}), expected) << "split at byte " << cut;
  }
  std::vector<std::size_t> every_byte;
  for (std::size_t cut = 1; cut < input.size(); ++cut) every_byte.push_back(cut);
  EXPECT_EQ(parse_in_pieces(input, every_byte), expected);
}

TEST(UpstreamSseParser, CrLfSplitAcrossReadsEndsOneLineOnly) {
  // "\r" at the end of one read and "\n" at the start of the next are one line end, so the
  // event ends at the blank line after them, not earlier.
  EXPECT_EQ(parse_in_pieces("data: a\r\ndata: b\r\n\r\n", {8}), (std::vector<std::string>{"a\nb"}));
}

TEST(UpstreamSseParser, AnEventOverTheLimitFailsAndStaysFailed) {
  upstream_sse_parser parser(16);
  int events = 0;
  const auto count = [&](std::string_view) {
    ++events;
    return true;
  };
  EXPECT_TRUE(parser.feed("data: 0123456789\n\n", count).has_value());
  EXPECT_EQ(events, 1);
  EXPECT_FALSE(parser.feed("data: 0123456789\ndata: 0123456789\n\n", count).has_value());
  EXPECT_FALSE(parser.feed("data: x\n\n", count).has_value());
  EXPECT_EQ(events, 1);

  upstream_sse_parser unterminated(16);
  EXPECT_FALSE(unterminated.feed(": a comment line that never ends and never ends", count).has_value());
}

TEST(UpstreamSseParser, TheBodysEndCompletesALastEventWhoseBlankLineNeverCame) {
  for (const std::string tail : {"data: b", "data: b\n", "data: b\r\n", "data: b\r"}) {
    upstream_sse_parser parser(1024);
    std::vector<std::string> events;
    const auto take = [&](std::string_view data) {
      events.emplace_back(data);
      return true;
    };
    ASSERT_TRUE(parser.feed("data: a\n\n" + tail, take).has_value());
    EXPECT_EQ(events, std::vector<std::string>{"a"}) << "not before the body ends";
    parser.finish(take);
    EXPECT_EQ(events, (std::vector<std::string>{"a", "b"})) << testing::PrintToString(tail);
    parser.finish(take);
    EXPECT_EQ(events.size(), 2u) << "once";
  }
  // A parser that failed (a last line over the limit) stays failed at the end: nothing comes out.
  upstream_sse_parser small(16);
  std::vector<std::string> none;
  const auto keep = [&](std::string_view data) {
    none.emplace_back(data);
    return true;
  };
  EXPECT_FALSE(small.feed("data: 0123456789abcdefgh", keep).has_value());
  small.finish(keep);
  EXPECT_TRUE(none.empty());
  // A finished event and a comment leave nothing pending.
  upstream_sse_parser parser(1024);
  int events = 0;
  const auto count = [&](std::string_view) {
    ++events;
    return true;
  };
  ASSERT_TRUE(parser.feed("data: a\n\n: keep-alive", count).has_value());
  parser.finish(count);
  EXPECT_EQ(events, 1);
}

TEST(UpstreamSseParser, StopsWhenTheConsumerSaysSo) {
  upstream_sse_parser parser(1024);
  std::vector<std::string> events;
  const auto fed = parser.feed("data: a\n\ndata: b\n\n", [&](std::string_view data) {
    events.emplace_back(data);
    return false;
  });
  EXPECT_TRUE(fed.has_value());
  EXPECT_EQ(events, std::vector<std::string>{"a"});
}

// ---- the client against the test upstream

TEST(UpstreamClient, RejectsBaseUrlsItCannotUse) {
  asio::io_context io;
  for (const char* url : {"https://api.example.com/v1", "http:///v1", "http://host:0/v1", "http://host:99999",
                          "http://user:secret@host/v1", "ftp://host", "http://host/v1?api-key=secret",
                          "http://host/v1#secret", "http://user:secret@host:0/v1"}) {
    upstream_options options;
    options.base_url = url;
    auto client = upstream_client::create(io, options);
    ASSERT_FALSE(client.has_value()) << url;
    EXPECT_EQ(client.error().find("secret"), std::string::npos) << "the message is logged: " << client.error();
  }
  for (const char* url : {"http://localhost:1234/v1", "http://127.0.0.1:11434/v1/", "http://[::1]:8000/v1",
                          "http://backend"}) {
    upstream_options options;
    options.base_url = url;
    auto client = upstream_client::create(io, options);
    EXPECT_TRUE(client.has_value()) << url;
  }
}

TEST(UpstreamClient, RedactedUrlsShowNoCredentialsQueryOrFragment) {
  EXPECT_EQ(redacted_url("http://127.0.0.1:1234/v1"), "http://127.0.0.1:1234/v1");
  EXPECT_EQ(redacted_url("http://user:pw@host:8000/v1"), "http://***@host:8000/v1");
  EXPECT_EQ(redacted_url("http://a@b@host/v1/x@y"), "http://***@host/v1/x@y") << "the last @ of the authority";
  EXPECT_EQ(redacted_url("http://host/v1?api-key=k"), "http://host/v1?***");
  EXPECT_EQ(redacted_url("ws://u:p@coordinator:8080/v1/providers/link#k"), "ws://***@coordinator:8080/v1/providers/link?***");
  EXPECT_EQ(redacted_url("host/path@x"), "host/path@x") << "no authority to redact past the path";
}

TEST(UpstreamClient, ListsModelsWithTheirContextLength) {
  auto upstream = upstream_process::start({"--models", "alpha,beta-7b", "--context-length", "8192"});
  ASSERT_TRUE(upstream);
  io_threads threads;
  auto client = make_client(threads.io(), *upstream);
  std::promise<expected<std::vector<upstream_model>, upstream_error>> listed;
  client.list_models([&](auto models) { listed.set_value(std::move(models)); });
  auto result = listed.get_future();
  ASSERT_EQ(result.wait_for(generous), std::future_status::ready);
  const auto models = result.get();
  ASSERT_TRUE(models.has_value()) << models.error().message;
  ASSERT_EQ(models->size(), 2u);
  EXPECT_EQ((*models)[0].id, "alpha");
  EXPECT_EQ((*models)[1].id, "beta-7b");
  EXPECT_EQ((*models)[0].context_length_tokens, 8192u);
  EXPECT_EQ((*models)[1].context_length_tokens, 8192u);
}

TEST(UpstreamClient, SendsTheApiKeyABackendAsksFor) {
  auto upstream = upstream_process::start({"--models", "alpha", "--api-key", "k-123"});
  ASSERT_TRUE(upstream);
  io_threads threads;
  for (const std::string key : {"k-123", "", "wrong"}) {
    upstream_options options;
    options.api_key = key;
    auto client = make_client(threads.io(), *upstream, options);
    std::promise<expected<std::vector<upstream_model>, upstream_error>> listed;
    client.list_models([&](auto models) { listed.set_value(std::move(models)); });
    auto result = listed.get_future();
    ASSERT_EQ(result.wait_for(generous), std::future_status::ready) << key;
    const auto models = result.get();
    if (key == "k-123") {
      ASSERT_TRUE(models.has_value()) << models.error().message;
      EXPECT_EQ(models->size(), 1u);
    } else {
      ASSERT_FALSE(models.has_value()) << key;
      EXPECT_EQ(models.error().http_status, 401u) << key;
    }
  }
}

TEST(UpstreamClient, FindsTheServedContextWhereEachKindOfBackendTellsIt) {
  // Each flavor tells its 8,192 tokens only its own way; llama.cpp's /v1/models also gives the
  // trained 131,072, which must not be what is advertised.
  for (const std::string flavor : {"openai", "ollama", "lmstudio", "llamacpp"}) {
    auto upstream = upstream_process::start({"--models", "alpha,org/beta-7b", "--context-length", "8192", "--flavor", flavor});
    ASSERT_TRUE(upstream) << flavor;
    io_threads threads;
    auto client = make_client(threads.io(), *upstream);
    std::promise<std::vector<upstream_model>> found;
    client.list_models([&](auto listed) {
      if (!listed) return found.set_value({});
      find_context_lengths(client, std::move(*listed), [&](auto models) { found.set_value(std::move(models)); });
    });
    auto result = found.get_future();
    ASSERT_EQ(result.wait_for(generous), std::future_status::ready) << flavor;
    const auto models = result.get();
    ASSERT_EQ(models.size(), 2u) << flavor;
    for (const auto& model : models) {
      EXPECT_EQ(model.context_length_tokens, 8192u) << flavor << " " << model.id;
      EXPECT_FALSE(model.context_is_trained) << flavor << " " << model.id;
    }
  }
}

TEST(UpstreamClient, AModelNoBackendAPIKnowsKeepsNoWindow) {
  // LM Studio knows alpha (its loaded context, 4,096 by default), not a model it does not serve:
  // that one is asked of every API in turn, each answering 404, and keeps none.
  auto upstream = upstream_process::start({"--models", "alpha", "--flavor", "lmstudio"});
  ASSERT_TRUE(upstream);
  io_threads threads;
  auto client = make_client(threads.io(), *upstream);
  std::promise<std::vector<upstream_model>> found;
  find_context_lengths(client, {{"alpha", 0}, {"not-served", 0}}, [&](auto models) { found.set_value(std::move(models)); });
  auto result = found.get_future();
  ASSERT_EQ(result.wait_for(generous), std::future_status::ready);
  const auto models = result.get();
  ASSERT_EQ(models.size(), 2u);
  EXPECT_EQ(models[0].context_length_tokens, 4096u) << "LM Studio's loaded context";
  EXPECT_EQ(models[1].context_length_tokens, 0u) << "a model no API knows keeps none";
}

TEST(BackendContext, LlamaCppPropsGiveTheWindowOneRequestMayUse) {
  EXPECT_EQ(llama_cpp_served_context(R"({"default_generation_settings":{"n_ctx":4096},"total_slots":4})"), 4096u);
  EXPECT_EQ(llama_cpp_served_context(R"({"default_generation_settings":{"n_ctx":0}})"), std::nullopt);
  EXPECT_EQ(llama_cpp_served_context(R"({"default_generation_settings":{"n_ctx":-5}})"), std::nullopt);
  EXPECT_EQ(llama_cpp_served_context(R"({"total_slots":4})"), std::nullopt);
  EXPECT_EQ(llama_cpp_served_context("<html>not found</html>"), std::nullopt);
  // Nested up to backend_answer_depth_max it is read; one level deeper it is not an answer.
  const auto nested = [](std::size_t depth) {
    return R"({"default_generation_settings":{"n_ctx":4096},"x":)" + std::string(depth - 1, '[') +
           std::string(depth - 1, ']') + "}";
  };
  EXPECT_EQ(llama_cpp_served_context(nested(backend_answer_depth_max)), 4096u);
  EXPECT_EQ(llama_cpp_served_context(nested(backend_answer_depth_max + 1)), std::nullopt);
}

TEST(BackendContext, LmStudioServesALoadedModelsWindowAndLoadsAnotherWithItsDefault) {
  const std::string body = R"({"object":"list","data":[)"
                           R"({"id":"qwen-7b","state":"loaded","max_context_length":32768,"loaded_context_length":16384},)"
                           R"({"id":"llama-8b","state":"not-loaded","max_context_length":131072},)"
                           R"({"id":"tiny","state":"not-loaded","max_context_length":2048},)"
                           R"({"id":"odd","state":"not-loaded"}]})";
  const auto windows = lm_studio_served_contexts(body);
  EXPECT_EQ(windows.at("qwen-7b"), 16384u) << "loaded: its own window";
  EXPECT_EQ(windows.at("llama-8b"), lm_studio_default_context_tokens)
      << "loaded on first use with LM Studio's default, not the 131,072 it was trained with";
  EXPECT_EQ(windows.at("tiny"), 2048u) << "never more than the model's own";
  EXPECT_EQ(windows.size(), 3u) << "odd says neither window";
  EXPECT_TRUE(lm_studio_served_contexts(R"({"error":"Unexpected endpoint"})").empty());
  EXPECT_TRUE(lm_studio_served_contexts("[1,2]").empty());
}

TEST(BackendContext, OllamaServesNumCtxOrItsDefaultAndNeverMoreThanTheModelsOwnWindow) {
  const std::string info = R"("model_info":{"general.architecture":"qwen2","qwen2.context_length":32768})";
  EXPECT_EQ(ollama_served_context(R"({"parameters":"num_ctx    16384\nstop \"x\"",)" + info + "}"), 16384u);
  EXPECT_EQ(ollama_served_context(R"({"parameters":"stop \"x\"\nnum_ctx\t8192",)" + info + "}"), 8192u);
  EXPECT_EQ(ollama_served_context(R"({"parameters":"num_ctx 65536",)" + info + "}"), 32768u) << "capped by the model";
  EXPECT_EQ(ollama_served_context("{" + info + "}"), ollama_default_context_tokens) << "no num_ctx: the default";
  EXPECT_EQ(ollama_served_context(R"({"model_info":{"general.architecture":"tiny","tiny.context_length":2048}})"), 2048u);
  EXPECT_EQ(ollama_served_context(R"({"parameters":"num_ctx_extra 5"})"), ollama_default_context_tokens);
  EXPECT_EQ(ollama_served_context(R"({"error":"model 'x' not found"})"), std::nullopt);
  EXPECT_EQ(ollama_served_context("[1,2]"), std::nullopt);
}

TEST(UpstreamClient, StreamsChatDeltasInOrderThenUsage) {
  auto upstream = upstream_process::start({"--tokens", "7", "--token-interval-us", "200"});
  ASSERT_TRUE(upstream);
  io_threads threads;
  auto client = make_client(threads.io(), *upstream);
  stream_log log;
  auto request = client.stream("/chat/completions", chat_body(), log.handlers());
  ASSERT_TRUE(log.wait_final());
  ASSERT_FALSE(log.error()) << log.error()->message;
  EXPECT_EQ(log.deltas(), expected_tokens(7));
  EXPECT_EQ(log.finish_reason(), "stop");
  ASSERT_TRUE(log.usage());
  EXPECT_EQ(log.usage()->completion_tokens, 7u);
  EXPECT_EQ(log.usage()->prompt_tokens, chat_body_prompt_words);
  EXPECT_EQ(log.finals(), 1);
  EXPECT_TRUE(upstream->wait_stat("completed", 1));  // counted when the last write is issued
}

TEST(UpstreamClient, StreamsTextCompletionsCutByMaxTokens) {
  auto upstream = upstream_process::start({"--tokens", "50"});
  ASSERT_TRUE(upstream);
  io_threads threads;
  auto client = make_client(threads.io(), *upstream);
  stream_log log;
  const std::string body =
      R"({"model":"test-model","prompt":"once upon a time","max_tokens":4,"stream":true,"stream_options":{"include_usage":true}})";
  auto request = client.stream("/completions", body, log.handlers());
  ASSERT_TRUE(log.wait_final());
  ASSERT_FALSE(log.error()) << log.error()->message;
  EXPECT_EQ(log.deltas(), expected_tokens(4));
  EXPECT_EQ(log.finish_reason(), "length");
  ASSERT_TRUE(log.usage());
  EXPECT_EQ(log.usage()->prompt_tokens, 4u);
  EXPECT_EQ(log.usage()->completion_tokens, 4u);
}

TEST(UpstreamClient, ReportsUsageAsTheBackendSentIt) {
  struct mode_case {
    const char* mode;
    std::optional<upstream_usage> usage;
  };
  for (const auto& [mode, usage] : {mode_case{"none", std::nullopt}, mode_case{"zero", upstream_usage{0, 0}},
                                    mode_case{"cumulative", upstream_usage{chat_body_prompt_words, 5}}}) {
    auto upstream = upstream_process::start({"--tokens", "5", "--usage", mode});
    ASSERT_TRUE(upstream);
    io_threads threads;
    auto client = make_client(threads.io(), *upstream);
    stream_log log;
    auto request = client.stream("/chat/completions", chat_body(), log.handlers());
    ASSERT_TRUE(log.wait_final()) << mode;
    ASSERT_FALSE(log.error()) << mode << ": " << log.error()->message;
    EXPECT_EQ(log.deltas().size(), 5u) << mode;
    ASSERT_EQ(log.usage().has_value(), usage.has_value()) << mode;
    if (usage) {
      EXPECT_EQ(log.usage()->prompt_tokens, usage->prompt_tokens) << mode;
      EXPECT_EQ(log.usage()->completion_tokens, usage->completion_tokens) << mode;
    }
  }
}

TEST(UpstreamClient, AcceptsAWholeJsonAnswerInsteadOfAStream) {
  auto upstream = upstream_process::start({"--tokens", "3"});
  ASSERT_TRUE(upstream);
  io_threads threads;
  auto client = make_client(threads.io(), *upstream);
  stream_log log;
  auto request = client.stream("/chat/completions", chat_body(std::nullopt, false), log.handlers());
  ASSERT_TRUE(log.wait_final());
  ASSERT_FALSE(log.error()) << log.error()->message;
  EXPECT_EQ(log.deltas(), (std::vector<std::string>{"tok0 ", "tok1 ", "tok2 "})) << "one piece per token its usage counts";
  EXPECT_EQ(log.finish_reason(), "stop");
  ASSERT_TRUE(log.usage());
  EXPECT_EQ(log.usage()->completion_tokens, 3u);
}

TEST(UpstreamClient, AnErrorStatusCarriesTheBackendsMessage) {
  {
    auto upstream = upstream_process::start({"--fail-status", "503"});
    ASSERT_TRUE(upstream);
    io_threads threads;
    auto client = make_client(threads.io(), *upstream);
    stream_log log;
    auto request = client.stream("/chat/completions", chat_body(), log.handlers());
    ASSERT_TRUE(log.wait_final());
    ASSERT_TRUE(log.error());
    EXPECT_EQ(log.error()->kind, upstream_error_kind::http_status);
    EXPECT_EQ(log.error()->http_status, 503u);
    EXPECT_NE(log.error()->message.find("configured to fail every completion with HTTP 503"), std::string::npos)
        << log.error()->message;
    EXPECT_TRUE(log.error()->upstream_fault);
    EXPECT_TRUE(log.deltas().empty());
  }
  {
    auto upstream = upstream_process::start({});
    ASSERT_TRUE(upstream);
    io_threads threads;
    auto client = make_client(threads.io(), *upstream);
    stream_log log;
    auto request = client.stream("/chat/completions", chat_body(std::nullopt, true, "no-such-model"), log.handlers());
    ASSERT_TRUE(log.wait_final());
    ASSERT_TRUE(log.error());
    EXPECT_EQ(log.error()->http_status, 404u);
    EXPECT_NE(log.error()->message.find("The model `no-such-model` does not exist"), std::string::npos)
        << log.error()->message;
    // The platform sends only models the provider advertised: one its backend lacks is the
    // provider's fault (a model unloaded since), not the request's.
    EXPECT_TRUE(log.error()->upstream_fault) << "the backend no longer serves a model it advertised";
  }
  for (const auto& [status, upstream_fault] : {std::pair{400u, false}, std::pair{413u, false}, std::pair{422u, false},
                                               std::pair{401u, true}, std::pair{403u, true}, std::pair{408u, true},
                                               std::pair{429u, true}}) {
    auto upstream = upstream_process::start({"--fail-status", std::to_string(status)});
    ASSERT_TRUE(upstream);
    io_threads threads;
    auto client = make_client(threads.io(), *upstream);
    stream_log log;
    auto request = client.stream("/chat/completions", chat_body(), log.handlers());
    ASSERT_TRUE(log.wait_final());
    ASSERT_TRUE(log.error());
    EXPECT_EQ(log.error()->http_status, status);
    EXPECT_EQ(log.error()->upstream_fault, upstream_fault) << status << " refuses the request itself only as 400, 413, 422";
  }
}

TEST(UpstreamClient, AFailoverContinuationFollowsVllmsRulesForATrailingAssistantMessage) {
  auto upstream = upstream_process::start({"--tokens", "3"});
  ASSERT_TRUE(upstream);
  io_threads threads;
  auto client = make_client(threads.io(), *upstream);
  // The body the gateway sends a provider that continues an answer begun elsewhere.
  auto request = parse_chat_request(chat_body(10), api_limits{});
  ASSERT_TRUE(request.has_value());
  {
    stream_log log;
    auto call = client.stream("/chat/completions", upstream_body(*request, "tok0 ", 1), log.handlers());
    ASSERT_TRUE(log.wait_final());
    ASSERT_FALSE(log.error()) << log.error()->message;
    EXPECT_EQ(log.deltas(), expected_tokens(3));
    EXPECT_EQ(upstream->stat("continued"), 1);
  }
  // What vLLM refuses: continue_final_message with its default add_generation_prompt (true), or
  // without an assistant message last.
  const auto refused = [&](json::object body, std::string_view reason) {
    stream_log log;
    auto call = client.stream("/chat/completions", json::serialize(body), log.handlers());
    ASSERT_TRUE(log.wait_final());
    ASSERT_TRUE(log.error());
    EXPECT_EQ(log.error()->http_status, 400u);
    EXPECT_NE(log.error()->message.find(reason), std::string::npos) << log.error()->message;
  };
  json::object continuing = json::parse(upstream_body(*request, "tok0 ", 1)).as_object();
  continuing.erase("add_generation_prompt");
  refused(continuing, "Cannot set both `continue_final_message` and `add_generation_prompt`");
  json::object user_last = json::parse(chat_body(10)).as_object();
  user_last["continue_final_message"] = true;
  user_last["add_generation_prompt"] = false;
  refused(user_last, "needs the final message to be from the assistant");
  EXPECT_EQ(upstream->stat("continued"), 1) << "refused requests are not counted";
  // A first attempt asks for no continuation.
  stream_log first;
  auto call = client.stream("/chat/completions", upstream_body(*request), first.handlers());
  ASSERT_TRUE(first.wait_final());
  ASSERT_FALSE(first.error()) << first.error()->message;
  EXPECT_EQ(upstream->stat("continued"), 1);
}

TEST(UpstreamClient, TooManyConcurrentStreamsIsTheBackendsOverload) {
  auto upstream = upstream_process::start({"--max-concurrent", "1", "--tokens", "100000", "--token-interval-us", "1000"});
  ASSERT_TRUE(upstream);
  io_threads threads;
  auto client = make_client(threads.io(), *upstream);
  stream_log first;
  auto running = client.stream("/chat/completions", chat_body(), first.handlers());
  ASSERT_TRUE(first.wait_deltas(1));
  stream_log second;
  auto refused = client.stream("/chat/completions", chat_body(), second.handlers());
  ASSERT_TRUE(second.wait_final());
  ASSERT_TRUE(second.error());
  EXPECT_EQ(second.error()->http_status, 429u);
  EXPECT_TRUE(second.error()->upstream_fault);
  running->cancel();
  EXPECT_EQ(first.finals(), 0);
}

TEST(UpstreamClient, AStreamCutMidwayIsAnErrorNotADone) {
  auto upstream = upstream_process::start({"--tokens", "10", "--drop-after-tokens", "3"});
  ASSERT_TRUE(upstream);
  io_threads threads;
  auto client = make_client(threads.io(), *upstream);
  stream_log log;
  auto request = client.stream("/chat/completions", chat_body(), log.handlers());
  ASSERT_TRUE(log.wait_final());
  ASSERT_TRUE(log.error()) << "finish_reason " << log.finish_reason().value_or("(none)");
  EXPECT_EQ(log.error()->kind, upstream_error_kind::dropped) << log.error()->message;
  EXPECT_TRUE(log.error()->upstream_fault);
  EXPECT_EQ(log.deltas(), expected_tokens(3));
  EXPECT_EQ(log.finals(), 1);
}

/// A one-shot HTTP server on loopback, for answers the test upstream does not give: reads one
/// request, writes `first` in one piece, then, once `go_on` is set (or after `generous`), `rest`,
/// and closes.
class one_shot_server {
 public:
  explicit one_shot_server(std::string first, std::string rest = {})
      : acceptor_(io_, tcp::endpoint(asio::ip::make_address("127.0.0.1"), 0)),
        thread_([this, first = std::move(first), rest = std::move(rest)] { serve(first, rest); }) {}
  ~one_shot_server() { thread_.join(); }  // the test's client connects, so accept returns
  std::string base_url() const { return "http://127.0.0.1:" + std::to_string(acceptor_.local_endpoint().port()) + "/v1"; }
  void go_on() { go_on_.set_value(); }

 private:
  void serve(const std::string& first, const std::string& rest) {
    boost::system::error_code ec;
    tcp::socket socket(io_);
    acceptor_.accept(socket, ec);
    if (ec) return;
    beast::flat_buffer buffer;
    http::request<http::string_body> request;
    http::read(socket, buffer, request, ec);
    if (ec) return;
    asio::write(socket, asio::buffer(first), ec);
    if (!rest.empty()) {
      (void)go_on_.get_future().wait_for(generous);
      asio::write(socket, asio::buffer(rest), ec);
    }
    socket.shutdown(tcp::socket::shutdown_send, ec);
    char drain[256];
    while (!ec) socket.read_some(asio::buffer(drain), ec);  // until the client closes too
  }

  asio::io_context io_;
  tcp::acceptor acceptor_;
  std::promise<void> go_on_;
  std::thread thread_;
};

/// A chat stream from `server`, on the test's own I/O threads.
struct one_shot_stream {
  explicit one_shot_stream(const one_shot_server& server)
      : client(upstream_client::create(threads.io(), options_with(&upstream_options::base_url, server.base_url())).value()),
        request(client.stream("/chat/completions", chat_body(), log.handlers())) {}
  io_threads threads;
  upstream_client client;
  stream_log log;
  std::shared_ptr<upstream_request> request;
};

std::string chat_event(int token) {
  return R"(data: {"choices":[{"index":0,"delta":{"content":"tok)" + std::to_string(token) +
         R"( "},"finish_reason":null}]})" "\n\n";
}

const std::string stop_event = R"(data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]})" "\n\n";

TEST(UpstreamClient, EventsThatCameWithTheHeaderAreDeliveredAtOnce) {
  // The header's read brings the first event along; it must not wait for more bytes.
  const std::string head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n";
  one_shot_server server(head + chat_event(0), chat_event(1) + stop_event);
  one_shot_stream exchange(server);
  auto& log = exchange.log;
  const bool first_came = log.wait_deltas(1);
  server.go_on();
  ASSERT_TRUE(first_came) << "the first event waited for the rest of the answer";
  ASSERT_TRUE(log.wait_final());
  ASSERT_FALSE(log.error()) << log.error()->message;
  EXPECT_EQ(log.deltas(), expected_tokens(2));
  EXPECT_EQ(log.finish_reason(), "stop");
}

TEST(UpstreamClient, AnErrorLineOfLlamaCppServerFailsTheStreamWithItsMessageAndFault) {
  // llama.cpp server's mid-stream failure is an `error:` field, not a `data:` one. Its 400 is the
  // request's fault (a prompt over the context); a 500 is the backend's.
  const std::string head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n";
  for (const auto& [code, upstream_fault] : {std::pair{400, false}, std::pair{500, true}}) {
    one_shot_server server(head + chat_event(0) + R"(error: {"code":)" + std::to_string(code) +
                           R"(,"message":"the request exceeds the available context size","type":"exceed_context_size_error"})" +
                           "\n\n");
    one_shot_stream exchange(server);
    ASSERT_TRUE(exchange.log.wait_final()) << code;
    ASSERT_TRUE(exchange.log.error()) << code;
    EXPECT_EQ(exchange.log.error()->kind, upstream_error_kind::backend) << code;
    EXPECT_NE(exchange.log.error()->message.find("the request exceeds the available context size"), std::string::npos)
        << exchange.log.error()->message;
    EXPECT_EQ(exchange.log.error()->upstream_fault, upstream_fault) << code;
  }
  // vLLM sends an engine's failure mid-stream as a 400 of its own type: the backend's fault.
  one_shot_server vllm(head + chat_event(0) +
                       R"(data: {"error":{"object":"error","message":"CUDA out of memory","type":"BadRequestError","param":null,"code":400}})" +
                       "\n\n");
  one_shot_stream exchange(vllm);
  ASSERT_TRUE(exchange.log.wait_final());
  ASSERT_TRUE(exchange.log.error());
  EXPECT_TRUE(exchange.log.error()->upstream_fault) << exchange.log.error()->message;
}

TEST(UpstreamClient, AReasoningModelsThinkingComesApartFromItsAnswerUnderEitherName) {
  // llama.cpp server, vLLM and LM Studio stream delta.reasoning_content; Ollama delta.reasoning.
  const std::string head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n";
  one_shot_server server(head + R"(data: {"choices":[{"index":0,"delta":{"reasoning_content":"hmm "},"finish_reason":null}]})" "\n\n" +
                         R"(data: {"choices":[{"index":0,"delta":{"reasoning":"so "},"finish_reason":null}]})" "\n\n" +
                         R"(data: {"choices":[{"index":0,"delta":{"content":"","reasoning_content":null},"finish_reason":null}]})" "\n\n" +
                         chat_event(0) + stop_event + "data: [DONE]\n\n");
  one_shot_stream exchange(server);
  ASSERT_TRUE(exchange.log.wait_final());
  ASSERT_FALSE(exchange.log.error()) << exchange.log.error()->message;
  EXPECT_EQ(exchange.log.pieces(), (std::vector<std::string>{"reasoning:hmm ", "reasoning:so ", "content:tok0 "}));
}

TEST(UpstreamClient, AWholeAnswersThinkingComesBeforeItsText) {
  const std::string body =
      R"({"choices":[{"index":0,"message":{"role":"assistant","content":"42","reasoning_content":"6 times 7"},"finish_reason":"stop"}]})";
  one_shot_server server("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: " +
                         std::to_string(body.size()) + "\r\nConnection: close\r\n\r\n" + body);
  one_shot_stream exchange(server);
  ASSERT_TRUE(exchange.log.wait_final());
  ASSERT_FALSE(exchange.log.error()) << exchange.log.error()->message;
  // 11 bytes and no usage: 3 tokens, 2 of them the thinking's (its share of the bytes).
  EXPECT_EQ(exchange.log.pieces(), (std::vector<std::string>{"reasoning:6 ti", "reasoning:mes 7", "content:42"}));
}

TEST(UpstreamClient, AWholeAnswerComesInOnePiecePerTokenItsUsageCounts) {
  // A backend that ignored "stream": true: its answer is handed over as a stream's would be, one
  // piece per token (the agent and the coordinator count pieces), never splitting a character.
  const auto pieces_of = [](const std::string& content, const std::string& usage) {
    const std::string body = R"({"choices":[{"index":0,"message":{"role":"assistant","content":")" + content +
                             R"("},"finish_reason":"stop"}])" + usage + "}";
    one_shot_server server("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: " +
                           std::to_string(body.size()) + "\r\nConnection: close\r\n\r\n" + body);
    one_shot_stream exchange(server);
    EXPECT_TRUE(exchange.log.wait_final());
    EXPECT_FALSE(exchange.log.error());
    return exchange.log.deltas();
  };
  const auto joined = [](const std::vector<std::string>& pieces) {
    std::string all;
    for (const auto& p : pieces) all += p;
    return all;
  };
  const std::string text = "The answer is forty-two.";  // 24 bytes
  const auto counted = pieces_of(text, R"(,"usage":{"prompt_tokens":5,"completion_tokens":6,"total_tokens":11})");
  EXPECT_EQ(counted.size(), 6u);
  EXPECT_EQ(joined(counted), text);
  EXPECT_EQ(pieces_of(text, "").size(), 6u) << "no usage: a token per 4 bytes";
  EXPECT_EQ(pieces_of(text, R"(,"usage":{"prompt_tokens":5,"completion_tokens":12,"total_tokens":17})").size(), 12u)
      << "a token per two bytes is plausible";
  EXPECT_EQ(pieces_of(text, R"(,"usage":{"prompt_tokens":5,"completion_tokens":13,"total_tokens":18})").size(), 6u)
      << "more is not (a count added up over answers): the estimate";
  const std::string accents = "\u00e9\u00e9\u00e9";  // three 2-byte characters
  const auto split = pieces_of(accents, R"(,"usage":{"prompt_tokens":1,"completion_tokens":3,"total_tokens":4})");
  EXPECT_EQ(split, (std::vector<std::string>{"\u00e9", "\u00e9", "\u00e9"})) << "no character cut";
}

TEST(UpstreamClient, AStreamSentWithItsHeaderAndEndedByClosingIsReadWhole) {
  // Some servers send no length and no chunks: the body ends when the connection does. Here the
  // whole answer (over 16 KiB of events) comes in one write with the header, so the client
  // parses more than one of its 4 KiB body pieces from what one read brought.
  constexpr int tokens = 300;
  std::string answer = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n";
  for (int i = 0; i < tokens; ++i) answer += chat_event(i);
  answer += stop_event;
  ASSERT_GT(answer.size(), 16u * 1024);
  one_shot_server server(answer);
  one_shot_stream exchange(server);
  auto& log = exchange.log;
  ASSERT_TRUE(log.wait_final());
  ASSERT_FALSE(log.error()) << log.error()->message;
  EXPECT_EQ(log.deltas(), expected_tokens(tokens));
  EXPECT_EQ(log.finish_reason(), "stop");
  EXPECT_EQ(log.finals(), 1);
}

TEST(UpstreamClient, AStreamEndedByClosingBeforeItsFinishIsDropped) {
  std::string answer = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n";
  const std::string event = chat_event(0);
  char size[16];
  std::snprintf(size, sizeof size, "%zx\r\n", event.size());
  answer += size + event + "\r\n";
  answer += "40\r\ndata: {\"cho";  // a chunk cut short
  one_shot_server server(answer);
  one_shot_stream exchange(server);
  auto& log = exchange.log;
  ASSERT_TRUE(log.wait_final());
  ASSERT_TRUE(log.error());
  EXPECT_EQ(log.error()->kind, upstream_error_kind::dropped) << log.error()->message;
  EXPECT_EQ(log.deltas(), expected_tokens(1));
  EXPECT_EQ(log.finals(), 1);
}

TEST(UpstreamClient, ARefusalThatBlamesTheModelIsTheProvidersFault) {
  // LM Studio answers 400 once its model was unloaded (or failed to load): the agent asked for a
  // model it advertised, so the provider's state is at fault, not the client's request.
  const std::vector<std::string> bodies{
      R"({"error":{"message":"No models loaded. Please load a model in the developer page or use the `lms load` command.","type":"invalid_request_error","param":"model"}})",
      R"({"error":"Failed to load model \"qwen\". Error: out of memory"})",
  };
  for (const auto& body : bodies) {
    one_shot_server server("HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: " +
                           std::to_string(body.size()) + "\r\n\r\n" + body);
    one_shot_stream exchange(server);
    ASSERT_TRUE(exchange.log.wait_final());
    ASSERT_TRUE(exchange.log.error());
    EXPECT_EQ(exchange.log.error()->http_status, 400u);
    EXPECT_TRUE(exchange.log.error()->upstream_fault) << body;
  }
  // A 400 about another parameter stays the request's fault.
  const std::string other = R"({"error":{"message":"max_tokens is too large","type":"invalid_request_error","param":"max_tokens"}})";
  one_shot_server server("HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: " +
                         std::to_string(other.size()) + "\r\n\r\n" + other);
  one_shot_stream exchange(server);
  ASSERT_TRUE(exchange.log.wait_final());
  ASSERT_TRUE(exchange.log.error());
  EXPECT_FALSE(exchange.log.error()->upstream_fault);
}

TEST(UpstreamClient, AnErrorAnswerCutShortKeepsItsStatusAndWhoseFaultItIs) {
  // The backend refuses the request (400), promises 200 bytes of message and closes after 30.
  one_shot_server server(
      "HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n"
      "{\"error\":{\"message\":\"too long");
  one_shot_stream exchange(server);
  auto& log = exchange.log;
  ASSERT_TRUE(log.wait_final());
  ASSERT_TRUE(log.error());
  EXPECT_EQ(log.error()->kind, upstream_error_kind::http_status) << log.error()->message;
  EXPECT_EQ(log.error()->http_status, 400u);
  EXPECT_FALSE(log.error()->upstream_fault) << "the request's fault, not the provider's";
  EXPECT_NE(log.error()->message.find("HTTP 400"), std::string::npos) << log.error()->message;
  EXPECT_EQ(log.error()->message.find("too long"), std::string::npos)
      << "a JSON body cut short may be quoting the request: not shown. " << log.error()->message;
  EXPECT_EQ(log.finals(), 1);
}

/// The message of the error that `body`, answered with HTTP 422, gives.
std::string message_of_422(const std::string& body) {
  one_shot_server server("HTTP/1.1 422 Unprocessable Entity\r\nContent-Type: application/json\r\nContent-Length: " +
                         std::to_string(body.size()) + "\r\n\r\n" + body);
  one_shot_stream exchange(server);
  auto& log = exchange.log;
  EXPECT_TRUE(log.wait_final());
  EXPECT_TRUE(log.error());
  return log.error() ? log.error()->message : std::string();
}

TEST(UpstreamClient, AnErrorMessageNeverQuotesTheRequest) {
  // FastAPI's validation errors: the place and message of each, not the input they quote.
  const auto fastapi = message_of_422(
      R"({"detail":[{"type":"missing","loc":["body","messages",0,"content"],"msg":"Field required",)"
      R"("input":{"role":"user","content2":"SECRET-PROMPT-123"}}]})");
  EXPECT_EQ(fastapi.find("SECRET"), std::string::npos) << fastapi;
  EXPECT_NE(fastapi.find("body.messages.0.content: Field required"), std::string::npos) << fastapi;
  // vLLM's (pydantic's) text quotes it after input_value=.
  const auto vllm = message_of_422(
      R"({"error":{"message":"1 validation error: messages.0 [type=value_error, input_value={'content': )"
      R"('SECRET-PROMPT-123'}, input_type=dict]","type":"BadRequestError"}})");
  EXPECT_EQ(vllm.find("SECRET"), std::string::npos) << vllm;
  EXPECT_NE(vllm.find("input_value=(withheld), input_type=dict]"), std::string::npos) << vllm;
  // A JSON body of a shape not known may hold anything: not shown.
  const auto other = message_of_422(R"({"problem":{"echo":"SECRET-PROMPT-123"}})");
  EXPECT_EQ(other.find("SECRET"), std::string::npos) << other;
  EXPECT_NE(other.find("HTTP 422"), std::string::npos) << other;
}

TEST(UpstreamClient, AStreamWhoseEndIsIrregularAfterItsFinishIsWhole) {
  // Both were counted as dropped before, so the answer failed over and its provider was blamed.
  // 1. The body ends (with the connection, no length) right after the finish chunk's data line,
  //    without the blank line that ends an event.
  const std::string close_delimited = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n" +
                                      chat_event(0) + stop_event.substr(0, stop_event.size() - 2);
  // 2. Chunked, and the connection closes after the finish chunk without the zero-length chunk
  //    that ends the body.
  std::string chunked = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n";
  for (const std::string& event : {chat_event(0), stop_event}) {
    char size[16];
    std::snprintf(size, sizeof size, "%zx\r\n", event.size());
    chunked += size + event + "\r\n";
  }
  for (const auto& answer : {close_delimited, chunked}) {
    SCOPED_TRACE(answer);
    one_shot_server server(answer);
    one_shot_stream exchange(server);
    auto& log = exchange.log;
    ASSERT_TRUE(log.wait_final());
    ASSERT_FALSE(log.error()) << log.error()->message;
    EXPECT_EQ(log.deltas(), expected_tokens(1));
    EXPECT_EQ(log.finish_reason(), "stop");
    EXPECT_EQ(log.finals(), 1);
  }
}

TEST(UpstreamClient, CancelClosesTheUpstreamRequestAtOnce) {
  auto upstream = upstream_process::start({"--tokens", "100000", "--token-interval-us", "1000"});
  ASSERT_TRUE(upstream);
  io_threads threads;
  auto client = make_client(threads.io(), *upstream);
  stream_log log;
  auto request = client.stream("/chat/completions", chat_body(), log.handlers());
  ASSERT_TRUE(log.wait_deltas(2));
  request->cancel();
  const auto deltas_at_cancel = log.deltas().size();
  const auto took = upstream->wait_stat("cancelled", 1);
  ASSERT_TRUE(took) << "the upstream never saw the cancellation";
  std::cout << "upstream counted the cancellation after " << took->count() << " ms\n";
  EXPECT_LT(*took, 1000ms);
  EXPECT_EQ(upstream->stat("active"), 0);
  EXPECT_EQ(log.deltas().size(), deltas_at_cancel) << "a delta came after cancel() returned";
  EXPECT_EQ(log.finals(), 0);
  request->cancel();  // twice is harmless
}

TEST(UpstreamClient, CancelFromInsideADeltaCallbackStopsEverything) {
  auto upstream = upstream_process::start({"--tokens", "100000"});
  ASSERT_TRUE(upstream);
  io_threads threads;
  auto client = make_client(threads.io(), *upstream);
  std::mutex mutex;
  std::condition_variable cancelled;
  std::shared_ptr<upstream_request> request;
  int deltas = 0;
  int finals = 0;
  std::unique_lock lock(mutex);
  request = client.stream("/chat/completions", chat_body(),
                          {[&](std::string_view) {
                             std::lock_guard inner(mutex);
                             if (++deltas == 3) {
                               request->cancel();
                               cancelled.notify_all();
                             }
                           },
                           [&](std::string, std::optional<upstream_usage>) { ++finals; },
                           [&](upstream_error) { ++finals; }});
  ASSERT_TRUE(cancelled.wait_for(lock, generous, [&] { return deltas >= 3; }));
  lock.unlock();
  ASSERT_TRUE(upstream->wait_stat("cancelled", 1));
  lock.lock();
  EXPECT_EQ(deltas, 3);
  EXPECT_EQ(finals, 0);
}

TEST(UpstreamClient, AResponseOverItsLimitFails) {
  auto upstream = upstream_process::start({"--tokens", "1000"});
  ASSERT_TRUE(upstream);
  io_threads threads;
  auto client = make_client(threads.io(), *upstream, options_with(&upstream_options::response_bytes_max, std::size_t{4096}));
  stream_log log;
  auto request = client.stream("/chat/completions", chat_body(), log.handlers());
  ASSERT_TRUE(log.wait_final());
  ASSERT_TRUE(log.error());
  EXPECT_EQ(log.error()->kind, upstream_error_kind::too_large) << log.error()->message;
  EXPECT_NE(log.error()->message.find("response_bytes_max"), std::string::npos) << log.error()->message;
  EXPECT_LT(log.deltas().size(), 1000u);
}

TEST(UpstreamClient, AModelsListOverListBytesMaxFails) {
  // 100 models: a list of some 7 KB, over a list_bytes_max of 4 KiB though well within
  // response_bytes_max (64 MiB), which bounds only a completion's answer.
  std::string models;
  for (int i = 0; i < 100; ++i) models += (i == 0 ? "" : ",") + std::string("model-") + std::to_string(i);
  auto upstream = upstream_process::start({"--models", models});
  ASSERT_TRUE(upstream);
  io_threads threads;
  auto client = make_client(threads.io(), *upstream, options_with(&upstream_options::list_bytes_max, std::size_t{4096}));
  std::promise<expected<std::vector<upstream_model>, upstream_error>> listed;
  client.list_models([&](auto models) { listed.set_value(std::move(models)); });
  auto result = listed.get_future();
  ASSERT_EQ(result.wait_for(generous), std::future_status::ready);
  const auto got = result.get();
  ASSERT_FALSE(got.has_value()) << got->size() << " models listed";
  EXPECT_EQ(got.error().kind, upstream_error_kind::too_large) << got.error().message;
  EXPECT_NE(got.error().message.find("list_bytes_max (4096 bytes)"), std::string::npos) << got.error().message;
}

TEST(UpstreamClient, AnEventOverItsLimitFails) {
  auto upstream = upstream_process::start({"--tokens", "5"});
  ASSERT_TRUE(upstream);
  io_threads threads;
  auto client = make_client(threads.io(), *upstream, options_with(&upstream_options::event_bytes_max, std::size_t{64}));
  stream_log log;
  auto request = client.stream("/chat/completions", chat_body(), log.handlers());
  ASSERT_TRUE(log.wait_final());
  ASSERT_TRUE(log.error());
  EXPECT_EQ(log.error()->kind, upstream_error_kind::too_large) << log.error()->message;
  EXPECT_NE(log.error()->message.find("event_bytes_max"), std::string::npos) << log.error()->message;
}

TEST(UpstreamClient, SilenceLongerThanTheTimeoutThatAppliesFailsNamingIt) {
  struct silence_case {
    std::vector<std::string> upstream;
    std::chrono::milliseconds first_token_timeout;
    std::chrono::milliseconds idle_timeout;
    std::string named;
    bool close_seen;  // the upstream notices the close while it waits (not between two tokens)
  };
  for (const auto& c : {
           // Before the first event first_token_timeout applies, however long idle_timeout is.
           silence_case{{"--first-token-ms", "60000"}, 300ms, 60'000ms, "for 300 ms before the first event (", true},
           // After it idle_timeout does, however long first_token_timeout is: a stall mid-answer.
           silence_case{{"--token-interval-us", "60000000", "--tokens", "3"}, 60'000ms, 300ms, "for 300 ms (", false},
       }) {
    SCOPED_TRACE(c.named);
    auto upstream = upstream_process::start(c.upstream);
    ASSERT_TRUE(upstream);
    io_threads threads;
    auto options = options_with(&upstream_options::first_token_timeout, c.first_token_timeout);
    options.idle_timeout = c.idle_timeout;
    auto client = make_client(threads.io(), *upstream, options);
    stream_log log;
    const auto start = std::chrono::steady_clock::now();
    auto request = client.stream("/chat/completions", chat_body(), log.handlers());
    ASSERT_TRUE(log.wait_final());
    const auto took = std::chrono::steady_clock::now() - start;
    ASSERT_TRUE(log.error());
    EXPECT_EQ(log.error()->kind, upstream_error_kind::timeout) << log.error()->message;
    EXPECT_NE(log.error()->message.find(c.named), std::string::npos) << log.error()->message;
    EXPECT_GE(took, 300ms);
    EXPECT_LT(took, 5s);
    if (c.close_seen) {
      EXPECT_TRUE(upstream->wait_stat("cancelled", 1)) << "the timed-out request was not closed";
    }
  }
}

TEST(UpstreamClient, AnErrorAnswerThatStallsIsBoundByTheIdleTimeoutNotTheFirstTokens) {
  // The status came with the header: what stalls after it is no prompt being read.
  for (const std::string head : {"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n",
                                 "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"}) {
    SCOPED_TRACE(head);
    one_shot_server server(head + "Content-Length: 200\r\n\r\n{\"error\":{\"message\":\"loading", "never");
    io_threads threads;
    auto options = options_with(&upstream_options::base_url, server.base_url());
    options.first_token_timeout = std::chrono::milliseconds(60'000);
    options.idle_timeout = std::chrono::milliseconds(300);
    auto client = upstream_client::create(threads.io(), options).value();
    stream_log log;
    auto request = client.stream("/chat/completions", chat_body(), log.handlers());
    const bool ended = log.wait_final();  // at most 10 s
    server.go_on();
    ASSERT_TRUE(ended) << "no end within 10 s: first_token_timeout (60 s) applied";
    ASSERT_TRUE(log.error());
  }
}

TEST(UpstreamClient, AFirstTokenSlowerThanTheIdleTimeoutIsAwaited) {
  // A long prompt is read in silence: only first_token_timeout bounds that wait.
  auto slow_start = upstream_process::start({"--first-token-ms", "700", "--tokens", "3"});
  ASSERT_TRUE(slow_start);
  io_threads threads;
  auto options = options_with(&upstream_options::idle_timeout, std::chrono::milliseconds(200));
  options.first_token_timeout = std::chrono::milliseconds(30'000);
  auto client = make_client(threads.io(), *slow_start, options);
  stream_log log;
  auto request = client.stream("/chat/completions", chat_body(), log.handlers());
  ASSERT_TRUE(log.wait_final());
  ASSERT_FALSE(log.error()) << log.error()->message;
  EXPECT_EQ(log.deltas(), expected_tokens(3));
}

TEST(UpstreamClient, ConnectionRefusedIsAClearError) {
  std::uint16_t port = 0;
  {
    asio::io_context io;
    tcp::acceptor closed(io, tcp::endpoint(asio::ip::make_address("127.0.0.1"), 0));
    port = closed.local_endpoint().port();
  }  // nothing listens there any more
  io_threads threads;
  const std::string base = "http://127.0.0.1:" + std::to_string(port) + "/v1";
  auto client = upstream_client::create(threads.io(), options_with(&upstream_options::base_url, base));
  ASSERT_TRUE(client.has_value());
  stream_log log;
  auto request = client->stream("/chat/completions", chat_body(), log.handlers());
  ASSERT_TRUE(log.wait_final());
  ASSERT_TRUE(log.error());
  EXPECT_EQ(log.error()->kind, upstream_error_kind::connect);
  EXPECT_NE(log.error()->message.find("127.0.0.1:" + std::to_string(port)), std::string::npos) << log.error()->message;
  EXPECT_NE(log.error()->message.find("refused"), std::string::npos) << log.error()->message;
  EXPECT_TRUE(log.error()->upstream_fault);
  EXPECT_TRUE(log.error()->refused) << "the agent goes offline on it";

  std::promise<bool> listed;
  client->list_models([&](auto models) { listed.set_value(!models && models.error().kind == upstream_error_kind::connect); });
  auto failed = listed.get_future();
  ASSERT_EQ(failed.wait_for(generous), std::future_status::ready);
  EXPECT_TRUE(failed.get());
}

TEST(UpstreamClient, ReusesKeptAliveConnectionsAndRetriesAStaleOne) {
  auto upstream = upstream_process::start({"--tokens", "3"});
  ASSERT_TRUE(upstream);
  io_threads threads;
  auto client = make_client(threads.io(), *upstream);
  const auto accepted_before = upstream->stat("connections_accepted");  // this /stats' own included
  for (int i = 0; i < 3; ++i) {
    stream_log log;
    auto request = client.stream("/chat/completions", chat_body(), log.handlers());
    ASSERT_TRUE(log.wait_final());
    ASSERT_FALSE(log.error()) << log.error()->message;
    EXPECT_EQ(log.deltas(), expected_tokens(3));
  }
  EXPECT_EQ(upstream->stat("connections_accepted") - accepted_before, 2)
      << "three streams on one kept connection, plus the second /stats' own";

  // The backend restarts on the same port: the kept connection is dead, the next request must
  // notice before any answer byte and go again on a fresh connection.
  const std::string listen = "127.0.0.1:" + std::to_string(upstream->port());
  upstream.reset();
  upstream = upstream_process::start({"--tokens", "2"}, listen);
  ASSERT_TRUE(upstream);
  stream_log log;
  auto request = client.stream("/chat/completions", chat_body(), log.handlers());
  ASSERT_TRUE(log.wait_final());
  ASSERT_FALSE(log.error()) << log.error()->message;
  EXPECT_EQ(log.deltas(), expected_tokens(2));
}

TEST(UpstreamClient, KeepsAtMostIdleConnectionsMaxConnectionsIdle) {
  // Runs `batches` of `together` streams at once, one batch after the other, and returns how many
  // connections stay open once they ended (those the client keeps idle), waiting a while for
  // `expected` (a connection not kept is closed a moment after its answer). The last batch must
  // open only the connections that were not kept.
  const auto kept_after = [](std::size_t idle_max, int batches, int together, std::int64_t expected) -> std::int64_t {
    auto upstream = upstream_process::start({"--tokens", "3", "--token-interval-us", "50000"});
    EXPECT_TRUE(upstream);
    if (!upstream) return -1;
    io_threads threads;
    upstream_options options;
    options.idle_connections_max = idle_max;
    auto client = make_client(threads.io(), *upstream, options);
    std::int64_t accepted_before_last = 0;
    for (int b = 0; b < batches; ++b) {
      if (b + 1 == batches) accepted_before_last = upstream->stat("connections_accepted");
      std::vector<std::unique_ptr<stream_log>> logs;
      std::vector<std::shared_ptr<upstream_request>> requests;
      for (int i = 0; i < together; ++i) {
        logs.push_back(std::make_unique<stream_log>());
        requests.push_back(client.stream("/chat/completions", chat_body(), logs.back()->handlers()));
      }
      for (auto& log : logs) {
        EXPECT_TRUE(log->wait_final());
        EXPECT_FALSE(log->error());
      }
    }
    const std::int64_t opened_by_last = upstream->stat("connections_accepted") - accepted_before_last - 1;
    EXPECT_EQ(opened_by_last, together - std::min<std::int64_t>(static_cast<std::int64_t>(idle_max), together))
        << "idle_connections_max " << idle_max << ": the last batch reuses the kept connections";
    // The upstream counts open connections, /stats' own among them; one the client does not keep
    // is closed once its answer ended.
    if (upstream->wait_stat("connections", expected + 1)) return expected;
    return upstream->stat("connections") - 1;
  };
  EXPECT_EQ(kept_after(0, 2, 1, 0), 0) << "idle_connections_max 0: none kept";
  EXPECT_EQ(kept_after(1, 2, 2, 1), 1) << "idle_connections_max 1: of two at once, one kept";
  EXPECT_EQ(kept_after(2, 2, 2, 2), 2) << "idle_connections_max 2: both kept";
}

TEST(UpstreamClient, ManyConcurrentStreamsEachGetTheirOwnAnswer) {
  constexpr int streams = 64;
  auto upstream = upstream_process::start({"--tokens", "20", "--token-interval-us", "500"});
  ASSERT_TRUE(upstream);
  io_threads threads(2);
  auto client = make_client(threads.io(), *upstream);
  std::vector<std::unique_ptr<stream_log>> logs;
  std::vector<std::shared_ptr<upstream_request>> requests;
  for (int i = 0; i < streams; ++i) {
    logs.push_back(std::make_unique<stream_log>());
    requests.push_back(client.stream("/chat/completions", chat_body(10 + i % 10), logs.back()->handlers()));
  }
  for (int i = 0; i < streams; ++i) {
    ASSERT_TRUE(logs[i]->wait_final()) << "stream " << i;
    ASSERT_FALSE(logs[i]->error()) << "stream " << i << ": " << logs[i]->error()->message;
    EXPECT_EQ(logs[i]->deltas(), expected_tokens(10 + i % 10)) << "stream " << i;
    ASSERT_TRUE(logs[i]->usage());
    EXPECT_EQ(logs[i]->usage()->completion_tokens, static_cast<std::uint32_t>(10 + i % 10));
  }
  EXPECT_TRUE(upstream->wait_stat("completed", streams));
}

// With --decode-steps the test upstream sends every answer's later tokens at the ticks of one
// shared clock, as a server decoding its answers in one batch: an answer started half an interval
// after another gets its later tokens together with the other's, not half an interval apart.
TEST(UpstreamClient, DecodeStepsSendEveryAnswersLaterTokensOnOneClock) {
  constexpr auto interval = 300ms;
  auto upstream = upstream_process::start(
      {"--tokens", "8", "--token-interval-us", std::to_string(std::chrono::microseconds(interval).count()), "--decode-steps"});
  ASSERT_TRUE(upstream);
  io_threads threads;
  auto client = make_client(threads.io(), *upstream);
  stream_log first;
  auto a = client.stream("/chat/completions", chat_body(), first.handlers());
  ASSERT_TRUE(first.wait_deltas(1));
  // Only sets the second answer's start apart from the first's; the check below holds for any
  // offset, and without the shared clock fails for offsets away from a whole interval.
  std::this_thread::sleep_for(interval / 2);
  stream_log second;
  auto b = client.stream("/chat/completions", chat_body(), second.handlers());
  ASSERT_TRUE(first.wait_final() && second.wait_final());
  ASSERT_FALSE(first.error() || second.error());
  const auto a_times = first.delta_times();
  const auto b_times = second.delta_times();
  ASSERT_EQ(a_times.size(), 8u);
  ASSERT_EQ(b_times.size(), 8u);
  // The second answer's token 1 leaves at a tick at least an interval after its start, by which
  // time the first answer is at its token 2 or 3 (its tokens go on for 2.1 s, so a second answer
  // started late on a loaded machine still meets one): the two arrive together.
  auto nearest = interval;
  for (std::size_t i = 1; i < a_times.size(); ++i) {
    const auto apart = b_times[1] > a_times[i] ? b_times[1] - a_times[i] : a_times[i] - b_times[1];
    nearest = std::min(nearest, std::chrono::duration_cast<std::chrono::milliseconds>(apart));
  }
  EXPECT_LT(nearest, interval / 4) << "the second answer's token 1 is " << nearest.count()
                                   << " ms from the first answer's nearest later token";
}

}  // namespace
}  // namespace gpustream::gateway
