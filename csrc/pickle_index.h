// Pickled (offset, length) index lists: the index segment of .pbin files and the raw JSONL .idx files.
//
// Both are Python `pickle.dumps(list_of_int_pairs, protocol=4)`. The writer reproduces CPython's C pickler
// byte for byte (including its 64 KiB framing), so fastlm files are byte-identical to Modalities' files.
// The parser accepts only the tiny pickle subset a list of int pairs needs and never executes anything:
// index files are untrusted input.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include <pybind11/pybind11.h>

namespace fastlm {

// Streams bytes identical to Python's pickle.dumps(list_of_int_pairs, protocol=4) into `sink`, frame by frame
// (bounded memory: it never holds more than about one frame + one batch).
class PairListPickler {
 public:
  explicit PairListPickler(std::function<void(const char* data, size_t size)> sink);
  void add(uint64_t first, uint64_t second);
  void finish();  // flushes and writes STOP; add() after finish() throws
  uint64_t count() const;

 private:
  void write(const char* data, size_t size);  // append to the open frame, opening one if needed
  void write_op(char op) { write(&op, 1); }
  void write_uint(uint64_t v);
  void write_pair(uint64_t first, uint64_t second);
  void opcode_boundary();  // CPython checks this at the start of every save(): commit a full frame
  void commit_frame();

  std::function<void(const char*, size_t)> sink_;
  std::string frame_;       // bytes of the open frame, without its 9-byte FRAME header
  bool frame_open_ = false;
  bool finished_ = false;
  uint64_t count_ = 0;
  uint64_t first_pending_[2] = {0, 0};  // a one-item list is written with APPEND, not MARK..APPENDS
  uint32_t in_batch_ = 0;               // items written since the last MARK
};

// Parses a pickle (protocols 2..5) holding a list of 2-tuples of non-negative ints, as written by Python
// (with or without framing, MEMOIZE/BINPUT/LONG_BINPUT, BINGET/LONG_BINGET references to earlier tuples,
// APPEND/APPENDS, BININT/BININT1/BININT2/LONG1, TUPLE2/TUPLE with MARK). Anything else (another opcode, a
// negative or huge int, a truncated stream, trailing bytes after STOP, a non-pair) throws
// std::runtime_error whose message says what was found and at which byte offset.
void parse_pair_list(const uint8_t* data, size_t size, std::vector<uint64_t>& first, std::vector<uint64_t>& second);

void register_pickle_index(pybind11::module_& m);

}  // namespace fastlm
