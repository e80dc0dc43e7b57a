"""Triton kernels of fastlm (flash attention, fused cross-entropy); imported as fastlm.kernels.

Exports resolve lazily, so `import fastlm.kernels` stays cheap: torch and triton are imported (and the
kernels decorated) on first use of a name. Set TRITON_INTERPRET=1 before that first use to run on CPU.
"""

_EXPORTS = {
    "flash_attention": "flash_attention",
    "attention_reference": "flash_attention",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
        # Importing the submodule bound its name (flash_attention) on this package to the module; the
        # public names are the functions, so bind every export of that module over it.
        for export, source in _EXPORTS.items():
            if source == _EXPORTS[name]:
                globals()[export] = getattr(module, export)
        value = globals()[name]
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
