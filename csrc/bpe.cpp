#include "bpe.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <unordered_map>

#include "unicode_tables.h"

namespace fastlm {

namespace {

using unicode_tables::cp_class;
using unicode_tables::kLetter;
using unicode_tables::kNumber;
using unicode_tables::kOther;
using unicode_tables::kSpace;

constexpr uint64_t kEmptyKey = ~uint64_t{0};
constexpr uint64_t kNoMerge = ~uint64_t{0};
constexpr uint32_t kDead = ~uint32_t{0};
constexpr size_t kMaxCachedLen = 128;         // longer pieces are not cached
constexpr size_t kCacheSlots = size_t{1} << 17;  // power of two
constexpr size_t kCacheMaxEntries = kCacheSlots / 2;
constexpr size_t kLinearMergeMax = 48;  // words up to this many bytes use the O(n^2) scan

std::atomic<uint64_t> g_serial{1};

// ---- hashing ---------------------------------------------------------------------------------------

inline uint64_t load64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}
inline uint32_t load32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

inline uint64_t mix(uint64_t h) {
  h ^= h >> 32;
  h *= 0xd6e8feb86659fd93ull;
  h ^= h >> 32;
  return h;
}

inline uint64_t hash_bytes(const uint8_t* p, size_t n) {
  uint64_t h = 0x9E3779B97F4A7C15ull ^ (uint64_t(n) * 0xC2B2AE3D27D4EB4Full);
  while (n > 8) {
    h = (h ^ load64(p)) * 0xff51afd7ed558ccdull;
    h ^= h >> 29;
    p += 8;
    n -= 8;
  }
  uint64_t w;
  if (n >= 4) {
    w = (uint64_t(load32(p)) << 32) | load32(p + n - 4);
  } else if (n > 0) {
    w = (uint64_t(p[0]) << 16) | (uint64_t(p[n >> 1]) << 8) | p[n - 1];
  } else {
    w = 0;
  }
  h = (h ^ w) * 0xc4ceb9fe1a85ec53ull;
  return mix(h);
}

// ---- GPT-2 byte <-> unicode alphabet -------------------------------------------------------------

struct ByteAlphabet {
  uint32_t byte_to_cp[256];
  int16_t cp_to_byte[512];  // all alphabet code points are < 512
  ByteAlphabet() {
    std::fill(std::begin(cp_to_byte), std::end(cp_to_byte), int16_t(-1));
    bool printable[256] = {};
    for (int b = '!'; b <= '~'; ++b) printable[b] = true;
    for (int b = 0xA1; b <= 0xAC; ++b) printable[b] = true;
    for (int b = 0xAE; b <= 0xFF; ++b) printable[b] = true;
    uint32_t extra = 0;
    for (int b = 0; b < 256; ++b) {
      byte_to_cp[b] = printable[b] ? uint32_t(b) : 256 + extra++;
      cp_to_byte[byte_to_cp[b]] = int16_t(b);
    }
  }
};
const ByteAlphabet& alphabet() {
  static const ByteAlphabet a;
  return a;
}

// Decodes a byte-level vocab string into raw bytes. False if it has a char outside the alphabet
// (such a token can never be produced by BPE on byte-level text) or is not valid UTF-8.
bool byte_level_decode(const std::string& s, std::string& out) {
  const auto& A = alphabet();
  out.clear();
  const auto* p = reinterpret_cast<const uint8_t*>(s.data());
  size_t n = s.size(), i = 0;
  while (i < n) {
    uint32_t cp;
    uint8_t b = p[i];
    if (b < 0x80) {
      cp = b;
      i += 1;
    } else if ((b & 0xE0) == 0xC0 && i + 1 < n) {
      cp = ((b & 0x1Fu) << 6) | (p[i + 1] & 0x3Fu);
      i += 2;
    } else {
      return false;  // alphabet code points are all < 0x800
    }
    if (cp >= 512 || A.cp_to_byte[cp] < 0) return false;
    out.push_back(char(A.cp_to_byte[cp]));
  }
  return true;
}

// ---- character classes ---------------------------------------------------------------------------

struct AsciiClasses {
  uint8_t cls[128];
  AsciiClasses() {
    for (uint32_t c = 0; c < 128; ++c) cls[c] = cp_class(c);
  }
};
const AsciiClasses kAscii;

// Class of the (non-ASCII lead byte) code point at p; sets len. Malformed or truncated
// sequences count as one "other" byte (the caller promises valid UTF-8; this only avoids overreads).
inline uint8_t class_nonascii(const uint8_t* p, const uint8_t* end, int& len) {
  uint8_t b = p[0];
  size_t avail = size_t(end - p);
  uint32_t cp;
  if (b >= 0xF0) {
    if (avail < 4) { len = 1; return kOther; }
    cp = ((b & 0x07u) << 18) | ((p[1] & 0x3Fu) << 12) | ((p[2] & 0x3Fu) << 6) | (p[3] & 0x3Fu);
    len = 4;
    if (cp >= 0x110000) return kOther;
  } else if (b >= 0xE0) {
    if (avail < 3) { len = 1; return kOther; }
    cp = ((b & 0x0Fu) << 12) | ((p[1] & 0x3Fu) << 6) | (p[2] & 0x3Fu);
    len = 3;
  } else if (b >= 0xC0) {
    if (avail < 2) { len = 1; return kOther; }
    cp = ((b & 0x1Fu) << 6) | (p[1] & 0x3Fu);
    len = 2;
  } else {
    len = 1;
    return kOther;
  }
  return cp_class(cp);
}

inline uint8_t class_at(const uint8_t* p, const uint8_t* end, int& len) {
  if (*p < 0x80) {
    len = 1;
    return kAscii.cls[*p];
  }
  return class_nonascii(p, end, len);
}

// End of the maximal run of code points of class k starting at p (p < end).
inline const uint8_t* run_end(const uint8_t* p, const uint8_t* end, uint8_t k) {
  while (p < end) {
    uint8_t b = *p;
    if (b < 0x80) {
      if (kAscii.cls[b] != k) break;
      ++p;
    } else {
      int l;
      if (class_nonascii(p, end, l) != k) break;
      p += l;
    }
  }
  return p;
}

// GPT-2 pre-tokenizer: calls emit(begin, end) for each piece of [s, end), in order.
//   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
template <class Emit>
inline void gpt2_pretokenize(const uint8_t* s, const uint8_t* end, Emit&& emit) {
  const uint8_t* i = s;
  while (i < end) {
    const uint8_t c0 = *i;
    if (c0 == '\'' && i + 1 < end) {
      const uint8_t c1 = i[1];
      if (c1 == 's' || c1 == 't' || c1 == 'm' || c1 == 'd') {
        emit(i, i + 2);
        i += 2;
        continue;
      }
      if (i + 2 < end) {
        const uint8_t c2 = i[2];
        if ((c1 == 'r' && c2 == 'e') || (c1 == 'v' && c2 == 'e') || (c1 == 'l' && c2 == 'l')) {
          emit(i, i + 3);
          i += 3;
          continue;
        }
      }
    }
    int len;
    uint8_t k;
    const uint8_t* j = i;
    if (c0 == ' ' && i + 1 < end) {
      k = class_at(i + 1, end, len);
      if (k != kSpace) {
        j = i + 1;  // ' ?X+' with the optional space taken
      } else {
        len = 1;  // ' ' followed by whitespace: part of a whitespace run
      }
    } else {
      k = class_at(i, end, len);
    }
    if (k != kSpace) {
      const uint8_t* e = run_end(j + len, end, k);
      emit(i, e);
      i = e;
      continue;
    }
    // Whitespace run [i, e); `last` is the start of its last code point.
    const uint8_t* last = i;
    const uint8_t* e = i + len;
    while (e < end) {
      int l;
      if (class_at(e, end, l) != kSpace) break;
      last = e;
      e += l;
    }
    if (e == end || last == i) {
      // \s+(?!\S) takes the whole run at end of text; a single char before non-space is \s+.
      emit(i, e);
      i = e;
    } else {
      // \s+(?!\S) backtracks one code point, which then starts the next piece.
      emit(i, last);
      i = last;
    }
  }
}

}  // namespace

