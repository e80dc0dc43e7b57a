#include "common.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <vector>

namespace fastlm {

InputFile::InputFile(const std::string& path) : path_(path) {
  fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd_ < 0) throw InputError(path + ": cannot open for reading: " + std::strerror(errno));
  struct stat st;
  if (::fstat(fd_, &st) != 0) {
    int err = errno;
    ::close(fd_);
    throw InputError(path + ": cannot stat: " + std::strerror(err));
  }
  if (S_ISDIR(st.st_mode)) {
    ::close(fd_);
    throw InputError(path + ": is a directory, expected a JSONL file");
  }
  size_ = static_cast<uint64_t>(st.st_size);
#ifdef POSIX_FADV_SEQUENTIAL
  ::posix_fadvise(fd_, 0, 0, POSIX_FADV_SEQUENTIAL);
#endif
}

InputFile::~InputFile() {
  if (fd_ >= 0) ::close(fd_);
}

void InputFile::read_at(uint64_t offset, char* dst, uint64_t n) const {
  uint64_t done = 0;
  while (done < n) {
    ssize_t r = ::pread(fd_, dst + done, n - done, static_cast<off_t>(offset + done));
    if (r < 0) {
      if (errno == EINTR) continue;
      throw InputError(path_ + ": read failed at byte " + std::to_string(offset + done) + ": " +
                       std::strerror(errno));
    }
    if (r == 0) {
      throw InputError(path_ + ": file ended at byte " + std::to_string(offset + done) + " but " +
                       std::to_string(offset + n) +
                       " bytes were expected (was it changed after indexing? HINT: re-run fastlm data "
                       "create_raw_index)");
    }
    done += static_cast<uint64_t>(r);
  }
}

uint64_t InputFile::line_of(uint64_t offset) const {
  std::vector<char> buf(1 << 20);
  uint64_t line = 1, pos = 0;
  offset = std::min(offset, size_);
  while (pos < offset) {
    uint64_t n = std::min<uint64_t>(buf.size(), offset - pos);
    read_at(pos, buf.data(), n);
    line += std::count(buf.data(), buf.data() + n, '\n');
    pos += n;
  }
  return line;
}

std::string with_commas(uint64_t v) {
  std::string s = std::to_string(v);
  for (int i = static_cast<int>(s.size()) - 3; i > 0; i -= 3) s.insert(static_cast<size_t>(i), ",");
  return s;
}

}  // namespace fastlm
