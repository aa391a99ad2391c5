// The HTTP server's asynchronous side: answers given later from another thread, streamed
// (chunked) answers and their pieces sharing writes (held for stream_flush_interval after the
// first), a client going away noticed while an answer is pending, WebSocket upgrades refused or
// accepted, the WebSocket message limit, and WebSocket keep-alive: a quiet peer that answers
// pings stays, a silent one is dropped.
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <boost/asio/connect.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/websocket.hpp>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <future>
#include <mutex>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "gateway/http_server.hpp"

namespace gpustream::gateway {
namespace {

using namespace std::chrono_literals;

/// A raw client socket, closed on scope exit.
class client {
 public:
  explicit client(std::uint16_t port) : fd_(::socket(AF_INET, SOCK_STREAM, 0)) {
    sockaddr_in address{};
    address.sin_family = AF_INET;
    address.sin_port = htons(port);
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    connected_ = ::connect(fd_, reinterpret_cast<sockaddr*>(&address), sizeof address) == 0;
  }
  ~client() { close(); }
  void close() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }
  [[nodiscard]] bool connected() const { return connected_; }
  void send(const std::string& text) {
    ASSERT_EQ(::write(fd_, text.data(), text.size()), static_cast<ssize_t>(text.size()));
  }
  /// Reads until `needle` has arrived, the peer closes, or `wait_max` passes.
  std::string read_until(const std::string& needle, std::chrono::milliseconds wait_max) {
    const auto deadline = std::chrono::steady_clock::now() + wait_max;
    while (received_.find(needle) == std::string::npos) {
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
      if (left.count() <= 0) break;
      pollfd p{fd_, POLLIN, 0};
      if (::poll(&p, 1, static_cast<int>(left.count())) <= 0) break;
      char buffer[4096];
      const auto n = ::read(fd_, buffer, sizeof buffer);
      if (n <= 0) break;
      received_.append(buffer, static_cast<std::size_t>(n));
    }
    return received_;
  }

 private:
  int fd_;
  bool connected_ = false;
  std::string received_;
};

const std::string post = "POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n";

/// Something a test waits for, with a deadline that fails it rather than hanging.
class signal {
 public:
  void raise() {
    std::lock_guard lock(mutex_);
    raised_ = true;
    changed_.notify_all();
  }
  [[nodiscard]] bool wait(std::chrono::milliseconds wait_max) {
    std::unique_lock lock(mutex_);
    return changed_.wait_for(lock, wait_max, [&] { return raised_; });
  }

