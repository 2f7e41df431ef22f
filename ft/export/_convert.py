"""Child process: run llama.cpp's convert_hf_to_gguf.py from an unpacked tree (see ft.export.llamacpp).

    python -m ft.export._convert LLAMA_DIR MODEL_DIR [converter args] [--ft-pre-tokenizer NAME]

`--ft-pre-tokenizer` names the BPE pre-tokenizer for a tokenizer the converter's fingerprint list does
not know (it hashes token ids of a fixed text, so a tokenizer trained on the spot, like ft's tiny one, is
never listed). It is used only when the fingerprint is unknown; a recognised tokenizer keeps its own.
"""

from __future__ import annotations

import sys


def main() -> None:
    llama_dir, *args = sys.argv[1:]
    pre = None
    if "--ft-pre-tokenizer" in args:
        i = args.index("--ft-pre-tokenizer")
        pre = args[i + 1]
        del args[i : i + 2]
    sys.path.insert(0, llama_dir)
    sys.path.insert(1, f"{llama_dir}/gguf-py")
    import convert_hf_to_gguf
    from conversion import base

    if pre:
        original = base.TextModel.get_vocab_base_pre

        def get_vocab_base_pre(self, tokenizer) -> str:
            try:
                return original(self, tokenizer)
            except NotImplementedError:
                return pre

        base.TextModel.get_vocab_base_pre = get_vocab_base_pre
    sys.argv = ["convert_hf_to_gguf.py", *args]
    convert_hf_to_gguf.main()


if __name__ == "__main__":
    main()
