// The provider link client against a small Beast WebSocket server inside the test: the token on
// the upgrade, frames both ways, reconnects with growing and capped backoff, a refused upgrade, bad
// frames from the server, the send queue's bound. The backoff function is tested on its own.
#include "gateway/link_client.hpp"

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

#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <future>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "gateway/link_codec.hpp"

namespace gpustream::gateway {
namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
namespace websocket = beast::websocket;
using tcp = asio::ip::tcp;
using namespace std::chrono_literals;

/// Generous: the waits end on real events long before; hitting it fails the test.
constexpr auto wait_deadline = 20s;

/// Thread-safe notes from both sides, with a wait on a predicate over them.
class journal {
 public:
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

  template <class F>
  auto read(F&& f) {
    std::lock_guard lock(mutex_);
    return f();
  }

 private:
  std::mutex mutex_;
  std::condition_variable changed_;
};

/// A WebSocket server on 127.0.0.1 with its own thread; every accepted TCP connection runs
/// `session(socket, n)` with n = 0, 1, 2, … in order of arrival.
class test_ws_server {
 public:
  using session = std::function<asio::awaitable<void>(tcp::socket, int)>;

  explicit test_ws_server(session run) : run_(std::move(run)) {
    acceptor_.open(tcp::v4());
    acceptor_.set_option(tcp::acceptor::reuse_address(true));
    acceptor_.bind({asio::ip::make_address("127.0.0.1"), 0});
    acceptor_.listen();
    asio::co_spawn(io_, accept_loop(), asio::detached);
    thread_ = std::thread([this] { io_.run(); });
  }

  ~test_ws_server() {
    io_.stop();
    thread_.join();
  }

  [[nodiscard]] std::string url() const {
    return "ws://127.0.0.1:" + std::to_string(acceptor_.local_endpoint().port()) +
           "/v1/providers/link";
  }

 private:
  asio::awaitable<void> accept_loop() {
    for (int n = 0;; ++n) {
      auto socket = co_await acceptor_.async_accept(asio::use_awaitable);
      asio::co_spawn(io_, guarded(std::move(socket), n), asio::detached);
    }
  }

  // A session ends when its peer goes away; that surfaces as an exception from use_awaitable here,
  // at the edge of the test server, and ends only that session.
  asio::awaitable<void> guarded(tcp::socket socket, int n) {
    try {
      co_await run_(std::move(socket), n);
    } catch (const std::exception&) {
    }
  }

  asio::io_context io_;
  tcp::acceptor acceptor_{io_};
  session run_;
  std::thread thread_;
};

/// Reads the upgrade request into `request` and accepts it.
asio::awaitable<void> accept(websocket::stream<tcp::socket>& ws,
                             http::request<http::string_body>& request) {
  beast::flat_buffer buffer;
  co_await http::async_read(ws.next_layer(), buffer, request, asio::use_awaitable);
  co_await ws.async_accept(request, asio::use_awaitable);
  ws.binary(true);
}

asio::awaitable<void> accept(websocket::stream<tcp::socket>& ws) {
  http::request<http::string_body> request;
  co_await accept(ws, request);
}

// GCC 12 miscompiles temporaries of non-trivial types inside a co_await expression (it destroys
// them twice), so frames are encoded into named variables before being awaited on.
asio::awaitable<void> send_bytes(websocket::stream<tcp::socket>& ws,
                                 const std::vector<std::uint8_t>& bytes) {
  co_await ws.async_write(asio::buffer(bytes), asio::use_awaitable);
}

/// Reads until the client closes; returns the close code it sent.
asio::awaitable<std::uint16_t> read_until_closed(websocket::stream<tcp::socket>& ws) {
  beast::flat_buffer buffer;
  boost::system::error_code ec;
  while (!ec) {
    co_await ws.async_read(buffer, asio::redirect_error(asio::use_awaitable, ec));
    buffer.consume(buffer.size());
  }
  co_return ws.reason().code;
}

/// The client side: an io_context on its own thread, a link_client on it, and a journal of
/// everything the callbacks saw.
class client_fixture {
 public:
  client_fixture() : thread_([this] { io_.run(); }) {}

  /// Runs `f` on the client's io thread and waits for it.
  template <class F>
  auto on_io(F&& f) {
    std::packaged_task<decltype(f())()> task(std::forward<F>(f));
    auto result = task.get_future();
    asio::post(io_, [&task] { task(); });
    return result.get();
  }

  ~client_fixture() {
    on_io([this] { client_.reset(); });
    work_.reset();
    thread_.join();
  }

