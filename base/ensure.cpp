#include "base/ensure.hpp"

#include <cstdio>
#include <cstdlib>

namespace gpustream::detail {

void ensure_failed(const char* condition, const char* file, int line) noexcept {
  std::fprintf(stderr, "GPUSTREAM_ENSURE failed: %s at %s:%d\n", condition, file, line);
  std::fflush(stderr);
  std::abort();
}

}  // namespace gpustream::detail
