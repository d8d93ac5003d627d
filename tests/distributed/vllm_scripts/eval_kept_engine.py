"""`trl-guided eval --backend vllm` for several models in one process, inside `kept_vllm_engine()`: the first model
starts the engine, the others have their weights loaded into it (vLLM's in-place reload).

Run with the .venv-vllm python: `python eval_kept_engine.py WORKDIR ARGV_JSON` (a list of eval argument lists, run
in order in WORKDIR). Prints `REPORT {"engines": [model folder of each engine started]}`.
"""

from __future__ import annotations

import json
import os
import sys

import _common  # noqa: F401  (offline, quiet and CPU settings before vLLM is imported)
import vllm

from trl_guided import cli
from trl_guided.vllm_engine import kept_vllm_engine


def main() -> None:
    workdir, argv_sets = sys.argv[1], json.loads(sys.argv[2])
    engines = []
    engine_class = vllm.LLM

    class CountedLLM(engine_class):
        def __init__(self, **kwargs):
            engines.append(kwargs["model"])
            super().__init__(**kwargs)

    vllm.LLM = CountedLLM  # evaluate imports LLM from vllm when it generates
    os.environ["TRL_GUIDED_VLLM_DTYPE"] = "float32"  # as the transformers backend it is compared with
    os.chdir(workdir)  # the reward module is imported from the working directory, as with recipes
    with kept_vllm_engine():
        for argv in argv_sets:
            _common.check(cli.main(argv) == 0, f"eval {argv} failed")
    print("REPORT " + json.dumps({"ok": True, "engines": engines}), flush=True)


if __name__ == "__main__":
    main()
