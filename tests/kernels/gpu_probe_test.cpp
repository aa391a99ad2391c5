// The GPU probe: without a CUDA runtime or without a GPU it returns none with a reason; with one
// it describes every device plausibly. Runs on any machine; what it finds is printed.
#include "kernels/gpu_probe.hpp"

#include <gtest/gtest.h>

#include <cstdio>

namespace gpustream::kernels {
namespace {

TEST(gpu_probe, a_missing_runtime_is_none_with_the_libraries_tried) {
  const auto found = probe_gpus({.runtime_libraries = {"libgpustream-no-such-cudart.so",
                                                       "libgpustream-nor-this.so.1"}});
  ASSERT_FALSE(found);
  EXPECT_EQ(found.error().code, gpu_probe_errc::runtime_not_found);
  EXPECT_NE(found.error().message.find("libgpustream-no-such-cudart.so"), std::string::npos)
      << found.error().message;
  EXPECT_NE(found.error().message.find("libgpustream-nor-this.so.1"), std::string::npos)
      << found.error().message;
}

TEST(gpu_probe, a_library_without_the_runtime_functions_is_refused) {
  // libc loads anywhere and has no cudaGetDeviceCount.
  const auto found = probe_gpus({.runtime_libraries = {"libc.so.6"}});
  ASSERT_FALSE(found);
  EXPECT_EQ(found.error().code, gpu_probe_errc::symbol_missing);
  EXPECT_NE(found.error().message.find("libc.so.6"), std::string::npos) << found.error().message;
}

TEST(gpu_probe, this_machine_has_gpus_described_or_none_with_a_reason) {
  const auto found = probe_gpus();
  if (!found) {
    std::printf("no GPU: %s\n", found.error().message.c_str());
    EXPECT_FALSE(found.error().message.empty());
    return;
  }
  ASSERT_FALSE(found->empty()) << "success means at least one device";
  for (const auto& gpu : *found) {
    std::printf("GPU: %s, %llu bytes, compute capability %u.%u\n", gpu.name.c_str(),
                static_cast<unsigned long long>(gpu.memory_bytes), gpu.compute_capability_major,
                gpu.compute_capability_minor);
    EXPECT_FALSE(gpu.name.empty());
    EXPECT_GE(gpu.memory_bytes, std::uint64_t{256} << 20) << gpu.name;
    EXPECT_LE(gpu.memory_bytes, std::uint64_t{4} << 40) << gpu.name;
    EXPECT_GE(gpu.compute_capability_major, 3) << gpu.name;
    EXPECT_LE(gpu.compute_capability_major, 20) << gpu.name;
  }
}

TEST(gpu_probe, devices_max_bounds_the_list) {
  gpu_probe_options options;
  options.devices_max = 1;
  const auto found = probe_gpus(options);
  if (found) {
    EXPECT_EQ(found->size(), 1u);
  } else {
    EXPECT_FALSE(found.error().message.empty());
  }
}

}  // namespace
}  // namespace gpustream::kernels
