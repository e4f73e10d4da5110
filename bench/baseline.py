"""Seed-style baselines, written the way a course project writes them, to measure adl-llm against.

- `train_baseline`: the Hugging Face `Trainer` with the seed report's settings: NF4 base (double quantisation,
  bf16 compute), `prepare_model_for_kbit_training`, LoRA r=64 alpha=16 dropout=0.1 on q_proj/v_proj, micro-batch
  2 x accumulation 8, gradient checkpointing, lr 3e-5 linear, bf16; seq2seq-style padding with labels -100 on
  the prompt, full logits and the model's own loss.
- `ppl_baseline`: the course `ppl.py`: one example at a time, logits over the whole vocabulary at every position.
- `generate_baseline`: one prompt at a time through `model.generate`.

Inputs are the token ids of `adl_llm.encode` (and the same `[BOS] + tok(prompt)` prefix for generation), so a
difference in speed or in numbers comes from how the work is done, not from what is fed in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from adl_llm.decoding import cut_at_stop
from adl_llm.encode import IGNORE, Encoded
from adl_llm.kernels import plain_kernels
from bench import measure

# The seed report's QLoRA settings (DESIGN.md).
SEED = {
    "r": 64,
    "lora_alpha": 16,
    "lora_dropout": 0.1,
    "target_modules": ["q_proj", "v_proj"],
    "micro_batch_size": 2,
    "grad_accum": 8,
    "lr": 3e-5,
    "schedule": "linear",
    "gradient_checkpointing": True,
}


def load_nf4(model_path: str):
    """The base model in 4-bit NF4 with double quantisation and bf16 compute, as the QLoRA recipes load it, with
    transformers' own kernels whatever an earlier run of this process patched (adl-llm's or TRL's Liger)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    plain_kernels()

    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    return AutoModelForCausalLM.from_pretrained(
        model_path, quantization_config=quant, dtype=torch.bfloat16, device_map={"": str(measure.device())}
    )


def load_tokenizer(model_path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token_id is None:  # Llama ships none; pads are masked out, so any id will do
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"  # what QLoRA scripts set for training
    return tokenizer


class _CountingCollator:
    """Seq2seq padding (labels padded with -100) that also records the real tokens of each batch it builds.

    The data loader may build a batch ahead of the one in use, so the count of the batches actually trained
    on is the first `steps * grad_accum` entries, in the order they were built.
    """

    def __init__(self, tokenizer):
        from transformers import DataCollatorForSeq2Seq

        self.pad = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE)
        self.tokens: list[int] = []

    def __call__(self, features):
        batch = self.pad(features)
        self.tokens.append(int(batch["attention_mask"].sum()))
        return batch


def step_clock():
    """A Trainer callback that times each optimiser step (GPU synced) and keeps the logged loss of each."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.seconds: list[float] = []
            self.losses: list[float] = []
            self._started = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self._started = measure.now()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(measure.now() - self._started)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    return StepClock()


def train_baseline(model_path: str, examples: Sequence[Encoded], steps: int, *, work_dir: Path, warmup: int) -> dict:
    """`steps` optimiser steps of seed-style QLoRA through the Hugging Face Trainer; speed, memory and losses."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import Trainer, TrainingArguments, set_seed

    on_gpu = torch.cuda.is_available()
    measure.reset_peak()
    set_seed(0)
    tokenizer = load_tokenizer(model_path)
    model = prepare_model_for_kbit_training(load_nf4(model_path))
    lora = LoraConfig(
        r=SEED["r"],
        lora_alpha=SEED["lora_alpha"],
        lora_dropout=SEED["lora_dropout"],
        target_modules=SEED["target_modules"],
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    args = TrainingArguments(
        output_dir=str(work_dir),
        per_device_train_batch_size=SEED["micro_batch_size"],
        gradient_accumulation_steps=SEED["grad_accum"],
        gradient_checkpointing=SEED["gradient_checkpointing"],
        learning_rate=SEED["lr"],
        lr_scheduler_type=SEED["schedule"],
        max_steps=steps,
        bf16=on_gpu,  # bf16 autocast as the seed ran it; a CPU smoke run stays in the weights' dtypes
        use_cpu=not on_gpu,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,
        seed=0,
    )
    rows = [{"input_ids": e.input_ids, "attention_mask": [1] * len(e.input_ids), "labels": e.labels} for e in examples]
    collator = _CountingCollator(tokenizer)
    clock = step_clock()
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collator, callbacks=[clock])
    started = measure.now()
    trainer.train()
    wall = measure.now() - started
    memory = measure.peak()
    trainer.accelerator.free_memory()
    del trainer, model
    measure.free()

    accum = SEED["grad_accum"]  # micro-batches per step: exact while the steps stay inside the first epoch
    step_tokens = [sum(collator.tokens[i * accum : (i + 1) * accum]) for i in range(len(clock.seconds))]
    return {
        **measure.rates(step_tokens, clock.seconds, warmup),
        "losses": clock.losses,
        "wall_seconds": wall,
        **memory,
        "settings": {**SEED, "trainer": "transformers.Trainer", "bf16_autocast": on_gpu},
    }


