// Validating JSON scanner: see json_scan.h.
#include "json_scan.h"

#include <cstdint>
#include <cstring>
#include <stdexcept>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#if defined(__x86_64__)
#include <immintrin.h>  // AVX2: only inside functions built for it and called after a CPU check
#endif

namespace fastlm {

JsonPath::JsonPath(std::string_view pattern) : pattern_(pattern) {
  const char* kSupported =
      "supported patterns are `.key` and nested `.key.subkey` (keys of letters, digits, '_' and '-')";
  if (pattern.empty() || pattern[0] != '.') {
    throw std::invalid_argument("unsupported jq_pattern \"" + std::string(pattern) + "\": " + kSupported);
  }
  size_t i = 1;
  while (true) {
    size_t start = i;
    while (i < pattern.size() && pattern[i] != '.') {
      char c = pattern[i];
      bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' ||
                c == '-';
      if (!ok) {
        throw std::invalid_argument("unsupported jq_pattern \"" + std::string(pattern) + "\" (character '" +
                                    std::string(1, c) + "'): " + kSupported);
      }
      ++i;
    }
    if (i == start) {
      throw std::invalid_argument("unsupported jq_pattern \"" + std::string(pattern) + "\" (empty key): " +
                                  kSupported);
    }
    keys_.emplace_back(pattern.substr(start, i - start));
    if (i == pattern.size()) break;
    ++i;  // the '.'
  }
}

bool is_blank_line(std::string_view line) {
  for (char c : line) {
    if (c != ' ' && c != '\t' && c != '\r') return false;
  }
  return true;
}

namespace {

constexpr int kMaxDepth = 512;
constexpr uint64_t kOnes = 0x0101010101010101ULL;
constexpr uint64_t kHighs = 0x8080808080808080ULL;

inline uint64_t has_zero_byte(uint64_t x) { return (x - kOnes) & ~x & kHighs; }

// Nonzero when any of the 8 bytes is '"', '\\' or a control character (< 0x20). Bytes >= 0x80 are plain:
// the whole line's UTF-8 is validated before parsing.
inline uint64_t needs_attention(uint64_t x) {
  uint64_t quote = has_zero_byte(x ^ (kOnes * '"'));
  uint64_t backslash = has_zero_byte(x ^ (kOnes * '\\'));
  uint64_t control = (x - kOnes * 0x20) & ~x & kHighs;
  return quote | backslash | control;
}

// First byte in [p, end) that a string scan must look at: '"', '\\' or a control character.
// SSE2 (part of every x86-64) checks 16 bytes at a time; elsewhere SWAR checks 8.
inline const unsigned char* skip_plain(const unsigned char* p, const unsigned char* end) {
#if defined(__SSE2__)
  const __m128i quote = _mm_set1_epi8('"');
  const __m128i backslash = _mm_set1_epi8('\\');
  const __m128i control_max = _mm_set1_epi8(0x1F);
  while (end - p >= 16) {
    __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    // unsigned v <= 0x1F  <=>  max(v, 0x1F) == 0x1F
    __m128i hit = _mm_or_si128(_mm_or_si128(_mm_cmpeq_epi8(v, quote), _mm_cmpeq_epi8(v, backslash)),
                               _mm_cmpeq_epi8(_mm_max_epu8(v, control_max), control_max));
    int mask = _mm_movemask_epi8(hit);
    if (mask != 0) return p + __builtin_ctz(static_cast<unsigned>(mask));
    p += 16;
  }
#endif
  while (end - p >= 8) {
    uint64_t x;
    std::memcpy(&x, p, 8);
    if (needs_attention(x)) break;
    p += 8;
  }
  while (p < end && *p >= 0x20 && *p != '"' && *p != '\\') ++p;
  return p;
}

// Length of the valid UTF-8 sequence starting at p (p < end, *p >= 0x80), or 0 when invalid.
inline size_t utf8_sequence_length(const unsigned char* p, const unsigned char* end) {
  unsigned char c = p[0];
  size_t n;
  unsigned char lo = 0x80, hi = 0xBF;  // bounds of the second byte
  if (c >= 0xC2 && c <= 0xDF) {
    n = 2;
  } else if (c >= 0xE0 && c <= 0xEF) {
    n = 3;
    if (c == 0xE0) lo = 0xA0;
    if (c == 0xED) hi = 0x9F;  // U+D800..U+DFFF are not characters
  } else if (c >= 0xF0 && c <= 0xF4) {
    n = 4;
    if (c == 0xF0) lo = 0x90;
    if (c == 0xF4) hi = 0x8F;
  } else {
    return 0;
  }
  if (static_cast<size_t>(end - p) < n) return 0;
  if (p[1] < lo || p[1] > hi) return 0;
  for (size_t k = 2; k < n; ++k) {
    if ((p[k] & 0xC0) != 0x80) return 0;
  }
  return n;
}

// Offset of the first byte of [p, end) that is not valid UTF-8, or end - p when all of it is. ASCII is
// skipped 16 (or 8) bytes at a time; runs of multi-byte characters are checked in a tight loop.
inline size_t first_invalid_utf8(const unsigned char* begin, const unsigned char* end) {
  const unsigned char* p = begin;
  while (p < end) {
    // Jump over ASCII straight to the next byte >= 0x80.
    bool found = false;
#if defined(__SSE2__)
    while (end - p >= 16) {
      int mask = _mm_movemask_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
      if (mask != 0) {
        p += __builtin_ctz(static_cast<unsigned>(mask));
        found = true;
        break;
      }
      p += 16;
    }
#endif
    while (!found && end - p >= 8) {
      uint64_t x;
      std::memcpy(&x, p, 8);
      if (uint64_t high = x & kHighs) {
        p += __builtin_ctzll(high) / 8;  // little-endian: the lowest set bit is the first such byte
        found = true;
        break;
      }
      p += 8;
    }
    while (!found && p < end && *p < 0x80) ++p;
    // Validate the run of multi-byte characters.
    while (p < end && *p >= 0x80) {
      size_t n = utf8_sequence_length(p, end);
      if (n == 0) return static_cast<size_t>(p - begin);
      p += n;
    }
  }
  return static_cast<size_t>(end - begin);
}

#if defined(__x86_64__)
// Branch-free UTF-8 validation, 32 bytes at a time (the lookup-table method of Keiser and Lemire,
// "Validating UTF-8 in less than one instruction per byte", 2021). Each byte pair (previous, current) is
// classified by three 16-entry tables indexed by nibbles; a fault bit survives the AND of the three only
// for an invalid pair. Third and fourth bytes of long sequences are checked separately (must23).
// Built for AVX2, used only when the CPU has it (the build stays portable); other CPUs take the scalar
// check, first_invalid_utf8.
namespace utf8simd {
constexpr uint8_t kTooShort = 1 << 0;   // lead byte not followed by a continuation
constexpr uint8_t kTooLong = 1 << 1;    // continuation after ASCII
constexpr uint8_t kOverlong3 = 1 << 2;  // E0 80..9F
constexpr uint8_t kTooLarge = 1 << 3;   // above U+10FFFF
constexpr uint8_t kSurrogate = 1 << 4;  // ED A0..BF
constexpr uint8_t kOverlong2 = 1 << 5;  // C0, C1
constexpr uint8_t kTooLarge1000 = 1 << 6;
constexpr uint8_t kOverlong4 = 1 << 6;  // F0 80..8F
constexpr uint8_t kTwoConts = 1 << 7;   // continuation after continuation (fine only inside a sequence)
constexpr uint8_t kCarry = kTooShort | kTooLong | kTwoConts;

// The three classification tables, and the largest byte that completes the sequence it is in by its
// position among the last three of a block.
static const uint8_t k1High[16] = {
    kTooLong, kTooLong, kTooLong, kTooLong, kTooLong, kTooLong, kTooLong, kTooLong,
    kTwoConts, kTwoConts, kTwoConts, kTwoConts,
    kTooShort | kOverlong2, kTooShort, kTooShort | kOverlong3 | kSurrogate,
    kTooShort | kTooLarge | kTooLarge1000 | kOverlong4};
static const uint8_t k1Low[16] = {
    kCarry | kOverlong3 | kOverlong2 | kOverlong4, kCarry | kOverlong2, kCarry, kCarry, kCarry | kTooLarge,
    kCarry | kTooLarge | kTooLarge1000, kCarry | kTooLarge | kTooLarge1000, kCarry | kTooLarge | kTooLarge1000,
    kCarry | kTooLarge | kTooLarge1000, kCarry | kTooLarge | kTooLarge1000, kCarry | kTooLarge | kTooLarge1000,
    kCarry | kTooLarge | kTooLarge1000, kCarry | kTooLarge | kTooLarge1000,
    kCarry | kTooLarge | kTooLarge1000 | kSurrogate, kCarry | kTooLarge | kTooLarge1000,
    kCarry | kTooLarge | kTooLarge1000};
static const uint8_t k2High[16] = {
    kTooShort, kTooShort, kTooShort, kTooShort, kTooShort, kTooShort, kTooShort, kTooShort,
    kTooLong | kOverlong2 | kTwoConts | kOverlong3 | kTooLarge1000 | kOverlong4,
    kTooLong | kOverlong2 | kTwoConts | kOverlong3 | kTooLarge,
    kTooLong | kOverlong2 | kTwoConts | kSurrogate | kTooLarge,
    kTooLong | kOverlong2 | kTwoConts | kSurrogate | kTooLarge,
    kTooShort, kTooShort, kTooShort, kTooShort};
static const uint8_t kIncomplete[32] = {255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255,
                                        255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255,
                                        0xF0 - 1, 0xE0 - 1, 0xC0 - 1};

// pshufb looks up within each 16-byte lane, so the tables are repeated in both lanes; the bytes before each
// position come from a lane-crossing permute of (previous, current) block.
__attribute__((target("avx2"))) inline __m256i twice(const uint8_t (&t)[16]) {
  return _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t)));
}

