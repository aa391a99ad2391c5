// The real gpustream executable, run as a child: replay's reports and exit codes, serve's answers,
// limits, startup errors and shutdown.
#include <gtest/gtest.h>

#include <boost/json.hpp>

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "actors/ledger_claims.hpp"
#include "app/open_files.hpp"
#include "app/replay.hpp"
#include "app/serve.hpp"
#include "events/codec.hpp"
#include "events/event.hpp"
#include "tests/app/example_store.hpp"
#include "tests/events/event_examples.hpp"
#include "tests/storage/store_testing.hpp"

namespace gpustream::app {
namespace {

using namespace std::chrono_literals;
using storage::testing::temp_dir;
using testing::appended_contents;
using testing::delete_first_index_entry;
using testing::make_example_store;
using testing::named_counts;
using testing::text_counts;
using steady = std::chrono::steady_clock;

/// Longest a child may take to start listening or to exit. A healthy run takes milliseconds; the
/// margin is for a loaded CI machine. Every wait in this file is bounded by it.
constexpr auto child_wait_max = 30s;

/// Longest a raw HTTP exchange may block on one send or receive.
constexpr auto socket_wait_max = 10s;

/// The HTTP server's default limits (gateway/http_server.hpp), which `serve` does not change.
constexpr std::size_t body_bytes_max = 1024 * 1024;
constexpr std::size_t header_bytes_max = 16 * 1024;

/// Owns a file descriptor; closes it on destruction.
class unique_fd {
 public:
  explicit unique_fd(int fd = -1) : fd_(fd) {}
  ~unique_fd() { reset(); }
  unique_fd(unique_fd&& other) noexcept : fd_(std::exchange(other.fd_, -1)) {}
  unique_fd& operator=(unique_fd&& other) noexcept {
    if (this != &other) {
      reset();
      fd_ = std::exchange(other.fd_, -1);
    }
    return *this;
  }
  [[nodiscard]] int get() const { return fd_; }
  void reset() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

 private:
  int fd_;
};

/// A child process with stdin on /dev/null and stdout and stderr on pipes. Whatever way a test
/// ends (assertion failures included), the destructor kills the child with SIGKILL if it is still
/// running and reaps it, so that no test leaves a process behind.
class child_process {
 public:
  /// Starts argv[0] (a path, not searched in PATH) with arguments argv[1..].
  /// With `open_files_max`, the child's soft and hard limits on open files are set to it.
  explicit child_process(const std::vector<std::string>& argv, std::optional<rlim_t> open_files_max = {}) {
    std::vector<char*> args;
    for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    int out[2], err[2];
    unique_fd null(::open("/dev/null", O_RDONLY | O_CLOEXEC));
    if (null.get() < 0 || ::pipe2(out, O_CLOEXEC) != 0) return;
    unique_fd out_read(out[0]), out_write(out[1]);
    if (::pipe2(err, O_CLOEXEC) != 0) return;
    unique_fd err_read(err[0]), err_write(err[1]);
    const pid_t pid = ::fork();
    if (pid == 0) {  // the child: only async-signal-safe calls until exec
      ::dup2(null.get(), STDIN_FILENO);
      ::dup2(out_write.get(), STDOUT_FILENO);
      ::dup2(err_write.get(), STDERR_FILENO);
      if (open_files_max) {
        const rlimit limit{*open_files_max, *open_files_max};
        ::setrlimit(RLIMIT_NOFILE, &limit);
      }
      ::execv(args[0], args.data());
      constexpr char message[] = "exec failed\n";
      (void)!::write(STDERR_FILENO, message, sizeof message - 1);  // nothing else to do with a failure
      ::_exit(127);
    }
    if (pid < 0) return;
    pid_ = pid;
    out_ = std::move(out_read);
    err_ = std::move(err_read);
    ::fcntl(out_.get(), F_SETFL, O_NONBLOCK);
    ::fcntl(err_.get(), F_SETFL, O_NONBLOCK);
    // Readable once the child has exited; without it (kernels before 5.3) waits poll in slices.
    exited_ = unique_fd(static_cast<int>(::syscall(SYS_pidfd_open, pid, 0)));
  }

  ~child_process() {
    if (pid_ <= 0 || status_) return;
    ::kill(pid_, SIGKILL);
    int status = 0;
    while (::waitpid(pid_, &status, 0) < 0 && errno == EINTR) {
    }
  }

  child_process(const child_process&) = delete;
  child_process& operator=(const child_process&) = delete;

  [[nodiscard]] bool started() const { return pid_ > 0; }
  [[nodiscard]] pid_t pid() const { return pid_; }
  [[nodiscard]] const std::string& out() const { return out_text_; }
  [[nodiscard]] const std::string& err() const { return err_text_; }
  /// Both streams, for failure messages.
  [[nodiscard]] std::string output() const {
    return "stdout:\n" + out_text_ + "\nstderr:\n" + err_text_;
  }

  void send_signal(int signal) const {
    if (pid_ > 0 && !status_) ::kill(pid_, signal);
  }

  /// Reads output until `done()` holds (true), or the child exits or `wait_max` passes (false).
  [[nodiscard]] bool read_until(const std::function<bool()>& done,
                                steady::duration wait_max = child_wait_max) {
    const auto deadline = steady::now() + wait_max;
    while (!done()) {
      if (status_) {
        drain();  // output written just before exit
        return done();
      }
      if (steady::now() >= deadline) return false;
      pump(deadline);
    }
    return true;
  }

  /// Waits for the child to exit, reading its output meanwhile. Returns its exit code, or 128 plus
  /// the signal that ended it (as a shell reports it); nullopt if it still runs after `wait_max`.
  [[nodiscard]] std::optional<int> wait_exit(steady::duration wait_max = child_wait_max) {
    const auto deadline = steady::now() + wait_max;
    while (!status_ && steady::now() < deadline) pump(deadline);
    if (!status_) return std::nullopt;
    drain();  // output written just before exit
    if (WIFEXITED(*status_)) return WEXITSTATUS(*status_);
    return 128 + WTERMSIG(*status_);
  }

 private:
  /// Waits until output arrives, the child exits or `deadline` passes, and takes what came.
  void pump(steady::time_point deadline) {
    auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline - steady::now());
    if (exited_.get() < 0) left = std::min<std::chrono::milliseconds>(left, 10ms);
    pollfd fds[3] = {{out_.get(), POLLIN, 0}, {err_.get(), POLLIN, 0}, {exited_.get(), POLLIN, 0}};
    // Negative fds (closed pipes, no pidfd) are skipped; what woke us is found by reading.
    (void)::poll(fds, 3, static_cast<int>(std::max<std::int64_t>(left.count(), 0)));
    drain();
    int status = 0;
    if (::waitpid(pid_, &status, WNOHANG) == pid_) status_ = status;
  }

  /// Reads whatever the pipes hold now; closes a pipe at its end.
  void drain() {
    read_available(out_, out_text_);
    read_available(err_, err_text_);
  }

  static void read_available(unique_fd& fd, std::string& text) {
    char buffer[4096];
    while (fd.get() >= 0) {
      const auto n = ::read(fd.get(), buffer, sizeof buffer);
      if (n > 0) {
        text.append(buffer, static_cast<std::size_t>(n));
      } else if (n == 0 || (errno != EINTR && errno != EAGAIN)) {
        fd.reset();  // end of output (or a broken pipe: nothing more will come)
      } else if (errno == EAGAIN) {
        return;
      }
    }
  }

