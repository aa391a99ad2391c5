#pragma once
// The bytes of one write to a client that the socket takes in pieces (a slow reader).

#include <algorithm>
#include <cstddef>
#include <string>
#include <string_view>

namespace gpustream::gateway {

/// Makes room for `needed` bytes in a queue of streamed bytes of which at most `limit` may wait:
/// doubling, as std::string grows, but never past the limit (unless `needed` is), so a queue near
/// the limit does not hold nearly twice it. The buffer is a fresh one: libstdc++'s reserve()
/// doubles a buffer it grows, whatever it is asked for.
inline void grow_queue(std::string& queue, std::size_t needed, std::size_t limit) {
  std::string grown;
  grown.reserve(std::max(needed, std::min(2 * queue.capacity(), limit)));
  grown.append(queue);
  queue.swap(grown);
}

/// One write in flight. The memory it holds (its buffer's capacity) is kept within
/// max(8/7 of its untaken bytes, its untaken bytes + release_from_bytes): what the socket took,
/// and spare capacity the bytes came with (a buffer grown by doubling, or one a partial write
/// emptied the front of), is let go by moving the untaken bytes to a buffer of their own size
/// whenever the buffer outgrows that bound. So a slow client costs about its untaken bytes, not
/// the whole write until its last byte is taken. Each copy follows at least an eighth of the
/// buffer being taken: at most 7 bytes copied per byte taken, and only for writes the socket did
/// not take at once.
class write_buffer {
 public:
  static constexpr std::size_t release_from_bytes = 64 * 1024;

  /// The most a write with `untaken` bytes left holds.
  static constexpr std::size_t held_max(std::size_t untaken) noexcept {
    return std::max(untaken + untaken / 7, untaken + release_from_bytes);
  }

  /// Takes over `bytes` (which is left empty, without a buffer) as the write; the previous
  /// write must be done.
  void start(std::string&& bytes) {
    std::string taken_over(std::move(bytes));
    bytes_.swap(taken_over);  // the previous write's buffer, if any, goes with taken_over
    taken_ = 0;
    release_if_over();
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
    release_if_over();
  }

  /// Ends the write and frees its buffer.
  void clear() {
    std::string().swap(bytes_);
    taken_ = 0;
  }

 private:
  void release_if_over() {
    if (held() <= held_max(untaken())) return;
    // A buffer of just the rest. Swapped, not assigned: assigning a short string keeps the old
    // buffer (libstdc++ copies it in), swapping frees it with `rest`.
    std::string rest(bytes_.data() + taken_, untaken());
    bytes_.swap(rest);
    taken_ = 0;
  }

  std::string bytes_;
  std::size_t taken_ = 0;  ///< bytes of bytes_ the socket took
};

}  // namespace gpustream::gateway