// ---- Cache -----------------------------------------------------------------------------------------

ByteLevelBPE::Cache::Cache() = default;
ByteLevelBPE::Cache::~Cache() = default;

void ByteLevelBPE::Cache::clear() {
  if (count_ != 0 || slots_.empty()) {
    slots_.assign(kCacheSlots, Slot{0, 0, 0, 0});
  }
  keys_.clear();
  ids_.clear();
  count_ = 0;
}

std::unique_ptr<ByteLevelBPE::Cache> ByteLevelBPE::make_cache() const {
  auto c = std::make_unique<Cache>();
  c->clear();
  c->owner_ = serial_;
  return c;
}

// ---- construction ----------------------------------------------------------------------------------

ByteLevelBPE::~ByteLevelBPE() = default;

void ByteLevelBPE::vocab_insert(const std::string& bytes, uint32_t id) {
  const auto* p = reinterpret_cast<const uint8_t*>(bytes.data());
  uint64_t h = hash_bytes(p, bytes.size());
  size_t i = size_t(h) & vocab_mask_;
  while (vocab_slots_[i].len != 0) i = (i + 1) & vocab_mask_;
  VocabSlot& s = vocab_slots_[i];
  s.tag = uint32_t(h >> 32);
  s.len = uint32_t(bytes.size());
  s.off = uint32_t(vocab_keys_.size());
  s.value = id << 1;
  vocab_keys_.insert(vocab_keys_.end(), p, p + bytes.size());
}

