// Python binding of fastlm::ByteLevelBPE as fastlm._C.ByteLevelBPE.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>
#include <stdexcept>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "bpe.h"
#include "unicode_tables.h"

namespace py = pybind11;

namespace fastlm {

namespace {

// UTF-8 view of a Python str (cached inside the str object; valid while the str is alive).
std::string_view utf8_view(const py::handle& h) {
  if (!PyUnicode_Check(h.ptr())) throw py::type_error("expected str");
  Py_ssize_t size = 0;
  const char* data = PyUnicode_AsUTF8AndSize(h.ptr(), &size);
  if (data == nullptr) throw py::error_already_set();  // e.g. lone surrogates
  return std::string_view(data, size_t(size));
}

std::string utf8_string(const py::handle& h, const char* what) {
  if (!PyUnicode_Check(h.ptr())) throw py::type_error(std::string(what) + " must be str");
  return std::string(utf8_view(h));
}

py::list to_list(const std::vector<uint32_t>& ids) {
  PyObject* lst = PyList_New(Py_ssize_t(ids.size()));
  if (lst == nullptr) throw py::error_already_set();
  for (size_t i = 0; i < ids.size(); ++i) {
    PyObject* v = PyLong_FromUnsignedLong(ids[i]);
    if (v == nullptr) {
      Py_DECREF(lst);
      throw py::error_already_set();
    }
    PyList_SET_ITEM(lst, Py_ssize_t(i), v);
  }
  return py::reinterpret_steal<py::list>(lst);
}

// One cache per OS thread for the single-text encode() (the Cache resets itself when used with
// another ByteLevelBPE instance).
ByteLevelBPE::Cache& thread_cache(const ByteLevelBPE& bpe) {
  thread_local std::unique_ptr<ByteLevelBPE::Cache> cache;
  if (!cache) cache = bpe.make_cache();
  return *cache;
}

// Encodes texts[i] into outs[i] with num_threads threads, each with its own Cache. GIL not needed.
void encode_many(const ByteLevelBPE& bpe, const std::vector<std::string_view>& texts,
                 std::vector<std::vector<uint32_t>>& outs, int num_threads, bool fresh_cache = false) {
  outs.resize(texts.size());
  size_t nt = size_t(std::max(1, num_threads));
  nt = std::min(nt, std::max<size_t>(1, texts.size()));
  if (nt <= 1 && !fresh_cache) {
    auto& cache = thread_cache(bpe);
    for (size_t i = 0; i < texts.size(); ++i) bpe.encode(texts[i], outs[i], cache);
    return;
  }
  std::atomic<size_t> next{0};
  std::vector<std::exception_ptr> errors(nt);
  auto work = [&](size_t t) {
    try {
      auto cache = bpe.make_cache();
      for (size_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < texts.size();)
        bpe.encode(texts[i], outs[i], *cache);
    } catch (...) {
      errors[t] = std::current_exception();
    }
  };
  std::vector<std::thread> pool;
  pool.reserve(nt - 1);
  for (size_t t = 1; t < nt; ++t) pool.emplace_back(work, t);
  work(0);
  for (auto& th : pool) th.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

std::vector<std::string_view> views_of(const py::sequence& texts) {
  std::vector<std::string_view> views;
  views.reserve(size_t(py::len(texts)));
  for (const auto& t : texts) views.push_back(utf8_view(t));
  return views;
}

}  // namespace

void register_bpe(py::module_& m) {
  py::class_<ByteLevelBPE, std::shared_ptr<ByteLevelBPE>>(
      m, "ByteLevelBPE",
      "GPT-2 style byte-level BPE, id-for-id equal to HuggingFace tokenizers for tokenizer.json files\n"
      "with model BPE, no normalizer, pre_tokenizer ByteLevel(add_prefix_space=False, use_regex=True)\n"
      "and plain added tokens (single_word/lstrip/rstrip false).")
      .def(py::init([](const py::dict& vocab, const py::sequence& merges, const py::sequence& added_tokens,
                       bool ignore_merges) {
             std::vector<std::pair<std::string, uint32_t>> v;
             v.reserve(size_t(py::len(vocab)));
             for (const auto& kv : vocab) {
               long long id = kv.second.cast<long long>();
               if (id < 0 || id > 0xFFFFFFFELL) throw py::value_error("vocab id out of range: " + std::to_string(id));
               v.emplace_back(utf8_string(kv.first, "vocab key"), uint32_t(id));
             }
             std::vector<std::pair<std::string, std::string>> mg;
             mg.reserve(size_t(py::len(merges)));
             size_t rank = 0;
             for (const auto& item : merges) {
               if (PyUnicode_Check(item.ptr())) {
                 // legacy "a b" form: like tokenizers, exactly one space separator
                 std::string s = utf8_string(item, "merge");
                 size_t sp = s.find(' ');
                 if (sp == std::string::npos || s.find(' ', sp + 1) != std::string::npos)
                   throw py::value_error("merge #" + std::to_string(rank) + " '" + s +
                                         "' must be two tokens separated by one space");
                 mg.emplace_back(s.substr(0, sp), s.substr(sp + 1));
               } else {
                 py::sequence pair = py::reinterpret_borrow<py::sequence>(item);
                 if (py::len(pair) != 2)
                   throw py::value_error("merge #" + std::to_string(rank) + " must be a pair of tokens");
                 mg.emplace_back(utf8_string(pair[0], "merge token"), utf8_string(pair[1], "merge token"));
               }
               ++rank;
             }
             std::vector<AddedToken> added;
             for (const auto& item : added_tokens) {
               py::sequence pair = py::reinterpret_borrow<py::sequence>(item);
               if (py::len(pair) != 2) throw py::value_error("added token must be a (content, id) pair");
               long long id = pair[1].cast<long long>();
               if (id < 0 || id > 0xFFFFFFFELL) throw py::value_error("added token id out of range: " + std::to_string(id));
               added.push_back(AddedToken{utf8_string(pair[0], "added token content"), uint32_t(id)});
             }
             py::gil_scoped_release release;
             return std::make_shared<ByteLevelBPE>(v, mg, added, ignore_merges);
           }),
           py::arg("vocab"), py::arg("merges"), py::arg("added_tokens") = py::list(),
           py::arg("ignore_merges") = false)
      .def(
          "encode",
          [](const ByteLevelBPE& self, const py::str& text) {
            std::string_view view = utf8_view(text);
            std::vector<uint32_t> out;
            {
              py::gil_scoped_release release;
              out.reserve(view.size() / 4 + 16);
              self.encode(view, out, thread_cache(self));
            }
            return to_list(out);
          },
          py::arg("text"), "Token ids of `text` (same as tokenizers' encode(text).ids).")
      .def(
          "encode_batch",
          [](const ByteLevelBPE& self, const py::sequence& texts, int num_threads) {
            std::vector<std::string_view> views = views_of(texts);
            std::vector<std::vector<uint32_t>> outs;
            {
              py::gil_scoped_release release;
              encode_many(self, views, outs, num_threads);
            }
            py::list result(outs.size());
            for (size_t i = 0; i < outs.size(); ++i) result[i] = to_list(outs[i]);
            return result;
          },
          py::arg("texts"), py::arg("num_threads") = 1,
          "Encodes many texts with a pool of num_threads threads (GIL released).")
      .def(
          "_count_tokens",
          [](const ByteLevelBPE& self, const py::sequence& texts, int num_threads, bool fresh_cache) {
            // Benchmark helper: encodes like encode_batch but returns only the total token count,
            // so the timing excludes building Python lists. fresh_cache: start from empty caches.
            std::vector<std::string_view> views = views_of(texts);
            std::vector<std::vector<uint32_t>> outs;
            size_t total = 0;
            {
              py::gil_scoped_release release;
              encode_many(self, views, outs, num_threads, fresh_cache);
              for (const auto& o : outs) total += o.size();
            }
            return total;
          },
          py::arg("texts"), py::arg("num_threads") = 1, py::arg("fresh_cache") = true)
      .def_static(
          "_pretokenize",
          [](const py::str& text) {
            std::vector<std::string_view> pieces;
            ByteLevelBPE::pretokenize(utf8_view(text), pieces);
            py::list out(pieces.size());
            for (size_t i = 0; i < pieces.size(); ++i)
              out[i] = py::reinterpret_steal<py::str>(
                  PyUnicode_DecodeUTF8(pieces[i].data(), Py_ssize_t(pieces[i].size()), "strict"));
            return out;
          },
          py::arg("text"), "GPT-2 regex pieces of `text` (no added-token handling), for tests.")
      .def_static(
          "_cp_classes",
          [](uint32_t start, uint32_t stop) {
            // Class (0 other, 1 letter, 2 number, 3 whitespace) of each code point in [start, stop).
            stop = std::min<uint32_t>(stop, 0x110000);
            std::string r;
            for (uint32_t cp = start; cp < stop; ++cp) r.push_back(char(unicode_tables::cp_class(cp)));
            return py::bytes(r);
          },
          py::arg("start") = 0, py::arg("stop") = 0x110000)
      .def_property_readonly("max_id", &ByteLevelBPE::max_id)
      .def_property_readonly("vocab_size", &ByteLevelBPE::vocab_size)
      .def_property_readonly("num_merges", &ByteLevelBPE::num_merges)
      .def_property_readonly("ignore_merges", &ByteLevelBPE::ignore_merges);
}

}  // namespace fastlm
