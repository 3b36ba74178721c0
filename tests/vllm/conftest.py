"""tests/vllm run in .venv-vllm (scripts/setup_vllm.sh); where vLLM is not installed they are not collected.

One thread everywhere and a small KV cache: these tests share the machine with everything else. The engine
runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so a model-side error reaches the test.
"""

from __future__ import annotations

import importlib.util
import os

if importlib.util.find_spec("vllm") is None:
    collect_ignore_glob = ["test_*.py"]  # the main .venv: never import vLLM there
else:
    for key, value in {
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }.items():
        os.environ.setdefault(key, value)
