"""From a corpus to training pairs ``(x, y)`` with ``y`` = ``x`` shifted by one (step 2 of the
README's table).

corpus (documents, streamed: :mod:`nanoforge.corpora`) -> tokenizer (``tokenizer=char|bpe``) ->
one token file on disk, encoded once and read back through ``np.memmap``
(:mod:`nanoforge.shards`; ``prepare_data``) -> a contiguous split (the first 90 % of the
characters train, the last 10 % validate) -> random windows of ``block_size + 1`` tokens. The
split happens in one place, the shard's header: training builds the DataModule from
``cfg.data``, and evaluation rebuilds the same one from what the checkpoint recorded
(``TextDataModule.hparams``).

Windows are cut in bulk (one gather per batch, no per-item Python; from a memory map only the
windows' pages are read, so memory does not grow with the corpus), which is why the dataset
yields whole batches. Batch ``i`` of rank ``r`` is drawn from a generator
seeded with ``(seed, split, r, i)``, so the stream is reproducible, differs per DDP rank, and
resumes exactly: a resumed run restarts the stream at the batch index it had reached.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from nanoforge import shards
from nanoforge.corpora import open_corpus
from nanoforge.errors import UserError
from nanoforge.tokenizer import TOKENIZER_KINDS, Tokenizer

_SPLIT_IDS = {"train": 0, "val": 1}


def batch_seed(seed: int, split: str, rank: int, index: int) -> int:
    """A well-mixed 63-bit seed for one batch (SeedSequence hashes the tuple)."""
    state = np.random.SeedSequence([seed, _SPLIT_IDS[split], rank, index]).generate_state(2)
    return int((int(state[0]) << 31) ^ int(state[1]))


def _absolute(path: str) -> str:
    """``path`` made absolute, symlinks resolved where they can be (a symlink loop stays as
    given: reading it is the one-line error of nanoforge.documents)."""
    try:
        return str(Path(path).expanduser().resolve())
    except (OSError, RuntimeError):
        return os.path.abspath(os.path.expanduser(path))


def release_pages(data: np.ndarray) -> None:
    """Unmap the pages of a memory-mapped token file that windows touched. The kernel maps
    whole runs of pages around each read (hundreds of kB per window), so without this the
    resident memory of a run grows towards the size of the corpus; the pages stay in the page
    cache, so reading them again costs no disk access. ~0.1 ms per batch."""
    mm = getattr(data, "_mmap", None)
    if mm is not None and hasattr(mmap, "MADV_DONTNEED"):
        mm.madvise(mmap.MADV_DONTNEED)


def make_windows(data: torch.Tensor | np.ndarray, block_size: int, starts: torch.Tensor):
    """Cut windows of ``block_size + 1`` tokens starting at ``starts``: returns x, y (int64).
    ``data`` is a tensor, or a NumPy array (a memory-mapped token file: only the windows' pages
    are read)."""
    index = starts[:, None] + torch.arange(block_size + 1)
    if isinstance(data, np.ndarray):
        chunk = torch.from_numpy(data[index.numpy()].astype(np.int64))
        release_pages(data)
    else:
        chunk = data[index]  # (B, T+1), one gather
    return chunk[:, :-1], chunk[:, 1:]


class RandomWindows(IterableDataset):
    """Yields batches ``(x, y)`` of random windows; ``num_batches=None`` means forever."""

    def __init__(
        self,
        data: torch.Tensor | np.ndarray,
        block_size: int,
        batch_size: int,
        seed: int,
        split: str,
        rank: int = 0,
        num_batches: int | None = None,
        start_batch: int = 0,
    ):
        super().__init__()
        if len(data) < block_size + 1:
            raise UserError(
                f"the {split} split has {len(data)} tokens, fewer than block_size + 1 = "
                f"{block_size + 1}. Use a longer corpus or a smaller model.block_size."
            )
        self.data, self.block_size, self.batch_size = data, block_size, batch_size
        self.seed, self.split, self.rank = seed, split, rank
        self.num_batches, self.start_batch = num_batches, start_batch
        self.high = len(data) - block_size  # number of valid window starts

    # a memory map travels to DataLoader workers as its file name, not as its contents
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        if isinstance(self.data, np.memmap):
            d = self.data
            state["data"] = ("memmap", d.filename, d.dtype.str, d.offset, d.shape)
        return state

    def __setstate__(self, state: dict) -> None:
        data = state["data"]
        if isinstance(data, tuple) and data[0] == "memmap":
            _, filename, dtype, offset, shape = data
            state["data"] = np.memmap(filename, dtype=dtype, mode="r", offset=offset, shape=shape)
        self.__dict__.update(state)

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(batch_seed(self.seed, self.split, self.rank, index))
        starts = torch.randint(self.high, (self.batch_size,), generator=g)
        return make_windows(self.data, self.block_size, starts)

    def __iter__(self):
        # With W DataLoader workers, worker w yields batches w, w+W, ...; the DataLoader reads
        # workers round-robin, so the stream is the same for any number of workers.
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        index = self.start_batch + worker
        end = None if self.num_batches is None else self.start_batch + self.num_batches
        while end is None or index < end:
            yield self.batch(index)
            index += workers


class FixedBatches(Dataset):
    """The first ``len`` batches of a :class:`RandomWindows` stream, by index: validation
    scores the same batches every time. Map-style, so it has a length (the progress bar's
    total) without the length-on-an-IterableDataset ambiguity Lightning warns about."""

    def __init__(self, windows: RandomWindows, num_batches: int):
        self.windows, self.num_batches = windows, num_batches

    def __len__(self) -> int:
        return self.num_batches

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < self.num_batches:
            raise IndexError(index)
        return self.windows.batch(index)


class TextDataModule(L.LightningDataModule):
    """Any corpus as next-token windows. See the module docstring for the flow.

    ``tokenizer_kind`` / ``vocab_size``: the tokenizer to build from the corpus (``char``, or
    ``bpe`` with ``vocab_size`` tokens, learned from the training split). ``tokenizer``: encode
    with this tokenizer (a checkpoint's) instead; text it cannot encode is a :class:`UserError`.
    """

    def __init__(
        self,
        corpus: str = "shakespeare",
        path: str | None = None,
        tokenizer_kind: str = "char",
        vocab_size: int | None = None,
        block_size: int = 64,
        batch_size: int = 12,
        val_fraction: float = 0.1,
        val_batches: int = 20,
        cache_dir: str | None = "data/cache",
        num_workers: int = 0,
        seed: int = 1337,
        tokenizer: Tokenizer | None = None,
        text_field: str = "text",
        max_chars: int | None = None,
        name: str | None = None,
        config: str | None = None,
        split: str | None = None,
    ):
        super().__init__()
        if tokenizer_kind not in TOKENIZER_KINDS:
            raise UserError(
                f"tokenizer={tokenizer_kind!r} is not a tokenizer: choose "
                f"{' or '.join(TOKENIZER_KINDS)} (tokenizer=bpe tokenizer.vocab_size=N)"
            )
        if tokenizer_kind == "bpe" and (vocab_size is None or int(vocab_size) < 258):
            raise UserError(
                f"tokenizer=bpe needs tokenizer.vocab_size >= 258 (256 bytes, merges and "
                f"<|endoftext|>), got "
                f"{vocab_size}. Use e.g. tokenizer.vocab_size=4096."
            )
        if block_size < 1:
            raise UserError(f"model.block_size must be >= 1, got {block_size}")
        if batch_size < 1:
            raise UserError(f"data.batch_size must be >= 1, got {batch_size}")
        if not 0.0 < val_fraction < 1.0:
            raise UserError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
        if val_batches < 1:
            raise UserError(f"data.val_batches must be >= 1, got {val_batches}")
        # The checkpoint records these arguments (Lightning stores them as
        # `datamodule_hyper_parameters`) with absolute paths: eval.py rebuilds this DataModule
        # from them, from any working directory.
        self.save_hyperparameters(
            {
                "corpus": corpus,
                "path": _absolute(path) if path else None,
                "tokenizer_kind": tokenizer_kind,
                "vocab_size": int(vocab_size) if tokenizer_kind == "bpe" else None,
                "block_size": block_size,
                "batch_size": batch_size,
                "val_fraction": val_fraction,
                "val_batches": val_batches,
                "cache_dir": _absolute(cache_dir) if cache_dir else None,
                "num_workers": num_workers,
                "seed": seed,
                "text_field": text_field,
                "max_chars": int(max_chars) if max_chars else None,
                **({"name": name, "config": config, "split": split} if corpus == "hf" else {}),
            }
        )
        self.text_field, self.max_chars = text_field, max_chars
        self.hf = {"name": name, "config": config, "split": split}
        self.corpus, self.path, self.cache_dir = corpus, path, cache_dir
        self.tokenizer_kind = tokenizer_kind
        self.vocab_size = int(vocab_size) if tokenizer_kind == "bpe" else None
        self.block_size, self.batch_size = block_size, batch_size
        self.val_fraction, self.val_batches = val_fraction, val_batches
        self.num_workers, self.seed = num_workers, seed
        self.tokenizer: Tokenizer | None = tokenizer
        # the tokens: memory maps of the token file (arrays when cache_dir is None)
        self.train_ids: np.ndarray | None = None
        self.val_ids: np.ndarray | None = None
        self.header: dict | None = None
        self.text_sha256: str | None = None

    def setup(self, stage: str | None = None) -> None:
        """Load, tokenize and split once (idempotent: Lightning may call it again)."""
        if self.train_ids is not None:
            return
        shard = self.shard()
        self.text_sha256 = shard.header["source_sha256"]
        n_train, n_val = len(shard.train), len(shard.val)
        for split, n in (("train", n_train), ("val", n_val)):
            if stage in (None, "fit") and n < self.block_size + 1:
                raise UserError(
                    f"the corpus has {n_train + n_val} tokens: its {split} split ({n}) is shorter "
                    f"than block_size + 1 = {self.block_size + 1}. Use a longer corpus or a "
                    "smaller model.block_size."
                )
        self.tokenizer = shard.tokenizer
        self.train_ids, self.val_ids = shard.train, shard.val
        self.header = shard.header

    def prepare_data(self) -> None:
        """Encode the corpus into its token file once (Lightning runs this on one process per
        node, before ``setup``); a sound file already there is kept."""
        if self.cache_dir and self.train_ids is None:
            self.shard()

    def shard(self) -> shards.Shard:
        """The corpus's tokens, from the token file in ``cache_dir`` (made if missing)."""
        corpus = open_corpus(
            self.corpus, self.path, self.cache_dir, self.text_field, self.max_chars, self.hf
        )
        return shards.load_or_prepare(
            corpus,
            self.tokenizer_kind,
            self.vocab_size,
            self.val_fraction,
            self.cache_dir,
            tokenizer=self.tokenizer,
        )

    # --- what the data was: saved in every checkpoint (Lightning calls state_dict), so that a
    # resume can refuse to continue on other text (training.check_same_data)
    def state_dict(self) -> dict:
        if self.text_sha256 is None:
            return {}
        source = self.hparams["path"] or f"corpus {self.corpus}"
        return {"source": source, "text_sha256": self.text_sha256, "split": self.val_fraction}

    def load_state_dict(self, state_dict: dict) -> None:
        """Nothing to restore: the stream position comes from the global step."""

    def _rank(self) -> int:
        return self.trainer.global_rank if self.trainer is not None else 0

    def train_dataloader(self) -> DataLoader:
        # Resume: restart the stream at the batch the restored run had reached.
        start = 0
        if self.trainer is not None and not self.trainer.overfit_batches:
            start = self.trainer.global_step * self.trainer.accumulate_grad_batches
        ds = RandomWindows(
            self.train_ids,
            self.block_size,
            self.batch_size,
            self.seed,
            "train",
            rank=self._rank(),
            start_batch=start,
        )
        return self._loader(ds)

    def val_dataloader(self) -> DataLoader:
        # The same fixed batches at every validation: curves compare like with like.
        windows = RandomWindows(
            self.val_ids, self.block_size, self.batch_size, self.seed, "val", rank=self._rank()
        )
        return self._loader(FixedBatches(windows, self.val_batches))

    def _loader(self, ds: RandomWindows | FixedBatches) -> DataLoader:
        return DataLoader(
            ds,
            batch_size=None,  # the dataset yields whole batches
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )
