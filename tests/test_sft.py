"""SFT: the loss counts exactly the assistant tokens (vs a hand-computed float64 CE), accumulation is normalised by
valid tokens, padding and packing are invisible to the loss, the data stream shards and resumes exactly, a tiny model
overfits 16 conversations and then answers them through the Engine, --resume is bitwise exact, chat_sft end to end."""

import json
import os

import pytest
import torch
import torch.nn.functional as F

from helpers_models import save_tiny_checkpoint, tiny_model, train_small_tokenizer
from reasoning.common import UserError
from reasoning.engine import Engine
from reasoning.sft import ConversationStream, SFTConfig, conversation_targets, pad_rows, train_sft
from tasks.common import Task
from tasks.synthetic import SyntheticReasoning

CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny matmuls gain nothing from intra-op threads


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("tok") / "tokenizer")
    train_small_tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from reasoning.tokenizer import Tokenizer
    return Tokenizer.load(tokenizer_dir)


def conversation(question, think, answer):
    return {"messages": [{"role": "user", "content": question},
                         {"role": "assistant", "content": [{"type": "think", "text": think},
                                                           {"type": "text", "text": answer}]}]}


def hand_loss_sum(model, ids, mask) -> tuple[float, int]:
    """Sum of -log p(ids[t+1]) over positions whose next token the assistant produced, in float64."""
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]])).double()[0]  # (T, V)
    logp = F.log_softmax(logits, dim=-1)
    total, count = 0.0, 0
    for t in range(len(ids) - 1):
        if mask[t + 1]:
            total -= logp[t, ids[t + 1]].item()
            count += 1
    return total, count


class ListTask(Task):
    """A task over a fixed list of conversations."""

    def __init__(self, examples):
        self.examples = examples

    def __len__(self):
        return len(self.examples)

    def get_example(self, index):
        return self.examples[index]


def run_sft(model, tokenizer, base_dir, train, **overrides):
    fields = dict(device_batch_size=4, max_seq_len=128, eval_every=-1, log_every=1000, base_dir=str(base_dir),
                  out_tag="t")
    fields["total_batch_rows"] = overrides.get("device_batch_size", 4)  # one micro-batch a step unless told
    fields.update(overrides)
    return train_sft(SFTConfig(**fields), model, tokenizer, {"dir": "test", "step": 0}, CPU, tasks=(train, None, None))


def test_loss_counts_exactly_the_assistant_tokens(tokenizer):
    convs = [conversation("What is 2+3?", "2 + 3 = 5", "The answer is \\boxed{5}."),
             conversation("Compute 7 * 6 - 2, quickly please.", "7 * 6 = 42\n42 - 2 = 40", "\\boxed{40}")]
    model = tiny_model(tokenizer.vocab_size, max_seq_len=128, noise=0.1).eval()
    rows, hand_total, hand_count = [], 0.0, 0
    for conv in convs:
        ids, mask = tokenizer.render_conversation(conv)
        think, text = conv["messages"][1]["content"]
        # think span with its two markers, the answer text, <|assistant_end|>: nothing else is trained on
        assistant_tokens = len(tokenizer.encode(think["text"])) + 2 + len(tokenizer.encode(text["text"])) + 1
        inputs, targets = conversation_targets(ids, mask)
        assert sum(t >= 0 for t in targets) == assistant_tokens
        assert [t for t in targets if t >= 0] == [tok for tok, m in zip(ids, mask) if m]
        total, count = hand_loss_sum(model, ids, mask)
        assert count == assistant_tokens
        hand_total += total
        hand_count += count
        rows.append((inputs, targets))
    x, y = pad_rows(rows, tokenizer.bos_token_id)  # the shorter row is padded: padding must add nothing
    assert x.shape[0] == 2 and (y[0] == -1).sum() != (y[1] == -1).sum()
    with torch.no_grad():
        loss_sum = model(x, y, loss_reduction="sum").item()
    assert loss_sum == pytest.approx(hand_total, rel=1e-5)
    # the stream serves the same rows
    stream = ConversationStream(ListTask(convs), tokenizer, max_seq_len=128, seed=0)
    sx, sy = stream.next_batch(2)
    assert sorted(map(tuple, sy.tolist())) == sorted(map(tuple, y.tolist()))


