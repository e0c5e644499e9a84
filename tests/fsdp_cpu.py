"""`llmkit` with accelerate's FSDP path forced on for the CPU: a test-only launcher, never for real runs.

accelerate 1.15 applies an FSDP config to accelerators only. With `cpu=True` (what llmkit passes on a
CPU-only machine) `PartialState` picks `DistributedType.MULTI_CPU` with gloo, and `AcceleratorState`
turns a distributed type into `FSDP` only from the list MULTI_GPU, MULTI_XPU, … (state.py, the
`elif self.distributed_type in [...]` branch of `AcceleratorState.__init__`): the plugin is ignored.
torch's FSDP2 itself runs on the CPU with gloo, so this script changes that one decision and nothing
else: it sets up the process group as llmkit would (`PartialState(cpu=True)`), reports it as multi-GPU
for the moment `Accelerator()` reads it, and runs the real CLI. From there on everything is accelerate's
FSDP code (`fully_shard` in `prepare`, `get_state_dict`, `save_state`/`load_state` with FSDP state
dicts) and llmkit's, on `cpu` devices.

    accelerate launch --config_file fsdp.yaml tests/fsdp_cpu.py finetune …
"""

from __future__ import annotations

import os
import sys

from accelerate.state import PartialState
from accelerate.utils import DistributedType

if __name__ == "__main__":
    state = PartialState(cpu=True)
    if state.distributed_type != DistributedType.MULTI_CPU:
        sys.exit(f"fsdp_cpu.py expects a multi-process CPU launch, got {state.distributed_type}")
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        # Read once, by AcceleratorState.__init__, which then records DistributedType.FSDP in its place.
        PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU
    from llmkit.cli.app import main

    sys.argv[0] = "llmkit"
    main()
