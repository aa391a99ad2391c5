#include "domain/campaign.hpp"

#include <algorithm>
#include <utility>

#include "domain/time.hpp"

namespace gpustream::domain {

namespace {

constexpr std::int64_t seconds_per_day = 86'400;

using events_list = std::vector<events::event>;

/// floor(value * numerator / denominator) for non-negative arguments, without overflowing where
/// value * numerator would: value = q * denominator + r.
std::int64_t scale(std::int64_t value, std::int64_t numerator, std::int64_t denominator) noexcept {
  return value / denominator * numerator + value % denominator * numerator / denominator;
}

std::string quoted(std::string_view text) { return "\"" + std::string(text) + "\""; }
std::string micros(std::int64_t amount) { return std::to_string(amount) + " micro-USD"; }

std::int64_t bid_price(const campaign_state& s) { return impression_price_micros(s.cpm_bid_micros); }

expected<void, error> check_text(std::string_view what, std::string_view text, std::size_t length_max,
                                 bool may_be_empty = false) {
  if (!may_be_empty && text.empty()) return refuse(errc::invalid_argument, std::string(what) + " is empty");
  if (text.size() > length_max)
    return refuse(errc::invalid_argument, std::string(what) + " is " + std::to_string(text.size()) +
                                              " bytes long; at most " + std::to_string(length_max) +
                                              " are allowed");
  return {};
}

expected<void, error> check_range(std::string_view what, std::int64_t value, std::int64_t low, std::int64_t high) {
  if (value >= low && value <= high) return {};
  return refuse(errc::invalid_argument, std::string(what) + " is " + std::to_string(value) + "; it must be within " +
                                            std::to_string(low) + " .. " + std::to_string(high));
}

/// Lowercases `words`, drops duplicates (keeping the first), and refuses anything that is not a
/// word of ASCII letters and digits.
expected<std::vector<std::string>, error> normalise_words(std::string_view what, const std::vector<std::string>& words,
                                                          std::size_t count_max, std::size_t length_max) {
  if (words.size() > count_max)
    return refuse(errc::invalid_argument, std::to_string(words.size()) + " " + std::string(what) + "; at most " +
                                              std::to_string(count_max) + " are allowed");
  std::vector<std::string> result;
  for (const auto& word : words) {
    if (auto ok = check_text(what, word, length_max); !ok) return unexpected{ok.error()};
    std::string lower;
    for (const char c : word) {
      const auto byte = static_cast<unsigned char>(c);
      if (!((byte >= '0' && byte <= '9') || (byte >= 'a' && byte <= 'z') || (byte >= 'A' && byte <= 'Z')))
        return refuse(errc::invalid_argument, std::string(what) + " " + quoted(word) +
                                                  " is not one word of ASCII letters and digits");
      lower.push_back(static_cast<char>(byte >= 'A' && byte <= 'Z' ? byte - 'A' + 'a' : byte));
    }
    if (std::find(result.begin(), result.end(), lower) == result.end()) result.push_back(std::move(lower));
  }
  return result;
}

/// The byte at which `text` (UTF-8) has its first control character, or npos: C0, DEL, C1, the
/// line and paragraph separators (U+2028, U+2029), and the bidirectional embeddings, overrides
/// and isolates (U+202A..U+202E, U+2066..U+2069), which reorder the text around them.
std::size_t control_character_at(std::string_view text) {
  const auto at = [&](std::size_t i) { return i < text.size() ? static_cast<unsigned char>(text[i]) : 0u; };
  for (std::size_t i = 0; i < text.size(); ++i) {
    const auto byte = at(i);
    if (byte < 0x20 || byte == 0x7f) return i;
    if (byte == 0xc2 && at(i + 1) >= 0x80 && at(i + 1) <= 0x9f) return i;
    if (byte == 0xe2 && at(i + 1) == 0x80 && at(i + 2) >= 0xa8 && at(i + 2) <= 0xae) return i;
    if (byte == 0xe2 && at(i + 1) == 0x81 && at(i + 2) >= 0xa6 && at(i + 2) <= 0xa9) return i;
  }
  return std::string_view::npos;
}

/// The byte at which `text` has its first piece of markup that a client rendering Markdown or HTML
/// would turn into something other than words, or npos: a link or image (`[`, `]`), a tag (`<`,
/// `>`), code (a backtick), or an address it would link by itself ("://", "www.", an e-mail's
/// "@").
std::size_t markup_at(std::string_view text) {
  std::size_t at = text.find_first_of("[]<>`@");
  for (const std::string_view address : {"://", "www."}) at = std::min(at, text.find(address));
  return at;
}

/// A text shown to users after the "Sponsored:" label, on its line: a line break would let it pass
/// for the model's own words, a terminal escape could erase the label. It is plain words: an image
/// would load from the advertiser's server wherever the answer is shown, and a link of its own
/// would lead past the click URL, the ad's one link.
expected<void, error> check_shown_text(std::string_view what, std::string_view text, std::size_t length_max) {
  if (auto ok = check_text(what, text, length_max); !ok) return ok;
  if (const auto at = control_character_at(text); at != std::string_view::npos) {
    return refuse(errc::invalid_argument, std::string(what) + " has a line break or other control character at byte " +
                                              std::to_string(at) + "; an ad is shown on one line after its label");
  }
  if (const auto at = markup_at(text); at != std::string_view::npos) {
    return refuse(errc::invalid_argument,
                  std::string(what) + " has markup or a web address at byte " + std::to_string(at) +
                      " (no [ ] < > ` @ :// or www.); an ad is plain words, and its one link is its url");
  }
  return {};
}

expected<void, error> validate_texts(const create_campaign& c, const campaign_options& o) {
  if (auto ok = check_text("campaign id", c.campaign_id, o.id_length_max); !ok) return ok;
  if (auto ok = check_text("advertiser", c.advertiser, o.id_length_max); !ok) return ok;
  if (auto ok = check_shown_text("title", c.title, o.title_length_max); !ok) return ok;
  if (auto ok = check_shown_text("ad text", c.text, o.text_length_max); !ok) return ok;
  if (auto ok = check_text("url", c.url, o.url_length_max); !ok) return ok;
  if (!c.url.starts_with("https://") && !c.url.starts_with("http://"))
    return refuse(errc::invalid_argument, "url " + quoted(c.url) + " must start with https:// or http://");
  // The click's redirect sends it as the Location header: a space or control character would
  // mangle it (a NUL makes browsers refuse the answer), and a URL without a host goes nowhere.
  const auto bad = std::find_if(c.url.begin(), c.url.end(), [](char ch) {
    const auto byte = static_cast<unsigned char>(ch);
    return byte <= 0x20 || byte == 0x7f;
  });
  if (bad != c.url.end())
    return refuse(errc::invalid_argument, "url has a space or control character at byte " +
                                              std::to_string(bad - c.url.begin()) + "; percent-encode it");
  // The host: what comes before the path, query or fragment, without user info or port.
  std::string_view host = std::string_view(c.url).substr(c.url.starts_with("https://") ? 8 : 7);
  host = host.substr(0, host.find_first_of("/?#"));
  if (const auto at = host.rfind('@'); at != std::string_view::npos) host.remove_prefix(at + 1);
  host = host.substr(0, host.starts_with('[') ? host.find(']') + 1 : host.rfind(':'));
  if (host.empty() || host == "[]")
    return refuse(errc::invalid_argument, "url " + quoted(c.url) + " names no host");
  return {};
}

expected<void, error> validate_money(const create_campaign& c, const campaign_options& o) {
  if (auto ok = check_range("cpm_bid_micros", c.cpm_bid_micros, 1'000, o.cpm_bid_micros_max); !ok) return ok;
  const std::int64_t one_impression = impression_price_micros(c.cpm_bid_micros);
  if (auto ok = check_range("budget_micros", c.budget_micros, one_impression, o.budget_micros_max); !ok) return ok;
  if (auto ok = check_range("daily_budget_micros", c.daily_budget_micros, one_impression, c.budget_micros); !ok)
    return ok;
  return check_range("frequency_cap_per_day", c.frequency_cap_per_day, 1, o.frequency_cap_per_day_max);
}

decision on(const campaign_state& s, const create_campaign& c, std::int64_t now_us, const campaign_options& o) {
  if (auto ok = validate_texts(c, o); !ok) return unexpected{ok.error()};
  if (auto ok = validate_money(c, o); !ok) return unexpected{ok.error()};
  auto keywords = normalise_words("keywords", c.keywords, o.keywords_max, o.word_length_max);
  if (!keywords) return unexpected{keywords.error()};
  auto categories = normalise_words("categories", c.categories, o.categories_max, o.word_length_max);
  if (!categories) return unexpected{categories.error()};
  if (keywords->empty() && categories->empty())
    return refuse(errc::invalid_argument, "a campaign needs at least one keyword or category, or no prompt matches it");
  events::campaign_created created{c.campaign_id,  c.advertiser,       c.title,         c.text,
                                   c.url,          std::move(*keywords), std::move(*categories),
                                   c.cpm_bid_micros, c.budget_micros,  c.daily_budget_micros,
                                   c.frequency_cap_per_day, now_us};
  if (!s.created) return events_list{std::move(created)};
  const bool same = s.campaign_id == created.campaign_id && s.advertiser == created.advertiser &&
                    s.title == created.title && s.text == created.text && s.url == created.url &&
                    s.keywords == created.keywords && s.categories == created.categories &&
                    s.cpm_bid_micros == created.cpm_bid_micros && s.budget_micros == created.budget_micros &&
                    s.daily_budget_micros == created.daily_budget_micros &&
                    s.frequency_cap_per_day == created.frequency_cap_per_day;
  if (same) return events_list{};
  return refuse(errc::already_exists, "campaign " + quoted(s.campaign_id) + " already exists with other settings");
}

decision on(const campaign_state& s, const fund_campaign& c, std::int64_t now_us, const campaign_options&) {
  if (c.amount_micros <= 0)
    return refuse(errc::invalid_argument, "funding must be positive, not " + micros(c.amount_micros));
  if (c.amount_micros > s.budget_micros - s.funded_micros)
    return refuse(errc::limit_exceeded, "funding " + micros(c.amount_micros) + " would take campaign " +
                                            quoted(s.campaign_id) + " from " + micros(s.funded_micros) +
                                            " funded above its budget of " + micros(s.budget_micros));
  return events_list{events::campaign_funded{s.campaign_id, c.amount_micros, now_us}};
}

decision on(const campaign_state& s, const pause_campaign& c, std::int64_t now_us, const campaign_options& o) {
  if (auto ok = check_text("pause reason", c.reason, o.text_length_max, true); !ok) return unexpected{ok.error()};
  if (s.paused) return events_list{};
  return events_list{events::campaign_paused{s.campaign_id, c.reason, now_us}};
}

decision on(const campaign_state& s, const resume_campaign&, std::int64_t now_us, const campaign_options&) {
  if (!s.paused) return events_list{};
  return events_list{events::campaign_resumed{s.campaign_id, now_us}};
}

/// true when `c` names a new reservation, false when it repeats the one that exists (no events),
/// a refusal when its id is taken by another reservation, an impression or a release.
expected<bool, error> reservation_is_new(const campaign_state& s, const reserve_ad& c) {
  if (auto it = s.reservations.find(c.reservation_id); it != s.reservations.end()) {
    const auto& r = it->second;
    if (r.job_id == c.job_id && r.user_id == c.user_id && r.price_micros == c.price_micros &&
        r.expires_at_us == c.expires_at_us)
      return false;
    return refuse(errc::already_exists, "reservation " + quoted(c.reservation_id) + " already holds another ad");
  }
  if (s.impressions.contains(c.reservation_id))
    return refuse(errc::invalid_state, "reservation " + quoted(c.reservation_id) + " was already served");
  if (s.released.contains(c.reservation_id))
    return refuse(errc::invalid_state, "reservation " + quoted(c.reservation_id) + " was already released");
  return true;
}

decision on(const campaign_state& s, const reserve_ad& c, std::int64_t now_us, const campaign_options& o) {
  for (auto [what, id] : {std::pair<std::string_view, std::string_view>{"reservation id", c.reservation_id},
                          {"job id", c.job_id},
                          {"user id", c.user_id}})
    if (auto ok = check_text(what, id, o.id_length_max); !ok) return unexpected{ok.error()};
  auto is_new = reservation_is_new(s, c);
  if (!is_new) return unexpected{is_new.error()};
  if (!*is_new) return events_list{};
  if (auto ok = check_range("reserved price_micros", c.price_micros, 1, bid_price(s)); !ok)
    return unexpected{ok.error()};
  const std::int64_t ttl_max = std::min(o.reservation_ttl_us_max, release_memory_us);
  if (c.expires_at_us <= now_us || c.expires_at_us - now_us > ttl_max)
    return refuse(errc::invalid_argument, "reservation expiry " + std::to_string(c.expires_at_us) +
                                              " us must lie after now (" + std::to_string(now_us) +
                                              " us) by at most " + std::to_string(ttl_max) + " us");
  if (auto ok = can_reserve(s, c.user_id, c.price_micros, now_us, o); !ok) return unexpected{ok.error()};
  return events_list{events::ad_reserved{c.reservation_id, s.campaign_id, c.job_id, c.user_id, c.price_micros,
                                         now_us, c.expires_at_us}};
}

decision on(const campaign_state& s, const record_impression& c, std::int64_t now_us, const campaign_options&) {
  if (auto it = s.impressions.find(c.impression_id); it != s.impressions.end()) {
    if (it->second.price_micros == c.price_micros) return events_list{};
    return refuse(errc::already_exists, "impression " + quoted(c.impression_id) + " was recorded at " +
                                            micros(it->second.price_micros) + ", not " + micros(c.price_micros));
  }
  if (s.released.contains(c.impression_id))
    return refuse(errc::invalid_state, "reservation " + quoted(c.impression_id) + " was released; it cannot be served");
  auto it = s.reservations.find(c.impression_id);
  if (it == s.reservations.end())
    return refuse(errc::not_found, "campaign " + quoted(s.campaign_id) + " holds no reservation " +
                                       quoted(c.impression_id) + "; reserve before serving");
  const auto& r = it->second;
  if (auto ok = check_range("impression price_micros", c.price_micros, 1, r.price_micros); !ok)
    return unexpected{ok.error()};
  if (now_us >= r.expires_at_us)
    return refuse(errc::invalid_state, "reservation " + quoted(c.impression_id) + " expired at " +
                                           std::to_string(r.expires_at_us) + " us (now " + std::to_string(now_us) +
                                           " us)");
  events_list out{events::impression_recorded{c.impression_id, s.campaign_id, r.job_id, r.user_id, c.price_micros,
                                              now_us}};
  const std::int64_t spent = s.spent_micros + c.price_micros;
  if (!s.exhausted && spendable_micros(s) - spent < bid_price(s))
    out.push_back(events::campaign_exhausted{s.campaign_id, spent, now_us});
  return out;
}

decision on(const campaign_state& s, const release_ad_reservation& c, std::int64_t now_us,
            const campaign_options& o) {
  if (auto ok = check_text("release reason", c.reason, o.text_length_max, true); !ok) return unexpected{ok.error()};
  if (s.released.contains(c.reservation_id)) return events_list{};
  if (s.impressions.contains(c.reservation_id))
    return refuse(errc::invalid_state, "reservation " + quoted(c.reservation_id) + " was served; it is spent");
  if (!s.reservations.contains(c.reservation_id))
    return refuse(errc::not_found, "campaign " + quoted(s.campaign_id) + " holds no reservation " +
                                       quoted(c.reservation_id));
  return events_list{events::ad_reservation_released{c.reservation_id, s.campaign_id, c.reason, now_us}};
}

decision on(const campaign_state& s, const void_impression& c, std::int64_t now_us, const campaign_options& o) {
  if (auto ok = check_text("void reason", c.reason, o.text_length_max, true); !ok) return unexpected{ok.error()};
  if (s.released.contains(c.impression_id)) return events_list{};  // voided (or never served) before
  if (s.reservations.contains(c.impression_id))
    return on(s, release_ad_reservation{c.impression_id, c.reason}, now_us, o);
  auto it = s.impressions.find(c.impression_id);
  if (it == s.impressions.end())
    return refuse(errc::not_found, "campaign " + quoted(s.campaign_id) + " recorded no impression " +
                                       quoted(c.impression_id) + " in the last 7 days");
  if (it->second.clicked)
    return refuse(errc::invalid_state, "impression " + quoted(c.impression_id) + " was clicked: it reached its user");
  return events_list{events::impression_voided{c.impression_id, s.campaign_id, c.reason, now_us}};
}

decision on(const campaign_state& s, const expire_ad_reservations&, std::int64_t now_us, const campaign_options&) {
  events_list out;
  for (const auto& [id, r] : s.reservations)
    if (r.expires_at_us <= now_us)
      out.push_back(events::ad_reservation_released{
          id, s.campaign_id, "expired at " + std::to_string(r.expires_at_us) + " us, not served", now_us});
  return out;
}

decision on(const campaign_state& s, const click_ad& c, std::int64_t now_us, const campaign_options&) {
  auto it = s.impressions.find(c.impression_id);
  if (it == s.impressions.end())
    return refuse(errc::not_found, "campaign " + quoted(s.campaign_id) + " recorded no impression " +
                                       quoted(c.impression_id) + " in the last 7 days");
  if (it->second.clicked) return events_list{};
  if (now_us - it->second.recorded_at_us >= click_window_us)
    return refuse(errc::invalid_state, "impression " + quoted(c.impression_id) + " was recorded at " +
                                           std::to_string(it->second.recorded_at_us) +
                                           " us; clicks count only within 7 days");
  return events_list{events::ad_clicked{c.impression_id, s.campaign_id, now_us}};
}

/// Moves the state's clock to `at_us`: releases past their memory are forgotten (at most once per
/// release_memory_us), and a new UTC day restarts the daily counters and forgets impressions older
/// than the click window (decide would refuse their clicks anyway).
void roll_clock(campaign_state& s, std::int64_t at_us) {
  if (at_us - s.releases_pruned_at_us >= release_memory_us) {
    s.releases_pruned_at_us = at_us;
    std::erase_if(s.released, [at_us](const auto& entry) { return entry.second <= at_us; });
  }
  const std::int64_t day = utc_day(at_us);
  if (day <= s.day) return;
  s.day = day;
  s.spent_today_micros = 0;
  s.impressions_today.clear();
  const std::int64_t horizon = at_us - click_window_us;
  std::erase_if(s.impressions, [horizon](const auto& entry) { return entry.second.recorded_at_us <= horizon; });
}

void apply_created(campaign_state& s, const events::campaign_created& e) {
  if (s.created) return;
  s.created = true;
  s.campaign_id = e.campaign_id;
  s.advertiser = e.advertiser;
  s.title = e.title;
  s.text = e.text;
  s.url = e.url;
  s.keywords = e.keywords;
  s.categories = e.categories;
  s.cpm_bid_micros = e.cpm_bid_micros;
  s.budget_micros = e.budget_micros;
  s.daily_budget_micros = e.daily_budget_micros;
  s.frequency_cap_per_day = e.frequency_cap_per_day;
  s.created_at_us = e.created_at_us;
  s.day = utc_day(e.created_at_us);
}

/// The events after creation. One that cannot apply (an unknown reservation, a click on an unknown
/// impression) leaves the state as it is; amounts are applied as they stand, so that `check` sees
/// a log that broke the money rules.
struct ads {
  campaign_state& s;

  void operator()(const events::campaign_funded& e) {
    s.funded_micros += e.amount_micros;
    if (s.exhausted && spendable_micros(s) - s.spent_micros >= bid_price(s)) s.exhausted = false;
  }
  void operator()(const events::campaign_paused& e) {
    s.paused = true;
    s.pause_reason = e.reason;
  }
  void operator()(const events::campaign_resumed&) {
    s.paused = false;
    s.pause_reason.clear();
  }
  void operator()(const events::campaign_exhausted&) { s.exhausted = true; }
  void operator()(const events::ad_reserved& e) {
    if (s.reservations.contains(e.reservation_id) || s.impressions.contains(e.reservation_id)) return;
    roll_clock(s, e.reserved_at_us);
    s.reservations.emplace(e.reservation_id, ad_reservation_state{e.job_id, e.user_id, e.price_micros,
                                                                  e.reserved_at_us, e.expires_at_us});
    s.reserved_micros += e.price_micros;
  }
  void operator()(const events::impression_recorded& e) {
    auto it = s.reservations.find(e.impression_id);
    if (it == s.reservations.end()) return;
    roll_clock(s, e.recorded_at_us);
    s.reserved_micros -= it->second.price_micros;
    s.reservations.erase(it);
    s.spent_micros += e.price_micros;
    if (utc_day(e.recorded_at_us) == s.day) {
      s.spent_today_micros += e.price_micros;
      s.impressions_today[e.user_id] += 1;
    }
    s.impressions.emplace(e.impression_id, impression_state{e.job_id, e.user_id, e.price_micros, e.recorded_at_us});
    s.impressions_total += 1;
  }
  void operator()(const events::ad_reservation_released& e) {
    auto it = s.reservations.find(e.reservation_id);
    if (it == s.reservations.end()) return;
    roll_clock(s, e.released_at_us);
    s.reserved_micros -= it->second.price_micros;
    s.released.emplace(e.reservation_id, std::max(it->second.expires_at_us, e.released_at_us) + release_memory_us);
    s.reservations.erase(it);
  }
  void operator()(const events::impression_voided& e) {
    if (auto found = s.impressions.find(e.impression_id); found == s.impressions.end() || found->second.clicked) return;
    roll_clock(s, e.voided_at_us);
    auto it = s.impressions.find(e.impression_id);
    if (it == s.impressions.end()) return;  // older than the click window: forgotten by the new day
    const impression_state& impression = it->second;
    s.spent_micros -= impression.price_micros;
    s.impressions_total -= 1;
    if (utc_day(impression.recorded_at_us) == s.day) {
      s.spent_today_micros -= impression.price_micros;
      if (auto count = s.impressions_today.find(impression.user_id); count != s.impressions_today.end()) {
        if (--count->second == 0) s.impressions_today.erase(count);
      }
    }
    s.impressions.erase(it);
    // Served no more: its reservation is gone, so it is never recorded again.
    s.released.emplace(e.impression_id, e.voided_at_us + release_memory_us);
    if (s.exhausted && spendable_micros(s) - s.spent_micros >= bid_price(s)) s.exhausted = false;
  }
  void operator()(const events::ad_clicked& e) {
    auto it = s.impressions.find(e.impression_id);
    if (it == s.impressions.end() || it->second.clicked) return;
    it->second.clicked = true;
    s.clicks_total += 1;
  }
  void operator()(const auto&) {}  // events of other aggregates
};

template <class Event>
concept campaign_event = requires(const Event& e) {
  { e.campaign_id } -> std::convertible_to<std::string>;
};

}  // namespace

campaign_state campaign::evolve(state s, const events::event& e) {
  if (const auto* created = std::get_if<events::campaign_created>(&e)) {
    apply_created(s, *created);
    return s;
  }
  std::visit(
      [&s](const auto& event) {
        using event_type = std::decay_t<decltype(event)>;
        if constexpr (campaign_event<event_type>) {
          if (s.created && event.campaign_id == s.campaign_id) ads{s}(event);
        }
      },
      e);
  return s;
}

decision campaign::decide(const state& s, const command& c, std::int64_t now_us) {
  return decide(s, c, now_us, campaign_options{});
}

decision campaign::decide(const state& s, const command& c, std::int64_t now_us, const campaign_options& options) {
  if (!s.created && !std::holds_alternative<create_campaign>(c))
    return refuse(errc::not_found, "no campaign has been created on this stream; create it first");
  return std::visit([&](const auto& command) { return on(s, command, now_us, options); }, c);
}

std::int64_t spendable_micros(const campaign_state& s) noexcept {
  return std::min(s.funded_micros, s.budget_micros);
}

std::int64_t available_micros(const campaign_state& s) noexcept {
  return spendable_micros(s) - s.spent_micros - s.reserved_micros;
}

std::int64_t paced_allowance_micros(const campaign_state& s, std::int64_t now_us, const campaign_options& options) {
  const std::int64_t daily = s.daily_budget_micros;
  const std::int64_t elapsed_seconds = (now_us - utc_day(now_us) * us_per_day) / 1'000'000;
  const std::int64_t burst = std::max(scale(daily, options.pacing_burst_permille, 1'000), bid_price(s));
  return std::min(daily, scale(daily, elapsed_seconds, seconds_per_day) + burst);
}

std::int64_t paced_use_micros(const campaign_state& s, std::int64_t now_us) {
  // An instant before the state's day (a clock that stepped back) still counts that day's spend.
  const std::int64_t spent_today = utc_day(now_us) <= s.day ? s.spent_today_micros : 0;
  return spent_today + s.reserved_micros;
}

std::uint32_t impressions_for_user_today(const campaign_state& s, std::string_view user_id, std::int64_t now_us) {
  std::uint32_t count = 0;
  if (utc_day(now_us) <= s.day)
    if (auto it = s.impressions_today.find(std::string(user_id)); it != s.impressions_today.end()) count = it->second;
  for (const auto& [id, r] : s.reservations)
    if (r.user_id == user_id) ++count;
  return count;
}

expected<void, error> can_reserve(const campaign_state& s, std::string_view user_id, std::int64_t price_micros,
                                  std::int64_t now_us, const campaign_options& options) {
  const std::string campaign = "campaign " + quoted(s.campaign_id);
  if (!s.created) return refuse(errc::not_found, "no such campaign");
  if (s.paused) return refuse(errc::invalid_state, campaign + " is paused (" + s.pause_reason + ")");
  if (s.exhausted)
    return refuse(errc::invalid_state, campaign + " is exhausted: spent " + micros(s.spent_micros) + " of " +
                                           micros(spendable_micros(s)));
  if (price_micros > available_micros(s))
    return refuse(errc::insufficient_funds,
                  campaign + " has " + micros(available_micros(s)) + " available (spendable " +
                      micros(spendable_micros(s)) + " - spent " + micros(s.spent_micros) + " - reserved " +
                      micros(s.reserved_micros) + "); the ad costs " + micros(price_micros));
  const std::int64_t allowed = paced_allowance_micros(s, now_us, options);
  if (paced_use_micros(s, now_us) + price_micros > allowed)
    return refuse(errc::limit_exceeded, campaign + " is ahead of its daily pacing: " +
                                            micros(paced_use_micros(s, now_us)) + " spent today or reserved + " +
                                            micros(price_micros) + " would exceed the " + micros(allowed) +
                                            " allowed by now");
  if (s.reservations.size() >= options.reservations_max)
    return refuse(errc::limit_exceeded, campaign + " holds " + std::to_string(s.reservations.size()) +
                                            " reservations, the most allowed");
  const std::uint32_t seen = impressions_for_user_today(s, user_id, now_us);
  if (seen >= s.frequency_cap_per_day)
    return refuse(errc::quota_exceeded, campaign + " was shown " + std::to_string(seen) + " times to user " +
                                            quoted(user_id) + " today, its frequency cap of " +
                                            std::to_string(s.frequency_cap_per_day));
  return {};
}

namespace {

void check_money(const campaign_state& s, std::vector<std::string>& broken) {
  const std::string campaign = "campaign " + quoted(s.campaign_id) + ": ";
  if (s.funded_micros < 0 || s.spent_micros < 0 || s.reserved_micros < 0)
    broken.push_back(campaign + "negative funded " + micros(s.funded_micros) + ", spent " + micros(s.spent_micros) +
                     " or reserved " + micros(s.reserved_micros));
  if (s.funded_micros > s.budget_micros)
    broken.push_back(campaign + "funded " + micros(s.funded_micros) + " above its budget " + micros(s.budget_micros));
  if (s.spent_micros + s.reserved_micros > spendable_micros(s))
    broken.push_back(campaign + "spent " + micros(s.spent_micros) + " + reserved " + micros(s.reserved_micros) +
                     " exceed min(funded, budget) = " + micros(spendable_micros(s)));
  std::int64_t held = 0;
  for (const auto& [id, r] : s.reservations) {
    held += r.price_micros;
    if (r.price_micros <= 0 || r.price_micros > bid_price(s))
      broken.push_back(campaign + "reservation " + quoted(id) + " holds " + micros(r.price_micros) +
                       ", outside 1 .. the bid's " + micros(bid_price(s)));
  }
  if (held != s.reserved_micros)
    broken.push_back(campaign + "reserved " + micros(s.reserved_micros) + " but its reservations hold " + micros(held));
  if (s.spent_today_micros < 0 || s.spent_today_micros > s.spent_micros)
    broken.push_back(campaign + "spent today " + micros(s.spent_today_micros) + " outside 0 .. spent " +
                     micros(s.spent_micros));
  if (s.exhausted && spendable_micros(s) - s.spent_micros >= bid_price(s))
    broken.push_back(campaign + "exhausted, yet " + micros(spendable_micros(s) - s.spent_micros) +
                     " left pay for an impression at " + micros(bid_price(s)));
}

void check_ads(const campaign_state& s, std::vector<std::string>& broken) {
  const std::string campaign = "campaign " + quoted(s.campaign_id) + ": ";
  std::uint64_t today = 0;
  for (const auto& [user_id, count] : s.impressions_today) today += count;
  std::uint64_t clicked = 0;
  for (const auto& [id, impression] : s.impressions) clicked += impression.clicked ? 1 : 0;
  if (s.clicks_total > s.impressions_total || clicked > s.clicks_total)
    broken.push_back(campaign + std::to_string(s.clicks_total) + " clicks (" + std::to_string(clicked) +
                     " remembered) for " + std::to_string(s.impressions_total) + " impressions");
  if (today > s.impressions_total || s.impressions.size() > s.impressions_total)
    broken.push_back(campaign + "more impressions remembered (" + std::to_string(s.impressions.size()) +
                     ") or counted today (" + std::to_string(today) + ") than recorded (" +
                     std::to_string(s.impressions_total) + ")");
  for (const auto& [id, r] : s.reservations)
    if (s.impressions.contains(id) || s.released.contains(id))
      broken.push_back(campaign + "reservation " + quoted(id) + " is outstanding and also served or released");
}

}  // namespace

std::vector<std::string> check(const campaign_state& s) {
  std::vector<std::string> broken;
  if (!s.created) {
    if (!(s == campaign_state{})) broken.push_back("a campaign that was never created has state");
    return broken;
  }
  if (s.daily_budget_micros > s.budget_micros || s.cpm_bid_micros < 1'000)
    broken.push_back("campaign " + quoted(s.campaign_id) + ": daily budget " + micros(s.daily_budget_micros) +
                     " above budget " + micros(s.budget_micros) + " or CPM bid " + micros(s.cpm_bid_micros) +
                     " below 1000");
  check_money(s, broken);
  check_ads(s, broken);
  return broken;
}

}  // namespace gpustream::domain
