"""How to run an exported QDQ model fast: onnxruntime's session options for low-bit weights.

An exported weight is an integer initializer followed by ``DequantizeLinear``. With its default options
onnxruntime keeps that ``DequantizeLinear`` in the graph (so that a runtime with integer kernels can fuse it into
a quantized operator) and, with float activations, runs it at every inference: a 1-bit ResNet20 then runs about
2.4x slower than the same network with float weights. ``session.disable_quant_qdq = 1`` lets onnxruntime fold
each weight's ``DequantizeLinear`` into a float constant once, when the session is created: the network then runs
as the float one does, while the file keeps its integer weights (``benchmarks/onnx_inference.py`` measures it).
With quantized activations the default options also rewrite each layer for integer arithmetic (its bias rounded
to int32), whose outputs differ from the model's; the option keeps the model's arithmetic
(``benchmarks/onnx_activations.py`` measures both).
"""

from __future__ import annotations

from typing import Any

__all__ = ["onnx_session_options"]


def onnx_session_options(threads: int | None = None) -> Any:
    """``onnxruntime.SessionOptions`` for an exported model: weights folded to float once, and quantized
    activations computed in float as the model computes them (not rewritten for integer kernels).

    Args:
        threads: intra-op threads (None: onnxruntime's default).

    Raises:
        ImportError: onnxruntime is not installed.

    Example:
        >>> options = mq.export.onnx_session_options(threads=1)
        >>> options.get_session_config_entry("session.disable_quant_qdq"), options.intra_op_num_threads
        ('1', 1)
    """
    try:
        import onnxruntime
    except ImportError:
        raise ImportError("running ONNX files needs onnxruntime (of the onnx extra): pip install onnxruntime") from None
    options = onnxruntime.SessionOptions()
    options.add_session_config_entry("session.disable_quant_qdq", "1")
    if threads is not None:
        options.intra_op_num_threads = threads
    return options