 private:
  std::mutex mutex_;
  std::condition_variable changed_;
  bool raised_ = false;
};

std::unique_ptr<http_server> start(http_handler handler, websocket_handler upgrade = {},
                                   http_server_options options = {}) {
  options.port = 0;
  auto server = http_server::start(options, std::move(handler), std::move(upgrade));
  EXPECT_TRUE(server.has_value()) << (server ? "" : server.error());
  return server ? std::move(server).value() : nullptr;
}

/// Sends `post` on `c` and returns the reply its handler handed to `pending`; none within 10 s.
std::shared_ptr<http_reply> reply_to_post(client& c, std::promise<std::shared_ptr<http_reply>>& pending) {
  c.send(post);
  auto future = pending.get_future();
  if (future.wait_for(10s) != std::future_status::ready) return nullptr;
  return future.get();
}

TEST(http_streaming, an_answer_sent_later_from_another_thread_arrives) {
  std::promise<std::shared_ptr<http_reply>> pending;
  auto server = start([&](http_request, std::shared_ptr<http_reply> reply) { pending.set_value(reply); });
  ASSERT_TRUE(server);
  client c(server->port());
  auto reply = reply_to_post(c, pending);
  ASSERT_TRUE(reply);
  std::thread([reply] { reply->send({201, "application/json", R"({"late":true})", {{"X-Extra", "1"}}}); })
      .join();
  const auto text = c.read_until(R"({"late":true})", 10s);
  EXPECT_NE(text.find("HTTP/1.1 201"), std::string::npos) << text;
  EXPECT_NE(text.find("X-Extra: 1"), std::string::npos) << text;
}

struct held_answer {
  std::unique_ptr<http_server> server;
  std::unique_ptr<client> c;
  std::shared_ptr<http_reply> reply;
};

held_answer hold_an_answer(http_server_options options) {
  held_answer held;
  auto pending = std::make_shared<std::promise<std::shared_ptr<http_reply>>>();
  held.server = start([pending](http_request, std::shared_ptr<http_reply> reply) { pending->set_value(reply); }, {},
                      options);
  if (!held.server) return held;
  held.c = std::make_unique<client>(held.server->port());
  held.c->send(post);
  auto future = pending->get_future();
  if (future.wait_for(10s) == std::future_status::ready) held.reply = future.get();
  return held;
}

TEST(http_streaming, a_streams_last_bytes_given_just_before_the_server_stops_go_out) {
  // A drain cuts an answer short and the node stops its server at once: the last chunk and the
  // stream's end, handed to the connection from another thread, must not be dropped with the I/O
  // threads' queue. Each round stops the server right after; without the wait for them, some
  // round loses its end.
  for (int round = 0; round < 20; ++round) {
    http_server_options options;
    options.threads = 1;
    auto held = hold_an_answer(options);
    ASSERT_TRUE(held.reply);
    held.reply->start_stream(200, "text/event-stream", {});
    held.reply->write("data: cut short\n\n");
    held.reply->finish();
    held.reply.reset();
    held.server.reset();
    const auto text = held.c->read_until("0\r\n\r\n", 10s);
    EXPECT_NE(text.find("data: cut short"), std::string::npos) << "round " << round << ": " << text;
    ASSERT_NE(text.find("0\r\n\r\n"), std::string::npos) << "round " << round << ": the stream's end was lost: " << text;
  }
}

TEST(http_streaming, a_stopping_server_waits_at_most_stop_writes_wait_max_for_a_client_that_reads_nothing) {
  http_server_options options;
  options.stop_writes_wait_max = 300ms;
  options.stream_buffer_bytes_max = 64 * 1024 * 1024;  // the answer below is no slow client's to drop
  auto held = hold_an_answer(options);
  ASSERT_TRUE(held.reply);
  held.reply->start_stream(200, "text/event-stream", {});
  // More than the sockets' buffers hold: the write stays under way while the client reads nothing.
  for (int i = 0; i < 32; ++i) held.reply->write(std::string(1024 * 1024, 'x'));
  held.reply->finish();
  held.reply.reset();
  const auto stopping_at = std::chrono::steady_clock::now();
  auto stopped = std::async(std::launch::async, [&] { held.server.reset(); });
  ASSERT_EQ(stopped.wait_for(10s), std::future_status::ready) << "the stop waited for the client for good";
  EXPECT_GE(std::chrono::steady_clock::now() - stopping_at, 300ms) << "the write under way was given its time";
}

TEST(http_streaming, a_stopping_server_takes_no_new_connection_or_request_while_it_waits_for_a_write) {
  // Its handler's parts (the node's relay, admin API) are stopped by then.
  http_server_options options;
  options.stop_writes_wait_max = 60s;  // until the client that reads nothing leaves, below
  options.stream_buffer_bytes_max = 64 * 1024 * 1024;
  auto pending = std::make_shared<std::promise<std::shared_ptr<http_reply>>>();
  auto first = std::make_shared<std::atomic<bool>>(true);
  auto server = start(
      [pending, first](http_request, std::shared_ptr<http_reply> reply) {
        if (first->exchange(false)) return pending->set_value(reply);
        reply->send({200, "text/plain", "served", {}});
      },
      {}, options);
  ASSERT_TRUE(server);
  const auto port = server->port();
  auto holder = std::make_unique<client>(port);
  holder->send(post);
  auto future = pending->get_future();
  ASSERT_EQ(future.wait_for(10s), std::future_status::ready);
  auto reply = future.get();
  reply->start_stream(200, "text/event-stream", {});
  for (int i = 0; i < 32; ++i) reply->write(std::string(1024 * 1024, 'x'));  // more than the sockets hold
  reply->finish();
  reply.reset();
  client kept(port);  // open before the stop, its next request after it
  kept.send(post);
  ASSERT_NE(kept.read_until("served", 10s).find("served"), std::string::npos);

  auto stopped = std::async(std::launch::async, [&] { server.reset(); });
  // New connections until one is not served: before the stop each is, at once.
  std::string answer = "served";
  const auto deadline = std::chrono::steady_clock::now() + 30s;
  while (answer.find("served") != std::string::npos && std::chrono::steady_clock::now() < deadline) {
    client late(port);
    late.send(post);
    answer = late.read_until("served", 1s);
  }
  EXPECT_EQ(answer.find("served"), std::string::npos) << "the stopping server went on serving new connections";
  EXPECT_TRUE(answer.empty() || answer.starts_with("HTTP/1.1 503 ")) << answer;
  kept.send(post);
  const auto refused = kept.read_until("stopping", 10s);
  EXPECT_NE(refused.find("HTTP/1.1 503 "), std::string::npos) << refused;
  EXPECT_NE(refused.find("the server is stopping"), std::string::npos) << refused;
  holder.reset();  // the write under way fails: the stop goes on
  ASSERT_EQ(stopped.wait_for(10s), std::future_status::ready);
}

TEST(http_streaming, a_streamed_answer_goes_out_in_chunks_and_the_connection_serves_the_next_request) {
  std::promise<std::shared_ptr<http_reply>> pending;
  int requests = 0;
  auto server = start([&](http_request, std::shared_ptr<http_reply> reply) {
    if (++requests == 1) return pending.set_value(reply);
    reply->send({200, "text/plain", "second", {}});
  });
  ASSERT_TRUE(server);
  client c(server->port());
  auto reply = reply_to_post(c, pending);
  ASSERT_TRUE(reply);
  reply->start_stream(200, "text/event-stream", {});
  reply->write("data: one\n\n");
  // The first piece arrives before the answer ends: the client sees tokens as they come.
  const auto first = c.read_until("data: one", 10s);
  EXPECT_NE(first.find("Transfer-Encoding: chunked"), std::string::npos) << first;
  EXPECT_NE(first.find("b\r\ndata: one\n\n\r\n"), std::string::npos) << first;
  reply->write("data: two\n\n");
  reply->finish();
  const auto all = c.read_until("0\r\n\r\n", 10s);
  EXPECT_NE(all.find("data: two"), std::string::npos) << all;
  c.send(post);
  EXPECT_NE(c.read_until("second", 10s).find("second"), std::string::npos);
}

TEST(http_streaming, a_streamed_answer_to_http_1_0_goes_unchunked_and_ends_with_the_connection) {
  std::promise<std::shared_ptr<http_reply>> pending;
  auto server = start([&](http_request, std::shared_ptr<http_reply> reply) { pending.set_value(reply); });
  ASSERT_TRUE(server);
  client c(server->port());
  c.send("POST /x HTTP/1.0\r\nContent-Length: 0\r\n\r\n");
  auto future = pending.get_future();
  ASSERT_EQ(future.wait_for(10s), std::future_status::ready);
  auto reply = future.get();
  reply->start_stream(200, "text/event-stream", {});
  reply->write("data: one\n\n");
  reply->write("data: two\n\n");
  reply->finish();
  const auto all = c.read_until("the connection's end", 10s);  // read until it closes
  EXPECT_EQ(all.find("Transfer-Encoding"), std::string::npos) << all;
  EXPECT_NE(all.find("Connection: close"), std::string::npos) << all;
  EXPECT_TRUE(all.ends_with("\r\n\r\ndata: one\n\ndata: two\n\n")) << all;
}

TEST(http_streaming, pieces_queued_before_the_connection_writes_go_out_in_one_write) {
  // The handler runs on the connection's strand, so the header block and every piece are queued
  // before the I/O queue writes any of them. The first piece is written at once, with the headers;
  // the other nine wait for the flush interval, and the end writes them at once, in one more write.
  constexpr int pieces = 10;
  auto server = start([&](http_request, std::shared_ptr<http_reply> reply) {
    reply->start_stream(200, "text/event-stream", {});
    for (int i = 0; i < pieces; ++i) reply->write("data: " + std::to_string(i) + "\n\n");
    reply->finish();
  });
  ASSERT_TRUE(server);
  const auto before = server->writes();
  client c(server->port());
  c.send(post);
  const auto text = c.read_until("0\r\n\r\n", 10s);
  for (int i = 0; i < pieces; ++i) {
    EXPECT_NE(text.find("data: " + std::to_string(i) + "\n\n"), std::string::npos) << i << "\n" << text;
  }
  EXPECT_LT(text.find("data: 0"), text.find("data: 9")) << "in order";
  EXPECT_EQ(server->writes() - before, 2u) << "one write for the headers and the first piece, one for the rest";
}

TEST(http_streaming, the_headers_and_a_first_piece_queued_with_them_share_one_write) {
  // Queued on the connection's strand together (as the relay does at an answer's first token),
  // the header block waits for the first piece, which is written at once and takes it along.
  http_server_options options;
  options.stream_flush_interval = 60s;  // nothing else is written until the end
  std::promise<std::shared_ptr<http_reply>> kept;
  auto server = start(
      [&](http_request, std::shared_ptr<http_reply> reply) {
        reply->start_stream(200, "text/event-stream", {});
        reply->write("data: one\n\n");
        kept.set_value(reply);
      },
      {}, options);
  ASSERT_TRUE(server);
  const auto before = server->writes();
  client c(server->port());
  c.send(post);
  ASSERT_NE(c.read_until("data: one", 10s).find("data: one"), std::string::npos);
  EXPECT_EQ(server->writes() - before, 1u) << "the headers and the first piece went out in separate writes";
  auto reply = kept.get_future().get();
  reply->finish();
  EXPECT_NE(c.read_until("0\r\n\r\n", 10s).find("0\r\n\r\n"), std::string::npos);
}

/// A server on one I/O thread whose first request's answer starts streaming (after `begin` ran on
/// it) and is kept; each later request's handler calls `from_other` with it on that I/O thread, as
/// a provider link's delta reaches a client, then answers "ok". The first client has the headers.
struct streaming_and_other {
  streaming_and_other(http_server_options options, std::function<void(http_reply&)> begin,
                      std::function<void(http_reply& streaming)> from_other) {
    options.threads = 1;  // the handlers run one after the other
    server = start(
        [this, begin = std::move(begin), from_other = std::move(from_other)](http_request, std::shared_ptr<http_reply> reply) {
          if (!streaming) {
            begin(*reply);
            reply->start_stream(200, "text/event-stream", {});
            streaming = reply;
            return;
          }
          from_other(*streaming);
          reply->send({200, "text/plain", "ok", {}});
        },
        {}, options);
    if (!server) return;
    first = std::make_unique<client>(server->port());
    first->send(post);
    started = first->read_until("text/event-stream", 10s).find("text/event-stream") != std::string::npos;
  }
  /// Sends the other request, whose handler calls from_other.
  void call_from_other() {
    other = std::make_unique<client>(server->port());
    other->send(post);
  }

