#pragma once
/// The registries of the domain's aggregates, one per stream prefix, and their message types.
///
/// Include this only in .cpp files: it pulls in CAF.

#include <caf/allowed_unsafe_message_type.hpp>

#include "actors/registry.hpp"
#include "domain/campaign.hpp"
#include "domain/job.hpp"
#include "domain/payout.hpp"
#include "domain/provider.hpp"
#include "domain/user.hpp"

namespace gpustream::actors {

using user_registry = registry_actor<domain::user>;
using provider_registry = registry_actor<domain::provider>;
using job_registry = registry_actor<domain::job>;
using campaign_registry = registry_actor<domain::campaign>;
using payout_registry = registry_actor<domain::payout>;

}  // namespace gpustream::actors

// Commands are local messages (a cluster would give them inspect functions).
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(gpustream::domain::user::command)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(gpustream::domain::provider::command)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(gpustream::domain::job::command)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(gpustream::domain::campaign::command)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(gpustream::domain::payout::command)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(std::vector<gpustream::domain::user::command>)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(std::vector<gpustream::domain::provider::command>)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(std::vector<gpustream::domain::job::command>)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(std::vector<gpustream::domain::campaign::command>)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(std::vector<gpustream::domain::payout::command>)