__attribute__((target("avx2"))) bool valid_avx2(const unsigned char* p, size_t n) {
  const __m256i t1h = twice(k1High), t1l = twice(k1Low), t2h = twice(k2High);
  const __m256i incomplete = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kIncomplete));
  const __m256i nibble = _mm256_set1_epi8(0x0F);
  __m256i prev = _mm256_setzero_si256(), error = _mm256_setzero_si256(), prev_incomplete = _mm256_setzero_si256();
  alignas(32) unsigned char tail[32];
  for (size_t i = 0; i < n; i += 32) {
    __m256i in;
    if (n - i >= 32) {
      in = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i));
    } else {  // the last bytes, padded with ASCII zeros: an unfinished sequence then fails as too short
      std::memset(tail, 0, sizeof(tail));
      std::memcpy(tail, p + i, n - i);
      in = _mm256_load_si256(reinterpret_cast<const __m256i*>(tail));
    }
    // (high lane of prev, low lane of in): the 16 bytes before each lane of `in`
    __m256i before = _mm256_permute2x128_si256(prev, in, 0x21);
    __m256i prev1 = _mm256_alignr_epi8(in, before, 15);
    __m256i b1h = _mm256_shuffle_epi8(t1h, _mm256_and_si256(_mm256_srli_epi16(prev1, 4), nibble));
    __m256i b1l = _mm256_shuffle_epi8(t1l, _mm256_and_si256(prev1, nibble));
    __m256i b2h = _mm256_shuffle_epi8(t2h, _mm256_and_si256(_mm256_srli_epi16(in, 4), nibble));
    __m256i special = _mm256_and_si256(_mm256_and_si256(b1h, b1l), b2h);
    __m256i prev2 = _mm256_alignr_epi8(in, before, 14), prev3 = _mm256_alignr_epi8(in, before, 13);
    __m256i third = _mm256_subs_epu8(prev2, _mm256_set1_epi8(static_cast<char>(0xE0 - 0x80)));
    __m256i fourth = _mm256_subs_epu8(prev3, _mm256_set1_epi8(static_cast<char>(0xF0 - 0x80)));
    __m256i must23 = _mm256_and_si256(_mm256_or_si256(third, fourth), _mm256_set1_epi8(static_cast<char>(0x80)));
    error = _mm256_or_si256(error, _mm256_xor_si256(must23, special));
    prev_incomplete = _mm256_subs_epu8(in, incomplete);
    prev = in;
  }
  error = _mm256_or_si256(error, prev_incomplete);
  return _mm256_testz_si256(error, error) != 0;
}