  std::unique_ptr<http_server> server;
  std::shared_ptr<http_reply> streaming;  ///< set on the I/O thread before the headers go out
  std::unique_ptr<client> first;
  std::unique_ptr<client> other;
  bool started = false;
};

TEST(http_streaming, a_piece_written_from_an_io_thread_goes_out_before_write_returns) {
  // The write runs on the calling I/O thread at once, with no trip through the I/O queue: the
  // server's write count has moved before write() returns.
  std::promise<std::uint64_t> writes_inside;
  http_server* server = nullptr;
  streaming_and_other s({}, [](http_reply&) {}, [&](http_reply& streaming) {
    const auto before = server->writes();
    streaming.write("data: first\n\n");  // an answer's first piece is not held
    writes_inside.set_value(server->writes() - before);
  });
  ASSERT_TRUE(s.started);
  server = s.server.get();
  s.call_from_other();
  auto inside = writes_inside.get_future();
  ASSERT_EQ(inside.wait_for(10s), std::future_status::ready);
  EXPECT_EQ(inside.get(), 1u) << "the piece waited for the I/O queue";
  EXPECT_NE(s.first->read_until("data: first", 10s).find("data: first"), std::string::npos);
  s.streaming->finish();
  EXPECT_NE(s.first->read_until("0\r\n\r\n", 10s).find("0\r\n\r\n"), std::string::npos);
}

TEST(http_streaming, a_client_dropped_by_a_write_is_reported_after_the_write_returns) {
  // A write that finds the client gone (here: more held than stream_buffer_bytes_max) may run at
  // once on the caller's thread; the close callback must not run inside it, where the caller may
  // hold a lock the callback takes (the relay's job lock).
  http_server_options options;
  options.stream_buffer_bytes_max = 1024;
  options.stream_flush_interval = 60s;  // pieces after the first are held, so the buffer fills
  std::promise<bool> callback_inside_write;
  bool in_write = false;  // only touched on the server's one I/O thread
  streaming_and_other s(
      options, [&](http_reply& reply) { reply.on_close([&] { callback_inside_write.set_value(in_write); }); },
      [&](http_reply& streaming) {
        in_write = true;
        streaming.write("data: first\n\n");
        streaming.write(std::string(2048, 'x'));
        in_write = false;
      });
  ASSERT_TRUE(s.started);
  s.call_from_other();
  auto reported = callback_inside_write.get_future();
  ASSERT_EQ(reported.wait_for(10s), std::future_status::ready) << "the client's drop was not reported";
  EXPECT_FALSE(reported.get()) << "the close callback ran inside write()";
}

TEST(http_streaming, a_handler_that_throws_after_answering_does_not_answer_the_next_request) {
  // A streamed answer given inside the handler is complete before the handler returns; the 500
  // for the handler's exception then belongs to nobody, and the next request gets its own answer.
  std::atomic<int> requests{0};
  auto server = start([&](http_request, std::shared_ptr<http_reply> reply) {
    if (requests++ == 0) {
      reply->start_stream(200, "text/event-stream", {});
      reply->write("data: one\n\n");
      reply->finish();
      throw std::runtime_error("a handler bug after its answer");
    }
    reply->send({200, "text/plain", "second", {}});
  });
  ASSERT_TRUE(server);
  client c(server->port());
  c.send(post);
  ASSERT_NE(c.read_until("0\r\n\r\n", 10s).find("0\r\n\r\n"), std::string::npos);
  c.send(post);
  const auto text = c.read_until("second", 10s);
  EXPECT_NE(text.find("second"), std::string::npos) << text;
  EXPECT_EQ(text.find("500"), std::string::npos) << "a 500 went out for a request already answered:\n" << text;
}

TEST(http_streaming, a_call_from_another_thread_is_not_overtaken_by_a_later_one_from_the_io_thread) {
  // The relay starts a stream from an actor thread (the job was accepted) and may write its first
  // token from the connection's own I/O thread (the link's delta) before the start has run there:
  // the piece must still follow the headers, not be dropped as written before the stream began.
  http_server_options options;
  options.threads = 1;
  std::unique_ptr<http_server> server;  // declared first, destroyed last: replies must go before it
  std::shared_ptr<http_reply> held;     // only touched on the server's one I/O thread
  std::promise<void> holding;
  server = start(
      [&](http_request, std::shared_ptr<http_reply> reply) {
        if (!held) {
          held = reply;
          holding.set_value();
          return;
        }
        // Queued for the I/O thread, which is busy here until this handler returns.
        std::thread([&] { held->start_stream(200, "text/event-stream", {}); }).join();
        held->write("data: first\n\n");
        reply->send({200, "text/plain", "ok", {}});
      },
      {}, options);
  ASSERT_TRUE(server);
  client first(server->port());
  first.send(post);
  ASSERT_EQ(holding.get_future().wait_for(10s), std::future_status::ready);
  client other(server->port());
  other.send(post);
  const auto text = first.read_until("data: first", 10s);
  EXPECT_NE(text.find("text/event-stream"), std::string::npos) << text;
  EXPECT_NE(text.find("data: first"), std::string::npos) << "the piece written after the start was lost:\n" << text;
}

/// Starts a server whose first request's reply is handed to the test; the client has sent it.
/// Starts the held answer's stream and writes its first piece; true once the client has it.
bool first_piece_arrives(held_answer& held) {
  held.reply->start_stream(200, "text/event-stream", {});
  held.reply->write("data: one\n\n");
  return held.c->read_until("data: one", 10s).find("data: one") != std::string::npos;
}

TEST(http_streaming, later_pieces_wait_for_stream_flush_interval_and_go_out_together) {
  http_server_options options;
  options.stream_flush_interval = 1s;
  auto held = hold_an_answer(options);
  ASSERT_TRUE(held.reply);
  // The first piece is not held (finishing_an_answer_writes_its_held_pieces_at_once shows it
  // under a 60 s interval, with no wall-clock bound).
  const auto started = std::chrono::steady_clock::now();
  ASSERT_TRUE(first_piece_arrives(held));
  const auto writes_before = held.server->writes();
  held.reply->write("data: two\n\n");
  held.reply->write("data: three\n\n");
  const auto text = held.c->read_until("data: three", 10s);
  ASSERT_NE(text.find("data: two\n\n\r\nd\r\ndata: three"), std::string::npos) << text;
  EXPECT_GE(std::chrono::steady_clock::now() - started, 900ms) << "a later piece did not wait";
  EXPECT_EQ(held.server->writes() - writes_before, 1u) << "the held pieces share one write";
}

TEST(http_streaming, the_pieces_held_by_several_answers_go_out_on_one_tick) {
  // One flush clock serves every connection: each answer's held pieces go out when it ticks,
  // in one write per answer.
  http_server_options options;
  options.stream_flush_interval = 1s;
  std::unique_ptr<http_server> server;  // declared first, destroyed last: replies must go before it
  std::mutex mutex;
  std::vector<std::shared_ptr<http_reply>> replies;
  std::promise<void> both;
  server = start(
      [&](http_request, std::shared_ptr<http_reply> reply) {
        std::lock_guard lock(mutex);
        replies.push_back(reply);
        if (replies.size() == 2) both.set_value();
      },
      {}, options);
  ASSERT_TRUE(server);
  client a(server->port());
  client b(server->port());
  a.send(post);
  b.send(post);
  ASSERT_EQ(both.get_future().wait_for(10s), std::future_status::ready);
  for (auto& reply : replies) {
    reply->start_stream(200, "text/event-stream", {});
    reply->write("data: one\n\n");
  }
  ASSERT_NE(a.read_until("data: one", 10s).find("data: one"), std::string::npos);
  ASSERT_NE(b.read_until("data: one", 10s).find("data: one"), std::string::npos);
  const auto held_at = std::chrono::steady_clock::now();
  const auto writes_before = server->writes();
  for (auto& reply : replies) {
    reply->write("data: two\n\n");
    reply->write("data: three\n\n");
  }
  EXPECT_NE(a.read_until("data: three", 10s).find("data: two\n\n\r\nd\r\ndata: three"), std::string::npos);
  EXPECT_NE(b.read_until("data: three", 10s).find("data: two\n\n\r\nd\r\ndata: three"), std::string::npos);
  EXPECT_GE(std::chrono::steady_clock::now() - held_at, 900ms) << "the held pieces did not wait for the tick";
  EXPECT_EQ(server->writes() - writes_before, 2u) << "one write per answer";
}

TEST(http_streaming, finishing_an_answer_writes_its_held_pieces_at_once) {
  http_server_options options;
  options.stream_flush_interval = 60s;
  auto held = hold_an_answer(options);
  ASSERT_TRUE(held.reply);
  ASSERT_TRUE(first_piece_arrives(held));
  held.reply->write("data: two\n\n");
  held.reply->finish();
  // Within 10 s, not after the 60 s interval.
  const auto text = held.c->read_until("0\r\n\r\n", 10s);
  EXPECT_NE(text.find("data: two\n\n\r\n0\r\n\r\n"), std::string::npos) << text;
}

TEST(http_streaming, a_client_that_goes_away_while_its_answer_is_pending_is_noticed_at_once) {
  signal closed;
  std::promise<std::shared_ptr<http_reply>> pending;
  auto server = start([&](http_request, std::shared_ptr<http_reply> reply) {
    reply->on_close([&] { closed.raise(); });
    reply->start_stream(200, "text/event-stream", {});
    pending.set_value(reply);
  });
  ASSERT_TRUE(server);
  client c(server->port());
  c.send(post);
  auto future = pending.get_future();
  ASSERT_EQ(future.wait_for(10s), std::future_status::ready);
  (void)c.read_until("\r\n\r\n", 10s);
  c.close();
  // Noticed by the read that watches the socket: nothing is written before this wait ends, and
  // no timeout runs while a handler holds the answer.
  ASSERT_TRUE(closed.wait(10s)) << "the handler was never told";
  future.get()->write("data: late\n\n");  // ignored: nobody to write to
}

TEST(http_streaming, a_client_that_pipelined_more_than_a_header_and_went_away_is_noticed) {
  signal closed;
  std::promise<std::shared_ptr<http_reply>> pending;
  auto server = start([&](http_request, std::shared_ptr<http_reply> reply) {
    reply->on_close([&] { closed.raise(); });
    pending.set_value(reply);  // no answer yet: a non-streamed one still being made
  });
  ASSERT_TRUE(server);
  client c(server->port());
  // The request, then bytes of a next one past header_bytes_max (16 KiB), then the client leaves.
  c.send(post + "POST /next HTTP/1.1\r\nHost: x\r\nContent-Length: 30000\r\n\r\n" + std::string(20 * 1024, 'x'));
  auto future = pending.get_future();
  ASSERT_EQ(future.wait_for(10s), std::future_status::ready);
  c.close();
  ASSERT_TRUE(closed.wait(10s)) << "the handler was never told: its upstream work would go on";
}

/// A client that sends `post` on a socket with a small receive buffer, then reads the answer at
/// its own pace (or never), keeping only the bytes' count and the last few, where a chunked
/// answer's end shows.
class raw_reader {
 public:
  raw_reader() = default;
  raw_reader(const raw_reader&) = delete;
  raw_reader& operator=(const raw_reader&) = delete;
  ~raw_reader() { close(); }

