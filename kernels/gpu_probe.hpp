#pragma once
/// Finds the machine's GPUs through the CUDA runtime, loaded with dlopen at run time: the build
/// needs no CUDA, and a machine without CUDA or without a GPU simply gets "none" with the reason.
/// cudaError_t and the runtime's structs stay inside gpu_probe.cpp.

#include <cstdint>
#include <string>
#include <vector>

#include "base/expected.hpp"

namespace gpustream::kernels {

/// One CUDA device as the runtime describes it.
struct gpu_device {
  std::string name;                           ///< e.g. "NVIDIA H100 80GB HBM3"
  std::uint64_t memory_bytes = 0;             ///< total global memory, bytes
  std::uint8_t compute_capability_major = 0;  ///< 9 of 9.0
  std::uint8_t compute_capability_minor = 0;  ///< 0 of 9.0

  bool operator==(const gpu_device&) const = default;
};

struct gpu_probe_options {
  /// Libraries tried in order with dlopen; the first that loads is used. Default: the unversioned
  /// name (a toolkit's), then the runtimes of CUDA 13, 12 and 11.
  std::vector<std::string> runtime_libraries = {"libcudart.so", "libcudart.so.13", "libcudart.so.12",
                                                "libcudart.so.11.0"};
  /// Most devices described; the rest are ignored. Default: 16 (the provider link's gpus limit).
  std::uint32_t devices_max = 16;
};

/// Why no GPU was found.
enum class gpu_probe_errc : std::uint8_t {
  runtime_not_found,  ///< no CUDA runtime library could be loaded
  symbol_missing,     ///< the library lacks a function the probe needs
  runtime_error,      ///< the runtime reported an error (no driver, driver too old, …)
  no_device,          ///< the runtime works but sees no device
};

struct gpu_probe_error {
  gpu_probe_errc code = gpu_probe_errc::runtime_not_found;
  /// For a person: which libraries were tried, or the runtime's own error name and text.
  std::string message;
};

/// Lists the CUDA devices (at least one) or says why there are none. Safe to call more than once;
/// the runtime library stays loaded for the life of the process once found (unloading CUDA is not
/// supported by it).
[[nodiscard]] expected<std::vector<gpu_device>, gpu_probe_error> probe_gpus(
    const gpu_probe_options& options = {});

}  // namespace gpustream::kernels
