"""Reading and writing Hugging Face model folders as streams of tensors (safetensors first)."""

from fusemerge.checkpoint.reader import ModelFolder, TensorInfo
from fusemerge.checkpoint.writer import ShardedWriter, plan_shards

__all__ = ["ModelFolder", "ShardedWriter", "TensorInfo", "plan_shards"]
