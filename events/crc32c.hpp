#pragma once
/// CRC32C (Castagnoli), the checksum of every stored record. Uses the SSE4.2 instruction when the CPU
/// has it and a table otherwise; both give the same value.

#include <cstddef>
#include <cstdint>
#include <span>

namespace gpustream::events {

/// Extends `crc` (0 to start) over `bytes`.
[[nodiscard]] std::uint32_t crc32c(std::span<const std::byte> bytes, std::uint32_t crc = 0) noexcept;

/// The table-driven version crc32c falls back to on CPUs without SSE4.2; public so that tests
/// check both give the same value.
[[nodiscard]] std::uint32_t crc32c_portable(std::span<const std::byte> bytes, std::uint32_t crc = 0) noexcept;

}  // namespace gpustream::events
