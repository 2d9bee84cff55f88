"""Latent reasoning (Coconut; reasoning/latent.py, scripts/chat_latent.py, the engine's latent mode).

The cached latent forward (one cached forward per latent position) must equal the plain sequential computation
(the whole sequence re-run with each hidden state appended as the next input), values and gradients; the curriculum
must lay out tokens and latent positions per stage; the engine's latent decoding of a ragged batch must equal
one-by-one decoding and the uncached reference; a tiny run trains, resumes exactly, and evaluates."""

import json
import os

import pytest
import torch

from reasoning.engine import Engine
from reasoning.gpt import GPT, GPTConfig
from reasoning.latent import (END_LATENT, LATENT, START_LATENT, LatentObjective, LatentRow, collate, grow_vocab,
                              latent_suffix_hidden, render_latent, serving_mode, stage_layout, with_latent_tokens)
from reasoning.tokenizer import LATENT_TOKENS, SPECIAL_TOKENS, Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def build_model(vocab_size, seed=0, n_kv_head=2):
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = GPT(GPTConfig(max_seq_len=96, vocab_size=vocab_size, n_layer=2, n_head=4, n_kv_head=n_kv_head,
                              n_embd=48))
    model.to_empty(device="cpu")
    model.init_weights()
    with torch.no_grad():  # noise everywhere so attention and the zero-initialised projections matter
        for p in model.parameters():
            p.add_(0.15 * torch.randn_like(p))
        model.lm_head.weight.mul_(2.5)
    return model


@pytest.fixture(scope="module")
def tokenizer():
    return with_latent_tokens(Tokenizer({bytes([i]): i for i in range(256)}))  # byte vocabulary + specials


def sequential_hidden(model, prefix, num_latents, suffix):
    """Reference: no cache; every latent step re-runs the whole sequence and appends its last hidden state."""
    embeds = model.wte(torch.tensor(prefix))[None]  # (1, T, D)
    for _ in range(num_latents):
        hidden = model.forward_hidden(None, input_embeds=embeds)
        embeds = torch.cat([embeds, hidden[:, -1:]], dim=1)
    embeds = torch.cat([embeds, model.wte(torch.tensor(suffix))[None]], dim=1)
    return model.forward_hidden(None, input_embeds=embeds)[0, -len(suffix):]  # (len(suffix), D)


@pytest.mark.parametrize("num_latents", [0, 3])
def test_cached_latent_forward_equals_sequential_computation_values_and_gradients(num_latents):
    model = build_model(80)
    idx = torch.randint(0, 80, (2, 7))
    assert torch.allclose(model.forward_hidden(None, input_embeds=model.wte(idx)), model.forward_hidden(idx))
    g = torch.Generator().manual_seed(1)
    rows = [LatentRow(torch.randint(0, 80, (n,), generator=g).tolist(), num_latents,
                      torch.randint(0, 80, (m,), generator=g).tolist())
            for n, m in [(9, 4), (3, 7), (6, 2)]]  # ragged prefixes and suffixes
    batch, targets = collate(rows, pad_id=0)
    weights = torch.randn(len(rows), batch.suffix.size(1), 48, generator=g)  # a loss that reads every position

    hidden = latent_suffix_hidden(model, batch)  # (B, Ts, D)
    mask = (targets >= 0)[..., None]
    (hidden * weights * mask).sum().backward()
    cached_grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    total = 0
    for b, row in enumerate(rows):
        reference = sequential_hidden(model, row.prefix, num_latents, row.suffix[:-1])
        n = len(row.suffix) - 1
        assert torch.allclose(hidden[b, :n], reference, atol=1e-5), (b, (hidden[b, :n] - reference).abs().max())
        total = total + (reference * weights[b, :n]).sum()
    total.backward()
    assert cached_grads.keys() == {name for name, p in model.named_parameters() if p.grad is not None}
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert torch.allclose(cached_grads[name], p.grad, atol=1e-4, rtol=1e-4), name


def test_objective_is_the_cross_entropy_of_the_suffix_targets():
    model = build_model(80)
    rows = [LatentRow([1, 2, 3], 2, [4, 5, 6, 7]), LatentRow([8], 2, [9, 10])]
    batch, targets = collate(rows, pad_id=0)
    assert targets.tolist() == [[5, 6, 7], [10, -1, -1]]  # the first suffix token (<|end-latent|>) is input only
    loss = LatentObjective(model)(batch, targets, loss_reduction="sum")
    expected = 0.0
    for row in rows:
        logits = model.compute_logits(sequential_hidden(model, row.prefix, 2, row.suffix[:-1]))
        expected += torch.nn.functional.cross_entropy(logits, torch.tensor(row.suffix[1:]), reduction="sum")
    assert torch.allclose(loss, expected, rtol=1e-5)


