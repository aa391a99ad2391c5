@0xe6bee26209d02176;
# The payload of every stored event: one `Event` whose union tag is the event's type number
# (Record.type in record.capnp), which equals the variant index of gpustream::events::event.
#
# Schema evolution rules (old events must stay decodable forever; tests/events/golden proves it):
#   - never renumber or reuse an ordinal, of a field, an enumerant or a union member;
#   - never change a field's type or its meaning;
#   - only append: new fields get the next ordinal, new event types become new union members at the
#     end of `Event`, new enumerants go at the end of their enum.
#
# Units: money is Int64 micro-USD (`...Micros`); prices are micro-USD per million tokens
# (`...MicrosPerMtok`); instants are Int64 microseconds since the Unix epoch (`...AtUs`); durations
# are Int64 microseconds (`...Us`); ids are Text. Secrets (API keys, provider tokens) are never
# stored in clear, only as their 32-byte SHA-256 digest (`...Hash`).

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("gpustream::events::schema");

# ---------------------------------------------------------------------------------------------
# Shared enums and value structs

enum UserTier {
  free @0;
  premium @1;
}

enum BackendKind {
  openai @0;    # an OpenAI-compatible server on the provider's machine (LM Studio, Ollama, vLLM...)
  builtin @1;   # gpustream's own inference engine loading a GGUF file
}

enum DisconnectReason {
  goingOffline @0;      # the provider said goodbye
  heartbeatMissed @1;   # too many heartbeats missed: the link is stale
  connectionLost @2;    # the transport closed without a goodbye
  replaced @3;          # a newer link of the same provider took over
  protocolError @4;     # the provider sent something the link protocol forbids
}

enum ProviderLevel {
  unverified @0;
  bronze @1;
  silver @2;
  gold @3;
  platinum @4;
  diamond @5;
  master @6;
}

enum AchievementKind {
  tenFastJobs @0;
  hundredJobs @1;
  fiftySuccessesInARow @2;
  hourOfUptime @3;
}

enum QualityTier {
  low @0;
  standard @1;
  high @2;
  ultra @3;
}

enum ReassignReason {
  providerLost @0;      # the provider's link went away
  providerStalled @1;   # no token within the allowed time
  providerError @2;     # the provider reported an error for this job
  providerDeclined @3;  # the provider declined the offer untried (its slots were full): no attempt spent
}

enum FailureReason {
  noProvider @0;           # no online provider serves the model at the requested quality
  deadlineExceeded @1;     # still queued when the deadline passed
  allProvidersFailed @2;   # every attempt failed and no provider is left
  promptTooLong @3;        # the prompt does not fit the model's context length
  insufficientFunds @4;    # the user's prepaid balance cannot cover the maximum price
  upstreamError @5;        # the provider's backend returned an error the platform cannot retry
  internal @6;             # a fault of the platform itself
  quotaExceeded @7;        # a free user's daily token quota cannot cover the job
}

enum CancelledBy {
  client @0;     # the client disconnected or asked to stop
  platform @1;   # an operator or a platform rule stopped the job
}

enum TransferKind {
  usage @0;             # user pays for tokens consumed (user -> provider)
  platformFee @1;       # the platform's share of a job (provider -> platform)
  freeTierSubsidy @2;   # the platform pays for a free-tier job (platform -> provider)
  adSpend @3;           # a campaign pays for an impression (campaign escrow -> platform)
  deposit @4;           # money enters from outside (external -> user or campaign)
  payout @5;            # money leaves to a provider (provider -> external)
}

enum SuspicionKind {
  unreasonablyFast @0;       # output faster than the provider's hardware can plausibly produce
  aborted @1;                # a job dropped without a platform or client cause
  tokenCountMismatch @2;     # the provider's token count disagrees with the platform's own count
}

struct GpuInfo {
  name @0 :Text;                       # e.g. "NVIDIA GeForce RTX 4090"
  memoryBytes @1 :UInt64;              # total device memory
  computeCapabilityMajor @2 :UInt8;    # CUDA compute capability, e.g. 8 of 8.9
  computeCapabilityMinor @3 :UInt8;    # e.g. 9 of 8.9
}

struct ModelOffer {
  modelName @0 :Text;                  # e.g. "llama-3.1-8b-instruct"
  contextLengthTokens @1 :UInt32;
  quantisation @2 :Text;               # e.g. "Q4_K_M", "fp16"
  inputPriceMicrosPerMtok @3 :Int64;
  outputPriceMicrosPerMtok @4 :Int64;
  maxConcurrency @5 :UInt32;           # jobs the provider serves at once for this model
}

