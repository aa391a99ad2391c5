// The floor under any gateway of this shape on this machine: a TCP relay that does nothing but
// copy bytes between a client and a target, one thread, epoll, no parsing, no allocation per
// message. `FLOOR=1 bench/gateway_load.sh` chains two of them (as `serve` and the provider agent are two
// processes on the way) between bench/gateway_load and the test upstream: what that chain adds
// to the time to first token is what two extra processes on these cores cost before any of
// gpustream's own work.
//
//   relay_floor --listen PORT --to PORT     (both on 127.0.0.1; --listen 0 picks a free port and
//                                            prints "listening 127.0.0.1:PORT")
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>

namespace {

[[noreturn]] void die(const char* what) {
  std::fprintf(stderr, "relay_floor: %s: %s\n", what, std::strerror(errno));
  std::exit(1);
}

void set_nonblocking_nodelay(int fd) {
  if (fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK) != 0) die("fcntl");
  const int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

sockaddr_in loopback(std::uint16_t port) {
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_port = htons(port);
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  return address;
}

/// One direction of a relayed connection: bytes read from `from` that `to` has not taken yet.
/// Each socket is the `from` of one direction, which keeps what epoll watches on it.
struct pipe_end {
  int from = -1;
  int to = -1;
  std::string pending;  // empty in the usual case: a write takes all that was read
  std::uint32_t from_events = EPOLLIN;  // what epoll watches on `from` now
};

struct connection {
  pipe_end up;    // client → target
  pipe_end down;  // target → client
};

class relay {
 public:
  relay(std::uint16_t listen_port, std::uint16_t target_port) : target_port_(target_port) {
    epoll_ = epoll_create1(0);
    if (epoll_ < 0) die("epoll_create1");
    listener_ = socket(AF_INET, SOCK_STREAM, 0);
    if (listener_ < 0) die("socket");
    const int one = 1;
    setsockopt(listener_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    auto address = loopback(listen_port);
    if (bind(listener_, reinterpret_cast<sockaddr*>(&address), sizeof address) != 0) die("bind");
    if (listen(listener_, 4096) != 0) die("listen");
    if (fcntl(listener_, F_SETFL, fcntl(listener_, F_GETFL) | O_NONBLOCK) != 0) die("fcntl");
    socklen_t length = sizeof address;
    getsockname(listener_, reinterpret_cast<sockaddr*>(&address), &length);
    std::printf("listening 127.0.0.1:%u\n", ntohs(address.sin_port));
    std::fflush(stdout);
    add(listener_, EPOLLIN);
  }

  [[noreturn]] void run() {
    epoll_event ready[256];
    for (;;) {
      const int n = epoll_wait(epoll_, ready, 256, -1);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) die("epoll_wait");
      for (int i = 0; i < n; ++i) {
        const int fd = ready[i].data.fd;
        if (fd == listener_) {
          accept_all();
          continue;
        }
        const auto found = by_fd_.find(fd);
        if (found == by_fd_.end()) continue;  // closed earlier in this round
        on_ready(found->second, fd, ready[i].events);
      }
    }
  }

 private:
  void add(int fd, std::uint32_t events) {
    epoll_event e{.events = events, .data = {.fd = fd}};
    if (epoll_ctl(epoll_, EPOLL_CTL_ADD, fd, &e) != 0) die("epoll_ctl add");
  }

  void accept_all() {
    for (;;) {
      const int client = accept(listener_, nullptr, nullptr);
      if (client < 0) return;
      const int target = socket(AF_INET, SOCK_STREAM, 0);
      auto address = loopback(target_port_);
      // A blocking connect on loopback: done before the first byte is relayed.
      if (target < 0 || connect(target, reinterpret_cast<sockaddr*>(&address), sizeof address) != 0) {
        std::fprintf(stderr, "relay_floor: cannot reach the target: %s\n", std::strerror(errno));
        close(client);
        if (target >= 0) close(target);
        continue;
      }
      set_nonblocking_nodelay(client);
      set_nonblocking_nodelay(target);
      auto c = std::make_shared<connection>();
      c->up = {.from = client, .to = target, .pending = {}, .from_events = EPOLLIN};
      c->down = {.from = target, .to = client, .pending = {}, .from_events = EPOLLIN};
      by_fd_[client] = c;
      by_fd_[target] = c;
      add(client, EPOLLIN);
      add(target, EPOLLIN);
    }
  }

