"""Command line: ``python -m earlin_sklearn demo`` (also installed as ``earlin demo``)."""

import argparse
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(prog="earlin", description="EARLIN early OOD detection.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the whole method offline on scikit-learn's digits")
    demo.add_argument("--layer", default="layer1", help="detection layer of the demo CNN (stem, layer1, layer2)")
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "demo":
        from ._demo import run_demo

        run_demo(layer=args.layer, seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
