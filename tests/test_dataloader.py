"""Best-fit packing: BOS alignment, parity with a naive packer, DDP disjointness, exact resume, epochs, bpb."""

import itertools
import json
import math
import random

import pytest
import torch

from reasoning.common import UserError
from reasoning.dataloader import PackedLoader, build_train_loader, build_val_loader, evaluate_bpb, packing_stats
from reasoning.dataset import write_shard

ROW_GROUP = 8
ID_BASE = 0x4E00  # each document starts with its own CJK character, so any piece of >= 2 tokens names its doc


class CharTokenizer:
    """Same interface as reasoning.tokenizer.Tokenizer for what the loader uses: one token per character."""

    bos_token_id = 0

    def _ids(self, text, prepend):
        return ([] if prepend is None else [prepend]) + [ord(c) + 1 for c in text]

    def encode(self, text, prepend=None, append=None, num_threads=8):
        assert append is None
        if isinstance(text, str):
            return self._ids(text, prepend)
        return [self._ids(t, prepend) for t in text]

    def decode(self, ids):
        return "".join(chr(i - 1) for i in ids if i != self.bos_token_id)


def make_corpus(tmp_path, shard_docs=(40, 40, 24, 30), max_len=90, seed=0):
    """Shards of random-length documents; the last shard is validation. Returns (data_dir, texts per shard)."""
    rng = random.Random(seed)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    shards, k = [], 0
    for s, n in enumerate(shard_docs):
        docs = []
        for _ in range(n):
            length = rng.randint(0, max_len)
            docs.append(chr(ID_BASE + k) + "".join(rng.choice("abcdefgh") for _ in range(length)))
            k += 1
        write_shard(str(data_dir / f"shard_{s:05d}.parquet"), docs, row_group_size=ROW_GROUP)
        shards.append(docs)
    return str(data_dir), shards


def full_rows(inputs, targets):
    """(B, T+1) rows back from the shifted pair."""
    return torch.cat([inputs, targets[:, -1:]], dim=1)


def segments(row, bos=0):
    """Split a packed row at its BOS tokens: each piece is one document's head (BOS included)."""
    starts = [i for i, t in enumerate(row) if t == bos]
    return [row[a:b] for a, b in zip(starts, starts[1:] + [len(row)])]


def doc_index(piece):
    return piece[1] - 1 - ID_BASE if len(piece) > 1 else None


def reference_pack(token_row_groups, batch_size, max_seq_len, buffer_size, num_batches):
    """Naive best-fit packer over a cycling stream of tokenized row groups (O(buffer) scans, no bisect)."""
    stream = itertools.cycle(token_row_groups)
    buffer, seq, batches = [], 0, []  # buffer entries: (length, seq, tokens)
    for _ in range(num_batches):
        rows = []
        for _ in range(batch_size):
            row = []
            while len(row) < max_seq_len + 1:
                while len(buffer) < buffer_size:
                    for tokens in next(stream):
                        buffer.append((len(tokens), seq, tokens))
                        seq += 1
                space = max_seq_len + 1 - len(row)
                fitting = [d for d in buffer if d[0] <= space]
                pick = max(fitting, key=lambda d: d[:2]) if fitting else min(buffer, key=lambda d: d[:2])
                buffer.remove(pick)
                row += pick[2][:space]
            rows.append(row)
        batches.append(rows)
    return batches


def rank_row_groups(shards, rank, world_size):
    """Texts of the row groups a rank owns: global row group i goes to rank i mod world_size."""
    groups = [docs[g:g + ROW_GROUP] for docs in shards for g in range(0, len(docs), ROW_GROUP)]
    return groups[rank::world_size]


def take(loader, n):
    return [next(loader) for _ in range(n)]


def test_batches_shapes_and_shift(tmp_path):
    data_dir, _ = make_corpus(tmp_path)
    x, y, state = next(build_train_loader(CharTokenizer(), 3, 32, data_dir, buffer_size=16))
    assert x.shape == y.shape == (3, 32) and x.dtype == y.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    json.dumps(state)  # checkpoint meta is JSON


