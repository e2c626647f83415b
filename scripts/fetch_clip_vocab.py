"""Writes a CLIP tokenizer's ``vocab.json`` and ``merges.txt`` derived from the real CLIP BPE file.

The BPE merges (``bpe_simple_vocab_16e6.txt.gz``) ship inside the ``open_clip_torch`` wheel.
The wheel is downloaded once with ``pip download --no-deps`` into ``.cache/wheels`` (never
installed: it would pull torchvision) and the file is read straight from the zip. The vocab is
built exactly as CLIP's own ``SimpleTokenizer`` builds it: the 256 byte symbols, the same with
``</w>``, one entry per merge, then ``<|startoftext|>`` and ``<|endoftext|>``.

Tests use it to build a tiny text-to-image pipeline offline; ``--max-merges`` keeps only the
first merges, giving a smaller vocabulary that still tokenizes any text.

Usage::

    python scripts/fetch_clip_vocab.py --dest .cache/clip-vocab [--max-merges 2000]
"""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
import zipfile
from pathlib import Path

WHEEL_SPEC = "open_clip_torch==3.3.0"
WHEEL_GLOB = "open_clip_torch-3.3.0-*.whl"
BPE_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_WHEEL_DIR = REPO_ROOT / ".cache" / "wheels"
# CLIP uses the first 49152 - 256 - 2 merges of the file (after its version line).
CLIP_MERGES = 49152 - 256 - 2


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible map from bytes to printable unicode characters."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


def find_or_download_wheel(wheel_dir: Path = DEFAULT_WHEEL_DIR) -> Path:
    """The open_clip_torch wheel in ``wheel_dir``, downloaded (not installed) if absent."""
    found = sorted(wheel_dir.glob(WHEEL_GLOB))
    if found:
        return found[0]
    wheel_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", WHEEL_SPEC]
    subprocess.run([*command, "-d", str(wheel_dir)], check=True, capture_output=True)
    found = sorted(wheel_dir.glob(WHEEL_GLOB))
    if not found:
        raise FileNotFoundError(f"pip download did not leave {WHEEL_GLOB} in {wheel_dir}")
    return found[0]


def read_bpe_merges(wheel: Path) -> list[str]:
    """The merge lines of CLIP's BPE file (without the version line), as CLIP uses them."""
    with zipfile.ZipFile(wheel) as archive:
        lines = gzip.decompress(archive.read(BPE_MEMBER)).decode("utf-8").split("\n")
    return lines[1 : CLIP_MERGES + 1]


def write_clip_vocab(dest: Path, merges: list[str], *, max_merges: int | None = None) -> None:
    """Writes ``vocab.json`` and ``merges.txt`` (Hugging Face CLIPTokenizer format) to ``dest``."""
    used = merges[:max_merges] if max_merges is not None else merges
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols]
    vocab += ["".join(merge.split()) for merge in used]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    dest.mkdir(parents=True, exist_ok=True)
    mapping = {token: index for index, token in enumerate(vocab)}
    (dest / "vocab.json").write_text(json.dumps(mapping, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2", *used]  # no merges at all: the version line alone
    (dest / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def ensure_clip_vocab(
    dest: Path, *, max_merges: int | None = None, wheel_dir: Path = DEFAULT_WHEEL_DIR
) -> Path:
    """Makes sure ``dest`` holds ``vocab.json`` and ``merges.txt``; returns ``dest``."""
    if not ((dest / "vocab.json").is_file() and (dest / "merges.txt").is_file()):
        write_clip_vocab(
            dest, read_bpe_merges(find_or_download_wheel(wheel_dir)), max_merges=max_merges
        )
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, required=True)
    parser.add_argument("--max-merges", type=int, default=None)
    parser.add_argument("--wheel-dir", type=Path, default=DEFAULT_WHEEL_DIR)
    args = parser.parse_args()
    out = ensure_clip_vocab(args.dest, max_merges=args.max_merges, wheel_dir=args.wheel_dir)
    vocab = json.loads((out / "vocab.json").read_text(encoding="utf-8"))
    print(f"wrote {out / 'vocab.json'} ({len(vocab)} tokens) and {out / 'merges.txt'}")


if __name__ == "__main__":
    main()