inline const ByteLevelBPE::VocabSlot* ByteLevelBPE::vocab_find(const uint8_t* p, size_t n,
                                                               uint64_t h) const {
  const uint32_t tag = uint32_t(h >> 32);
  size_t i = size_t(h) & vocab_mask_;
  const VocabSlot* slots = vocab_slots_.data();
  const uint8_t* keys = vocab_keys_.data();
  while (true) {
    const VocabSlot& s = slots[i];
    if (s.len == 0) return nullptr;
    if (s.tag == tag && s.len == n && std::memcmp(keys + s.off, p, n) == 0) return &s;
    i = (i + 1) & vocab_mask_;
  }
}

inline uint64_t ByteLevelBPE::merge_find(uint32_t a, uint32_t b) const {
  const uint64_t key = (uint64_t(a) << 32) | b;
  size_t i = size_t((key * 0x9E3779B97F4A7C15ull) >> merge_shift_);
  const MergeSlot* slots = merge_slots_.data();
  while (true) {
    const MergeSlot& s = slots[i];
    if (s.key == key) return s.value;
    if (s.key == kEmptyKey) return kNoMerge;
    i = (i + 1) & merge_mask_;
  }
}

void ByteLevelBPE::merge_insert(uint32_t a, uint32_t b, uint64_t value) {
  const uint64_t key = (uint64_t(a) << 32) | b;
  size_t i = size_t((key * 0x9E3779B97F4A7C15ull) >> merge_shift_);
  while (merge_slots_[i].key != kEmptyKey && merge_slots_[i].key != key) i = (i + 1) & merge_mask_;
  merge_slots_[i].key = key;
  merge_slots_[i].value = value;  // a repeated merge keeps its LAST rank, as tokenizers does
}

static std::string show(const std::string& s) {
  std::string r = "'";
  r += s;
  r += "'";
  return r;
}

