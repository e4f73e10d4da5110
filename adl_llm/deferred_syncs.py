"""Decoding steps the host queues without waiting for the card: the stop test read one step late, the fused
sampler's fallback test read once a batch.

On a GPU a step of the compiled decoding path is one CUDA graph launch plus generate's bookkeeping on the host. The
host still waits for the card every step wherever a decision reads a device value: on an H200 the 7B shape's step
at beams 5 took 35.7 ms, of which the card was busy 19.9 ms (docs/bench/profile-decode-llama7b-beams5-h200.txt),
because the host never queued the next step while the card ran the current one. Three such reads, each removed
without changing a token:

- **sampling and greedy**: generate's stop test. transformers has a deferred one (DeferredStopCheck: the flag is
  copied without waiting and read one step later, and the extra step is undone), enabled only on `mps` in 5.24
  ("we should enable it for cuda if we observe perf gains"): turned on for CUDA within `deferred`.
- **beam search**: its stop test (`_beam_search_has_unfinished_sequences`), read one step late here. The extra
  step cannot change the answer: once the search has stopped, every new finished hypothesis is pushed 1e9 below
  the full set of finished beams it would have to displace (transformers' `_update_finished_beams`), and the step
  count alone ends the loop at `max_new_tokens`, never past the cache. tests/test_deferred_syncs.py checks the
  answers against the undeferred search.
- **fused sampling**: whether a row needs transformers' warpers (sampling.py) is gathered on the card for the
  whole batch and read once after it; a batch where one did is decoded again from the same seed with the warpers:
  the same draws as testing every step, at the cost of one batch in the rare case.

Each batch samples from its own seed, drawn once a batch from the process's stream (`batch_seed`, `seeded`), on
every path: the extra step of a late stop test samples too, and would otherwise shift every later batch's draws.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Iterator

import torch
from transformers.generation import utils as generation_utils

from adl_llm.modeling import base_model

# transformers' deferred stop test for sampling and greedy (5.2x); without it those keep the test of every step
_DEFERRED_STOP = getattr(generation_utils, "DeferredStopCheck", None)


@contextlib.contextmanager
def deferred(model, max_new_tokens: int, enabled: bool = True) -> Iterator[None]:
    """Within, one `generate` of `model` (at most `max_new_tokens` new tokens) reads its stop tests a step late."""
    if not enabled:
        yield
        return
    base = base_model(model)
    base._beam_search_has_unfinished_sequences = DeferredBeamStop(
        type(base)._beam_search_has_unfinished_sequences, max_new_tokens
    )  # on the instance: this model, this call
    supported = _DEFERRED_STOP.is_supported if _DEFERRED_STOP is not None else None
    if supported is not None:
        _DEFERRED_STOP.is_supported = staticmethod(_on_cuda_too(supported))
    try:
        yield
    finally:
        del base._beam_search_has_unfinished_sequences
        if supported is not None:
            _DEFERRED_STOP.is_supported = staticmethod(supported)


def _on_cuda_too(supported):
    """transformers' test of where a stop can be deferred, with CUDA taken as it takes `mps`: it still refuses an
    assistant model and a returned cache that cannot be cropped back by the extra step."""

    def is_supported(device, cache, cache_is_returned, is_assistant):
        as_supported = torch.device("mps") if device.type == "cuda" else device
        return supported(as_supported, cache, cache_is_returned, is_assistant)

    return is_supported


class DeferredBeamStop:
    """Beam search's stop test, answered with the flag of the step before (copied without waiting), or False once
    `max_new_tokens` tokens are out, which is when the undeferred test is False for certain."""

    def __init__(self, check, max_new_tokens: int):
        self.check, self.max_new_tokens = check, max_new_tokens
        self.steps = 0
        self.pending: deque = deque()  # the slot of the step whose flag is still to be read
        self.slots: list = []  # two (pinned host flag, event after its copy), reused: fresh ones each step cost more

    def __call__(self, *args, **kwargs) -> bool:
        unfinished = self.check(*args, **kwargs)
        self.steps += 1
        if self.max_new_tokens is not None and self.steps >= self.max_new_tokens:
            return False
        on_gpu = unfinished.device.type == "cuda"
        if not self.slots:
            self.slots = [
                (torch.zeros((), dtype=torch.bool, pin_memory=on_gpu), torch.cuda.Event() if on_gpu else None)
                for _ in range(2)
            ]
        host, event = slot = self.slots[self.steps % 2]
        host.copy_(unfinished.reshape(()), non_blocking=on_gpu)  # elsewhere a copy with no event to wait on
        if event is not None:
            event.record(torch.cuda.current_stream(unfinished.device))
        self.pending.append(slot)
        if len(self.pending) < 2:  # the first step's flag is read at the second
            return True
        host, event = self.pending.popleft()
        if event is not None:
            event.synchronize()
        return bool(host)


def batch_seed() -> int:
    """The seed of one batch's draws, taken from the process's random stream: one draw a batch, however many steps
    the batch ran. A late stop test runs one more step, which samples too: drawn from the process's stream, that
    would shift every later batch's draws."""
    return int(torch.randint(0, 2**62, ()))


@contextlib.contextmanager
def seeded(device: torch.device, seed: int) -> Iterator[None]:
    """Within: the CPU's and `device`'s generators seeded with `seed`; after: as they were."""
    cuda = [torch.cuda.current_device() if device.index is None else device.index] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.random.default_generator.manual_seed(seed)
        for index in cuda:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield
