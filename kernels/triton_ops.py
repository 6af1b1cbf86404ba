"""The Triton version of every op, by name (imports triton: the dispatcher in kernels/__init__.py loads this module
only for CUDA tensors or DELTAMEM_KERNELS=triton). Each op's module sits beside its torch reference (kernels/chunk.py
and kernels/chunk_ref.py, ...); kernels/reference.py gathers the references the same way.
"""

from deltamem.kernels.attn_decode import decode_attention
from deltamem.kernels.chunk import LOW_PRECISION, chunk_gated_delta_rule, chunk_indices_for
from deltamem.kernels.conv import causal_conv1d
from deltamem.kernels.gates import delta_gates, silu_mul
from deltamem.kernels.kv_ring import kv_step
from deltamem.kernels.norm import add_rms_norm, gated_rms_norm, rms_norm, rms_norm_add
from deltamem.kernels.recurrent import recurrent_gated_delta_rule
from deltamem.kernels.triton_util import INTERPRET

__all__ = [
    "INTERPRET",
    "LOW_PRECISION",
    "add_rms_norm",
    "causal_conv1d",
    "chunk_gated_delta_rule",
    "chunk_indices_for",
    "decode_attention",
    "delta_gates",
    "gated_rms_norm",
    "kv_step",
    "recurrent_gated_delta_rule",
    "rms_norm",
    "rms_norm_add",
    "silu_mul",
]