def test_accumulation_is_normalised_by_valid_tokens(tokenizer, tmp_path):
    """One step over 4 conversations of different lengths: 4 rows at once == 1 row x 4 accumulation steps, and the
    reported loss is sum(token losses) / (valid tokens of the step), not a mean of per-row means."""
    train = SyntheticReasoning("train", size=4, seed=5, num_steps=(1, 3))
    lengths = {sum(tokenizer.render_conversation(e)[1]) for e in train}
    assert len(lengths) > 1  # rows with different numbers of assistant tokens
    init = tiny_model(tokenizer.vocab_size, max_seq_len=128, noise=0.1)
    total, count = 0.0, 0
    for e in train:
        t, c = hand_loss_sum(init.eval(), *tokenizer.render_conversation(e))
        total += t
        count += c
    weights, curves = [], []
    for batch in (4, 1, 3):  # 3: micro-batches of 3 and 1 rows
        model = tiny_model(tokenizer.vocab_size, max_seq_len=128, noise=0.1)
        out = run_sft(model, tokenizer, tmp_path / f"b{batch}", train, num_iterations=3, device_batch_size=batch,
                      total_batch_rows=4, keep_last=0)
        assert out["losses"][0][1] == pytest.approx(total / count, rel=1e-5)
        weights.append(model.state_dict())
        curves.append([loss for _, loss in out["losses"]])
    # the device batch size changes only how the step is cut into micro-batches: same loss curve, same weights
    for curve in curves[1:]:
        assert curve == pytest.approx(curves[0], rel=1e-5)
    for other in weights[1:]:
        for name in weights[0]:
            torch.testing.assert_close(weights[0][name], other[name], atol=2e-5, rtol=1e-4)


def test_rows_cut_before_every_reply_are_a_one_line_error(tokenizer, tmp_path):
    train = SyntheticReasoning("train", size=8, seed=5)
    prompt_tokens = min(len(tokenizer.render_for_completion(e)) for e in train)
    model = tiny_model(tokenizer.vocab_size, max_seq_len=128)
    with pytest.raises(UserError, match=f"--max-seq-len {prompt_tokens - 2}: the conversations are cut before"):
        run_sft(model, tokenizer, tmp_path, train, num_iterations=1, max_seq_len=prompt_tokens - 2)
    run_sft(model, tokenizer, tmp_path, train, num_iterations=1, max_seq_len=prompt_tokens + 4)  # some reply left