  void start(link_client_options options,
             std::function<void(link_client&)> on_connected = [](link_client&) {}) {
    on_connected_ = std::move(on_connected);
    on_io([&] {
      auto created = link_client::create(
          io_, std::move(options),
          {.on_connected =
               [this] {
                 notes.update([this] { ++connects; });
                 on_connected_(*client_);
               },
           .on_frame = [this](link::frame f) { notes.update([&] { frames.push_back(std::move(f)); }); },
           .on_disconnected =
               [this](const link_disconnect& d) { notes.update([&] { disconnects.push_back(d); }); }});
      ASSERT_TRUE(created) << created.error();
      client_ = std::move(*created);
      client_->start();
    });
  }

  link_client& client() { return *client_; }

  journal notes;
  int connects = 0;
  std::vector<link::frame> frames;
  std::vector<link_disconnect> disconnects;

 private:
  asio::io_context io_;
  std::optional<asio::executor_work_guard<asio::io_context::executor_type>> work_{io_.get_executor()};
  std::unique_ptr<link_client> client_;
  std::function<void(link_client&)> on_connected_;
  std::thread thread_;
};

link_client_options options_for(const std::string& url) {
  link_client_options options;
  options.url = url;
  options.bearer_token = "secret-token";
  options.backoff.delay_initial = 20ms;
  options.backoff.delay_max = 50ms;
  options.seed = 7;
  return options;
}

link::hello example_hello() {
  return {.agent_version = "test",
          .backend = events::backend_kind::openai,
          .backend_url = "http://127.0.0.1:1/v1",
          .gpus = {},
          .models = {{.model_name = "m",
                      .context_length_tokens = 4096,
                      .quantisation = "Q8_0",
                      .input_price_micros_per_mtok = 1,
                      .output_price_micros_per_mtok = 2,
                      .max_concurrency = 2}},
          .max_concurrency = 2};
}

// --- against a server ---------------------------------------------------------------------------

TEST(link_client, connects_with_the_token_and_exchanges_frames) {
  journal server_notes;
  std::string authorization;
  std::string user_agent;
  std::vector<link::frame> received;
  std::uint16_t close_code = 0;
  test_ws_server server([&](tcp::socket socket, int) -> asio::awaitable<void> {
    websocket::stream<tcp::socket> ws(std::move(socket));
    http::request<http::string_body> request;
    co_await accept(ws, request);
    server_notes.update([&] {
      authorization = std::string(request[http::field::authorization]);
      user_agent = std::string(request[http::field::user_agent]);
    });
    beast::flat_buffer buffer;
    co_await ws.async_read(buffer, asio::use_awaitable);
    const auto data = buffer.cdata();
    auto hello = link::decode({static_cast<const std::uint8_t*>(data.data()), data.size()}, {});
    server_notes.update([&] {
      if (hello) received.push_back(*hello);
    });
    const auto welcome =
        link::encode(link::welcome{.provider_id = "prov-1", .heartbeat_interval_ms = 1000});
    co_await send_bytes(ws, welcome);
    const auto offer = link::encode(link::offer{
        .job_id = "job-1", .kind = link::job_kind::chat, .request_json = R"({"stream":true})"});
    co_await send_bytes(ws, offer);
    const auto code = co_await read_until_closed(ws);
    server_notes.update([&] { close_code = code; });
  });

  client_fixture fixture;
  fixture.start(options_for(server.url()), [](link_client& client) {
    ASSERT_TRUE(client.send(example_hello()));
  });
  ASSERT_TRUE(fixture.notes.wait_until([&] { return fixture.frames.size() == 2; }));
  ASSERT_TRUE(server_notes.wait_until([&] { return !received.empty(); }));
  EXPECT_EQ(authorization, "Bearer secret-token");
  EXPECT_EQ(user_agent, "gpustream-provider");
  EXPECT_EQ(received.front(), link::frame{example_hello()});
  EXPECT_EQ(fixture.frames[0], (link::frame{link::welcome{.provider_id = "prov-1",
                                                           .heartbeat_interval_ms = 1000}}));
  EXPECT_EQ(link::frame_name(fixture.frames[1]), "offer");
  EXPECT_TRUE(fixture.on_io([&] { return fixture.client().connected(); }));

  fixture.on_io([&] { fixture.client().stop(); });
  ASSERT_TRUE(server_notes.wait_until([&] { return close_code != 0; }));
  EXPECT_EQ(close_code, 1001);  // going away
  EXPECT_TRUE(fixture.notes.read([&] { return fixture.disconnects.empty(); }))
      << "stop() reports nothing";
}

TEST(link_client, reconnects_after_the_server_drops_it_with_growing_capped_waits) {
  test_ws_server server([&](tcp::socket socket, int n) -> asio::awaitable<void> {
    websocket::stream<tcp::socket> ws(std::move(socket));
    co_await accept(ws);
    if (n == 0) {
      const websocket::close_reason why(websocket::close_code::policy_error, "go away");
      co_await ws.async_close(why, asio::use_awaitable);
    } else if (n < 4) {
      ws.next_layer().close();  // abrupt: no close frame
    } else {
      co_await read_until_closed(ws);
    }
  });

  client_fixture fixture;
  auto options = options_for(server.url());
  options.backoff.jitter_fraction = 0.0;  // exact waits: 20, 40, 50 (cap), 50
  fixture.start(options);
  ASSERT_TRUE(fixture.notes.wait_until([&] { return fixture.connects == 5; }));
  const auto disconnects = fixture.notes.read([&] { return fixture.disconnects; });
  ASSERT_EQ(disconnects.size(), 4u);
  EXPECT_EQ(disconnects[0].kind, link_disconnect_kind::closed_by_peer);
  EXPECT_EQ(disconnects[0].close_code, 1008);
  EXPECT_NE(disconnects[0].message.find("go away"), std::string::npos) << disconnects[0].message;
  for (std::size_t i = 1; i < disconnects.size(); ++i) {
    EXPECT_EQ(disconnects[i].kind, link_disconnect_kind::connection_lost) << disconnects[i].message;
  }
  for (const auto& d : disconnects) EXPECT_TRUE(d.was_connected);
  EXPECT_EQ(disconnects[0].retry_in, 20ms);
  EXPECT_EQ(disconnects[1].retry_in, 40ms);
  EXPECT_EQ(disconnects[2].retry_in, 50ms);
  EXPECT_EQ(disconnects[3].retry_in, 50ms);
}

TEST(link_client, a_connection_that_stayed_up_resets_the_backoff) {
  test_ws_server server([&](tcp::socket socket, int n) -> asio::awaitable<void> {
    websocket::stream<tcp::socket> ws(std::move(socket));
    co_await accept(ws);
    if (n < 3) {
      ws.next_layer().close();
    } else {
      co_await read_until_closed(ws);
    }
  });
  client_fixture fixture;
  auto options = options_for(server.url());
  options.backoff.jitter_fraction = 0.0;
  options.backoff.stable_after = 0ms;  // every connection counts as stable
  fixture.start(options);
  ASSERT_TRUE(fixture.notes.wait_until([&] { return fixture.connects == 4; }));
  for (const auto& d : fixture.notes.read([&] { return fixture.disconnects; })) {
    EXPECT_EQ(d.retry_in, 20ms);
  }
}

TEST(link_client, a_refused_upgrade_is_reported_with_its_status_and_message) {
  test_ws_server server([&](tcp::socket socket, int) -> asio::awaitable<void> {
    beast::flat_buffer buffer;
    http::request<http::string_body> request;
    co_await http::async_read(socket, buffer, request, asio::use_awaitable);
    http::response<http::string_body> response(http::status::unauthorized, request.version());
    response.set(http::field::content_type, "application/json");
    response.body() =
        R"({"error":{"message":"unknown provider token","type":"authentication_error","param":null,"code":null}})";
    response.prepare_payload();
    co_await http::async_write(socket, response, asio::use_awaitable);
  });
  client_fixture fixture;
  fixture.start(options_for(server.url()));
  ASSERT_TRUE(fixture.notes.wait_until([&] { return fixture.disconnects.size() >= 2; }));
  const auto d = fixture.notes.read([&] { return fixture.disconnects.front(); });
  EXPECT_EQ(d.kind, link_disconnect_kind::rejected);
  EXPECT_EQ(d.http_status, 401u);
  EXPECT_FALSE(d.was_connected);
  EXPECT_NE(d.message.find("401"), std::string::npos) << d.message;
  EXPECT_NE(d.message.find("unknown provider token"), std::string::npos) << d.message;
  EXPECT_EQ(d.message.find("secret-token"), std::string::npos) << "the token must never show";
  EXPECT_EQ(fixture.notes.read([&] { return fixture.connects; }), 0);
}

TEST(link_client, a_bad_frame_from_the_server_closes_the_link_with_1002) {
  journal server_notes;
  std::uint16_t close_code = 0;
  test_ws_server server([&](tcp::socket socket, int n) -> asio::awaitable<void> {
    websocket::stream<tcp::socket> ws(std::move(socket));
    co_await accept(ws);
    if (n == 0) {
      const std::vector<std::uint8_t> garbage(16, 0xff);
      co_await ws.async_write(asio::buffer(garbage), asio::use_awaitable);
      const auto code = co_await read_until_closed(ws);
      server_notes.update([&] { close_code = code; });
    } else {
      co_await read_until_closed(ws);
    }
  });
  client_fixture fixture;
  fixture.start(options_for(server.url()));
  ASSERT_TRUE(fixture.notes.wait_until([&] { return fixture.connects == 2; }));
  const auto d = fixture.notes.read([&] { return fixture.disconnects.front(); });
  EXPECT_EQ(d.kind, link_disconnect_kind::protocol_error);
  EXPECT_EQ(d.close_code, 1002);
  EXPECT_NE(d.message.find("bad frame"), std::string::npos) << d.message;
  ASSERT_TRUE(server_notes.wait_until([&] { return close_code != 0; }));
  EXPECT_EQ(close_code, 1002);
  EXPECT_TRUE(fixture.notes.read([&] { return fixture.frames.empty(); }));
}

TEST(link_client, an_oversize_message_closes_the_link_with_1009) {
  journal server_notes;
  std::uint16_t close_code = 0;
  bool server_done = false;
  test_ws_server server([&](tcp::socket socket, int n) -> asio::awaitable<void> {
    websocket::stream<tcp::socket> ws(std::move(socket));
    co_await accept(ws);
    if (n == 0) {
      const auto big = link::encode(link::delta{.job_id = "j", .text = std::string(4096, 'x')});
      // The client may reset the connection before the whole message is written.
      boost::system::error_code ec;
      co_await ws.async_write(asio::buffer(big), asio::redirect_error(asio::use_awaitable, ec));
      std::uint16_t code = 0;
      if (!ec) code = co_await read_until_closed(ws);
      server_notes.update([&] {
        close_code = code;
        server_done = true;
      });
    } else {
      co_await read_until_closed(ws);
    }
  });
  client_fixture fixture;
  auto options = options_for(server.url());
  options.limits.frame_bytes_max = 1024;
  fixture.start(options);
  ASSERT_TRUE(fixture.notes.wait_until([&] { return fixture.connects == 2; }));
  const auto d = fixture.notes.read([&] { return fixture.disconnects.front(); });
  EXPECT_EQ(d.kind, link_disconnect_kind::protocol_error);
  EXPECT_EQ(d.close_code, 1009);
  // The client stops reading at the oversize header and closes with most of the message unread,
  // so its kernel may answer with a reset that overtakes the close frame: the server sees 1009 or
  // a reset (code 0), never anything else.
  ASSERT_TRUE(server_notes.wait_until([&] { return server_done; }));
  EXPECT_TRUE(close_code == 1009 || close_code == 0) << close_code;
}

TEST(link_client, send_is_refused_when_down_when_too_large_and_when_the_queue_is_full) {
  test_ws_server server([&](tcp::socket socket, int) -> asio::awaitable<void> {
    websocket::stream<tcp::socket> ws(std::move(socket));
    co_await accept(ws);
    co_await read_until_closed(ws);
  });
  client_fixture fixture;
  auto options = options_for(server.url());
  options.send_queue_bytes_max = 1000;
  options.limits.frame_bytes_max = 600;
  std::vector<std::optional<link_send_errc>> results;
  fixture.start(options, [&](link_client& client) {
    const link::frame piece = link::delta{.job_id = "j", .text = std::string(250, 'x')};
    // All within one callback, so nothing is written in between: the queue only grows.
    for (int i = 0; i < 5; ++i) {
      auto sent = client.send(piece);
      results.push_back(sent ? std::nullopt : std::optional(sent.error().code));
    }
    auto big = client.send(link::delta{.job_id = "j", .text = std::string(700, 'x')});
    results.push_back(big ? std::nullopt : std::optional(big.error().code));
  });
  ASSERT_TRUE(fixture.notes.wait_until([&] { return fixture.connects == 1; }));
  fixture.on_io([] {});  // the on_connected callback has finished
  ASSERT_EQ(results.size(), 6u);
  // A 250-byte text encodes to about 300 bytes: three fit in 1000, the fourth does not.
  EXPECT_FALSE(results[0]);
  EXPECT_FALSE(results[1]);
  EXPECT_FALSE(results[2]);
  EXPECT_EQ(results[3], link_send_errc::queue_full);
  EXPECT_EQ(results[4], link_send_errc::queue_full);
  EXPECT_EQ(results[5], link_send_errc::frame_too_large);
  fixture.on_io([&] { fixture.client().stop(); });
  const auto down = fixture.on_io([&] { return fixture.client().send(link::heartbeat{}); });
  ASSERT_FALSE(down);
  EXPECT_EQ(down.error().code, link_send_errc::not_connected);
}

/// Collects every message the client sends: its size and its frame.
struct recorded_messages {
  journal notes;
  std::vector<std::size_t> sizes;
  std::vector<link::frame> frames;

