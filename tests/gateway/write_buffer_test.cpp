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

/// The most a write may hold with `untaken` bytes left (see write_buffer).
std::size_t bound(std::size_t untaken) {
  return std::max(untaken + untaken / 7 + 1, untaken + write_buffer::release_from_bytes);
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

TEST(write_buffer, a_small_write_is_never_copied) {
  const auto bytes = pattern(48 * kib);  // under release_from_bytes
  write_buffer w;
  w.start(std::string(bytes));
  for (std::size_t i = 0; i < 47; ++i) w.took(kib);
  EXPECT_EQ(w.held(), bytes.size());
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
    w.start(std::string(bytes));
    std::size_t taken = 0;
    while (!w.done()) {
      // A piece as a socket takes it: from a few bytes to a whole send buffer's worth.
      const auto n = std::min(w.untaken(), std::uniform_int_distribution<std::size_t>(1, 512 * kib)(random));
      w.took(n);
      taken += n;
      ASSERT_LE(w.held(), bound(w.untaken()))
          << "write " << write << " of " << bytes.size() << " bytes, " << taken << " taken";
      ASSERT_EQ(w.rest(), std::string_view(bytes).substr(taken)) << "write " << write;
    }
    w.clear();
  }
}

}  // namespace
}  // namespace gpustream::gateway
