#pragma once
// The Cap'n Proto conversions of the value structs that the event log (events/codec.cpp) and the
// provider link (gateway/link_codec.cpp) both carry. The two schemas stay separate on purpose (the
// stored format and the wire protocol evolve on different schedules); where their structs agree
// field by field, one template here reads and writes either. Include only from a codec's .cpp.

#include <capnp/blob.h>

#include <string>

#include "events/event.hpp"

namespace gpustream::events::capnp_values {

inline std::string to_std(capnp::Text::Reader text) { return std::string(text.begin(), text.size()); }

/// std::string keeps a NUL after its last character, which capnp::Text requires.
inline capnp::Text::Reader to_wire(const std::string& text) { return {text.data(), text.size()}; }

/// Either schema's GpuInfo.
template <class Builder>
void write_gpu_info(Builder b, const gpu_info& v) {
  b.setName(to_wire(v.name));
  b.setMemoryBytes(v.memory_bytes);
  b.setComputeCapabilityMajor(v.compute_capability_major);
  b.setComputeCapabilityMinor(v.compute_capability_minor);
}

template <class Reader>
gpu_info read_gpu_info(Reader r) {
  return {.name = to_std(r.getName()),
          .memory_bytes = r.getMemoryBytes(),
          .compute_capability_major = r.getComputeCapabilityMajor(),
          .compute_capability_minor = r.getComputeCapabilityMinor()};
}

/// Either schema's ModelOffer.
template <class Builder>
void write_model_offer(Builder b, const model_offer& v) {
  b.setModelName(to_wire(v.model_name));
  b.setContextLengthTokens(v.context_length_tokens);
  b.setQuantisation(to_wire(v.quantisation));
  b.setInputPriceMicrosPerMtok(v.input_price_micros_per_mtok);
  b.setOutputPriceMicrosPerMtok(v.output_price_micros_per_mtok);
  b.setMaxConcurrency(v.max_concurrency);
}

template <class Reader>
model_offer read_model_offer(Reader r) {
  return {.model_name = to_std(r.getModelName()),
          .context_length_tokens = r.getContextLengthTokens(),
          .quantisation = to_std(r.getQuantisation()),
          .input_price_micros_per_mtok = r.getInputPriceMicrosPerMtok(),
          .output_price_micros_per_mtok = r.getOutputPriceMicrosPerMtok(),
          .max_concurrency = r.getMaxConcurrency()};
}

}  // namespace gpustream::events::capnp_values
