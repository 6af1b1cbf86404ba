"""Gated DeltaNet ops: torch references (kernels/reference.py) now; Triton kernels beside them later."""

from kernels.reference import causal_conv1d, chunk_gated_delta_rule, l2_normalize, recurrent_gated_delta_rule

__all__ = ["causal_conv1d", "chunk_gated_delta_rule", "l2_normalize", "recurrent_gated_delta_rule"]
