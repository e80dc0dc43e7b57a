#include "packer.h"

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>

#include <unistd.h>

#include "bpe.h"
#include "json_scan.h"
#include "pickle_index.h"

namespace fastlm {

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "the .pbin writer assumes a little-endian host");

namespace {

constexpr size_t kKeepSkipped = 10;

struct Fault {
  uint64_t doc;  // index into offsets/lengths
  size_t column;
  std::string reason;
};

struct Batch {
  uint64_t first_doc = 0, end_doc = 0;
  bool done = false;
  std::vector<char> token_bytes;        // native path: the batch's tokens, already token_size wide
  std::vector<uint64_t> doc_tokens;     // tokens per kept document (EOD included)
  std::vector<std::string> texts;       // external-encoder path: the extracted texts
  std::vector<Fault> faults;            // invalid documents (only the first when not skipping)
  uint64_t skipped = 0;
  std::exception_ptr error;
};

// Output file with a large buffer; every failure names the file.
class OutputFile {
 public:
  explicit OutputFile(const std::string& path) : path_(path) {
    f_ = std::fopen(path.c_str(), "wb");
    if (f_ == nullptr) throw InputError(path + ": cannot open for writing: " + std::strerror(errno));
    buffer_.resize(8u << 20);
    std::setvbuf(f_, buffer_.data(), _IOFBF, buffer_.size());
  }
  ~OutputFile() {
    if (f_ != nullptr) std::fclose(f_);
  }
  void write(const void* data, size_t n) {
    if (n != 0 && std::fwrite(data, 1, n, f_) != n) fail("write");
  }
  void write_at(uint64_t offset, const void* data, size_t n) {
    if (std::fseek(f_, static_cast<long>(offset), SEEK_SET) != 0) fail("seek");
    write(data, n);
  }
  void close() {
    if (std::fflush(f_) != 0) fail("flush");
    if (::fsync(::fileno(f_)) != 0) fail("fsync");
    if (std::fclose(f_) != 0) {
      f_ = nullptr;
      fail("close");
    }
    f_ = nullptr;
  }

 private:
  [[noreturn]] void fail(const char* what) {
    throw std::runtime_error(path_ + ": " + what + " failed: " + std::strerror(errno));
  }
  std::string path_;
  std::FILE* f_ = nullptr;
  std::vector<char> buffer_;
};

// Appends `ids` to `out` as little-endian integers of `token_size` bytes.
void append_tokens(const uint32_t* ids, size_t n, int token_size, std::vector<char>& out) {
  size_t old = out.size();
  out.resize(old + n * static_cast<size_t>(token_size));
  char* dst = out.data() + old;
  switch (token_size) {
    case 4:
      std::memcpy(dst, ids, n * 4);
      break;
    case 2:
      for (size_t i = 0; i < n; ++i) {
        uint16_t v = static_cast<uint16_t>(ids[i]);
        std::memcpy(dst + 2 * i, &v, 2);
      }
      break;
    default:
      for (size_t i = 0; i < n; ++i) dst[i] = static_cast<char>(static_cast<uint8_t>(ids[i]));
  }
}

// Document ids plus the end-of-document rule shared with Modalities: EOD is appended unless the
// document already ends with it; an empty document is EOD alone.
void finish_document(std::vector<uint32_t>& ids, uint32_t eod_id, uint32_t max_id, const std::string& src) {
  for (uint32_t id : ids) {
    if (id > max_id) {
      throw std::runtime_error(src + ": token id " + std::to_string(id) + " does not fit the token size");
    }
  }
  if (ids.empty() || ids.back() != eod_id) ids.push_back(eod_id);
}

}  // namespace

