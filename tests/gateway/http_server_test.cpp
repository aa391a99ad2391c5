// The HTTP server's own limits: open connections, idle connections and lingering after the last
// answer (headers and bodies are covered end to end in tests/app/cli_test.cpp); the peer's address.
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <fcntl.h>
#include <poll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <ctime>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "gateway/http_server.hpp"

namespace gpustream::gateway {
namespace {

/// A connected client socket, closed on scope exit.
class client {
 public:
  explicit client(std::uint16_t port) : fd_(::socket(AF_INET, SOCK_STREAM, 0)) {
    sockaddr_in address{};
    address.sin_family = AF_INET;
    address.sin_port = htons(port);
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    connected_ = ::connect(fd_, reinterpret_cast<sockaddr*>(&address), sizeof address) == 0;
  }
  ~client() { ::close(fd_); }
  client(const client&) = delete;
  client& operator=(const client&) = delete;

  [[nodiscard]] bool connected() const { return connected_; }
  [[nodiscard]] int fd() const { return fd_; }
  void send(const std::string& text) { ASSERT_EQ(::write(fd_, text.data(), text.size()), static_cast<ssize_t>(text.size())); }

  /// Reads until the server closes the connection or `wait_max` passes; returns what arrived and
  /// whether the connection was closed.
  std::pair<std::string, bool> read_until_closed(std::chrono::milliseconds wait_max) {
    std::string text;
    const auto deadline = std::chrono::steady_clock::now() + wait_max;
    for (;;) {
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
      if (left.count() <= 0) return {text, false};
      pollfd p{fd_, POLLIN, 0};
      if (::poll(&p, 1, static_cast<int>(left.count())) <= 0) return {text, false};
      char buffer[4096];
      const auto n = ::read(fd_, buffer, sizeof buffer);
      if (n <= 0) return {text, true};
      text.append(buffer, static_cast<std::size_t>(n));
    }
  }

