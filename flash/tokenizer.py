"""An offline CLIP tokenizer.

The CLIP BPE table (MIT-licensed, from OpenAI's CLIP, as shipped in the
`open_clip_torch` wheel) lives in `flash/assets/bpe_simple_vocab_16e6.txt.gz`; this
module turns it into a transformers `CLIPTokenizer` with the same ids as OpenAI's,
without any download.
"""

from __future__ import annotations

import gzip
import json
import tempfile
from functools import lru_cache
from pathlib import Path

from transformers import CLIPTokenizer

BPE_PATH = Path(__file__).parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
VOCAB_SIZE = 49408


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def vocab_and_merges(bpe_path: Path = BPE_PATH) -> tuple[dict[str, int], list[str]]:
    """CLIP's vocabulary in OpenAI's order: bytes, bytes+</w>, merges, then the two specials."""
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    byte_chars = list(_bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == VOCAB_SIZE
    return {tok: i for i, tok in enumerate(vocab)}, merges


def write_tokenizer_files(out_dir: Path, bpe_path: Path = BPE_PATH) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab, merges = vocab_and_merges(bpe_path)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def build_clip_tokenizer(model_max_length: int = 24) -> CLIPTokenizer:
    """A CLIPTokenizer with OpenAI's ids, built offline (pad = <|endoftext|>, like SD)."""
    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer_files(Path(tmp))
        # transformers 5.x: pass vocab=/merges= paths; vocab_file= silently breaks ids.
        tok = CLIPTokenizer(
            vocab=str(Path(tmp) / "vocab.json"),
            merges=str(Path(tmp) / "merges.txt"),
            model_max_length=model_max_length,
            pad_token="<|endoftext|>",
        )
        tok.save_pretrained(tmp + "/saved")  # detach from the temp files
        return CLIPTokenizer.from_pretrained(tmp + "/saved")
