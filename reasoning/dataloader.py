"""BOS-aligned best-fit packing of documents into (B, T+1) token rows, DDP-aware and exactly resumable.

Every row starts at a document start (its BOS), so no position attends across a document boundary into text
it never saw the start of. Documents are tokenized a row group at a time into a buffer; a row is filled by
repeatedly taking the largest buffered document that fits the space left (best fit); when none fits, the
shortest one is cropped to fill the row exactly and its remainder is thrown away (continuing it in another
row would start that row mid-document, without a BOS). This is the packing nanochat uses; the cost is the
cropped tokens, reported in `loader.stats` (`packing_stats` for several loaders).

Resuming: the state yielded with each batch names the next unread row group and, for every buffered document,
where it came from (epoch, shard, row group, row). Rebuilding the buffer from those references and
continuing from that position reproduces the following batches bit for bit, because the buffer order, the
refill decisions and the best-fit choices depend on nothing else.
"""

from __future__ import annotations

import bisect
import math
import queue
import threading
from collections import defaultdict

import numpy as np
import torch

from reasoning.common import UserError
from reasoning.dataset import open_split, resolve_data_dir
from reasoning.distributed import all_reduce_sum

STATE_VERSION = 1
_COUNT_KEYS = ("docs_taken", "docs_cropped", "tokens_taken", "tokens_emitted", "tokens_whole")


