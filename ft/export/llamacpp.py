"""llama.cpp, pinned: the converter from the llama-cpp-python sdist, quantisation and loading via its wheel.

Nothing is cloned or downloaded at export time. The installed `llama_cpp` package (built from the
hashed lock's sdist) quantises and runs GGUF files; its wheel does not ship llama.cpp's converter, so
the converter (`convert_hf_to_gguf.py`, `conversion/`, `gguf-py/`) is unpacked once from that same
sdist, checked against the sha256 pinned here (the lockfiles pin the same one; a test keeps them in
step), into `<venv>/share/ft/llama.cpp-<version>/`:

    python -m ft.export.llamacpp install SDIST.tar.gz   # nox and the image do this at install time

`FT_LLAMA_CPP_DIR` points elsewhere (an unpacked llama.cpp tree) when needed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path, PurePosixPath

from ft.errors import FtError
from ft.fsutil import atomic_dir, sha256_file, write_json

VERSION = "0.3.36"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
SDIST_NAME = f"llama_cpp_python-{VERSION}.tar.gz"
_KEEP = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/gguf/", "LICENSE")
# Quantisation names users write -> llama.cpp's LLAMA_FTYPE_* (include/llama.h of the pinned tree).
FTYPES = {"f16": 1, "q8_0": 7, "q4_0": 2, "q5_0": 8, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}
QUANTS = tuple(k for k in FTYPES if k != "f16")


def converter_dir() -> Path:
    env = os.environ.get("FT_LLAMA_CPP_DIR")
    return Path(env) if env else Path(sys.prefix) / "share" / "ft" / f"llama.cpp-{VERSION}"


def install(sdist: Path) -> Path:
    """Unpack the converter from the pinned sdist (sha256-checked) into converter_dir()."""
    sdist = Path(sdist)
    if not sdist.is_file():
        raise FtError(
            f"{sdist}: no such file; get it with `pip download --no-deps --no-binary llama-cpp-python "
            f"llama-cpp-python=={VERSION}`"
        )
    digest = sha256_file(sdist)
    if digest != SDIST_SHA256:
        raise FtError(
            f"{sdist}: sha256 {digest[:12]}... is not the pinned llama-cpp-python {VERSION} "
            f"sdist ({SDIST_SHA256[:12]}...)"
        )
    target = converter_dir()
    prefix = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"
    commit = None
    with tarfile.open(sdist) as tar, atomic_dir(target, replace=True) as staging:
        for member in tar.getmembers():
            if member.name == f"llama_cpp_python-{VERSION}/CHANGELOG.md":
                text = tar.extractfile(member).read().decode("utf-8", "replace")
                m = re.search(r"ggml-org/llama\.cpp@([0-9a-f]{7,40})", text)
                commit = m.group(1) if m else None
            if not member.name.startswith(prefix) or not member.isfile():
                continue
            rel = member.name[len(prefix) :]
            if not rel.startswith(_KEEP) or ".." in PurePosixPath(rel).parts:
                continue
            dest = staging / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(tar.extractfile(member).read())
        if not (staging / "convert_hf_to_gguf.py").is_file():
            raise FtError(f"{sdist}: holds no vendor/llama.cpp/convert_hf_to_gguf.py")
        write_json(
            staging / "source.json",
            {
                "llama_cpp_python": VERSION,
                "sdist_sha256": digest,
                "llama_cpp_commit": commit,
                "commit_source": "first llama.cpp@ reference in the sdist's CHANGELOG.md",
            },
        )
    return target


def facts() -> dict:
    """What the export's manifest records about llama.cpp."""
    out: dict = {"llama_cpp_python_pinned": VERSION}
    try:
        import llama_cpp

        out["llama_cpp_python"] = llama_cpp.__version__
    except ImportError:
        out["llama_cpp_python"] = None
    src = converter_dir() / "source.json"
    if src.is_file():
        out.update(json.loads(src.read_text(encoding="utf-8")))
    return out


def require() -> Path:
    """The converter directory and the llama_cpp package, or one line on how to install them."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise FtError(
            f"llama-cpp-python is not installed; install the project's lock "
            f"(it pins llama-cpp-python=={VERSION}) to export GGUF"
        ) from None
    d = converter_dir()
    if not (d / "convert_hf_to_gguf.py").is_file():
        raise FtError(
            f"llama.cpp's converter is not unpacked ({d}); run `python -m ft.export.llamacpp "
            f"install {SDIST_NAME}` with the pinned sdist (or set FT_LLAMA_CPP_DIR)"
        )
    return d


def convert(model_dir: Path, out: Path, *, outtype: str = "f16", pre_tokenizer: str | None = None) -> None:
    """llama.cpp's convert_hf_to_gguf.py on a merged model, in a child process (it sets up logging/argv)."""
    d = require()
    cmd = [
        sys.executable,
        "-m",
        "ft.export._convert",
        str(d),
        str(model_dir),
        "--outfile",
        str(out),
        "--outtype",
        outtype,
    ]
    if pre_tokenizer:
        cmd += ["--ft-pre-tokenizer", pre_tokenizer]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "NO_LOCAL_GGUF": ""})
    if proc.returncode != 0 or not out.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        if "No space left" in (proc.stderr or ""):
            raise OSError(28, "No space left on device", str(out))
        raise FtError(f"llama.cpp converter failed on {model_dir}: {tail[0]}")


def quantize(src: Path, out: Path, name: str) -> None:
    import ctypes

    import llama_cpp

    if name not in QUANTS:
        raise FtError(f"export.quantizations: unknown quantisation {name!r}; known: {', '.join(QUANTS)}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[name]
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params))
    if rc != 0 or not out.is_file():
        raise FtError(f"llama.cpp quantisation to {name} failed (code {rc}) on {src}")


def tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each GGML type a GGUF holds (k-quants fall back on narrow tensors)."""
    d = require()
    sys.path.insert(0, str(d / "gguf-py"))
    try:
        from gguf import GGUFReader
    finally:
        sys.path.remove(str(d / "gguf-py"))
    counts: dict[str, int] = {}
    for t in GGUFReader(str(path)).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return dict(sorted(counts.items()))


def gguf_metadata(path: Path, keys: tuple[str, ...]) -> dict[str, str]:
    d = require()
    sys.path.insert(0, str(d / "gguf-py"))
    try:
        from gguf import GGUFReader
    finally:
        sys.path.remove(str(d / "gguf-py"))
    reader = GGUFReader(str(path))
    out = {}
    for key in keys:
        f = reader.fields.get(key)
        if f is not None:
            out[key] = bytes(f.parts[f.data[0]]).decode("utf-8")
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] != "install":
        print(f"usage: python -m ft.export.llamacpp install {SDIST_NAME}", file=sys.stderr)
        return 2
    try:
        print(install(Path(argv[1])))
    except FtError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
