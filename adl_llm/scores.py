"""The study's scores, from per-example values: the course perplexity's summary, chrF and BLEU (sacrebleu)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def perplexity_summary(values: Sequence[float | None]) -> dict[str, float]:
    """The course score (mean of the per-example perplexities) and the median; NaN or None (no answer token left)
    are left out."""
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return {
        "eval/perplexity": sum(finite) / len(finite) if finite else math.nan,
        "eval/perplexity_median": statistics.median(finite) if finite else math.nan,
    }


def translation_scores(hypotheses: list[str], references: list[str]) -> dict[str, float]:
    """chrF and BLEU (sacrebleu, BLEU with its Chinese tokenizer) of the predictions against the references."""
    import sacrebleu

    return {
        "gen/chrf": sacrebleu.corpus_chrf(hypotheses, [references]).score,
        "gen/bleu": sacrebleu.corpus_bleu(hypotheses, [references], tokenize="zh").score,
    }


def sentence_chrf(hypothesis: str, reference: str) -> float:
    import sacrebleu

    return sacrebleu.sentence_chrf(hypothesis, [reference]).score