  void on_ready(std::shared_ptr<connection> c, int fd, std::uint32_t events) {
    pipe_end& reading = c->up.from == fd ? c->up : c->down;
    pipe_end& writing_to = c->up.to == fd ? c->up : c->down;  // the direction this fd receives
    if ((events & EPOLLOUT) && !flush(writing_to)) return drop(*c);
    if ((events & (EPOLLIN | EPOLLHUP | EPOLLERR)) && !pump(reading)) return drop(*c);
    watch(c->up, c->down);
    watch(c->down, c->up);
  }

  /// Level-triggered interest: read a side only while what it sent last is all passed on (so a
  /// slow reader stops its writer instead of spinning here), and wait to write while some is held.
  /// `reading`'s socket is `writing_to`'s destination.
  void watch(pipe_end& reading, const pipe_end& writing_to) {
    const std::uint32_t events = (reading.pending.empty() ? EPOLLIN : 0u) |
                                 (writing_to.pending.empty() ? 0u : EPOLLOUT);
    if (reading.from_events == events) return;
    reading.from_events = events;
    epoll_event e{.events = events, .data = {.fd = reading.from}};
    epoll_ctl(epoll_, EPOLL_CTL_MOD, reading.from, &e);
  }

  /// Reads what `p.from` has and writes it to `p.to`; false when the connection is done for.
  bool pump(pipe_end& p) {
    if (!p.pending.empty()) return true;  // wait for the writer to drain first
    for (;;) {
      const ssize_t got = recv(p.from, buffer_, sizeof buffer_, 0);
      if (got == 0) return false;  // either side closing ends the relayed connection (HTTP)
      if (got < 0) return errno == EAGAIN || errno == EINTR;
      const ssize_t put = send(p.to, buffer_, static_cast<std::size_t>(got), MSG_NOSIGNAL);
      const std::size_t taken = put < 0 ? 0 : static_cast<std::size_t>(put);
      if (put < 0 && errno != EAGAIN) return false;
      if (taken < static_cast<std::size_t>(got)) {
        p.pending.assign(buffer_ + taken, static_cast<std::size_t>(got) - taken);
        return true;
      }
      if (got < static_cast<ssize_t>(sizeof buffer_)) return true;  // drained
    }
  }

  bool flush(pipe_end& p) {
    if (p.pending.empty()) return true;
    const ssize_t put = send(p.to, p.pending.data(), p.pending.size(), MSG_NOSIGNAL);
    if (put < 0) return errno == EAGAIN;
    p.pending.erase(0, static_cast<std::size_t>(put));
    return true;
  }

  void drop(connection& c) {
    for (const int fd : {c.up.from, c.up.to}) {
      epoll_ctl(epoll_, EPOLL_CTL_DEL, fd, nullptr);
      close(fd);
    }
    const int a = c.up.from;
    const int b = c.up.to;
    by_fd_.erase(a);  // may destroy c
    by_fd_.erase(b);
  }

  int epoll_ = -1;
  int listener_ = -1;
  std::uint16_t target_port_;
  std::unordered_map<int, std::shared_ptr<connection>> by_fd_;
  char buffer_[64 * 1024];
};

std::uint16_t port_argument(std::string_view text) {
  char* end = nullptr;
  const long value = std::strtol(std::string(text).c_str(), &end, 10);
  if (end == nullptr || *end != '\0' || value < 0 || value > 65535) {
    std::fprintf(stderr, "relay_floor: not a port: %.*s\n", static_cast<int>(text.size()), text.data());
    std::exit(2);
  }
  return static_cast<std::uint16_t>(value);
}

}  // namespace

int main(int argc, char** argv) {
  std::uint16_t listen_port = 0;
  int target_port = -1;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string_view flag = argv[i];
    if (flag == "--listen") {
      listen_port = port_argument(argv[i + 1]);
    } else if (flag == "--to") {
      target_port = port_argument(argv[i + 1]);
    } else {
      std::fprintf(stderr, "relay_floor: unknown flag %s\n", argv[i]);
      return 2;
    }
  }
  if (target_port < 0 || argc % 2 == 0) {
    std::fprintf(stderr, "usage: relay_floor --listen PORT --to PORT (127.0.0.1; --listen 0 picks one)\n");
    return 2;
  }
  relay(listen_port, static_cast<std::uint16_t>(target_port)).run();
}
