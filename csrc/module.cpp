// Throwaway development module for the bpe branch (the real csrc/module.cpp is owned elsewhere).
#include <pybind11/pybind11.h>

#include "bpe.h"

PYBIND11_MODULE(_C, m) { fastlm::register_bpe(m); }
