"""The torch reference of every op, by name: the ground truth each Triton op is tested against, and the CPU path.

Each reference lives beside its Triton op (kernels/chunk_ref.py beside kernels/chunk.py, and so on); this module
only gathers them, as kernels/triton_ops.py gathers the Triton ones, so the dispatcher (kernels/__init__.py) and
the tests can pick a backend as one namespace.
"""

from deltamem.kernels.attn_decode_ref import decode_attention
from deltamem.kernels.chunk_ref import chunk_gated_delta_rule
from deltamem.kernels.conv_ref import causal_conv1d, causal_conv1d_rows
from deltamem.kernels.gates_ref import delta_gates, silu_mul
from deltamem.kernels.kv_ring_ref import kv_step
from deltamem.kernels.norm_ref import add_rms_norm, gated_rms_norm, rms_norm, rms_norm_add
from deltamem.kernels.recurrent_ref import l2_normalize, recurrent_gated_delta_rule

__all__ = [
    "add_rms_norm",
    "causal_conv1d",
    "causal_conv1d_rows",
    "chunk_gated_delta_rule",
    "decode_attention",
    "delta_gates",
    "gated_rms_norm",
    "kv_step",
    "l2_normalize",
    "recurrent_gated_delta_rule",
    "rms_norm",
    "rms_norm_add",
    "silu_mul",
]