class PackedLoader:
    """Iterator of (inputs (B, T) long, targets (B, T) long, state dict) from one split of the corpus.

    num_epochs=None loops over the split forever (training); num_epochs=1 makes one deterministic pass and
    drops the final partial batch (validation). Rank r of world_size reads global row groups r, r+W, ...
    buffer_size is the number of documents the buffer is topped up to before each pick; topping up tokenizes a
    whole row group, so the buffer holds between buffer_size and buffer_size + one row group of documents.
    """

    def __init__(self, tokenizer, batch_size: int, max_seq_len: int, data_dir: str | None = None, split: str = "train",
                 rank: int = 0, world_size: int = 1, device: str | torch.device = "cpu", buffer_size: int = 1000,
                 num_epochs: int | None = None, resume_state: dict | None = None):
        if batch_size < 1 or max_seq_len < 1 or buffer_size < 1:
            raise ValueError(f"batch_size, max_seq_len and buffer_size must be >= 1, "
                             f"got {batch_size}, {max_seq_len}, {buffer_size}")
        if num_epochs is not None and num_epochs < 1:
            raise ValueError(f"num_epochs must be None (forever) or >= 1, got {num_epochs}")
        self.tokenizer = tokenizer
        self.bos = tokenizer.bos_token_id
        self.batch_size, self.max_seq_len, self.buffer_size = batch_size, max_seq_len, buffer_size
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.num_epochs = num_epochs
        self.data_dir = resolve_data_dir(data_dir)
        self.split = split
        self.shards = open_split(self.data_dir, split)
        if self.shards.owned_row_groups(rank, world_size) == 0:
            raise UserError(f"{split} split of {self.data_dir} has {self.shards.total_row_groups} parquet row groups, "
                            f"fewer than world_size={world_size}: rank {rank} would get no data")

        # buffer: _keys sorted by (length, seq) so best fit is a bisect; seq is the insertion order, which breaks
        # ties the same way before and after a resume
        self._keys: list[tuple[int, int]] = []
        # seq -> (tokens, (epoch, shard, row group, row)): the reference is what a resume state stores
        self._docs: dict[int, tuple[list[int], tuple[int, int, int, int]]] = {}
        self._next_seq = 0
        self.epoch = 0
        self._position = (0, 0)  # next unread (shard, row group) of this epoch
        self._row_groups = None  # iterator over this rank's row groups from _position
        self._exhausted = False
        self.batches = 0
        self._counts = dict.fromkeys(_COUNT_KEYS, 0)
        if resume_state is not None:
            self._restore(resume_state)

    # ---- buffer ------------------------------------------------------------------------------------------------
    def _add_docs(self, epoch: int, shard: int, group: int, rows: list[int], texts: list[str]):
        for row, tokens in zip(rows, self.tokenizer.encode(texts, prepend=self.bos)):
            if not tokens or tokens[0] != self.bos:
                raise ValueError("tokenizer.encode(texts, prepend=bos) must return id lists that start with bos")
            seq = self._next_seq
            self._next_seq += 1
            self._docs[seq] = (tokens, (epoch, shard, group, row))
            bisect.insort(self._keys, (len(tokens), seq))

    def _refill(self) -> bool:
        """Tokenize this rank's next row group into the buffer; False once the last epoch is used up."""
        while not self._exhausted:
            if self._row_groups is None:
                self._row_groups = self.shards.iter_row_groups(self.rank, self.world_size, start=self._position)
            item = next(self._row_groups, None)
            if item is not None:
                shard, group, texts = item
                self._position = (shard, group + 1)
                self._add_docs(self.epoch, shard, group, list(range(len(texts))), texts)
                return True
            if self.num_epochs is not None and self.epoch + 1 >= self.num_epochs:
                self._exhausted = True
            else:
                self.epoch += 1
                self._position, self._row_groups = (0, 0), None
        return False

    def _take(self, space: int) -> list[int]:
        """The largest buffered document of at most `space` tokens, else the shortest one cropped to `space`."""
        i = bisect.bisect_right(self._keys, (space, math.inf)) - 1
        cropped = i < 0
        length, seq = self._keys.pop(0 if cropped else i)
        tokens = self._docs.pop(seq)[0]
        c = self._counts
        c["docs_taken"] += 1
        c["tokens_taken"] += length
        if cropped:
            c["docs_cropped"] += 1
            return tokens[:space]
        c["tokens_whole"] += length
        return tokens

    def _next_rows(self) -> list[list[int]] | None:
        """B rows of T+1 tokens, or None when a finite loader runs out of documents."""
        rows = []
        for _ in range(self.batch_size):
            row: list[int] = []
            while len(row) <= self.max_seq_len:
                while len(self._keys) < self.buffer_size and self._refill():
                    pass
                if not self._keys:
                    return None
                row.extend(self._take(self.max_seq_len + 1 - len(row)))
            rows.append(row)
        return rows

    # ---- iteration ---------------------------------------------------------------------------------------------
    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor, dict]:
        rows = self._next_rows()
        if rows is None:
            raise StopIteration
        self.batches += 1
        self._counts["tokens_emitted"] += self.batch_size * (self.max_seq_len + 1)
        packed = np.array(rows, dtype=np.int64)  # (B, T+1); ~10x faster than torch.tensor on nested lists
        inputs = torch.from_numpy(np.ascontiguousarray(packed[:, :-1]))  # (B, T)
        targets = torch.from_numpy(np.ascontiguousarray(packed[:, 1:]))  # (B, T)
        if self.device.type == "cuda":
            inputs = inputs.pin_memory().to(self.device, non_blocking=True)
            targets = targets.pin_memory().to(self.device, non_blocking=True)
        elif self.device.type != "cpu":
            inputs, targets = inputs.to(self.device), targets.to(self.device)
        return inputs, targets, self.state_dict()

    # ---- resume ------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """JSON-able position after the last yielded batch; pass as resume_state to continue exactly there."""
        groups: dict[tuple[int, int, int], list[int]] = defaultdict(list)
        for _tokens, (epoch, shard, group, row) in self._docs.values():
            groups[(epoch, shard, group)].append(row)
        return {
            "version": STATE_VERSION,
            "split": self.split,
            "epoch": self.epoch,
            "shard": self._position[0],
            "row_group": self._position[1],
            "rank": self.rank,
            "world_size": self.world_size,
            "num_shards": len(self.shards.paths),
            "batches": self.batches,
            "exhausted": self._exhausted,
            "counts": dict(self._counts),  # packing counters, so `stats` covers the whole run across resumes
            # buffered documents, grouped by source row group: [epoch, shard, row group, [rows]]
            "buffer": [[e, s, g, sorted(rows)] for (e, s, g), rows in sorted(groups.items())],
        }

    def _restore(self, state: dict):
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ValueError(f"resume_state must be a dict from PackedLoader.state_dict() (version {STATE_VERSION})")
        for key, mine in (("split", self.split), ("rank", self.rank), ("world_size", self.world_size)):
            if state[key] != mine:
                raise ValueError(f"resume_state has {key}={state[key]!r} but this loader has {key}={mine!r}")
        if state["num_shards"] != len(self.shards.paths):
            raise UserError(f"resume state was saved with {state['num_shards']} {self.split} shards but "
                            f"{self.data_dir} now has {len(self.shards.paths)}; restore that shard set to resume")
        self.epoch = state["epoch"]
        self._position = (state["shard"], state["row_group"])
        self.batches = state["batches"]
        self._exhausted = state["exhausted"]
        self._counts.update(state.get("counts", {}))  # absent in states written before the counters were saved
        # groups are sorted by (epoch, shard, row group) and rows ascending: exactly the original insertion order
        for epoch, shard, group, rows in state["buffer"]:
            texts = self.shards.read(shard, group)
            self._add_docs(epoch, shard, group, rows, [texts[r] for r in rows])

    # ---- reporting ---------------------------------------------------------------------------------------------
    @property
    def counts(self) -> dict:
        """Raw packing counters since the start of the run (restored on resume); `packing_stats` derives ratios."""
        return dict(self._counts)

    @property
    def stats(self) -> dict:
        """Packing efficiency since the start of the run: `packing_stats` of this loader, plus buffered_docs."""
        return packing_stats([self._counts]) | {"buffered_docs": len(self._keys)}