struct SuspicionCounters {
  unreasonablyFastJobs @0 :UInt32;     # output faster than the hardware can plausibly produce
  abortedJobs @1 :UInt32;              # jobs the provider dropped without a platform or client cause
  tokenCountMismatches @2 :UInt32;     # provider-reported token counts that disagree with ours
}

# ---------------------------------------------------------------------------------------------
# Users and API keys (stream user-<id>)

struct UserCreated {
  userId @0 :Text;
  displayName @1 :Text;
  tier @2 :UserTier;
  createdAtUs @3 :Int64;
}

struct ApiKeyIssued {
  userId @0 :Text;
  keyId @1 :Text;                      # public, shown to the user next to the key's label
  keyHash @2 :Data;                    # SHA-256 of the secret key (32 bytes); the key itself is never stored
  label @3 :Text;
  issuedAtUs @4 :Int64;
}

struct ApiKeyRevoked {
  userId @0 :Text;
  keyId @1 :Text;
  reason @2 :Text;
  revokedAtUs @3 :Int64;
}

struct UserTierChanged {
  userId @0 :Text;
  tier @1 :UserTier;                   # the new tier
  changedAtUs @2 :Int64;
}

struct UserCredited {
  userId @0 :Text;
  depositId @1 :Text;                  # the payment that brought the money in; idempotency key
  amountMicros @2 :Int64;
  creditedAtUs @3 :Int64;
}

struct FreeTokensUsed {
  userId @0 :Text;
  jobId @1 :Text;
  tokens @2 :UInt32;                   # prompt + completion tokens counted against the daily quota
  usedAtUs @3 :Int64;
}

# ---------------------------------------------------------------------------------------------
# Providers (stream provider-<id>)

struct ProviderCreated {
  providerId @0 :Text;
  ownerUserId @1 :Text;                # the user who owns the GPUs (earns contribution score)
  name @2 :Text;
  tokenHash @3 :Data;                  # SHA-256 of the provider link token (32 bytes)
  createdAtUs @4 :Int64;
}

struct ProviderTokenReplaced {
  providerId @0 :Text;
  tokenHash @1 :Data;                  # SHA-256 of the new link token (32 bytes)
  replacedAtUs @2 :Int64;
}

struct ProviderConnected {
  providerId @0 :Text;
  gpus @1 :List(GpuInfo);
  backend @2 :BackendKind;
  backendUrl @3 :Text;                 # for openai: the upstream base URL; for builtin: the model file
  agentVersion @4 :Text;
  connectedAtUs @5 :Int64;
}

struct ModelsAdvertised {
  providerId @0 :Text;
  models @1 :List(ModelOffer);         # replaces every earlier offer of this provider
  advertisedAtUs @2 :Int64;
}

struct ProviderDisconnected {
  providerId @0 :Text;
  reason @1 :DisconnectReason;
  detail @2 :Text;
  disconnectedAtUs @3 :Int64;
}

struct ProviderSuspended {
  providerId @0 :Text;
  reason @1 :Text;
  counters @2 :SuspicionCounters;      # the counters that led to the suspension
  suspendedAtUs @3 :Int64;
  suspendedUntilAtUs @4 :Int64;
}

struct ProviderScored {
  providerId @0 :Text;
  jobId @1 :Text;
  speedPoints @2 :Int32;
  complexityPoints @3 :Int32;
  successPoints @4 :Int32;             # negative for a failure the provider caused
  totalScore @5 :Int64;                # the provider's score after this job
  level @6 :ProviderLevel;             # the provider's level after this job
  scoredAtUs @7 :Int64;
}

struct AchievementUnlocked {
  providerId @0 :Text;
  achievement @1 :AchievementKind;
  unlockedAtUs @2 :Int64;
}

struct SuspicionRecorded {
  providerId @0 :Text;
  jobId @1 :Text;
  kind @2 :SuspicionKind;
  counters @3 :SuspicionCounters;      # the provider's counters after this one
  recordedAtUs @4 :Int64;
}

# ---------------------------------------------------------------------------------------------
# Jobs (stream job-<id>)

