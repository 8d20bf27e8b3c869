"""``python -m tests.fuzz TARGET [libFuzzer flags]``: run one target under atheris.

Needs ``pip install -e '.[fuzz]'``. Seeds come from targets.SEEDS (written to a corpus
directory so libFuzzer can grow it). See README.md.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path


def main() -> None:
    import atheris

    with atheris.instrument_imports():
        from tests.fuzz import targets

    if len(sys.argv) < 2 or sys.argv[1] not in targets.TARGETS:
        sys.exit(f"usage: python -m tests.fuzz {{{','.join(targets.TARGETS)}}} [libFuzzer flags]")
    name = sys.argv[1]
    flags = sys.argv[2:]
    if not any(not f.startswith("-") for f in flags):  # no corpus directory given
        corpus = Path(tempfile.mkdtemp(prefix=f"fuzz-{name}-"))
        for i, seed in enumerate(targets.SEEDS[name]):
            (corpus / f"seed{i}").write_bytes(seed)
        flags.append(str(corpus))
        print(f"corpus: {corpus}", file=sys.stderr)
    atheris.Setup([sys.argv[0], *flags], targets.TARGETS[name])
    atheris.Fuzz()


if __name__ == "__main__":
    main()