@torch.no_grad()
def ppl_baseline(model, examples: Sequence[Encoded]) -> tuple[list[float], float]:
    """The course ppl.py: per example, full logits, shift by one, mean NLL over the answer tokens, exp.

    Returns the per-example perplexities (NaN where no answer token is left) and the seconds it took.
    """
    model.eval()
    device = next(model.parameters()).device
    values = []
    started = measure.now()
    for ex in examples:
        input_ids = torch.tensor([ex.input_ids], device=device)
        labels = torch.tensor([ex.labels], device=device)
        logits = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits
        # fp32 cross-entropy, as adl-llm computes it, so the comparison shows batching effects, not bf16 rounding.
        shift_logits, shift_labels = logits[0, :-1].float(), labels[0, 1:]
        mask = shift_labels != IGNORE
        if not mask.any():
            values.append(math.nan)
            continue
        nll = F.cross_entropy(shift_logits[mask], shift_labels[mask])
        values.append(math.exp(nll.item()))
    return values, measure.now() - started


@torch.no_grad()
def generate_baseline(model, tokenizer, prompts: Sequence[str], gen) -> dict:
    """One prompt at a time through `model.generate` with the settings of `gen` (an adl_llm GenConfig).

    Stops at EOS, `gen.max_new_tokens` or a stop string (transformers' own StopStringCriteria), so a difference
    in speed comes from batching, not from generating more; the text from the stop string on is cut.
    """
    from transformers import StoppingCriteriaList, StopStringCriteria

    model.eval()
    device = next(model.parameters()).device
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    sampling = {"top_p": gen.top_p, "top_k": gen.top_k, "temperature": gen.temperature} if gen.do_sample else {}
    # Built once: `generate(stop_strings=...)` rebuilds these vocabulary tables on every call (about 0.5 s for
    # Gemma's 262k tokens), a cost of that API, not of decoding one prompt at a time.
    stops = StoppingCriteriaList([StopStringCriteria(tokenizer, list(gen.stop_strings))])
    texts = []
    measure.reset_peak()
    started = measure.now()
    for prompt in prompts:
        input_ids = torch.tensor([bos + tokenizer(prompt, add_special_tokens=False)["input_ids"]], device=device)
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            num_beams=gen.beams,
            do_sample=gen.do_sample,
            max_new_tokens=gen.max_new_tokens,
            stopping_criteria=stops,
            pad_token_id=tokenizer.pad_token_id,
            **sampling,
        )
        text = tokenizer.decode(out[0, input_ids.shape[1] :], skip_special_tokens=True)
        texts.append(cut_at_stop(text, gen.stop_strings))
    seconds = measure.now() - started
    return {"texts": texts, "seconds": seconds, "examples_per_s": len(prompts) / seconds, **measure.peak()}
