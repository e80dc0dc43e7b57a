#include "line_index.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
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

namespace {

// A read-only memory map of a whole file (empty files map nothing).
class MappedFile {
 public:
  explicit MappedFile(const std::string& path) {
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) throw InputError(path + ": cannot open for reading: " + std::strerror(errno));
    struct stat st;
    if (::fstat(fd, &st) != 0 || S_ISDIR(st.st_mode)) {
      ::close(fd);
      throw InputError(path + ": not a readable file");
    }
    size_ = static_cast<size_t>(st.st_size);
    if (size_ > 0) {
      void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
      if (p == MAP_FAILED) {
        int err = errno;
        ::close(fd);
        throw InputError(path + ": cannot map: " + std::strerror(err));
      }
      data_ = static_cast<const char*>(p);
      ::madvise(p, size_, MADV_SEQUENTIAL | MADV_WILLNEED);
    }
    ::close(fd);
  }
  ~MappedFile() {
    if (data_ != nullptr) ::munmap(const_cast<char*>(data_), size_);
  }
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  const char* data() const { return data_; }
  size_t size() const { return size_; }
  // Drops the pages of [begin, end) from this process (they stay in the page cache), so that indexing a
  // file larger than memory does not show up as resident memory.
  void release(size_t begin, size_t end) const {
    const size_t page = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
    size_t first = (begin + page - 1) / page * page, last = end / page * page;
    if (last > first) ::madvise(const_cast<char*>(data_) + first, last - first, MADV_DONTNEED);
  }

 private:
  const char* data_ = nullptr;
  size_t size_ = 0;
};

}  // namespace

RawIndex build_raw_index(const std::string& path, int num_threads, bool skip_invalid,
                         const ProgressFn& progress, uint64_t chunk_bytes) {
  MappedFile file(path);
  const char* buf = file.data();
  const size_t size = file.size();
  num_threads = std::max(1, num_threads);

  // A UTF-8 byte-order mark is not part of the first line.
  size_t begin = (size >= 3 && std::memcmp(buf, "\xEF\xBB\xBF", 3) == 0) ? 3 : 0;

  // Cut the file into chunks of whole lines, at least a few per thread so the load balances.
  chunk_bytes = std::max<uint64_t>(1, std::min<uint64_t>(chunk_bytes, size / (4 * num_threads) + 1));
  std::vector<size_t> cuts{begin};
  while (cuts.back() < size) {
    size_t guess = cuts.back() + chunk_bytes;
    if (guess >= size) {
      cuts.push_back(size);
      break;
    }
    const char* nl = static_cast<const char*>(std::memchr(buf + guess, '\n', size - guess));
    cuts.push_back(nl != nullptr ? static_cast<size_t>(nl - buf) + 1 : size);
  }
  const size_t num_chunks = cuts.size() - 1;

  std::vector<PartResult> parts(num_chunks);
  std::atomic<size_t> next{0};
  std::atomic<size_t> first_faulty{num_chunks};  // chunks after a fault need not finish (no skipping)
  std::atomic<uint64_t> bytes_done{0};
  std::atomic<int> running{num_threads};
  std::mutex mu;
  std::condition_variable finished;
  std::atomic<bool> stop{false};
  std::exception_ptr error;

  auto worker = [&] {
    try {
      for (size_t k; !stop.load() && (k = next.fetch_add(1)) < num_chunks;) {
        if (k > first_faulty.load()) continue;
        scan_part(buf, cuts[k], cuts[k + 1], 0, skip_invalid, &parts[k]);
        file.release(cuts[k], cuts[k + 1]);
        if (!skip_invalid && !parts[k].faults.empty()) {
          size_t f = first_faulty.load();
          while (k < f && !first_faulty.compare_exchange_weak(f, k)) {
          }
        }
        bytes_done += cuts[k + 1] - cuts[k];
      }
    } catch (...) {
      std::lock_guard<std::mutex> lock(mu);
      error = std::current_exception();
    }
    {
      std::lock_guard<std::mutex> lock(mu);
      --running;
    }
    finished.notify_all();
  };
  std::vector<std::thread> threads;
  for (int t = 0; t < num_threads; ++t) threads.emplace_back(worker);
  bool aborted = false;
  {
    std::unique_lock<std::mutex> lock(mu);
    while (running.load() > 0) {
      finished.wait_for(lock, std::chrono::milliseconds(100));
      if (progress && !aborted) {
        lock.unlock();
        if (!progress(bytes_done.load(), 0, 0)) {
          aborted = true;
          stop = true;
        }
        lock.lock();
      }
    }
  }
  for (auto& th : threads) th.join();
  if (error) std::rethrow_exception(error);
  if (aborted) throw Aborted();

  RawIndex index;
  size_t total_docs = 0;
  for (auto& part : parts) total_docs += part.offsets.size();
  index.offsets.reserve(total_docs);
  index.lengths.reserve(total_docs);
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
  if (progress && !progress(size, index.offsets.size(), 0)) throw Aborted();
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