const bool kHasAvx2 = __builtin_cpu_supports("avx2");
}  // namespace utf8simd
#endif

// True when all of [p, end) is valid UTF-8 (the fast check; first_invalid_utf8 finds the offending byte).
inline bool utf8_valid(const unsigned char* begin, const unsigned char* end) {
#if defined(__x86_64__)
  if (utf8simd::kHasAvx2) return utf8simd::valid_avx2(begin, static_cast<size_t>(end - begin));
#endif
  return first_invalid_utf8(begin, end) == static_cast<size_t>(end - begin);
}

inline void append_utf8(std::string* out, uint32_t cp) {
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

std::string describe_byte(const unsigned char* p, const unsigned char* end) {
  if (p >= end) return "end of line";
  unsigned char c = *p;
  if (c == 0) return "a raw NUL byte";
  if (c >= 0x21 && c < 0x7F) return std::string("'") + static_cast<char>(c) + "'";
  static const char* kHex = "0123456789ABCDEF";
  std::string s = "byte 0x";
  s.push_back(kHex[c >> 4]);
  s.push_back(kHex[c & 15]);
  if (c == ' ') s += " (space)";
  return s;
}

// What the path lookup found so far. Repeated keys overwrite earlier outcomes, as in jq.
struct Lookup {
  enum State { kMissing, kFound, kWrongType } state = kMissing;
  std::string where;      // the path prefix at which a wrong type was found
  std::string found;      // description of the wrong value
  std::string expected;   // "a string" or "an object"
  size_t column = 0;      // of the wrong value, or of the deepest object on the path (for a missing key)
  // For a missing key: the deepest path level whose object was reached, and the keys that object has.
  int deepest = -1;
  std::vector<std::string> keys;
  size_t more_keys = 0;   // keys beyond the kShownKeys kept
  static constexpr size_t kShownKeys = 8;
};

class Parser {
 public:
  Parser(std::string_view line, const JsonPath* path, std::string* out)
      : begin_(reinterpret_cast<const unsigned char*>(line.data())),
        p_(begin_),
        end_(begin_ + line.size()),
        path_(path),
        out_(out) {}

  JsonResult run() {
    if (!utf8_valid(begin_, end_)) {
      size_t bad = first_invalid_utf8(begin_, end_);
      return fail_at(begin_ + bad, "invalid UTF-8: " + describe_byte(begin_ + bad, end_) +
                                       " does not start a valid sequence");
    }
    skip_ws();
    if (p_ >= end_) return fail_at(p_, "expected a JSON object, found an empty line");
    if (*p_ != '{') {
      const char* kind = nullptr;
      switch (*p_) {
        case '[': kind = "an array"; break;
        case '"': kind = "a string"; break;
        case 't': case 'f': kind = "a boolean"; break;
        case 'n': kind = "null"; break;
        default:
          if (*p_ == '-' || (*p_ >= '0' && *p_ <= '9') || *p_ == 'N' || *p_ == 'I') kind = "a number";
      }
      if (kind == nullptr) return fail_at(p_, "invalid JSON: expected '{' but found " + describe_byte(p_, end_));
      // Validate the value anyway so that garbage is reported as invalid JSON first.
      if (!parse_value(0, -1)) return result_;
      skip_ws();
      if (p_ < end_) return trailing();
      result_.fault = JsonFault::kNotAnObject;
      result_.column = 1;
      result_.message = std::string("expected a JSON object, found ") + kind;
      return result_;
    }
    if (!parse_value(0, path_ != nullptr ? 0 : -1)) return result_;
    skip_ws();
    if (p_ < end_) return trailing();
    if (path_ != nullptr) {
      if (lookup_.state == Lookup::kMissing) {
        result_.fault = JsonFault::kMissingKey;
        result_.column = lookup_.column;
        result_.message = "missing key " + path_->pattern() + " (" + describe_keys() + ")";
      } else if (lookup_.state == Lookup::kWrongType) {
        result_.fault = JsonFault::kNotAString;
        result_.column = lookup_.column;
        result_.message = "expected " + lookup_.expected + " at " + lookup_.where + ", found " + lookup_.found;
      }
    }
    return result_;
  }

 private:
  JsonResult trailing() {
    return fail_at(p_, "invalid JSON: unexpected " + describe_byte(p_, end_) + " after the end of the object");
  }

  JsonResult fail_at(const unsigned char* at, std::string message) {
    result_.fault = JsonFault::kInvalidJson;
    result_.column = static_cast<size_t>(at - begin_) + 1;
    result_.message = std::move(message);
    return result_;
  }

  bool fail(const unsigned char* at, std::string message) {
    fail_at(at, std::move(message));
    return false;
  }

  void skip_ws() {
    while (p_ < end_ && (*p_ == ' ' || *p_ == '\t' || *p_ == '\n' || *p_ == '\r')) ++p_;
  }

  static const char* kind_of(unsigned char c) {
    switch (c) {
      case '{': return "an object";
      case '[': return "an array";
      case '"': return "a string";
      case 't': return "true";
      case 'f': return "false";
      case 'n': return "null";
      default: return "a number";
    }
  }

  // What the object in which the path's next key was missing holds, for the missing-key message.
  std::string describe_keys() const {
    std::string owner = lookup_.deepest <= 0 ? "the line's object" : path_prefix(lookup_.deepest - 1);
    if (lookup_.keys.empty()) return owner + " is empty";
    std::string s = owner + " has keys ";
    for (size_t i = 0; i < lookup_.keys.size(); ++i) s += (i > 0 ? ", \"" : "\"") + lookup_.keys[i] + "\"";
    if (lookup_.more_keys > 0) s += " and " + std::to_string(lookup_.more_keys) + " more";
    return s;
  }

  // A key as the message shows it: at most kShownKeyBytes bytes, cut at a character boundary.
  static std::string shorten(const std::string& key) {
    constexpr size_t kShownKeyBytes = 40;
    if (key.size() <= kShownKeyBytes) return key;
    size_t cut = kShownKeyBytes;
    while (cut > 0 && (static_cast<unsigned char>(key[cut]) & 0xC0) == 0x80) --cut;
    return key.substr(0, cut) + "...";
  }

  std::string path_prefix(int level) const {
    std::string s;
    for (int i = 0; i <= level; ++i) s += "." + path_->keys()[i];
    return s;
  }

  // `level` is the index into the path keys that this value's object members are matched against, or -1
  // when the value lies off the path.
  bool parse_value(int depth, int level) {
    if (depth > kMaxDepth) return fail(p_, "invalid JSON: nesting deeper than 512 levels");
    if (p_ >= end_) return fail(p_, "invalid JSON: expected a value but found end of line");
    switch (*p_) {
      case '{': return parse_object(depth + 1, level);
      case '[': return parse_array(depth + 1);
      case '"': return parse_string(nullptr);
      case 't': return parse_literal("true");
      case 'f': return parse_literal("false");
      case 'n': return parse_literal("null");
      // Not JSON, but Python's json module writes and reads them (a float field of a pandas or json.dumps
      // dump), and so does Modalities' indexer: a document is not refused over a field it never reads.
      case 'N': return parse_literal("NaN");
      case 'I': return parse_literal("Infinity");
      default: return parse_number();
    }
  }

  bool parse_literal(const char* word) {
    size_t n = std::strlen(word);
    if (static_cast<size_t>(end_ - p_) < n || std::memcmp(p_, word, n) != 0) {
      return fail(p_, "invalid JSON: expected a value but found " + describe_byte(p_, end_));
    }
    p_ += n;
    return true;
  }

  bool parse_number() {
    const unsigned char* start = p_;
    if (p_ < end_ && *p_ == '-') ++p_;
    if (p_ < end_ && *p_ == 'I') return parse_literal("Infinity");  // -Infinity (see parse_value)
    if (p_ >= end_ || *p_ < '0' || *p_ > '9') {
      return fail(start, "invalid JSON: expected a value but found " + describe_byte(start, end_));
    }
    if (*p_ == '0') {
      ++p_;
    } else {
      while (p_ < end_ && *p_ >= '0' && *p_ <= '9') ++p_;
    }
    if (p_ < end_ && *p_ == '.') {
      ++p_;
      if (p_ >= end_ || *p_ < '0' || *p_ > '9') {
        return fail(p_, "invalid JSON: expected a digit after '.' but found " + describe_byte(p_, end_));
      }
      while (p_ < end_ && *p_ >= '0' && *p_ <= '9') ++p_;
    }
    if (p_ < end_ && (*p_ == 'e' || *p_ == 'E')) {
      ++p_;
      if (p_ < end_ && (*p_ == '+' || *p_ == '-')) ++p_;
      if (p_ >= end_ || *p_ < '0' || *p_ > '9') {
        return fail(p_, "invalid JSON: expected a digit in the exponent but found " + describe_byte(p_, end_));
      }
      while (p_ < end_ && *p_ >= '0' && *p_ <= '9') ++p_;
    }
    return true;
  }

  bool parse_array(int depth) {
    ++p_;  // '['
    skip_ws();
    if (p_ < end_ && *p_ == ']') {
      ++p_;
      return true;
    }
    while (true) {
      skip_ws();
      if (!parse_value(depth, -1)) return false;
      skip_ws();
      if (p_ < end_ && *p_ == ',') {
        ++p_;
        continue;
      }
      if (p_ < end_ && *p_ == ']') {
        ++p_;
        return true;
      }
      return fail(p_, "invalid JSON: expected ',' or ']' but found " + describe_byte(p_, end_));
    }
  }

  bool parse_object(int depth, int level) {
    if (level >= 0 && level >= lookup_.deepest) {  // a deeper object on the path, or a repeat of the last
      lookup_.deepest = level;
      lookup_.column = static_cast<size_t>(p_ - begin_) + 1;
      lookup_.keys.clear();
      lookup_.more_keys = 0;
    }
    ++p_;  // '{'
    skip_ws();
    if (p_ < end_ && *p_ == '}') {
      ++p_;
      return true;
    }
    const int last = path_ != nullptr ? static_cast<int>(path_->keys().size()) - 1 : -1;
    while (true) {
      skip_ws();
      if (p_ >= end_ || *p_ != '"') {
        return fail(p_, "invalid JSON: expected a key in double quotes but found " + describe_byte(p_, end_));
      }
      bool match = false;
      if (level >= 0) {
        key_.clear();
        if (!parse_string(&key_)) return false;
        match = key_ == path_->keys()[level];
        if (level == lookup_.deepest) {  // not once a nested object on the path went deeper
          if (lookup_.keys.size() < Lookup::kShownKeys) lookup_.keys.push_back(shorten(key_));
          else ++lookup_.more_keys;
        }
      } else if (!parse_string(nullptr)) {
        return false;
      }
      skip_ws();
      if (p_ >= end_ || *p_ != ':') {
        return fail(p_, "invalid JSON: expected ':' after the key but found " + describe_byte(p_, end_));
      }
      ++p_;
      skip_ws();
      if (!match) {
        if (!parse_value(depth, -1)) return false;
      } else if (level == last) {
        if (p_ < end_ && *p_ == '"') {
          out_->clear();
          if (!parse_string(out_)) return false;
          lookup_.state = Lookup::kFound;
        } else {
          set_wrong_type(level, "a string");
          if (!parse_value(depth, -1)) return false;
        }
      } else {
        lookup_.state = Lookup::kMissing;  // a repeated key replaces what an earlier one held
        if (p_ < end_ && *p_ == '{') {
          if (!parse_value(depth, level + 1)) return false;
        } else {
          set_wrong_type(level, "an object");
          if (!parse_value(depth, -1)) return false;
        }
      }
      skip_ws();
      if (p_ < end_ && *p_ == ',') {
        ++p_;
        continue;
      }
      if (p_ < end_ && *p_ == '}') {
        ++p_;
        return true;
      }
      return fail(p_, "invalid JSON: expected ',' or '}' but found " + describe_byte(p_, end_));
    }
  }

  void set_wrong_type(int level, const char* expected) {
    lookup_.state = Lookup::kWrongType;
    lookup_.column = static_cast<size_t>(p_ - begin_) + 1;
    lookup_.where = path_prefix(level);
    lookup_.expected = expected;
    lookup_.found = p_ < end_ ? kind_of(*p_) : "nothing";
  }

  bool parse_hex4(const unsigned char* at, uint32_t* value) {
    if (end_ - at < 4) return false;
    uint32_t v = 0;
    for (int i = 0; i < 4; ++i) {
      unsigned char c = at[i];
      v <<= 4;
      if (c >= '0' && c <= '9') v |= c - '0';
      else if (c >= 'a' && c <= 'f') v |= c - 'a' + 10;
      else if (c >= 'A' && c <= 'F') v |= c - 'A' + 10;
      else return false;
    }
    *value = v;
    return true;
  }

  // Parses a string starting at the opening quote; appends its unescaped UTF-8 to `dest` when non-null.
  bool parse_string(std::string* dest) {
    const unsigned char* open = p_;
    ++p_;
    while (true) {
      // Fast path: plain runs (any byte but '"', '\\' and controls), 16 or 8 bytes at a time.
      const unsigned char* run = p_;
      p_ = skip_plain(p_, end_);
      if (dest != nullptr && p_ > run) dest->append(reinterpret_cast<const char*>(run), p_ - run);
      if (p_ >= end_) return fail(open, "invalid JSON: string starting here is not closed before the end of line");
      unsigned char c = *p_;
      if (c == '"') {
        ++p_;
        return true;
      }
      if (c == '\\') {
        if (!parse_escape(dest)) return false;
        continue;
      }
      if (c < 0x20) {
        if (c == 0) return fail(p_, "raw NUL byte inside a string (write it as \\u0000)");
        return fail(p_, "invalid JSON: unescaped control character " + describe_byte(p_, end_) +
                            " inside a string");
      }
    }
  }

  bool parse_escape(std::string* dest) {
    const unsigned char* at = p_;
    if (end_ - p_ < 2) return fail(at, "invalid JSON: incomplete escape at the end of line");
    unsigned char e = p_[1];
    char plain = 0;
    switch (e) {
      case '"': plain = '"'; break;
      case '\\': plain = '\\'; break;
      case '/': plain = '/'; break;
      case 'b': plain = '\b'; break;
      case 'f': plain = '\f'; break;
      case 'n': plain = '\n'; break;
      case 'r': plain = '\r'; break;
      case 't': plain = '\t'; break;
      case 'u': break;
      default:
        return fail(at, "invalid JSON: unknown escape \\" + std::string(1, static_cast<char>(e)));
    }
    if (e != 'u') {
      if (dest != nullptr) dest->push_back(plain);
      p_ += 2;
      return true;
    }
    uint32_t cp;
    if (!parse_hex4(p_ + 2, &cp)) return fail(at, "invalid JSON: \\u must be followed by four hex digits");
    p_ += 6;
    if (cp >= 0xDC00 && cp <= 0xDFFF) {
      return fail(at, "lone low surrogate escape \\u" + hex4(cp) + " (not preceded by a high surrogate)");
    }
    if (cp >= 0xD800 && cp <= 0xDBFF) {
      uint32_t low;
      if (end_ - p_ < 6 || p_[0] != '\\' || p_[1] != 'u' || !parse_hex4(p_ + 2, &low) || low < 0xDC00 ||
          low > 0xDFFF) {
        return fail(at, "lone high surrogate escape \\u" + hex4(cp) + " (not followed by a low surrogate)");
      }
      p_ += 6;
      cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
    }
    if (dest != nullptr) append_utf8(dest, cp);
    return true;
  }

  static std::string hex4(uint32_t v) {
    static const char* kHex = "0123456789abcdef";
    std::string s(4, '0');
    for (int i = 3; i >= 0; --i, v >>= 4) s[i] = kHex[v & 15];
    return s;
  }

  const unsigned char* begin_;
  const unsigned char* p_;
  const unsigned char* end_;
  const JsonPath* path_;
  std::string* out_;
  std::string key_;
  Lookup lookup_;
  JsonResult result_;
};

}  // namespace

std::pair<std::vector<bool>, size_t> check_utf8(std::string_view text) {
  auto* b = reinterpret_cast<const unsigned char*>(text.data());
  std::vector<bool> verdicts;
#if defined(__x86_64__)
  if (utf8simd::kHasAvx2) verdicts.push_back(utf8simd::valid_avx2(b, text.size()));
#endif
  return {verdicts, first_invalid_utf8(b, b + text.size())};
}

JsonResult scan_json_line(std::string_view line, const JsonPath* path, std::string* out) {
  if (path != nullptr && out == nullptr) throw std::invalid_argument("scan_json_line: path without output");
  if (out != nullptr) out->clear();
  return Parser(line, path, out).run();
}

}  // namespace fastlm