  pid_t pid_ = -1;
  unique_fd out_, err_, exited_;
  std::string out_text_, err_text_;
  std::optional<int> status_;  ///< the raw waitpid status once reaped
};

/// The outcome of a child run to its end.
struct finished {
  int exit_code = -1;  ///< -1: it did not end within child_wait_max and was killed
  std::string out;
  std::string err;
};

/// Runs `argv` to its end (killing it after child_wait_max).
finished run_to_end(const std::vector<std::string>& argv) {
  child_process child(argv);
  EXPECT_TRUE(child.started()) << "cannot start " << argv.at(0) << ": " << std::strerror(errno);
  if (!child.started()) return {};
  const auto code = child.wait_exit();
  EXPECT_TRUE(code.has_value()) << argv.at(0) << " did not exit within the wait; " << child.output();
  return {code.value_or(-1), child.out(), child.err()};
}

finished run_gpustream(std::vector<std::string> args) {
  args.insert(args.begin(), GPUSTREAM_BIN);
  return run_to_end(args);
}

/// The full path of `name` in PATH, or "" if it is not there.
std::string find_in_path(const std::string& name) {
  const char* path = std::getenv("PATH");
  std::string_view rest = path ? path : "/usr/bin:/bin";
  while (!rest.empty()) {
    const auto colon = rest.find(':');
    const auto directory = rest.substr(0, colon);
    rest = colon == std::string_view::npos ? std::string_view{} : rest.substr(colon + 1);
    const auto candidate = std::filesystem::path(directory.empty() ? "." : directory) / name;
    if (::access(candidate.c_str(), X_OK) == 0) return candidate.string();
  }
  return "";
}

struct http_reply {
  int status = 0;
  std::string body;
};

/// One request through the real curl (no proxy, whatever the environment says).
http_reply curl(std::uint16_t port, const std::string& path, std::vector<std::string> options = {}) {
  static const std::string curl_path = find_in_path("curl");
  EXPECT_FALSE(curl_path.empty()) << "these tests need curl in PATH";
  if (curl_path.empty()) return {};
  std::vector<std::string> argv{curl_path, "--silent", "--show-error", "--noproxy", "*",
                                "--max-time", "10", "--write-out", "\n%{http_code}"};
  argv.insert(argv.end(), options.begin(), options.end());
  argv.push_back("http://127.0.0.1:" + std::to_string(port) + path);
  const auto run = run_to_end(argv);
  EXPECT_EQ(run.exit_code, 0) << "curl failed: " << run.err;
  const auto newline = run.out.rfind('\n');
  if (newline == std::string::npos) {
    ADD_FAILURE() << "curl printed no status: " << run.out;
    return {};
  }
  return {std::atoi(run.out.c_str() + newline + 1), run.out.substr(0, newline)};
}

/// A TCP socket bound to 127.0.0.1:`port` (0: any free port), listening if `listen` is set.
unique_fd bound_socket(std::uint16_t port, bool listen) {
  unique_fd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_port = htons(port);
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  EXPECT_EQ(::bind(fd.get(), reinterpret_cast<sockaddr*>(&address), sizeof address), 0)
      << std::strerror(errno);
  if (listen) {
    EXPECT_EQ(::listen(fd.get(), 1), 0) << std::strerror(errno);
  }
  return fd;
}

std::uint16_t port_of(const unique_fd& fd) {
  sockaddr_in address{};
  socklen_t size = sizeof address;
  EXPECT_EQ(::getsockname(fd.get(), reinterpret_cast<sockaddr*>(&address), &size), 0);
  return ntohs(address.sin_port);
}

/// Sends `request` to 127.0.0.1:`port` as is and returns all the server sent back until it closed
/// the connection. A reset after the server answered is fine: it may close with unread input.
std::string raw_exchange(std::uint16_t port, const std::string& request) {
  unique_fd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  const timeval timeout{std::chrono::duration_cast<std::chrono::seconds>(socket_wait_max).count(), 0};
  ::setsockopt(fd.get(), SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
  ::setsockopt(fd.get(), SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof timeout);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_port = htons(port);
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&address), sizeof address) != 0) {
    ADD_FAILURE() << "cannot connect to port " << port << ": " << std::strerror(errno);
    return "";
  }
  for (std::size_t sent = 0; sent < request.size();) {
    const auto n = ::send(fd.get(), request.data() + sent, request.size() - sent, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;  // the server stopped reading; its answer is still to be read
    sent += static_cast<std::size_t>(n);
  }
  std::string reply;
  char buffer[4096];
  for (;;) {
    const auto n = ::recv(fd.get(), buffer, sizeof buffer, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    reply.append(buffer, static_cast<std::size_t>(n));
  }
  return reply;
}

/// The status code of a raw HTTP/1.1 reply, 0 if it is not one.
int status_of(const std::string& reply) {
  if (!reply.starts_with("HTTP/1.1 ") || reply.size() < 12) return 0;
  return std::atoi(reply.c_str() + 9);
}

/// The port in serve's "listening http=HOST:PORT ..." log line, 0 if there is none yet.
std::uint16_t listening_port(const std::string& log) {
  const auto at = log.find("listening http=");
  if (at == std::string::npos) return 0;
  const auto end = log.find_first_of(" \n", at + 15);
  if (end == std::string::npos) return 0;
  const auto colon = log.rfind(':', end);
  return static_cast<std::uint16_t>(std::atoi(log.c_str() + colon + 1));
}

// ---- replay ----

TEST(cli_replay, prints_the_count_of_each_type_and_the_last_position) {
  temp_dir dir;
  const auto contents = make_example_store(dir.path());
  ASSERT_FALSE(::testing::Test::HasFailure());
  const auto run = run_gpustream({"replay", "--data", dir.path().string()});
  ASSERT_EQ(run.exit_code, 0) << run.err;
  EXPECT_EQ(text_counts(run.out), named_counts(contents.events_per_type)) << run.out;
  const auto totals = "events " + std::to_string(contents.events) + ", streams " +
                      std::to_string(contents.streams.size()) + ", last position " +
                      std::to_string(contents.last_position) + ",";
  EXPECT_NE(run.out.find(totals), std::string::npos) << run.out;
  EXPECT_EQ(run.err, "");
}

TEST(cli_replay, verify_reports_the_index_checks) {
  temp_dir dir;
  (void)make_example_store(dir.path());
  ASSERT_FALSE(::testing::Test::HasFatalFailure());
  const auto result = run_gpustream({"replay", "--data", dir.path().string(), "--verify"});
  EXPECT_EQ(result.exit_code, 0) << result.err;
  EXPECT_NE(result.out.find("indexes verified"), std::string::npos) << result.out;
  delete_first_index_entry(dir.path(), "dedup");
  const auto broken = run_gpustream({"replay", "--data", dir.path().string(), "--verify"});
  EXPECT_EQ(broken.exit_code, 1) << broken.out;
  EXPECT_NE(broken.err.find("problem"), std::string::npos) << broken.err;
}

TEST(cli_replay, json_is_valid_and_carries_the_counts) {
  temp_dir dir;
  const auto contents = make_example_store(dir.path());
  ASSERT_FALSE(::testing::Test::HasFailure());
  const auto run = run_gpustream({"replay", "--data", dir.path().string(), "--json"});
  ASSERT_EQ(run.exit_code, 0) << run.err;
  boost::system::error_code ec;
  const auto parsed = boost::json::parse(run.out, ec);
  ASSERT_FALSE(ec) << ec.message() << " in: " << run.out;
  ASSERT_TRUE(parsed.is_object()) << run.out;
  const auto& json = parsed.as_object();
  EXPECT_EQ(boost::json::value_to<std::uint64_t>(json.at("events")), contents.events);
  EXPECT_EQ(boost::json::value_to<std::uint64_t>(json.at("streams")), contents.streams.size());
  EXPECT_EQ(boost::json::value_to<std::uint64_t>(json.at("last_position")), contents.last_position);
  std::map<std::string, std::uint64_t> per_type;
  for (const auto& [name, count] : json.at("events_per_type").as_object()) {
    per_type.emplace(name, boost::json::value_to<std::uint64_t>(count));
  }
  EXPECT_EQ(per_type, named_counts(contents.events_per_type));
}

TEST(cli_replay, a_corrupted_store_exits_1_naming_the_position) {
  temp_dir dir;
  const auto contents = make_example_store(dir.path());
  ASSERT_FALSE(::testing::Test::HasFailure());
  ASSERT_LT(23u, contents.last_position);
  ASSERT_NO_FATAL_FAILURE(testing::flip_byte_of_record(dir.path(), 23, 40));
  const auto run = run_gpustream({"replay", "--data", dir.path().string()});
  EXPECT_EQ(run.exit_code, 1);
  EXPECT_NE(run.err.find("problem at position 23:"), std::string::npos) << run.err;
  EXPECT_NE(run.err.find("CRC32C"), std::string::npos) << run.err;
  EXPECT_EQ(run.out, "") << "a failed replay printed a report";
}

TEST(cli_replay, a_problem_with_json_is_a_json_object_on_stdout_for_scripts) {
  temp_dir dir;
  const auto contents = make_example_store(dir.path());
  ASSERT_FALSE(::testing::Test::HasFailure());
  ASSERT_NO_FATAL_FAILURE(testing::flip_byte_of_record(dir.path(), 23, 40));
  const auto run = run_gpustream({"replay", "--data", dir.path().string(), "--json"});
  EXPECT_EQ(run.exit_code, 1);
  boost::system::error_code ec;
  const auto parsed = boost::json::parse(run.out, ec);
  ASSERT_FALSE(ec) << ec.message() << " in: " << run.out;
  EXPECT_EQ(parsed.at("ok"), false);
  EXPECT_EQ(parsed.at("position"), 23);
  EXPECT_NE(std::string(parsed.at("message").as_string()).find("CRC32C"), std::string::npos) << run.out;
  EXPECT_NE(run.err.find("problem at position 23:"), std::string::npos) << run.err;
  const auto good_dir = temp_dir{};
  (void)make_example_store(good_dir.path());
  const auto good = run_gpustream({"replay", "--data", good_dir.path().string(), "--json"});
  EXPECT_EQ(boost::json::parse(good.out).at("ok"), true) << good.out;
}

TEST(cli_replay, a_report_that_cannot_be_written_exits_1) {
  temp_dir dir;
  (void)make_example_store(dir.path());
  ASSERT_FALSE(::testing::Test::HasFailure());
  ASSERT_TRUE(std::filesystem::exists("/dev/full"));
  const auto run = run_to_end({"/bin/sh", "-c", std::string(GPUSTREAM_BIN) + " replay --data '" + dir.path().string() + "' > /dev/full"});
  EXPECT_EQ(run.exit_code, 1);
  EXPECT_NE(run.err.find("the report could not be written"), std::string::npos) << run.err;
}

TEST(cli_replay, a_missing_directory_exits_1_saying_there_is_no_event_store) {
  temp_dir dir;
  const auto missing = dir.path() / "never-served";
  const auto run = run_gpustream({"replay", "--data", missing.string()});
  EXPECT_EQ(run.exit_code, 1);
  EXPECT_NE(run.err.find("no event store in " + missing.string()), std::string::npos) << run.err;
  EXPECT_EQ(run.err.find("at position 0"), std::string::npos) << "not about a record: " << run.err;
  EXPECT_EQ(run.out, "");
}

// ---- serve: startup errors ----

TEST(cli_serve_errors, http_that_is_not_host_port_exits_2_naming_the_option) {
  temp_dir dir;
  const auto data = dir.path() / "data";
  const auto run = run_gpustream({"serve", "--data", data.string(), "--http", "nonsense"});
  EXPECT_EQ(run.exit_code, 2);
  EXPECT_NE((run.out + run.err).find("--http must be HOST:PORT"), std::string::npos) << run.out << run.err;
  EXPECT_FALSE(std::filesystem::exists(data)) << "serve created a store before checking its options";
}

TEST(cli_serve_errors, a_port_out_of_range_or_not_decimal_digits_exits_2_naming_the_option) {
  temp_dir dir;
  for (const std::string port : {"65536", "+8080", " 8080", "-0", "80x", "0x50", "99999999999999999999999"}) {
    const auto run =
        run_gpustream({"serve", "--data", (dir.path() / "data").string(), "--http", "127.0.0.1:" + port});
    EXPECT_EQ(run.exit_code, 2) << port;
    EXPECT_NE((run.out + run.err).find("--http port must be 0 to 65535, not '" + port + "'"), std::string::npos)
        << run.out << run.err;
  }
}

TEST(cli_serve_errors, thread_counts_limits_and_intervals_out_of_range_are_refused_naming_the_range) {
  temp_dir dir;
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"--http-threads", "0"}, {"--http-threads", "65"}, {"--actor-threads", "257"}, {"--live-jobs-max", "0"}, {"--live-jobs-max", "100001"},
      {"--stream-flush-ms", "1001"}, {"--sync-interval-us", "1000001"}, {"--rate-per-minute", "0"},
      {"--rate-burst", "0"}, {"--rate-burst", "1000001"}, {"--heartbeat-ms", "49"}, {"--heartbeat-ms", "60001"},
      {"--drain-s", "3601"}};
  for (const auto& [flag, value] : cases) {
    const auto run = run_gpustream({"serve", "--data", (dir.path() / "data").string(), flag, value});
    EXPECT_NE(run.exit_code, 0) << flag << " " << value;
    EXPECT_NE((run.out + run.err).find(flag + ": Value " + value + " not in range"), std::string::npos)
        << run.out << run.err;
    EXPECT_FALSE(std::filesystem::exists(dir.path() / "data")) << "nothing opened for " << flag;
  }
}

