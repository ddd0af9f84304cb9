"""Quiet by default: the libraries' chatter stays off the terminal unless ``-v/--verbose``.

What a user of ``favor-rt`` / ``favor-export`` / ``favor-train`` / ``favor-eval`` would otherwise see
before the first result: FutureWarnings and deprecation notices from transformers and torch,
"torchvision is not installed" from torch.onnx's exporter, and weight-loading / GGUF-conversion
progress bars (tqdm, through transformers and huggingface_hub). Our own messages and errors are
never silenced: only library loggers, library warnings and foreign progress bars.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import warnings

# Loggers of the libraries we call: only their errors reach the terminal by default.
# Named explicitly (not only through the root logger): onnxruntime.quantization calls
# logging.basicConfig(level=INFO) when imported, which would let every unset logger through.
LIBRARY_LOGGERS = ("transformers", "torch", "torch.onnx", "onnxscript", "onnx", "onnx_ir", "onnxruntime",
                   "onnxruntime_genai", "peft", "huggingface_hub", "accelerate", "gguf", "safetensors", "av")
_LIBRARY_MODULES = (r"(transformers|torch|torchaudio|peft|onnx|onnx_ir|onnxscript|onnxruntime|huggingface_hub|gguf|av)"
                    r"(\.|$)")


def quiet_libraries(verbose: bool = False) -> None:
    """Silence (or, with ``verbose``, show) library warnings, logs and progress bars for this process.

    Call it first in a command, before the heavy imports: the environment switches are read by
    transformers / huggingface_hub / tqdm when they load."""
    if verbose:  # the libraries' own defaults: their warnings, logs and progress bars
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")  # tqdm >= 4.66 reads it as the default for disable=
    # torch's import sets its own loggers' levels (torch._logging), undoing any set before it: favor-export
    # verify printed torch.onnx's "torchvision is not installed". "-all" makes that setup ERROR for all.
    os.environ.setdefault("TORCH_LOGS", "-all")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", module=_LIBRARY_MODULES)
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    if "tqdm" in sys.modules:  # tqdm reads TQDM_DISABLE once, when it is imported (a CLI's own imports
        # may have pulled it in: favor-train's config classes import transformers); transformers' GGUF
        # conversion bar uses plain tqdm, which no transformers switch reaches. A caller's disable= wins.
        from tqdm import std

        std.tqdm.__init__ = functools.partialmethod(std.tqdm.__init__, disable=True)
    if "transformers" in sys.modules:  # already imported (tests, an earlier command): its own knobs
        import transformers.utils.logging as tlog

        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
