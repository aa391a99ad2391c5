// write_buffer and grow_queue: what a slow client's bytes hold in memory.
#include "gateway/write_buffer.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <random>

namespace gpustream::gateway {
namespace {

constexpr std::size_t kib = 1024;

std::string pattern(std::size_t n) {
  std::string s(n, '\0');
  for (std::size_t i = 0; i < n; ++i) s[i] = static_cast<char>('a' + i % 26);
  return s;
}

/// `bytes` in a buffer of `capacity` (at least its size), as a queue grown by appends holds them.
std::string with_capacity(const std::string& bytes, std::size_t capacity) {
  std::string s;
  s.reserve(capacity);
  s = bytes;
  return s;
}

TEST(write_buffer, what_the_socket_took_is_let_go_once_it_is_an_eighth_of_the_write) {
  const auto bytes = pattern(1024 * kib);
  write_buffer w;
  w.start(std::string(bytes));
  w.took(100 * kib);  // under an eighth: kept, no copy yet
  EXPECT_EQ(w.held(), bytes.size());
  EXPECT_EQ(w.rest(), std::string_view(bytes).substr(100 * kib));
  w.took(30 * kib);  // 130 KiB taken, over an eighth of 1 MiB: only the rest is held now
  EXPECT_EQ(w.untaken(), bytes.size() - 130 * kib);
  EXPECT_EQ(w.held(), w.untaken());
  EXPECT_EQ(w.rest(), std::string_view(bytes).substr(130 * kib));
  w.took(w.untaken());
  EXPECT_TRUE(w.done());
  w.clear();
  EXPECT_LT(w.held(), 64u) << "a finished write keeps its buffer";
}

TEST(write_buffer, spare_capacity_the_bytes_come_with_is_let_go_at_once) {
  // 100 KiB in a 4 MiB buffer: a queue that grew large once, or whose front a partial write took.
  const auto bytes = pattern(100 * kib);
  std::string queue = with_capacity(bytes, 4096 * kib);
  ASSERT_GE(queue.capacity(), 4096 * kib);
  write_buffer w;
  w.start(std::move(queue));
  EXPECT_LE(w.held(), write_buffer::held_max(w.untaken()));
  EXPECT_EQ(w.rest(), bytes);
  EXPECT_TRUE(queue.empty());
  EXPECT_LT(queue.capacity(), 64u) << "the queue kept a buffer";
}

TEST(write_buffer, a_small_write_is_never_copied) {
  const auto bytes = pattern(48 * kib);  // under release_from_bytes
  write_buffer w;
  w.start(std::string(bytes));
  const auto* buffer = w.rest().data();
  for (std::size_t i = 0; i < 47; ++i) w.took(kib);
  EXPECT_EQ(w.held(), bytes.size());
  EXPECT_EQ(w.rest().data(), buffer + 47 * kib);
  EXPECT_EQ(w.rest(), std::string_view(bytes).substr(47 * kib));
}

TEST(write_buffer, holds_within_its_bound_however_the_socket_takes_the_bytes) {
  std::uint64_t seed = std::random_device{}();
  if (const char* fixed = std::getenv("GPUSTREAM_TEST_SEED")) seed = std::strtoull(fixed, nullptr, 10);
  std::printf("write_buffer seed: %llu (set GPUSTREAM_TEST_SEED to replay)\n", static_cast<unsigned long long>(seed));
  std::mt19937_64 random(seed);
  write_buffer w;
  for (int write = 0; write < 50; ++write) {
    const auto bytes = pattern(std::uniform_int_distribution<std::size_t>(1, 4096 * kib)(random));
    const auto spare = std::uniform_int_distribution<std::size_t>(0, 4096 * kib)(random);
    w.start(with_capacity(bytes, bytes.size() + spare));
    std::size_t taken = 0;
    ASSERT_LE(w.held(), write_buffer::held_max(w.untaken())) << "write " << write << ", at its start";
    while (!w.done()) {
      // A piece as a socket takes it: from a few bytes to a whole send buffer's worth.
      const auto n = std::min(w.untaken(), std::uniform_int_distribution<std::size_t>(1, 512 * kib)(random));
      w.took(n);
      taken += n;
      ASSERT_LE(w.held(), write_buffer::held_max(w.untaken()))
          << "write " << write << " of " << bytes.size() << " bytes, " << taken << " taken";
      ASSERT_EQ(w.rest(), std::string_view(bytes).substr(taken)) << "write " << write;
    }
    w.clear();
  }
}

TEST(grow_queue, doubles_below_the_limit_and_stops_at_it) {
  constexpr std::size_t limit = 4096 * kib;
  std::string queue = with_capacity("abc", 1000);
  grow_queue(queue, 1001, limit);
  EXPECT_EQ(queue.capacity(), 2000u);
  EXPECT_EQ(queue, "abc");
  grow_queue(queue, 5000, limit);
  EXPECT_EQ(queue.capacity(), 5000u);  // never less than needed
  queue = with_capacity("abc", 3000 * kib);
  grow_queue(queue, 3001 * kib, limit);
  EXPECT_EQ(queue.capacity(), limit);  // not 6,000 KiB
  // Grown piece by piece up to the limit, as a slow client's queue grows: never past it.
  const auto piece = pattern(1000);
  std::string expected;
  queue.clear();
  queue.shrink_to_fit();
  while (queue.size() + piece.size() <= limit) {
    // As the server grows its queue: as strings grow while doubling stays under the limit.
    if (queue.size() + piece.size() > queue.capacity() && 2 * queue.capacity() > limit) {
      grow_queue(queue, queue.size() + piece.size(), limit);
    }
    queue += piece;
    expected += piece;
    ASSERT_LE(queue.capacity(), limit) << "at " << queue.size() << " bytes";
  }
  EXPECT_EQ(queue, expected);
}

}  // namespace
}  // namespace gpustream::gateway
