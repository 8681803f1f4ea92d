"""`make demo`: data-free distillation (DKDM) of the shipped digits teacher into a 4x smaller student.

    python scripts/digits_demo.py [--long | --smoke] [--teacher_path PT] [--device cpu|cuda|cuda:N]

The default (short) schedule finishes in under 10 minutes on 2 CPU cores; --long is the full schedule (minutes
on a GPU); --smoke runs a few steps for CI. Each stage is one of the papers' scripts, run on a config written
to the output folder experiments/digits_demo/<time>/ (logs in its logs/).
"""

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    """Parse flags, pin the device through CUDA_VISIBLE_DEVICES, then run the demo."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--long", action="store_true", help="the full schedule (minutes on a GPU)")
    mode.add_argument("--smoke", action="store_true", help="a few steps and samples (CI)")
    parser.add_argument("--teacher_path", default=None, help="default model/digits16_teacher.pt")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: a GPU if there is one)")
    parser.add_argument("--output_root", default="experiments/digits_demo")
    parser.add_argument("--data_dir", default="experiments/data/digits")
    parser.add_argument("--schedules", default=None, help="schedules file (default yaml/digits_16/demo.yaml)")
    args = parser.parse_args()
    if args.device is not None:
        if args.device == "cpu":
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
        elif args.device.startswith("cuda:"):
            os.environ["CUDA_VISIBLE_DEVICES"] = args.device.split(":", 1)[1]
        elif args.device != "cuda":
            parser.error(f"--device must be cpu, cuda or cuda:N; got {args.device!r}")

    from guided_diffusion.digits_demo import StageError, run_demo

    try:
        run_demo(
            "long" if args.long else "smoke" if args.smoke else "short",
            teacher_path=args.teacher_path, output_root=args.output_root, data_dir=args.data_dir,
            **({"schedules": args.schedules} if args.schedules else {}),
        )
    except (FileNotFoundError, StageError) as exc:
        sys.exit(f"digits_demo: error: {exc}")


if __name__ == "__main__":
    main()
