#!/usr/bin/env python3
"""Held-out pages for the small reader, and what DeepSeek's official code reads on them.

  python weights/reader/evaluate.py --ref-code DIR --ckpt CKPT --out PAGES --pages 12

writes `page-NN.png` (held-out seeds, never trained on) and `reader.json`: per page its ground truth and
the official model's greedy output in Tiny mode with `Free OCR.` (the official `infer` preprocessing and
prompt, the model's own `generate`: greedy, no_repeat_ngram_size 20, EOS 1, float32), its token ids and
its character error rate, plus the mean CER: what a Rust test reading the same pages with dsocr
compares against (tokens equal) once a checkpoint reads. Run with OMP_NUM_THREADS=2 OMP_WAIT_POLICY=PASSIVE.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import train  # noqa: E402
from train import PROMPT, cer, ref, synthdoc  # noqa: E402

MAX_NEW_TOKENS = 128


def load(modeling, deepencoder, ckpt: pathlib.Path):
    """The official model with the checkpoint's weights, widened to float32."""
    cfg = json.loads((ckpt / "config.json").read_text(encoding="utf-8"))
    model = ref.build_model(modeling, deepencoder, cfg, seed=None)
    train.load_weights(model, ckpt)
    return model.eval()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ref-code", type=pathlib.Path, required=True)
    ap.add_argument("--ckpt", type=pathlib.Path, required=True)
    ap.add_argument("--out", type=pathlib.Path, required=True)
    ap.add_argument("--pages", type=int, default=12)
    ap.add_argument("--first", type=int, default=0, help="first held-out index")
    args = ap.parse_args()
    torch.set_num_threads(2)
    modeling, deepencoder = ref.load_reference(args.ref_code)
    model = load(modeling, deepencoder, args.ckpt)
    tokenizer = ref.load_tokenizer(args.ckpt)
    args.out.mkdir(parents=True, exist_ok=True)
    pages = []
    for i in range(args.first, args.first + args.pages):
        seed = synthdoc.HELDOUT_BASE + i
        img, truth = synthdoc.page(seed)
        name = f"page-{i:02d}.png"
        path = args.out / name
        img.save(path, optimize=True)
        inputs = ref.official_inputs(modeling, model, tokenizer, path, PROMPT, ("tiny", 512, 512, False))
        tokens, _ = ref.run_greedy(model, inputs, tokens=MAX_NEW_TOKENS)
        if tokens and tokens[-1] == train.EOS:
            tokens = tokens[:-1]
        text = tokenizer.decode(tokens).strip()  # dsocr's `text` is trimmed the same way
        c = cer(text, truth)
        pages.append(dict(image=name, seed=seed, truth=truth, official_text=text, official_tokens=tokens,
                          cer=round(c, 5)))
        print(f"{name}: CER {c:.3f} {text!r}", flush=True)
    mean = sum(p["cer"] for p in pages) / len(pages)
    report = dict(prompt=PROMPT, mode="tiny", max_new_tokens=MAX_NEW_TOKENS, no_repeat_ngram_size=20,
                  mean_cer=round(mean, 5), pages=pages)
    (args.out / "reader.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"mean CER {mean:.4f} over {len(pages)} pages")
    return 0


if __name__ == "__main__":
    sys.exit(main())
