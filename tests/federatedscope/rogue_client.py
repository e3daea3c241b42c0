"""A FederatedScope client whose replies use FS's own base64-pickle encoding, one tensor replaced
by a pickle that creates the directory ``$ROGUE_MARKER`` when unpickled.

Run like ``python -m flexlora_plugin.federatedscope.cli``; used by test_processes.py only.
"""

from __future__ import annotations

import base64
import os
import pickle
import sys

from federatedscope.llm.trainer.trainer import LLMTrainer

from flexlora_plugin.federatedscope.cli import main
from flexlora_plugin.federatedscope.trainer import FlexLoRATrainer


class Evil:
    def __reduce__(self):
        return (os.mkdir, (os.environ["ROGUE_MARKER"],))


def pickled_reply(self: FlexLoRATrainer) -> dict[str, str]:
    para = LLMTrainer.get_model_para(self)
    out = {k: base64.b64encode(pickle.dumps(v)).decode() for k, v in para.items()}  # FS's b64serializer
    out[next(iter(out))] = base64.b64encode(pickle.dumps(Evil())).decode()
    return out


FlexLoRATrainer.get_model_para = pickled_reply  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(main())
