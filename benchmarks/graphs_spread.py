"""How far graphed and eager runs of one seed drift apart, against two eager runs (GPU only).

    python3 benchmarks/graphs_spread.py [--backend flex] [--steps 12]

Trains the `small` preset three times from seed 0 on the same synthetic shards (eager, eager again,
with runtime.cuda_graphs) through tests/trainer/test_graphs_gpu.py's `_train`, then prints the val
loss of each and the relative L2 distance of the parameters: eager vs eager is the run-to-run spread
(atomics in the attention backward), eager vs graphed what the graphs add. docs/performance.md
(session 6) has the H200 figures; the GPU test asserts the second is within 3× the first.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "trainer")]


def main(argv: list[str] | None = None) -> int:
    from test_graphs_gpu import _train

    from trainer.data import write_synthetic

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="flex", choices=["flex", "fa4"])
    ap.add_argument("--steps", type=int, default=12)
    args = ap.parse_args(argv)
    data = Path(tempfile.mkdtemp(prefix="graphs-spread-"))
    write_synthetic(data, train_tokens=4_000_000, val_tokens=262_144, vocab=50257, bos_id=50256, seed=5,
                    mean_doc_len=600, zipf_a=1.1, shard_tokens=4_000_000)
    runs = {}
    for name, graphs in (("eager", False), ("eager again", False), ("graphed", True)):
        run, loss, params = _train(args.backend, graphs, data, steps=args.steps)
        runs[name] = (loss, params)
        print(f"{name:>12}: val loss {loss:.6f}, graphs captured {run.steps.captures}", flush=True)
        del run
    base_loss, base = runs["eager"]
    for name in ("eager again", "graphed"):
        loss, p = runs[name]
        print(f"eager vs {name}: val loss Δ {abs(loss - base_loss):.2e}, "
              f"parameters {float((p - base).norm() / base.norm()):.2%} apart (relative L2)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
