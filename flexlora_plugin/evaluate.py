"""``python -m flexlora_plugin.evaluate``: Rouge-L of a base model plus adapter (:mod:`flexlora_plugin.tools.evaluate`)."""

import sys

from .tools.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
