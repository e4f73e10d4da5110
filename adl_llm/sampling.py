"""Temperature, top-k and top-p in one logits processor that works on the top-k candidates, not the vocabulary.

transformers applies the report's sampling as three warpers in turn: temperature, top-k (every score below the
k-th set to -inf) and top-p, which sorts the whole row to find the nucleus. With Gemma's 262k tokens that sort,
and its softmax and cumulative sum, run over every row (prompts x beams) at every decoding step, for a nucleus
drawn from at most k tokens. This processor finds the k best once (with a margin for ties at the k-th score) and
applies top-p among them: the same kept tokens with the same scores, so sampling draws the same tokens from the
same random numbers (tests/test_sampling.py against transformers' warpers). Where top-p's cut falls between tied
scores, the tied tokens are cut in token-id order, as a stable sort of the whole row cuts them: a GPU's sort is
stable, a CPU's is not, so on a CPU transformers keeps an arbitrary one of them and the draws may differ there
(the distribution is the same). Where the margin does not hold every tie, or a row has fewer than k finite
scores, the step falls back to transformers' warpers; with `defer_fallback` (a GPU's fast path) that test is not
read at each step, which would make the host wait for the card, but gathered for the batch (`missed`) and read once
after it, and a batch that needed the warpers is decoded again with them (deferred_syncs.py).
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

# Candidates looked at: this many times k, so ties at the k-th score are kept as top-k keeps them. Wide, since a
# deferred fallback costs a batch decoded again: it takes 7k + 1 scores tied at the k-th to need the warpers.
TIE_MARGIN = 8
# Rows the fallback to transformers' warpers takes at a time: their sort of whole rows makes copies a row that the
# fused path does not, and a batch is sized for the fused path's memory (decoding.prompts_per_batch).
FALLBACK_ROWS = 64


class TopKTopPSampling(LogitsProcessor):
    """transformers' TemperatureLogitsWarper, TopKLogitsWarper and TopPLogitsWarper, in that order, in one pass
    over the top-k candidates. `min_tokens_to_keep` as generate sets it (beam sampling keeps one more than its
    EOS tokens)."""

    def __init__(
        self, temperature: float, top_k: int, top_p: float, min_tokens_to_keep: int = 1, defer_fallback: bool = False
    ):
        if top_k < 1:
            raise ValueError(f"TopKTopPSampling needs top_k >= 1, got {top_k}")
        self.temperature, self.top_p, self.min_keep = temperature, top_p, min_tokens_to_keep
        self.top_k = max(top_k, min_tokens_to_keep)
        self.warpers = [  # as generate adds them: temperature 1 and top_p 1 add none
            TemperatureLogitsWarper(temperature),
            TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=min_tokens_to_keep),
            *([TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=min_tokens_to_keep)] if top_p < 1.0 else []),
        ]
        self.defer_fallback = defer_fallback
        self.missed: torch.Tensor | None = None  # deferred: whether a step since `missed = None` needed the warpers

    def missed_any(self) -> bool:
        """Whether a step since the last reset needed the warpers its deferred test did not call (one read)."""
        return self.missed is not None and bool(self.missed)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        vocab = scores.shape[-1]
        k = min(self.top_k, vocab)
        scaled = scores / self.temperature  # as TemperatureLogitsWarper divides
        values, indices = scaled.topk(min(TIE_MARGIN * k, vocab), dim=-1)  # sorted, best first
        kth = values[..., k - 1 : k]
        if values.shape[-1] < vocab:
            beyond = (values[..., -1:] >= kth).any()  # ties past the margin, or -inf
            if self.defer_fallback:
                self.missed = beyond if self.missed is None else self.missed | beyond
            elif bool(beyond):
                return self._warpers(input_ids, scores)
        # Ascending, ties in the order of their token ids, as TopPLogitsWarper's sort of the whole row puts them
        # (a GPU's radix sort is stable); where top-p cuts between tied tokens, the same ones are dropped.
        indices, by_id = indices.sort(-1)
        values, ascending = values.gather(-1, by_id).sort(dim=-1, stable=True)
        indices = indices.gather(-1, ascending)
        candidates = values.masked_fill(values < kth, -float("inf"))  # top-k keeps every score at least the k-th
        # top-p: drop the scores whose cumulative probability is at most 1 - top_p, never the last min_tokens_to_keep
        if self.top_p >= 1.0:  # generate adds no top-p warper then
            dropped = torch.zeros_like(candidates, dtype=torch.bool)
        else:
            dropped = candidates.softmax(-1).cumsum(-1) <= 1 - self.top_p
            dropped[..., -self.min_keep :] = False
        out = torch.full_like(scaled, -float("inf"))
        return out.scatter_(-1, indices, candidates.masked_fill(dropped, -float("inf")))

    def _warpers(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        """transformers' warpers, FALLBACK_ROWS rows at a time (each warper works row by row)."""
        out = torch.empty_like(scores)
        for start in range(0, scores.shape[0], FALLBACK_ROWS):
            rows = slice(start, start + FALLBACK_ROWS)
            warped = scores[rows]
            for warper in self.warpers:
                warped = warper(None if input_ids is None else input_ids[rows], warped)
            out[rows] = warped
        return out
