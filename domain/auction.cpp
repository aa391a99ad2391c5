#include "domain/auction.hpp"

#include <algorithm>
#include <array>
#include <utility>
#include <vector>

#include "base/ensure.hpp"

namespace gpustream::domain {

namespace {

/// A small keyword -> category table, sorted by word for binary search. Deliberately short: it
/// lets a campaign that names a category match prompts that only use that category's common
/// words; advertisers list their own keywords for anything finer.
constexpr std::array<std::pair<std::string_view, std::string_view>, 62> category_table = {{
    {"ai", "ai"},
    {"bank", "finance"},
    {"camera", "video"},
    {"chatbot", "ai"},
    {"code", "programming"},
    {"coding", "programming"},
    {"compiler", "programming"},
    {"console", "gaming"},
    {"cooking", "food"},
    {"course", "education"},
    {"cpu", "hardware"},
    {"crypto", "finance"},
    {"cuda", "hardware"},
    {"database", "programming"},
    {"diet", "health"},
    {"dinner", "food"},
    {"doctor", "health"},
    {"exam", "education"},
    {"fitness", "health"},
    {"flight", "travel"},
    {"flights", "travel"},
    {"game", "gaming"},
    {"games", "gaming"},
    {"golang", "programming"},
    {"gpu", "hardware"},
    {"gpus", "hardware"},
    {"hotel", "travel"},
    {"inference", "ai"},
    {"invest", "finance"},
    {"investing", "finance"},
    {"java", "programming"},
    {"javascript", "programming"},
    {"laptop", "hardware"},
    {"learn", "education"},
    {"llm", "ai"},
    {"loan", "finance"},
    {"ml", "ai"},
    {"neural", "ai"},
    {"nvidia", "hardware"},
    {"python", "programming"},
    {"ram", "hardware"},
    {"recipe", "food"},
    {"recipes", "food"},
    {"render", "video"},
    {"rendering", "video"},
    {"restaurant", "food"},
    {"rust", "programming"},
    {"sql", "programming"},
    {"steam", "gaming"},
    {"stock", "finance"},
    {"stocks", "finance"},
    {"streaming", "video"},
    {"tax", "finance"},
    {"training", "ai"},
    {"trip", "travel"},
    {"tutorial", "education"},
    {"typescript", "programming"},
    {"university", "education"},
    {"vacation", "travel"},
    {"video", "video"},
    {"workout", "health"},
    {"youtube", "video"},
}};

constexpr bool table_is_sorted() {
  for (std::size_t i = 1; i < category_table.size(); ++i)
    if (!(category_table[i - 1].first < category_table[i].first)) return false;
  return true;
}
static_assert(table_is_sorted(), "category_table must be sorted by word, without duplicates");

bool is_word_byte(unsigned char byte) noexcept {
  return (byte >= '0' && byte <= '9') || (byte >= 'a' && byte <= 'z') || (byte >= 'A' && byte <= 'Z') ||
         byte >= 0x80;
}

/// The categories a prompt's words name: each word itself (a category named as a word) and the
/// category the table gives it. Worked out once per auction: per campaign and category, a scan of
/// every word of a long prompt would cost campaigns x categories x words lookups.
std::set<std::string_view, std::less<>> prompt_categories(const std::set<std::string>& words) {
  std::set<std::string_view, std::less<>> categories;
  for (const auto& word : words) {
    categories.insert(word);
    if (const auto category = category_of(word); !category.empty()) categories.insert(category);
  }
  return categories;
}

std::int64_t relevance_of(const std::set<std::string>& words, const std::set<std::string_view, std::less<>>& categories,
                          const campaign_state& campaign, const auction_options& options) {
  // Keywords and categories are stored lowercase and without duplicates (create_campaign
  // normalises them), so each counts once.
  std::int64_t keywords = 0;
  for (const auto& keyword : campaign.keywords) keywords += words.contains(keyword) ? 1 : 0;
  std::int64_t matched = 0;
  for (const auto& category : campaign.categories) matched += categories.contains(category) ? 1 : 0;
  return options.keyword_weight * keywords + options.category_weight * matched;
}

struct bid {
  const campaign_state* campaign = nullptr;
  std::int64_t relevance = 0;
  std::int64_t effective = 0;
};

/// Higher effective bid first; equal bids go to the smaller campaign id, so that the outcome does
/// not depend on the order campaigns were passed in.
bool ranks_before(const bid& a, const bid& b) {
  if (a.effective != b.effective) return a.effective > b.effective;
  return a.campaign->campaign_id < b.campaign->campaign_id;
}

std::vector<bid> eligible_bids(std::span<const campaign_state> campaigns, const std::set<std::string>& words,
                               std::string_view user_id, std::int64_t now_us, const auction_options& options) {
  std::vector<bid> bids;
  const auto categories = prompt_categories(words);
  for (const auto& campaign : campaigns) {
    if (!campaign.created || campaign.cpm_bid_micros < options.floor_cpm_micros) continue;
    const std::int64_t score = relevance_of(words, categories, campaign, options);
    if (score <= 0) continue;
    const std::int64_t at_bid = impression_price_micros(campaign.cpm_bid_micros);
    if (!can_reserve(campaign, user_id, at_bid, now_us, options.campaign)) continue;
    bids.push_back(bid{&campaign, score, score * campaign.cpm_bid_micros});
  }
  return bids;
}

}  // namespace

std::set<std::string> prompt_words(std::string_view prompt, std::size_t bytes_max) {
  std::set<std::string> words;
  std::string word;
  for (const char c : prompt.substr(0, bytes_max)) {
    const auto byte = static_cast<unsigned char>(c);
    if (is_word_byte(byte)) {
      word.push_back(static_cast<char>(byte >= 'A' && byte <= 'Z' ? byte - 'A' + 'a' : byte));
    } else if (!word.empty()) {
      words.insert(std::move(word));
      word.clear();
    }
  }
  // A word the limit cut in two is dropped: its first half could match a keyword it is not.
  const bool cut = prompt.size() > bytes_max && is_word_byte(static_cast<unsigned char>(prompt[bytes_max]));
  if (!word.empty() && !cut) words.insert(std::move(word));
  return words;
}

std::string_view category_of(std::string_view word) noexcept {
  const auto it = std::lower_bound(category_table.begin(), category_table.end(), word,
                                   [](const auto& entry, std::string_view key) { return entry.first < key; });
  if (it == category_table.end() || it->first != word) return {};
  return it->second;
}

std::int64_t relevance(const std::set<std::string>& words, const campaign_state& campaign,
                       const auction_options& options) {
  return relevance_of(words, prompt_categories(words), campaign, options);
}

std::optional<ad_choice> run_auction(std::span<const campaign_state> campaigns, std::string_view prompt,
                                     std::string_view user_id, std::int64_t now_us, const auction_options& options) {
  // A floor below 1,000 would let an impression cost 0: a configuration bug, not a runtime case.
  GPUSTREAM_ENSURE(options.floor_cpm_micros >= 1'000);
  const auto words = prompt_words(prompt, options.prompt_bytes_max);
  auto bids = eligible_bids(campaigns, words, user_id, now_us, options);
  if (bids.empty()) return std::nullopt;
  std::sort(bids.begin(), bids.end(), ranks_before);
  const bid& winner = bids.front();
  ad_choice choice;
  choice.campaign_id = winner.campaign->campaign_id;
  choice.relevance = winner.relevance;
  choice.effective_bid = winner.effective;
  std::int64_t clearing = options.floor_cpm_micros;
  if (bids.size() > 1) {
    choice.runner_up_campaign_id = bids[1].campaign->campaign_id;
    clearing = bids[1].effective / winner.relevance;
  }
  choice.clearing_cpm_micros = std::clamp(clearing, options.floor_cpm_micros, winner.campaign->cpm_bid_micros);
  choice.price_micros = impression_price_micros(choice.clearing_cpm_micros);
  return choice;
}

}  // namespace gpustream::domain
