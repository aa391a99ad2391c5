#pragma once
/// GPUSTREAM_ENSURE(cond): an always-on check for bugs (never for user input). Unlike `assert` it
/// survives NDEBUG; a failure prints the condition with file:line and aborts.

namespace gpustream::detail {
[[noreturn]] void ensure_failed(const char* condition, const char* file, int line) noexcept;
}  // namespace gpustream::detail

#define GPUSTREAM_ENSURE(cond)                                          \
  do {                                                                  \
    if (!(cond)) [[unlikely]]                                           \
      ::gpustream::detail::ensure_failed(#cond, __FILE__, __LINE__);    \
  } while (false)