def test_rows_are_bos_aligned_and_never_splice_documents(tmp_path):
    data_dir, shards = make_corpus(tmp_path)
    docs = [d for s in shards[:-1] for d in s]
    loader = PackedLoader(CharTokenizer(), 4, 48, data_dir, buffer_size=12, num_epochs=1)
    used = []
    for x, y, _ in loader:
        for row in full_rows(x, y).tolist():
            assert row[0] == CharTokenizer.bos_token_id
            pieces = segments(row)
            for j, piece in enumerate(pieces):
                k = doc_index(piece)
                text = CharTokenizer().decode(piece)
                if j < len(pieces) - 1:  # only the piece closing a row may be cropped
                    assert text == docs[k]
                elif k is not None:
                    assert docs[k].startswith(text)
                if k is not None:
                    used.append(k)
    assert len(used) == len(set(used))  # within one epoch a document is used at most once
    assert len(used) > 0.8 * len(docs)


@pytest.mark.parametrize("rank,world_size,buffer_size", [(0, 1, 1), (0, 1, 10), (1, 2, 6), (2, 3, 30)])
def test_packing_matches_naive_reference(tmp_path, rank, world_size, buffer_size):
    data_dir, shards = make_corpus(tmp_path)
    tok = CharTokenizer()
    groups = [tok.encode(g, prepend=tok.bos_token_id) for g in rank_row_groups(shards[:-1], rank, world_size)]
    num_batches = 25  # several epochs for every rank
    expected = reference_pack(groups, 2, 40, buffer_size, num_batches)
    loader = build_train_loader(tok, 2, 40, data_dir, rank, world_size, buffer_size=buffer_size)
    for rows, (x, y, _) in zip(expected, take(loader, num_batches)):
        assert full_rows(x, y).tolist() == rows
    # the stats agree with a count made from the reference's own choices
    emitted = num_batches * 2 * 41
    assert loader.stats["tokens_emitted"] == emitted
    assert loader.stats["token_utilization"] == pytest.approx(emitted / loader.stats["tokens_taken"])


def test_utilization_is_high_with_a_buffer_and_reported(tmp_path):
    data_dir, _ = make_corpus(tmp_path, shard_docs=(200, 200, 20), max_len=60)
    tok = CharTokenizer()
    stats = {}
    for buffer_size in (1, 64):
        loader = build_train_loader(tok, 4, 128, data_dir, buffer_size=buffer_size)
        take(loader, 20)
        stats[buffer_size] = loader.stats
    assert stats[64]["token_utilization"] > 0.9
    assert stats[64]["whole_doc_fill"] > 0.9
    # with no choice (buffer of one) rows close by cropping far more often
    assert stats[1]["crop_rate"] > stats[64]["crop_rate"]
    assert stats[1]["token_utilization"] < stats[64]["token_utilization"]
    s = stats[64]
    assert s["tokens_emitted"] == 20 * 4 * 129
    assert s["tokens_emitted"] <= s["tokens_taken"] and s["tokens_whole"] <= s["tokens_emitted"]


def test_packing_stats_combine_loaders_and_survive_resume(tmp_path):
    """What training reports: the utilisation of all its data ranks together, counted since the run started."""
    data_dir, _ = make_corpus(tmp_path, shard_docs=(60, 60, 20), max_len=70)
    tok = CharTokenizer()
    ranks = [build_train_loader(tok, 2, 48, data_dir, rank, 2, buffer_size=1 + 7 * rank) for rank in range(2)]
    for loader, batches in zip(ranks, (5, 9)):  # different buffers and lengths: different utilisations
        take(loader, batches)
    a, b = (loader.counts for loader in ranks)
    together = packing_stats([a, b])
    assert together["tokens_emitted"] == (5 + 9) * 2 * 49
    assert together["token_utilization"] == pytest.approx((a["tokens_emitted"] + b["tokens_emitted"])
                                                          / (a["tokens_taken"] + b["tokens_taken"]))
    assert ranks[0].stats["token_utilization"] != ranks[1].stats["token_utilization"]
    assert min(r.stats["token_utilization"] for r in ranks) < together["token_utilization"] \
        < max(r.stats["token_utilization"] for r in ranks)
    assert packing_stats([])["token_utilization"] == 1.0  # nothing taken: nothing lost

    # a loader resumed from a state continues the counts, so a resumed run reports the whole run
    state = json.loads(json.dumps(ranks[1].state_dict()))
    resumed = build_train_loader(tok, 2, 48, data_dir, 1, 2, buffer_size=8, resume_state=state)
    assert resumed.counts == ranks[1].counts
    take(ranks[1], 3)
    take(resumed, 3)
    assert resumed.stats == ranks[1].stats
    del state["counts"]  # a state saved before the counters were: resumes, counting from there
    assert build_train_loader(tok, 2, 48, data_dir, 1, 2, buffer_size=8, resume_state=state).counts["docs_taken"] == 0