  void open(std::uint16_t port, int receive_buffer_bytes) {
    fd_ = ::socket(AF_INET, SOCK_STREAM, 0);
    ASSERT_GE(fd_, 0);
    ASSERT_EQ(::setsockopt(fd_, SOL_SOCKET, SO_RCVBUF, &receive_buffer_bytes, sizeof receive_buffer_bytes), 0);
    const timeval read_wait{.tv_sec = 10, .tv_usec = 0};  // a stuck server fails the test, not hangs it
    ASSERT_EQ(::setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &read_wait, sizeof read_wait), 0);
    sockaddr_in address{};
    address.sin_family = AF_INET;
    address.sin_port = htons(port);
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ASSERT_EQ(::connect(fd_, reinterpret_cast<sockaddr*>(&address), sizeof address), 0);
    ASSERT_EQ(::write(fd_, post.data(), post.size()), static_cast<ssize_t>(post.size()));
  }

  /// Reads until `done()` holds or the connection ends, pausing `pause` after each read.
  template <class Done>
  void read_until(Done done, std::chrono::milliseconds pause = 0ms) {
    std::vector<char> chunk(64 * 1024);
    while (!done()) {
      const ssize_t n = ::recv(fd_, chunk.data(), chunk.size(), 0);
      if (n <= 0) return;
      received_ += static_cast<std::size_t>(n);
      tail_ += std::string_view(chunk.data(), static_cast<std::size_t>(n));
      tail_.erase(0, tail_.size() > 16 ? tail_.size() - 16 : 0);
      if (pause.count() > 0) std::this_thread::sleep_for(pause);
    }
  }
  /// Reads the whole answer: until its last chunk, or the connection's end.
  void read_answer(std::chrono::milliseconds pause = 0ms) {
    read_until([&] { return answer_complete(); }, pause);
  }