TEST(cli_serve_errors, a_public_url_or_cors_origin_that_could_not_work_exits_2_naming_it) {
  temp_dir dir;
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"--public-url", "gpu.example.com"}, {"--public-url", "ftp://gpu.example.com"}, {"--public-url", "https:///a"},
      {"--cors-origin", "*"}, {"--cors-origin", "https://app.example.com/page"}, {"--cors-origin", "app.example.com"}};
  for (const auto& [flag, value] : cases) {
    const auto run = run_gpustream({"serve", "--data", (dir.path() / "data").string(), flag, value});
    EXPECT_EQ(run.exit_code, 2) << flag << " " << value;
    EXPECT_NE((run.out + run.err).find(flag + " '" + value + "'"), std::string::npos) << run.out << run.err;
    EXPECT_FALSE(std::filesystem::exists(dir.path() / "data")) << "nothing opened for " << flag;
  }
}

TEST(cli_usage_errors, a_misspelt_secret_option_exits_2_naming_the_option_but_not_the_value) {
  for (const std::vector<std::string>& argv :
       {std::vector<std::string>{"serve", "--admin-tokn", "s3cret-value-000000"},
        std::vector<std::string>{"provider", "--coordinator", "ws://127.0.0.1:9", "--backend", "openai=http://127.0.0.1:9/v1",
                                 "--tokn=s3cret-value-000000"}}) {
    const auto run = run_gpustream(argv);
    EXPECT_EQ(run.exit_code, 2) << argv.at(1);
    const auto said = run.out + run.err;
    EXPECT_EQ(said.find("s3cret"), std::string::npos) << said;
    EXPECT_NE(said.find("unexpected arguments: --"), std::string::npos) << said;
    EXPECT_NE(said.find(argv.at(0) == "serve" ? "--admin-tokn" : "--tokn"), std::string::npos) << said;
  }
}

TEST(cli_usage_errors, durability_is_taken_by_name_only) {
  // CLI11's enum transformer also took the enumerators' numbers: "1" was buffered, no fsync.
  temp_dir dir;
  for (const std::string value : {"1", "0", "fast"}) {
    const auto run = run_gpustream({"serve", "--data", (dir.path() / "data").string(), "--durability", value});
    EXPECT_EQ(run.exit_code, 2) << value;
    EXPECT_NE((run.out + run.err).find("--durability: " + value + " not in {sync,buffered}"), std::string::npos)
        << run.out << run.err;
    EXPECT_FALSE(std::filesystem::exists(dir.path() / "data")) << value;
  }
}

TEST(cli_serve_errors, an_admin_token_no_client_could_send_or_anyone_could_guess_exits_2_without_quoting_it) {
  temp_dir dir;
  const std::vector<std::pair<std::string, std::string>> cases = {
      {" leading-space-secret-0", "printable ASCII without spaces: byte 1 of 23"},
      {"trailing-newline-secret\n", "printable ASCII without spaces: byte 24 of 24"},
      {"caf\xC3\xA9-secret-0000000", "printable ASCII without spaces: byte 4 of 20"},
      {"s3cret", "at least 16 characters, not 6"}};
  for (const auto& [token, expected] : cases) {
    const auto run = run_gpustream({"serve", "--data", (dir.path() / "data").string(), "--admin-token", token});
    EXPECT_EQ(run.exit_code, 2) << expected;
    const auto said = run.out + run.err;
    EXPECT_NE(said.find("--admin-token (or GPUSTREAM_ADMIN_TOKEN) must be"), std::string::npos) << said;
    EXPECT_NE(said.find(expected), std::string::npos) << said;
    EXPECT_EQ(said.find("secret"), std::string::npos) << said;
    EXPECT_EQ(said.find("s3cret"), std::string::npos) << said;
    EXPECT_FALSE(std::filesystem::exists(dir.path() / "data")) << expected;
  }
  EXPECT_TRUE(checked_admin_token(""));
  EXPECT_TRUE(checked_admin_token(std::string(16, 'a')));
  EXPECT_FALSE(checked_admin_token(std::string(15, 'a')));
}

TEST(cli_serve_errors, an_ipv6_address_goes_in_brackets) {
  temp_dir dir;
  for (const std::string http : {"::1", "::1:8080", "[::1]", "[::1]8080", "[]:8080"}) {
    const auto run = run_gpustream({"serve", "--data", (dir.path() / "data").string(), "--http", http});
    EXPECT_EQ(run.exit_code, 2) << http;
    EXPECT_NE((run.out + run.err).find("--http must be HOST:PORT, e.g. 127.0.0.1:8080 or [::1]:8080"),
              std::string::npos)
        << run.out << run.err;
  }
}

