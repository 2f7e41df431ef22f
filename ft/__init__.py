"""ft: reproducible single-GPU QLoRA fine-tuning.

The package is a library; `ft.cli` is a thin entrypoint over it. Importing `ft` is cheap on purpose:
torch, transformers and friends are imported only inside the functions that need them.
"""

__version__ = "0.1.0"