ByteLevelBPE::ByteLevelBPE(const std::vector<std::pair<std::string, uint32_t>>& vocab,
                           const std::vector<std::pair<std::string, std::string>>& merges,
                           const std::vector<AddedToken>& added_tokens, bool ignore_merges)
    : serial_(g_serial.fetch_add(1)), ignore_merges_(ignore_merges) {
  if (vocab.empty()) throw std::invalid_argument("ByteLevelBPE: empty vocab");
  // token string -> id, and id uniqueness
  std::unordered_map<std::string, uint32_t> str_to_id;
  std::unordered_map<uint32_t, const std::string*> id_to_str;
  str_to_id.reserve(vocab.size() * 2);
  id_to_str.reserve(vocab.size() * 2);
  for (const auto& [tok, id] : vocab) {
    if (id == kDead) throw std::invalid_argument("ByteLevelBPE: vocab id 4294967295 is reserved");
    if (!str_to_id.emplace(tok, id).second)
      throw std::invalid_argument("ByteLevelBPE: duplicate vocab token " + show(tok));
    auto [it, fresh] = id_to_str.emplace(id, &tok);
    if (!fresh)
      throw std::invalid_argument("ByteLevelBPE: duplicate vocab id " + std::to_string(id) +
                                  " (tokens " + show(*it->second) + " and " + show(tok) + ")");
    max_id_ = std::max(max_id_, id);
  }
  vocab_size_ = vocab.size();

  // byte-keyed vocab table (tokens outside the byte-level alphabet are left out: BPE can never
  // produce them)
  std::vector<std::pair<std::string, uint32_t>> decoded;
  decoded.reserve(vocab.size());
  std::unordered_map<uint32_t, bool> decodable;
  decodable.reserve(vocab.size() * 2);
  {
    std::string raw;
    for (const auto& [tok, id] : vocab) {
      bool ok = byte_level_decode(tok, raw) && !raw.empty();
      decodable[id] = ok;
      if (ok) decoded.emplace_back(raw, id);
    }
  }
  size_t cap = 16;
  while (cap < decoded.size() * 2) cap <<= 1;
  vocab_slots_.assign(cap, VocabSlot{0, 0, 0, 0});
  vocab_mask_ = cap - 1;
  for (const auto& [raw, id] : decoded) vocab_insert(raw, id);

  const auto& A = alphabet();
  for (int b = 0; b < 256; ++b) {
    std::string ch;
    uint32_t cp = A.byte_to_cp[b];
    if (cp < 0x80) {
      ch.push_back(char(cp));
    } else {
      ch.push_back(char(0xC0 | (cp >> 6)));
      ch.push_back(char(0x80 | (cp & 0x3F)));
    }
    auto it = str_to_id.find(ch);
    if (it == str_to_id.end())
      throw std::invalid_argument("ByteLevelBPE: byte " + std::to_string(b) +
                                  " has no vocab entry (expected token " + show(ch) +
                                  "); a byte-level vocab must contain all 256 byte symbols");
    byte_id_[b] = it->second;
  }

  // merges
  num_merges_ = merges.size();
  if (merges.size() >= (size_t(1) << 32) - 1) throw std::invalid_argument("ByteLevelBPE: too many merges");
  size_t mcap = 16;
  while (mcap < merges.size() * 2) mcap <<= 1;
  merge_slots_.assign(mcap, MergeSlot{kEmptyKey, 0});
  merge_mask_ = mcap - 1;
  merge_shift_ = 64;
  for (size_t c = mcap; c > 1; c >>= 1) --merge_shift_;
  for (size_t r = 0; r < merges.size(); ++r) {
    const auto& [a, b] = merges[r];
    auto ia = str_to_id.find(a);
    auto ib = str_to_id.find(b);
    const std::string where = "ByteLevelBPE: merge #" + std::to_string(r) + " (" + show(a) + ", " +
                              show(b) + ")";
    if (ia == str_to_id.end()) throw std::invalid_argument(where + ": token " + show(a) + " is not in the vocab");
    if (ib == str_to_id.end()) throw std::invalid_argument(where + ": token " + show(b) + " is not in the vocab");
    auto inew = str_to_id.find(a + b);
    if (inew == str_to_id.end())
      throw std::invalid_argument(where + ": merged token " + show(a + b) + " is not in the vocab");
    if (!decodable[ia->second] || !decodable[ib->second]) continue;  // can never apply
    merge_insert(ia->second, ib->second, (uint64_t(r) << 32) | inew->second);
  }

  byte_pair_.resize(65536);
  for (int a = 0; a < 256; ++a)
    for (int b = 0; b < 256; ++b) byte_pair_[(a << 8) | b] = merge_find(byte_id_[a], byte_id_[b]);

  // added tokens
  std::fill(std::begin(added_first_), std::end(added_first_), false);
  {
    std::unordered_map<std::string, uint32_t> seen;
    for (const auto& t : added_tokens) {
      if (t.id == kDead) throw std::invalid_argument("ByteLevelBPE: added token id 4294967295 is reserved");
      max_id_ = std::max(max_id_, t.id);
      if (t.content.empty()) continue;  // tokenizers ignores empty added tokens
      auto [it, fresh] = seen.emplace(t.content, t.id);
      if (!fresh && it->second != t.id)
        throw std::invalid_argument("ByteLevelBPE: added token " + show(t.content) +
                                    " listed twice with different ids");
      if (!fresh) continue;
      if (trie_.empty()) trie_.emplace_back();
      uint32_t node = 0;
      for (unsigned char ch : t.content) {
        uint32_t child = 0;
        for (const auto& [eb, en] : trie_[node].edges)
          if (eb == ch) child = en;
        if (child == 0) {
          child = uint32_t(trie_.size());
          trie_[node].edges.emplace_back(ch, child);
          trie_.emplace_back();
        }
        node = child;
      }
      trie_[node].token = t.id;
      added_first_[uint8_t(t.content[0])] = true;
      ++added_count_;
    }
    int firsts = 0, last = -1;
    for (int b = 0; b < 256; ++b)
      if (added_first_[b]) ++firsts, last = b;
    added_single_first_ = firsts == 1 ? last : -1;
  }

  // Which vocab tokens BPE-encode to themselves? Those are emitted by one hash lookup.
  {
    auto cache = make_cache();
    for (VocabSlot& s : vocab_slots_) {
      if (s.len == 0) continue;
      merge_word(vocab_keys_.data() + s.off, s.len, *cache);
      if (cache->word_.size() == 1 && cache->word_[0] == (s.value >> 1)) s.value |= 1;
    }
  }
}

