"""Run the Triton kernels under the interpreter on CPU (TRITON_INTERPRET=1).

It must be set before anything imports triton (torch and transformers may, while other test modules are
collected), because triton's own helpers are decorated at import time. On a CUDA machine, run
`TRITON_INTERPRET=0 python -m pytest tests/test_kernels.py` to test the compiled kernels.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