def test_stream_sharding_packing_and_positions(tokenizer):
    task = SyntheticReasoning("train", size=10, seed=1)
    single = ConversationStream(task, tokenizer, 128, seed=4)
    order = [single._global_index(k)[1] for k in range(25)]
    assert sorted(order[:10]) == list(range(10)) and sorted(order[10:20]) == list(range(10))  # epochs
    assert order[:10] != order[10:20]  # each epoch reshuffled
    ranks = [ConversationStream(task, tokenizer, 128, rank=r, world_size=2, seed=4) for r in range(2)]
    interleaved = [ranks[k % 2]._global_index(k // 2)[1] for k in range(24)]
    assert interleaved == order[:24]  # rank r takes stream elements r, r+2, ...

    packed = ConversationStream(task, tokenizer, 96, seed=4, pack=True)
    x, y = packed.next_batch(3)
    assert x.shape == y.shape == (3, 96)
    masks = [tokenizer.render_conversation(task[order[k]], max_tokens=97)[1] for k in range(packed.position)]
    assert int((y >= 0).sum()) == sum(sum(m) for m in masks)  # every assistant token of every packed conversation
    bos = tokenizer.bos_token_id
    assert (x[:, 0] == bos).all()  # rows start at a conversation boundary
    # a stream rebuilt at a saved position continues exactly where the old one was
    saved = packed.position
    expected = packed.next_batch(2)
    resumed = ConversationStream(task, tokenizer, 96, seed=4, pack=True, position=saved)
    torch.testing.assert_close(resumed.next_batch(2), expected)
    assert resumed.position == packed.position

def test_overfits_16_conversations_and_answers_through_the_engine(tokenizer, tmp_path):
    train = SyntheticReasoning("train", size=16, seed=3)
    model = tiny_model(tokenizer.vocab_size, depth=2, n_embd=64, max_seq_len=256, noise=0.0)
    out = run_sft(model, tokenizer, tmp_path, train, num_iterations=60, device_batch_size=16, max_seq_len=256,
                  lr_scale=2.0)
    losses = [loss for _, loss in out["losses"]]
    assert losses[0] > 3.0 and losses[-1] < 0.1
    model.eval()
    prompts = [tokenizer.render_for_completion(train[i]) for i in range(16)]
    generations = Engine(model, tokenizer).generate(prompts, max_tokens=80, temperature=0.0)
    reproduced = 0
    for i, g in enumerate(generations):
        completion = tokenizer.decode(g.tokens)
        assert train.evaluate(train[i], completion), completion  # the right boxed answer
        think, text = (part["text"] for part in train[i]["messages"][1]["content"])
        reproduced += completion == f"<|think_start|>{think}<|think_end|>{text}<|assistant_end|>"
    assert reproduced >= 14  # and (nearly always) the trained reasoning verbatim


@pytest.mark.parametrize("pack", [False, True])
def test_resume_is_exact(tokenizer, tmp_path, pack):
    train = SyntheticReasoning("train", size=12, seed=2)
    settings = dict(num_iterations=6, device_batch_size=2, total_batch_rows=4, pack=pack, max_seq_len=96,
                    warmup_ratio=0.2, final_lr_frac=0.1)
    straight = tiny_model(tokenizer.vocab_size, max_seq_len=128, noise=0.1)
    reference = run_sft(straight, tokenizer, tmp_path / "a", train, **settings)
    first = tiny_model(tokenizer.vocab_size, max_seq_len=128, noise=0.1)
    part = run_sft(first, tokenizer, tmp_path / "b", train, stop_at_step=3, **settings)
    assert part["step"] == 3 and not part["finished"]
    second = tiny_model(tokenizer.vocab_size, max_seq_len=128, noise=0.1)  # fresh process: source weights again
    resumed = run_sft(second, tokenizer, tmp_path / "b", train, resume=True, **settings)
    assert resumed["finished"] and [s for s, _ in resumed["losses"]] == [4, 5, 6]
    assert part["losses"] + resumed["losses"] == reference["losses"]  # bitwise-equal losses
    for name, value in straight.state_dict().items():
        assert torch.equal(value, second.state_dict()[name]), name
    assert resumed["series"]["train_loss"] == reference["series"]["train_loss"]


def test_chat_sft_script_end_to_end(tokenizer_dir, tmp_path, monkeypatch, capsys):
    from scripts import chat_sft

    base = tmp_path / "run"
    monkeypatch.setenv("REASONING_BASE_DIR", str(base))
    save_tiny_checkpoint(str(base), tokenizer_dir, stage="base", tag="tiny", max_seq_len=128)
    args = ["--num-iterations", "4", "--eval-every", "2", "--eval-problems", "4", "--eval-max-tokens", "8",
            "--device-batch-size", "4", "--total-batch-rows", "4", "--max-seq-len", "96", "--val-examples", "8",
            "--task-size", "50"]
    chat_sft.main(args)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("RESULT train_loss=") and "accuracy=" in lines[-1] and "steps=4" in lines[-1]
    assert os.path.exists(base / "checkpoints" / "sft" / "tiny" / "model_000004.pt")  # output tag = source tag
    with open(base / "report" / "chat_sft.json") as f:
        section = json.load(f)
    assert {"train_loss", "val_loss", "accuracy"} <= set(section["metrics"])
    assert [s for s, _ in section["series"]["train_loss"]] == [1, 2, 3, 4]
    assert [s for s, _ in section["series"]["val_loss"]] == [0, 2, 4]
    with open(base / "logs" / "sft_tiny.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    meta = json.load(open(base / "checkpoints" / "sft" / "tiny" / "meta_000004.json"))
    assert meta["stage"] == "sft" and meta["tokenizer_dir"] == tokenizer_dir
    with pytest.raises(UserError, match="unknown task 'nope'"):
        chat_sft.main(args + ["--task", "nope"])
    with pytest.raises(UserError, match="--total-batch-rows 0: expected a positive integer"):
        chat_sft.main(args + ["--total-batch-rows", "0"])
