#include "line_index.h"

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <thread>

#include "json_scan.h"
#include "pickle_index.h"

namespace fastlm {

namespace {

constexpr size_t kKeepSkipped = 10;

struct PartResult {
  std::vector<uint64_t> offsets, lengths;
  uint64_t lines = 0, blank = 0, skipped = 0;
  // (local 0-based line, column, reason) of invalid lines, in order (at most kKeepSkipped + the first).
  std::vector<std::tuple<uint64_t, size_t, std::string>> faults;
};

// Scans the lines of buf[begin, end): each ends with '\n', except the file's last line, which may not.
void scan_part(const char* buf, size_t begin, size_t end, uint64_t file_offset, bool skip_invalid,
               PartResult* out) {
  size_t pos = begin;
  while (pos < end) {
    const char* nl = static_cast<const char*>(std::memchr(buf + pos, '\n', end - pos));
    size_t line_end = nl != nullptr ? static_cast<size_t>(nl - buf) : end;
    std::string_view line(buf + pos, line_end - pos);
    uint64_t local_line = out->lines++;
    if (is_blank_line(line)) {
      ++out->blank;
    } else {
      JsonResult r = scan_json_line(line, nullptr, nullptr);
      if (r.ok()) {
        out->offsets.push_back(file_offset + pos);
        out->lengths.push_back(line.size());
      } else {
        ++out->skipped;
        if (out->faults.size() <= kKeepSkipped) out->faults.emplace_back(local_line, r.column, r.message);
        if (!skip_invalid) return;  // the first fault stops everything; later lines do not matter
      }
    }
    pos = line_end + 1;
  }
}

}  // namespace

RawIndex build_raw_index(const std::string& path, int num_threads, bool skip_invalid,
                         const ProgressFn& progress, uint64_t block_bytes) {
  InputFile file(path);
  RawIndex index;
  num_threads = std::max(1, num_threads);
  const uint64_t size = file.size();
  std::vector<char> buf;
  uint64_t block_start = 0;  // file offset of buf[0]

  // A UTF-8 byte-order mark is not part of the first line.
  if (size >= 3) {
    char bom[3];
    file.read_at(0, bom, 3);
    if (std::memcmp(bom, "\xEF\xBB\xBF", 3) == 0) block_start = 3;
  }

  while (block_start < size) {
    uint64_t want = std::min<uint64_t>(block_bytes, size - block_start);
    buf.resize(want);
    file.read_at(block_start, buf.data(), want);
    size_t usable = want;  // bytes of whole lines in buf
    if (block_start + want < size) {
      const char* last_nl = static_cast<const char*>(memrchr(buf.data(), '\n', want));
      while (last_nl == nullptr) {  // one line longer than the block: grow until it ends
        uint64_t more = std::min<uint64_t>(want, size - block_start - buf.size());
        size_t old = buf.size();
        buf.resize(old + more);
        file.read_at(block_start + old, buf.data() + old, more);
        last_nl = static_cast<const char*>(memrchr(buf.data() + old, '\n', more));
        if (block_start + buf.size() >= size) break;
      }
      usable = last_nl != nullptr ? static_cast<size_t>(last_nl - buf.data()) + 1 : buf.size();
    } else {
      usable = buf.size();
    }

    // Split the whole lines between threads at line ends.
    std::vector<size_t> cuts{0};
    for (int t = 1; t < num_threads; ++t) {
      size_t guess = usable * static_cast<size_t>(t) / static_cast<size_t>(num_threads);
      guess = std::max(guess, cuts.back());
      const char* nl = guess < usable
                           ? static_cast<const char*>(std::memchr(buf.data() + guess, '\n', usable - guess))
                           : nullptr;
      cuts.push_back(nl != nullptr ? static_cast<size_t>(nl - buf.data()) + 1 : usable);
    }
    cuts.push_back(usable);
    std::vector<PartResult> parts(cuts.size() - 1);
    std::vector<std::thread> threads;
    for (size_t t = 0; t + 1 < cuts.size(); ++t) {
      size_t b = cuts[t], e = cuts[t + 1];
      if (b >= e) continue;
      auto work = [&, b, e, t] { scan_part(buf.data(), b, e, block_start, skip_invalid, &parts[t]); };
      if (t + 2 == cuts.size()) work(); else threads.emplace_back(work);
    }
    for (auto& th : threads) th.join();

    for (auto& part : parts) {
      for (auto& [local, column, reason] : part.faults) {
        uint64_t line_no = index.lines + local + 1;
        if (!skip_invalid) {
          throw InputError(path + ":" + std::to_string(line_no) + ":" + std::to_string(column) + ": " + reason +
                           "\nHINT: fix or remove that line, or pass --skip-invalid to skip invalid lines");
        }
        if (index.first_skipped.size() < kKeepSkipped) {
          index.first_skipped.emplace_back(line_no, "column " + std::to_string(column) + ": " + reason);
        }
      }
      index.offsets.insert(index.offsets.end(), part.offsets.begin(), part.offsets.end());
      index.lengths.insert(index.lengths.end(), part.lengths.begin(), part.lengths.end());
      index.lines += part.lines;
      index.blank_lines += part.blank;
      index.skipped_lines += part.skipped;
    }
    block_start += usable;
    if (progress && !progress(block_start, index.offsets.size(), 0)) throw Aborted();
  }
  return index;
}

void write_raw_index_file(const RawIndex& index, const std::string& path) {
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr) throw InputError(path + ": cannot open for writing: " + std::strerror(errno));
  bool ok = true;
  try {
    PairListPickler pickler([&](const char* data, size_t n) { ok = ok && std::fwrite(data, 1, n, f) == n; });
    for (size_t i = 0; i < index.offsets.size(); ++i) pickler.add(index.offsets[i], index.lengths[i]);
    pickler.finish();
  } catch (...) {
    std::fclose(f);
    throw;
  }
  ok = std::fflush(f) == 0 && ok;
  ok = std::fclose(f) == 0 && ok;
  if (!ok) throw std::runtime_error(path + ": write failed: " + std::strerror(errno));
}

}  // namespace fastlm