def test_latent_tokens_are_appended_without_moving_any_id(tokenizer):
    plain = Tokenizer({bytes([i]): i for i in range(256)})
    assert tokenizer.vocab_size == plain.vocab_size + 3
    assert all(tokenizer.encode_special(name) == plain.encode_special(name) for name in SPECIAL_TOKENS)
    assert [tokenizer.encode_special(n) for n in LATENT_TOKENS] == list(range(plain.vocab_size, plain.vocab_size + 3))
    assert with_latent_tokens(tokenizer) is tokenizer
    assert serving_mode(plain, {"step": 3}) == (plain, None)
    served, steps = serving_mode(plain, {"latent": {"latent_steps": 6}})
    assert steps == 6 and served.vocab_size == tokenizer.vocab_size

    model = build_model(plain.vocab_size)
    before = {name: p.detach().clone() for name, p in model.state_dict().items()}
    grow_vocab(model, tokenizer.vocab_size)
    assert model.config.vocab_size == tokenizer.vocab_size == model.wte.weight.size(0) == model.lm_head.weight.size(0)
    assert torch.equal(model.wte.weight[:plain.vocab_size], before["wte.weight"])
    assert torch.equal(model.lm_head.weight[:plain.vocab_size], before["lm_head.weight"])
    assert torch.equal(model.lm_head.weight[plain.vocab_size:], torch.zeros(3, 48))


def test_curriculum_layout_per_stage(tokenizer):
    steps, answer = ["1 + 2 = 3", "3 * 4 = 12", "12 - 5 = 7"], "7"
    prompt = tokenizer.render_for_completion({"messages": [{"role": "user", "content": "q"}]})
    start, end, latent = (tokenizer.encode_special(n) for n in (START_LATENT, END_LATENT, LATENT))
    stop = tokenizer.encode_special("<|assistant_end|>")
    answer_ids = tokenizer.encode("The answer is \\boxed{7}.")

    def expected(kept, latents):
        return prompt + [start] + [latent] * latents + [end] + tokenizer.encode("".join(s + "\n" for s in kept)) \
            + answer_ids + [stop]

    for stage, c, kept, latents in [(0, 2, steps, 0), (1, 2, steps[1:], 2), (2, 2, steps[2:], 4), (3, 1, [], 3),
                                    (5, 2, [], 10)]:  # stage 5 > 3 steps: every step latent, still k*c positions
        row = render_latent(tokenizer, prompt, steps, answer, *stage_layout(stage, c))
        assert row.ids(latent) == expected(kept, latents), stage
        assert row.prefix[-1] == start and row.suffix[0] == end and row.num_latents == latents
    nocot = render_latent(tokenizer, prompt, steps, answer, *stage_layout(2, 2, nocot=True))
    assert nocot.ids(latent) == expected([], 0)
    cut = render_latent(tokenizer, prompt, steps, answer, 1, 2, max_len=len(prompt) + 1 + 2 + 5)
    assert len(cut) == len(prompt) + 8 and cut.suffix == expected(steps[1:], 2)[len(prompt) + 3:][:5]

    from scripts.chat_latent import LatentConfig
    config = LatentConfig(start_stage=1, max_stage=3, steps_per_stage=10, latents_per_step=2)
    assert config.num_iterations == 30
    assert [config.layout_at(s) for s in (0, 9, 10, 29)] == [(1, 2), (1, 2), (2, 4), (3, 6)]
    from scripts.chat_latent import build_parser  # the latent forward runs through a cache: no SFT memory flags
    assert "--activation-checkpointing" not in build_parser().format_help()
    assert config.activation_checkpointing == "off" and config.max_tokens_per_micro_batch == 0