def test_ranks_read_disjoint_documents(tmp_path):
    data_dir, shards = make_corpus(tmp_path)
    seen = []
    for rank in range(2):
        loader = PackedLoader(CharTokenizer(), 2, 40, data_dir, rank=rank, world_size=2, buffer_size=8, num_epochs=1)
        docs = set()
        for x, y, state in loader:
            assert state["rank"] == rank
            docs |= {doc_index(p) for row in full_rows(x, y).tolist() for p in segments(row)} - {None}
        seen.append(docs)
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    # and each rank only ever saw its own row groups
    for rank in range(2):
        own = {ord(t[0]) - ID_BASE for g in rank_row_groups(shards[:-1], rank, 2) for t in g}
        assert seen[rank] <= own


@pytest.mark.parametrize("rank,world_size", [(0, 1), (1, 2)])
def test_resume_reproduces_the_next_batches_exactly(tmp_path, rank, world_size):
    data_dir, _ = make_corpus(tmp_path, shard_docs=(16, 8, 8))
    tok = CharTokenizer()
    original = build_train_loader(tok, 3, 40, data_dir, rank, world_size, buffer_size=10)
    # resume points on both sides of epoch boundaries (an epoch is ~9 batches for one rank, ~3 for rank 1 of 2)
    taken = 0
    for resume_at in (1, 8, 15, 23):
        take(original, resume_at - taken)
        taken = resume_at
        state = json.loads(json.dumps(original.state_dict()))
        resumed = build_train_loader(tok, 3, 40, data_dir, rank, world_size, buffer_size=10, resume_state=state)
        for (x0, y0, s0), (x1, y1, s1) in zip(take(original, 6), take(resumed, 6)):
            assert torch.equal(x0, x1) and torch.equal(y0, y1)
            assert s0 == s1
        taken += 6
    assert original.epoch >= 2


def test_resume_state_from_the_yielded_tuple(tmp_path):
    data_dir, _ = make_corpus(tmp_path)
    tok = CharTokenizer()
    loader = build_train_loader(tok, 2, 24, data_dir, buffer_size=6)
    *_, (_, _, state) = take(loader, 3)
    resumed = build_train_loader(tok, 2, 24, data_dir, buffer_size=6, resume_state=state)
    x0, _, _ = next(loader)
    x1, _, _ = next(resumed)
    assert torch.equal(x0, x1)
    assert state["batches"] == 3 and len(state["buffer"]) > 0


def test_resume_state_is_checked(tmp_path):
    data_dir, _ = make_corpus(tmp_path)
    tok = CharTokenizer()
    state = next(build_train_loader(tok, 2, 24, data_dir, buffer_size=6))[2]
    with pytest.raises(ValueError, match="world_size"):
        build_train_loader(tok, 2, 24, data_dir, rank=0, world_size=2, resume_state=state)
    with pytest.raises(ValueError, match="state_dict"):
        build_train_loader(tok, 2, 24, data_dir, resume_state={"epoch": 0})
    write_shard(str(tmp_path / "data" / "shard_00000b.parquet"), ["extra"])  # the shard set changed
    with pytest.raises(UserError, match="3 train shards.*now has 4"):
        build_train_loader(tok, 2, 24, data_dir, resume_state=state)


def test_multi_epoch_wraps_and_repeats_the_data(tmp_path):
    data_dir, _ = make_corpus(tmp_path, shard_docs=(10, 6, 5))  # two tiny train shards, 3 row groups
    loader = build_train_loader(CharTokenizer(), 2, 30, data_dir, buffer_size=4)
    docs_by_epoch, epochs = {}, []
    for _ in range(40):
        x, y, state = next(loader)
        epochs.append(state["epoch"])
        for row in full_rows(x, y).tolist():
            docs_by_epoch.setdefault(state["epoch"], set()).update(doc_index(p) for p in segments(row))
    assert epochs == sorted(epochs) and epochs[-1] >= 3  # kept going, epoch counter moved forward
    assert docs_by_epoch[0] & docs_by_epoch[2] - {None}  # later epochs see the same documents again


