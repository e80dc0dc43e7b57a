// Small shared pieces of the native side: the input-error exception, file helpers, progress callbacks.
#pragma once

#include <cstdint>
#include <functional>
#include <stdexcept>
#include <string>

namespace fastlm {

// Bad input (a malformed line, a missing key, ...): surfaces in Python as fastlm._C.InputError, a
// ValueError. The message names the file and line.
class InputError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// An index entry that does not end at a line end of its JSONL: a stale index, another file's, or one that
// counts characters instead of bytes (as Modalities' text-mode indexer does on non-ASCII lines). Surfaces in
// Python as fastlm._C.IndexMismatch, a subclass of InputError.
class IndexMismatch : public InputError {
 public:
  using InputError::InputError;
};

// Thrown when a progress callback asked to stop (Ctrl-C in Python); the binding re-raises the Python error.
class Aborted : public std::runtime_error {
 public:
  Aborted() : std::runtime_error("aborted") {}
};

// Called from time to time with work done so far; returns false to abort.
using ProgressFn = std::function<bool(uint64_t bytes_done, uint64_t docs_done, uint64_t tokens_done)>;

// A read-only file opened with O_RDONLY; pread-based, safe to share between threads.
class InputFile {
 public:
  explicit InputFile(const std::string& path);
  ~InputFile();
  InputFile(const InputFile&) = delete;
  InputFile& operator=(const InputFile&) = delete;
  uint64_t size() const { return size_; }
  const std::string& path() const { return path_; }
  // Reads exactly `n` bytes at `offset` or throws (names the file).
  void read_at(uint64_t offset, char* dst, uint64_t n) const;
  // 1-based number of the line holding byte `offset` (counts newlines before it; used on error paths).
  uint64_t line_of(uint64_t offset) const;

 private:
  std::string path_;
  int fd_ = -1;
  uint64_t size_ = 0;
};

// "1,234,567" for messages.
std::string with_commas(uint64_t v);

}  // namespace fastlm