def packing_stats(counts: list[dict]) -> dict:
    """Packing efficiency of one or more loaders taken together (their `counts`: e.g. every data rank's).

    token_utilization: fraction of the tokens of documents taken from the buffer that reached a row (the
        rest were cropped away). The "packing utilisation" training reports.
    whole_doc_fill: fraction of row positions holding tokens of documents placed whole. Every position holds
        a document token (rows are never padded), so this is the meaningful "filled" measure: the rest are
        the cropped document heads that close rows.
    crop_rate: fraction of taken documents that were cropped.
    """
    c = {key: sum(one[key] for one in counts) for key in _COUNT_KEYS}
    c["token_utilization"] = c["tokens_emitted"] / c["tokens_taken"] if c["tokens_taken"] else 1.0
    c["whole_doc_fill"] = c["tokens_whole"] / c["tokens_emitted"] if c["tokens_emitted"] else 1.0
    c["crop_rate"] = c["docs_cropped"] / c["docs_taken"] if c["docs_taken"] else 0.0
    return c


class Prefetcher:
    """Iterates a loader on a background thread, `depth` batches ahead: the next batch is tokenized, packed and
    copied to the device while the accelerator computes the current step (tokenization releases the GIL, and the
    main thread mostly waits on the device).

    Same batches in the same order as the loader itself (one producer, a FIFO). `counts` is the packing counters
    as of the last batch handed out (taken from its state), not of the batches read ahead, so reports and resume
    states are exactly what they are without prefetching. An error in the loader is raised by the next `next()`.
    Call `close()` when done (training loops do, in `finally`), or the thread idles until the process exits."""

    _END = object()

    def __init__(self, loader, depth: int = 1):
        self._loader = loader
        self._counts = loader.counts
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="batch-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self):
        try:
            for batch in self._loader:
                if not self._put(("batch", batch)):
                    return
            self._put(("end", None))
        except BaseException as e:  # handed to the consumer, raised there
            self._put(("error", e))

    def __iter__(self):
        return self

    def __next__(self):
        kind, value = self._queue.get()
        if kind == "end":
            self._queue.put((kind, value))  # later calls stop too
            raise StopIteration
        if kind == "error":
            raise value
        self._counts = value[-1]["counts"]
        return value

    @property
    def counts(self) -> dict:
        return dict(self._counts)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def build_train_loader(tokenizer, batch_size: int, max_seq_len: int, data_dir: str | None = None, rank: int = 0,
                       world_size: int = 1, device: str | torch.device = "cpu", buffer_size: int = 1000,
                       resume_state: dict | None = None) -> PackedLoader:
    """Endless multi-epoch loader over the train shards."""
    return PackedLoader(tokenizer, batch_size, max_seq_len, data_dir, "train", rank, world_size, device, buffer_size,
                        num_epochs=None, resume_state=resume_state)


def build_val_loader(tokenizer, batch_size: int, max_seq_len: int, data_dir: str | None = None, rank: int = 0,
                     world_size: int = 1, device: str | torch.device = "cpu", buffer_size: int = 1000) -> PackedLoader:
    """One deterministic pass over the validation shard (same batches every call), for bits per byte."""
    return PackedLoader(tokenizer, batch_size, max_seq_len, data_dir, "val", rank, world_size, device, buffer_size,
                        num_epochs=1)


@torch.no_grad()
def evaluate_bpb(model, batches, token_bytes: torch.Tensor, max_steps: int | None = None) -> float:
    """Bits per byte: summed cross-entropy (nats) of targets that stand for text, over ln 2 times their bytes.

    Tokenizer-independent, unlike per-token loss. Targets that are special tokens (token_bytes == 0) or ignored
    (-1) count in neither sum. `batches` yields (inputs, targets, ...) tuples; under torch.distributed the sums
    are all-reduced so every rank gets the global figure.
    """
    total_nats, total_bytes = None, None
    for step, batch in enumerate(batches):
        if max_steps is not None and step >= max_steps:
            break
        x, y = batch[0], batch[1]
        losses = model(x, y, loss_reduction="none").float()  # (B, T) nats
        num_bytes = torch.where(y >= 0, token_bytes.to(y.device)[y.clamp(min=0)], 0)  # (B, T)
        counted = num_bytes > 0
        acc_dtype = torch.float32 if y.device.type == "mps" else torch.float64  # MPS has no float64
        nats = torch.where(counted, losses, 0.0).sum(dtype=acc_dtype)
        nbytes = num_bytes.sum(dtype=acc_dtype)
        total_nats = nats if total_nats is None else total_nats + nats
        total_bytes = nbytes if total_bytes is None else total_bytes + nbytes
    if total_nats is None:
        raise ValueError("evaluate_bpb got no batches")
    sums = all_reduce_sum(torch.stack([total_nats, total_bytes]))
    total_nats, total_bytes = sums[0], sums[1]
    if total_bytes.item() == 0:
        raise ValueError("evaluate_bpb: no target tokens with a byte length (all special or ignored)")
    return total_nats.item() / (math.log(2) * total_bytes.item())