def test_val_loader_is_finite_and_deterministic(tmp_path):
    data_dir, shards = make_corpus(tmp_path)
    tok = CharTokenizer()
    first = [(x, y) for x, y, _ in build_val_loader(tok, 2, 20, data_dir, buffer_size=8)]
    second = [(x, y) for x, y, _ in build_val_loader(tok, 2, 20, data_dir, buffer_size=8)]
    assert len(first) == len(second) > 0
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, second))
    val_ids = {ord(t[0]) - ID_BASE for t in shards[-1]}
    for x, y in first:
        assert {doc_index(p) for row in full_rows(x, y).tolist() for p in segments(row)} - {None} <= val_ids
    # a batch needs 2 * 21 tokens; one pass cannot yield more batches than the shard has tokens for
    val_tokens = sum(len(t) + 1 for t in shards[-1])
    assert len(first) <= val_tokens // 42


def test_more_ranks_than_row_groups_is_a_user_error(tmp_path):
    data_dir, _ = make_corpus(tmp_path)  # val shard: 30 docs in 4 row groups
    with pytest.raises(UserError, match="val split .* 4 parquet row groups, fewer than world_size=5"):
        build_val_loader(CharTokenizer(), 2, 20, data_dir, rank=4, world_size=5)


class LookupLoss(torch.nn.Module):
    """A fake model whose per-token loss is an arbitrary fixed function of (input, target); 0 where ignored."""

    def forward(self, x, y, loss_reduction="mean"):
        assert loss_reduction == "none"
        loss = ((x * 7 + y * 3) % 11).double() / 5 + 0.1
        return torch.where(y >= 0, loss, torch.zeros_like(loss)).float()


def test_evaluate_bpb_matches_hand_computation():
    gen = torch.Generator().manual_seed(0)
    vocab = 50
    token_bytes = torch.randint(0, 5, (vocab,), generator=gen)
    token_bytes[0] = 0  # a special token: counts no bytes and no loss
    batches = []
    for _ in range(3):
        x = torch.randint(0, vocab, (2, 9), generator=gen)
        y = torch.randint(0, vocab, (2, 9), generator=gen)
        y[0, :3] = -1  # ignored targets
        batches.append((x, y, {"unused": "state"}))
    nats = num_bytes = 0.0
    for x, y, _ in batches:
        for xi, yi in zip(x.flatten().tolist(), y.flatten().tolist()):
            if yi >= 0 and token_bytes[yi] > 0:
                nats += float(torch.tensor(((xi * 7 + yi * 3) % 11) / 5 + 0.1, dtype=torch.float32))
                num_bytes += int(token_bytes[yi])
    expected = nats / (math.log(2) * num_bytes)
    assert evaluate_bpb(LookupLoss(), batches, token_bytes) == pytest.approx(expected, rel=1e-12)
    only_first = evaluate_bpb(LookupLoss(), batches, token_bytes, max_steps=1)
    assert only_first != pytest.approx(expected)
    with pytest.raises(ValueError, match="no batches"):
        evaluate_bpb(LookupLoss(), [], token_bytes)


def test_with_the_real_tokenizer(tmp_path):
    from reasoning.tokenizer import MIN_VOCAB_SIZE, train_tokenizer
    data_dir, shards = make_corpus(tmp_path, shard_docs=(24, 16, 8))
    docs = [d for s in shards[:-1] for d in s]
    tok = train_tokenizer(iter(docs), vocab_size=MIN_VOCAB_SIZE + 32)
    loader = PackedLoader(tok, 2, 64, data_dir, buffer_size=8, num_epochs=1)
    batches = 0
    for x, y, _ in loader:
        for row in full_rows(x, y).tolist():
            assert row[0] == tok.bos_token_id
            pieces = segments(row, tok.bos_token_id)
            for piece in pieces[:-1]:  # whole documents, each exactly one of the corpus texts
                assert tok.decode(piece[1:]) in docs
        batches += 1
    assert batches > 0
