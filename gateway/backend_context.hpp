#pragma once
/// The context windows a backend's /v1/models leaves out or overstates, read from the backend's
/// own API. LM Studio's and Ollama's /v1/models give none; llama.cpp server's gives the window
/// the model was trained with (meta.n_ctx_train), not the one it serves (its -c, shared among its
/// -np slots). The coordinator checks every prompt against the window a provider advertises, so
/// the agent advertises no model whose window it does not know.

#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "gateway/upstream_client.hpp"

namespace gpustream::gateway {

/// Deepest JSON nesting read in these answers; a deeper body is not one of them (nothing found).
inline constexpr std::size_t backend_answer_depth_max = 32;

/// llama.cpp server's GET /props: default_generation_settings.n_ctx, the tokens one request may
/// use; nothing when the body does not say.
[[nodiscard]] std::optional<std::uint32_t> llama_cpp_served_context(std::string_view props_body);

/// What Ollama serves a model with when neither the model's parameters nor anything this agent
/// can see sets num_ctx: 4,096 tokens since Ollama 0.6.7 (OLLAMA_CONTEXT_LENGTH on the server
/// changes it; `gpustream provider --context-length` then says what it is).
inline constexpr std::uint32_t ollama_default_context_tokens = 4'096;

/// Ollama's POST /api/show {"model": id}: the model's num_ctx when its parameters set one, else
/// ollama_default_context_tokens, in both cases at most the model's own window
/// (model_info."<architecture>.context_length"). Ollama cuts a longer prompt without a word, so
/// advertising more would let prompts through that it then truncates. Nothing when the body is
/// not such an answer.
[[nodiscard]] std::optional<std::uint32_t> ollama_served_context(std::string_view show_body);

/// What LM Studio loads a model with on first use (a request naming a model it has not loaded)
/// when nothing else sets it: its default context length, 4,096 tokens. A model loaded by hand
/// (`lms load --context-length`, the app) says its own; `gpustream provider --context-length`
/// says what a changed default is.
inline constexpr std::uint32_t lm_studio_default_context_tokens = 4'096;

/// The windows LM Studio serves its models with, by model id, from its GET /api/v0/models (read
/// once for all of them): an entry's loaded_context_length when the model is loaded; otherwise it
/// will be loaded on first use, with lm_studio_default_context_tokens, at most the model's own
/// max_context_length (advertising that one, up to 131,072 for common models, would let through
/// prompts the loaded model cannot take). An entry that says neither is left out; none when the
/// body is no such list.
[[nodiscard]] std::map<std::string, std::uint32_t, std::less<>> lm_studio_served_contexts(std::string_view models_body);

/// Fills in the window of every model whose /v1/models entry has none, or only the trained one:
/// asks llama.cpp server's /props (one window for all), then LM Studio's /api/v0/models
/// (lm_studio_served_contexts), then Ollama's /api/show, one model at a
/// time, each only while some model still lacks a window. A backend without such an endpoint
/// answers an error, which is passed over. Models left without a window keep 0; one whose only
/// window is the trained one keeps it. Calls `done` once, on the client's io_context.
void find_context_lengths(upstream_client client, std::vector<upstream_model> models,
                          std::function<void(std::vector<upstream_model>)> done);

}  // namespace gpustream::gateway
