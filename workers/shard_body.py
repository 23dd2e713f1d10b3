"""How a method makes the merged tensors of one shard (the skeleton, workers/shard_task.py, copies the rest)."""

from __future__ import annotations

from workers.chunks import MergeInputs, ShardContext
from workers.results import WrittenFile
from workers.specs import ShardSpec, TensorTask
from workers.tensor_io import DTYPES, RangeReader, ShardWriter


class ShardBody:
    """How a method makes the merged tensors of one shard: by default its ``merge_tensor``,
    streamed into the shard's file. A method with outputs of its own subclasses it (Twin)."""

    prefetch = True  # read the next merged tensor's first chunk while this one computes

    def __init__(self, method, spec: ShardSpec):
        self.method, self.spec = method, spec

    def wrap_reader(self, reader: RangeReader):
        """The reader the shard's chunks come through (Twin keeps the merge's reads for v_t)."""
        return reader

    def tensor(self, ctx: ShardContext, task: TensorTask, inputs: MergeInputs, writer: ShardWriter) -> None:
        """Make one merged tensor and write it into the shard's file."""
        out_dtype = DTYPES[task.out_dtype]
        options = task.options or self.spec.method
        for _, out in self.method.merge_tensor(ctx, inputs, options, self.spec.prepass, out_dtype):
            with ctx.timer.track("write"):
                writer.write(task.name, out)

    def finish(self) -> tuple[tuple[WrittenFile, ...], tuple[dict, ...]]:
        """Close the body's own files; returns them and its per-tensor records."""
        return (), ()
