// Python bindings of the JSONL scanner, the raw index and the packer. Every long call releases the GIL and
// takes it back only to report progress, where Ctrl-C (or any exception the callback raises) stops the work.
#include <pybind11/functional.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "bpe.h"
#include "common.h"
#include "json_scan.h"
#include "line_index.h"
#include "packer.h"

namespace py = pybind11;

namespace fastlm {

namespace {

template <typename T>
py::array_t<T> to_numpy(std::vector<T>&& v) {
  auto* heap = new std::vector<T>(std::move(v));
  py::capsule owner(heap, [](void* p) { delete static_cast<std::vector<T>*>(p); });
  return py::array_t<T>(static_cast<py::ssize_t>(heap->size()), heap->data(), owner);
}

template <typename T>
std::vector<T> from_numpy(const py::array_t<T, py::array::c_style | py::array::forcecast>& a) {
  return std::vector<T>(a.data(), a.data() + a.size());
}

// Bridges a Python progress callback into C++: called with the GIL released; takes it, calls back, checks
// for pending signals. A Python error is kept so that the caller can re-raise it once the work is stopped.
class ProgressBridge {
 public:
  explicit ProgressBridge(py::object callback) : callback_(std::move(callback)) {}
  ~ProgressBridge() {
    Py_XDECREF(type_);
    Py_XDECREF(value_);
    Py_XDECREF(trace_);
  }

  ProgressFn fn() {
    return [this](uint64_t bytes, uint64_t docs, uint64_t tokens) {
      py::gil_scoped_acquire gil;
      try {
        if (!callback_.is_none()) callback_(bytes, docs, tokens);
        if (PyErr_CheckSignals() != 0) throw py::error_already_set();
      } catch (py::error_already_set& e) {
        e.restore();
        PyErr_Fetch(&type_, &value_, &trace_);
        return false;
      }
      return true;
    };
  }

  // Re-raises the kept Python error (call with the GIL held).
  [[noreturn]] void reraise() {
    PyErr_Restore(type_, value_, trace_);
    type_ = value_ = trace_ = nullptr;
    throw py::error_already_set();
  }

