@0xcbcea0abb3c2d727;
# The provider link's wire format: every binary WebSocket message on `GET /v1/providers/link` is
# exactly one `Frame` (a Cap'n Proto flat array, unpacked). The plain C++ mirror of these structs is
# gateway/link_frames.hpp; gateway/link_codec.cpp converts between the two and enforces the limits.
#
# The link is a protocol between two versions of gpustream that may differ (an old agent, a new
# server), so the same evolution rules as the event schema hold: never renumber or reuse an ordinal;
# new fields get the next ordinal; new frames become new union members at the end of `Frame`; new
# enumerants go at the end of their enum. A peer that receives a frame or enumerant it does not know
# closes the link with a clear reason rather than guessing.
#
# The link deliberately has its own copies of GpuInfo/ModelOffer instead of importing the event
# schema: the stored format and the wire protocol evolve on different schedules. While they agree
# field by field, events/capnp_values.hpp converts both.
#
# Units: durations in microseconds (`...Us`) or milliseconds (`...Ms`); prices in micro-USD per
# million tokens (`...MicrosPerMtok`); token rates in thousandths of a token per second (`...Milli`).

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("gpustream::gateway::link::schema");

enum BackendKind {
  openai @0;    # an OpenAI-compatible server on the provider's machine
  builtin @1;   # gpustream's own inference engine
}

enum JobKind {
  chat @0;         # POST {base}/chat/completions
  completion @1;   # POST {base}/completions
}

struct GpuInfo {
  name @0 :Text;
  memoryBytes @1 :UInt64;
  computeCapabilityMajor @2 :UInt8;
  computeCapabilityMinor @3 :UInt8;
}

struct ModelOffer {
  modelName @0 :Text;
  contextLengthTokens @1 :UInt32;
  quantisation @2 :Text;
  inputPriceMicrosPerMtok @3 :Int64;
  outputPriceMicrosPerMtok @4 :Int64;
  maxConcurrency @5 :UInt32;
}

# agent -> server -------------------------------------------------------------------------------

struct Hello {
  agentVersion @0 :Text;
  backend @1 :BackendKind;
  backendUrl @2 :Text;
  gpus @3 :List(GpuInfo);
  models @4 :List(ModelOffer);
  maxConcurrency @5 :UInt32;
}

struct Heartbeat {
  activeJobs @0 :UInt32;
  queuedJobs @1 :UInt32;
  loadPercent @2 :UInt32;
  healthPercent @3 :UInt32;
  tokensPerSecondMilli @4 :UInt64;
  # The agent is stopping: it declines every offer until it links again. False from an agent from
  # before the field.
  draining @5 :Bool;
}

# `attempt` on Delta, Done and JobError echoes the attempt of the Offer they answer. A job taken from
# a provider may be offered to it again (a new attempt); what the agent still sends for the old
# one is then told apart and dropped. 0: an agent from before the field, whose frames count as the
# current attempt's.
struct Delta {
  jobId @0 :Text;
  text @1 :Text;
  attempt @2 :UInt32;
  reasoning @3 :Bool;      # a reasoning model's thinking, not its answer; only to a server whose welcome set reasoningDeltas
}

struct Done {
  jobId @0 :Text;
  finishReason @1 :Text;
  completionTokensCounted @2 :UInt32;    # the agent's own count: one per streamed content chunk
  promptTokensReported @3 :UInt32;       # the backend's usage, 0 when it sent none
  completionTokensReported @4 :UInt32;
  ttftUs @5 :Int64;
  totalUs @6 :Int64;
  attempt @7 :UInt32;
}

struct JobError {
  jobId @0 :Text;
  tokensSoFar @1 :UInt32;
  message @2 :Text;
  upstreamFault @3 :Bool;    # the backend failed: counts against the provider
  attempt @4 :UInt32;
  requestRejected @5 :Bool;  # the backend refused the request itself (HTTP 400, 413 or 422)
  # Neither flag: the agent declined the offer without asking its backend (at capacity, a duplicate).
}

# server -> agent -------------------------------------------------------------------------------

struct Welcome {
  providerId @0 :Text;
  heartbeatIntervalMs @1 :UInt32;
  deltaBatches @2 :Bool;   # the server takes `deltas` frames; an agent sends none to one that does not
  reasoningDeltas @3 :Bool;  # the server takes deltas marked reasoning; an agent drops the thinking for one that does not
  modelUpdates @4 :Bool;     # the server takes `advertise` frames; an agent sends none to one that does not
}

struct Offer {
  jobId @0 :Text;
  kind @1 :JobKind;
  requestJson @2 :Text;    # the OpenAI request body to send to the backend as is
  attempt @3 :UInt32;      # the job's attempt, from 1: the agent's frames for the job echo it
}

struct Cancel {
  jobId @0 :Text;
}

# agent -> server, sent only to a server whose welcome set deltaBatches: the deltas that piled up
# while the agent's previous write was in flight, in the order they were produced, in one message.
struct Deltas {
  items @0 :List(Delta);
}

# agent -> server, sent only to a server whose welcome set modelUpdates: the models the agent
# offers now, in place of those of its hello (or of its last advertise), e.g. after its backend
# loaded or unloaded one. The same limits as the hello's models apply.
struct Advertise {
  models @0 :List(ModelOffer);
}

struct Frame {
  union {
    hello @0 :Hello;
    heartbeat @1 :Heartbeat;
    delta @2 :Delta;
    done @3 :Done;
    jobError @4 :JobError;
    welcome @5 :Welcome;
    offer @6 :Offer;
    cancel @7 :Cancel;
    deltas @8 :Deltas;
    advertise @9 :Advertise;
  }
}
