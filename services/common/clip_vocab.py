"""The real CLIP BPE tokenizer, derived offline from the vocabulary file in the open_clip wheel.

`make setup` extracts `bpe_simple_vocab_16e6.txt.gz` from the `open_clip_torch` wheel into
`{sys.prefix}/share/dreambooth/` (nothing is downloaded at run time). From it we derive
`vocab.json` and `merges.txt` exactly as OpenAI's CLIP / open_clip's SimpleTokenizer build their
vocabulary, so token ids match real Stable Diffusion text encoders (49,408 tokens).

Load the written folder with `CLIPTokenizer.from_pretrained(dir)`: with transformers 5,
`CLIPTokenizer(vocab_file=..., merges_file=...)` silently builds a 3-token vocabulary.
"""

from __future__ import annotations

import gzip
import json
import os
import sys
from functools import cache
from pathlib import Path

from services.common.errors import FailedPrecondition

BPE_ENV = "DREAMBOOTH_CLIP_BPE"
BPE_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
VOCAB_SIZE = 49408
MODEL_MAX_LENGTH = 77
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
# open_clip keeps the first 49152 - 256 - 2 merges (after the header line): 256 byte tokens,
# 256 byte+'</w>' tokens, the merges and 2 special tokens make 49,408.
_MERGE_COUNT = 49152 - 256 - 2


def default_bpe_path() -> Path:
    """Where the BPE file is: $DREAMBOOTH_CLIP_BPE, else the venv's share/dreambooth folder."""
    override = os.environ.get(BPE_ENV)
    if override:
        return Path(override)
    return Path(sys.prefix) / "share" / "dreambooth" / BPE_FILENAME


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible map from bytes to printable unicode characters."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    byte_values = printable[:]
    code_points = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in byte_values:
            byte_values.append(byte)
            code_points.append(256 + extra)
            extra += 1
    return dict(zip(byte_values, [chr(c) for c in code_points], strict=True))


@cache
def _read_merges(path: Path) -> tuple[tuple[str, str], ...]:
    if not path.is_file():
        raise FailedPrecondition(
            f"CLIP BPE vocabulary not found at {path}: run `make setup` (it extracts "
            f"{BPE_FILENAME} from the open_clip_torch wheel) or set {BPE_ENV} to the file"
        )
    lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _MERGE_COUNT + 1]]
    if len(merges) != _MERGE_COUNT or any(len(m) != 2 for m in merges):
        raise FailedPrecondition(f"{path} is not a CLIP BPE vocabulary file ({len(merges)} merges)")
    return tuple(merges)  # type: ignore[arg-type]


def derive_vocab(bpe_path: Path | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab token -> id, merges) in CLIP's order."""
    merges = list(_read_merges(bpe_path or default_bpe_path()))
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    tokens += ["".join(merge) for merge in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    assert len(tokens) == VOCAB_SIZE, len(tokens)
    return {token: index for index, token in enumerate(tokens)}, merges


def write_clip_tokenizer(out_dir: Path, bpe_path: Path | None = None) -> Path:
    """Write a CLIPTokenizer folder (vocab.json, merges.txt, configs); deterministic bytes."""
    vocab, merges = derive_vocab(bpe_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    merges_text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    (out_dir / "merges.txt").write_text(merges_text, encoding="utf-8")
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": EOS_TOKEN}
    config = {
        **special,
        "add_prefix_space": False,
        "do_lower_case": True,
        "errors": "replace",
        "model_max_length": MODEL_MAX_LENGTH,
        "tokenizer_class": "CLIPTokenizer",
    }
    _write_json(out_dir / "tokenizer_config.json", config)
    _write_json(out_dir / "special_tokens_map.json", special)
    return out_dir


def _write_json(path: Path, value: object) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n", encoding="utf-8")