 private:
  py::object callback_;
  PyObject* type_ = nullptr;
  PyObject* value_ = nullptr;
  PyObject* trace_ = nullptr;
};

py::dict raw_index_py(const std::string& path, int num_threads, bool skip_invalid, py::object progress,
                      uint64_t chunk_bytes, py::object out_path, bool return_arrays) {
  ProgressBridge bridge(std::move(progress));
  RawIndex index;
  try {
    py::gil_scoped_release release;
    index = build_raw_index(path, num_threads, skip_invalid, bridge.fn(), chunk_bytes);
  } catch (const Aborted&) {
    bridge.reraise();
  }
  if (!out_path.is_none()) {
    std::string out = py::str(out_path);
    py::gil_scoped_release release;
    write_raw_index_file(index, out);
  }
  py::dict d;
  d["documents"] = index.offsets.size();
  if (return_arrays) {  // numpy is imported only when arrays are asked for (the index CLI does not)
    d["offsets"] = to_numpy(std::move(index.offsets));
    d["lengths"] = to_numpy(std::move(index.lengths));
  }
  d["lines"] = index.lines;
  d["blank_lines"] = index.blank_lines;
  d["skipped_lines"] = index.skipped_lines;
  d["first_skipped"] = index.first_skipped;
  return d;
}

py::dict pack_py(const std::string& src_path, const std::string& out_path,
                 const py::array_t<uint64_t, py::array::c_style | py::array::forcecast>& offsets,
                 const py::array_t<uint64_t, py::array::c_style | py::array::forcecast>& lengths,
                 const std::string& jq_pattern, uint32_t eod_id, int token_size, int num_threads, bool skip_invalid,
                 const ByteLevelBPE* bpe, py::object encoder, py::object progress, uint64_t batch_bytes) {
  PackConfig config;
  config.src_path = src_path;
  config.out_path = out_path;
  config.jq_pattern = jq_pattern;
  config.eod_id = eod_id;
  config.token_size = token_size;
  config.num_threads = num_threads;
  config.skip_invalid = skip_invalid;
  config.batch_bytes = batch_bytes;
  std::vector<uint64_t> offs = from_numpy(offsets), lens = from_numpy(lengths);

  // The external encoder (the `tokenizers` library) runs on this thread with the GIL taken back; it gets a
  // list of str and returns (ids, counts) as two 1-D integer arrays.
  BatchEncoder batch_encoder = [&encoder](std::vector<std::string>& texts, std::vector<uint32_t>& ids,
                                          std::vector<uint64_t>& counts) {
    py::gil_scoped_acquire gil;
    py::list batch(texts.size());
    for (size_t i = 0; i < texts.size(); ++i) {
      PyObject* s = PyUnicode_DecodeUTF8(texts[i].data(), static_cast<Py_ssize_t>(texts[i].size()), "strict");
      if (s == nullptr) throw py::error_already_set();
      PyList_SET_ITEM(batch.ptr(), static_cast<Py_ssize_t>(i), s);
    }
    py::tuple got = encoder(batch);
    auto id_arr = got[0].cast<py::array_t<uint32_t, py::array::c_style | py::array::forcecast>>();
    auto count_arr = got[1].cast<py::array_t<uint64_t, py::array::c_style | py::array::forcecast>>();
    ids.assign(id_arr.data(), id_arr.data() + id_arr.size());
    counts.assign(count_arr.data(), count_arr.data() + count_arr.size());
  };
  const bool external = !encoder.is_none();
  if (external == (bpe != nullptr)) throw std::invalid_argument("pack_jsonl: pass exactly one of bpe and encoder");

  ProgressBridge bridge(std::move(progress));
  PackResult r;
  try {
    py::gil_scoped_release release;
    r = pack_jsonl(config, offs, lens, external ? nullptr : bpe, external ? &batch_encoder : nullptr, bridge.fn());
  } catch (const Aborted&) {
    bridge.reraise();
  }
  py::dict d;
  d["documents"] = r.documents;
  d["tokens"] = r.tokens;
  d["bytes_read"] = r.bytes_read;
  d["skipped"] = r.skipped;
  d["first_skipped"] = r.first_skipped;
  return d;
}

py::dict scan_line_py(py::bytes line, py::object jq_pattern) {
  std::string_view view = line;  // valid while `line` lives
  std::unique_ptr<JsonPath> path;
  if (!jq_pattern.is_none()) path = std::make_unique<JsonPath>(jq_pattern.cast<std::string>());
  std::string text;
  JsonResult r = scan_json_line(view, path.get(), path ? &text : nullptr);
  static const char* kFaults[] = {"ok", "invalid_json", "not_an_object", "missing_key", "not_a_string"};
  py::dict d;
  d["fault"] = kFaults[static_cast<int>(r.fault)];
  d["column"] = r.column;
  d["message"] = r.message;
  d["text"] = py::bytes(text);
  return d;
}

}  // namespace

void register_data(py::module_& m) {
  auto& input_error = py::register_exception<InputError>(m, "InputError", PyExc_ValueError);
  py::register_exception<IndexMismatch>(m, "IndexMismatch", input_error.ptr());

  m.def("build_raw_index", &raw_index_py, py::arg("path"), py::arg("num_threads") = 1,
        py::arg("skip_invalid") = false, py::arg("progress") = py::none(), py::arg("chunk_bytes") = 16ull << 20,
        py::arg("out_path") = py::none(), py::arg("return_arrays") = true,
        "Index the lines of a JSONL file: dict(documents, offsets, lengths, lines, blank_lines, skipped_lines, "
        "first_skipped); with out_path, also write the .idx there. Raises InputError naming "
        "file:line:column on the first invalid line.");
  m.def("pack_jsonl", &pack_py, py::arg("src_path"), py::arg("out_path"), py::arg("offsets"), py::arg("lengths"),
        py::arg("jq_pattern"), py::arg("eod_id"), py::arg("token_size"), py::arg("num_threads"),
        py::arg("skip_invalid") = false, py::arg("bpe") = nullptr, py::arg("encoder") = py::none(),
        py::arg("progress") = py::none(), py::arg("batch_bytes") = 1ull << 20,
        "Pack the documents of a JSONL file into a .pbin at out_path (written in full; rename it yourself).");
  m.def("_check_utf8", [](py::bytes text) { return check_utf8(std::string_view(text)); }, py::arg("text"),
        "([verdict of the AVX2 validator where the CPU runs it], first invalid offset by the scalar check): "
        "for tests");
  m.def("scan_json_line", &scan_line_py, py::arg("line"), py::arg("jq_pattern") = py::none(),
        "Validate one JSONL line and extract the field at jq_pattern (for tests and diagnostics).");
}

}  // namespace fastlm
