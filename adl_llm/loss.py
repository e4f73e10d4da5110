"""The loss: the NLL of answer tokens only, a chunk of positions at a time, and the gradient of a step.

With a 262k-token vocabulary (Gemma 3) the logits of every position are the largest tensors of a step, several
times over once they are cast to fp32 and their gradient is formed. Only the positions that predict an answer
token matter for the loss and the perplexity, so the decoder's last hidden states are gathered there and
projected onto the vocabulary a chunk at a time: the NLL of each position is what full logits would give (bf16
logits, then fp32 log-softmax, as the model's own loss does), while memory holds one chunk of logits at most.

The loss of an optimiser step is the mean NLL over the answer tokens of the whole step: each micro-batch adds its
summed NLL divided by the step's answer-token count, so how a step is cut into micro-batches (2 x 8, 16 x 1,
groups of similar length, shares of several processes) changes the speed and not the update.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from adl_llm.batching import Batch, collate
from adl_llm.encode import IGNORE, Encoded
from adl_llm.packing import Rows, collate_packed

LOGIT_CHUNK_ELEMENTS = 2**26  # fp32 logits per chunk (256 MiB): 256 positions of a 262k vocabulary


@dataclass
class AnswerNLL:
    nll: torch.Tensor  # [N] fp32 (fp64 for an fp64 model), one per answer token of the batch
    rows: torch.Tensor  # [N] the batch row each belongs to

    def per_row(self, n_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed NLL [n_rows] and answer-token count [n_rows] of each row."""
        sums = torch.zeros(n_rows, dtype=self.nll.dtype, device=self.nll.device).index_add_(0, self.rows, self.nll)
        return sums, torch.bincount(self.rows, minlength=n_rows)


@dataclass
class SharedPrefix:
    """The tokens every example of an evaluation starts with (the system text, few-shot examples), run through the
    decoder once: a batch then passes only what follows, attending to this KV cache."""

    length: int
    cache: Any  # a transformers Cache of one row

    def for_batch(self, rows: int):
        cache = copy.deepcopy(self.cache)
        cache.batch_repeat_interleave(rows)
        return cache


@torch.no_grad()
def shared_prefix(model, examples: Sequence[Encoded], min_length: int = 16) -> SharedPrefix | None:
    """The longest token prefix all `examples` share and none needs scoring from, computed once; None if short."""
    first = examples[0].input_ids
    length = len(first)
    for ex in examples:
        pairs = zip(first[:length], ex.input_ids)
        same = next((i for i, (a, b) in enumerate(pairs) if a != b), min(length, len(ex.input_ids)))
        scored = next((i for i, label in enumerate(ex.labels) if label != IGNORE), len(ex.labels))
        # The last prefix position predicts nothing scored, and every example keeps a token after the prefix.
        length = min(length, same, scored - 1, len(ex.input_ids) - 1)
    if length < min_length:
        return None
    device = next(model.parameters()).device
    ids = torch.tensor([first[:length]], device=device)
    out = model.get_decoder()(input_ids=ids, use_cache=True)
    return SharedPrefix(length, getattr(out, _cache_keyword(model)))