def test_gsm8k_icot_steps_are_the_calculator_annotations(tmp_path, tokenizer):
    from tasks.gsm8k_icot import GSM8KiCoT, icot_steps

    answer = "Natalia sold 48/2 = <<48/2=24>>24 clips.\nIn all 48+24 = <<48+24=72>>72 clips.\n#### 72"
    assert icot_steps(answer) == ["48/2=24", "48+24=72"]
    path = tmp_path / "gsm8k_train.jsonl"
    path.write_text(json.dumps({"question": "How many clips?", "answer": answer}) + "\n")
    example = GSM8KiCoT("train", data_path=str(path))[0]
    assert example["steps"] == ["48/2=24", "48+24=72"] and example["answer"] == "72"
    assert example["messages"][1]["content"] == "48/2=24\n48+24=72\nThe answer is \\boxed{72}."
    task = GSM8KiCoT("train", data_path=str(path))
    assert task.evaluate(example, "The answer is \\boxed{72}.") and not task.evaluate(example, "\\boxed{71}")
    from tasks.registry import build_task  # the registered name, so chat_eval -a GSM8K-iCoT evaluates it
    registered = build_task("gsm8k-icot", "train", data_path=str(path))
    assert isinstance(registered, GSM8KiCoT) and registered[0] == example
    prompt = tokenizer.render_for_completion({"messages": example["messages"][:1]})
    row = render_latent(tokenizer, prompt, example["steps"], example["answer"], *stage_layout(1, 2))
    assert tokenizer.decode(row.suffix) == "<|end-latent|>48+24=72\nThe answer is \\boxed{72}.<|assistant_end|>"


def reference_latent_greedy(model, prompt, num_latents, start, end, max_tokens):
    """Greedy decoding of the latent layout without a cache."""
    embeds = model.wte(torch.tensor(prompt + [start]))[None]
    for _ in range(num_latents):
        embeds = torch.cat([embeds, model.forward_hidden(None, input_embeds=embeds)[:, -1:]], dim=1)
    embeds = torch.cat([embeds, model.wte(torch.tensor([end]))[None]], dim=1)
    tokens = []
    for _ in range(max_tokens):
        token = int(model.compute_logits(model.forward_hidden(None, input_embeds=embeds)[0, -1]).argmax())
        tokens.append(token)
        embeds = torch.cat([embeds, model.wte(torch.tensor([token]))[None]], dim=1)
    return tokens


@torch.no_grad()
def test_engine_latent_mode_ragged_batch_equals_one_by_one_and_the_uncached_reference(tokenizer):
    model = build_model(tokenizer.vocab_size, seed=3).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (5, 17, 1, 11, 30)]
    engine = Engine(model, tokenizer)
    settings = dict(max_tokens=6, temperature=0.0, stop_tokens=[], latent_steps=4)
    batched = engine.generate(prompts, **settings)
    start, end = tokenizer.encode_special(START_LATENT), tokenizer.encode_special(END_LATENT)
    for i, prompt in enumerate(prompts):
        alone = engine.generate([prompt], **settings)[0]
        assert batched[i].tokens == alone.tokens and batched[i].latent_steps == 4
        assert batched[i].tokens == reference_latent_greedy(model, prompt, 4, start, end, 6), i
    # latent_steps=0 is the CoT/no-CoT layout (empty span); the span changes what is decoded
    assert engine.generate(prompts, **{**settings, "latent_steps": 0})[0].tokens == \
        reference_latent_greedy(model, prompts[0], 0, start, end, 6)
    assert Engine(model, tokenizer, latent_steps=4).generate(prompts[:1], max_tokens=6, temperature=0.0,
                                                             stop_tokens=[])[0].tokens == batched[0].tokens
    # the latent span takes context slots: a prompt that leaves fewer than N + 2 of them gets no token
    full = engine.generate([[7] * (96 - 5)], **settings)[0]
    assert full.tokens == [] and full.stop_reason == "context"
    with pytest.raises(ValueError, match="latent"):
        Engine(model, Tokenizer({bytes([i]): i for i in range(256)})).generate(prompts, latent_steps=2)


def test_chat_display_shows_the_latent_count(tokenizer):
    from reasoning.chat import REASONING, ReplyDecoder, stream_reply

    model = build_model(tokenizer.vocab_size, seed=3).eval()
    prompt = tokenizer.render_for_completion({"messages": [{"role": "user", "content": "2+2?"}]})
    decoder = ReplyDecoder(tokenizer)
    deltas = list(stream_reply(Engine(model, tokenizer, latent_steps=6), prompt, decoder, max_tokens=3,
                               temperature=0.0))
    assert deltas[0] == (REASONING, "[6 latent steps]") and decoder.reasoning.startswith("[6 latent steps]")


