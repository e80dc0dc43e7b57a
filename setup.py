"""Builds fastlm and its C++ extension fastlm._C (pybind11, portable -O3: no CPU-specific -march flag;
faster instruction paths are chosen at run time).

The top-level kernels/ folder is installed as fastlm.kernels, never as a top-level package (the name
`kernels` belongs to another PyPI project): fastlm/kernels is a symbolic link to it, so every package sits
where its import name says. That plain layout lets `pip install -e .` put the project folder on sys.path
with a static .pth file instead of an import hook: the hook setuptools installs for mapped packages costs
~20 ms at the start of every Python process of the environment (it imports pathlib, importlib.util and
fnmatch from site), a quarter of a `fastlm data create_raw_index` run on 200 MB.
"""
import glob
import os

from pybind11.setup_helpers import ParallelCompile, Pybind11Extension, build_ext, naive_recompile
from setuptools import setup

# Compile the sources in parallel (FASTLM_BUILD_JOBS, default: all CPUs) and, on a rebuild, only those
# newer than their object files.
ParallelCompile("FASTLM_BUILD_JOBS", needs_recompile=naive_recompile).install()

ext = Pybind11Extension(
    "fastlm._C",
    sorted(glob.glob("csrc/*.cpp")),
    include_dirs=["csrc"],
    cxx_std=17,
    extra_compile_args=["-O3", "-g0", "-fvisibility=hidden", "-Wall", "-Wno-unused-function"],
    extra_link_args=["-pthread"],
)


def attention_host_extension():
    """fastlm._attention_host (kernels/attention_host.cpp): flash attention's eager host path in C++, built
    against the torch of this environment where there is one (a data-only install has none: that extension
    is optional, the kernels fall back to their Python path without it). FASTLM_NO_TORCH_EXT=1 skips it."""
    if os.environ.get("FASTLM_NO_TORCH_EXT") == "1":
        return []
    try:
        import torch
        from torch.utils.cpp_extension import CppExtension
    except ImportError:
        return []
    name = "_attention_host"
    return [CppExtension(
        f"fastlm.{name}", ["kernels/attention_host.cpp"],
        extra_compile_args=["-O2", "-g0", "-std=c++20", f"-DTORCH_EXTENSION_NAME={name}",
                            "-DTORCH_API_INCLUDE_EXTENSION_H",
                            f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"],
    )]


class BuildExt(build_ext):
    """Builds fastlm._C (a failure stops the install) and the optional fastlm._attention_host (a failure
    is reported and skipped: the kernels then keep their Python path, as without torch)."""

    def initialize_options(self):
        super().initialize_options()
        self.skipped = set()

    def build_extension(self, ext):
        if ext.name != "fastlm._attention_host":
            return super().build_extension(ext)
        try:
            super().build_extension(ext)
        except Exception as e:  # (a compiler without C++20, headers of a torch built otherwise, ...)
            self.skipped.add(ext.name)
            print(f"warning: fastlm._attention_host not built ({type(e).__name__}: {e}); flash attention "
                  "keeps its Python host path")

    def _built(self):
        return [ext for ext in self.extensions if ext.name not in self.skipped]

    def copy_extensions_to_source(self):  # (editable installs: the extensions that were built)
        every, self.extensions = self.extensions, self._built()
        try:
            super().copy_extensions_to_source()
        finally:
            self.extensions = every

    def get_outputs(self):
        every, self.extensions = self.extensions, self._built()
        try:
            return super().get_outputs()
        finally:
            self.extensions = every


setup(
    name="fastlm",
    version="0.1.0",
    description="Fast, sturdy LLM pretraining: native data pipeline, Triton kernels, FSDP2 training",
    packages=["fastlm", "fastlm.data", "fastlm.kernels"],
    package_dir={"": "."},
    ext_modules=[ext, *attention_host_extension()],
    cmdclass={"build_ext": BuildExt},
    python_requires=">=3.10",
    install_requires=["numpy<2.4", "pyyaml", "tqdm", "tokenizers"],
    extras_require={
        "train": ["torch", "triton==3.6.0", "safetensors", "matplotlib"],
        "test": ["pytest", "pytest-benchmark", "hypothesis", "tiktoken"],
    },
    entry_points={"console_scripts": ["fastlm=fastlm.cli:main"]},
    zip_safe=False,
)