struct JobSubmitted {
  jobId @0 :Text;
  userId @1 :Text;
  model @2 :Text;
  quality @3 :QualityTier;
  promptTokens @4 :UInt32;
  maxTokens @5 :UInt32;
  maxPriceMicros @6 :Int64;            # the most the user agreed to pay for this job
  premium @7 :Bool;
  conversationId @8 :Text;             # keeps a conversation on one provider (sticky sessions)
  submittedAtUs @9 :Int64;
}

struct JobQueued {
  jobId @0 :Text;
  priority @1 :Int32;                  # higher is served first
  deadlineAtUs @2 :Int64;
  queuedAtUs @3 :Int64;
}

struct JobAssigned {
  jobId @0 :Text;
  providerId @1 :Text;
  attempt @2 :UInt32;                  # 1 for the first assignment
  assignedAtUs @3 :Int64;
}

struct JobStarted {
  jobId @0 :Text;
  providerId @1 :Text;
  firstTokenAtUs @2 :Int64;
}

struct JobReassigned {
  jobId @0 :Text;
  fromProviderId @1 :Text;
  reason @2 :ReassignReason;
  tokensSoFar @3 :UInt32;              # completion tokens kept as the assistant prefix
  reassignedAtUs @4 :Int64;
}

struct JobCompleted {
  jobId @0 :Text;
  providerId @1 :Text;
  promptTokens @2 :UInt32;
  completionTokens @3 :UInt32;
  providerReportedTokens @4 :UInt32;   # what the provider claimed; a mismatch raises suspicion
  timeToFirstTokenUs @5 :Int64;
  totalUs @6 :Int64;
  completedAtUs @7 :Int64;
  bill @8 :LedgerBill;                 # the ledger group its end owes; absent before it was recorded
  freeTokens @9 :UInt32;               # free tier: tokens its end counts against the user's daily quota
  promptTokensBilled @10 :UInt32;      # the prompt tokens billed: the backend's count when below promptTokens (the estimate); 0: promptTokens
}

struct JobFailed {
  jobId @0 :Text;
  reason @1 :FailureReason;
  message @2 :Text;
  failedAtUs @3 :Int64;
}

struct JobCancelled {
  jobId @0 :Text;
  by @1 :CancelledBy;
  tokensProduced @2 :UInt32;           # completion tokens generated before the cancel; billed
  cancelledAtUs @3 :Int64;
  bill @4 :LedgerBill;                 # the ledger group its end owes; absent before it was recorded
  freeTokens @5 :UInt32;               # free tier: tokens its end counts against the user's daily quota
}

# What a job's end owes the ledger, recorded with the end (job_completed, job_cancelled) so that a
# stop between the job's record and the ledger's can be settled later: exactly the linked group the
# ledger is then asked to apply. No transfers: nothing owed.
struct LedgerBill {
  groupId @0 :Text;
  transfers @1 :List(BilledTransfer);
}

struct BilledTransfer {
  transferId @0 :Text;
  debitAccount @1 :Text;
  creditAccount @2 :Text;
  amountMicros @3 :Int64;
  kind @4 :TransferKind;
  reference @5 :Text;
}

# ---------------------------------------------------------------------------------------------
# Campaigns (stream campaign-<id>)

struct CampaignCreated {
  campaignId @0 :Text;
  advertiser @1 :Text;
  title @2 :Text;
  text @3 :Text;
  url @4 :Text;
  keywords @5 :List(Text);
  categories @6 :List(Text);
  cpmBidMicros @7 :Int64;              # bid per thousand impressions
  budgetMicros @8 :Int64;
  dailyBudgetMicros @9 :Int64;
  frequencyCapPerDay @10 :UInt32;      # impressions per user per day
  createdAtUs @11 :Int64;
}

struct CampaignFunded {
  campaignId @0 :Text;
  amountMicros @1 :Int64;
  fundedAtUs @2 :Int64;
}

struct CampaignPaused {
  campaignId @0 :Text;
  reason @1 :Text;
  pausedAtUs @2 :Int64;
}

struct CampaignResumed {
  campaignId @0 :Text;
  resumedAtUs @1 :Int64;
}

struct CampaignExhausted {
  campaignId @0 :Text;
  spentMicros @1 :Int64;               # total spent when the budget ran out
  exhaustedAtUs @2 :Int64;
}

struct ImpressionRecorded {
  impressionId @0 :Text;
  campaignId @1 :Text;
  jobId @2 :Text;
  userId @3 :Text;
  priceMicros @4 :Int64;               # charged for this one impression (second price)
  recordedAtUs @5 :Int64;
}