def test_chat_latent_trains_resumes_exactly_and_evaluates(tiny_corpus, tmp_path, capsys, monkeypatch):
    """A tiny curriculum (stages 0..2) from a random checkpoint; a run stopped mid-way and resumed ends with the
    same weights; chat_eval evaluates the latent checkpoint in latent mode; chat_cli shows the latent count."""
    import sys
    sys.path.insert(0, os.path.dirname(__file__))
    from helpers_models import save_tiny_checkpoint

    from reasoning import checkpoint as ckpt
    from scripts import chat_eval, chat_latent

    base = str(tmp_path)
    save_tiny_checkpoint(base, tiny_corpus.tokenizer_dir, stage="sft", tag="tiny", max_seq_len=256)
    flags = ["--base-dir", base, "--device", "cpu", "--stage", "sft", "--tag", "tiny", "--max-stage", "2",
             "--steps-per-stage", "2", "--latents-per-step", "2", "--device-batch-size", "2",
             "--total-batch-rows", "4", "--task-size", "64", "--max-seq-len", "256", "--log-every", "100"]
    chat_latent.main(flags + ["--out-tag", "full", "--eval-every", "0", "--eval-problems", "4",
                              "--eval-max-tokens", "8"])
    out = capsys.readouterr().out
    assert "| 4 latent steps | accuracy" in out and out.strip().splitlines()[-1].startswith("RESULT train_loss=")
    full_dir = ckpt.checkpoint_dir("latent", "full", base)
    model_state, _, meta = ckpt.load_checkpoint(full_dir)
    assert meta["step"] == 6 and meta["latent"] == {"stage": 2, "latent_steps": 4, "latents_per_step": 2,
                                                     "nocot": False}
    assert model_state["wte.weight"].size(0) == tiny_corpus.vocab_size + 3

    chat_latent.main(flags + ["--out-tag", "cut", "--stop-at-step", "3"])  # stops mid-stage 1
    chat_latent.main(flags + ["--out-tag", "cut", "--resume"])
    resumed, _, resumed_meta = ckpt.load_checkpoint(ckpt.checkpoint_dir("latent", "cut", base))
    assert resumed_meta["step"] == 6
    assert all(torch.equal(model_state[k], resumed[k]) for k in model_state)
    capsys.readouterr()

    chat_eval.main(["--base-dir", base, "--device", "cpu", "--stage", "latent", "--tag", "full", "-a", "synthetic",
                    "--max-problems", "6", "--max-tokens", "8", "--no-report", "--out-dir", str(tmp_path / "eval")])
    out = capsys.readouterr().out
    assert "latent mode: 4 latent steps" in out and out.strip().splitlines()[-1].startswith("RESULT task=synthetic")
    with open(tmp_path / "eval" / "predictions.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert len(records) == 6 and all(r["latent_steps"] == 4 for r in records)

    from scripts import chat_cli
    monkeypatch.setenv("REASONING_BASE_DIR", base)
    monkeypatch.setattr(sys, "argv", ["chat_cli", "--device", "cpu", "--stage", "latent", "--tag", "full", "-p",
                                      "2+2?", "--temperature", "0", "--max-tokens", "4"])
    chat_cli.main()
    assert capsys.readouterr().out.startswith("[thinking] [4 latent steps]")


@pytest.mark.slow
def test_chat_latent_two_ranks_match_one_process(tiny_corpus, tmp_path):
    """torchrun --nproc_per_node=2 (gloo): each rank takes half of the step's rows and the gradients are reduced, so
    the curriculum run ends with the weights of one process taking all the rows."""
    import subprocess
    import sys
    sys.path.insert(0, os.path.dirname(__file__))
    from helpers_models import save_tiny_checkpoint

    from reasoning import checkpoint as ckpt

    base = str(tmp_path)
    save_tiny_checkpoint(base, tiny_corpus.tokenizer_dir, stage="sft", tag="tiny", max_seq_len=256)
    flags = ["--base-dir", base, "--device", "cpu", "--stage", "sft", "--tag", "tiny", "--max-stage", "1",
             "--steps-per-stage", "2", "--device-batch-size", "2", "--total-batch-rows", "4", "--task-size", "64",
             "--max-seq-len", "256"]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=repo, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    for out_tag, launcher in [("one", []), ("two", ["-m", "torch.distributed.run", "--standalone",
                                                    "--nproc_per_node=2"])]:
        cmd = [sys.executable, *launcher, "-m", "scripts.chat_latent", *(["--"] if launcher else []), *flags,
               "--out-tag", out_tag]
        proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    one, _, _ = ckpt.load_checkpoint(ckpt.checkpoint_dir("latent", "one", base))
    two, _, meta = ckpt.load_checkpoint(ckpt.checkpoint_dir("latent", "two", base))
    assert len(meta["positions"]) == 2
    for name in one:  # the reduction order differs: AdamW's normalisation lifts that to ~1e-4 on embedding rows
        # with tiny gradients (matrices agree to ~1e-7); a wrong split of the data moves weights by ~lr (~0.1)
        assert torch.allclose(one[name], two[name], atol=1e-3), name