TEST(serve_options, connections_leave_the_store_its_reserve_or_a_quarter_of_a_low_limit) {
  EXPECT_EQ(connections_within(1'024), 768u);
  EXPECT_EQ(connections_within(2'048), 1'536u);
  EXPECT_EQ(connections_within(8'192), 7'168u);
  EXPECT_EQ(connections_within(1'048'576), 1'047'552u);
  EXPECT_EQ(connections_within(1), 1u);
}

TEST(serve_options, a_public_url_loses_its_trailing_slashes_and_an_origin_is_written_as_browsers_send_it) {
  // A trailing slash made every click URL's path begin with "//", which the gateway routes nowhere;
  // an origin pasted from the address bar ("…/") or written in capitals matched no Origin header.
  EXPECT_EQ(checked_public_url("https://gpu.example.com/").value(), "https://gpu.example.com");
  EXPECT_EQ(checked_public_url("HTTP://gpu.example.com:8080/gs//").value(), "http://gpu.example.com:8080/gs");
  EXPECT_EQ(checked_origin("https://App.Example.com/").value(), "https://app.example.com");
  EXPECT_EQ(checked_origin("http://127.0.0.1:5173").value(), "http://127.0.0.1:5173");
  EXPECT_EQ(checked_origin("https://app.example.com:443").value(), "https://app.example.com");
  EXPECT_EQ(checked_origin("http://app.example.com:80").value(), "http://app.example.com");
  EXPECT_EQ(checked_origin("http://app.example.com:8080").value(), "http://app.example.com:8080");
  EXPECT_FALSE(checked_public_url("https://gpu.example.com/?x=1"));
  EXPECT_FALSE(checked_public_url("https://gpu.example.com#top"));
  EXPECT_FALSE(checked_origin("https://a.example.com/x"));
  EXPECT_FALSE(checked_origin("https://*.example.com"));
}

TEST(cli_provider_errors, backend_timeouts_out_of_range_are_refused_naming_the_range) {
  for (const auto& [flag, value] : std::vector<std::pair<std::string, std::string>>{
           {"--backend-first-token-timeout-s", "0"}, {"--backend-idle-timeout-s", "241"}}) {
    const auto run = run_gpustream({"provider", "--coordinator", "ws://127.0.0.1:9", "--token", "t",
                                    "--backend", "openai=http://127.0.0.1:9/v1", flag, value});
    EXPECT_NE(run.exit_code, 0) << flag << " " << value;
    EXPECT_NE((run.out + run.err).find(flag + ": Value " + value + " not in range"), std::string::npos)
        << run.out << run.err;
  }
}

TEST(cli_errors, counts_and_amounts_must_be_decimal_digits) {
  // CLI11 alone would read "010" as 8 and "0x10" as 16, and take "+5" and " 5".
  for (const std::string value : {"010", "0x10", "+5", " 5", "-1", "5 ", "1e3", ""}) {
    const auto provider = run_gpustream({"provider", "--coordinator", "ws://127.0.0.1:9", "--token", "t", "--backend",
                                         "openai=http://127.0.0.1:9/v1", "--price-per-mtok", value});
    EXPECT_EQ(provider.exit_code, 2) << "'" << value << "'";
    EXPECT_NE((provider.out + provider.err).find("--price-per-mtok: must be written in decimal digits, without a sign or a leading 0, not '" + value + "'"),
              std::string::npos)
        << provider.out << provider.err;
  }
  temp_dir dir;
  const auto serve = run_gpustream({"serve", "--data", (dir.path() / "data").string(), "--drain-s", "010"});
  EXPECT_EQ(serve.exit_code, 2);
  EXPECT_NE((serve.out + serve.err).find("--drain-s: must be written in decimal digits"), std::string::npos)
      << serve.out << serve.err;
}

TEST(cli_provider_errors, a_backend_url_carrying_a_secret_is_refused_without_logging_it) {
  for (const std::string backend : {"openai=http://user:s3cret@127.0.0.1:9/v1", "openai=http://127.0.0.1:9/v1?api-key=s3cret"}) {
    const auto run = run_gpustream({"provider", "--coordinator", "ws://127.0.0.1:9", "--token", "t", "--backend", backend});
    EXPECT_EQ(run.exit_code, 1) << backend;
    const auto said = run.out + run.err;
    EXPECT_NE(said.find("--backend: upstream base_url must not carry"), std::string::npos) << said;
    EXPECT_EQ(said.find("s3cret"), std::string::npos) << said;
  }
}

TEST(cli_serve_errors, a_data_directory_holding_a_foreign_file_exits_1_and_keeps_it) {
  temp_dir dir;
  const auto foreign = dir.path() / "thesis.tex";
  std::ofstream(foreign) << "\\documentclass{article}\n";
  const auto run = run_gpustream({"serve", "--data", dir.path().string(), "--http", "127.0.0.1:0"});
  EXPECT_EQ(run.exit_code, 1);
  EXPECT_NE((run.out + run.err).find("is not empty and holds no gpustream event store"),
            std::string::npos)
      << run.out << run.err;
  EXPECT_TRUE(std::filesystem::exists(foreign));
  EXPECT_FALSE(std::filesystem::exists(dir.path() / "CURRENT")) << "serve wrote a store over it";
}

TEST(cli_serve_errors, a_port_in_use_exits_1_naming_the_address) {
  temp_dir dir;
  const auto taken = bound_socket(0, true);
  ASSERT_FALSE(::testing::Test::HasFailure());
  const auto address = "127.0.0.1:" + std::to_string(port_of(taken));
  const auto run = run_gpustream({"serve", "--data", dir.path().string(), "--http", address});
  EXPECT_EQ(run.exit_code, 1);
  EXPECT_NE((run.out + run.err).find("cannot listen on " + address), std::string::npos)
      << run.out << run.err;
}

// ---- serve: a running node ----

/// Starts `gpustream serve` on a store holding every example event, with `http` as its address.
/// Returns the child once its log says it listens; the caller checks started() and port().
struct running_serve {
  std::unique_ptr<child_process> child;
  std::uint16_t port = 0;
};

running_serve start_serve(const std::filesystem::path& data, const std::string& http,
                          std::optional<rlim_t> open_files_max = {}, const std::vector<std::string>& more = {}) {
  running_serve serve;
  std::vector<std::string> argv{GPUSTREAM_BIN, "serve", "--data", data.string(), "--http", http};
  argv.insert(argv.end(), more.begin(), more.end());
  serve.child = std::make_unique<child_process>(argv, open_files_max);
  if (!serve.child->started()) return serve;
  // spdlog's default logger writes to stdout; look at both streams so a change of sink is harmless.
  (void)serve.child->read_until([&] {
    return listening_port(serve.child->err()) != 0;
  });
  serve.port = listening_port(serve.child->err());  // logs go to stderr
  return serve;
}

class cli_serve : public ::testing::Test {
 protected:
  void SetUp() override {
    contents_ = make_example_store(dir_.path());
    ASSERT_FALSE(HasFailure());
    serve_ = start_serve(dir_.path(), "127.0.0.1:0");
    ASSERT_TRUE(serve_.child->started()) << std::strerror(errno);
    ASSERT_NE(serve_.port, 0) << "serve did not log that it listens; " << serve_.child->output();
  }

  [[nodiscard]] std::uint16_t port() const { return serve_.port; }

  temp_dir dir_;  // declared first: removed after the server is gone
  appended_contents contents_;
  running_serve serve_;
};

TEST_F(cli_serve, healthz_answers_200_with_the_last_position) {
  const auto reply = curl(port(), "/healthz");
  EXPECT_EQ(reply.status, 200);
  boost::system::error_code ec;
  const auto parsed = boost::json::parse(reply.body, ec);
  ASSERT_FALSE(ec) << ec.message() << " in: " << reply.body;
  ASSERT_TRUE(parsed.is_object()) << reply.body;
  const auto& json = parsed.as_object();
  EXPECT_EQ(json.size(), 2u) << reply.body;
  ASSERT_TRUE(json.at("status").is_string()) << reply.body;
  EXPECT_EQ(json.at("status").as_string(), "ok") << reply.body;
  EXPECT_EQ(boost::json::value_to<std::uint64_t>(json.at("last_position")), contents_.last_position);
}

TEST_F(cli_serve, an_unknown_path_is_404) {
  const auto reply = curl(port(), "/nope");
  EXPECT_EQ(reply.status, 404);
  EXPECT_NE(reply.body.find("no such endpoint"), std::string::npos) << reply.body;
}

TEST_F(cli_serve, post_to_healthz_is_405_with_the_allowed_method) {
  const auto reply = raw_exchange(port(), "POST /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
                                          "Content-Length: 0\r\n\r\n");
  EXPECT_EQ(status_of(reply), 405) << reply;
  EXPECT_NE(reply.find("\r\nAllow: GET, HEAD\r\n"), std::string::npos) << reply;
  EXPECT_NE(reply.find("/healthz answers GET, HEAD only, not POST"), std::string::npos) << reply;
}

TEST_F(cli_serve, a_head_gets_the_get_answers_headers_and_no_body_and_a_click_link_only_answers_get) {
  // Keep-alive: a body sent after a HEAD's headers would be read as the start of the next answer.
  const auto reply = raw_exchange(port(), "HEAD /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n"
                                          "GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
  EXPECT_EQ(status_of(reply), 200) << reply;
  const auto second = reply.find("HTTP/1.1 ", 1);
  ASSERT_NE(second, std::string::npos) << reply;
  const std::string head = reply.substr(0, second);
  const std::string after = reply.substr(second);
  EXPECT_TRUE(head.ends_with("\r\n\r\n")) << "no body after the HEAD's headers: " << head;
  EXPECT_EQ(status_of(after), 200) << after;
  const auto length = [](const std::string& answer) {
    const auto at = answer.find("Content-Length: ");
    return at == std::string::npos ? std::string("none") : answer.substr(at + 16, answer.find("\r\n", at) - at - 16);
  };
  EXPECT_EQ(length(head), length(after)) << "the length its GET has";
  EXPECT_NE(length(head), "0");
  const auto click = raw_exchange(port(), "HEAD /a/c/imp_x HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
  EXPECT_EQ(status_of(click), 405) << "a link checker's HEAD records no click: " << click;
  EXPECT_NE(click.find("\r\nAllow: GET\r\n"), std::string::npos) << click;
}

TEST_F(cli_serve, a_body_of_exactly_the_limit_is_read) {
  const std::string body(body_bytes_max, 'x');
  const auto reply = raw_exchange(port(), "POST /healthz HTTP/1.1\r\nHost: localhost\r\n"
                                          "Connection: close\r\nContent-Length: " +
                                              std::to_string(body.size()) + "\r\n\r\n" + body);
  EXPECT_EQ(status_of(reply), 405) << reply;  // read in full, then refused for its method
}

TEST_F(cli_serve, a_body_over_the_limit_is_413) {
  // Only the headers are sent: the server must refuse from Content-Length alone, before the body.
  const auto reply = raw_exchange(port(), "POST /healthz HTTP/1.1\r\nHost: localhost\r\n"
                                          "Connection: close\r\nContent-Length: " +
                                              std::to_string(body_bytes_max + 1) + "\r\n\r\n");
  EXPECT_EQ(status_of(reply), 413) << reply;
}

TEST_F(cli_serve, headers_well_under_16_KiB_are_read) {
  // Over Beast's own 8 KiB default, so this fails if serve's 16 KiB limit were not applied.
  const std::string filler(header_bytes_max - 1024, 'a');
  const auto reply = raw_exchange(port(), "GET /healthz HTTP/1.1\r\nHost: localhost\r\n"
                                          "Connection: close\r\nX-Filler: " +
                                              filler + "\r\n\r\n");
  EXPECT_EQ(status_of(reply), 200) << reply.substr(0, 200);
}

TEST_F(cli_serve, headers_over_16_KiB_are_431) {
  const std::string filler(header_bytes_max + 1024, 'a');
  const auto reply = raw_exchange(port(), "GET /healthz HTTP/1.1\r\nHost: localhost\r\n"
                                          "Connection: close\r\nX-Filler: " +
                                              filler + "\r\n\r\n");
  EXPECT_EQ(status_of(reply), 431) << reply.substr(0, 200);
}

TEST_F(cli_serve, sigterm_stops_it_with_exit_code_0) {
  serve_.child->send_signal(SIGTERM);
  const auto code = serve_.child->wait_exit();
  ASSERT_TRUE(code.has_value()) << "serve still runs after SIGTERM; " << serve_.child->output();
  EXPECT_EQ(*code, 0) << serve_.child->output();
  EXPECT_NE(serve_.child->err().find("stopping signal=" + std::to_string(SIGTERM)), std::string::npos)
      << serve_.child->output();
  // It closed the store cleanly: a replay finds every event.
  const auto replay = run_gpustream({"replay", "--data", dir_.path().string()});
  EXPECT_EQ(replay.exit_code, 0) << replay.err;
}

TEST_F(cli_serve, sighup_stops_it_after_a_drain_as_sigterm_does) {
  // The terminal that started it closed: not a death without a drain.
  serve_.child->send_signal(SIGHUP);
  const auto code = serve_.child->wait_exit();
  ASSERT_TRUE(code.has_value()) << "serve still runs after SIGHUP; " << serve_.child->output();
  EXPECT_EQ(*code, 0) << serve_.child->output();
  EXPECT_NE(serve_.child->err().find("stopping signal=" + std::to_string(SIGHUP)), std::string::npos)
      << serve_.child->output();
}

TEST(cli_serve_signals, under_nohup_a_hang_up_is_ignored) {
  // A blocked signal reaches sigwait even when ignored: serve must not block it then.
  temp_dir dir;
  (void)make_example_store(dir.path());
  child_process serve({"/usr/bin/nohup", GPUSTREAM_BIN, "serve", "--data", dir.path().string(), "--http",
                       "127.0.0.1:0"});
  ASSERT_TRUE(serve.started());
  ASSERT_TRUE(serve.read_until([&] { return listening_port(serve.err()) != 0; })) << serve.output();
  serve.send_signal(SIGHUP);
  serve.send_signal(SIGTERM);  // after it: a hang-up taken would have stopped it, and this killed it
  const auto code = serve.wait_exit();
  ASSERT_TRUE(code.has_value()) << serve.output();
  EXPECT_EQ(*code, 0) << serve.output();
  EXPECT_NE(serve.err().find("stopping signal=" + std::to_string(SIGTERM)), std::string::npos) << serve.output();
}

TEST(cli_provider_signals, a_hang_up_drains_the_agent_as_sigterm_does) {
  // Its terminal closed: not a death without a drain (an answer cut off counts against it).
  child_process provider({GPUSTREAM_BIN, "provider", "--coordinator", "ws://127.0.0.1:9", "--token", "t",
                          "--backend", "openai=http://127.0.0.1:9/v1"});
  ASSERT_TRUE(provider.started());
  ASSERT_TRUE(provider.read_until([&] { return provider.err().find("starting name=") != std::string::npos; }))
      << provider.output();
  provider.send_signal(SIGHUP);
  const auto code = provider.wait_exit();
  ASSERT_TRUE(code.has_value()) << "the agent still runs after SIGHUP; " << provider.output();
  EXPECT_EQ(*code, 0) << provider.output();
  EXPECT_NE(provider.err().find("stopping on signal " + std::to_string(SIGHUP)), std::string::npos)
      << provider.output();
}

TEST_F(cli_serve, a_second_serve_on_its_data_directory_is_refused_saying_why) {
  const auto second = run_gpustream({"serve", "--data", dir_.path().string(), "--http", "127.0.0.1:0"});
  EXPECT_EQ(second.exit_code, 1) << second.out << second.err;
  EXPECT_NE((second.out + second.err).find("is in use by another process (another `gpustream serve`?)"),
            std::string::npos)
      << second.out << second.err;
  EXPECT_EQ(curl(port(), "/healthz").status, 200) << "the first one stopped answering";
}

TEST_F(cli_serve, its_store_reads_as_in_use_until_it_stops) {
  // replay --verify notes it with a broken invariant: serve's step under way reads as half done.
  EXPECT_TRUE(store_in_use(dir_.path()));
  serve_.child->send_signal(SIGTERM);
  ASSERT_TRUE(serve_.child->wait_exit().has_value()) << serve_.child->output();
  EXPECT_FALSE(store_in_use(dir_.path()));
}

TEST_F(cli_serve, replay_runs_beside_it) {
  const auto run = run_gpustream({"replay", "--data", dir_.path().string(), "--json"});
  ASSERT_EQ(run.exit_code, 0) << run.err;
  const auto json = boost::json::parse(run.out).as_object();
  EXPECT_EQ(boost::json::value_to<std::uint64_t>(json.at("events")), contents_.events);
  EXPECT_EQ(curl(port(), "/healthz").status, 200) << "serve stopped answering during a replay";
}

/// `replay --data DIR --verify --json`'s count of claimed unique keys; fails the test on an error.
std::uint64_t verified_unique_keys(const std::filesystem::path& data) {
  const auto run = run_gpustream({"replay", "--data", data.string(), "--verify", "--json"});
  EXPECT_EQ(run.exit_code, 0) << run.err;
  if (run.exit_code != 0) return 0;
  return boost::json::value_to<std::uint64_t>(boost::json::parse(run.out).as_object().at("index_unique_keys"));
}

TEST(cli_serve_upgrade, a_store_of_format_1_is_upgraded_claiming_the_ledgers_ids_and_still_verifies) {
  temp_dir dir;
  const auto contents = make_example_store(dir.path(), testing::ledger_claims::none);
  ASSERT_FALSE(::testing::Test::HasFailure());
  const auto transfers = contents.events_per_type.at(events::type_of(events::event{events::transfer_recorded{}}));
  ASSERT_GT(transfers, 0u);
  // As a build before claimed keys left it.
  storage::testing::raw_put(dir.path(), "default", "format_version", std::string("\0\0\0\0\0\0\0\x01", 8));
  ASSERT_FALSE(::testing::Test::HasFailure());
  EXPECT_EQ(verified_unique_keys(dir.path()), 0u) << "replay reads a format 1 store as it is";

  auto serve = start_serve(dir.path(), "127.0.0.1:0");
  ASSERT_TRUE(serve.child->started()) << std::strerror(errno);
  ASSERT_NE(serve.port, 0) << serve.child->output();
  const std::string upgraded = "event store upgraded to format 2: ";
  const auto at = serve.child->err().find(upgraded);
  ASSERT_NE(at, std::string::npos) << serve.child->output();
  const auto claimed = std::stoull(serve.child->err().substr(at + upgraded.size()));
  // One key per transfer, and one per group (a group holds one or more of them).
  EXPECT_GT(claimed, transfers);
  EXPECT_LE(claimed, 2 * transfers);
  EXPECT_EQ(curl(serve.port, "/healthz").status, 200);
  serve.child->send_signal(SIGTERM);
  const auto code = serve.child->wait_exit();
  ASSERT_TRUE(code.has_value()) << serve.child->output();
  EXPECT_EQ(*code, 0) << serve.child->output();

  EXPECT_EQ(verified_unique_keys(dir.path()), claimed) << "every claim names a recorded position";
  // Upgraded once: the next start finds format 2 and claims nothing more.
  auto again = start_serve(dir.path(), "127.0.0.1:0");
  ASSERT_NE(again.port, 0) << again.child->output();
  EXPECT_EQ(again.child->err().find("upgrad"), std::string::npos) << again.child->output();
}

TEST(cli_serve_upgrade, a_transfer_id_applied_twice_before_claims_is_claimed_once_and_named) {
  // The same example store, its ledger claimed as the ledger does: the keys an upgrade claims.
  temp_dir reference;
  (void)make_example_store(reference.path());
  ASSERT_FALSE(::testing::Test::HasFailure());
  const auto ledger_keys = verified_unique_keys(reference.path());
  ASSERT_GT(ledger_keys, 0u);

  temp_dir dir;
  (void)make_example_store(dir.path(), testing::ledger_claims::none);
  ASSERT_FALSE(::testing::Test::HasFailure());
  {
    // What the claims prevent from now on: job-1's usage applied again, in a group of its own.
    storage::store_options options;
    options.mode = storage::durability::buffered;
    auto store = storage::event_store::open(dir.path(), options);
    ASSERT_TRUE(store) << store.error().message;
    const events::event again = events::transfer_recorded{
        "job-1/usage", "user-ada", "provider-17", 4'000, events::transfer_kind::usage, "test", "job-1-again",
        1'700'000'001'000'000};
    storage::stream_append append{"ledger", storage::any_version, {}};
    append.events.push_back({storage::testing::make_id(0x7e5, 1), events::type_of(again), events::encode_payload(again)});
    auto appended = (*store)->append({std::move(append)});
    ASSERT_TRUE(appended) << appended.error().message;
  }
  storage::testing::raw_put(dir.path(), "default", "format_version", std::string("\0\0\0\0\0\0\0\x01", 8));
  ASSERT_FALSE(::testing::Test::HasFailure());

  auto serve = start_serve(dir.path(), "127.0.0.1:0");
  ASSERT_NE(serve.port, 0) << serve.child->output();
  const std::string upgraded = "event store upgraded to format 2: ";
  const auto at = serve.child->err().find(upgraded);
  ASSERT_NE(at, std::string::npos) << serve.child->output();
  // The repeated transfer id is claimed once; its new group id is one more key.
  EXPECT_EQ(std::stoull(serve.child->err().substr(at + upgraded.size())), ledger_keys + 1) << serve.child->output();
  EXPECT_NE(serve.child->err().find("names 1 transfer or group ids again after their first use"), std::string::npos)
      << serve.child->output();
  serve.child->send_signal(SIGTERM);
  ASSERT_TRUE(serve.child->wait_exit().has_value()) << serve.child->output();

  const auto run = run_gpustream({"replay", "--data", dir.path().string(), "--verify"});
  EXPECT_EQ(run.exit_code, 1) << run.out << run.err;
  EXPECT_NE(run.err.find("\"job-1/usage\""), std::string::npos) << run.err;
  EXPECT_NE(run.err.find("applied twice"), std::string::npos) << run.err;
}

/// One stream's story for append_stories: appended at `expected_version`, its event ids tagged `id_tag`.
struct story_part {
  std::string stream;
  std::uint64_t expected_version = storage::no_stream;
  std::vector<events::event> story;
  std::uint64_t id_tag = 0;
};

/// Appends each part, one append per part, to the store in `data` (closed).
void append_stories(const std::filesystem::path& data, const std::vector<story_part>& parts) {
  storage::store_options options;
  options.mode = storage::durability::buffered;
  auto store = storage::event_store::open(data, options);
  ASSERT_TRUE(store) << store.error().message;
  for (const auto& part : parts) {
    storage::stream_append append{part.stream, part.expected_version, {}};
    actors::ledger_key_namer claim;  // the ledger's appends claim their ids, as the ledger actor's do
    for (std::size_t n = 0; n < part.story.size(); ++n) {
      append.events.push_back({storage::testing::make_id(part.id_tag, n), events::type_of(part.story[n]),
                               events::encode_payload(part.story[n])});
      if (part.stream == actors::ledger_stream) {
        claim(part.story[n], [&](std::string key) { append.unique_keys.push_back(std::move(key)); });
      }
    }
    auto appended = (*store)->append({std::move(append)});
    ASSERT_TRUE(appended) << appended.error().message;
  }
}

/// The last event of `stream` in the store in `data` (closed).
std::optional<events::event> last_event(const std::filesystem::path& data, const std::string& stream) {
  storage::store_options options;
  options.read_only = true;
  auto store = storage::event_store::open(data, options);
  if (!store) return std::nullopt;
  auto version = (*store)->stream_version(stream);
  if (!version || *version == 0) return std::nullopt;
  auto records = (*store)->read_stream(stream, *version, *version, 1);
  if (!records || records->size() != 1) return std::nullopt;
  const auto& r = records->front();
  auto event = events::decode_payload(r.type, {reinterpret_cast<const std::byte*>(r.payload.data()), r.payload.size()});
  if (!event) return std::nullopt;
  return *event;
}

/// Job `id` of `user_id` on provider 17, from its submission to `last` (4: started, 5: completed
/// with `bill` recorded and no ledger group, what a kill between the job's end and its ledger
/// append leaves).
std::vector<events::event> job_story(const std::string& id, const std::string& user_id, std::size_t last,
                                     events::ledger_bill bill = {}) {
  const auto ex = events::event_examples();
  auto submitted = std::get<events::job_submitted>(ex[12]);
  auto queued = std::get<events::job_queued>(ex[13]);
  auto assigned = std::get<events::job_assigned>(ex[14]);
  auto started = std::get<events::job_started>(ex[15]);
  auto completed = std::get<events::job_completed>(ex[17]);
  submitted.job_id = queued.job_id = assigned.job_id = started.job_id = completed.job_id = id;
  submitted.user_id = user_id;
  // A bill paid from the subsidy is a free job's.
  submitted.premium = std::none_of(bill.transfers.begin(), bill.transfers.end(), [](const auto& t) {
    return t.kind == events::transfer_kind::free_tier_subsidy;
  });
  assigned.attempt = 1;
  assigned.provider_id = started.provider_id = completed.provider_id = "17";
  completed.bill = std::move(bill);
  std::vector<events::event> story{submitted, queued, assigned, started, completed};
  story.resize(last);
  return story;
}

void append_job_left_unsettled(const std::filesystem::path& data, const std::string& id, const std::string& user_id,
                               events::ledger_bill bill) {
  append_stories(data, {{"job-" + id, storage::no_stream, job_story(id, user_id, 5, std::move(bill)), 0xb111'00 + std::stoull(id)}});
}

std::uint64_t unsettled_bills_verified(const std::filesystem::path& data) {
  const auto run = run_gpustream({"replay", "--data", data.string(), "--verify", "--json"});
  EXPECT_EQ(run.exit_code, 0) << run.err;
  if (run.exit_code != 0) return ~std::uint64_t{0};
  const auto report = boost::json::parse(run.out).as_object();
  return boost::json::value_to<std::uint64_t>(report.at("aggregates").as_object().at("job_bills_unsettled"));
}

TEST(cli_serve_bills, a_bill_a_kill_left_without_its_ledger_group_is_settled_when_serve_starts) {
  temp_dir dir;
  (void)make_example_store(dir.path());
  ASSERT_FALSE(::testing::Test::HasFailure());
  // Job 90 owes provider 17 a free-tier subsidy; job 91 owes more than ada has (25 USD), so the
  // ledger refuses it: it stays unsettled, and the next start tries again.
  append_job_left_unsettled(dir.path(), "90", "bob",
                            {"job-90",
                             {{"job-90/free_tier_subsidy", "subsidy", "provider-17", 3'000,
                               events::transfer_kind::free_tier_subsidy, "90"},
                              {"job-90/platform_fee", "provider-17", "platform", 300, events::transfer_kind::platform_fee,
                               "90"}}});
  append_job_left_unsettled(dir.path(), "91", "ada",
                            {"job-91",
                             {{"job-91/usage", "user-ada", "provider-17", 100'000'000, events::transfer_kind::usage,
                               "91"}}});
  ASSERT_FALSE(::testing::Test::HasFailure());
  EXPECT_EQ(unsettled_bills_verified(dir.path()), 2u) << "counted by --verify, not a violation";
  const auto text = run_gpustream({"replay", "--data", dir.path().string(), "--verify"});
  EXPECT_NE(text.out.find("job bills not yet in the ledger: 2"), std::string::npos) << text.out;

  auto serve = start_serve(dir.path(), "127.0.0.1:0");
  ASSERT_NE(serve.port, 0) << serve.child->output();
  const auto& err = serve.child->err();
  EXPECT_NE(err.find("settling 2 job bills"), std::string::npos) << err;
  EXPECT_NE(err.find("settled 1 of 2 job bills"), std::string::npos) << err;
  EXPECT_NE(err.find("job 91's bill (100000000 micro-USD in 1 transfer) is still unsettled"), std::string::npos)
      << err;
  EXPECT_NE(err.find("insufficient"), std::string::npos) << "the ledger's reason: " << err;
  const auto metrics = curl(serve.port, "/metrics");
  EXPECT_NE(metrics.body.find("\ngpustream_job_bills_unsettled 1\n"), std::string::npos) << metrics.body;
  serve.child->send_signal(SIGTERM);
  ASSERT_TRUE(serve.child->wait_exit().has_value()) << serve.child->output();

  EXPECT_EQ(unsettled_bills_verified(dir.path()), 1u) << "job 90's group is in the ledger, as its bill says";
  auto again = start_serve(dir.path(), "127.0.0.1:0");
  ASSERT_NE(again.port, 0) << again.child->output();
  EXPECT_NE(again.child->err().find("settling 1 job bills"), std::string::npos) << again.child->output();
  EXPECT_NE(again.child->err().find("settled 0 of 1 job bills"), std::string::npos) << again.child->output();
}

TEST(cli_serve_free_usage, free_tokens_a_kill_left_uncounted_are_counted_when_serve_starts) {
  temp_dir dir;
  (void)make_example_store(dir.path());
  ASSERT_FALSE(::testing::Test::HasFailure());
  // Bob's free job 92 completed (1,234 prompt and 480 completion tokens) and the server was
  // killed before his usage was recorded: his quota would never see those tokens.
  auto story = job_story("92", "bob", 5);
  auto& submitted = std::get<events::job_submitted>(story[0]);
  submitted.premium = false;
  auto& completed = std::get<events::job_completed>(story[4]);
  completed.free_tokens = submitted.prompt_tokens + completed.completion_tokens;
  const auto ended_at_us = completed.completed_at_us;
  append_stories(dir.path(), {{"job-92", storage::no_stream, story, 0xf7ee'92}});
  ASSERT_FALSE(::testing::Test::HasFailure());
  const auto before = run_gpustream({"replay", "--data", dir.path().string(), "--verify"});
  EXPECT_EQ(before.exit_code, 0) << before.out << before.err;
  EXPECT_NE(before.out.find("free jobs' usage not yet counted against their users' quotas: 1"), std::string::npos)
      << before.out;

  auto serve = start_serve(dir.path(), "127.0.0.1:0");
  ASSERT_NE(serve.port, 0) << serve.child->output();
  EXPECT_NE(serve.child->err().find("counted 1 of 1 free jobs' tokens"), std::string::npos) << serve.child->output();
  serve.child->send_signal(SIGTERM);
  ASSERT_TRUE(serve.child->wait_exit().has_value()) << serve.child->output();

  const auto used = last_event(dir.path(), "user-bob");
  ASSERT_TRUE(used && std::holds_alternative<events::free_tokens_used>(*used));
  EXPECT_EQ(std::get<events::free_tokens_used>(*used), (events::free_tokens_used{"bob", "92", 1'714, ended_at_us}))
      << "counted against the day the job ended";
  const auto after = run_gpustream({"replay", "--data", dir.path().string(), "--verify", "--json"});
  ASSERT_EQ(after.exit_code, 0) << after.out << after.err;
  const auto report = boost::json::parse(after.out).as_object();
  EXPECT_EQ(boost::json::value_to<std::uint64_t>(report.at("aggregates").as_object().at("free_usage_unrecorded")), 0u);

  auto again = start_serve(dir.path(), "127.0.0.1:0");
  ASSERT_NE(again.port, 0) << again.child->output();
  EXPECT_EQ(again.child->err().find("free jobs' tokens"), std::string::npos) << "nothing left to count: "
                                                                              << again.child->output();
}

/// The example of type T among events::event_examples().
template <class T>
T example_of() {
  for (const auto& e : events::event_examples()) {
    if (const auto* found = std::get_if<T>(&e)) return *found;
  }
  ADD_FAILURE() << "no example of the type";
  return {};
}

TEST(cli_serve_left_open, an_ad_impression_of_a_job_left_live_is_taken_back_when_serve_starts) {
  // Job 100, streaming when the server was killed, had its ad's impression recorded (the relay
  // records it as the answer ends, before the job's end and bill): no bill will ever pay for it.
  temp_dir dir;
  (void)make_example_store(dir.path());
  ASSERT_FALSE(::testing::Test::HasFailure());
  auto created = example_of<events::campaign_created>();
  auto funded = example_of<events::campaign_funded>();
  auto reserved = example_of<events::ad_reserved>();
  auto shown = example_of<events::impression_recorded>();
  created.campaign_id = funded.campaign_id = reserved.campaign_id = shown.campaign_id = "2";
  funded.amount_micros = created.budget_micros;
  reserved.reservation_id = shown.impression_id = "2.100";
  reserved.job_id = shown.job_id = "100";
  reserved.user_id = shown.user_id = "bob";
  reserved.price_micros = shown.price_micros = created.cpm_bid_micros / 1'000;
  reserved.expires_at_us = std::numeric_limits<std::int64_t>::max();
  append_stories(dir.path(), {{"job-100", storage::no_stream, job_story("100", "bob", 4), 0xb1'0100u},
                              {"campaign-2", storage::no_stream, {created, funded, reserved, shown}, 0xc2'0000u}});
  ASSERT_FALSE(::testing::Test::HasFailure());

  auto serve = start_serve(dir.path(), "127.0.0.1:0");
  ASSERT_NE(serve.port, 0) << serve.child->output();
  EXPECT_NE(serve.child->err().find("failed 1 of 1 jobs that were live when the server stopped"), std::string::npos)
      << serve.child->output();
  serve.child->send_signal(SIGTERM);
  ASSERT_TRUE(serve.child->wait_exit().has_value()) << serve.child->output();

  const auto job = last_event(dir.path(), "job-100");
  ASSERT_TRUE(job && std::holds_alternative<events::job_failed>(*job));
  const auto campaign = last_event(dir.path(), "campaign-2");
  ASSERT_TRUE(campaign && std::holds_alternative<events::impression_voided>(*campaign)) << serve.child->output();
  EXPECT_EQ(std::get<events::impression_voided>(*campaign).impression_id, "2.100");
  EXPECT_NE(std::get<events::impression_voided>(*campaign).reason.find("the server stopped"), std::string::npos);
}

TEST(cli_serve_left_open, jobs_live_and_providers_online_when_a_kill_came_are_closed_when_serve_starts) {
  temp_dir dir;
  (void)make_example_store(dir.path());
  ASSERT_FALSE(::testing::Test::HasFailure());
  // Jobs 100 to 399 were streaming on provider 17, linked again, when the server was killed:
  // more than serve asks to fail at once (256).
  std::vector<story_part> parts;
  for (int id = 100; id < 400; ++id) {
    parts.push_back({"job-" + std::to_string(id), storage::no_stream, job_story(std::to_string(id), "bob", 4),
                     0xb1'0000u + static_cast<std::uint64_t>(id)});
  }
  auto connected = std::get<events::provider_connected>(events::event_examples()[6]);
  connected.provider_id = "17";
  parts.push_back({"provider-17", storage::any_version, {connected}, 0xb017});
  append_stories(dir.path(), parts);
  ASSERT_FALSE(::testing::Test::HasFailure());

  auto serve = start_serve(dir.path(), "127.0.0.1:0");
  ASSERT_NE(serve.port, 0) << serve.child->output();
  EXPECT_NE(serve.child->err().find("failed 300 of 300 jobs that were live when the server stopped"), std::string::npos)
      << serve.child->output();
  EXPECT_NE(serve.child->err().find("took 1 of 1 providers offline"), std::string::npos) << serve.child->output();
  serve.child->send_signal(SIGTERM);
  ASSERT_TRUE(serve.child->wait_exit().has_value()) << serve.child->output();

  const auto job = last_event(dir.path(), "job-399");
  ASSERT_TRUE(job && std::holds_alternative<events::job_failed>(*job));
  EXPECT_EQ(std::get<events::job_failed>(*job).reason, events::failure_reason::internal);
  EXPECT_NE(std::get<events::job_failed>(*job).message.find("the server stopped"), std::string::npos);
  const auto provider = last_event(dir.path(), "provider-17");
  ASSERT_TRUE(provider && std::holds_alternative<events::provider_disconnected>(*provider));
  EXPECT_EQ(std::get<events::provider_disconnected>(*provider).reason, events::disconnect_reason::connection_lost);
  const auto verified = run_gpustream({"replay", "--data", dir.path().string(), "--verify"});
  EXPECT_EQ(verified.exit_code, 0) << verified.out << verified.err;

  // Nothing is left open: the next start closes nothing.
  auto again = start_serve(dir.path(), "127.0.0.1:0");
  ASSERT_NE(again.port, 0) << again.child->output();
  EXPECT_EQ(again.child->err().find("when the server stopped"), std::string::npos) << again.child->output();
}

TEST(cli_serve_left_open, a_payout_a_kill_left_half_done_is_completed_before_serve_serves) {
  temp_dir dir;
  (void)make_example_store(dir.path());
  ASSERT_FALSE(::testing::Test::HasFailure());
  // Provider 17's third payout (its 877 micro-USD left): the ledger moved the money, and the kill
  // came before the payout's event.
  const events::transfer_recorded moved{"payout-auto-17-3/request", "provider-17", "payouts_in_flight", 877,
                                        events::transfer_kind::payout, "auto-17-3", "payout-auto-17-3/request",
                                        1'700'000'002'000'000};
  append_stories(dir.path(), {{std::string(actors::ledger_stream), storage::any_version, {moved}, 0xba17}});
  ASSERT_FALSE(::testing::Test::HasFailure());
  const auto before = run_gpustream({"replay", "--data", dir.path().string(), "--verify"});
  ASSERT_EQ(before.exit_code, 1) << "the movement without its payout is a violation until completed:\n" << before.out;

  auto serve = start_serve(dir.path(), "127.0.0.1:0");
  ASSERT_NE(serve.port, 0) << serve.child->output();
  // Before serving: a stop right after this start leaves nothing half done.
  EXPECT_NE(serve.child->err().find("completed 1 payouts that the server stopped half done"), std::string::npos)
      << serve.child->output();
  serve.child->send_signal(SIGTERM);
  ASSERT_TRUE(serve.child->wait_exit().has_value()) << serve.child->output();
  const auto payout = last_event(dir.path(), "payout-auto-17-3");
  ASSERT_TRUE(payout && std::holds_alternative<events::payout_requested>(*payout));
  EXPECT_EQ(std::get<events::payout_requested>(*payout).amount_micros, 877);
  const auto verified = run_gpustream({"replay", "--data", dir.path().string(), "--verify"});
  EXPECT_EQ(verified.exit_code, 0) << verified.out << verified.err;
}

TEST(cli_serve_limits, an_open_files_limit_below_the_gateways_connections_is_named_with_what_to_raise) {
  temp_dir dir;
  (void)make_example_store(dir.path());
  ASSERT_FALSE(::testing::Test::HasFailure());
  auto serve = start_serve(dir.path(), "127.0.0.1:0", 2'048);
  ASSERT_NE(serve.port, 0) << serve.child->output();
  const auto& err = serve.child->err();
  EXPECT_NE(err.find("the open-files limit is 2048"), std::string::npos) << err;
  EXPECT_NE(err.find("the gateway takes at most 1536 connections instead of 10000, leaving 512 files"),
            std::string::npos)
      << err;
  EXPECT_NE(err.find("raise it to 11024 or more"), std::string::npos) << err;
  EXPECT_EQ(curl(serve.port, "/healthz").status, 200) << "it serves anyway";
}

TEST(cli_serve_limits, connections_past_what_the_open_files_limit_leaves_the_store_get_503) {
  // 256 files: a quarter (64) stays for the event store, 192 for connections. Without the cap,
  // the gateway's own limit (10,000) let connections take the store's files: its next file to
  // open (a log roll, a flush) failed, and every append with it.
  temp_dir dir;
  (void)make_example_store(dir.path());
  ASSERT_FALSE(::testing::Test::HasFailure());
  auto serve = start_serve(dir.path(), "127.0.0.1:0", 256);
  ASSERT_NE(serve.port, 0) << serve.child->output();
  EXPECT_NE(serve.child->err().find("takes at most 192 connections instead of 10000, leaving 64 files"),
            std::string::npos)
      << serve.child->err();
  std::vector<unique_fd> idle;
  for (int i = 0; i < 192; ++i) {
    unique_fd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    sockaddr_in address{};
    address.sin_family = AF_INET;
    address.sin_port = htons(serve.port);
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ASSERT_EQ(::connect(fd.get(), reinterpret_cast<sockaddr*>(&address), sizeof address), 0) << std::strerror(errno);
    idle.push_back(std::move(fd));
  }
  // Accepted in order: the 193rd is accepted after the 192 are open.
  const auto reply = raw_exchange(serve.port, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
  EXPECT_EQ(status_of(reply), 503) << reply;
  EXPECT_NE(reply.find("too many open connections"), std::string::npos) << reply;
}

TEST(cli_serve_secrets, the_admin_tokens_value_is_not_in_the_process_list) {
  temp_dir dir;
  (void)make_example_store(dir.path());
  ASSERT_FALSE(::testing::Test::HasFailure());
  const std::string token = "s3cret-admin-token-" + std::to_string(::getpid());
  auto serve = start_serve(dir.path(), "127.0.0.1:0", {}, {"--admin-token", token});
  ASSERT_NE(serve.port, 0) << serve.child->output();
  std::ifstream file("/proc/" + std::to_string(serve.child->pid()) + "/cmdline", std::ios::binary);
  ASSERT_TRUE(file) << "no /proc";
  const std::string cmdline((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  EXPECT_NE(cmdline.find("--admin-token"), std::string::npos) << cmdline;
  EXPECT_EQ(cmdline.find("s3cret"), std::string::npos) << cmdline;
  EXPECT_EQ(serve.child->err().find("no admin token"), std::string::npos) << serve.child->err();
  // The token still works: the admin API answers a request bearing it.
  const auto reply = raw_exchange(serve.port, "GET /admin/providers HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " +
                                                  token + "\r\nConnection: close\r\n\r\n");
  EXPECT_EQ(status_of(reply), 200) << reply;
}

TEST(cli_serve_port, durability_is_taken_in_any_case) {
  temp_dir dir;
  (void)make_example_store(dir.path());
  ASSERT_FALSE(::testing::Test::HasFailure());
  auto serve = start_serve(dir.path(), "127.0.0.1:0", {}, {"--durability", "BUFFERED"});
  ASSERT_NE(serve.port, 0) << serve.child->output();
  EXPECT_NE(serve.child->err().find("durability=buffered"), std::string::npos) << serve.child->err();
  EXPECT_NE(serve.child->err().find("no admin token"), std::string::npos) << "started without one: " << serve.child->err();
}

TEST(cli_serve_port, listens_on_an_ipv6_address_in_brackets) {
  {
    unique_fd probe(::socket(AF_INET6, SOCK_STREAM | SOCK_CLOEXEC, 0));
    sockaddr_in6 loopback{};
    loopback.sin6_family = AF_INET6;
    loopback.sin6_addr = in6addr_loopback;
    if (probe.get() < 0 || ::bind(probe.get(), reinterpret_cast<sockaddr*>(&loopback), sizeof loopback) != 0) {
      GTEST_SKIP() << "this machine has no IPv6 loopback: " << std::strerror(errno);
    }
  }
  temp_dir dir;
  (void)make_example_store(dir.path());
  ASSERT_FALSE(::testing::Test::HasFailure());
  auto serve = start_serve(dir.path(), "[::1]:0");
  EXPECT_NE(serve.port, 0) << serve.child->output();
  EXPECT_NE(serve.child->err().find("listening http=::1:"), std::string::npos) << serve.child->err();
}

TEST(cli_serve_port, listens_on_the_port_it_is_given) {
  temp_dir dir;
  const auto contents = make_example_store(dir.path());
  ASSERT_FALSE(::testing::Test::HasFailure());
  // A port found free a moment ago may be taken in between: try a few before giving up.
  constexpr int attempts_max = 5;
  for (int attempt = 1; attempt <= attempts_max; ++attempt) {
    const auto port = port_of(bound_socket(0, false));  // the socket closes here, freeing the port
    ASSERT_FALSE(::testing::Test::HasFailure());
    auto serve = start_serve(dir.path(), "127.0.0.1:" + std::to_string(port));
    ASSERT_TRUE(serve.child->started()) << std::strerror(errno);
    if (serve.port == 0 && serve.child->output().find("cannot listen") != std::string::npos &&
        attempt < attempts_max) {
      continue;
    }
    ASSERT_EQ(serve.port, port) << serve.child->output();
    const auto reply = curl(port, "/healthz");
    EXPECT_EQ(reply.status, 200);
    EXPECT_EQ(reply.body,
              R"({"status":"ok","last_position":)" + std::to_string(contents.last_position) + "}");
    return;
  }
}

}  // namespace
}  // namespace gpustream::app
