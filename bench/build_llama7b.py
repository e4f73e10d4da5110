"""A random-weight Llama-2-7B-architecture model folder, for speed and memory figures at the seed report's scale.

    python -m bench.build_llama7b /tmp/llama7b            # on the GPU machine: about 20 s to build and save
    python -m bench.build_llama7b /tmp/small --layers 2 --hidden 256 --intermediate 512 --heads 4   # a CPU check

Speed and memory do not depend on the weights' values, and no 7B checkpoint can reach the GPU machine, so the
weights are drawn at random (in bf16, on the GPU when there is one) and saved as safetensors; any loader then
reads the folder like a checkpoint, NF4 included. The tokenizer has one token per character of the data and
the prompts (about as many tokens per Chinese sentence as Llama-2's byte-fallback tokenizer gives, which
splits most CJK characters into one to three tokens), padded with unused entries to Llama-2's 32,000.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from adl_llm.config import PROJECT_ROOT

VOCAB_SIZE = 32000
SPECIALS = ["<unk>", "<s>", "</s>"]  # Llama-2's ids 0, 1, 2


def build_tokenizer(vocab_size: int = VOCAB_SIZE):
    """A character-level fast tokenizer over the vendored data and the prompt configs, with Llama-2's specials."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    data = PROJECT_ROOT / "data" / "classical_zh"
    sources = [data / "train.json", data / "public_test.json", *sorted((PROJECT_ROOT / "conf").rglob("*.yaml"))]
    chars = sorted(set("".join(path.read_text(encoding="utf-8") for path in sources)))
    tokens = SPECIALS + chars
    if len(tokens) > vocab_size:
        raise SystemExit(f"the data has {len(chars)} characters, more than a {vocab_size}-entry vocabulary holds")
    tokens += [f"<unused_{i}>" for i in range(vocab_size - len(tokens))]  # never produced by the pre-tokenizer
    core = Tokenizer(models.WordLevel(vocab={tok: i for i, tok in enumerate(tokens)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # newlines too
    core.decoder = decoders.Fuse()  # characters join without spaces
    # No pad token, as Llama-2: the loaders pad with EOS, and pads are masked out.
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def llama_config(layers: int, hidden: int, intermediate: int, heads: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,  # Llama-2-7B has no grouped-query attention
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )


def build(out: Path, *, layers: int, hidden: int, intermediate: int, heads: int) -> Path:
    """Draw the weights in bf16 on the GPU (or CPU) and save model and tokenizer under `out`."""
    from transformers import LlamaForCausalLM

    started = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = llama_config(layers, hidden, intermediate, heads)
    torch.manual_seed(0)
    with torch.device(device):  # initialise in place: a 7B never exists in fp32 or on the CPU
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"built {n_params / 1e9:.2f}B parameters on {device} in {time.perf_counter() - started:.1f} s", flush=True)
    model.save_pretrained(out, max_shard_size="2GB")
    build_tokenizer().save_pretrained(out)
    print(f"saved {out} in {time.perf_counter() - started:.1f} s", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the model folder to write")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--heads", type=int, default=32)
    args = parser.parse_args()
    build(args.out, layers=args.layers, hidden=args.hidden, intermediate=args.intermediate, heads=args.heads)


if __name__ == "__main__":
    main()
