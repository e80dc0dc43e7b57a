// Pickled (offset, length) index lists: a byte-exact writer and a non-executing parser.
//
// The writer replays the sequence of writes CPython's C pickler (Modules/_pickle.c) makes for a list of
// int 2-tuples at protocol 4:
//   PROTO 4 (outside any frame) | ] MEMOIZE | batches of items | STOP
//   batches: a one-item list is `pair APPEND`; otherwise every batch of up to 1000 items is
//   `MARK pair... APPENDS`, including a trailing batch of a single item (unlike pure-Python pickle.py).
//   pair: int int TUPLE2 MEMOIZE; int: BININT1 (<256) | BININT2 (<65536) | BININT (<2^31) | LONG1.
// Framing: the first write after a commit opens a frame; at the start of every save() (list, each tuple,
// each int) a frame holding >= 64 KiB is committed. A committed frame gets a FRAME header only when it holds
// >= 4 bytes (so the empty list, `] MEMOIZE STOP`, has no FRAME). Frames may end between the two ints of a
// tuple or right after a MARK.
#include "pickle_index.h"

#include <pybind11/numpy.h>

#include <cstdio>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <unordered_map>

namespace py = pybind11;

namespace fastlm {

namespace {

constexpr size_t kFrameSizeTarget = 64 * 1024;  // CPython's FRAME_SIZE_TARGET
constexpr size_t kFrameSizeMin = 4;             // CPython's FRAME_SIZE_MIN
constexpr uint32_t kBatchSize = 1000;           // CPython's BATCHSIZE

// Pickle opcodes used here.
constexpr uint8_t MARK = '(', STOP = '.', BININT = 'J', BININT1 = 'K', BININT2 = 'M', LONG1 = 0x8a,
                  EMPTY_LIST = ']', APPEND = 'a', APPENDS = 'e', TUPLE = 't', TUPLE2 = 0x86, BINPUT = 'q',
                  LONG_BINPUT = 'r', BINGET = 'h', LONG_BINGET = 'j', MEMOIZE = 0x94, PROTO = 0x80,
                  FRAME = 0x95;

void put_le(char* out, uint64_t v, int n) {
  for (int i = 0; i < n; ++i) out[i] = static_cast<char>((v >> (8 * i)) & 0xff);
}

uint64_t get_le(const uint8_t* in, int n) {
  uint64_t v = 0;
  for (int i = 0; i < n; ++i) v |= static_cast<uint64_t>(in[i]) << (8 * i);
  return v;
}

}  // namespace

// ---------------------------------------------------------------------------------------------- writer

PairListPickler::PairListPickler(std::function<void(const char* data, size_t size)> sink)
    : sink_(std::move(sink)) {
  frame_.reserve(kFrameSizeTarget + 64);
  const char header[2] = {static_cast<char>(PROTO), 4};
  sink_(header, 2);  // written before framing is switched on
  opcode_boundary();  // save(list)
  write_op(EMPTY_LIST);
  write_op(static_cast<char>(MEMOIZE));
}

uint64_t PairListPickler::count() const { return count_; }

void PairListPickler::write(const char* data, size_t size) {
  frame_open_ = true;
  frame_.append(data, size);
}

void PairListPickler::commit_frame() {
  if (!frame_open_) return;
  if (frame_.size() >= kFrameSizeMin) {
    char header[9];
    header[0] = static_cast<char>(FRAME);
    put_le(header + 1, frame_.size(), 8);
    sink_(header, sizeof(header));
  }
  sink_(frame_.data(), frame_.size());
  frame_.clear();
  frame_open_ = false;
}

void PairListPickler::opcode_boundary() {
  if (frame_open_ && frame_.size() >= kFrameSizeTarget) commit_frame();
}

void PairListPickler::write_uint(uint64_t v) {
  opcode_boundary();  // save(int)
  char buf[11];  // LONG1: opcode, length, up to 9 bytes
  if (v < 0x100) {
    buf[0] = BININT1;
    put_le(buf + 1, v, 1);
    write(buf, 2);
  } else if (v < 0x10000) {
    buf[0] = BININT2;
    put_le(buf + 1, v, 2);
    write(buf, 3);
  } else if (v < 0x80000000ULL) {  // BININT is signed
    buf[0] = BININT;
    put_le(buf + 1, v, 4);
    write(buf, 5);
  } else {
    // Two's complement little-endian; CPython always reserves bit_length/8 + 1 bytes for a positive int,
    // so there is room for a zero sign bit.
    int bits = 64 - __builtin_clzll(v);
    int n = bits / 8 + 1;
    buf[0] = static_cast<char>(LONG1);
    buf[1] = static_cast<char>(n);
    std::memset(buf + 2, 0, 9);
    put_le(buf + 2, v, n > 8 ? 8 : n);
    write(buf, 2 + n);
  }
}

void PairListPickler::write_pair(uint64_t first, uint64_t second) {
  opcode_boundary();  // save(tuple)
  write_uint(first);
  write_uint(second);
  const char tail[2] = {static_cast<char>(TUPLE2), static_cast<char>(MEMOIZE)};
  write(tail, 2);
}

void PairListPickler::add(uint64_t first, uint64_t second) {
  if (finished_) throw std::logic_error("PairListPickler::add() called after finish()");
  if (count_ == 0) {  // wait: a list of exactly one item has no MARK
    first_pending_[0] = first;
    first_pending_[1] = second;
    count_ = 1;
    return;
  }
  if (count_ == 1) {
    write_op(MARK);
    write_pair(first_pending_[0], first_pending_[1]);
    in_batch_ = 1;
  }
  if (in_batch_ == 0) write_op(MARK);
  write_pair(first, second);
  if (++in_batch_ == kBatchSize) {
    write_op(APPENDS);
    in_batch_ = 0;
  }
  ++count_;
}

void PairListPickler::finish() {
  if (finished_) throw std::logic_error("PairListPickler::finish() called twice");
  if (count_ == 1) {
    write_pair(first_pending_[0], first_pending_[1]);
    write_op(APPEND);
  } else if (in_batch_ > 0) {
    write_op(APPENDS);
  }
  write_op(STOP);
  commit_frame();
  finished_ = true;
}

// ---------------------------------------------------------------------------------------------- parser

namespace {

std::string opcode_name(uint8_t op) {
  static const std::unordered_map<uint8_t, const char*> names = {
      {'(', "MARK"}, {'.', "STOP"}, {'0', "POP"}, {'1', "POP_MARK"}, {'2', "DUP"}, {'F', "FLOAT"},
      {'I', "INT"}, {'J', "BININT"}, {'K', "BININT1"}, {'L', "LONG"}, {'M', "BININT2"}, {'N', "NONE"},
      {'P', "PERSID"}, {'Q', "BINPERSID"}, {'R', "REDUCE"}, {'S', "STRING"}, {'T', "BINSTRING"},
      {'U', "SHORT_BINSTRING"}, {'V', "UNICODE"}, {'X', "BINUNICODE"}, {'a', "APPEND"}, {'b', "BUILD"},
      {'c', "GLOBAL"}, {'d', "DICT"}, {'}', "EMPTY_DICT"}, {'e', "APPENDS"}, {'g', "GET"},
      {'h', "BINGET"}, {'i', "INST"}, {'j', "LONG_BINGET"}, {'l', "LIST"}, {']', "EMPTY_LIST"},
      {'o', "OBJ"}, {'p', "PUT"}, {'q', "BINPUT"}, {'r', "LONG_BINPUT"}, {'s', "SETITEM"}, {'t', "TUPLE"},
      {')', "EMPTY_TUPLE"}, {'u', "SETITEMS"}, {'G', "BINFLOAT"}, {0x80, "PROTO"}, {0x81, "NEWOBJ"},
      {0x82, "EXT1"}, {0x83, "EXT2"}, {0x84, "EXT4"}, {0x85, "TUPLE1"}, {0x86, "TUPLE2"},
      {0x87, "TUPLE3"}, {0x88, "NEWTRUE"}, {0x89, "NEWFALSE"}, {0x8a, "LONG1"}, {0x8b, "LONG4"},
      {'B', "BINBYTES"}, {'C', "SHORT_BINBYTES"}, {0x8c, "SHORT_BINUNICODE"}, {0x8d, "BINUNICODE8"},
      {0x8e, "BINBYTES8"}, {0x8f, "EMPTY_SET"}, {0x90, "ADDITEMS"}, {0x91, "FROZENSET"},
      {0x92, "NEWOBJ_EX"}, {0x93, "STACK_GLOBAL"}, {0x94, "MEMOIZE"}, {0x95, "FRAME"},
      {0x96, "BYTEARRAY8"}, {0x97, "NEXT_BUFFER"}, {0x98, "READONLY_BUFFER"}};
  char hex[8];
  std::snprintf(hex, sizeof(hex), "0x%02x", op);
  auto it = names.find(op);
  return it == names.end() ? std::string("unknown opcode ") + hex
                           : std::string("opcode ") + it->second + " (" + hex + ")";
}

class PairListParser {
 public:
  PairListParser(const uint8_t* data, size_t size, std::vector<uint64_t>& first, std::vector<uint64_t>& second)
      : p_(data), n_(size), first_(first), second_(second) {}

