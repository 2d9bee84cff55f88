"""RL loop (reasoning.rl, scripts/chat_rl.py): sampler/trainer log-prob parity, learning on the synthetic task, the
zero-variance / empty-batch update paths (also across two gloo ranks), exact resume, no reference model without KL,
and the CLI.

Learning uses tasks/synthetic.py's real task (`synthetic_sft` fixture): a tiny GPT with no pretraining is SFT'd
with reasoning.sft first on clean worked solutions (the stand-in for a pretrained base), then on the answer-only
mixture runs/runcpu.sh uses (`answer_only_frac` 0.5), so it samples the shortcut about half the time and scores far
less with it than with the worked steps; 30 GRPO steps through `train_rl` have to find that out from the reward.

The mechanics tests share a cheaper fixture: a tiny GPT fine-tuned (a few seconds of plain AdamW SFT) on
single-digit additions whose reference answer is \\boxed{} in half of the examples and bare in the other half, so
rewards vary within a group (non-zero advantages) from the first step.
"""

import json
import os
import random
import socket

import pytest
import torch
import torch.multiprocessing as mp

from helpers_models import tiny_model, train_small_tokenizer
from reasoning import checkpoint as ckpt
from reasoning import rl
from reasoning import rollout as rollout_module
from reasoning.checkpoint import checkpoint_dir, save_checkpoint
from reasoning.engine import Engine
from reasoning.gpt import GPT, GPTConfig
from reasoning.rl import RLConfig, build_reward, token_logprobs, train_rl
from reasoning.rollout import collect_rollout, training_rows
from reasoning.sft import SFTConfig, conversation_targets, pad_rows, train_sft
from reasoning.tokenizer import train_tokenizer
from tasks.common import Task
from tasks.synthetic import SyntheticReasoning

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models on a shared box, threads only contend


class Addition(Task):
    """a + b, digits 0..max_digit; the reference answer is boxed in half of the examples (seeded per example)."""

    def __init__(self, split: str = "train", size: int = 1000, seed: int = 0, max_digit: int = 4,
                 impossible: bool = False, long_every: int = 0):
        self.split, self.size, self.seed, self.max_digit, self.impossible = split, size, seed, max_digit, impossible
        self.long_every = long_every  # every long_every-th prompt is too long for the tiny model's context (0: none)

    def __len__(self):
        return self.size

    def get_example(self, index):
        rng = random.Random(f"{self.seed}/{self.split}/{index}")
        a, b = rng.randint(0, self.max_digit), rng.randint(0, self.max_digit)
        answer = f"\\boxed{{{a + b}}}" if rng.random() < 0.5 else str(a + b)
        padding = "9 " * 200 if self.long_every and index % self.long_every == 0 else ""
        messages = [{"role": "user", "content": f"{padding}{a}+{b}"},
                    {"role": "assistant", "content": [{"type": "think", "text": f"{a}+{b}={a + b}"},
                                                      {"type": "text", "text": answer}]}]
        # impossible=True: a gold answer no completion ever states, so every group is all-zero reward
        return {"messages": messages, "answer": "-1" if self.impossible else str(a + b)}

    def evaluate(self, example, completion):
        from reasoning.verifiers import extract_answer
        return extract_answer(completion) == example["answer"]


