"""Which GPU a size prediction is measured against: a small catalogue, a memory amount, or the one present.

`--gpu` accepts a catalogue name (`rtx4090`, `a100-80gb`, `h100`, ...), an amount with a unit
(`24GiB`, `80GB`, `16G`), or nothing (the GPU torch sees, if any). Amounts are read literally:
GiB = 2**30 bytes, GB = 10**9 bytes, a bare `G` means GiB (what `nvidia-smi` and torch report).

Peak figures are the vendors' dense BF16 tensor-core numbers (no 2:4 sparsity), with FP32 accumulate
on GeForce cards (half the FP16-accumulate figure there). They are the denominator of FLOP
utilisation and of the wall-time estimate, so an entry without a trustworthy figure has `None`.
Memory is what the driver reports as the card's total (nvidia-smi's memory.total, torch's
total_memory), which is less than the marketing figure on several cards (an "80 GB" H100 reports
81559 MiB, a "24 GB" L4 23034 MiB); the CUDA context inside it is a term of the size model.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import asdict, dataclass

from ft.errors import FtError

GIB = 1 << 30


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_bytes: int
    bf16_tflops: float | None  # dense peak; None = unknown (no wall-time estimate from it)
    bf16: bool = True  # False: no bfloat16 (Turing/Volta): ft trains in float16 there
    source: str = "catalogue"  # catalogue | amount | detected

    def to_dict(self) -> dict:
        return asdict(self)


def _gib(n: float) -> int:
    return int(n * GIB)


def _mib(n: int) -> int:
    return n << 20


# name -> (memory, dense bf16 TFLOP/s, has bf16). TFLOP/s from NVIDIA's product datasheets / architecture
# whitepapers (Ampere GA102, Ada AD102, Hopper H100/H200); memory as the driver reports it where that is
# below the nominal size (MiB, nvidia-smi memory.total), else the nominal GiB.
CATALOGUE: dict[str, Gpu] = {
    g.name: g
    for g in [
        Gpu("rtx4060-laptop-8gb", _gib(8), None),  # peak depends on the laptop's power limit; no fixed figure
        Gpu("rtx3060-12gb", _gib(12), 25.6),  # GA106: 51.2 FP16-acc, 25.6 FP32-acc
        Gpu("rtx4080", _gib(16), 97.5),  # AD103, FP32 accumulate
        Gpu("rtx3090", _gib(24), 71.0),  # GA102 whitepaper: 71 TFLOPS BF16 with FP32 accumulate
        Gpu("rtx4090", _mib(24564), 165.2),  # AD102 whitepaper: 165.2 TFLOPS BF16 with FP32 accumulate
        Gpu("a10g", _mib(23028), None),  # AWS g5 variant of the A10; NVIDIA publishes no A10G datasheet
        Gpu("a10", _mib(23028), 125.0),
        Gpu("l4", _mib(23034), 121.0),
        Gpu("t4", _mib(15360), 65.0, bf16=False),  # no bfloat16: the FP16 tensor figure
        Gpu("rtx-a6000", _mib(49140), 154.8),
        Gpu("l40s", _mib(46068), 362.1),
        Gpu("a100-40gb", _gib(40), 312.0),
        Gpu("a100-80gb", _gib(80), 312.0),
        Gpu("h100", _mib(81559), 989.4),  # H100 SXM5 80 GB
        Gpu("h100-pcie", _mib(81559), 756.0),
        Gpu("h200", _mib(143771), 989.4),  # H200 SXM 141 GB (HBM3e), same compute as H100 SXM
    ]
}
ALIASES = {
    "4090": "rtx4090",
    "3090": "rtx3090",
    "a100": "a100-80gb",
    "h100-sxm": "h100",
    "h100-80gb": "h100",
    "a6000": "rtx-a6000",
    "rtx4060-laptop": "rtx4060-laptop-8gb",
}

# A unit is required: a bare "4090" is a card's name, not 4090 GiB.
_UNITS = {
    "g": GIB,
    "gi": GIB,
    "gib": GIB,
    "gb": 10**9,
    "m": 1 << 20,
    "mi": 1 << 20,
    "mib": 1 << 20,
    "mb": 10**6,
    "t": 1 << 40,
    "ti": 1 << 40,
    "tib": 1 << 40,
    "tb": 10**12,
}
_AMOUNT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]+)\s*$")


def parse_amount(text: str) -> int | None:
    """`24GiB` -> 25769803776, `80GB` -> 80000000000; None if `text` is not an amount."""
    m = _AMOUNT.match(text)
    if not m:
        return None
    unit = m.group(2).lower()
    if unit not in _UNITS:
        return None
    return int(float(m.group(1)) * _UNITS[unit])


def _normalise(name: str) -> str:
    return re.sub(r"[\s_]+", "-", name.strip().lower()).removeprefix("nvidia-")


def parse_gpu(spec: str) -> Gpu:
    """A GPU from `--gpu`: a catalogue name or a memory amount. Unknown names get a did-you-mean."""
    amount = parse_amount(spec)
    if amount is not None:
        if amount <= 0:
            raise FtError(f"--gpu {spec}: memory must be positive")
        return Gpu(f"{spec.strip()} GPU", amount, None, source="amount")
    key = _normalise(spec)
    key = ALIASES.get(key, key)
    if key in CATALOGUE:
        return CATALOGUE[key]
    names = sorted([*CATALOGUE, *ALIASES])
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise FtError(
        f"--gpu {spec}: unknown GPU{hint}",
        hint="give a memory amount such as 24GiB or 80GB, or one of: " + ", ".join(sorted(CATALOGUE)),
    )


def match_name(device_name: str, memory_bytes: int) -> Gpu | None:
    """The catalogue entry for a name torch reports (e.g. 'NVIDIA H100 80GB HBM3'), if any."""
    n = device_name.lower().replace("geforce", "").replace("nvidia", "")
    n = re.sub(r"\s+", " ", n).strip()
    gib = memory_bytes / GIB
    if "h200" in n:
        return CATALOGUE["h200"]
    if "h100" in n:
        return CATALOGUE["h100-pcie" if "pcie" in n else "h100"]
    if "a100" in n:
        return CATALOGUE["a100-80gb" if gib > 48 else "a100-40gb"]
    for key, needle in [
        ("rtx4090", "rtx 4090"),
        ("rtx4080", "rtx 4080"),
        ("rtx3090", "rtx 3090"),
        ("l40s", "l40s"),
        ("rtx-a6000", "rtx a6000"),
        ("a10g", "a10g"),
        ("l4", "l4"),
        ("t4", "t4"),
    ]:
        if re.search(rf"(^|\s){re.escape(needle)}(\s|$)", n):
            return CATALOGUE[key]
    if re.search(r"(^|\s)a10(\s|$)", n):
        return CATALOGUE["a10"]
    return None


def detect() -> Gpu | None:
    """The GPU torch sees (device 0), or None. Imports torch only when an NVIDIA device node exists."""
    from ft.manifest import cuda_available

    if not cuda_available():
        return None
    import torch

    props = torch.cuda.get_device_properties(0)
    known = match_name(props.name, props.total_memory)
    return Gpu(
        props.name,
        int(props.total_memory),
        known.bf16_tflops if known else None,
        bf16=props.major >= 8,
        source="detected",
    )


def resolve(spec: str | None) -> Gpu | None:
    """`--gpu` as given, else the present GPU, else None (prediction without a fit verdict)."""
    return parse_gpu(spec) if spec else detect()
