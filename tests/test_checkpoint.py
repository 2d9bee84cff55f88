"""Checkpoints: exact roundtrip of weights/optimizer/meta/RNG, crash safety of the atomic writes, discovery of the
last complete step, pruning, clear errors for missing or corrupt files, and load_model rebuilding a GPT."""

import hashlib
import json
import os
import random

import numpy as np
import pytest
import torch
import torch.nn as nn

from reasoning import checkpoint as ckpt
from reasoning import gpt
from reasoning import tokenizer as tok
from reasoning.checkpoint import (checkpoint_dir, find_last_step, load_checkpoint, load_meta, rng_state,
                                  save_checkpoint, set_rng_state)
from reasoning.common import UserError


def trained_model_and_optimizer(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):  # populate exp_avg/exp_avg_sq/step so the optimizer state is non-trivial
        loss = model(torch.randn(5, 8)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, opt


def assert_same_nested(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same_nested(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_nested(x, y)
    else:
        assert a == b


def draw_all():
    return random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist(), torch.randint(0, 1000, (2,)).tolist()


def test_checkpoint_dir_layout(tmp_path):
    assert checkpoint_dir("sft", "d4", base_dir=str(tmp_path)) == os.path.join(str(tmp_path), "checkpoints", "sft", "d4")


def test_roundtrip_restores_identical_tensors_and_meta(tmp_path):
    model, opt = trained_model_and_optimizer()
    meta = {"model_config": {"n_layer": 2}, "data_position": {"shard": 3, "row_group": 7}, "val_bpb": 1.25}
    save_checkpoint(str(tmp_path), 42, model.state_dict(), opt.state_dict(), meta)
    assert sorted(os.listdir(tmp_path)) == ["meta_000042.json", "model_000042.pt", "optim_000042_rank0.pt"]
    model_state, optim_state, loaded_meta = load_checkpoint(str(tmp_path), load_optimizer=True)
    assert_same_nested(model.state_dict(), model_state)
    assert_same_nested(opt.state_dict(), optim_state)
    files = loaded_meta.pop("files")
    assert loaded_meta == {**meta, "step": 42}
    for name in ("model_000042.pt", "optim_000042_rank0.pt"):  # checksums of the bytes on disk
        with open(tmp_path / name, "rb") as f:
            data = f.read()
        assert files[name] == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    assert load_checkpoint(str(tmp_path), step=42)[1] is None  # optimizer only on request
    # the restored optimizer continues exactly like the original
    model2, opt2 = trained_model_and_optimizer(seed=1)
    model2.load_state_dict(model_state)
    opt2.load_state_dict(optim_state)
    x = torch.randn(5, 8)
    for m, o in ((model, opt), (model2, opt2)):
        o.zero_grad()
        m(x).square().mean().backward()
        o.step()
    assert_same_nested(model.state_dict(), model2.state_dict())


def test_compile_prefix_is_stripped(tmp_path):
    state = {"_orig_mod.weight": torch.ones(2), "_orig_mod.block._orig_mod.bias": torch.zeros(1)}
    save_checkpoint(str(tmp_path), 0, state)
    assert sorted(load_checkpoint(str(tmp_path))[0]) == ["block.bias", "weight"]


def test_rng_roundtrip_through_meta_file(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    draw_all()  # move every stream off its seed
    save_checkpoint(str(tmp_path), 5, {"w": torch.zeros(1)}, meta={"rng": rng_state()})
    after_save = draw_all()
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    assert draw_all() != after_save
    set_rng_state(load_meta(str(tmp_path))["rng"])
    assert draw_all() == after_save
    # gaussian caches are part of the state too
    set_rng_state(load_meta(str(tmp_path))["rng"])
    g1 = (random.gauss(0, 1), np.random.standard_normal(), torch.randn(1).item())
    set_rng_state(load_meta(str(tmp_path))["rng"])
    assert (random.gauss(0, 1), np.random.standard_normal(), torch.randn(1).item()) == g1


def test_find_last_step_counts_only_complete_checkpoints(tmp_path):
    d = str(tmp_path / "run")
    assert find_last_step(d) == -1  # missing directory
    os.makedirs(d)
    assert find_last_step(d) == -1
    for step in (10, 200, 30):
        save_checkpoint(d, step, {"w": torch.full((1,), float(step))})
    assert find_last_step(d) == 200
    torch.save({"w": torch.zeros(1)}, os.path.join(d, "model_000300.pt"))  # weights without meta: incomplete
    open(os.path.join(d, ".meta_000400.json.abc.tmp"), "w").close()  # a crashed temp file
    assert find_last_step(d) == 200
    assert load_checkpoint(d)[2]["step"] == 200
    assert load_checkpoint(d, step=30)[0]["w"].item() == 30.0


def files(d):
    return sorted(os.listdir(d))


@pytest.mark.parametrize("crash_on", [".pt", ".json"])
def test_crash_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch, crash_on):
    d = str(tmp_path)
    model, opt = trained_model_and_optimizer()
    save_checkpoint(d, 10, model.state_dict(), opt.state_dict(), {"note": "good"})
    before = files(d)
    real_replace = os.replace

    def crashing_replace(src, dst):
        if dst.endswith(crash_on) and "000020" in dst:
            assert os.path.getsize(src) > 0  # the temp file was fully written: the crash is at the rename
            raise OSError("simulated crash before rename")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crashing_replace)  # the rename inside reasoning.common.atomic_write
    new_model, new_opt = trained_model_and_optimizer(seed=5)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(d, 20, new_model.state_dict(), new_opt.state_dict(), {"note": "new"})
    monkeypatch.setattr(os, "replace", real_replace)
    assert find_last_step(d) == 10
    assert not any(name.endswith(".tmp") for name in files(d))  # temp files cleaned up
    assert "meta_000020.json" not in files(d)
    if crash_on == ".pt":
        assert files(d) == before
    model_state, optim_state, meta = load_checkpoint(d, load_optimizer=True)
    assert meta["note"] == "good" and meta["step"] == 10
    assert_same_nested(model.state_dict(), model_state)
    assert_same_nested(opt.state_dict(), optim_state)


def test_crash_inside_serialisation_leaves_no_file(tmp_path, monkeypatch):
    d = str(tmp_path)
    save_checkpoint(d, 1, {"w": torch.ones(3)})

    def half_written_save(obj, f):
        f.write(b"PK\x03\x04 partial bytes")
        raise RuntimeError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", half_written_save)
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(d, 2, {"w": torch.zeros(3)})
    assert files(d) == ["meta_000001.json", "model_000001.pt"]
    assert find_last_step(d) == 1


def test_meta_that_is_not_json_fails_before_writing(tmp_path):
    with pytest.raises(TypeError):
        save_checkpoint(str(tmp_path), 3, {"w": torch.ones(1)}, meta={"bad": object()})
    assert find_last_step(str(tmp_path)) == -1
    assert not os.path.exists(tmp_path / "model_000003.pt")


def test_resave_same_step_overwrites(tmp_path):
    save_checkpoint(str(tmp_path), 7, {"w": torch.ones(1)}, meta={"v": 1})
    save_checkpoint(str(tmp_path), 7, {"w": torch.full((1,), 2.0)}, meta={"v": 2})
    state, _, meta = load_checkpoint(str(tmp_path))
    assert state["w"].item() == 2.0 and meta["v"] == 2


def test_ranks_write_their_own_optimizer_shards(tmp_path):
    d = str(tmp_path)
    save_checkpoint(d, 4, None, {"shard": torch.tensor([1.0])}, rank=1)
    assert files(d) == ["optim_000004_rank1.pt"] and find_last_step(d) == -1  # rank 1 never writes meta
    save_checkpoint(d, 4, {"w": torch.ones(1)}, {"shard": torch.tensor([0.0])}, rank=0)
    assert find_last_step(d) == 4
    assert load_checkpoint(d, load_optimizer=True, rank=1)[1]["shard"].item() == 1.0
    assert load_checkpoint(d, load_optimizer=True, rank=0)[1]["shard"].item() == 0.0
    with pytest.raises(UserError, match="optim_000004_rank2.pt"):
        load_checkpoint(d, load_optimizer=True, rank=2)


def test_keep_last_prunes_old_and_orphaned_files(tmp_path):
    d = str(tmp_path)
    torch.save({}, os.path.join(d, "model_000000.pt"))  # leftover of a crashed save, older than everything
    for step in range(1, 6):
        save_checkpoint(d, step, {"w": torch.ones(1)}, {"m": torch.ones(1)}, keep_last=2)
    assert files(d) == ["meta_000004.json", "meta_000005.json", "model_000004.pt", "model_000005.pt",
                        "optim_000004_rank0.pt", "optim_000005_rank0.pt"]
    with pytest.raises(ValueError):
        save_checkpoint(d, 6, {"w": torch.ones(1)}, keep_last=0)


def one_line_user_error(fn, *needles):
    with pytest.raises(UserError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message
    return message


def test_missing_and_corrupt_checkpoints_raise_user_errors_naming_the_path(tmp_path):
    missing = str(tmp_path / "nope")
    one_line_user_error(lambda: load_checkpoint(missing), missing)
    empty = str(tmp_path / "empty")
    os.makedirs(empty)
    one_line_user_error(lambda: load_checkpoint(empty), empty)

    d = str(tmp_path / "run")
    save_checkpoint(d, 1, {"w": torch.ones(4)})
    one_line_user_error(lambda: load_checkpoint(d, step=2), os.path.join(d, "meta_000002.json"))

    model_path = os.path.join(d, "model_000001.pt")
    with open(model_path, "rb") as f:
        data = f.read()
    with open(model_path, "wb") as f:  # truncated weights
        f.write(data[: len(data) // 2])
    one_line_user_error(lambda: load_checkpoint(d), model_path, "corrupt")
    os.remove(model_path)
    one_line_user_error(lambda: load_checkpoint(d), model_path, "missing")

    meta_path = os.path.join(d, "meta_000001.json")
    with open(meta_path, "w") as f:
        f.write('{"step": 1, "trunc')
    one_line_user_error(lambda: load_meta(d), meta_path, "corrupt")
    with open(meta_path, "w") as f:
        json.dump([1, 2], f)
    one_line_user_error(lambda: load_checkpoint(d), meta_path)


# ----------------------------------------------------------------------------------------------- load_model

@pytest.fixture
def tiny_run(tmp_path):
    """A base dir with a tiny trained tokenizer and a tiny GPT checkpoint under checkpoints/sft/d1."""
    base = str(tmp_path)
    text = ["Mia has 12 apples. She eats 3 of them. 12 - 3 = 9. The answer is 9."] * 50
    tokenizer = tok.train_tokenizer(iter(text), vocab_size=300)
    tokenizer.save(os.path.join(base, "tokenizer"))
    torch.manual_seed(0)
    config = gpt.GPTConfig(max_seq_len=32, vocab_size=320, n_layer=1, n_head=2, n_kv_head=2, n_embd=32)
    model = gpt.GPT(config)
    model.init_weights()
    with torch.no_grad():  # init zeroes the output projections; make every weight matter for the comparison
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    save_checkpoint(checkpoint_dir("sft", "d1", base), 3, model.state_dict(),
                    meta={"model_config": config.to_dict()})
    return base, model


def test_load_model_rebuilds_the_same_network(tiny_run):
    base, model = tiny_run
    loaded, tokenizer, meta = ckpt.load_model("sft", base_dir=base)  # newest tag of the stage
    assert meta["step"] == 3 and not loaded.training
    idx = torch.tensor([tokenizer.encode("Mia has 12 apples.")])
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))
    by_path, _, _ = ckpt.load_model(checkpoint_dir("sft", "d1", base), base_dir=base, phase="train")
    assert by_path.training


def test_load_model_errors(tiny_run, tmp_path):
    base, _ = tiny_run
    one_line_user_error(lambda: ckpt.load_model("rl", base_dir=base), os.path.join(base, "checkpoints", "rl"))
    one_line_user_error(lambda: ckpt.load_model(str(tmp_path / "nowhere"), base_dir=base), "nowhere")
    one_line_user_error(lambda: ckpt.load_model("hf:some/model", base_dir=base), "hf:some/model")
    d = checkpoint_dir("base", "x", base)
    save_checkpoint(d, 0, {"w": torch.ones(1)})
    one_line_user_error(lambda: ckpt.load_model(d, base_dir=base), "model_config")
    with pytest.raises(ValueError):
        ckpt.load_model("sft", base_dir=base, phase="serve")


def test_model_source_flags(tiny_run):
    import argparse

    base, model = tiny_run
    assert ckpt.parse_init_from("sft:d1@3") == ("sft", "d1", 3)
    assert ckpt.parse_init_from("rl") == ("rl", None, None)
    one_line_user_error(lambda: ckpt.parse_init_from("sft:d1@last"), "sft:d1@last")
    parser = argparse.ArgumentParser()
    ckpt.add_model_args(parser, default_stage="sft")
    for argv in ([], ["--tag", "d1", "--step", "3"], ["--init-from", "sft:d1@3", "--stage", "rl"],
                 ["--init-from", checkpoint_dir("sft", "d1", base)]):
        loaded, _, meta = ckpt.load_model_from_args(parser.parse_args(argv), device="cpu", base_dir=base)
        assert meta["step"] == 3
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    one_line_user_error(lambda: ckpt.load_model_from_args(parser.parse_args(["--step", "9"]), base_dir=base),
                        "meta_000009.json")


# ----------------------------------------------------------------------------------------------- run identity

def test_pruning_and_last_step_only_touch_the_saving_run(tmp_path):
    """Issue 17.1: a new run into a tag holding an older run's higher steps used to prune its own checkpoints."""
    d = str(tmp_path)
    for step in (50, 60):
        save_checkpoint(d, step, {"w": torch.ones(1)}, {"m": torch.ones(1)}, keep_last=2, run_id="old-run")
    for step in range(1, 5):
        save_checkpoint(d, step, {"w": torch.full((1,), float(step))}, keep_last=2, run_id="new-run")
    assert ckpt.checkpoint_runs(d) == {"old-run": [50, 60], "new-run": [3, 4]}  # the run that wrote last comes last
    assert find_last_step(d) == 4 and find_last_step(d, "old-run") == 60 and find_last_step(d, "nobody") == -1
    assert load_checkpoint(d)[0]["w"].item() == 4.0  # the newest run's last step, not the highest step number
    assert json.loads(open(os.path.join(d, "meta_000004.json")).read())["run_id"] == "new-run"
    with open(os.path.join(d, "meta_000004.json")) as f:
        assert f.readline() == "{\n" and f.readline().startswith('  "run_id": "new-run"')  # read from the head
    # replace_other_runs (--overwrite): the other run's files go, this run's stay
    save_checkpoint(d, 5, {"w": torch.ones(1)}, keep_last=2, run_id="new-run", replace_other_runs=True)
    assert files(d) == ["meta_000004.json", "meta_000005.json", "model_000004.pt", "model_000005.pt"]


def test_temp_files_of_killed_saves_are_pruned_by_the_same_run(tmp_path):
    """Issue 17.7: the prune pattern never matched `.tmp`, so each killed save left a model-sized file behind."""
    d = str(tmp_path)
    save_checkpoint(d, 1, {"w": torch.ones(1)}, run_id="run-a")
    mine = [".model_000002.pt.run-a.0badf00d.tmp", ".optim_000002_rank1.pt.run-a.12345678.tmp",
            ".meta_000002.json.run-a.abcdef01.tmp"]
    others = [".model_000002.pt.run-b.0badf00d.tmp", ".model_000002.pt.0badf00d.tmp"]  # another run's; unlabelled
    for name in mine + others:
        open(os.path.join(d, name), "wb").close()
    save_checkpoint(d, 2, {"w": torch.ones(1)}, run_id="run-a")  # no keep_last: the temp files still go
    assert files(d) == sorted(others + ["meta_000001.json", "meta_000002.json", "model_000001.pt",
                                        "model_000002.pt"])
    # a real killed write leaves a labelled temp file that the run's next save removes
    real_replace = os.replace

    def killed(src, dst):
        raise KeyboardInterrupt  # atomic_write cleans up on exceptions; a SIGKILL would not: undo that below

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "replace", killed)
        mp.setattr(os, "remove", lambda path: None)  # as if the process died before its cleanup
        with pytest.raises(KeyboardInterrupt):
            save_checkpoint(d, 3, {"w": torch.ones(1)}, run_id="run-a")
    assert os.replace is real_replace
    assert any(n.startswith(".model_000003.pt.run-a.") for n in files(d))
    save_checkpoint(d, 3, {"w": torch.ones(1)}, run_id="run-a")
    assert not any(".run-a." in n for n in files(d))


def test_leftovers_are_removed_only_where_no_checkpoint_is_complete(tmp_path):
    d = str(tmp_path)
    leftovers = [".model_000001.pt.run-x.0badf00d.tmp", "model_000001.pt", "optim_000001_rank0.pt"]
    for name in leftovers:
        open(os.path.join(d, name), "wb").close()
    open(os.path.join(d, "notes.txt"), "w").close()
    assert ckpt.remove_leftovers(d) == 3 and files(d) == ["notes.txt"]
    save_checkpoint(d, 2, {"w": torch.ones(1)})
    open(os.path.join(d, "model_000001.pt"), "wb").close()
    assert ckpt.remove_leftovers(d) == 0 and "model_000001.pt" in files(d)  # a complete checkpoint: hands off


# ----------------------------------------------------------------------------------------------- integrity

def _flip_bytes(path, count=100, seed=0):
    """Flip `count` bytes in the middle fifth of a file: tensor data in a file made of one big tensor."""
    rng = random.Random(seed)
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        for i in rng.sample(range(2 * len(data) // 5, 3 * len(data) // 5), count):
            data[i] ^= 0xFF
        f.seek(0)
        f.write(data)


def test_corrupted_files_are_one_line_errors_naming_the_file(tmp_path, monkeypatch):
    """Issue 17.8: 100 flipped bytes in a model file used to load silently."""
    d = str(tmp_path)
    model, opt = nn.Linear(128, 128), {"m": torch.zeros(3)}  # one 64 KB weight: the file is mostly tensor bytes
    save_checkpoint(d, 3, model.state_dict(), opt, run_id="r")
    model_path, optim_path = os.path.join(d, "model_000003.pt"), os.path.join(d, "optim_000003_rank0.pt")
    _flip_bytes(model_path)
    message = one_line_user_error(lambda: load_checkpoint(d), model_path, "corrupt", "sha256",
                                  ckpt.VERIFY_ENV)
    assert "meta_000003.json" in message
    monkeypatch.setenv(ckpt.VERIFY_ENV, "0")  # the escape hatch: load without the check
    state = load_checkpoint(d)[0]
    assert not all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # it really is corrupt
    monkeypatch.delenv(ckpt.VERIFY_ENV)
    save_checkpoint(d, 3, model.state_dict(), opt, run_id="r")  # intact again
    with open(optim_path, "ab") as f:
        f.write(b"x")  # a size mismatch is caught before hashing
    one_line_user_error(lambda: ckpt.load_checkpoint(d, load_optimizer=True), optim_path, "bytes")


def test_disk_full_during_a_checkpoint_write_is_one_line_naming_the_file(tmp_path, monkeypatch):
    import errno

    d = str(tmp_path)
    save_checkpoint(d, 1, {"w": torch.ones(3)}, run_id="r")
    before = files(d)
    class FullDisk:
        """The temp file on a disk that fills up after 200 bytes."""

        def __init__(self, file):
            self.file, self.left = file, 200

        def write(self, data):
            self.left -= len(data)
            if self.left < 0:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.file.write(data)

        def flush(self):
            self.file.flush()

    real_init = ckpt._HashingWriter.__init__
    monkeypatch.setattr(ckpt._HashingWriter, "__init__", lambda self, file: real_init(self, FullDisk(file)))
    message = one_line_user_error(lambda: save_checkpoint(d, 2, {"w": torch.zeros(1000)}, run_id="r"),
                                  "no space left", os.path.join(d, "model_000002.pt"))
    assert "previous checkpoints are intact" in message
    assert files(d) == before and find_last_step(d) == 1  # nothing half-written under a real name, no temp file


@pytest.mark.parametrize("key, value, expected", [
    ("step", "3", "'step' is str"),
    ("model_config", [1, 2], "'model_config' is list"),
    ("files", {"model_000003.pt": "abc"}, "files['model_000003.pt']"),
    ("run_id", 7, "'run_id' is int"),
])
def test_hand_edited_meta_with_wrong_types_is_a_one_line_error(tmp_path, key, value, expected):
    d = str(tmp_path)
    save_checkpoint(d, 3, {"w": torch.ones(1)}, meta={"model_config": {}}, run_id="r")
    meta_path = os.path.join(d, "meta_000003.json")
    with open(meta_path) as f:
        meta = json.load(f)
    meta[key] = value
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    one_line_user_error(lambda: load_checkpoint(d, step=3), meta_path, expected)


def test_load_model_with_a_wrong_typed_model_config_is_one_line(tiny_run):
    base, _ = tiny_run
    d = checkpoint_dir("sft", "d1", base)
    meta_path = os.path.join(d, "meta_000003.json")
    with open(meta_path) as f:
        meta = json.load(f)
    meta["model_config"]["n_embd"] = "32"
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    one_line_user_error(lambda: ckpt.load_model("sft", base_dir=base), meta_path, "model_config")


def test_chat_loading_verifies_checksums(tiny_run):
    base, model = tiny_run
    d = checkpoint_dir("sft", "d1", base)
    save_checkpoint(d, 4, model.state_dict(), meta={"model_config": model.config.to_dict()}, run_id="r")
    path = os.path.join(d, "model_000004.pt")
    with open(path, "r+b") as f:  # one flipped byte inside the embedding table (the first tensor in the file)
        data = f.read()
        offset = data.index(model.state_dict()["wte.weight"].numpy().tobytes()[:64]) + 100
        f.seek(offset)
        f.write(bytes([data[offset] ^ 0x01]))
    one_line_user_error(lambda: ckpt.load_model("sft", base_dir=base), os.path.join(d, "model_000004.pt"), "corrupt")


def test_unwritable_or_blocked_folders_are_one_line_errors(tmp_path, monkeypatch):
    from reasoning.common import get_base_dir, make_dir

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("REASONING_BASE_DIR", str(blocker / "base"))
    one_line_user_error(get_base_dir, str(blocker / "base"), "regular file")
    one_line_user_error(lambda: save_checkpoint(str(blocker / "ckpt"), 1, {"w": torch.ones(1)}), "regular file")
    # a read-only folder (simulated: the tests may run as root, for whom permissions do not apply)
    readonly = tmp_path / "ro"
    readonly.mkdir()
    monkeypatch.setattr(os, "access", lambda path, mode: not str(path).startswith(str(readonly)))
    one_line_user_error(lambda: make_dir(str(readonly), "checkpoint folder", writable=True), "not writable")
    real_makedirs = os.makedirs

    def denied(path, *args, **kwargs):
        if str(path).startswith(str(readonly)):
            raise PermissionError(13, "Permission denied", str(path))
        return real_makedirs(path, *args, **kwargs)

    monkeypatch.setattr(os, "makedirs", denied)
    one_line_user_error(lambda: save_checkpoint(str(readonly / "ckpt"), 1, {"w": torch.ones(1)}),
                        str(readonly / "ckpt"), "Permission denied")