 private:
  int fd_;
  bool connected_ = false;
};

const std::string healthz = "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";

std::unique_ptr<http_server> start(
    http_server_options options,
    http_handler handler = [](const http_request&, std::shared_ptr<http_reply> reply) {
      reply->send(http_response{200, "text/plain", "ok", {}});
    }) {
  options.port = 0;
  auto server = http_server::start(options, std::move(handler));
  EXPECT_TRUE(server.has_value()) << (server ? "" : server.error());
  return server ? std::move(server).value() : nullptr;
}

/// Reads what `peer` receives until `done(text)` holds or 10 s pass.
template <class Done>
std::string read_until(client& peer, Done done) {
  std::string text;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (!done(text) && std::chrono::steady_clock::now() < deadline) {
    text += peer.read_until_closed(std::chrono::milliseconds(50)).first;  // what arrived by then
  }
  return text;
}

TEST(http_server, connections_beyond_connections_max_get_503_and_are_closed) {
  http_server_options options;
  options.connections_max = 2;
  auto server = start(options);
  ASSERT_TRUE(server);
  client first(server->port()), second(server->port());
  ASSERT_TRUE(first.connected() && second.connected());
  // Both are served (keep-alive keeps them open) ...
  first.send(healthz);
  second.send(healthz);
  const auto answered = [](const std::string& text) { return text.find("200 OK") != std::string::npos; };
  EXPECT_TRUE(answered(read_until(first, answered)));
  EXPECT_TRUE(answered(read_until(second, answered)));
  // ... and a third is refused at once.
  client third(server->port());
  ASSERT_TRUE(third.connected());
  const auto [reply, closed] = third.read_until_closed(std::chrono::seconds(5));
  EXPECT_NE(reply.find("503"), std::string::npos) << reply;
  EXPECT_NE(reply.find("\r\nRetry-After: 1\r\n"), std::string::npos) << reply;
  EXPECT_TRUE(closed);
}

/// CPU time this process has used, all threads.
std::chrono::nanoseconds process_cpu() {
  timespec t{};
  ::clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
  return std::chrono::seconds(t.tv_sec) + std::chrono::nanoseconds(t.tv_nsec);
}

TEST(http_server, out_of_descriptors_it_waits_for_one_instead_of_spinning_and_then_serves) {
  auto server = start({});
  ASSERT_TRUE(server);
  rlimit saved{};
  ASSERT_EQ(::getrlimit(RLIMIT_NOFILE, &saved), 0);
  rlimit low = saved;
  low.rlim_cur = std::min<rlim_t>(saved.rlim_cur, 1024);
  ASSERT_EQ(::setrlimit(RLIMIT_NOFILE, &low), 0);
  // Every descriptor taken but the client's: the server has none left to accept it with.
  std::vector<int> taken;
  for (int fd; (fd = ::open("/dev/null", O_RDONLY | O_CLOEXEC)) >= 0;) taken.push_back(fd);
  ASSERT_EQ(errno, EMFILE);
  ASSERT_FALSE(taken.empty());
  ::close(taken.back());
  taken.pop_back();
  const auto release = [&] {
    for (const int fd : taken) ::close(fd);
    taken.clear();
    ::setrlimit(RLIMIT_NOFILE, &saved);
  };
  client waiting(server->port());  // the kernel completes the handshake; the server cannot accept
  EXPECT_TRUE(waiting.connected());
  if (waiting.connected()) waiting.send(healthz);
  const auto cpu_before = process_cpu();
  const auto [early, closed_early] = waiting.read_until_closed(std::chrono::milliseconds(500));
  const auto cpu_used = process_cpu() - cpu_before;
  release();
  EXPECT_TRUE(early.empty()) << early;
  EXPECT_FALSE(closed_early);
  // Retrying at once would take most of a core for the 500 ms; waiting takes next to nothing.
  EXPECT_LT(cpu_used, std::chrono::milliseconds(100))
      << "the accept loop spun: " << std::chrono::duration_cast<std::chrono::milliseconds>(cpu_used).count()
      << " ms of CPU in 500 ms";
  // Descriptors free again: the waiting connection is accepted and served (the wait is at most 1 s).
  const auto reply = read_until(waiting, [](const std::string& t) { return t.find("200 OK") != std::string::npos; });
  EXPECT_NE(reply.find("200 OK"), std::string::npos) << reply;
}

TEST(http_server, a_head_request_is_answered_without_the_body_and_the_next_request_follows) {
  auto server = start({});
  ASSERT_TRUE(server);
  client peer(server->port());
  ASSERT_TRUE(peer.connected());
  peer.send("HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n" + healthz);
  const auto text = read_until(peer, [](const std::string& t) { return t.find("\r\n\r\nok") != std::string::npos; });
  // The HEAD's answer: its headers (Content-Length the body's), then at once the GET's answer.
  ASSERT_TRUE(text.starts_with("HTTP/1.1 200 OK\r\n")) << text;
  EXPECT_NE(text.find("Content-Length: 2\r\n\r\nHTTP/1.1 200 OK\r\n"), std::string::npos) << text;
  EXPECT_TRUE(text.ends_with("\r\n\r\nok")) << text;
}

TEST(http_server, a_head_request_the_server_refuses_gets_its_refusal_without_a_body) {
  // RFC 9110 9.3.2: no answer to a HEAD carries content, a refusal included.
  auto server = start({});
  ASSERT_TRUE(server);
  client peer(server->port());
  ASSERT_TRUE(peer.connected());
  peer.send("HEAD /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999999\r\n\r\n");
  const auto [text, closed] = peer.read_until_closed(std::chrono::seconds(10));
  EXPECT_TRUE(closed);
  ASSERT_TRUE(text.starts_with("HTTP/1.1 413 ")) << text;
  EXPECT_TRUE(text.ends_with("\r\n\r\n")) << "a body after the head: " << text;
  EXPECT_NE(text.find("Content-Length: "), std::string::npos) << "the length the refusal's body has: " << text;
}

TEST(http_server, bytes_that_are_not_an_http_request_get_400_naming_the_fault) {
  auto server = start({});
  ASSERT_TRUE(server);
  for (const std::string garbage : {"GARBAGE\r\n\r\n", "GET /healthz HTTP/1.1\r\nno colon here\r\n\r\n"}) {
    client peer(server->port());
    ASSERT_TRUE(peer.connected());
    peer.send(garbage);
    const auto [reply, closed] = peer.read_until_closed(std::chrono::seconds(10));
    EXPECT_TRUE(reply.starts_with("HTTP/1.1 400 ")) << reply;
    EXPECT_NE(reply.find("malformed HTTP request: "), std::string::npos) << reply;
    EXPECT_TRUE(closed);
  }
}

TEST(http_server, a_client_that_expects_100_continue_gets_it_before_sending_its_body) {
  http_server_options options;
  options.port = 0;
  auto started = http_server::start(options, [](const http_request& request, std::shared_ptr<http_reply> reply) {
    reply->send(http_response{200, "text/plain", "got " + request.body, {}});
  });
  ASSERT_TRUE(started) << started.error();
  auto& server = *started;
  client peer(server->port());
  ASSERT_TRUE(peer.connected());
  peer.send("POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n");
  // Without the go-ahead this waits out the 10 s: the server waits for the body, and so would we.
  const auto go_ahead = read_until(peer, [](const std::string& t) { return t.find("\r\n\r\n") != std::string::npos; });
  EXPECT_EQ(go_ahead, "HTTP/1.1 100 Continue\r\n\r\n");
  peer.send("body");
  const auto answer = read_until(peer, [](const std::string& t) { return t.find("got body") != std::string::npos; });
  EXPECT_TRUE(answer.starts_with("HTTP/1.1 200 OK\r\n")) << answer;
  EXPECT_NE(answer.find("got body"), std::string::npos) << answer;
}

TEST(http_server, a_connection_refused_as_busy_lingers_only_busy_linger_timeout) {
  // Each holds a descriptor beyond connections_max while it lingers.
  http_server_options options;
  options.connections_max = 1;
  options.linger_timeout = std::chrono::minutes(1);
  options.busy_linger_timeout = std::chrono::milliseconds(200);
  auto server = start(options);
  ASSERT_TRUE(server);
  client first(server->port());
  ASSERT_TRUE(first.connected());
  first.send(healthz);
  const auto answered = [](const std::string& text) { return text.find("200 OK") != std::string::npos; };
  ASSERT_TRUE(answered(read_until(first, answered)));  // the one slot is taken
  client busy(server->port());
  ASSERT_TRUE(busy.connected());  // and never closes
  const auto [reply, closed] = busy.read_until_closed(std::chrono::seconds(10));
  EXPECT_TRUE(reply.starts_with("HTTP/1.1 503 ")) << reply;
  // Its descriptor goes when its linger ends, not when the client closes.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (server->connections_open() > 1 && std::chrono::steady_clock::now() < deadline) std::this_thread::yield();
  EXPECT_EQ(server->connections_open(), 1u) << "a busy refusal lingered past 10 s (linger_timeout is a minute)";
}

TEST(http_server, an_http_10_client_that_expects_100_continue_gets_no_100) {
  // HTTP/1.0 has no 100: its client would take one as the answer (RFC 9110 10.1.1).
  http_server_options options;
  options.port = 0;
  auto started = http_server::start(options, [](const http_request& request, std::shared_ptr<http_reply> reply) {
    reply->send(http_response{200, "text/plain", "got " + request.body, {}});
  });
  ASSERT_TRUE(started) << started.error();
  client peer((*started)->port());
  ASSERT_TRUE(peer.connected());
  peer.send("POST /x HTTP/1.0\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\nbody");
  const auto [answer, closed] = peer.read_until_closed(std::chrono::seconds(10));
  EXPECT_TRUE(closed);
  EXPECT_TRUE(answer.starts_with("HTTP/1.1 200 OK\r\n")) << "the answer itself first: " << answer;
  EXPECT_NE(answer.find("got body"), std::string::npos) << answer;
}

TEST(http_server, a_body_framed_by_a_coding_other_than_chunked_is_refused_not_read_as_the_next_request) {
  // Read as having no body, its bytes would be a second request a proxy in front never saw.
  http_server_options options;
  options.port = 0;
  auto started = http_server::start(options, [](const http_request& request, std::shared_ptr<http_reply> reply) {
    reply->send(http_response{200, "text/plain", "saw " + request.target, {}});
  });
  ASSERT_TRUE(started) << started.error();
  const std::string smuggled = "GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n";
  for (const std::string head : {"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n",
                                 "POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, gzip\r\n",
                                 "POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\nContent-Length: 4\r\n",
                                 "POST /x HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"}) {
    client peer((*started)->port());
    ASSERT_TRUE(peer.connected());
    peer.send(head + "\r\n" + smuggled);
    const auto [answer, closed] = peer.read_until_closed(std::chrono::seconds(10));
    EXPECT_TRUE(closed) << head;
    EXPECT_TRUE(answer.starts_with("HTTP/1.1 400 Bad Request\r\n")) << head << answer;
    EXPECT_NE(answer.find("Transfer-Encoding must end with chunked"), std::string::npos) << answer;
    EXPECT_EQ(answer.find("saw"), std::string::npos) << head << answer;
  }
}

TEST(http_server, trailer_fields_after_a_chunked_body_are_refused_not_taken_as_headers) {
  http_server_options options;
  options.port = 0;
  auto started = http_server::start(options, [](const http_request& request, std::shared_ptr<http_reply> reply) {
    reply->send(http_response{200, "text/plain", "got " + request.body + " as " + std::string(request.header("authorization")), {}});
  });
  ASSERT_TRUE(started) << started.error();
  const std::string head = "POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
  client plain((*started)->port());
  plain.send(head + "4\r\nbody\r\n0\r\n\r\n");
  const auto [taken, taken_closed] = plain.read_until_closed(std::chrono::seconds(10));
  EXPECT_NE(taken.find("200 OK"), std::string::npos) << taken;
  EXPECT_NE(taken.find("got body as "), std::string::npos) << taken;
  client trailed((*started)->port());
  trailed.send(head + "4\r\nbody\r\n0\r\nAuthorization: Bearer sneaked\r\n\r\n");
  const auto [refused, refused_closed] = trailed.read_until_closed(std::chrono::seconds(10));
  EXPECT_TRUE(refused_closed);
  EXPECT_TRUE(refused.starts_with("HTTP/1.1 400 Bad Request\r\n")) << refused;
  EXPECT_NE(refused.find("trailer fields"), std::string::npos) << refused;
  EXPECT_EQ(refused.find("sneaked"), std::string::npos) << refused;
}

TEST(http_server, every_request_on_a_connection_carries_the_peers_address) {
  http_server_options options;
  options.port = 0;
  auto server = http_server::start(options, [](const http_request& request, std::shared_ptr<http_reply> reply) {
    reply->send(http_response{200, "text/plain", "from " + request.remote_address + ";", {}});
  });
  ASSERT_TRUE(server.has_value()) << server.error();
  client peer(server.value()->port());
  ASSERT_TRUE(peer.connected());
  peer.send(healthz + healthz);  // two requests on one connection
  const std::string expected = "from 127.0.0.1;";
  const auto answered = [&](const std::string& text) {
    const auto first = text.find(expected);
    return first != std::string::npos && text.find(expected, first + 1) != std::string::npos;
  };
  const auto replies = read_until(peer, answered);
  EXPECT_TRUE(answered(replies)) << replies;
}

TEST(http_server, an_idle_connection_is_closed_after_idle_timeout) {
  http_server_options options;
  options.idle_timeout = std::chrono::seconds(1);
  auto server = start(options);
  ASSERT_TRUE(server);
  client idle(server->port());
  ASSERT_TRUE(idle.connected());
  const auto started = std::chrono::steady_clock::now();
  const auto [reply, closed] = idle.read_until_closed(std::chrono::seconds(10));
  EXPECT_TRUE(closed) << "still open after 10 s";
  EXPECT_TRUE(reply.empty());
  EXPECT_GE(std::chrono::steady_clock::now() - started, std::chrono::milliseconds(900));
}

TEST(http_server, a_refused_body_can_still_be_sent_and_the_answer_is_not_reset) {
  // The 413 goes out as soon as the headers announce too big a body; a client still writing it
  // must be able to finish (its bytes are read and dropped) rather than meet a reset.
  http_server_options options;
  options.body_bytes_max = 1024;
  auto server = start(options);
  ASSERT_TRUE(server);
  client sender(server->port());
  ASSERT_TRUE(sender.connected());
  const std::size_t body_bytes = 4 * 1024 * 1024;
  sender.send("POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: " + std::to_string(body_bytes) + "\r\n\r\n");
  // The server closes its side after the answer: read both first, then send the body.
  const auto [reply, closed] = sender.read_until_closed(std::chrono::seconds(5));
  EXPECT_NE(reply.find("413"), std::string::npos) << reply;
  ASSERT_TRUE(closed) << "the server's side stays open after a 413";
  const std::string chunk(64 * 1024, 'b');
  std::size_t sent = 0;
  int error = 0;
  while (sent < body_bytes) {
    const auto n = ::send(sender.fd(), chunk.data(), chunk.size(), MSG_NOSIGNAL);
    if (n < 0) {
      error = errno;
      break;
    }
    sent += static_cast<std::size_t>(n);
  }
  EXPECT_EQ(sent, body_bytes) << "the body was cut off by " << std::strerror(error);
}

/// A new connection to the server on `port` is served: what came before harmed nothing else.
void expect_still_served(std::uint16_t port) {
  client peer(port);
  ASSERT_TRUE(peer.connected());
  peer.send(healthz);
  EXPECT_NE(read_until(peer, [](const std::string& t) { return t.ends_with("ok"); }).find("200 OK"), std::string::npos);
}

TEST(http_server, a_chunked_body_whose_size_line_or_trailer_never_ends_gets_431_not_unbounded_memory) {
  // Beast's parser bounds the header block and the body's declared sizes, but not a chunk's size
  // line nor the trailer: without a bound of the server's own, the server buffers all it is sent.
  http_server_options options;
  options.header_bytes_max = 1024;
  options.body_bytes_max = 1024;
  auto server = start(options);
  ASSERT_TRUE(server);
  for (const std::string endless : {"1;", "0\r\nX-Trailer: "}) {
    SCOPED_TRACE(endless);
    client sender(server->port());
    ASSERT_TRUE(sender.connected());
    sender.send("POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + endless);
    // 2 MiB with no line end, sent until the server stops taking them (it answers and closes).
    const std::string chunk(64 * 1024, 'a');
    for (std::size_t sent = 0; sent < 2 * 1024 * 1024;) {
      const auto n = ::send(sender.fd(), chunk.data(), chunk.size(), MSG_NOSIGNAL);
      if (n < 0) break;
      sent += static_cast<std::size_t>(n);
    }
    const auto [reply, closed] = sender.read_until_closed(std::chrono::seconds(5));
    EXPECT_TRUE(reply.starts_with("HTTP/1.1 431 ")) << reply;
    EXPECT_NE(reply.find("exceeds header_bytes_max (1024 bytes)"), std::string::npos) << reply;
    EXPECT_TRUE(closed);
  }
  expect_still_served(server->port());
}

TEST(http_server, bytes_past_header_bytes_max_sent_behind_a_request_are_dropped_and_the_server_goes_on) {
  // What comes behind a request while it is answered is kept for the next one, up to a header
  // block's worth; more is dropped and the connection closes after the answer.
  http_server_options options;
  options.header_bytes_max = 1024;
  auto server = start(options);
  ASSERT_TRUE(server);
  {
    client pipeliner(server->port());
    ASSERT_TRUE(pipeliner.connected());
    // A body first grows the read buffer to its bound, so that one read can take a request and
    // most of a header block's worth behind it.
    const std::string body(5000, 'b');
    pipeliner.send("POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n" + body);
    EXPECT_NE(read_until(pipeliner, [](const std::string& t) { return t.ends_with("ok"); }).find("200 OK"),
              std::string::npos);
    pipeliner.send(healthz + std::string(4000, 'x'));
    const auto [reply, closed] = pipeliner.read_until_closed(std::chrono::seconds(5));
    EXPECT_TRUE(reply.starts_with("HTTP/1.1 200 ")) << reply;
    EXPECT_TRUE(closed);
  }
  expect_still_served(server->port());
}

TEST(http_server, an_http10_client_asking_for_keep_alive_is_told_the_connection_stays_open) {
  // An HTTP/1.0 client that is not told reads until the close, which comes only after idle_timeout.
  auto server = start({});
  ASSERT_TRUE(server);
  client peer(server->port());
  ASSERT_TRUE(peer.connected());
  peer.send("GET /healthz HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
  const auto kept = read_until(peer, [](const std::string& t) { return t.ends_with("\r\n\r\nok"); });
  EXPECT_NE(kept.find("\r\nConnection: keep-alive\r\n"), std::string::npos) << kept;
  peer.send("GET /healthz HTTP/1.0\r\n\r\n");  // no keep-alive: closed after the answer
  const auto [last, closed] = peer.read_until_closed(std::chrono::seconds(10));
  EXPECT_NE(last.find("\r\nConnection: close\r\n"), std::string::npos) << last;
  EXPECT_TRUE(closed);
}

TEST(http_server, a_no_content_answer_carries_no_content_length_or_type) {
  http_server_options options;
  options.port = 0;
  auto server = http_server::start(options, [](const http_request&, std::shared_ptr<http_reply> reply) {
    reply->send(http_response{204, "text/plain", "", {}});
  });
  ASSERT_TRUE(server) << server.error();
  client peer(server.value()->port());
  ASSERT_TRUE(peer.connected());
  peer.send(healthz + healthz);  // the second follows on the same connection
  const auto both = read_until(peer, [](const std::string& t) {
    const auto first = t.find("204 No Content");
    return first != std::string::npos && t.find("\r\n\r\n", t.find("204 No Content", first + 1)) != std::string::npos;
  });
  EXPECT_EQ(both.find("Content-Length"), std::string::npos) << both;
  EXPECT_EQ(both.find("Content-Type"), std::string::npos) << both;
}

TEST(http_server, on_listening_gets_the_bound_port_before_the_first_connection_is_accepted) {
  http_server_options options;
  std::unique_ptr<client> early;
  std::atomic<std::uint16_t> told{0};
  options.on_listening = [&](std::uint16_t port) {
    // A connection made now waits in the listen queue; its request is handled after this returns.
    early = std::make_unique<client>(port);
    early->send("GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    told = port;
  };
  auto server = start(options, [&](const http_request&, std::shared_ptr<http_reply> reply) {
    reply->send(http_response{200, "text/plain", "told " + std::to_string(told.load()), {}});
  });
  ASSERT_TRUE(server);
  ASSERT_TRUE(early && early->connected());
  const auto [reply, closed] = early->read_until_closed(std::chrono::seconds(10));
  EXPECT_TRUE(reply.ends_with("\r\n\r\ntold " + std::to_string(server->port()))) << reply;
}

TEST(http_server, an_answer_the_server_makes_itself_goes_through_on_refusal_with_the_request_head_when_read) {
  http_server_options options;
  options.body_bytes_max = 16;
  options.connections_max = 1;
  std::mutex mutex;
  std::vector<std::string> refused;  // "<status> <origin or -> <body bytes seen>"
  options.on_refusal = [&](const http_request* head, http_response& response) {
    std::lock_guard lock(mutex);
    refused.push_back(std::to_string(response.status) + " " + (head ? std::string(head->header("origin")) : "-") + " " +
                      std::to_string(head ? head->body.size() : 0));
    response.headers.emplace_back("X-Seen", "yes");
  };
  auto server = start(options, [](http_request request, std::shared_ptr<http_reply>) {
    throw std::runtime_error("a handler bug before answering " + request.target);
  });
  ASSERT_TRUE(server);
  client big(server->port());
  ASSERT_TRUE(big.connected());
  client second(server->port());  // the one slot is taken: refused as busy, with no head
  ASSERT_TRUE(second.connected());
  const auto [busy, busy_closed] = second.read_until_closed(std::chrono::seconds(10));
  EXPECT_TRUE(busy.starts_with("HTTP/1.1 503 ")) << busy;
  // A handler that throws: its 500 has the head too, so that it gets its CORS headers (its body,
  // read whole, left out).
  big.send("POST /x HTTP/1.1\r\nHost: x\r\nOrigin: https://throw.example\r\nContent-Length: 4\r\n\r\nbody");
  const auto thrown = read_until(big, [](const std::string& t) { return t.find("internal error") != std::string::npos; });
  EXPECT_TRUE(thrown.starts_with("HTTP/1.1 500 ")) << thrown;
  EXPECT_NE(thrown.find("\r\nX-Seen: yes\r\n"), std::string::npos) << thrown;
  big.send("POST /x HTTP/1.1\r\nHost: x\r\nOrigin: https://app.example\r\nContent-Length: 100\r\n\r\n");
  const auto [reply, closed] = big.read_until_closed(std::chrono::seconds(10));
  EXPECT_TRUE(reply.starts_with("HTTP/1.1 413 ")) << reply;
  EXPECT_NE(reply.find("\r\nX-Seen: yes\r\n"), std::string::npos) << reply;
  std::lock_guard lock(mutex);
  EXPECT_EQ(refused, (std::vector<std::string>{"503 - 0", "500 https://throw.example 0", "413 https://app.example 0"}));
}

TEST(http_server, a_client_that_never_closes_is_closed_after_linger_timeout) {
  http_server_options options;
  options.linger_timeout = std::chrono::milliseconds(300);
  auto server = start(options);
  ASSERT_TRUE(server);
  client lingerer(server->port());
  ASSERT_TRUE(lingerer.connected());
  lingerer.send("GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
  const auto [reply, closed] = lingerer.read_until_closed(std::chrono::seconds(5));
  EXPECT_NE(reply.find("200 OK"), std::string::npos) << reply;
  ASSERT_TRUE(closed);
  // The client keeps its side open and sends nothing: after linger_timeout the server closes the
  // socket, and a write then meets a reset.
  const auto started = std::chrono::steady_clock::now();
  const auto deadline = started + std::chrono::seconds(10);
  int error = 0;
  while (error == 0 && std::chrono::steady_clock::now() < deadline) {
    if (::send(lingerer.fd(), "x", 1, MSG_NOSIGNAL) < 0) error = errno;
    if (error == 0) {
      pollfd p{lingerer.fd(), POLLERR, 0};
      ::poll(&p, 1, 50);  // waits for the reset, 50 ms at a time
    }
  }
  EXPECT_TRUE(error == EPIPE || error == ECONNRESET) << "still open after 10 s: " << std::strerror(error);
  EXPECT_GE(std::chrono::steady_clock::now() - started, std::chrono::milliseconds(250));
}

TEST(http_server, localhost_resolves) {
  http_server_options options;
  options.host = "localhost";
  auto server = start(options);
  ASSERT_TRUE(server);
  EXPECT_NE(server->port(), 0);
}

}  // namespace
}  // namespace gpustream::gateway
