"""Tensor and expert parallelism: one fixed sharding layout, and the collectives a sharded forward needs.

`TensorParallel` says which rank of how many this process is; the model's modules take it and keep their
share of every layer (`layout.py` says which share: never inferred from a tensor's shape). A sharded forward
holds, per decoder layer, two all-reduces: after the mixer's output projection and after the FFN.
"""

from qwen35.parallel.state import TensorParallel

__all__ = ["TensorParallel"]
