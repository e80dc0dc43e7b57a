// The raw JSONL index (Modalities' `create_raw_index`): byte offset and length of every document line.
//
// The file is memory-mapped and cut into chunks of whole lines; threads take chunks in turn, find line
// ends with memchr and validate every line as a JSON object. Blank lines are skipped and counted; a UTF-8 BOM
// at the start of the file is skipped; a line's length excludes its '\n' only (a CRLF line keeps its '\r').
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "common.h"

namespace fastlm {

struct RawIndex {
  std::vector<uint64_t> offsets;
  std::vector<uint64_t> lengths;
  uint64_t lines = 0;          // all lines seen, blank and skipped ones included
  uint64_t blank_lines = 0;
  uint64_t skipped_lines = 0;  // invalid lines dropped with skip_invalid
  std::vector<std::pair<uint64_t, std::string>> first_skipped;  // (1-based line, reason), a few
};

// Throws InputError "path:line:column: reason" on the first invalid line unless skip_invalid.
RawIndex build_raw_index(const std::string& path, int num_threads, bool skip_invalid,
                         const ProgressFn& progress, uint64_t chunk_bytes = 16ull << 20);

// Writes `index` as Modalities' .idx (pickle protocol 4 of (offset, length) tuples) to `path`, streaming.
void write_raw_index_file(const RawIndex& index, const std::string& path);

}  // namespace fastlm
