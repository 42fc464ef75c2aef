"""Imports SGLang's cache classes quietly. Without CUDA, SGLang's import warns about
GPU-only kernels (AWQ, GGUF) and torch's cpp_extension logs a missing CUDA runtime; none
of it concerns the classes used here, and it would bury the CLI's one-line errors."""
import logging
import warnings

_cpp_extension_log = logging.getLogger("torch.utils.cpp_extension")
_level = _cpp_extension_log.level
_cpp_extension_log.setLevel(logging.ERROR)
try:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import sglang.srt.mem_cache.radix_cache  # noqa: F401
finally:
    _cpp_extension_log.setLevel(_level)
