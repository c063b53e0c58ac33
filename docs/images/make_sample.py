"""Regenerate docs/images/sample.png, the photo the README's set-up command restores: the synthetic scene of
make_before_after.py, degraded the same way (x4 down/up, blur, noise, JPEG q20). Made here, from nothing
but code, so it is free of any licence. Run from the repository root: ``python docs/images/make_sample.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from make_before_after import degrade, scene  # noqa: E402


def main() -> None:
    degrade(scene()).save(HERE / "sample.png", optimize=True)


if __name__ == "__main__":
    main()