  void run();

 private:
  enum class Kind : uint8_t { List, Int, Pair };
  struct Item {
    Kind kind;
    uint64_t a, b;
  };

  [[noreturn]] void fail(const std::string& what) const {
    throw std::runtime_error("invalid pickled index at byte " + std::to_string(op_start_) + " of " +
                             std::to_string(n_) + ": " + what);
  }
  const uint8_t* take(size_t k);  // the next k argument bytes of the current opcode
  size_t stack_base() const { return marks_.empty() ? 0 : marks_.back(); }
  Item pop(const char* op);
  void push_int(uint64_t v) { stack_.push_back({Kind::Int, v, 0}); }
  void memo_put(uint64_t key);
  void memo_get(uint64_t key);
  void append_pair(const Item& it, const char* op);
  static const char* kind_name(Kind k) {
    return k == Kind::List ? "a list" : k == Kind::Int ? "an int" : "a pair";
  }

  const uint8_t* p_;
  size_t n_;
  size_t pos_ = 0;
  size_t op_start_ = 0;
  size_t frame_end_ = 0;  // end of the open frame; 0 when outside a frame
  bool have_list_ = false;
  std::vector<Item> stack_;
  std::vector<size_t> marks_;  // stack_ sizes at each MARK (CPython's metastack)
  std::vector<Item> memo_dense_;                    // memo keys 0..size-1 (what Python writes)
  std::unordered_map<uint64_t, Item> memo_sparse_;  // any other keys (still valid pickle)
  std::vector<uint64_t>& first_;
  std::vector<uint64_t>& second_;
};

const uint8_t* PairListParser::take(size_t k) {
  if (k > n_ - pos_) {
    fail(opcode_name(p_[op_start_]) + " needs " + std::to_string(k) + " argument bytes but the data ends after " +
         std::to_string(n_ - pos_) + " (truncated pickle)");
  }
  if (frame_end_ != 0 && pos_ + k > frame_end_) {
    fail(opcode_name(p_[op_start_]) + " runs past the end of its frame at byte " + std::to_string(frame_end_));
  }
  const uint8_t* out = p_ + pos_;
  pos_ += k;
  return out;
}

PairListParser::Item PairListParser::pop(const char* op) {
  if (stack_.size() <= stack_base()) fail(std::string(op) + " on an empty stack");
  Item it = stack_.back();
  stack_.pop_back();
  return it;
}

void PairListParser::memo_put(uint64_t key) {
  if (stack_.size() <= stack_base()) fail("memo store on an empty stack");
  const Item& top = stack_.back();
  if (key < memo_dense_.size()) {
    memo_dense_[key] = top;
  } else if (key == memo_dense_.size()) {
    memo_dense_.push_back(top);
    for (auto it = memo_sparse_.find(memo_dense_.size()); it != memo_sparse_.end();
         it = memo_sparse_.find(memo_dense_.size())) {
      memo_dense_.push_back(it->second);
      memo_sparse_.erase(it);
    }
  } else {
    memo_sparse_[key] = top;
  }
}

void PairListParser::memo_get(uint64_t key) {
  const Item* found = nullptr;
  if (key < memo_dense_.size()) {
    found = &memo_dense_[key];
  } else {
    auto it = memo_sparse_.find(key);
    if (it != memo_sparse_.end()) found = &it->second;
  }
  if (found == nullptr) fail("memo key " + std::to_string(key) + " is read but was never stored");
  if (found->kind == Kind::List) fail("memo key " + std::to_string(key) + " refers to the list itself");
  stack_.push_back(*found);
}

void PairListParser::append_pair(const Item& it, const char* op) {
  if (it.kind != Kind::Pair) fail(std::string(op) + " of " + kind_name(it.kind) + ", expected an (int, int) pair");
  first_.push_back(it.a);
  second_.push_back(it.b);
}

void PairListParser::run() {
  if (n_ < 2 || p_[0] != PROTO) {
    fail(n_ == 0 ? std::string("empty data, expected PROTO")
                 : "expected PROTO (0x80) at the start, found " + opcode_name(p_[0]));
  }
  if (p_[1] < 2 || p_[1] > 5) {
    op_start_ = 1;
    fail("unsupported pickle protocol " + std::to_string(p_[1]) + ", expected 2..5");
  }
  pos_ = 2;
  // Python writes about 10 bytes per pair: reserving avoids most regrowth of the outputs and the memo.
  first_.reserve(first_.size() + n_ / 10);
  second_.reserve(second_.size() + n_ / 10);
  memo_dense_.reserve(n_ / 10 + 1);
  for (;;) {
    if (frame_end_ != 0 && pos_ == frame_end_) frame_end_ = 0;
    op_start_ = pos_;
    if (pos_ >= n_) fail("the data ends without STOP (truncated pickle)");
    const uint8_t op = p_[pos_++];
    switch (op) {
      case FRAME: {
        if (frame_end_ != 0) fail("FRAME inside the frame that ends at byte " + std::to_string(frame_end_));
        uint64_t len = get_le(take(8), 8);
        if (len > n_ - pos_) {
          fail("FRAME of " + std::to_string(len) + " bytes but only " + std::to_string(n_ - pos_) +
               " bytes follow (truncated pickle)");
        }
        frame_end_ = len == 0 ? 0 : pos_ + len;
        break;
      }
      case BININT1:
        push_int(get_le(take(1), 1));
        break;
      case BININT2:
        push_int(get_le(take(2), 2));
        break;
      case BININT: {
        uint64_t v = get_le(take(4), 4);
        if (v & 0x80000000ULL) {
          fail("negative int " + std::to_string(static_cast<int32_t>(static_cast<uint32_t>(v))));
        }
        push_int(v);
        break;
      }
      case LONG1: {
        size_t len = *take(1);
        const uint8_t* b = take(len);
        if (len > 0 && (b[len - 1] & 0x80)) fail("negative int (LONG1 of " + std::to_string(len) + " bytes)");
        for (size_t i = 8; i < len; ++i) {
          if (b[i] != 0) fail("int of " + std::to_string(len) + " bytes does not fit in 64 bits");
        }
        push_int(get_le(b, len < 8 ? static_cast<int>(len) : 8));
        break;
      }
      case EMPTY_LIST:
        if (have_list_ || !stack_.empty() || !marks_.empty()) fail("a nested list, expected (int, int) pairs");
        have_list_ = true;
        stack_.push_back({Kind::List, 0, 0});
        break;
      case MARK:
        marks_.push_back(stack_.size());
        break;
      case TUPLE2: {
        Item b = pop("TUPLE2");
        Item a = pop("TUPLE2");
        if (a.kind != Kind::Int || b.kind != Kind::Int) {
          fail(std::string("a tuple of ") + kind_name(a.kind) + " and " + kind_name(b.kind) + ", expected two ints");
        }
        stack_.push_back({Kind::Pair, a.a, b.a});
        break;
      }
      case TUPLE: {
        if (marks_.empty()) fail("TUPLE without MARK");
        size_t base = marks_.back();
        marks_.pop_back();
        size_t k = stack_.size() - base;
        if (k != 2 || stack_[base].kind != Kind::Int || stack_[base + 1].kind != Kind::Int) {
          fail("a tuple of " + std::to_string(k) + " items, expected two ints");
        }
        Item pair{Kind::Pair, stack_[base].a, stack_[base + 1].a};
        stack_.resize(base);
        stack_.push_back(pair);
        break;
      }
      case APPEND: {
        Item it = pop("APPEND");
        if (stack_.size() <= stack_base() || stack_.back().kind != Kind::List) fail("APPEND without a list");
        append_pair(it, "APPEND");
        break;
      }
      case APPENDS: {
        if (marks_.empty()) fail("APPENDS without MARK");
        size_t base = marks_.back();
        marks_.pop_back();
        if (base == 0 || base <= stack_base() || stack_[base - 1].kind != Kind::List) fail("APPENDS without a list");
        for (size_t i = base; i < stack_.size(); ++i) append_pair(stack_[i], "APPENDS");
        stack_.resize(base);
        break;
      }
      case MEMOIZE:
        memo_put(memo_dense_.size() + memo_sparse_.size());
        break;
      case BINPUT:
        memo_put(get_le(take(1), 1));
        break;
      case LONG_BINPUT:
        memo_put(get_le(take(4), 4));
        break;
      case BINGET:
        memo_get(get_le(take(1), 1));
        break;
      case LONG_BINGET:
        memo_get(get_le(take(4), 4));
        break;
      case STOP:
        if (!marks_.empty() || stack_.size() != 1 || stack_[0].kind != Kind::List) {
          fail("STOP with " + std::to_string(stack_.size()) + " stack items and " + std::to_string(marks_.size()) +
               " open MARKs, expected just the list");
        }
        if (pos_ != n_) {
          op_start_ = pos_;
          fail(std::to_string(n_ - pos_) + " trailing bytes after STOP");
        }
        return;
      default:
        fail("found " + opcode_name(op) + ", which a list of (int, int) pairs never contains");
    }
  }
}

// Hands a vector to numpy without a copy: the array owns it through a capsule.
py::array_t<uint64_t> to_numpy(std::vector<uint64_t>&& v) {
  auto* owned = new std::vector<uint64_t>(std::move(v));
  py::capsule free_when_done(owned, [](void* ptr) { delete static_cast<std::vector<uint64_t>*>(ptr); });
  return py::array_t<uint64_t>({owned->size()}, {sizeof(uint64_t)}, owned->data(), free_when_done);
}

// Any integer array as uint64, refusing negative values instead of wrapping them.
py::array_t<uint64_t, py::array::c_style> as_uint64(const py::array& a, const char* name) {
  const char kind = a.dtype().kind();
  if (a.ndim() != 1) throw py::value_error(std::string(name) + " must be 1-D, got " + std::to_string(a.ndim()) + "-D");
  if (kind == 'i') {
    auto s = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(a);
    const int64_t* d = s.data();
    for (py::ssize_t i = 0; i < s.size(); ++i) {
      if (d[i] < 0) throw py::value_error(std::string(name) + "[" + std::to_string(i) + "] is negative: " + std::to_string(d[i]));
    }
  } else if (kind != 'u') {
    throw py::type_error(std::string(name) + " must be an integer array, got dtype " + std::string(py::str(a.dtype())));
  }
  return py::array_t<uint64_t, py::array::c_style | py::array::forcecast>::ensure(a);
}

}  // namespace

void parse_pair_list(const uint8_t* data, size_t size, std::vector<uint64_t>& first, std::vector<uint64_t>& second) {
  PairListParser(data, size, first, second).run();
}

void register_pickle_index(py::module_& m) {
  m.def(
      "pickle_pairs",
      [](const py::array& first, const py::array& second) {
        auto f = as_uint64(first, "first");
        auto s = as_uint64(second, "second");
        if (f.size() != s.size()) {
          throw py::value_error("first and second differ in length: " + std::to_string(f.size()) + " vs " +
                                std::to_string(s.size()));
        }
        std::string out;
        {
          py::gil_scoped_release release;
          PairListPickler pickler([&out](const char* d, size_t n) { out.append(d, n); });
          const uint64_t* fd = f.data();
          const uint64_t* sd = s.data();
          for (py::ssize_t i = 0; i < f.size(); ++i) pickler.add(fd[i], sd[i]);
          pickler.finish();
        }
        return py::bytes(out);
      },
      py::arg("first"), py::arg("second"),
      "Bytes identical to pickle.dumps(list(zip(first, second)), protocol=4) for non-negative int arrays.");
  m.def(
      "parse_pairs",
      [](const py::buffer& buf) {
        py::buffer_info info = buf.request();
        py::ssize_t expected_stride = info.itemsize;
        for (py::ssize_t d = info.ndim - 1; d >= 0; --d) {
          if (info.strides[d] != expected_stride) throw py::value_error("parse_pairs needs a contiguous buffer");
          expected_stride *= info.shape[d];
        }
        const auto* data = static_cast<const uint8_t*>(info.ptr);
        const size_t size = static_cast<size_t>(info.size * info.itemsize);
        std::vector<uint64_t> first, second;
        std::string error;
        {
          py::gil_scoped_release release;
          try {
            parse_pair_list(data, size, first, second);
          } catch (const std::runtime_error& e) {
            error = e.what();
          }
        }
        if (!error.empty()) throw py::value_error(error);
        return py::make_tuple(to_numpy(std::move(first)), to_numpy(std::move(second)));
      },
      py::arg("buf"),
      "Parse a pickled list of (int, int) pairs without executing pickle; returns two uint64 arrays.\n"
      "Raises ValueError naming the offending opcode and its byte offset for anything else.");
}

}  // namespace fastlm
