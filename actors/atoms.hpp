#pragma once
/// The atoms of actors/ (CAF 0.17: at most 10 characters each). One place, so that two components
/// never spell the same message differently.

#include <caf/atom.hpp>

namespace gpustream::actors {

using append_atom = caf::atom_constant<caf::atom("append")>;
using appended_atom = caf::atom_constant<caf::atom("appended")>;
using recover_atom = caf::atom_constant<caf::atom("recover")>;
using snapshot_atom = caf::atom_constant<caf::atom("snapshot")>;
using state_atom = caf::atom_constant<caf::atom("state")>;
using idle_atom = caf::atom_constant<caf::atom("idle")>;
using passivate_atom = caf::atom_constant<caf::atom("passivate")>;
using count_atom = caf::atom_constant<caf::atom("count")>;
// The scheduler and the provider sessions.
using offer_atom = caf::atom_constant<caf::atom("offer")>;
using cancel_atom = caf::atom_constant<caf::atom("cancel")>;
using online_atom = caf::atom_constant<caf::atom("online")>;
using offline_atom = caf::atom_constant<caf::atom("offline")>;
using link_lost_atom = caf::atom_constant<caf::atom("linklost")>;
using load_atom = caf::atom_constant<caf::atom("load")>;
using started_atom = caf::atom_constant<caf::atom("started")>;
using tick_atom = caf::atom_constant<caf::atom("tick")>;
// The ad server.
using served_atom = caf::atom_constant<caf::atom("served")>;
using release_atom = caf::atom_constant<caf::atom("release")>;
using click_atom = caf::atom_constant<caf::atom("click")>;
using unserved_atom = caf::atom_constant<caf::atom("unserved")>;
// The payout runner.
using run_atom = caf::atom_constant<caf::atom("run")>;
using settle_atom = caf::atom_constant<caf::atom("settle")>;
using fail_atom = caf::atom_constant<caf::atom("fail")>;

}  // namespace gpustream::actors