  [[nodiscard]] bool answer_complete() const { return tail_.ends_with("\r\n0\r\n\r\n"); }
  [[nodiscard]] std::size_t received() const { return received_; }
  void close() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

 private:
  int fd_ = -1;
  std::size_t received_ = 0;
  std::string tail_;
};

TEST(http_streaming, a_client_that_stops_reading_is_closed_after_the_idle_timeout) {
  http_server_options options;
  options.idle_timeout = 1s;
  options.stream_buffer_bytes_max = 64u << 20;  // so that only the write's deadline can end it
  signal closed;
  auto server = start(
      [&](http_request, std::shared_ptr<http_reply> reply) {
        reply->on_close([&] { closed.raise(); });
        reply->start_stream(200, "text/event-stream", {});
        // Far more than the kernel's socket buffers hold (a few MiB at most).
        for (int i = 0; i < 3000; ++i) reply->write(std::string(8000, 'x'));
        reply->finish();
      },
      {}, options);
  ASSERT_TRUE(server);
  // A client with a small receive buffer that sends its request and then never reads.
  const auto sent_at = std::chrono::steady_clock::now();
  raw_reader reader;
  ASSERT_NO_FATAL_FAILURE(reader.open(server->port(), 4096));
  const bool dropped = closed.wait(20s);
  const auto waited = std::chrono::steady_clock::now() - sent_at;
  reader.close();
  ASSERT_TRUE(dropped) << "a client that never reads held its connection for 20 s";
  EXPECT_GE(waited, options.idle_timeout) << "closed before its write's deadline";
}

TEST(http_streaming, a_slow_client_that_keeps_reading_is_not_cut_by_the_write_deadline) {
  http_server_options options;
  options.idle_timeout = 1s;
  options.stream_buffer_bytes_max = 64u << 20;
  constexpr int pieces = 4000;
  constexpr std::size_t piece_bytes = 8000;
  auto server = start(
      [&](http_request, std::shared_ptr<http_reply> reply) {
        reply->start_stream(200, "text/event-stream", {});
        // 32 MB, written at once: far more than the kernel's socket buffers hold, so one write
        // of the rest lasts as long as the client takes to read it.
        for (int i = 0; i < pieces; ++i) reply->write(std::string(piece_bytes, 'x'));
        reply->finish();
      },
      {}, options);
  ASSERT_TRUE(server);
  raw_reader reader;
  ASSERT_NO_FATAL_FAILURE(reader.open(server->port(), 64 * 1024));
  // Reads 64 KiB at a time with a pause of 5 ms after each (at most about 13 MB/s): the answer
  // takes well over idle_timeout to read, while no pause comes near it.
  const auto started = std::chrono::steady_clock::now();
  reader.read_answer(5ms);
  const auto took = std::chrono::steady_clock::now() - started;
  EXPECT_TRUE(reader.answer_complete()) << "cut after " << reader.received() << " bytes";
  EXPECT_GE(reader.received(), pieces * piece_bytes);
  EXPECT_GT(took, options.idle_timeout) << "the answer was read faster than the deadline: the test proves nothing";
}

TEST(http_streaming, the_stream_buffer_limit_counts_only_what_the_client_has_not_taken) {
  constexpr std::size_t mib = 1u << 20;
  constexpr std::size_t piece_bytes = 8000;
  http_server_options options;
  options.stream_buffer_bytes_max = 12 * mib;
  std::promise<std::shared_ptr<http_reply>> answering;
  auto server = start(
      [&](http_request, std::shared_ptr<http_reply> reply) {
        reply->start_stream(200, "text/event-stream", {});
        // 11 MiB at once: the socket takes at most its buffer (4 MiB here), and one write of the
        // rest (at least 6.8 MiB) lasts while the client reads.
        for (std::size_t sent = 0; sent < 11 * mib; sent += piece_bytes) reply->write(std::string(piece_bytes, 'a'));
        answering.set_value(reply);
      },
      {}, options);
  ASSERT_TRUE(server);
  raw_reader reader;
  ASSERT_NO_FATAL_FAILURE(reader.open(server->port(), 64 * 1024));
  reader.read_until([&] { return reader.received() >= 6 * mib; });
  auto reply = answering.get_future().get();
  // 6 MiB more while the write of the first part is still under way: the client has taken at
  // least 6 MiB of it, so at most 5 MiB of it wait besides these 6, under the 12 MiB limit (the
  // first part's whole write and these 6 MiB would be over it).
  for (std::size_t sent = 0; sent < 6 * mib; sent += piece_bytes) reply->write(std::string(piece_bytes, 'b'));
  reply->finish();
  reader.read_answer();
  reply.reset();
  EXPECT_TRUE(reader.answer_complete()) << "cut after " << reader.received() << " bytes";
  EXPECT_GE(reader.received(), 17 * mib);
}

TEST(http_streaming, a_refused_upgrade_gets_the_handlers_answer) {
  auto server = start([](http_request, std::shared_ptr<http_reply> reply) { reply->send({200, "text/plain", "", {}}); },
                      [](const http_request&) -> websocket_decision {
                        return http_response{401, "application/json", R"({"error":"no"})", {}};
                      });
  ASSERT_TRUE(server);
  client c(server->port());
  c.send("GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
         "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n");
  const auto text = c.read_until(R"({"error":"no"})", 10s);
  EXPECT_NE(text.find("HTTP/1.1 401"), std::string::npos) << text;
}

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace websocket = beast::websocket;

/// A blocking Beast WebSocket client.
struct ws_client {
  asio::io_context io;
  websocket::stream<asio::ip::tcp::socket> ws{io};

  /// `receive_buffer_bytes` (0: the system's, which grows as the peer sends) is fixed before the
  /// connection is made.
  explicit ws_client(std::uint16_t port, int receive_buffer_bytes = 0) {
    asio::ip::tcp::endpoint endpoint(asio::ip::make_address("127.0.0.1"), port);
    if (receive_buffer_bytes > 0) {
      ws.next_layer().open(asio::ip::tcp::v4());
      ws.next_layer().set_option(asio::socket_base::receive_buffer_size(receive_buffer_bytes));
    }
    ws.next_layer().connect(endpoint);
    ws.handshake("127.0.0.1", "/ws");
    ws.binary(true);
  }
};

