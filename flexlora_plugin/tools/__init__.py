"""Tools around the library, each a command line: none of the library's modules imports them.

* :mod:`.flower_run`: ``python -m flexlora_plugin.flower.run``, the Flower App supervised end to
  end (simulation, or a loopback deployment: it starts and reaps SuperLink, SuperNodes and Ray).
* :mod:`.evaluate`: ``python -m flexlora_plugin.evaluate``, Rouge-L of a base model plus adapter.
* :mod:`.models`: ``python -m flexlora_plugin.tools.models``, SmolLM2-135M-Instruct converted to a
  transformers folder, with its tokenizer's special tokens set and checked.
* :mod:`.tiny`: ``python -m flexlora_plugin.tools.tiny OUT``, a tiny random LLaMA for plumbing checks.
"""
