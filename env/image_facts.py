"""Write /etc/ft/image.json during the image build: the facts ft's environment manifest records.

Run by the Dockerfile's last step as `python image_facts.py LOCKFILE OUT` with the build arguments in
the environment. The image id is not knowable inside its own build; it reaches the container at run
time as FT_IMAGE_ID (compose and the nox sessions pass it).
"""

import hashlib
import json
import os
import sys
from importlib.metadata import version


def main(lock_path: str, out_path: str) -> int:
    with open(lock_path, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    claimed = os.environ.get("LOCK_SHA256", "unknown")
    if claimed not in ("unknown", "", sha):
        # The label is computed outside the build; a mismatch means the label would lie about the image.
        print(f"image_facts: LOCK_SHA256={claimed} but {lock_path} hashes to {sha}", file=sys.stderr)
        return 1
    flavour = os.environ.get("FLAVOUR", "unknown")
    facts = {
        "format": "ft-image/1",
        "flavour": flavour,
        "lockfile": f"{flavour}.txt",
        "lockfile_path": lock_path,
        "lockfile_sha256": sha,
        "git_commit": os.environ.get("GIT_COMMIT", "unknown"),
        "build_time": os.environ.get("BUILD_TIME", "unknown"),
        "base_image": os.environ.get("BASE_IMAGE", "unknown"),
        "ft_version": version("ft"),
        "torch": version("torch"),
    }
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(facts, f, indent=2, sort_keys=True)
        f.write("\n")
    os.chmod(out_path, 0o644)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
