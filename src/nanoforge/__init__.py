"""nanoforge: a GPT built from scratch in plain PyTorch, trained by Lightning, configured by Hydra.

The package is import-light on purpose: ``import nanoforge`` pulls in nothing heavy, so the
entry points start fast and a newcomer can read each module on its own.
"""

__version__ = "0.1.0"