TEST(http_streaming, an_accepted_websocket_exchanges_binary_messages_both_ways) {
  auto server = start([](http_request, std::shared_ptr<http_reply> reply) { reply->send({200, "text/plain", "", {}}); },
                      [](const http_request& request) -> websocket_decision {
                        EXPECT_EQ(request.path(), "/ws");
                        return websocket_accept{[](std::shared_ptr<websocket_connection> c) {
                          c->start([c](std::string_view m) { c->send("echo:" + std::string(m)); },
                                   [](std::string) {});
                        }};
                      });
  ASSERT_TRUE(server);
  ws_client client(server->port());
  const std::string message("\x00\x01hello", 7);
  client.ws.write(asio::buffer(message));
  beast::flat_buffer buffer;
  client.ws.read(buffer);
  EXPECT_EQ(beast::buffers_to_string(buffer.data()), "echo:" + message);
  EXPECT_EQ(server->connections_open(), 1u);
}

TEST(http_streaming, a_websocket_still_open_when_the_server_goes_is_freed_with_it) {
  std::weak_ptr<websocket_connection> watched;
  signal opened;
  auto server = start([](http_request, std::shared_ptr<http_reply> reply) { reply->send({200, "text/plain", "", {}}); },
                      [&](const http_request&) -> websocket_decision {
                        return websocket_accept{[&](std::shared_ptr<websocket_connection> c) {
                          watched = c;
                          // The callback holds its connection, as a link's owner does: a cycle
                          // that only the connection's end breaks.
                          c->start([c](std::string_view m) { c->send(std::string(m)); }, [](std::string) {});
                          opened.raise();
                        }};
                      });
  ASSERT_TRUE(server);
  ws_client client(server->port());
  ASSERT_TRUE(opened.wait(10s));
  client.ws.write(asio::buffer(std::string("ping")));  // the answer shows the callbacks are in place
  beast::flat_buffer buffer;
  client.ws.read(buffer);
  ASSERT_EQ(beast::buffers_to_string(buffer.data()), "ping");
  server.reset();  // the client is still connected
  EXPECT_TRUE(watched.expired()) << "the connection outlived its server";
}

/// A server that accepts every WebSocket and ignores its messages; when one ends, `reason` is set
/// and `closed` raised.
/// A server whose WebSockets call `on_message` with their connection for each message, and note
/// their close in `closed` and `reason`.
std::unique_ptr<http_server> start_noting_close(http_server_options options, signal& closed, std::string& reason,
                                                std::function<void(websocket_connection&)> on_message = {}) {
  return start([](http_request, std::shared_ptr<http_reply> reply) { reply->send({200, "text/plain", "", {}}); },
               [&closed, &reason, on_message](const http_request&) -> websocket_decision {
                 return websocket_accept{[&closed, &reason, on_message](std::shared_ptr<websocket_connection> c) {
                   c->start(
                       [c, on_message](std::string_view) {
                         if (on_message) on_message(*c);
                       },
                       [&closed, &reason](std::string why) {
                         reason = std::move(why);
                         closed.raise();
                       });
                 }};
               },
               options);
}

TEST(http_streaming, a_websocket_is_tracked_from_its_start_to_its_end_and_one_never_started_not_at_all) {
  http_server_options options;
  options.websocket_idle_timeout = 400ms;
  std::promise<std::shared_ptr<websocket_connection>> accepted;
  auto server = start([](http_request, std::shared_ptr<http_reply> reply) { reply->send({200, "text/plain", "", {}}); },
                      [&](const http_request&) -> websocket_decision {
                        // As a provider link being stopped does: the connection is never started.
                        return websocket_accept{[&](std::shared_ptr<websocket_connection> c) { accepted.set_value(c); }};
                      },
                      options);
  ASSERT_TRUE(server);
  ws_client client(server->port());
  std::weak_ptr<websocket_connection> unstarted = accepted.get_future().get();
  EXPECT_EQ(server->websockets_started(), 0u);
  // Silent for the idle timeout (nothing reads on either side), it is closed and freed.
  const auto deadline = std::chrono::steady_clock::now() + 10s;
  while (!unstarted.expired() && std::chrono::steady_clock::now() < deadline) std::this_thread::yield();
  ASSERT_TRUE(unstarted.expired()) << "a connection never started outlived its idle timeout";
  EXPECT_EQ(server->websockets_started(), 0u) << "a connection never started left an entry behind";

  // A started one is tracked until it ends.
  signal closed;
  std::string reason;
  auto noting = start_noting_close({}, closed, reason);
  ASSERT_TRUE(noting);
  {
    ws_client started(noting->port());
    started.ws.write(asio::buffer(std::string("hello")));  // read once it has started
    const auto until = std::chrono::steady_clock::now() + 10s;
    while (noting->websockets_started() == 0 && std::chrono::steady_clock::now() < until) std::this_thread::yield();
    EXPECT_EQ(noting->websockets_started(), 1u);
    started.ws.close(websocket::close_code::normal);
  }
  ASSERT_TRUE(closed.wait(10s));
  EXPECT_EQ(noting->websockets_started(), 0u);
}

TEST(http_streaming, a_websocket_message_over_the_limit_closes_the_connection_with_1009) {
  http_server_options options;
  options.websocket_message_bytes_max = 1024;
  signal closed;
  std::string reason;
  auto server = start_noting_close(options, closed, reason);
  ASSERT_TRUE(server);
  ws_client client(server->port());
  client.ws.write(asio::buffer(std::string(4096, 'x')));
  beast::flat_buffer buffer;
  beast::error_code ec;
  client.ws.read(buffer, ec);
  ASSERT_TRUE(ec) << "the connection stayed open";
  // The close frame (1009) races with the rest of the client's message: when the server's close
  // arrives first the client sees it, else its socket is reset. Either way the server gave up.
  if (ec == websocket::error::closed) {
    EXPECT_EQ(client.ws.reason().code, websocket::close_code::too_big);
  }
  ASSERT_TRUE(closed.wait(10s));
  EXPECT_NE(reason.find("limit"), std::string::npos) << reason;
}

TEST(http_streaming, sends_past_websocket_send_queue_bytes_max_close_the_connection_with_1008) {
  // A peer that does not keep up: the handler's messages pile up past the limit (posted at once,
  // they are all queued before the first write can end).
  http_server_options options;
  options.websocket_send_queue_bytes_max = 64 * 1024;
  signal closed;
  std::string reason;
  auto server = start_noting_close(options, closed, reason, [](websocket_connection& c) {
    for (int i = 0; i < 100; ++i) c.send(std::string(4096, 'm'));  // 400 KiB
  });
  ASSERT_TRUE(server);
  ws_client client(server->port());
  client.ws.write(asio::buffer(std::string("flood")));
  std::size_t received = 0;
  beast::error_code ec;
  auto reading = std::async(std::launch::async, [&] {
    while (!ec) {
      beast::flat_buffer buffer;
      client.ws.read(buffer, ec);
      if (!ec) received += buffer.size();
    }
  });
  if (reading.wait_for(10s) != std::future_status::ready) {
    ::shutdown(client.ws.next_layer().native_handle(), SHUT_RDWR);  // ends the blocked read: fail, not hang
    reading.wait();
    FAIL() << "the server never closed the connection";
  }
  EXPECT_EQ(ec, websocket::error::closed) << ec.message();
  EXPECT_EQ(client.ws.reason().code, websocket::close_code::policy_error);
  EXPECT_LE(received, 64u * 1024) << "at most the queue's bytes went out";
  ASSERT_TRUE(closed.wait(10s));
  EXPECT_NE(reason.find("send queue full"), std::string::npos) << reason;
}

