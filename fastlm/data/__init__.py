"""Data side of fastlm: raw JSONL indexes, packed token files (.pbin) and the datasets that read them.

`from fastlm.data import PackedFile, PackedMemMapDatasetContinuous, PackedMemMapDatasetDocumentAligned`
works; the modules are imported on first use (numpy only, no torch), so importing the package stays free.
"""

_EXPORTS = {"PackedFile": "pbin", "write_packed": "pbin", "read_raw_index": "pbin",
            "PackedMemMapDatasetContinuous": "datasets", "PackedMemMapDatasetDocumentAligned": "datasets"}


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fastlm.data' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"fastlm.data.{module}"), name)


__all__ = sorted(_EXPORTS)
