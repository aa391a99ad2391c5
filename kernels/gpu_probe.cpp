#include "kernels/gpu_probe.hpp"

#include <dlfcn.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <string_view>

namespace gpustream::kernels {

namespace {

// The few runtime entry points the probe uses, with their C signatures (cudaError_t is an int).
using get_device_count_fn = int (*)(int* count);
using get_device_properties_fn = int (*)(void* properties, int device);
using device_get_attribute_fn = int (*)(int* value, int attribute, int device);
using get_error_text_fn = const char* (*)(int error);

constexpr int cuda_success = 0;
constexpr int cuda_error_no_device = 100;              // cudaErrorNoDevice
constexpr int attribute_compute_capability_major = 75;  // cudaDevAttrComputeCapabilityMajor
constexpr int attribute_compute_capability_minor = 76;  // cudaDevAttrComputeCapabilityMinor

// cudaDeviceProp changes size between CUDA releases (about 1 KiB today), but it has started with
// the same fields since CUDA 10: char name[256]; cudaUUID_t uuid (16 bytes); char luid[8];
// unsigned luidDeviceNodeMask; size_t totalGlobalMem (at 288 after alignment). The probe reads only
// those, into a buffer far larger than any release's struct; compute capability comes through
// cudaDeviceGetAttribute, whose enum values never change.
constexpr std::size_t properties_buffer_bytes = 16 * 1024;
constexpr std::size_t name_bytes = 256;
constexpr std::size_t total_global_mem_offset = 288;

struct runtime {
  void* library = nullptr;
  std::string library_name;
  get_device_count_fn get_device_count = nullptr;
  get_device_properties_fn get_device_properties = nullptr;
  device_get_attribute_fn device_get_attribute = nullptr;
  get_error_text_fn get_error_name = nullptr;
  get_error_text_fn get_error_string = nullptr;
};

template <class F>
F symbol(void* library, const char* name) {
  return reinterpret_cast<F>(dlsym(library, name));
}

expected<runtime, gpu_probe_error> load_runtime(const gpu_probe_options& options) {
  runtime cuda;
  std::string tried;
  for (const auto& name : options.runtime_libraries) {
    // Never closed: the CUDA runtime does not support being unloaded.
    cuda.library = dlopen(name.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (cuda.library != nullptr) {
      cuda.library_name = name;
      break;
    }
    const char* why = dlerror();
    tried += (tried.empty() ? "" : "; ") + name + ": " + (why != nullptr ? why : "not loadable");
  }
  if (cuda.library == nullptr) {
    return unexpected{gpu_probe_error{
        gpu_probe_errc::runtime_not_found,
        "no CUDA runtime library could be loaded (" + (tried.empty() ? "none to try" : tried) + ")"}};
  }
  cuda.get_device_count = symbol<get_device_count_fn>(cuda.library, "cudaGetDeviceCount");
  // CUDA 12 exports the current struct layout as _v2 and keeps the old name for old binaries;
  // CUDA 13 has only the plain name. The fields read here are the same in both.
  cuda.get_device_properties =
      symbol<get_device_properties_fn>(cuda.library, "cudaGetDeviceProperties_v2");
  if (cuda.get_device_properties == nullptr) {
    cuda.get_device_properties =
        symbol<get_device_properties_fn>(cuda.library, "cudaGetDeviceProperties");
  }
  cuda.device_get_attribute = symbol<device_get_attribute_fn>(cuda.library, "cudaDeviceGetAttribute");
  cuda.get_error_name = symbol<get_error_text_fn>(cuda.library, "cudaGetErrorName");
  cuda.get_error_string = symbol<get_error_text_fn>(cuda.library, "cudaGetErrorString");
  if (cuda.get_device_count == nullptr || cuda.get_device_properties == nullptr ||
      cuda.device_get_attribute == nullptr) {
    return unexpected{gpu_probe_error{
        gpu_probe_errc::symbol_missing,
        cuda.library_name +
            " lacks cudaGetDeviceCount, cudaGetDeviceProperties or cudaDeviceGetAttribute"}};
  }
  return cuda;
}

std::string describe(const runtime& cuda, int error) {
  std::string text = "CUDA error " + std::to_string(error);
  if (cuda.get_error_name != nullptr) {
    if (const char* name = cuda.get_error_name(error)) text += std::string(" ") + name;
  }
  if (cuda.get_error_string != nullptr) {
    if (const char* what = cuda.get_error_string(error)) text += std::string(": ") + what;
  }
  return text + " (from " + cuda.library_name + ")";
}

expected<gpu_device, gpu_probe_error> describe_device(const runtime& cuda, int device) {
  auto properties = std::make_unique<unsigned char[]>(properties_buffer_bytes);
  std::memset(properties.get(), 0, properties_buffer_bytes);
  if (const int error = cuda.get_device_properties(properties.get(), device); error != cuda_success) {
    return unexpected{gpu_probe_error{
        gpu_probe_errc::runtime_error,
        "cudaGetDeviceProperties(" + std::to_string(device) + "): " + describe(cuda, error)}};
  }
  int major = 0;
  int minor = 0;
  if (const int error = cuda.device_get_attribute(&major, attribute_compute_capability_major, device);
      error != cuda_success) {
    return unexpected{gpu_probe_error{gpu_probe_errc::runtime_error,
                                      "cudaDeviceGetAttribute(major): " + describe(cuda, error)}};
  }
  if (const int error = cuda.device_get_attribute(&minor, attribute_compute_capability_minor, device);
      error != cuda_success) {
    return unexpected{gpu_probe_error{gpu_probe_errc::runtime_error,
                                      "cudaDeviceGetAttribute(minor): " + describe(cuda, error)}};
  }
  const auto* name = reinterpret_cast<const char*>(properties.get());
  std::size_t total_global_mem = 0;
  std::memcpy(&total_global_mem, properties.get() + total_global_mem_offset, sizeof total_global_mem);
  return gpu_device{.name = std::string(name, strnlen(name, name_bytes)),
                    .memory_bytes = total_global_mem,
                    .compute_capability_major = static_cast<std::uint8_t>(std::clamp(major, 0, 255)),
                    .compute_capability_minor = static_cast<std::uint8_t>(std::clamp(minor, 0, 255))};
}

}  // namespace

expected<std::vector<gpu_device>, gpu_probe_error> probe_gpus(const gpu_probe_options& options) {
  auto cuda = load_runtime(options);
  if (!cuda) return unexpected{cuda.error()};
  int count = 0;
  if (const int error = cuda->get_device_count(&count); error != cuda_success) {
    return unexpected{gpu_probe_error{
        error == cuda_error_no_device ? gpu_probe_errc::no_device : gpu_probe_errc::runtime_error,
        "cudaGetDeviceCount: " + describe(*cuda, error)}};
  }
  if (count <= 0) {
    return unexpected{gpu_probe_error{gpu_probe_errc::no_device,
                                      "the CUDA runtime (" + cuda->library_name + ") sees no device"}};
  }
  std::vector<gpu_device> devices;
  const int described = std::min<int>(count, static_cast<int>(options.devices_max));
  for (int device = 0; device < described; ++device) {
    auto found = describe_device(*cuda, device);
    if (!found) return unexpected{found.error()};
    devices.push_back(std::move(*found));
  }
  return devices;
}

}  // namespace gpustream::kernels
