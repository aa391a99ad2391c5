#include "domain/aggregate.hpp"

namespace gpustream::domain {

std::string_view to_string(errc code) noexcept {
  switch (code) {
    case errc::invalid_argument: return "invalid_argument";
    case errc::not_found: return "not_found";
    case errc::already_exists: return "already_exists";
    case errc::invalid_state: return "invalid_state";
    case errc::insufficient_funds: return "insufficient_funds";
    case errc::quota_exceeded: return "quota_exceeded";
    case errc::limit_exceeded: return "limit_exceeded";
    case errc::no_provider: return "no_provider";
    case errc::suspended: return "suspended";
    case errc::busy: return "busy";
  }
  return "unknown";
}

}  // namespace gpustream::domain