// ---- BPE merge -------------------------------------------------------------------------------------

void ByteLevelBPE::merge_word(const uint8_t* p, size_t n, Cache& c) const {
  auto& word = c.word_;
  word.resize(n);
  for (size_t i = 0; i < n; ++i) word[i] = byte_id_[p[i]];
  if (n < 2) return;

  if (n <= kLinearMergeMax) {
    // Repeatedly merge the lowest-rank adjacent pair, leftmost on ties. Equivalent to
    // tokenizers' Word::merge_all: its heap pops the lowest (rank, position) live pair, and its
    // stale-entry test (same new_id) only accepts the pair the entry was made for, because
    // distinct vocab strings have distinct ids.
    auto& pr = c.pairs_;
    pr.resize(n);
    for (size_t i = 0; i + 1 < n; ++i) pr[i] = byte_pair_[(size_t(p[i]) << 8) | p[i + 1]];
    size_t m = n;
    while (m > 1) {
      uint64_t best = kNoMerge;
      size_t bi = 0;
      for (size_t i = 0; i + 1 < m; ++i) {
        if (pr[i] < best) {
          best = pr[i];
          bi = i;
        }
      }
      if (best == kNoMerge) break;
      word[bi] = uint32_t(best);
      for (size_t i = bi + 1; i + 1 < m; ++i) word[i] = word[i + 1];
      for (size_t i = bi + 1; i + 2 < m; ++i) pr[i] = pr[i + 1];
      --m;
      if (bi > 0) pr[bi - 1] = merge_find(word[bi - 1], word[bi]);
      if (bi + 1 < m) pr[bi] = merge_find(word[bi], word[bi + 1]);
    }
    word.resize(m);
    return;
  }

  // Priority-queue version of Word::merge_all for long words: O(n log n).
  auto& syms = c.syms_;
  auto& heap = c.heap_;
  syms.resize(n);
  heap.clear();
  for (size_t i = 0; i < n; ++i) {
    syms[i].id = word[i];
    syms[i].prev = int32_t(i) - 1;
    syms[i].next = i + 1 < n ? int32_t(i + 1) : -1;
  }
  // min-heap on (rank, pos)
  auto later = [](const Cache::HeapEntry& x, const Cache::HeapEntry& y) {
    return x.rank != y.rank ? x.rank > y.rank : x.pos > y.pos;
  };
  for (size_t i = 0; i + 1 < n; ++i) {
    uint64_t m = byte_pair_[(size_t(p[i]) << 8) | p[i + 1]];
    if (m != kNoMerge) heap.push_back({uint32_t(m >> 32), uint32_t(i), uint32_t(m)});
  }
  std::make_heap(heap.begin(), heap.end(), later);
  while (!heap.empty()) {
    std::pop_heap(heap.begin(), heap.end(), later);
    const Cache::HeapEntry top = heap.back();
    heap.pop_back();
    Cache::Sym& cur = syms[top.pos];
    if (cur.id == kDead) continue;  // merged into its left neighbour
    if (cur.next < 0) continue;     // last symbol
    const int32_t nx = cur.next;
    const uint64_t m = merge_find(cur.id, syms[nx].id);
    if (m == kNoMerge || uint32_t(m) != top.new_id) continue;  // stale entry
    cur.id = top.new_id;
    syms[nx].id = kDead;
    cur.next = syms[nx].next;
    if (cur.next >= 0) syms[cur.next].prev = int32_t(top.pos);
    if (cur.prev >= 0) {
      uint64_t mp = merge_find(syms[cur.prev].id, cur.id);
      if (mp != kNoMerge) {
        heap.push_back({uint32_t(mp >> 32), uint32_t(cur.prev), uint32_t(mp)});
        std::push_heap(heap.begin(), heap.end(), later);
      }
    }
    if (cur.next >= 0) {
      uint64_t mn = merge_find(cur.id, syms[cur.next].id);
      if (mn != kNoMerge) {
        heap.push_back({uint32_t(mn >> 32), top.pos, uint32_t(mn)});
        std::push_heap(heap.begin(), heap.end(), later);
      }
    }
  }
  word.clear();
  for (int32_t i = 0; i >= 0; i = syms[i].next) word.push_back(syms[i].id);
}

