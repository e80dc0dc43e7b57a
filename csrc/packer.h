// The threaded JSONL -> .pbin packer (Modalities' `pack_encoded_data`, byte-identical output).
//
// Documents are cut into batches of about `batch_bytes` of JSONL. Worker threads claim batches in order,
// read them with pread, validate each line, extract the text field and tokenize it (native byte-level BPE,
// or, for tokenizers the native path does not cover, an external encoder that runs on the writer thread).
// The calling thread writes finished batches strictly in document order, so memory stays bounded by the
// number of batches in flight, never by the corpus.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "common.h"

namespace fastlm {

class ByteLevelBPE;

struct PackConfig {
  std::string src_path;      // the JSONL file
  std::string out_path;      // where to write (the caller renames it when complete)
  std::string jq_pattern;    // ".raw_content", ".a.b"
  uint32_t eod_id = 0;
  int token_size = 2;        // 1, 2 or 4 bytes per token
  int num_threads = 1;
  bool skip_invalid = false;
  uint64_t batch_bytes = 1ull << 20;
};

struct PackResult {
  uint64_t documents = 0;
  uint64_t tokens = 0;
  uint64_t bytes_read = 0;
  uint64_t skipped = 0;
  std::vector<std::pair<uint64_t, std::string>> first_skipped;  // (1-based line, reason)
};

// Encodes a batch of texts on the calling (writer) thread: fills `ids` with all ids back to back and
// `counts` with the number of ids of each text.
using BatchEncoder = std::function<void(std::vector<std::string>& texts, std::vector<uint32_t>& ids,
                                        std::vector<uint64_t>& counts)>;

// Exactly one of `bpe` and `encoder` is set. `offsets`/`lengths` locate each document's line in the file.
PackResult pack_jsonl(const PackConfig& config, const std::vector<uint64_t>& offsets,
                      const std::vector<uint64_t>& lengths, const ByteLevelBPE* bpe, const BatchEncoder* encoder,
                      const ProgressFn& progress);

}  // namespace fastlm
