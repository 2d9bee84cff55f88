"""Latent reasoning (Coconut: Hao et al. 2024, "Training Large Language Models to Reason in a Continuous Latent
Space"): the parts the `chat_latent` stage (scripts/chat_latent.py), the engine's latent mode and the tests share.

A latent example is a question, its written reasoning steps and an answer (the GSM8K iCoT format; the synthetic
task exposes its steps the same way). Curriculum stage k replaces the first k steps by k*c latent positions
(c = `latents_per_step`); every row of a stage gets the same k*c positions, also a problem with fewer than k steps
(Coconut's "pad latent to max"), so inference runs a fixed number of latent steps. The rendered layout:

    <bos> <user_start> question <user_end> <assistant_start> <|start-latent|>  [latent] x n  <|end-latent|>
        steps k+1.. (one per line)  "The answer is \\boxed{A}."  <assistant_end>
    `----------------------------- prefix -----------------------------------'   latents  `------ suffix ------...

A latent position has no token: its input is the final (normed) hidden state of the position before it, so the
model's output at <|start-latent|> becomes the first latent input, and so on. The loss covers the suffix after
<|end-latent|> only (the remaining steps, the answer and <assistant_end>). Stage 0 is plain CoT with an empty latent
span; the no-CoT baseline removes every step with no latent positions.

The forward runs through the KV cache (`latent_suffix_hidden`): one prefill of the ragged prefixes, one cached
forward per latent position (B rows x 1 position), then one forward over the suffixes; not a re-forward of the
whole sequence per latent step. Training backpropagates through it. Attention writes the new keys/values into the
cache in place, and autograd refuses a backward through a tensor modified after it was saved, so the training cache
(`TrainingKVCache`) keeps one tensor per layer and copies them before each forward (`fork`): a forward writes into
fresh copies and the earlier forwards' saved keys stay as they were (a copy of B x layers x cache per forward,
small beside the activations). tests/test_latent.py checks values and gradients against an uncached sequential
computation. (torch.autograd.graph.allow_mutation_on_saved_tensors does the same generically but intercepts every
op in Python: twice the step time on CPU.)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from reasoning.common import UserError
from reasoning.gpt import KVCache
from reasoning.tokenizer import LATENT_TOKENS

START_LATENT, END_LATENT, LATENT = LATENT_TOKENS
ALL_STEPS = 10**9  # "remove every step" (the no-CoT layout)


def answer_text(answer: str) -> str:
    """The answer line every latent layout ends with (the graders read \\boxed{})."""
    return f"The answer is \\boxed{{{answer}}}."


# ----------------------------------------------------------------------------------------------- vocabulary

def with_latent_tokens(tokenizer):
    """The tokenizer with <|start-latent|>, <|end-latent|>, <|latent|> (appended after its special tokens)."""
    if not hasattr(tokenizer, "with_special_tokens"):
        raise UserError(f"latent reasoning needs the project's tokenizer (got {type(tokenizer).__name__}); "
                        "a Hugging Face vocabulary has no <|start-latent|>/<|end-latent|> tokens")
    return tokenizer.with_special_tokens(LATENT_TOKENS)


@torch.no_grad()
def grow_vocab(model, vocab_size: int) -> None:
    """Give `model` at least `vocab_size` embedding/lm_head rows, in place, existing rows untouched.

    A new input row is the mean embedding (a typical input scale); a new output row is zero, and training pushes
    those logits down (the latent-span tokens are forced by the engine, never sampled targets)."""
    old = model.config.vocab_size
    if vocab_size <= old:
        return
    weight = model.wte.weight
    grown = torch.cat([weight, weight.mean(dim=0, keepdim=True).expand(vocab_size - old, -1)])
    model.wte = torch.nn.Embedding(vocab_size, model.config.n_embd, _weight=grown.clone(),
                                   device=weight.device, dtype=weight.dtype)
    if model.config.tie_embeddings:
        model.lm_head = torch.nn.Linear(model.config.n_embd, vocab_size, bias=False, device=weight.device,
                                        dtype=weight.dtype)
    else:
        head = model.lm_head.weight
        model.lm_head = torch.nn.Linear(model.config.n_embd, vocab_size, bias=False, device=head.device,
                                        dtype=head.dtype)
        model.lm_head.weight.copy_(torch.cat([head, head.new_zeros(vocab_size - old, head.size(1))]))
    model.config = dataclasses.replace(model.config, vocab_size=vocab_size)
    model._tie_embeddings()


def serving_mode(tokenizer, meta: dict):
    """(tokenizer, latent steps) to serve a checkpoint: a chat_latent checkpoint's latent-step count (meta["latent"])
    with the latent tokens added; (tokenizer, None) for any other checkpoint."""
    latent = meta.get("latent")
    if not isinstance(latent, dict):
        return tokenizer, None
    steps = latent.get("latent_steps")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise UserError(f"checkpoint meta latent.latent_steps={steps!r}: expected an integer >= 0")
    return with_latent_tokens(tokenizer), steps


# ----------------------------------------------------------------------------------------------- curriculum

def stage_layout(stage: int, latents_per_step: int, nocot: bool = False) -> tuple[int, int]:
    """(written steps removed, latent positions) of curriculum stage `stage`; the no-CoT baseline removes all
    steps and has no latent positions."""
    if nocot:
        return ALL_STEPS, 0
    if stage < 0 or latents_per_step < 0:
        raise ValueError(f"stage={stage}, latents_per_step={latents_per_step}: expected both >= 0")
    return stage, stage * latents_per_step


@dataclass
class LatentRow:
    """One rendered example: prefix ids (ending with <|start-latent|>), `num_latents` latent positions, suffix ids
    (starting with <|end-latent|>, ending with <assistant_end>). Every suffix token after the first is a target."""
    prefix: list[int]
    num_latents: int
    suffix: list[int]

    def ids(self, latent_id: int) -> list[int]:
        """The whole sequence with `latent_id` standing in at the latent positions (display, tests)."""
        return self.prefix + [latent_id] * self.num_latents + self.suffix

    def __len__(self) -> int:
        return len(self.prefix) + self.num_latents + len(self.suffix)


def render_latent(tokenizer, prompt: list[int], steps: list[str], answer: str, removed_steps: int,
                  num_latents: int, max_len: int | None = None) -> LatentRow:
    """The layout of one example: `prompt` (ids ending with <assistant_start>), the first `removed_steps` of
    `steps` left out, `num_latents` latent positions. `max_len` cuts the suffix so the row fits (the prompt and the
    latent span are never cut: a row without room for them is an error naming the lengths)."""
    kept = steps[removed_steps:]
    text = "".join(step + "\n" for step in kept) + answer_text(answer)
    prefix = list(prompt) + [tokenizer.encode_special(START_LATENT)]
    suffix = ([tokenizer.encode_special(END_LATENT)] + tokenizer.encode(text)
              + [tokenizer.encode_special("<|assistant_end|>")])
    if max_len is not None:
        room = max_len - len(prefix) - num_latents
        if room < 2:
            raise UserError(f"a prompt of {len(prompt)} tokens plus {num_latents} latent positions leaves no room "
                            f"for the answer within {max_len} tokens; expected a larger --max-seq-len")
        suffix = suffix[:room]
    return LatentRow(prefix, num_latents, suffix)


def example_prompt(tokenizer, example: dict) -> list[int]:
    """Prompt ids of a task example: its user turn, up to <assistant_start>."""
    user = [m for m in example["messages"] if m["role"] != "assistant"]
    return tokenizer.render_for_completion({"messages": user})


# ----------------------------------------------------------------------------------------------- batches

@dataclass
class LatentBatch:
    """Rows of one curriculum stage, right-padded: prefix (B, Tp), suffix inputs (B, Ts) = suffix[:-1]."""
    prefix: torch.Tensor
    prefix_lengths: list[int]
    num_latents: int
    suffix: torch.Tensor
    suffix_lengths: list[int]

    def to(self, device) -> "LatentBatch":
        return dataclasses.replace(self, prefix=self.prefix.to(device), suffix=self.suffix.to(device))


def collate(rows: list[LatentRow], pad_id: int) -> tuple[LatentBatch, torch.Tensor]:
    """Rows (all with the same number of latent positions) -> (batch, targets (B, Ts), -1 where ignored)."""
    counts = {row.num_latents for row in rows}
    if len(counts) != 1:
        raise ValueError(f"collate: rows have latent counts {sorted(counts)}; a batch needs one")
    width_p = max(len(row.prefix) for row in rows)
    width_s = max(len(row.suffix) for row in rows) - 1
    prefix = torch.full((len(rows), width_p), pad_id, dtype=torch.long)
    suffix = torch.full((len(rows), width_s), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), width_s), -1, dtype=torch.long)
    for b, row in enumerate(rows):
        prefix[b, :len(row.prefix)] = torch.tensor(row.prefix)
        suffix[b, :len(row.suffix) - 1] = torch.tensor(row.suffix[:-1])
        targets[b, :len(row.suffix) - 1] = torch.tensor(row.suffix[1:])
    batch = LatentBatch(prefix, [len(r.prefix) for r in rows], counts.pop(), suffix,
                        [len(r.suffix) - 1 for r in rows])
    return batch, targets


# ----------------------------------------------------------------------------------------------- forward

class TrainingKVCache(KVCache):
    """A KVCache whose layers are separate tensors, copied by `fork` before each forward when autograd records."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.k = [layer.clone() for layer in self.k.unbind(0)]  # clones: views of one tensor share its version
        self.v = [layer.clone() for layer in self.v.unbind(0)]

    @property
    def batch_size(self) -> int:
        return self.k[0].size(0)

    @property
    def max_len(self) -> int:
        return self.k[0].size(2 if self.layout == "bhsd" else 1)

    def fork(self) -> None:
        if torch.is_grad_enabled():
            self.k = [layer.clone() for layer in self.k]
            self.v = [layer.clone() for layer in self.v]


