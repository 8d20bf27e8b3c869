"""Profile spiffe-pep under ab load with py-spy and print where the time goes.

    python -m loadtests.profile_proxy [--mode keepalive|handshake] [--seconds 8]

Starts the same lab as ``compare`` (nginx upstream, spiffe-pep with 1 worker), drives it
with ApacheBench while ``py-spy record`` samples the proxy, then prints the top functions
by self time and by file. Bounded: one ab run of ``--requests``.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from loadtests.compare import Lab, ab, start_all, write_pki


def summarize(raw: Path, top: int) -> list[str]:
    by_func: collections.Counter[str] = collections.Counter()
    by_file: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        leaf = stack.split(";")[-1]
        by_func[leaf] += n
        file = leaf.split("(")[-1].split(":")[0] if "(" in leaf else leaf
        for marker in ("site-packages/", "lib/python3.11/", "/main/"):
            if marker in file:
                file = file.split(marker, 1)[1]
        by_file[file] += n
    out = [f"{total} samples", "self time by function:"]
    out += [f"  {100 * n / total:5.1f}%  {f}" for f, n in by_func.most_common(top)]
    out += ["self time by file:"]
    out += [f"  {100 * n / total:5.1f}%  {f}" for f, n in by_file.most_common(top)]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=["keepalive", "handshake"], default="keepalive")
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--native", action="store_true", help="include C frames (py-spy --native)")
    args = ap.parse_args()
    if shutil.which("py-spy") is None and not Path(sys.executable).with_name("py-spy").exists():
        raise SystemExit("py-spy is needed: pip install py-spy")
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    lab = Lab(Path(tempfile.mkdtemp(prefix="spiffe-pep-profile-")))
    write_pki(lab.dir)
    try:
        _, _, pep = start_all(lab)
        ab(lab, pep, True, 500)
        raw = lab.dir / "profile.txt"
        spy = subprocess.Popen(
            [
                py_spy,
                "record",
                "--format",
                "raw",
                "-o",
                str(raw),
                "-d",
                str(args.seconds),
                "-r",
                "200",
                "-p",
                str(pep.proc.pid),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        got = ab(lab, pep, args.mode == "keepalive", args.requests)
        spy.wait(args.seconds + 30)
        print(f"ab {args.mode}: {got['rps']:.0f} req/s, {got['cpu_us']:.0f} µs proxy CPU/request")
        for line in summarize(raw, args.top):
            print(line)
    finally:
        lab.stop_all()
        shutil.rmtree(lab.dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
