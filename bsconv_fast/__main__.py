"""python -m bsconv_fast bench [...]"""
import os
import sys

# numpy's bundled OpenBLAS starts a spinning thread pool that neither contender uses; on a
# 2-core machine it steals cycles from both. Set before torch (and so numpy) is imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m bsconv_fast bench [--help] [options]\n\ncommands:\n  bench  latency, FLOPs and "
              "error of fused vs eager on built-in suites")
        return 0
    if argv[0] == "bench":
        from bsconv_fast.bench import main as bench_main
        return bench_main(argv[1:])
    print(f"unknown command {argv[0]!r}; try: python -m bsconv_fast bench --help", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
