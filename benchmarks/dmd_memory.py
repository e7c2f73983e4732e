"""DMD memory: one frozen base carrying the student and fake-score LoRAs (teacher = adapters off) against three
separate networks (frozen teacher + full student + full fake score), on an SD1.5-shaped pipeline built in code.

Each mode runs a few DMD steps in a fresh process; we report the bytes of model state (unique parameter
tensors + gradients + AdamW moments) and the process's peak resident memory (``ru_maxrss``, CPU) or CUDA
``max_memory_allocated``.

    python benchmarks/dmd_memory.py [--width 128] [--steps 3] [--out benchmarks/results/dmd_memory.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = {
    "shared-base LoRA (1 UNet + 2 adapters)": ["method.student.lora.rank=32", "method.fake_score.lora.rank=32",
                                               "method.shared_base=true"],
    "three copies (teacher + full student + full fake)": ["method.student.lora=null", "method.fake_score.lora=null"],
}


def child(base: str, mode: str, steps: int, out: str) -> None:
    import torch

    from stepdistill.config import load_config
    from stepdistill.trainers import Trainer, method_class

    cfg = load_config(ROOT / "configs/sd15/dmd2_lora.yaml",
                      [f"model.pretrained={base}", f"train.steps={steps}", "train.batch_size=4",
                       "train.log_with=none", "train.precision=fp32", "train.gradient_checkpointing=false",
                       "method.student_every=1", f"data.file={ROOT / 'configs/prompts/coco_style.txt'}",
                       *MODES[mode]])
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with tempfile.TemporaryDirectory() as tmp:
        t = Trainer(cfg, method_class("dmd"), Path(tmp) / "run", show_progress=False)
        t.fit()
        seen, params, trainable = set(), 0, 0
        for net in [*t.nets.values(), t.method.teacher.net]:
            for p in net.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    params += p.numel() * p.element_size()
        for named in t.params.values():
            trainable += sum(p.numel() * p.element_size() for _, p in named)
    state = params + 3 * trainable  # gradients + two AdamW moments per trainable parameter
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    Path(out).write_text(json.dumps({"mode": mode, "param_mb": params / 2**20, "trainable_mb": trainable / 2**20,
                                     "model_state_mb": state / 2**20, "peak_rss_mb": rss / 1024,
                                     "rss_before_mb": rss0 / 1024,
                                     "cuda_peak_mb": None if peak is None else peak / 2**20}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=192, help="UNet base channels (192: ~28M-parameter UNet)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/dmd_memory.json")
    ap.add_argument("--child", nargs=3, metavar=("BASE", "MODE", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.steps, args.child[2])
        return
    from stepdistill.testing import tiny_sd_pipeline

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = tiny_sd_pipeline(Path(tmp) / "base", width=args.width, latent_size=16)
        for mode in MODES:
            res = Path(tmp) / "res.json"
            subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--child", str(base), mode,
                            str(res)], check=True, cwd=ROOT, capture_output=True)
            rows.append(json.loads(res.read_text()))
    print(f"{'mode':52s} {'params MB':>10s} {'trainable MB':>13s} {'model state MB':>15s} {'peak RSS MB':>12s}")
    for r in rows:
        print(f"{r['mode']:52s} {r['param_mb']:10.1f} {r['trainable_mb']:13.1f} {r['model_state_mb']:15.1f} "
              f"{r['peak_rss_mb']:12.0f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"width": args.width, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
