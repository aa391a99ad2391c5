#include "tests/events/event_examples.hpp"

#include <cstddef>

namespace gpustream::events {

namespace {

/// A digest whose bytes are first, first + step, first + 2 * step, ... (mod 256).
sha256_digest digest_pattern(std::uint8_t first, std::uint8_t step) {
  sha256_digest digest{};
  for (std::size_t i = 0; i < digest.size(); ++i) {
    digest[i] = static_cast<std::uint8_t>(first + i * step);
  }
  return digest;
}

std::vector<event> user_examples() {
  return {
      user_created{.user_id = "user-ada",
                   .display_name = "Ada Lovelace",
                   .tier = user_tier::premium,
                   .created_at_us = 1'700'000'000'000'001},
      api_key_issued{.user_id = "user-ada",
                     .key_id = "key-7f3a",
                     .key_hash = digest_pattern(0xa0, 1),
                     .label = "laptop agent",
                     .issued_at_us = 1'700'000'000'000'002},
      api_key_revoked{.user_id = "user-ada",
                      .key_id = "key-7f3a",
                      .reason = "leaked in a public repository",
                      .revoked_at_us = 1'700'000'000'000'003},
      user_tier_changed{.user_id = "user-bob",
                        .tier = user_tier::premium,
                        .changed_at_us = 1'700'000'000'000'004},
      user_credited{.user_id = "user-ada",
                    .deposit_id = "dep-stripe-pi_3Nx",
                    .amount_micros = 25'000'000,
                    .credited_at_us = 1'700'000'000'000'005},
  };
}

std::vector<event> provider_examples() {
  return {
      provider_created{.provider_id = "prov-17",
                       .owner_user_id = "user-carol",
                       .name = "carol's twin 4090s",
                       .token_hash = digest_pattern(0x11, 7),
                       .created_at_us = 1'700'000'000'000'006},
      provider_connected{
          .provider_id = "prov-17",
          .gpus = {gpu_info{.name = "NVIDIA GeForce RTX 4090",
                            .memory_bytes = 25'757'220'864,
                            .compute_capability_major = 8,
                            .compute_capability_minor = 9},
                   gpu_info{.name = "NVIDIA RTX A6000",
                            .memory_bytes = 51'527'024'640,
                            .compute_capability_major = 7,
                            .compute_capability_minor = 6}},
          .backend = backend_kind::builtin,
          .backend_url = "file:///models/llama-3.1-8b-q4_k_m.gguf",
          .agent_version = "0.3.1",
          .connected_at_us = 1'700'000'000'000'007},
      models_advertised{
          .provider_id = "prov-17",
          .models = {model_offer{.model_name = "llama-3.1-8b-instruct",
                                 .context_length_tokens = 131'072,
                                 .quantisation = "Q4_K_M",
                                 .input_price_micros_per_mtok = 150'000,
                                 .output_price_micros_per_mtok = 600'000,
                                 .max_concurrency = 4},
                     model_offer{.model_name = "qwen2.5-32b-instruct",
                                 .context_length_tokens = 32'768,
                                 .quantisation = "fp16",
                                 .input_price_micros_per_mtok = 700'000,
                                 .output_price_micros_per_mtok = 2'100'000,
                                 .max_concurrency = 2}},
          .advertised_at_us = 1'700'000'000'000'008},
      provider_disconnected{.provider_id = "prov-17",
                            .reason = disconnect_reason::heartbeat_missed,
                            .detail = "3 heartbeats missed over 15 s",
                            .disconnected_at_us = 1'700'000'000'000'009},
      provider_suspended{.provider_id = "prov-23",
                         .reason = "token counts disagree with ours",
                         .counters = {.unreasonably_fast_jobs = 3,
                                      .aborted_jobs = 5,
                                      .token_count_mismatches = 11},
                         .suspended_at_us = 1'700'000'000'000'010,
                         .suspended_until_at_us = 1'700'086'400'000'010},
      provider_scored{.provider_id = "prov-17",
                      .job_id = "job-9001",
                      .speed_points = 12,
                      .complexity_points = 7,
                      .success_points = -3,
                      .total_score = 48'213,
                      .level = provider_level::platinum,
                      .scored_at_us = 1'700'000'000'000'011},
      achievement_unlocked{.provider_id = "prov-17",
                           .achievement = achievement_kind::fifty_successes_in_a_row,
                           .unlocked_at_us = 1'700'000'000'000'012},
  };
}

std::vector<event> job_examples() {
  return {
      job_submitted{.job_id = "job-9001",
                    .user_id = "user-ada",
                    .model = "llama-3.1-8b-instruct",
                    .quality = quality_tier::high,
                    .prompt_tokens = 1'234,
                    .max_tokens = 512,
                    .max_price_micros = 4'321,
                    .premium = true,
                    .conversation_id = "conv-5e1",
                    .submitted_at_us = 1'700'000'000'000'013},
      job_queued{.job_id = "job-9001",
                 .priority = 42,
                 .deadline_at_us = 1'700'000'030'000'013,
                 .queued_at_us = 1'700'000'000'000'014},
      job_assigned{.job_id = "job-9001",
                   .provider_id = "prov-17",
                   .attempt = 2,
                   .assigned_at_us = 1'700'000'000'000'015},
      job_started{.job_id = "job-9001",
                  .provider_id = "prov-17",
                  .first_token_at_us = 1'700'000'000'180'016},
      job_reassigned{.job_id = "job-9002",
                     .from_provider_id = "prov-23",
                     .reason = reassign_reason::provider_stalled,
                     .tokens_so_far = 37,
                     .reassigned_at_us = 1'700'000'000'000'017},
      job_completed{.job_id = "job-9001",
                    .provider_id = "prov-17",
                    .prompt_tokens = 1'234,
                    .completion_tokens = 480,
                    .provider_reported_tokens = 481,
                    .time_to_first_token_us = 180'003,
                    .total_us = 6'400'500,
                    .completed_at_us = 1'700'000'006'400'018},
      job_failed{.job_id = "job-9003",
                 .reason = failure_reason::prompt_too_long,
                 .message = "prompt of 40000 tokens exceeds the context length 32768",
                 .failed_at_us = 1'700'000'000'000'019},
      job_cancelled{.job_id = "job-9004",
                    .by = cancelled_by::platform,
                    .tokens_produced = 99,
                    .cancelled_at_us = 1'700'000'000'000'020},
  };
}

std::vector<event> campaign_examples() {
  return {
      campaign_created{.campaign_id = "camp-3",
                       .advertiser = "Acme Rust Courses",
                       .title = "Learn Rust in a weekend",
                       .text = "Hands-on ownership and lifetimes, no fluff.",
                       .url = "https://acme.example/rust?src=gpustream",
                       .keywords = {"rust", "borrow checker", "cargo"},
                       .categories = {"programming", "education"},
                       .cpm_bid_micros = 2'500'000,
                       .budget_micros = 500'000'000,
                       .daily_budget_micros = 40'000'000,
                       .frequency_cap_per_day = 3,
                       .created_at_us = 1'700'000'000'000'021},
      campaign_funded{.campaign_id = "camp-3",
                      .amount_micros = 100'000'000,
                      .funded_at_us = 1'700'000'000'000'022},
      campaign_paused{.campaign_id = "camp-3",
                      .reason = "advertiser asked for a pause over the holidays",
                      .paused_at_us = 1'700'000'000'000'023},
      campaign_resumed{.campaign_id = "camp-3", .resumed_at_us = 1'700'000'000'000'024},
      campaign_exhausted{.campaign_id = "camp-3",
                         .spent_micros = 499'998'750,
                         .exhausted_at_us = 1'700'000'000'000'025},
      impression_recorded{.impression_id = "imp-77",
                          .campaign_id = "camp-3",
                          .job_id = "job-9005",
                          .user_id = "user-bob",
                          .price_micros = 2'250,
                          .recorded_at_us = 1'700'000'000'000'026},
      ad_clicked{.impression_id = "imp-77",
                 .campaign_id = "camp-3",
                 .clicked_at_us = 1'700'000'000'000'027},
  };
}

std::vector<event> money_examples() {
  return {
      transfer_recorded{.transfer_id = "xfer-job-9001-fee",
                        .debit_account = "provider-prov-17",
                        .credit_account = "platform",
                        .amount_micros = 123,
                        .kind = transfer_kind::platform_fee,
                        .reference = "job-9001",
                        .linked_group_id = "group-job-9001",
                        .recorded_at_us = 1'700'000'000'000'028},
      payout_requested{.payout_id = "pay-5",
                       .provider_id = "prov-17",
                       .amount_micros = 50'000'000,
                       .automatic = true,
                       .requested_at_us = 1'700'000'000'000'029},
      payout_settled{.payout_id = "pay-5",
                     .external_reference = "po_1OaBcD",
                     .settled_at_us = 1'700'000'000'000'030},
      payout_failed{.payout_id = "pay-6",
                    .reason = "bank account closed",
                    .failed_at_us = 1'700'000'000'000'031},
  };
}

/// Types appended after the first catalog, in type-number order.
std::vector<event> appended_examples() {
  return {
      ad_reserved{.reservation_id = "imp-78",
                  .campaign_id = "camp-3",
                  .job_id = "job-9006",
                  .user_id = "user-bob",
                  .price_micros = 2'500,
                  .reserved_at_us = 1'700'000'000'000'032,
                  .expires_at_us = 1'700'000'060'000'032},
      ad_reservation_released{.reservation_id = "imp-78",
                              .campaign_id = "camp-3",
                              .reason = "job job-9006 failed before the ad was served",
                              .released_at_us = 1'700'000'000'000'033},
      suspicion_recorded{.provider_id = "prov-17",
                         .job_id = "job-9007",
                         .kind = suspicion_kind::token_count_mismatch,
                         .counters = {.unreasonably_fast_jobs = 1,
                                      .aborted_jobs = 0,
                                      .token_count_mismatches = 4},
                         .recorded_at_us = 1'700'000'000'000'034},
      free_tokens_used{.user_id = "user-bob",
                       .job_id = "job-9005",
                       .tokens = 1'234,
                       .used_at_us = 1'700'000'000'000'035},
      impression_voided{.impression_id = "imp-77",
                        .campaign_id = "camp-3",
                        .reason = "the answer was not settled: job job-9004 is no longer running on prov-17",
                        .voided_at_us = 1'700'000'000'000'036},
      provider_token_replaced{.provider_id = "prov-17",
                              .token_hash = digest_pattern(0x12, 7),
                              .replaced_at_us = 1'700'000'000'000'037},
  };
}

}  // namespace

std::vector<event> event_examples() {
  std::vector<event> examples;
  for (auto group : {user_examples(), provider_examples(), job_examples(), campaign_examples(),
                     money_examples(), appended_examples()}) {
    for (auto& example : group) examples.push_back(std::move(example));
  }
  return examples;
}

std::vector<evolved_example> evolved_examples() {
  const ledger_bill bill{.group_id = "job-9001",
                         .transfers = {{.transfer_id = "job-9001/usage",
                                        .debit_account = "user-alice",
                                        .credit_account = "provider-prov-17",
                                        .amount_micros = 12'345,
                                        .kind = transfer_kind::usage,
                                        .reference = "job-9001"},
                                       {.transfer_id = "job-9001/platform_fee",
                                        .debit_account = "provider-prov-17",
                                        .credit_account = "platform",
                                        .amount_micros = 1'234,
                                        .kind = transfer_kind::platform_fee,
                                        .reference = "job-9001"}}};
  ledger_bill cancelled_bill = bill;
  cancelled_bill.group_id = "job-9004";
  for (auto& t : cancelled_bill.transfers) {
    t.transfer_id.replace(0, 8, "job-9004");
    t.reference = "job-9004";
    t.amount_micros /= 3;
  }
  cancelled_bill.transfers[0].debit_account = "subsidy";
  cancelled_bill.transfers[0].kind = transfer_kind::free_tier_subsidy;
  cancelled_bill.transfers[0].transfer_id = "job-9004/free_tier_subsidy";
  auto completed = std::get<job_completed>(event_examples()[17]);
  completed.bill = bill;
  auto cancelled = std::get<job_cancelled>(event_examples()[19]);
  cancelled.bill = cancelled_bill;
  auto completed_free = completed;
  completed_free.free_tokens = completed.prompt_tokens + completed.completion_tokens;
  auto cancelled_free = cancelled;
  cancelled_free.free_tokens = 40 + cancelled.tokens_produced;
  auto completed_billed = completed_free;
  completed_billed.prompt_tokens_billed = completed.prompt_tokens - 1;
  completed_billed.free_tokens = completed_billed.prompt_tokens_billed + completed.completion_tokens;
  return {{"job_completed.bill", completed},
          {"job_cancelled.bill", cancelled},
          {"job_completed.free_tokens", completed_free},
          {"job_cancelled.free_tokens", cancelled_free},
          {"job_completed.prompt_tokens_billed", completed_billed}};
}

}  // namespace gpustream::events
