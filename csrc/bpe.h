// Byte-level BPE tokenizer (GPT-2 style), id-for-id compatible with HuggingFace `tokenizers` for
// tokenizer.json files with: model BPE (no dropout, no continuing_subword_prefix/end_of_word_suffix),
// no normalizer, pre_tokenizer ByteLevel(add_prefix_space=false, use_regex=true), and added tokens
// with single_word=lstrip=rstrip=false.
//
// Pipeline of encode():
//   1. added tokens are cut out of the raw text (leftmost match, longest at that position);
//   2. the text in between is split by a hand-written scanner equivalent to the GPT-2 regex
//      's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
//      with Unicode classes taken from tokenizers' own regex engine (csrc/unicode_tables.h);
//   3. each piece is BPE-merged on raw bytes with the same merge order as tokenizers'
//      Word::merge_all (lowest rank first, leftmost on ties).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace pybind11 {
class module_;
}

namespace fastlm {

struct AddedToken {
  std::string content;  // UTF-8, as in tokenizer.json
  uint32_t id;
};

class ByteLevelBPE {
 public:
  // vocab: token string in the byte-level alphabet exactly as in tokenizer.json's model.vocab -> id.
  // merges: in rank order (rank = index), each as the two token strings of model.merges.
  // Throws std::invalid_argument on inconsistent input.
  ByteLevelBPE(const std::vector<std::pair<std::string, uint32_t>>& vocab,
               const std::vector<std::pair<std::string, std::string>>& merges,
               const std::vector<AddedToken>& added_tokens, bool ignore_merges);
  ~ByteLevelBPE();
  ByteLevelBPE(const ByteLevelBPE&) = delete;
  ByteLevelBPE& operator=(const ByteLevelBPE&) = delete;

  // Per-thread scratch space and word cache (bounded: cleared when it grows over its cap).
  // A Cache may be used with any ByteLevelBPE; it resets itself when switched to another one.
  class Cache {
   public:
    Cache();
    ~Cache();
    size_t size() const { return count_; }
    void clear();

   private:
    friend class ByteLevelBPE;
    struct Slot {
      uint32_t tag;      // high 32 bits of the key hash
      uint32_t lens;     // key_len | ids_len << 16; 0 = empty slot
      uint32_t key_off;  // into keys_
      uint32_t ids_off;  // into ids_
    };
    struct Sym {
      uint32_t id;
      int32_t prev;
      int32_t next;
    };
    struct HeapEntry {
      uint32_t rank;
      uint32_t pos;
      uint32_t new_id;
    };
    uint64_t owner_ = 0;  // serial of the ByteLevelBPE whose words are cached
    std::vector<Slot> slots_;
    std::vector<uint8_t> keys_;
    std::vector<uint32_t> ids_;
    size_t count_ = 0;
    // scratch for the merge loop
    std::vector<Sym> syms_;
    std::vector<HeapEntry> heap_;
    std::vector<uint64_t> pairs_;
    std::vector<uint32_t> word_;
  };

  std::unique_ptr<Cache> make_cache() const;

  // Appends the ids of `text` (valid UTF-8; the caller validates) to `out`. Thread-safe for
  // concurrent calls on one const ByteLevelBPE as long as each thread uses its own Cache.
  void encode(std::string_view text, std::vector<uint32_t>& out, Cache& cache) const;

  uint32_t max_id() const { return max_id_; }

  // The GPT-2 regex split alone (no added tokens), for tests: appends the pieces of `text`.
  static void pretokenize(std::string_view text, std::vector<std::string_view>& pieces);
  size_t vocab_size() const { return vocab_size_; }
  size_t num_merges() const { return num_merges_; }
  bool ignore_merges() const { return ignore_merges_; }

 private:
  struct VocabSlot {
    uint32_t tag;     // high 32 bits of the key hash
    uint32_t len;     // 0 = empty slot
    uint32_t off;     // into vocab_keys_
    uint32_t value;   // id << 1 | direct
  };
  struct MergeSlot {
    uint64_t key;    // left << 32 | right; kEmptyKey when empty
    uint64_t value;  // rank << 32 | new_id
  };
  struct TrieNode {
    std::vector<std::pair<uint8_t, uint32_t>> edges;  // byte -> child node
    int64_t token = -1;                                // added-token id ending here
  };

  const VocabSlot* vocab_find(const uint8_t* p, size_t n, uint64_t h) const;
  void vocab_insert(const std::string& bytes, uint32_t id);
  uint64_t merge_find(uint32_t a, uint32_t b) const;
  void merge_insert(uint32_t a, uint32_t b, uint64_t value);
  // BPE-merges the raw bytes p[0..n) into cache.word_.
  void merge_word(const uint8_t* p, size_t n, Cache& cache) const;
  void encode_piece(const uint8_t* p, size_t n, std::vector<uint32_t>& out, Cache& cache) const;
  void encode_ordinary(const uint8_t* p, size_t n, std::vector<uint32_t>& out, Cache& cache) const;

  uint64_t serial_;
  bool ignore_merges_;
  uint32_t max_id_ = 0;
  size_t vocab_size_ = 0;
  size_t num_merges_ = 0;
  uint32_t byte_id_[256];

  std::vector<VocabSlot> vocab_slots_;
  std::vector<uint8_t> vocab_keys_;
  uint64_t vocab_mask_ = 0;

  std::vector<MergeSlot> merge_slots_;
  int merge_shift_ = 64;
  uint64_t merge_mask_ = 0;

  std::vector<uint64_t> byte_pair_;  // 65536 entries: merge_find(byte_id_[a], byte_id_[b])

  std::vector<TrieNode> trie_;  // node 0 = root; empty when there are no added tokens
  bool added_first_[256];
  int added_single_first_ = -1;  // the only first byte of all added tokens, or -1
  size_t added_count_ = 0;
};

// Registers fastlm._C.ByteLevelBPE (defined in bind_bpe.cpp).
void register_bpe(pybind11::module_& m);

}  // namespace fastlm