@pytest.fixture(scope="module")
def tiny_sft(tmp_path_factory):
    """(base_dir, checkpoint dir) of a tiny SFT'd model for the Addition task (stage "sft", tag "tiny")."""
    root = tmp_path_factory.mktemp("rl")
    task = Addition(size=2000)
    texts = []
    for example in task:
        user, assistant = example["messages"]
        texts += [user["content"]] + [part["text"] for part in assistant["content"]]
    tokenizer = train_tokenizer(iter(texts), 300)
    tokenizer_dir = str(root / "tokenizer")
    tokenizer.save(tokenizer_dir)

    torch.manual_seed(0)
    config = GPTConfig(max_seq_len=96, vocab_size=tokenizer.vocab_size, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
    model = GPT(config)
    model.init_weights()
    # 50 distinct conversations: render once, then plain AdamW SFT on random batches of them
    rendered = [conversation_targets(*tokenizer.render_conversation(task[i])) for i in range(400)]
    inputs, targets = pad_rows(rendered, tokenizer.bos_token_id)
    optimizer = torch.optim.AdamW(model.parameters(), lr=6e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(100):
        index = torch.randint(0, len(rendered), (32,), generator=generator)
        loss = model(inputs[index], targets[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    ckpt_dir = checkpoint_dir("sft", "tiny", str(root))
    save_checkpoint(ckpt_dir, 0, model.state_dict(),
                    meta={"model_config": config.to_dict(), "tokenizer_dir": tokenizer_dir, "stage": "sft"})
    return str(root), ckpt_dir


def small_config(base_dir, ckpt_dir, **overrides) -> RLConfig:
    values = dict(init_from=ckpt_dir, base_dir=base_dir, device="cpu", num_steps=3, prompts_per_step=4,
                  num_samples=4, max_new_tokens=16, eval_every=-1, log_every=100, device_batch_size=8)
    values.update(overrides)
    return RLConfig(**values)


def _tasks(**kw):
    return Addition(size=500, **kw), Addition("test", 64, seed=1, **kw)


# ----------------------------------------------------------------------------------------------- rows and parity

def test_trainer_logprobs_match_sampler_and_rows_align(tiny_sft):
    base_dir, ckpt_dir = tiny_sft
    model, tokenizer, _ = ckpt.load_model(ckpt_dir, device="cpu")
    config = small_config(base_dir, ckpt_dir, temperature=0.7)
    examples = [Addition()[i] for i in range(3)]
    rollout = collect_rollout(Engine(model, tokenizer), tokenizer, examples, build_reward(config), num_samples=4,
                              max_new_tokens=16, temperature=0.7, seed=5)
    data = training_rows(rollout.prompts, rollout.generations, mask_truncated=False)
    for i, g in enumerate(rollout.generations):
        prompt = rollout.prompts[g.prompt_index]
        start = len(prompt) - 1
        assert data.inputs[i, :len(prompt)].tolist() == prompt
        assert data.targets[i, start:start + len(g.tokens)].tolist() == g.tokens   # every token sampled (no tools)
        assert (data.targets[i, :start] == -1).all() and (data.targets[i, start + len(g.tokens):] == -1).all()
    with torch.no_grad():
        trainer = token_logprobs(model, data.inputs, data.targets, config, compute_entropy=False)
    valid = data.mask > 0
    # same temperature, same full-vocabulary softmax: only float noise separates sampler and trainer
    torch.testing.assert_close(trainer[valid], data.sampler_logprobs[valid], atol=2e-5, rtol=0)
    assert valid.sum() == sum(len(g.tokens) for g in rollout.generations)


def test_training_rows_forced_tokens_and_truncation():
    from reasoning.engine import Generation

    gens = [Generation(tokens=[5, 6, 7, 8], mask=[1, 0, 0, 1], logprobs=[-0.5, 0.0, 0.0, -0.25], stop_reason="stop"),
            Generation(tokens=[9, 9], mask=[1, 1], logprobs=[-1.0, -2.0], stop_reason="length", prompt_index=1)]
    data = training_rows([[1, 2, 3], [4]], gens, mask_truncated=True)
    assert data.inputs.tolist() == [[1, 2, 3, 5, 6, 7], [4, 9, 0, 0, 0, 0]]
    assert data.targets.tolist() == [[-1, -1, 5, -1, -1, 8], [9, 9, -1, -1, -1, -1]]   # forced tool tokens: -1
    assert data.sampler_logprobs[0, [2, 5]].tolist() == [-0.5, -0.25]
    assert data.mask.tolist()[0] == [0, 0, 1, 0, 0, 1]
    assert data.mask[1].sum() == 0                                                     # truncated row: no loss


# ----------------------------------------------------------------------------------------------- learning

SYNTHETIC = "twostep"  # tasks/synthetic.py preset: two operations on operands <= 5 (digits the tiny model can learn)


@pytest.fixture(scope="module")
def synthetic_sft(tmp_path_factory):
    """(base_dir, checkpoint dir) of a tiny GPT SFT'd on the synthetic task in two reasoning.sft runs (~35 s here).

    1. 400 steps on clean worked solutions: greedy and sampled accuracy ~0.8 (the model can do the arithmetic).
    2. 100 steps on the answer-only mixture: the first assistant token now opens the think span only about half of
       the time, and the bare answers are mostly wrong (sampled pass@1 ~0.4 overall: ~0.7 worked, ~0.2 bare)."""
    root = tmp_path_factory.mktemp("rl_synthetic")
    tokenizer_dir = str(root / "tokenizer")
    tokenizer = train_small_tokenizer(tokenizer_dir)           # BPE on synthetic problems (tests/helpers_models)
    model = tiny_model(tokenizer.vocab_size, depth=2, n_embd=64, max_seq_len=256, noise=0.0)
    source = {"dir": "scratch", "step": 0, "tokenizer_dir": tokenizer_dir}
    summary = None
    for answer_only, steps, lr_scale in ((0.0, 400, 2.0), (0.5, 100, 1.0)):
        train = SyntheticReasoning("train", size=20_000, difficulty=SYNTHETIC, answer_only_frac=answer_only)
        config = SFTConfig(num_iterations=steps, lr_scale=lr_scale, device_batch_size=16, total_batch_rows=16, max_seq_len=256,
                           eval_every=-1, log_every=1000, seed=int(answer_only > 0), base_dir=str(root),
                           out_tag=f"synthetic_ao{answer_only}")
        summary = train_sft(config, model, tokenizer, source, torch.device("cpu"), tasks=(train, None, None))
    return str(root), summary["checkpoint_dir"]


def test_rl_on_the_synthetic_task_raises_reward_and_held_out_accuracy(synthetic_sft):
    """30 GRPO steps (16 prompts x 8 samples) on the synthetic train split, tasks built by train_rl itself.

    The trajectory depends on the CPU's float kernels. On the machine that set the first bars (64 held-out problems),
    seeds 0-4 gained +0.20..+0.33 train reward, +0.17..+0.30 sampled pass@1 and +0.36..+0.55 greedy accuracy; on
    another Xeon (2026-12, 256 problems) seeds 0-2 gained +0.18..+0.33 reward, +0.22..+0.25 sampled pass@1 and
    +0.16..+0.24 greedy accuracy, and 64 problems measured seed 0's greedy gain as +0.14. So the held-out set is
    256 problems (standard error of a gain ~0.04) and each margin is at most about 0.6 of the smallest gain seen
    anywhere. A broken update fails: with
    lr_scale 0 both held-out numbers stay exactly where they were (train reward drifts +0.02 with the prompt order);
    with the advantage sign flipped everything falls (the policy learns the shortcut: reward 0.31 -> 0.02)."""
    base_dir, ckpt_dir = synthetic_sft
    config = small_config(base_dir, ckpt_dir, out_tag="learn", task="synthetic", synthetic_difficulty=SYNTHETIC,
                          num_steps=30, prompts_per_step=16, num_samples=8, max_new_tokens=48, lr_scale=0.5,
                          eval_every=0, eval_problems=256, eval_pass_k=8, eval_batch_size=64, device_batch_size=32,
                          seed=0)
    summary = train_rl(config)
    first, last = summary["evals"][0], summary["evals"][-1]
    rewards = [r["reward"] for r in summary["records"]]
    start, end = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    lengths = [round(r["response_len"]) for r in summary["records"]]  # grows as the think span comes back
    assert 0.2 < start < 0.6, f"the SFT policy should start in the middle, got mean reward {start:.3f}"
    assert end > start + 0.1, f"mean train reward {start:.3f} -> {end:.3f}; response lengths {lengths}"
    # held out: the same 256 test problems, seeded per problem. Sampled pass@1 (8 samples at T=1) is the mean
    # correctness reward there; greedy accuracy is the eval the pipeline reports for SFT vs RL.
    assert last["pass@1_sampled"] > first["pass@1_sampled"] + 0.1, (first, last)
    assert last["accuracy"] > first["accuracy"] + 0.09, (first, last)
    # the held-out accuracy and reward curves are what the report plots
    assert [p[0] for p in summary["series"]["accuracy"]] == [0, 30]
    assert summary["metrics"]["initial_accuracy"] == first["accuracy"]
    log_path = os.path.join(base_dir, "logs", "chat_rl_learn.jsonl")
    with open(log_path) as f:
        logged = [json.loads(line) for line in f]
    steps = [r for r in logged if "reward" in r]
    assert [r["step"] for r in steps] == list(range(1, 31))
    for key in ("reward/correctness", "reward/format", "zero_variance_frac", "entropy", "clip_frac",
                "is_ratio_max", "response_len", "tok_per_s", "t_rollout", "t_train"):
        assert key in steps[0], key


# ----------------------------------------------------------------------------------------------- update paths

def _spy_backward(model):
    """Count gradient computations reaching the output head and remember whether any was non-zero."""
    seen = {"calls": 0, "nonzero": False}

    def hook(grad):
        seen["calls"] += 1
        seen["nonzero"] |= bool(grad.abs().max() > 0)
    model.lm_head.weight.register_hook(hook)
    return seen


@pytest.mark.parametrize("filter_zero_variance", [False, True])
def test_all_zero_variance_step_runs_a_zero_update(tiny_sft, monkeypatch, filter_zero_variance):
    base_dir, ckpt_dir = tiny_sft
    spies = []
    load_policy = rl._load_policy

    def load_and_spy(*args, **kwargs):
        model, tokenizer, meta = load_policy(*args, **kwargs)
        spies.append((_spy_backward(model), {k: v.clone() for k, v in model.state_dict().items()}, model))
        return model, tokenizer, meta
    monkeypatch.setattr(rl, "_load_policy", load_and_spy)
    config = small_config(base_dir, ckpt_dir, out_tag=f"zv{int(filter_zero_variance)}", num_steps=1,
                          filter_zero_variance=filter_zero_variance, num_minibatches=2)
    summary = train_rl(config, tasks=_tasks(impossible=True))
    record = summary["records"][0]
    assert record["zero_variance_frac"] == 1.0 and record["reward/correctness"] == 0.0
    seen, before, model = spies[0]
    assert seen["calls"] >= 2 and not seen["nonzero"]         # a backward ran in each minibatch, all zero
    # filtered: nothing to learn anywhere, so no optimizer step; unfiltered: steps with exactly zero gradients
    assert record["updates"] == (0 if filter_zero_variance else 2)
    assert record["trained_rows"] == (0 if filter_zero_variance else 16)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


@pytest.mark.parametrize("long_every", [2, 1])
def test_prompts_longer_than_the_context_are_skipped(tiny_sft, long_every):
    base_dir, ckpt_dir = tiny_sft
    config = small_config(base_dir, ckpt_dir, out_tag=f"long{long_every}", num_steps=2, prompts_per_step=4)
    summary = train_rl(config, tasks=_tasks(long_every=long_every))
    records = summary["records"]
    if long_every == 1:  # nothing left to sample: the steps still run, without an update
        for record in records:
            assert record["skipped_prompts"] == 4 and record["updates"] == 0 and record["trained_rows"] == 0
    else:  # the stream's shuffled order decides how many of each step's 4 prompts are the long ones
        assert 0 < sum(r["skipped_prompts"] for r in records) < 8
        for record in records:
            assert record["trained_rows"] <= (4 - record["skipped_prompts"]) * 4


def test_grpo_scaling_matches_one_big_batch(tiny_sft):
    """Micro-batching + minibatch normalisation: the accumulated gradient equals the loss of the whole batch."""
    import contextlib

    base_dir, ckpt_dir = tiny_sft
    for loss_type in ("grpo", "dapo"):
        grads = []
        for device_batch_size in (16, 3):
            model, tokenizer, _ = ckpt.load_model(ckpt_dir, device="cpu", phase="train")
            config = small_config(base_dir, ckpt_dir, loss_type=loss_type, device_batch_size=device_batch_size,
                                  lr_scale=0.0)
            rollout = collect_rollout(Engine(model, tokenizer), tokenizer, [Addition()[i] for i in range(4)],
                                      build_reward(config), num_samples=4, max_new_tokens=16, temperature=1.0, seed=3)
            data = training_rows(rollout.prompts, rollout.generations, mask_truncated=False)
            optimizer = model.setup_optimizer(matrix_lr=0.0, embedding_lr=0.0, lm_head_lr=0.0, scalar_lr=0.0)
            captured = {}
            original_step = optimizer.step

            def capture_step(*args, **kwargs):
                captured["grad"] = model.lm_head.weight.grad.clone()
                return original_step(*args, **kwargs)
            optimizer.step = capture_step
            config.grad_clip = 0.0
            rl.optimize_rollout(model, optimizer, data, rollout.advantages, list(range(16)), config, 0, 1.0, 0, 1,
                                "cpu", contextlib.nullcontext)
            grads.append(captured["grad"])
        assert grads[0].abs().max() > 0
        torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-4)


def test_shuffled_advantages_permute_only_the_trained_rows():
    """The negative control's advantages: the same values on the same rows, reassigned among them (seeded)."""
    advantages = torch.linspace(-1.5, 1.5, 16)
    rows = [0, 2, 3, 5, 7, 8, 11, 12, 15]
    shuffled = rl.shuffled_advantages(advantages, rows, seed=0, step=3, rank=0)
    others = [i for i in range(16) if i not in rows]
    assert torch.equal(shuffled[others], advantages[others])                 # untrained rows untouched
    assert sorted(shuffled[rows].tolist()) == sorted(advantages[rows].tolist())
    assert not torch.equal(shuffled[rows], advantages[rows])
    assert torch.equal(shuffled, rl.shuffled_advantages(advantages, rows, seed=0, step=3, rank=0))
    assert not torch.equal(shuffled, rl.shuffled_advantages(advantages, rows, seed=0, step=4, rank=0))
    assert torch.equal(advantages, torch.linspace(-1.5, 1.5, 16))           # the input is not modified


@pytest.mark.parametrize("shuffle", [False, True])
def test_shuffle_advantages_flag_feeds_the_update_a_permutation(tiny_sft, monkeypatch, shuffle):
    base_dir, ckpt_dir = tiny_sft
    seen = {}
    collect, optimize = rl.collect_rollout, rl.optimize_rollout

    def collect_and_keep(*args, **kwargs):
        seen["rollout"] = collect(*args, **kwargs)
        return seen["rollout"]

    def optimize_and_keep(model, optimizer, data, advantages, rows, *args, **kwargs):
        seen["advantages"], seen["rows"] = advantages.clone(), list(rows)
        return optimize(model, optimizer, data, advantages, rows, *args, **kwargs)
    monkeypatch.setattr(rl, "collect_rollout", collect_and_keep)
    monkeypatch.setattr(rl, "optimize_rollout", optimize_and_keep)
    config = small_config(base_dir, ckpt_dir, out_tag=f"shuffle{int(shuffle)}", num_steps=1, shuffle_advantages=shuffle)
    train_rl(config, tasks=_tasks())
    original, used, rows = seen["rollout"].advantages, seen["advantages"], seen["rows"]
    assert original.abs().sum() > 0, "the rollout should have groups with a learning signal"
    assert sorted(used[rows].tolist()) == sorted(original[rows].tolist())
    assert torch.equal(used, original) != shuffle


# ----------------------------------------------------------------------------------------------- resume, reference

_TIMING = {"tok_per_s", "t_rollout", "t_train", "t_step"}


def test_resume_gives_identical_metrics_and_weights(tiny_sft):
    base_dir, ckpt_dir = tiny_sft
    common = dict(num_steps=4, ppo_epochs=2, num_minibatches=2, kl_coef=0.05, seed=3)
    straight = train_rl(small_config(base_dir, ckpt_dir, out_tag="straight", **common), tasks=_tasks())
    first = train_rl(small_config(base_dir, ckpt_dir, out_tag="sliced", stop_at_step=2, **common), tasks=_tasks())
    assert first["step"] == 2 and not first["finished"]
    resumed = train_rl(small_config(base_dir, ckpt_dir, out_tag="sliced", resume=True, **common), tasks=_tasks())
    assert resumed["finished"] and resumed["reference_loaded"]

    def clean(records):
        return [{k: v for k, v in r.items() if k not in _TIMING} for r in records]
    assert clean(resumed["records"]) == clean(straight["records"])
    assert "kl" in straight["records"][-1] and straight["records"][-1]["kl"] > 0
    a, _, _ = ckpt.load_checkpoint(straight["checkpoint_dir"])
    b, _, _ = ckpt.load_checkpoint(resumed["checkpoint_dir"])
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_kl_coef_zero_loads_no_reference(tiny_sft, monkeypatch):
    base_dir, ckpt_dir = tiny_sft
    loads = []
    load_model = ckpt.load_model

    def counting_load(*args, **kwargs):
        loads.append(args[0])
        return load_model(*args, **kwargs)
    monkeypatch.setattr(ckpt, "load_model", counting_load)
    summary = train_rl(small_config(base_dir, ckpt_dir, out_tag="nokl", num_steps=1), tasks=_tasks())
    assert len(loads) == 1 and not summary["reference_loaded"] and "kl" not in summary["records"][0]
    summary = train_rl(small_config(base_dir, ckpt_dir, out_tag="kl", num_steps=1, kl_coef=0.1), tasks=_tasks())
    assert len(loads) == 3 and summary["reference_loaded"] and "kl" in summary["records"][0]


# ----------------------------------------------------------------------------------------------- two ranks

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world_size, port, base_dir, ckpt_dir, out_file):
    """One gloo rank; rank 1 sees only zero-variance groups, so with filtering its batch is always empty."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    if rank == 1:
        def all_zero_variance(rewards, group_size, normalize_std=True):
            return torch.zeros_like(rewards), torch.ones(rewards.numel() // group_size, dtype=torch.bool)
        rollout_module.group_advantages = all_zero_variance
    config = small_config(base_dir, ckpt_dir, out_tag="ddp", num_steps=2, prompts_per_step=8,
                          filter_zero_variance=True, num_minibatches=2, ppo_epochs=2, lr_scale=0.5)
    summary = train_rl(config, tasks=_tasks())
    model, _, _ = ckpt.load_model(ckpt_dir, device="cpu")
    state, _, _ = ckpt.load_checkpoint(summary["checkpoint_dir"])
    changed = any(not torch.equal(state[k], v) for k, v in model.state_dict().items())
    torch.save({"updates": [r["updates"] for r in summary["records"]], "changed": changed,
                "trained_rows": [r["trained_rows"] for r in summary["records"]]}, f"{out_file}.{rank}")
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_one_filtered_to_nothing_still_steps_together(tiny_sft, tmp_path):
    base_dir, ckpt_dir = tiny_sft
    out_file = str(tmp_path / "result")
    # fork, not spawn: a spawned child spends ~10 s re-importing torch on a loaded box. Safe here: the parent has
    # no process group, runs one intra-op thread, and the grader pool restarts itself in a forked child.
    mp.start_processes(_rank_main, args=(2, _free_port(), base_dir, ckpt_dir, out_file), nprocs=2, join=True,
                       start_method="fork")
    results = [torch.load(f"{out_file}.{r}") for r in range(2)]
    # 2 passes x 2 minibatches on both ranks (fewer only if rank 0 also had nothing to learn in a minibatch)
    assert results[0]["updates"] == results[1]["updates"] and sum(results[0]["updates"]) > 0
    assert results[0]["trained_rows"] == results[1]["trained_rows"]   # all-reduced: rank 0's rows only
    assert 0 < results[0]["trained_rows"][0] <= 16
    assert results[0]["changed"]                                      # rank 0's signal reached the weights


# ----------------------------------------------------------------------------------------------- CLI

def test_cli_runs_writes_report_and_log(tiny_sft, tmp_path, capsys):
    from scripts.chat_rl import main

    base_dir, ckpt_dir = tiny_sft
    data = tmp_path / "addition.jsonl"
    with open(data, "w") as f:
        for example in Addition(size=20):
            f.write(json.dumps(example) + "\n")
    main(["--init-from", ckpt_dir, "--base-dir", base_dir, "--device", "cpu", "--task", f"customjson:{data}",
          "--num-steps", "2", "--prompts-per-step", "2", "--num-samples", "4", "--max-new-tokens", "16",
          "--eval-every", "0", "--eval-problems", "8", "--eval-pass-k", "2", "--out-tag", "cli", "--no-std-normalize",
          "--loss-type", "dr_grpo", "--overlong-buffer", "4"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("RESULT initial_accuracy=") and "steps=2" in last
    with open(os.path.join(base_dir, "report", "chat_rl.json")) as f:
        section = json.load(f)
    assert {"initial_accuracy", "accuracy", "mean_reward"} <= set(section["metrics"])
    assert section["series"]["reward"] and section["series"]["accuracy"]
    assert os.path.exists(os.path.join(ckpt.checkpoint_dir("rl", "cli", base_dir), "model_000002.pt"))
    with open(os.path.join(base_dir, "logs", "chat_rl_cli.jsonl")) as f:
        logged = [json.loads(line) for line in f]
    assert [r["step"] for r in logged if "reward" in r] == [1, 2]
    assert all("reward/overlong" in r for r in logged if "reward" in r)


@pytest.mark.parametrize("flags, expected", [
    (["--temperature", "0"], "--temperature 0.0"),
    (["--loss-type", "ppo"], "--loss-type ppo"),
    (["--clip-low", "1.5"], "--clip-low 1.5"),
    (["--overlong-buffer", "999"], "--overlong-buffer 999"),
])
def test_cli_bad_flags_are_one_line_errors(tiny_sft, flags, expected, capsys):
    from reasoning.common import run_main
    from scripts.chat_rl import main

    base_dir, ckpt_dir = tiny_sft
    with pytest.raises(SystemExit) as exc:
        run_main(lambda: main(["--init-from", ckpt_dir, "--base-dir", base_dir, "--device", "cpu", *flags]))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and expected in err and len(err.splitlines()) == 1
