"""Fewer and shorter garbage-collection pauses in the loops whose steps the host paces (training steps, decoding).

Once a model is loaded and its layers compiled, a process holds about a million objects that live as long as it
does: the modules and parameters, torch.compile's graphs and guards, the tokenizer. Python's full collection walks
all of them. On the 7B shape on an H200 two steps in thirty took 0.5 and 0.6 s against about 0.2 s for the others
(docs/bench/llama7b-train.json, train.memory_budget_gb=40), the size of a full collection of such a heap (0.4 to
0.7 s on a 2-core EPYC for 0.67 million objects). Under data parallelism one rank's pause stalls them all at the
gradient sum.

`frozen()` moves the objects alive when it is called into the interpreter's permanent generation (`gc.freeze`),
which collections skip: they then walk only what the loop itself allocates. The loop calls it again once its first
step has compiled what it needs. Garbage cycles among frozen objects wait for the loop's end, when the context
returns them to the collector (`gc.unfreeze`); the young generations are collected before each freeze, so what waits
is only what was old already (bounded, and freed at the end, not leaked). This is the interpreter's own mechanism
for long-lived heaps (the `gc.freeze` documentation), not a new collector.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterator

_depth = 0  # nested loops (a step that decodes) leave the unfreezing to the outermost


def _freeze() -> None:
    gc.collect(1)  # the young generations only: milliseconds, where a full collection is the pause itself
    gc.freeze()


@contextlib.contextmanager
def frozen() -> Iterator[Callable[[], None]]:
    """Freeze the objects alive now for the life of the block; yields a function that freezes those alive by then
    too (call it after a first step that compiled). The outermost block unfreezes them all at its end."""
    global _depth
    _depth += 1
    try:
        _freeze()
        yield _freeze
    finally:
        _depth -= 1
        if _depth == 0:
            gc.unfreeze()
