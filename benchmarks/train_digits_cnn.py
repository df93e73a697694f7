"""Train the DigitsCNN whose weights ship in lorasurgeon/assets/digits_cnn.safetensors.

    .venv/bin/python benchmarks/train_digits_cnn.py [--out lorasurgeon/assets/digits_cnn.safetensors]

It is one `lorasurgeon attach --full` run on scikit-learn's digits: 70/10/20 train/val/test split
by seed 0 (the test split is never used for choosing), AdamW, 40 epochs, best epoch by validation
accuracy. The same command gives byte-identical weights on the same machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "lorasurgeon" / "assets" / "digits_cnn.safetensors"))
    ap.add_argument("--epochs", type=int, default=40)
    args = ap.parse_args()
    exe = str(Path(sys.executable).parent / "lorasurgeon")
    cmd = [exe, "attach", "--arch", "lorasurgeon.zoo:digits_cnn", "--data", "digits", "--full", "-o", args.out,
           "--epochs", str(args.epochs), "--lr", "0.003", "--batch-size", "64", "--val-split", "0.1",
           "--test-split", "0.2", "--seed", "0", "--force", "--json", "--quiet"]
    print("$", " ".join(cmd[1:]), file=sys.stderr)
    r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    print(json.dumps({k: r[k] for k in ("val_accuracy", "test_accuracy", "trainable_params")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
