"""Batched decoding: prompts sorted by length, left-padded, cut where the model starts a new turn or example.

Each prompt is `[BOS] + tok(prompt)`, exactly the prefix the course perplexity scores the answer after. A
generation ends at EOS, at `gen.max_new_tokens`, or at the first stop string (`USER:` or a newline by default:
3-shot outputs otherwise go on to invent a fourth numbered question); the text from the stop string on is cut.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from adl_llm.config import GenConfig
from adl_llm.distributed import is_main, map_in_order


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """The text before the earliest stop string, without surrounding whitespace."""
    end = min((i for i in (text.find(s) for s in stop_strings) if i >= 0), default=len(text))
    return text[:end].strip()


class _StopStrings(StoppingCriteria):
    """Marks a row done once its new text holds a stop string, so a batch need not run to max_new_tokens."""

    def __init__(self, tokenizer, prompt_width: int, stop_strings: Sequence[str]):
        self.tokenizer, self.prompt_width, self.stop_strings = tokenizer, prompt_width, list(stop_strings)

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_width :], skip_special_tokens=True)
        done = [any(s in text for s in self.stop_strings) for text in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def pad_left(rows: Sequence[list[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and their attention mask: every prompt ends at the last column, where decoding starts."""
    width = max(len(row) for row in rows)
    ids = torch.tensor([[value] * (width - len(row)) + row for row in rows], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows], dtype=torch.long)
    return ids, mask


@torch.no_grad()
def generate_texts(model, tokenizer, prompts: Sequence[str], gen: GenConfig, *, progress: bool = True) -> list[str]:
    """One decoded answer per prompt, in the order of `prompts`."""
    device = next(model.parameters()).device
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    encoded = [bos + ids for ids in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]
    # Longest first: little padding per batch, and an out-of-memory shows in the first batch, not the last.
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    sampling = {"top_p": gen.top_p, "top_k": gen.top_k, "temperature": gen.temperature} if gen.do_sample else {}
    # A complete GenerationConfig, so a model's own defaults (Gemma ships top_k=64, top_p=0.95) never leak in.
    settings = GenerationConfig(
        num_beams=gen.beams,
        do_sample=gen.do_sample,
        max_new_tokens=gen.max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        **sampling,
    )

    def work(share: list[int]) -> list[str]:
        texts: list[str] = []
        bar = tqdm(
            total=len(share), desc=f"generate (beams {gen.beams})", unit="ex", disable=not progress or not is_main()
        )
        for start in range(0, len(share), gen.batch_size):
            ids, mask = pad_left([encoded[i] for i in share[start : start + gen.batch_size]], tokenizer.pad_token_id)
            stops = StoppingCriteriaList([_StopStrings(tokenizer, ids.shape[1], gen.stop_strings)])
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                generation_config=settings,
                stopping_criteria=stops,
            )
            decoded = tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
            texts.extend(cut_at_stop(text, gen.stop_strings) for text in decoded)
            bar.update(len(ids))
        bar.close()
        return texts

    by_index = map_in_order(order, work)  # under torchrun each rank decodes a share
    return [by_index[i] for i in range(len(encoded))]


def count_new_tokens(tokenizer, texts: Sequence[str]) -> int:
    """Tokens of the kept answers (the cut text), for a tokens/s figure that ignores padding and cut tails."""
    return sum(len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]) if texts else 0
