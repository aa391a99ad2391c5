#pragma once
// The bytes of one write to a client that the socket takes in pieces (a slow reader).

#include <cstddef>
#include <string>
#include <string_view>

namespace gpustream::gateway {

/// One write in flight. What the socket took is let go while the write lasts, once it is an
/// eighth of what the write holds and at least `release_from_bytes`, so the write holds at most
/// max(8/7 of its untaken bytes, its untaken bytes + release_from_bytes) in memory, not all of
/// its bytes until the last is taken. Copying the rest costs at most 7 bytes per byte taken, and
/// only for writes the socket did not take at once.
class write_buffer {
 public:
  static constexpr std::size_t release_from_bytes = 64 * 1024;

  /// Takes `bytes` as the write; the previous one must be done (or cleared).
  void start(std::string&& bytes) {
    bytes_ = std::move(bytes);
    taken_ = 0;
  }

  /// What the socket has not taken yet.
  [[nodiscard]] std::string_view rest() const noexcept { return std::string_view(bytes_).substr(taken_); }
  [[nodiscard]] std::size_t untaken() const noexcept { return bytes_.size() - taken_; }
  [[nodiscard]] bool done() const noexcept { return taken_ == bytes_.size(); }
  /// The memory the write holds (its buffer's capacity).
  [[nodiscard]] std::size_t held() const noexcept { return bytes_.capacity(); }

  /// The socket took the next `n` bytes of rest().
  void took(std::size_t n) {
    taken_ += n;
    if (taken_ < release_from_bytes || taken_ * 8 < bytes_.size()) return;
    // A buffer of just the rest. Swapped, not assigned: assigning a short string keeps the old
    // buffer (libstdc++ copies it in), swapping frees it with `rest`.
    std::string rest = bytes_.substr(taken_);
    bytes_.swap(rest);
    taken_ = 0;
  }

  /// Ends the write and frees its buffer.
  void clear() {
    std::string().swap(bytes_);
    taken_ = 0;
  }

 private:
  std::string bytes_;
  std::size_t taken_ = 0;  ///< bytes of bytes_ the socket took
};

}  // namespace gpustream::gateway