// ---- encoding --------------------------------------------------------------------------------------

inline void ByteLevelBPE::encode_piece(const uint8_t* p, size_t n, std::vector<uint32_t>& out,
                                       Cache& c) const {
  const uint64_t h = hash_bytes(p, n);
  if (const VocabSlot* v = vocab_find(p, n, h)) {
    if ((v->value & 1) || ignore_merges_) {
      out.push_back(v->value >> 1);
      return;
    }
  }
  const bool cacheable = n <= kMaxCachedLen;
  const uint32_t tag = uint32_t(h >> 32);
  const size_t mask = kCacheSlots - 1;
  size_t slot = size_t(h) & mask;
  if (cacheable) {
    const Cache::Slot* slots = c.slots_.data();
    while (true) {
      const Cache::Slot& s = slots[slot];
      if (s.lens == 0) break;
      if (s.tag == tag && (s.lens & 0xFFFF) == n && std::memcmp(c.keys_.data() + s.key_off, p, n) == 0) {
        const uint32_t* ids = c.ids_.data() + s.ids_off;
        out.insert(out.end(), ids, ids + (s.lens >> 16));
        return;
      }
      slot = (slot + 1) & mask;
    }
  }
  merge_word(p, n, c);
  out.insert(out.end(), c.word_.begin(), c.word_.end());
  if (cacheable) {
    if (c.count_ >= kCacheMaxEntries) {
      c.clear();
      slot = size_t(h) & mask;
      while (c.slots_[slot].lens != 0) slot = (slot + 1) & mask;
    }
    Cache::Slot& s = c.slots_[slot];
    s.tag = tag;
    s.lens = uint32_t(n) | (uint32_t(c.word_.size()) << 16);
    s.key_off = uint32_t(c.keys_.size());
    s.ids_off = uint32_t(c.ids_.size());
    c.keys_.insert(c.keys_.end(), p, p + n);
    c.ids_.insert(c.ids_.end(), c.word_.begin(), c.word_.end());
    ++c.count_;
  }
}

void ByteLevelBPE::encode_ordinary(const uint8_t* p, size_t n, std::vector<uint32_t>& out,
                                   Cache& c) const {
  gpt2_pretokenize(p, p + n, [&](const uint8_t* b, const uint8_t* e) {
    encode_piece(b, size_t(e - b), out, c);
  });
}

void ByteLevelBPE::pretokenize(std::string_view text, std::vector<std::string_view>& pieces) {
  const auto* s = reinterpret_cast<const uint8_t*>(text.data());
  gpt2_pretokenize(s, s + text.size(), [&](const uint8_t* b, const uint8_t* e) {
    pieces.emplace_back(text.data() + (b - s), size_t(e - b));
  });
}

void ByteLevelBPE::encode(std::string_view text, std::vector<uint32_t>& out, Cache& c) const {
  if (c.owner_ != serial_ || c.slots_.empty()) {
    c.clear();
    c.owner_ = serial_;
  }
  const auto* s = reinterpret_cast<const uint8_t*>(text.data());
  const size_t n = text.size();
  if (added_count_ == 0) {
    encode_ordinary(s, n, out, c);
    return;
  }
  // Added tokens: leftmost match; among matches starting there, the longest (aho-corasick
  // MatchKind::LeftmostLongest, as tokenizers' AddedVocabulary).
  size_t start = 0;  // start of the not-yet-encoded text
  size_t i = 0;
  while (i < n) {
    if (added_single_first_ >= 0) {
      const void* f = std::memchr(s + i, added_single_first_, n - i);
      if (f == nullptr) break;
      i = size_t(static_cast<const uint8_t*>(f) - s);
    } else if (!added_first_[s[i]]) {
      ++i;
      continue;
    }
    uint32_t node = 0;
    int64_t best = -1;
    size_t best_end = 0;
    for (size_t k = i; k < n; ++k) {
      uint32_t child = 0;
      for (const auto& [eb, en] : trie_[node].edges)
        if (eb == s[k]) {
          child = en;
          break;
        }
      if (child == 0) break;
      node = child;
      if (trie_[node].token >= 0) {
        best = trie_[node].token;
        best_end = k + 1;
      }
    }
    if (best < 0) {
      ++i;
      continue;
    }
    if (start < i) encode_ordinary(s + start, i - start, out, c);
    out.push_back(uint32_t(best));
    i = start = best_end;
  }
  if (start < n) encode_ordinary(s + start, n - start, out, c);
}

}  // namespace fastlm
