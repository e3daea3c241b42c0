"""``python -m flexlora_plugin.flower.run``: the Flower App end to end (:mod:`flexlora_plugin.tools.flower_run`)."""

import sys

from ..tools.flower_run import main

if __name__ == "__main__":
    sys.exit(main())