struct AdClicked {
  impressionId @0 :Text;
  campaignId @1 :Text;
  clickedAtUs @2 :Int64;
}

struct AdReserved {
  reservationId @0 :Text;              # becomes the impression id when the ad is served
  campaignId @1 :Text;
  jobId @2 :Text;
  userId @3 :Text;
  priceMicros @4 :Int64;               # held from the budget until recorded or released
  reservedAtUs @5 :Int64;
  expiresAtUs @6 :Int64;               # released automatically if not served by then
}

struct ImpressionVoided {
  impressionId @0 :Text;
  campaignId @1 :Text;
  reason @2 :Text;                     # why: the answer was not settled with it, the client left
  voidedAtUs @3 :Int64;
}

struct AdReservationReleased {
  reservationId @0 :Text;
  campaignId @1 :Text;
  reason @2 :Text;                     # why the ad was not served (job failed, expired, ...)
  releasedAtUs @3 :Int64;
}

# ---------------------------------------------------------------------------------------------
# Ledger (stream ledger)

struct TransferRecorded {
  transferId @0 :Text;                 # idempotency key: one id is applied at most once
  debitAccount @1 :Text;
  creditAccount @2 :Text;
  amountMicros @3 :Int64;              # always positive
  kind @4 :TransferKind;
  reference @5 :Text;                  # the job, impression, deposit or payout that caused it
  linkedGroupId @6 :Text;              # transfers of one group are applied together or not at all
  recordedAtUs @7 :Int64;
}

# ---------------------------------------------------------------------------------------------
# Payouts (stream payout-<id>)

struct PayoutRequested {
  payoutId @0 :Text;
  providerId @1 :Text;
  amountMicros @2 :Int64;
  automatic @3 :Bool;                  # requested by the threshold rule rather than the provider
  requestedAtUs @4 :Int64;
}

struct PayoutSettled {
  payoutId @0 :Text;
  externalReference @1 :Text;          # the payment processor's id for the transfer
  settledAtUs @2 :Int64;
}

struct PayoutFailed {
  payoutId @0 :Text;
  reason @1 :Text;
  failedAtUs @2 :Int64;
}

# ---------------------------------------------------------------------------------------------
# The event. The union ordinal is the event's type number on the wire and the variant index of
# gpustream::events::event. Never renumber or reuse an ordinal; only append union members.

struct Event {
  union {
    userCreated @0 :UserCreated;
    apiKeyIssued @1 :ApiKeyIssued;
    apiKeyRevoked @2 :ApiKeyRevoked;
    userTierChanged @3 :UserTierChanged;
    userCredited @4 :UserCredited;
    providerCreated @5 :ProviderCreated;
    providerConnected @6 :ProviderConnected;
    modelsAdvertised @7 :ModelsAdvertised;
    providerDisconnected @8 :ProviderDisconnected;
    providerSuspended @9 :ProviderSuspended;
    providerScored @10 :ProviderScored;
    achievementUnlocked @11 :AchievementUnlocked;
    jobSubmitted @12 :JobSubmitted;
    jobQueued @13 :JobQueued;
    jobAssigned @14 :JobAssigned;
    jobStarted @15 :JobStarted;
    jobReassigned @16 :JobReassigned;
    jobCompleted @17 :JobCompleted;
    jobFailed @18 :JobFailed;
    jobCancelled @19 :JobCancelled;
    campaignCreated @20 :CampaignCreated;
    campaignFunded @21 :CampaignFunded;
    campaignPaused @22 :CampaignPaused;
    campaignResumed @23 :CampaignResumed;
    campaignExhausted @24 :CampaignExhausted;
    impressionRecorded @25 :ImpressionRecorded;
    adClicked @26 :AdClicked;
    transferRecorded @27 :TransferRecorded;
    payoutRequested @28 :PayoutRequested;
    payoutSettled @29 :PayoutSettled;
    payoutFailed @30 :PayoutFailed;
    adReserved @31 :AdReserved;
    adReservationReleased @32 :AdReservationReleased;
    suspicionRecorded @33 :SuspicionRecorded;
    freeTokensUsed @34 :FreeTokensUsed;
    impressionVoided @35 :ImpressionVoided;
    providerTokenReplaced @36 :ProviderTokenReplaced;
  }
}