def _cache_dtype(model, device: torch.device) -> torch.dtype:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return model.lm_head.weight.dtype


def run_latent_steps(model, cache: KVCache, last_hidden: torch.Tensor, num_latents: int,
                     new_lengths=None) -> torch.Tensor:
    """Feed `last_hidden` (B, D) back as the next input `num_latents` times through the cache; return the last
    latent position's hidden state (B, D) (or `last_hidden` itself when num_latents is 0).
    `new_lengths` (per row 0/1) keeps rows that ride along without a latent step from growing (engine)."""
    hidden = last_hidden
    for _ in range(num_latents):
        if isinstance(cache, TrainingKVCache):
            cache.fork()
        hidden = model.forward_hidden(None, kv_cache=cache, new_lengths=new_lengths,
                                      input_embeds=hidden[:, None])[:, 0]
    return hidden


def latent_suffix_hidden(model, batch: LatentBatch) -> torch.Tensor:
    """Final hidden states (B, Ts, D) at the suffix inputs: prefill, latent steps, suffix, all through one cache."""
    device = batch.prefix.device
    B = batch.prefix.size(0)
    max_len = batch.prefix.size(1) + batch.num_latents + batch.suffix.size(1)
    cache = TrainingKVCache.for_model(model.config, B, max_len, device=device, dtype=_cache_dtype(model, device))
    hidden = model.forward_hidden(batch.prefix, kv_cache=cache, new_lengths=batch.prefix_lengths)  # (B, Tp, D)
    last = hidden[torch.arange(B, device=device), torch.tensor(batch.prefix_lengths, device=device) - 1]  # (B, D)
    run_latent_steps(model, cache, last, batch.num_latents)
    cache.fork()
    return model.forward_hidden(batch.suffix, kv_cache=cache, new_lengths=batch.suffix_lengths)


class LatentObjective:
    """`model(inputs, targets, loss_reduction)` for reasoning.training.accumulate_gradients, with a LatentBatch as
    the inputs: the cross-entropy of the suffix targets after the latent forward."""

    def __init__(self, model):
        self.model = model

    def __call__(self, batch: LatentBatch, targets: torch.Tensor, loss_reduction: str = "mean") -> torch.Tensor:
        logits = self.model.compute_logits(latent_suffix_hidden(self.model, batch))  # (B, Ts, V) float32
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                               reduction=loss_reduction)