  /// Frames received, a batch counting as its deltas. Call under notes.
  std::size_t items() const {
    std::size_t n = 0;
    for (const auto& f : frames) n += std::holds_alternative<link::deltas>(f) ? std::get<link::deltas>(f).items.size() : 1;
    return n;
  }

  /// The deltas and other frames in the order sent, batches taken apart.
  std::vector<link::frame> flattened() {
    return notes.read([&] {
      std::vector<link::frame> out;
      for (const auto& f : frames) {
        if (const auto* batch = std::get_if<link::deltas>(&f)) {
          for (const auto& item : batch->items) out.emplace_back(item);
        } else {
          out.push_back(f);
        }
      }
      return out;
    });
  }
};

test_ws_server::session record_into(recorded_messages& record) {
  return [&record](tcp::socket socket, int) -> asio::awaitable<void> {
    websocket::stream<tcp::socket> ws(std::move(socket));
    co_await accept(ws);
    beast::flat_buffer buffer;
    for (;;) {
      co_await ws.async_read(buffer, asio::use_awaitable);
      const auto data = buffer.cdata();
      auto decoded = link::decode({static_cast<const std::uint8_t*>(data.data()), data.size()}, {});
      const std::size_t size = data.size();
      buffer.consume(buffer.size());
      record.notes.update([&] {
        record.sizes.push_back(size);
        if (decoded) record.frames.push_back(std::move(*decoded));
      });
    }
  };
}

/// Connects with `limits` to a server recording every message, turns batching on and sends
/// `frames` from the on_connected callback (those at `firsts` as jobs' first deltas, with
/// send_first), so that all but the first are sent while a write is in flight; returns once the
/// server has them all and the client's queue has drained.
void send_while_writing(recorded_messages& record, const link::codec_limits& limits,
                        const std::vector<link::frame>& frames, const std::set<std::size_t>& firsts = {}) {
  test_ws_server server(record_into(record));
  client_fixture fixture;
  auto options = options_for(server.url());
  options.limits = limits;
  fixture.start(options, [&](link_client& client) {
    client.batch_deltas(true);
    for (std::size_t i = 0; i < frames.size(); ++i) {
      if (firsts.contains(i)) {
        ASSERT_TRUE(client.send_first(std::get<link::delta>(frames[i])));
      } else {
        ASSERT_TRUE(client.send(frames[i]));
      }
    }
  });
  ASSERT_TRUE(fixture.notes.wait_until([&] { return fixture.connects == 1; }));
  fixture.on_io([] {});  // the on_connected callback, which sent them all, has finished
  ASSERT_TRUE(record.notes.wait_until([&] { return record.items() == frames.size(); }));
  // The last write's completion may run after the server has read it: the queue drains then.
  const auto drained_by = std::chrono::steady_clock::now() + wait_deadline;
  std::size_t queued = 0;
  while ((queued = fixture.on_io([&] { return fixture.client().queued_bytes(); })) != 0 &&
         std::chrono::steady_clock::now() < drained_by) {
    std::this_thread::yield();
  }
  EXPECT_EQ(queued, 0u);
}

TEST(link_client, deltas_sent_during_a_write_go_out_together_in_order) {
  std::vector<link::frame> sent;
  for (int i = 0; i < 100; ++i) sent.emplace_back(link::delta{.job_id = "j" + std::to_string(i % 3), .text = "t" + std::to_string(i)});
  sent.emplace_back(link::done{.job_id = "j0", .finish_reason = "stop"});
  for (int i = 100; i < 150; ++i) sent.emplace_back(link::delta{.job_id = "j1", .text = "t" + std::to_string(i)});
  recorded_messages record;
  ASSERT_NO_FATAL_FAILURE(send_while_writing(record, {}, sent));
  // The first delta as itself (nothing was in flight), the 99 held behind it as one batch, closed
  // by the done frame that follows them, and the 50 after it as one more batch.
  ASSERT_EQ(record.frames.size(), 4u);
  EXPECT_EQ(link::frame_name(record.frames[0]), "delta");
  EXPECT_EQ(link::frame_name(record.frames[1]), "deltas");
  EXPECT_EQ(std::get<link::deltas>(record.frames[1]).items.size(), 99u);
  EXPECT_EQ(link::frame_name(record.frames[2]), "done");
  EXPECT_EQ(std::get<link::deltas>(record.frames[3]).items.size(), 50u);
  EXPECT_EQ(record.flattened(), sent);
}

TEST(link_client, a_jobs_first_delta_goes_ahead_of_the_later_deltas_held_with_it) {
  const std::vector<link::frame> sent = {
      link::delta{.job_id = "a", .text = "a0"},     // written at once
      link::delta{.job_id = "a", .text = "a1"},     // held
      link::delta{.job_id = "b", .text = "b0"},     // b's first: ahead of a1
      link::delta{.job_id = "a", .text = "a2"},     // held, after a1
      link::delta{.job_id = "c", .text = "c0"},     // c's first: ahead of a1, after b0
      link::delta{.job_id = "b", .text = "b1"},     // held, last
      link::done{.job_id = "a", .finish_reason = "stop"},  // after everything held
  };
  recorded_messages record;
  ASSERT_NO_FATAL_FAILURE(send_while_writing(record, {}, sent, {2, 4}));
  const std::vector<link::frame> expected = {sent[0], sent[2], sent[4], sent[1], sent[3], sent[5], sent[6]};
  EXPECT_EQ(record.flattened(), expected);
  ASSERT_EQ(record.frames.size(), 3u);
  EXPECT_EQ(std::get<link::deltas>(record.frames[1]).items.size(), 5u);
}

TEST(link_client, a_batch_never_exceeds_the_frame_limit_or_the_batch_limit) {
  link::codec_limits limits;
  limits.frame_bytes_max = 4096;
  limits.batch_deltas_max = 5;
  std::vector<link::frame> sent;
  for (int i = 0; i < 40; ++i) {
    const std::size_t text_bytes = i < 20 ? 900 : 10;  // big ones split by bytes, small ones by count
    sent.emplace_back(link::delta{.job_id = "job", .text = std::string(text_bytes, static_cast<char>('a' + i % 26))});
  }
  recorded_messages record;
  ASSERT_NO_FATAL_FAILURE(send_while_writing(record, limits, sent));
  EXPECT_EQ(record.flattened(), sent);
  for (std::size_t i = 0; i < record.sizes.size(); ++i) EXPECT_LE(record.sizes[i], 4096u) << "message " << i;
  for (const auto& f : record.frames) {
    if (const auto* batch = std::get_if<link::deltas>(&f)) {
      EXPECT_LE(batch->items.size(), 5u);
    }
  }
  EXPECT_GT(record.frames.size(), 8u);   // 39 held deltas cannot go in fewer than 8 batches of 5
  EXPECT_LT(record.frames.size(), 40u);  // but they were batched
}

TEST(link_client, a_delta_too_big_to_hold_in_a_batch_goes_after_those_held) {
  link::codec_limits limits;
  limits.frame_bytes_max = 4096;
  const std::vector<link::frame> sent = {
      link::delta{.job_id = "j", .text = "first"},                 // written at once
      link::delta{.job_id = "j", .text = "held"},                  // held behind it
      link::delta{.job_id = "j", .text = std::string(3900, 'x')},  // fits a frame, not a batch
      link::delta{.job_id = "j", .text = "last"},
  };
  recorded_messages record;
  ASSERT_NO_FATAL_FAILURE(send_while_writing(record, limits, sent));
  EXPECT_EQ(record.flattened(), sent);
}

TEST(link_client, a_coordinator_that_answers_no_ping_counts_as_lost_after_the_idle_timeout) {
  // The server completes the upgrade and then reads nothing more: it answers no ping.
  test_ws_server server([&](tcp::socket socket, int) -> asio::awaitable<void> {
    websocket::stream<tcp::socket> ws(std::move(socket));
    co_await accept(ws);
    asio::steady_timer forever(ws.get_executor());
    forever.expires_after(std::chrono::hours(1));
    co_await forever.async_wait(asio::use_awaitable);
  });
  client_fixture fixture;
  auto options = options_for(server.url());
  options.idle_timeout = 400ms;
  const auto started = std::chrono::steady_clock::now();
  fixture.start(options);
  ASSERT_TRUE(fixture.notes.wait_until([&] { return !fixture.disconnects.empty(); }));
  const auto lost = fixture.notes.read([&] { return fixture.disconnects.front(); });
  EXPECT_GE(std::chrono::steady_clock::now() - started, options.idle_timeout);
  EXPECT_TRUE(lost.was_connected);
  EXPECT_EQ(lost.kind, link_disconnect_kind::connection_lost);
  EXPECT_NE(lost.message.find("nothing received from the coordinator for 400 ms"), std::string::npos) << lost.message;
}

TEST(link_client, drop_closes_with_the_given_code_and_reconnects) {
  journal server_notes;
  std::vector<std::uint16_t> close_codes;
  test_ws_server server([&](tcp::socket socket, int) -> asio::awaitable<void> {
    websocket::stream<tcp::socket> ws(std::move(socket));
    co_await accept(ws);
    const auto code = co_await read_until_closed(ws);
    server_notes.update([&] { close_codes.push_back(code); });
  });
  client_fixture fixture;
  fixture.start(options_for(server.url()));
  ASSERT_TRUE(fixture.notes.wait_until([&] { return fixture.connects == 1; }));
  fixture.on_io([&] { fixture.client().drop(1008, "send queue full"); });
  ASSERT_TRUE(fixture.notes.wait_until([&] { return fixture.connects == 2; }));
  ASSERT_TRUE(server_notes.wait_until([&] { return close_codes.size() == 1; }));
  EXPECT_EQ(close_codes[0], 1008);
  const auto d = fixture.notes.read([&] { return fixture.disconnects.front(); });
  EXPECT_EQ(d.kind, link_disconnect_kind::dropped);
  EXPECT_EQ(d.message, "send queue full");
}

TEST(link_client, a_drop_while_a_frame_is_being_written_sends_that_frame_whole_then_closes) {
  // The frame is larger than the loopback socket's buffers and the server reads nothing until the
  // client has dropped the link: the write is in flight when the drop comes.
  const std::string text(8 * 1024 * 1024, 'x');
  link::codec_limits limits;
  limits.frame_bytes_max = limits.text_bytes_max = 2 * text.size();
  journal server_notes;
  bool dropped = false;
  std::optional<link::frame> received;
  std::uint16_t close_code = 0;
  test_ws_server server([&](tcp::socket socket, int n) -> asio::awaitable<void> {
    if (n > 0) co_return;  // the reconnect
    websocket::stream<tcp::socket> ws(std::move(socket));
    ws.read_message_max(limits.frame_bytes_max);
    co_await accept(ws);
    // Blocks this server's only thread, on purpose: nothing is read until the drop.
    if (!server_notes.wait_until([&] { return dropped; })) co_return;
    beast::flat_buffer buffer;
    co_await ws.async_read(buffer, asio::use_awaitable);
    const auto data = buffer.cdata();
    auto decoded = link::decode({static_cast<const std::uint8_t*>(data.data()), data.size()}, limits);
    buffer.consume(buffer.size());
    const auto code = co_await read_until_closed(ws);
    server_notes.update([&] {
      if (decoded) received = std::move(*decoded);
      close_code = code;
    });
  });
  client_fixture fixture;
  auto options = options_for(server.url());
  options.limits = limits;
  options.send_queue_bytes_max = 4 * text.size();
  fixture.start(options, [&](link_client& client) {
    if (dropped) return;
    ASSERT_TRUE(client.send(link::delta{.job_id = "j", .text = text}));
    ASSERT_TRUE(client.send(link::heartbeat{}));  // queued behind it: dropped with the link
    client.drop(1008, "send queue full");
    server_notes.update([&] { dropped = true; });
  });
  ASSERT_TRUE(server_notes.wait_until([&] { return close_code != 0; }));
  const auto [frame, code] = server_notes.read([&] { return std::pair(received, close_code); });
  EXPECT_EQ(code, 1008);
  ASSERT_TRUE(frame.has_value()) << "the frame in flight arrived damaged";
  ASSERT_TRUE(std::holds_alternative<link::delta>(*frame)) << link::frame_name(*frame);
  EXPECT_TRUE(std::get<link::delta>(*frame).text == text) << "the frame in flight changed under the write";
}

TEST(link_client, nobody_listening_is_a_connect_failure_retried_with_growing_waits) {
  std::string url;
  {
    asio::io_context io;
    tcp::acceptor probe(io, {asio::ip::make_address("127.0.0.1"), 0});
    url = "ws://127.0.0.1:" + std::to_string(probe.local_endpoint().port()) + "/v1/providers/link";
  }  // closed: the port now refuses connections
  client_fixture fixture;
  auto options = options_for(url);
  options.backoff.delay_max = 1000ms;
  fixture.start(options);
  ASSERT_TRUE(fixture.notes.wait_until([&] { return fixture.disconnects.size() >= 3; }));
  const auto disconnects = fixture.notes.read([&] { return fixture.disconnects; });
  for (const auto& d : disconnects) {
    EXPECT_EQ(d.kind, link_disconnect_kind::connect_failed);
    EXPECT_FALSE(d.was_connected);
    EXPECT_NE(d.message.find("127.0.0.1"), std::string::npos) << d.message;
  }
  // Jitter takes at most half: wait n lies in [20·2^n / 2, 20·2^n] ms.
  for (std::size_t n = 0; n < 3; ++n) {
    const auto full = 20ms * (1 << n);
    EXPECT_GE(disconnects[n].retry_in, full / 2) << n;
    EXPECT_LE(disconnects[n].retry_in, full) << n;
  }
}

// --- pure parts ---------------------------------------------------------------------------------

TEST(backoff_delay, grows_by_the_factor_and_stops_at_the_cap) {
  const backoff_options options{.jitter_fraction = 0.0};
  std::mt19937_64 rng(1);
  const std::vector<long> expected_ms = {250, 500, 1000, 2000, 4000, 8000, 16000, 30000, 30000};
  for (std::uint32_t attempt = 0; attempt < expected_ms.size(); ++attempt) {
    EXPECT_EQ(backoff_delay(options, attempt, rng).count(), expected_ms[attempt]) << attempt;
  }
  EXPECT_EQ(backoff_delay(options, 64, rng), 30s);
  EXPECT_EQ(backoff_delay(options, 100'000, rng), 30s) << "no overflow for a long outage";
}

TEST(backoff_delay, jitter_stays_within_its_share_and_varies) {
  std::uint64_t seed = std::random_device{}();
  if (const char* fixed = std::getenv("GPUSTREAM_TEST_SEED")) seed = std::strtoull(fixed, nullptr, 10);
  std::printf("backoff_delay seed: %llu (set GPUSTREAM_TEST_SEED to replay)\n",
              static_cast<unsigned long long>(seed));
  std::mt19937_64 rng(seed);
  const backoff_options options;  // defaults: 250 ms, ×2, 30 s, half of it random
  for (std::uint32_t attempt = 0; attempt < 40; ++attempt) {
    const double full = std::min(250.0 * std::pow(2.0, attempt), 30'000.0);
    std::vector<long> draws;
    for (int i = 0; i < 200; ++i) {
      const auto delay = backoff_delay(options, attempt, rng).count();
      ASSERT_GE(delay, static_cast<long>(full / 2) - 1) << "seed " << seed << " attempt " << attempt;
      ASSERT_LE(delay, static_cast<long>(full) + 1) << "seed " << seed << " attempt " << attempt;
      draws.push_back(delay);
    }
    const auto [low, high] = std::minmax_element(draws.begin(), draws.end());
    EXPECT_GT(*high - *low, static_cast<long>(full / 10)) << "seed " << seed << " attempt " << attempt;
  }
}

TEST(backoff_delay, the_same_seed_gives_the_same_waits) {
  std::mt19937_64 first(42);
  std::mt19937_64 second(42);
  for (std::uint32_t attempt = 0; attempt < 20; ++attempt) {
    EXPECT_EQ(backoff_delay({}, attempt, first), backoff_delay({}, attempt, second));
  }
}

TEST(parse_ws_url, accepts_hosts_ports_and_paths) {
  auto url = parse_ws_url("ws://127.0.0.1:8080/v1/providers/link");
  ASSERT_TRUE(url) << url.error();
  EXPECT_EQ(url->host, "127.0.0.1");
  EXPECT_EQ(url->port, 8080);
  EXPECT_EQ(url->target, "/v1/providers/link");

  url = parse_ws_url("WS://example.org");
  ASSERT_TRUE(url) << url.error();
  EXPECT_EQ(url->host, "example.org");
  EXPECT_EQ(url->port, 80);
  EXPECT_EQ(url->target, "/");

  url = parse_ws_url("ws://[::1]:9000?x=1");
  ASSERT_TRUE(url) << url.error();
  EXPECT_EQ(url->host, "::1");
  EXPECT_EQ(url->port, 9000);
  EXPECT_EQ(url->target, "/?x=1");
}

TEST(parse_ws_url, refuses_what_it_cannot_use) {
  for (const char* bad : {"http://h:1/", "ws://", "ws://:80/", "ws://h:0/", "ws://h:65536/",
                          "ws://h:8x/", "ws://h:/", "ws://user:pw@h/", "ws://[::1/", "h:80", "ws://fe80::1/",
                          "ws://::1", "ws://::1:8080/"}) {
    const auto url = parse_ws_url(bad);
    EXPECT_FALSE(url) << bad;
    if (!url) {
      EXPECT_FALSE(url.error().empty());
    }
  }
  const auto unbracketed = parse_ws_url("ws://fe80::1/");
  ASSERT_FALSE(unbracketed);
  EXPECT_NE(unbracketed.error().find("brackets"), std::string::npos) << unbracketed.error();
  const auto tls = parse_ws_url("wss://h/");
  ASSERT_FALSE(tls);
  EXPECT_NE(tls.error().find("wss://"), std::string::npos);
  // The message is logged: a key in the URL is not in it.
  for (const char* secret : {"ws://h:0/link?token=s3cret", "http://h/?token=s3cret", "ws://u:s3cret@h:x/"}) {
    const auto url = parse_ws_url(secret);
    ASSERT_FALSE(url) << secret;
    EXPECT_EQ(url.error().find("s3cret"), std::string::npos) << url.error();
  }
}

TEST(link_client, create_checks_its_options) {
  asio::io_context io;
  link_client_callbacks callbacks{.on_connected = [] {},
                                  .on_frame = [](link::frame) {},
                                  .on_disconnected = [](const link_disconnect&) {}};
  auto options = options_for("http://nope/");
  EXPECT_FALSE(link_client::create(io, options, callbacks));
  options = options_for("ws://127.0.0.1:1/");
  options.bearer_token.clear();
  const auto no_token = link_client::create(io, options, callbacks);
  ASSERT_FALSE(no_token);
  EXPECT_NE(no_token.error().find("token"), std::string::npos);
}

}  // namespace
}  // namespace gpustream::gateway
