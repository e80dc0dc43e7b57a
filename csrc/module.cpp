// fastlm._C: the native side of fastlm (no torch headers; builds in seconds).
#include <pybind11/pybind11.h>

namespace fastlm {
void register_bpe(pybind11::module_& m);
void register_pickle_index(pybind11::module_& m);
void register_data(pybind11::module_& m);
}  // namespace fastlm

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastlm native data pipeline: JSONL index, JSON extraction, byte-level BPE, packer, .pbin index";
  fastlm::register_bpe(m);
  fastlm::register_pickle_index(m);
  fastlm::register_data(m);
}
