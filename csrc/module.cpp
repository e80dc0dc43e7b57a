// Throwaway development module for the pbin branch; replaced by the real csrc/module.cpp at integration.
#include <pybind11/pybind11.h>

#include "pickle_index.h"

PYBIND11_MODULE(_C, m) { fastlm::register_pickle_index(m); }
