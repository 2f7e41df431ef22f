"""Keep credentials out of everything ft writes.

Manifests record a whitelist of facts, never the environment wholesale; as a second line of defence,
every text ft writes passes through `redact`, which masks the value of any environment variable whose
name looks like a credential (HF_TOKEN, WANDB_API_KEY, AWS_SECRET_ACCESS_KEY, ...).
"""

from __future__ import annotations

import os
import re

SECRET_NAME = re.compile(
    r"(TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL|_KEY$|^KEY$)", re.I
)
MASK = "***"
# Values this short are too likely to collide with ordinary text to be masked safely.
MIN_SECRET_LEN = 6


def is_secret_name(name: str) -> bool:
    return bool(SECRET_NAME.search(name))


def secret_values(environ: dict[str, str] | None = None) -> list[str]:
    env = os.environ if environ is None else environ
    values = {v for k, v in env.items() if is_secret_name(k) and len(v) >= MIN_SECRET_LEN}
    # Longest first, so a secret that contains another is masked whole.
    return sorted(values, key=len, reverse=True)


def redact(text: str, environ: dict[str, str] | None = None) -> str:
    for value in secret_values(environ):
        if value in text:
            text = text.replace(value, MASK)
    return text