def _cache_keyword(model) -> str:
    """The decoder's name for its KV cache: `cache` from transformers 5.24, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.get_decoder().forward).parameters else "past_key_values"


def answer_nll(model, batch: Batch, prefix: SharedPrefix | None = None) -> AnswerNLL:
    """The NLL of every answer token of `batch`, each predicted from the tokens before it.

    Position t predicts token t+1; the logits are those of the model's own head (`get_output_embeddings`, with
    Gemma's final soft-capping where the config sets it). A head that trains (LoRA on `lm_head`, a trained bias)
    goes through plain autograd, still a chunk of positions at a time in the forward pass. With a `prefix`, the
    batch holds what follows it and attends to its cache (evaluation only). A packed batch (`collate_packed`) gives
    the model its position ids instead of its attention mask.
    """
    scored = batch.labels[:, 1:] != IGNORE
    rows, columns = scored.nonzero(as_tuple=True)
    targets = batch.labels[:, 1:][rows, columns]
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "use_cache": False}
    if batch.position_ids is not None:  # packed: transformers keeps the examples apart by their positions, given no
        inputs.update(attention_mask=None, position_ids=batch.position_ids)  # mask (masking_utils)
        if prefix is not None:  # the positions would have to start after the prefix, and the mask hold it
            raise ValueError("a packed batch cannot follow a shared prefix")
    if prefix is not None:
        before = batch.attention_mask.new_ones(len(batch.input_ids), prefix.length)
        inputs["attention_mask"] = torch.cat([before, batch.attention_mask], dim=1)
        inputs.update({_cache_keyword(model): prefix.for_batch(len(batch.input_ids)), "use_cache": True})
    hidden = model.get_decoder()(**inputs).last_hidden_state
    head = model.get_output_embeddings()
    softcap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    if _frozen_linear(head):
        nll = _ChunkedNLL.apply(hidden[rows, columns], head.weight, head.bias, targets, softcap)
    else:
        nll = _autograd_nll(head, hidden[rows, columns], targets, softcap)
    return AnswerNLL(nll=nll, rows=rows)


def _frozen_linear(head) -> bool:
    """A plain linear head with nothing to train: the case the hand-written gradient covers."""
    return type(head) is torch.nn.Linear and not any(p.requires_grad for p in head.parameters())


def _autograd_nll(head, hidden: torch.Tensor, targets: torch.Tensor, softcap: float | None) -> torch.Tensor:
    chunk = max(1, LOGIT_CHUNK_ELEMENTS // head.weight.shape[0])
    parts = []
    for start in range(0, len(targets), chunk):
        logits = head(hidden[start : start + chunk])
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        if softcap:
            logits = softcap * torch.tanh(logits / softcap)
        parts.append(F.cross_entropy(logits, targets[start : start + chunk], reduction="none"))
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.promote_types(hidden.dtype, torch.float32))


class _ChunkedNLL(torch.autograd.Function):
    """NLL of `targets` under `hidden @ weight.T`, never holding more than one chunk of logits.

    The head's weight is frozen (LoRA does not train it), so the only gradient is the one of the hidden states;
    it is formed chunk by chunk in the forward pass, while that chunk's logits are at hand, and the backward
    pass only scales it by the incoming gradient of each position.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, softcap):
        exact = torch.promote_types(hidden.dtype, torch.float32)  # fp32 at least: bf16 logits lose the NLL
        nll = torch.empty(len(targets), dtype=exact, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        chunk = max(1, LOGIT_CHUNK_ELEMENTS // weight.shape[0])
        for start in range(0, len(targets), chunk):
            stop = min(start + chunk, len(targets))
            logits = F.linear(hidden[start:stop], weight, bias).to(exact)
            if softcap:
                capped = torch.tanh(logits / softcap)
                logits = capped * softcap
            picked = targets[start:stop, None]
            log_norm = torch.logsumexp(logits, dim=-1, keepdim=True)
            nll[start:stop] = (log_norm - logits.gather(1, picked)).squeeze(1)
            if grad_hidden is not None:  # d nll / d logits = softmax - one_hot(target)
                grad_logits = logits.sub_(log_norm).exp_().scatter_add_(1, picked, logits.new_full(picked.shape, -1.0))
                if softcap:
                    grad_logits.mul_(1 - capped.square())
                grad_hidden[start:stop] = grad_logits.to(weight.dtype) @ weight
        ctx.save_for_backward(grad_hidden)
        return nll

    @staticmethod
    def backward(ctx, grad_nll):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_nll[:, None].to(grad_hidden.dtype), None, None, None, None


def accumulate_gradients(
    model,
    micro_batches: Sequence[Sequence[Encoded]],
    n_scored: int,
    pad_id: int,
    device,
    multiple: int = 1,
    *,
    rows: Rows | None = None,
) -> tuple[float, int]:
    """Add the gradient of (summed answer-token NLL of `micro_batches`) / `n_scored`, the step's answer tokens.
    `rows`: each micro-batch in packed rows cut so (packing.collate_packed); None: in right-padded ones.

    Returns the summed NLL and the input tokens of these micro-batches.
    """
    total_nll = torch.zeros((), device=device)
    tokens = 0
    for examples in micro_batches:
        if rows is not None:
            batch = collate_packed(examples, pad_id, device, multiple=multiple, rows=rows)
        else:
            batch = collate(examples, pad_id, device, multiple=multiple)
        nll = answer_nll(model, batch).nll.sum()
        (nll / max(1, n_scored)).backward()
        total_nll += nll.detach()
        tokens += batch.n_tokens
    return float(total_nll), tokens