PackResult pack_jsonl(const PackConfig& config, const std::vector<uint64_t>& offsets,
                      const std::vector<uint64_t>& lengths, const ByteLevelBPE* bpe, const BatchEncoder* encoder,
                      const ProgressFn& progress) {
  if ((bpe == nullptr) == (encoder == nullptr)) throw std::invalid_argument("pack_jsonl: give bpe or encoder");
  if (offsets.size() != lengths.size()) throw std::invalid_argument("pack_jsonl: offsets/lengths differ in size");
  if (config.token_size != 1 && config.token_size != 2 && config.token_size != 4) {
    throw std::invalid_argument("token_size must be 1, 2 or 4, got " + std::to_string(config.token_size));
  }
  const uint32_t max_id = config.token_size == 4 ? 0xFFFFFFFFu : (1u << (8 * config.token_size)) - 1;
  if (config.eod_id > max_id) throw std::invalid_argument("eod id does not fit the token size");
  const JsonPath path(config.jq_pattern);
  InputFile src(config.src_path);
  for (size_t i = 0; i < offsets.size(); ++i) {
    if (offsets[i] + lengths[i] > src.size()) {
      throw InputError(config.src_path + ": the index places document " + std::to_string(i) + " at bytes " +
                       std::to_string(offsets[i]) + ".." + std::to_string(offsets[i] + lengths[i]) +
                       " but the file holds " + std::to_string(src.size()) +
                       " bytes. HINT: the index is stale; re-run fastlm data create_raw_index");
    }
  }

  // Cut the documents into batches of about batch_bytes of JSONL.
  std::vector<std::unique_ptr<Batch>> batches;
  for (uint64_t i = 0; i < offsets.size();) {
    auto b = std::make_unique<Batch>();
    b->first_doc = i;
    uint64_t bytes = 0;
    while (i < offsets.size() && (i == b->first_doc || bytes + lengths[i] <= config.batch_bytes)) bytes += lengths[i++];
    b->end_doc = i;
    batches.push_back(std::move(b));
  }
  const size_t num_batches = batches.size();
  const int num_threads = std::max(1, config.num_threads);
  const size_t max_in_flight = static_cast<size_t>(num_threads) * 4;

  std::mutex mu;
  std::condition_variable batch_done, slot_free;
  size_t next_to_write = 0;
  std::atomic<size_t> next_to_claim{0};
  std::atomic<bool> stop{false};

  auto process = [&](Batch& b, ByteLevelBPE::Cache* cache) {
    std::vector<char> line;
    std::string text;
    std::vector<uint32_t> ids;
    // Read the whole span once when the lines are contiguous (the usual case), else line by line.
    uint64_t span_begin = offsets[b.first_doc], span_end = span_begin, total = 0;
    bool contiguous = true;
    for (uint64_t d = b.first_doc; d < b.end_doc; ++d) {
      if (offsets[d] < span_end) contiguous = contiguous && offsets[d] >= span_begin;
      span_end = std::max(span_end, offsets[d] + lengths[d]);
      total += lengths[d];
    }
    contiguous = contiguous && span_end - span_begin <= 2 * total + (64u << 10);
    // Every document must end at a line end: the byte after it is read too and must be '\n' (or the file
    // ends there). Checked here, in the one pass over the data, rather than in a pass of its own.
    std::vector<char> span;
    if (contiguous) {
      span.resize(std::min<uint64_t>(span_end + 1, src.size()) - span_begin);
      src.read_at(span_begin, span.data(), span.size());
    }
    for (uint64_t d = b.first_doc; d < b.end_doc && !stop.load(std::memory_order_relaxed); ++d) {
      const uint64_t end = offsets[d] + lengths[d];
      const bool at_eof = end == src.size();
      std::string_view view;
      char after;
      if (contiguous) {
        view = std::string_view(span.data() + (offsets[d] - span_begin), lengths[d]);
        after = at_eof ? '\n' : span[end - span_begin];
      } else {
        line.resize(lengths[d] + (at_eof ? 0 : 1));
        src.read_at(offsets[d], line.data(), line.size());
        view = std::string_view(line.data(), lengths[d]);
        after = at_eof ? '\n' : line.back();
      }
      if (after != '\n') {
        throw IndexMismatch(config.src_path + ": index entry " + std::to_string(d) + " (offset " +
                            std::to_string(offsets[d]) + ", length " + std::to_string(lengths[d]) +
                            ") does not end at a line end");
      }
      JsonResult r = scan_json_line(view, &path, &text);
      if (!r.ok()) {
        ++b.skipped;
        if (b.faults.size() < kKeepSkipped) b.faults.push_back({d, r.column, r.message});
        if (!config.skip_invalid) return;
        continue;
      }
      if (bpe != nullptr) {
        ids.clear();
        bpe->encode(text, ids, *cache);
        finish_document(ids, config.eod_id, max_id, config.src_path);
        append_tokens(ids.data(), ids.size(), config.token_size, b.token_bytes);
        b.doc_tokens.push_back(ids.size());
      } else {
        b.texts.push_back(std::move(text));
        text = std::string();
      }
    }
  };

  auto worker = [&]() {
    std::unique_ptr<ByteLevelBPE::Cache> cache = bpe != nullptr ? bpe->make_cache() : nullptr;
    while (!stop.load()) {
      size_t k = next_to_claim.fetch_add(1);
      if (k >= num_batches) return;
      {
        std::unique_lock<std::mutex> lock(mu);
        slot_free.wait(lock, [&] { return stop.load() || k < next_to_write + max_in_flight; });
        if (stop.load()) return;
      }
      Batch& b = *batches[k];
      try {
        process(b, cache.get());
      } catch (...) {
        b.error = std::current_exception();
      }
      {
        std::lock_guard<std::mutex> lock(mu);
        b.done = true;
      }
      batch_done.notify_all();
    }
  };

  PackResult result;
  std::vector<std::thread> threads;
  auto shutdown = [&]() {
    {
      std::lock_guard<std::mutex> lock(mu);
      stop = true;
    }
    slot_free.notify_all();
    for (auto& t : threads) t.join();
    threads.clear();
  };

  try {
    OutputFile out(config.out_path);
    const char zeros[12] = {0};
    out.write(zeros, sizeof(zeros));  // the header is written last, when the data length is known
    for (int t = 0; t < num_threads; ++t) threads.emplace_back(worker);

    std::vector<uint64_t> doc_bytes;  // byte length of every written document, for the index
    std::vector<uint32_t> ids;
    std::vector<uint64_t> counts;
    std::vector<char> encoded;
    uint64_t data_bytes = 0;
    for (size_t k = 0; k < num_batches; ++k) {
      Batch& b = *batches[k];
      {
        std::unique_lock<std::mutex> lock(mu);
        batch_done.wait(lock, [&] { return b.done; });
      }
      if (b.error) std::rethrow_exception(b.error);
      if (!config.skip_invalid && !b.faults.empty()) {
        const Fault& f = b.faults.front();
        throw InputError(config.src_path + ":" + std::to_string(src.line_of(offsets[f.doc])) + ":" +
                         std::to_string(f.column) + ": " + f.reason +
                         "\nHINT: fix or remove that line, or set skip_invalid (--skip-invalid) to skip "
                         "invalid documents");
      }
      result.skipped += b.skipped;
      for (const Fault& f : b.faults) {
        if (result.first_skipped.size() < kKeepSkipped) {
          result.first_skipped.emplace_back(src.line_of(offsets[f.doc]),
                                            "column " + std::to_string(f.column) + ": " + f.reason);
        }
      }
      const std::vector<char>* bytes = &b.token_bytes;
      if (encoder != nullptr) {
        ids.clear();
        counts.clear();
        (*encoder)(b.texts, ids, counts);
        if (counts.size() != b.texts.size()) throw std::runtime_error("encoder returned a wrong number of texts");
        encoded.clear();
        size_t pos = 0;
        std::vector<uint32_t> doc;
        for (uint64_t c : counts) {
          doc.assign(ids.begin() + static_cast<long>(pos), ids.begin() + static_cast<long>(pos + c));
          pos += c;
          finish_document(doc, config.eod_id, max_id, config.src_path);
          append_tokens(doc.data(), doc.size(), config.token_size, encoded);
          b.doc_tokens.push_back(doc.size());
        }
        bytes = &encoded;
      }
      out.write(bytes->data(), bytes->size());
      data_bytes += bytes->size();
      for (uint64_t n : b.doc_tokens) {
        doc_bytes.push_back(n * static_cast<uint64_t>(config.token_size));
        result.tokens += n;
      }
      result.documents += b.doc_tokens.size();
      for (uint64_t d = b.first_doc; d < b.end_doc; ++d) result.bytes_read += lengths[d] + 1;
      batches[k].reset();  // frees the batch's memory
      {
        std::lock_guard<std::mutex> lock(mu);
        next_to_write = k + 1;
      }
      slot_free.notify_all();
      if (progress && !progress(result.bytes_read, result.documents, result.tokens)) throw Aborted();
    }
    shutdown();

    // The index: (byte offset relative to the data segment, byte length) per document, streamed.
    PairListPickler pickler([&](const char* data, size_t n) { out.write(data, n); });
    uint64_t offset = 0;
    for (uint64_t n : doc_bytes) {
      pickler.add(offset, n);
      offset += n;
    }
    pickler.finish();
    char header[12];
    uint64_t len = data_bytes;
    uint32_t ts = static_cast<uint32_t>(config.token_size);
    std::memcpy(header, &len, 8);
    std::memcpy(header + 8, &ts, 4);
    out.write_at(0, header, sizeof(header));
    out.close();
  } catch (...) {
    shutdown();
    throw;
  }
  return result;
}

}  // namespace fastlm
