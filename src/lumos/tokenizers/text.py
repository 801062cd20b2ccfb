"""Text tokenizer: a thin wrapper around a HuggingFace ``tokenizers`` JSON file.

Loads the official Chameleon ``text_tokenizer.json`` (a BPE tokenizer) or a byte-level BPE trained
on captions with :func:`train_bpe`. In Lumos id 0 is BOS and pad, so trained tokenizers reserve
id 0 for the ``<pad>`` special token and real text ids lie in ``[1, vocab_size)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

__all__ = ["TextTokenizer", "train_bpe", "PAD_TOKEN"]

PAD_TOKEN = "<pad>"


class TextTokenizer:
    """Encode text to ids and back with a ``tokenizers.Tokenizer``."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    @classmethod
    def from_file(cls, path: str | Path) -> TextTokenizer:
        """Load a ``tokenizer.json`` file (e.g. Chameleon's ``text_tokenizer.json``)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"text tokenizer file {str(path)!r} does not exist")
        try:
            return cls(Tokenizer.from_file(str(path)))
        except Exception as exc:  # tokenizers raises a bare Exception subclass
            raise ValueError(f"cannot parse text tokenizer file {str(path)!r}: {exc}") from exc

    @property
    def vocab_size(self) -> int:
        """Number of ids, special / added tokens included."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def pad_id(self) -> int | None:
        """Id of ``<pad>`` if the vocabulary has it (0 for :func:`train_bpe` tokenizers)."""
        return self.tokenizer.token_to_id(PAD_TOKEN)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Text -> ids. By default no BOS/EOS is added (the sequence builder adds BOS itself)."""
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def encode_batch(
        self, texts: Sequence[str], add_special_tokens: bool = False
    ) -> list[list[int]]:
        """Several texts -> lists of ids."""
        encs = self.tokenizer.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        return [list(e.ids) for e in encs]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Ids -> text; special tokens (pad/BOS) are dropped by default."""
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def id_to_token(self, idx: int) -> str | None:
        return self.tokenizer.id_to_token(idx)

    def save(self, path: str | Path) -> Path:
        """Write the tokenizer JSON to ``path`` (parent folders are created)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(path))
        return path

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"TextTokenizer(vocab_size={self.vocab_size})"


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    min_frequency: int = 2,
    special_tokens: Sequence[str] = (),
) -> TextTokenizer:
    """Train a byte-level BPE on ``texts`` with ``vocab_size`` ids in all.

    Id 0 is ``<pad>`` (Lumos uses it as BOS and pad); ``special_tokens`` follow at ids 1, 2, ...;
    then the 256 byte symbols and the learned merges. Any text round-trips exactly through
    ``decode(encode(text))``. ``vocab_size`` must leave room for the 256 bytes and the specials
    (the result may be smaller when the corpus has too few merges).
    """
    specials = [PAD_TOKEN, *[s for s in special_tokens if s != PAD_TOKEN]]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    minimum = len(alphabet) + len(specials) + 1
    if vocab_size < minimum:
        raise ValueError(f"vocab_size must be >= {minimum} for a byte-level BPE, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    if tok.token_to_id(PAD_TOKEN) != 0:  # defensive: the trainer adds specials first
        raise RuntimeError("BPE training did not assign id 0 to <pad>")
    return TextTokenizer(tok)