TEST(http_streaming, a_websocket_peer_that_reads_nothing_is_dropped_websocket_close_wait_max_after_its_queue_filled) {
  // Its close frame waits behind a message the peer never takes: without a bound, the link would
  // stay open (and counted) for good. Its owner is told at once, not when it is dropped.
  for (const auto close_wait_max : {200ms, 60'000ms}) {
    SCOPED_TRACE(close_wait_max.count());
    http_server_options options;
    options.websocket_send_queue_bytes_max = 12u << 20;
    options.websocket_close_wait_max = close_wait_max;
    signal closed;
    std::string reason;
    auto server = start_noting_close(options, closed, reason, [](websocket_connection& c) {
      // More than the sockets' buffers hold (the peer's is 64 KiB, the server's at most 4 MiB),
      // twice: the second fills the queue.
      for (int i = 0; i < 2; ++i) c.send(std::string(8u << 20, 'm'));
    });
    ASSERT_TRUE(server);
    ws_client client(server->port(), 64 * 1024);
    client.ws.write(asio::buffer(std::string("flood")));  // and never reads
    ASSERT_TRUE(closed.wait(10s)) << "the owner was not told";
    EXPECT_NE(reason.find("send queue full"), std::string::npos) << reason;
    if (close_wait_max != 200ms) {
      // It sends once more, then takes what was queued after all: the server's read loop goes on
      // (its owner was told already) to the closing handshake, and ends the connection.
      client.ws.write(asio::buffer(std::string("late")));
      beast::error_code ec;
      while (!ec) {
        beast::flat_buffer buffer;
        client.ws.read(buffer, ec);
      }
      EXPECT_EQ(ec, websocket::error::closed) << ec.message();
    }
    // Then it is counted no more: dropped after the wait, or closed by the handshake (not left
    // for the idle timeout).
    const auto deadline = std::chrono::steady_clock::now() + 10s;
    while (server->connections_open() > 0 && std::chrono::steady_clock::now() < deadline) {
      std::this_thread::yield();
    }
    EXPECT_EQ(server->connections_open(), 0u) << "the connection stayed open";
  }
}

TEST(http_streaming, a_websocket_its_owner_closes_without_starting_frees_its_slot_once_the_peer_answers_the_close) {
  // A provider link refused after its handshake (too many links of its provider) is closed
  // before any read loop runs: it stayed counted until its idle watch gave up (a minute).
  auto server = start([](http_request, std::shared_ptr<http_reply> reply) { reply->send({200, "text/plain", "", {}}); },
                      [](const http_request&) -> websocket_decision {
                        return websocket_accept{[](std::shared_ptr<websocket_connection> c) { c->close(1008, "no room"); }};
                      });
  ASSERT_TRUE(server);
  ws_client refused(server->port());
  beast::flat_buffer buffer;
  beast::error_code ec;
  refused.ws.read(buffer, ec);  // answers the server's close frame
  EXPECT_EQ(ec, websocket::error::closed) << ec.message();
  EXPECT_EQ(refused.ws.reason().code, websocket::close_code::policy_error);
  const auto deadline = std::chrono::steady_clock::now() + 10s;
  while (server->connections_open() > 0 && std::chrono::steady_clock::now() < deadline) std::this_thread::yield();
  EXPECT_EQ(server->connections_open(), 0u) << "the connection stayed counted";
}

TEST(http_streaming, a_websocket_handler_that_throws_closes_its_connection_with_1011_and_nothing_else) {
  auto server = start([](http_request, std::shared_ptr<http_reply> reply) { reply->send({200, "text/plain", "up", {}}); },
                      [](const http_request&) -> websocket_decision {
                        return websocket_accept{[](std::shared_ptr<websocket_connection> c) {
                          c->start([](std::string_view m) {
                            if (m == "throw") throw std::runtime_error("a bug");
                          }, [](std::string) {});
                        }};
                      });
  ASSERT_TRUE(server);
  ws_client failing(server->port());
  failing.ws.write(asio::buffer(std::string("throw")));
  beast::flat_buffer buffer;
  beast::error_code ec;
  failing.ws.read(buffer, ec);
  EXPECT_EQ(ec, websocket::error::closed) << ec.message();
  EXPECT_EQ(failing.ws.reason().code, websocket::close_code::internal_error);
  EXPECT_NE(std::string(failing.ws.reason().reason.c_str()).find("a bug"), std::string::npos);
  // The server goes on: another WebSocket, and plain HTTP.
  ws_client other(server->port());
  other.ws.write(asio::buffer(std::string("fine")));
  client c(server->port());
  c.send("GET / HTTP/1.1\r\nHost: x\r\n\r\n");
  const auto text = c.read_until("up", 10s);
  EXPECT_NE(text.find("HTTP/1.1 200"), std::string::npos) << text;
}

TEST(http_streaming, an_upgrade_or_open_handler_that_throws_fails_that_link_and_the_server_goes_on) {
  auto server = start([](http_request, std::shared_ptr<http_reply> reply) { reply->send({200, "text/plain", "up", {}}); },
                      [](const http_request& request) -> websocket_decision {
                        if (request.path() == "/boom") throw std::runtime_error("a bug in upgrade");
                        return websocket_accept{[](std::shared_ptr<websocket_connection>) {
                          throw std::runtime_error("a bug in open");
                        }};
                      });
  ASSERT_TRUE(server);
  client refused(server->port());
  refused.send("GET /boom HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n");
  const auto refusal = refused.read_until("internal error", 10s);
  EXPECT_TRUE(refusal.starts_with("HTTP/1.1 500 ")) << refusal;
  ws_client opened(server->port());
  beast::flat_buffer buffer;
  beast::error_code ec;
  opened.ws.read(buffer, ec);
  EXPECT_EQ(ec, websocket::error::closed) << ec.message();
  EXPECT_EQ(opened.ws.reason().code, websocket::close_code::internal_error);
  EXPECT_NE(std::string(opened.ws.reason().reason.c_str()).find("a bug in open"), std::string::npos);
  client c(server->port());
  c.send("GET / HTTP/1.1\r\nHost: x\r\n\r\n");
  const auto text = c.read_until("up", 10s);
  EXPECT_NE(text.find("HTTP/1.1 200"), std::string::npos) << text;
}

TEST(http_streaming, close_handlers_that_throw_leave_the_server_serving) {
  signal link_closed;
  signal request_closed;
  auto server = start(
      [&](http_request request, std::shared_ptr<http_reply> reply) {
        if (request.target == "/") return reply->send({200, "text/plain", "up", {}});
        reply->on_close([&] {
          request_closed.raise();
          throw std::runtime_error("a bug in a request's close");
        });
        reply->start_stream(200, "text/event-stream", {});
      },
      [&](const http_request&) -> websocket_decision {
        return websocket_accept{[&](std::shared_ptr<websocket_connection> c) {
          c->start([](std::string_view) {}, [&](std::string) {
            link_closed.raise();
            throw std::runtime_error("a bug in a link's close");
          });
        }};
      });
  ASSERT_TRUE(server);
  {
    ws_client link(server->port());
    link.ws.close(websocket::close_code::normal);
  }
  ASSERT_TRUE(link_closed.wait(10s));
  {
    client streamed(server->port());
    streamed.send(post);
    (void)streamed.read_until("\r\n\r\n", 10s);
  }
  ASSERT_TRUE(request_closed.wait(10s));
  client c(server->port());
  c.send("GET / HTTP/1.1\r\nHost: x\r\n\r\n");
  const auto text = c.read_until("up", 10s);
  EXPECT_NE(text.find("HTTP/1.1 200"), std::string::npos) << text;
}

TEST(http_streaming, the_server_closes_a_websocket_with_its_code_and_reason) {
  auto server = start([](http_request, std::shared_ptr<http_reply> reply) { reply->send({200, "text/plain", "", {}}); },
                      [](const http_request&) -> websocket_decision {
                        return websocket_accept{[](std::shared_ptr<websocket_connection> c) {
                          c->start([c](std::string_view) { c->close(1008, "hello first"); }, [](std::string) {});
                        }};
                      });
  ASSERT_TRUE(server);
  ws_client client(server->port());
  client.ws.write(asio::buffer(std::string("not hello")));
  beast::flat_buffer buffer;
  beast::error_code ec;
  client.ws.read(buffer, ec);
  EXPECT_EQ(ec, websocket::error::closed) << ec.message();
  EXPECT_EQ(client.ws.reason().code, websocket::close_code::policy_error);
  EXPECT_EQ(std::string(client.ws.reason().reason.c_str()), "hello first");
}

TEST(http_streaming, a_websocket_closed_while_a_message_is_being_written_sends_that_message_whole_then_closes) {
  // Larger than the loopback socket's buffers: the write is still in flight when the close comes.
  const std::size_t big_bytes = 8 * 1024 * 1024;
  auto pattern = [](std::size_t i) { return static_cast<char>('a' + (i * 7 + i / 4096) % 26); };
  auto server = start([](http_request, std::shared_ptr<http_reply> reply) { reply->send({200, "text/plain", "", {}}); },
                      [&](const http_request&) -> websocket_decision {
                        return websocket_accept{[&](std::shared_ptr<websocket_connection> c) {
                          c->start(
                              [c, &pattern, big_bytes](std::string_view) {
                                std::string big(big_bytes, '\0');
                                for (std::size_t i = 0; i < big.size(); ++i) big[i] = pattern(i);
                                c->send(std::move(big));
                                c->send("queued behind it");
                                c->close(1008, "closing with a write in flight");
                              },
                              [](std::string) {});
                        }};
                      });
  ASSERT_TRUE(server);
  ws_client client(server->port());
  client.ws.read_message_max(2 * big_bytes);
  client.ws.write(asio::buffer(std::string("go")));
  beast::flat_buffer buffer;
  beast::error_code ec;
  client.ws.read(buffer, ec);
  ASSERT_FALSE(ec) << "the message in flight is sent whole before the close: " << ec.message();
  const std::string received = beast::buffers_to_string(buffer.data());
  ASSERT_EQ(received.size(), big_bytes);
  std::size_t wrong = 0;
  for (std::size_t i = 0; i < received.size(); ++i) wrong += received[i] != pattern(i);
  EXPECT_EQ(wrong, 0u) << "bytes of the message in flight that changed under the write";
  buffer.consume(buffer.size());
  client.ws.read(buffer, ec);
  EXPECT_EQ(ec, websocket::error::closed) << "a message queued behind the close is dropped: " << ec.message();
  EXPECT_EQ(client.ws.reason().code, websocket::close_code::policy_error);
}

TEST(http_streaming, a_quiet_websocket_peer_that_answers_pings_stays_open) {
  http_server_options options;
  // A pong has a quarter of this to arrive before the next check: generous for a loaded machine.
  options.websocket_idle_timeout = 1000ms;
  // The upgrade request's HTTP read deadline must not survive the upgrade (it closed provider
  // links 30 s after they opened): the exchange below outlasts it.
  options.idle_timeout = std::chrono::seconds(1);
  std::promise<std::shared_ptr<websocket_connection>> opened;
  auto server = start([](http_request, std::shared_ptr<http_reply> reply) { reply->send({200, "text/plain", "", {}}); },
                      [&](const http_request&) -> websocket_decision {
                        return websocket_accept{[&](std::shared_ptr<websocket_connection> c) {
                          c->start([](std::string_view) {}, [](std::string) {});
                          opened.set_value(c);
                        }};
                      },
                      options);
  ASSERT_TRUE(server);
  ws_client client(server->port());
  auto connection = opened.get_future().get();
  // The client sends nothing; its reads answer the server's pings, which come at least 500 ms
  // apart (half the WebSocket idle timeout). After three the connection has outlived both the
  // WebSocket idle timeout and the HTTP one because of them.
  std::atomic<int> pings{0};
  const auto opened_at = std::chrono::steady_clock::now();
  client.ws.control_callback([&](websocket::frame_type kind, beast::string_view) {
    if (kind == websocket::frame_type::ping && ++pings == 3) connection->send("still here");
  });
  beast::flat_buffer buffer;
  beast::error_code ec;
  client.ws.read(buffer, ec);
  ASSERT_FALSE(ec) << ec.message();
  EXPECT_EQ(beast::buffers_to_string(buffer.data()), "still here");
  EXPECT_GE(pings.load(), 3);
  EXPECT_GT(std::chrono::steady_clock::now() - opened_at, options.idle_timeout);
}

TEST(http_streaming, a_silent_websocket_peer_is_dropped_after_the_idle_timeout) {
  http_server_options options;
  options.websocket_idle_timeout = 400ms;
  signal closed;
  std::string reason;
  auto server = start_noting_close(options, closed, reason);
  ASSERT_TRUE(server);
  // A peer that completes the upgrade and then never reads again: it answers no ping.
  client peer(server->port());
  ASSERT_TRUE(peer.connected());
  const auto upgraded_at = std::chrono::steady_clock::now();
  peer.send("GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n");
  ASSERT_NE(peer.read_until("\r\n\r\n", 10'000ms).find("101"), std::string::npos);
  ASSERT_TRUE(closed.wait(10s));
  EXPECT_GE(std::chrono::steady_clock::now() - upgraded_at, options.websocket_idle_timeout);
  EXPECT_NE(reason.find("nothing received for 400 ms"), std::string::npos) << reason;
}

}  // namespace
}  // namespace gpustream::gateway
