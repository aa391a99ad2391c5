#include "gateway/http_server.hpp"

#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/ip/basic_resolver.hpp>
#include <boost/asio/strand.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>

#include <atomic>
#include <thread>
#include <vector>

namespace gpustream::gateway {
namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;

http::response<http::string_body> to_beast(const http_response& r, unsigned version, bool keep_alive) {
  http::response<http::string_body> out{static_cast<http::status>(r.status), version};
  out.set(http::field::server, "gpustream");
  out.set(http::field::content_type, r.content_type);
  out.keep_alive(keep_alive);
  out.body() = r.body;
  out.prepare_payload();
  return out;
}

http_response json_error(unsigned status, std::string_view message) {
  return {status, "application/json",
          std::string(R"({"error":{"message":")") + std::string(message) + R"(","type":"invalid_request_error"}})"};
}

/// One client connection: reads requests in turn, answers each through the handler.
class session : public std::enable_shared_from_this<session> {
 public:
  session(tcp::socket socket, const http_server_options& options, const http_handler& handler,
          std::atomic<std::size_t>& open)
      : stream_(std::move(socket)), options_(options), handler_(handler), open_(open) {}
  ~session() { open_.fetch_sub(1); }

  void start() { read(); }

  void reject_busy() {
    write(to_beast(json_error(503, "too many open connections; retry later"), 11, false), false);
  }

 private:
  void read() {
    parser_.emplace();
    parser_->header_limit(static_cast<std::uint32_t>(options_.header_bytes_max));
    parser_->body_limit(options_.body_bytes_max);
    stream_.expires_after(options_.idle_timeout);
    http::async_read(stream_, buffer_, *parser_,
                     [self = shared_from_this()](beast::error_code ec, std::size_t) { self->on_read(ec); });
  }

  void on_read(beast::error_code ec) {
    if (ec == http::error::end_of_stream || ec == beast::error::timeout) return close();
    if (ec == http::error::header_limit) {
      return write(to_beast(json_error(431, "request headers exceed header_bytes_max"), 11, false), false);
    }
    if (ec == http::error::body_limit) {
      return write(to_beast(json_error(413, "request body exceeds body_bytes_max"), 11, false), false);
    }
    if (ec) return close();
    auto& message = parser_->get();
    http_request request;
    request.method = std::string(message.method_string());
    request.target = std::string(message.target());
    for (const auto& field : message) {
      std::string name(field.name_string());
      for (auto& c : name) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
      request.headers.emplace(std::move(name), std::string(field.value()));
    }
    request.body = std::move(message.body());
    http_response response;
    try {
      response = handler_(request);
    } catch (const std::exception& e) {  // process edge: a handler bug must not kill the server
      response = json_error(500, "internal error");
    }
    const bool keep_alive = message.keep_alive();
    write(to_beast(response, message.version(), keep_alive), keep_alive);
  }

  void write(http::response<http::string_body> response, bool keep_alive) {
    auto owned = std::make_shared<http::response<http::string_body>>(std::move(response));
    http::async_write(stream_, *owned,
                      [self = shared_from_this(), owned, keep_alive](beast::error_code ec, std::size_t) {
                        if (ec || !keep_alive) return self->close();
                        self->read();
                      });
  }

  void close() {
    beast::error_code ec;
    stream_.socket().shutdown(tcp::socket::shutdown_send, ec);  // peer may be gone already
  }

  beast::tcp_stream stream_;
  beast::flat_buffer buffer_;
  std::optional<http::request_parser<http::string_body>> parser_;
  const http_server_options& options_;
  const http_handler& handler_;
  std::atomic<std::size_t>& open_;
};

}  // namespace

class http_server::impl {
 public:
  impl(http_server_options options, http_handler handler)
      : options_(std::move(options)), handler_(std::move(handler)), acceptor_(io_) {}

  ~impl() {
    io_.stop();
    for (auto& t : threads_) t.join();
  }

  expected<void, std::string> start() {
    beast::error_code ec;
    // A host name (e.g. localhost) listens on the first address it resolves to.
    tcp::resolver resolver(io_);
    const auto resolved = resolver.resolve(options_.host, std::to_string(options_.port),
                                           tcp::resolver::passive | tcp::resolver::numeric_service, ec);
    if (ec || resolved.empty()) {
      return unexpected{"cannot resolve listen address '" + options_.host + "': " + ec.message()};
    }
    const tcp::endpoint endpoint = resolved.begin()->endpoint();
    const std::string where = options_.host + ":" + std::to_string(options_.port);
    (void)acceptor_.open(endpoint.protocol(), ec);
    if (!ec) (void)acceptor_.set_option(asio::socket_base::reuse_address(true), ec);
    if (!ec) (void)acceptor_.bind(endpoint, ec);
    if (!ec) (void)acceptor_.listen(asio::socket_base::max_listen_connections, ec);
    if (ec) return unexpected{"cannot listen on " + where + ": " + ec.message()};
    port_ = acceptor_.local_endpoint().port();
    accept();
    for (std::size_t i = 0; i < std::max<std::size_t>(1, options_.threads); ++i) {
      threads_.emplace_back([this] { io_.run(); });
    }
    return {};
  }

  std::uint16_t port() const noexcept { return port_; }

 private:
  void accept() {
    acceptor_.async_accept(asio::make_strand(io_), [this](beast::error_code ec, tcp::socket socket) {
      if (ec) {
        if (ec != asio::error::operation_aborted) accept();
        return;
      }
      const auto now_open = open_.fetch_add(1) + 1;
      auto s = std::make_shared<session>(std::move(socket), options_, handler_, open_);
      if (now_open > options_.connections_max) s->reject_busy();
      else s->start();
      accept();
    });
  }

  // Declared before io_: sessions destroyed with io_ still refer to these.
  http_server_options options_;
  http_handler handler_;
  std::atomic<std::size_t> open_{0};
  asio::io_context io_;
  tcp::acceptor acceptor_;
  std::vector<std::thread> threads_;
  std::uint16_t port_ = 0;
};

expected<std::unique_ptr<http_server>, std::string> http_server::start(http_server_options options,
                                                                       http_handler handler) {
  auto state = std::make_unique<impl>(std::move(options), std::move(handler));
  if (auto started = state->start(); !started) return unexpected{started.error()};
  return std::unique_ptr<http_server>(new http_server(std::move(state)));
}

http_server::http_server(std::unique_ptr<impl> state) : impl_(std::move(state)) {}
http_server::~http_server() = default;
std::uint16_t http_server::port() const noexcept { return impl_->port(); }

}  // namespace gpustream::gateway
