// Validating JSON scanner for one JSONL line, with extraction of one string field.
//
// A JSONL line is checked completely (RFC 8259 grammar, UTF-8 validity, surrogate pairs in \u escapes), so
// a malformed line is caught wherever the fault is, not only near the extracted field. The scanner allocates
// nothing except the unescaped output string, and skips plain string runs eight bytes at a time.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace fastlm {

// Why a line was rejected. kInvalidJson covers grammar, UTF-8, escapes and control characters;
// the other kinds are well-formed JSON that does not carry the requested field.
enum class JsonFault { kNone, kInvalidJson, kNotAnObject, kMissingKey, kNotAString };

struct JsonResult {
  JsonFault fault = JsonFault::kNone;
  size_t column = 0;    // 1-based byte column of the fault within the line (0 when not positional)
  std::string message;  // human-readable, without file or line (the caller adds those)
  bool ok() const { return fault == JsonFault::kNone; }
};

// A field path such as ".raw_content" or ".meta.text", parsed once.
class JsonPath {
 public:
  // Throws std::invalid_argument naming what is supported when `pattern` is not `.key(.key)*`.
  explicit JsonPath(std::string_view pattern);
  const std::vector<std::string>& keys() const { return keys_; }
  const std::string& pattern() const { return pattern_; }

 private:
  std::string pattern_;
  std::vector<std::string> keys_;
};

// Validates that `line` holds exactly one JSON object (surrounding JSON whitespace allowed). With a
// non-null `path`, also extracts the string found there into `*out` (unescaped UTF-8; when a key repeats,
// the last occurrence wins, as in jq and Python's json).
JsonResult scan_json_line(std::string_view line, const JsonPath* path, std::string* out);

// The UTF-8 validators, for tests: (the verdict of the vector validator when this CPU runs it (AVX2), else
// none; the offset of the first invalid byte by the scalar check, or text.size() when valid). They must
// agree on validity for every input.
std::pair<std::vector<bool>, size_t> check_utf8(std::string_view text);

// True when the line holds only spaces, tabs and carriage returns (a blank line, not a document).
bool is_blank_line(std::string_view line);

}  // namespace fastlm
