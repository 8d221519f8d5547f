"""Numerical kernels in pure PyTorch, each with a slow reference beside it."""

from qwen35.ops.conv import causal_conv1d, causal_conv1d_reference, causal_conv1d_step
from qwen35.ops.gated_delta import (
    gated_delta_rule_chunked,
    gated_delta_rule_naive,
    gated_delta_rule_recurrent,
    gated_delta_step,
)

__all__ = [
    "causal_conv1d",
    "causal_conv1d_reference",
    "causal_conv1d_step",
    "gated_delta_rule_chunked",
    "gated_delta_rule_naive",
    "gated_delta_rule_recurrent",
    "gated_delta_step",
]
