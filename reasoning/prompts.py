"""Prompts and completions of generative evaluation and RL rollouts: a task example -> prompt tokens (chat or base
template), which prompts leave room for a completion, generated tokens -> completion text.

`prompt_mode="chat"`: the task's conversation up to the assistant turn (`tokenizer.render_for_completion`).
`prompt_mode="base"`: `BASE_TEMPLATE` after <|bos|>, for base checkpoints; the completion is cut at the first
"\\nProblem:" (a base model happily writes the next problem).
"""

from __future__ import annotations

PROMPT_MODES = ("chat", "base")
BASE_TEMPLATE = "Problem: {problem}\nSolution:"
BASE_STOP_TEXT = "\nProblem:"

TEMPLATE_SLOT = {"base": "{problem}", "chat": "{user message}"}


def template_text(prompt_mode: str, tokenizer=None) -> str:
    """The exact prompt text of `prompt_mode` for this tokenizer (ours or a Hugging Face model's chat format), with
    the problem as a placeholder slot; saved with the results, since MATH-500 scores swing with the template."""
    if prompt_mode not in PROMPT_MODES:
        raise ValueError(f"prompt_mode={prompt_mode!r}: expected one of {PROMPT_MODES}")
    slot = TEMPLATE_SLOT[prompt_mode]
    if tokenizer is None:
        prompt = ("<|bos|>" + BASE_TEMPLATE if prompt_mode == "base"
                  else "<|bos|><|user_start|>" + slot + "<|user_end|><|assistant_start|>")
    else:
        placeholder = {"problem": slot, "messages": [{"role": "user", "content": slot}]}
        prompt = tokenizer.decode(build_prompt(tokenizer, placeholder, prompt_mode))
    if prompt_mode == "base":
        return prompt + f"   (completion cut at {BASE_STOP_TEXT!r})"
    return prompt + "   (the task's user message in the slot; graded after the last think-end marker, if any)"


def problem_text(example: dict) -> str:
    if example.get("problem"):
        return example["problem"]
    return next(m["content"] for m in example["messages"] if m["role"] == "user")


def build_prompt(tokenizer, example: dict, prompt_mode: str) -> list[int]:
    if prompt_mode == "base":
        return tokenizer.encode(BASE_TEMPLATE.format(problem=problem_text(example)), prepend=tokenizer.bos_token_id)
    if prompt_mode == "chat":
        return tokenizer.render_for_completion({"messages": example["messages"]})
    raise ValueError(f"prompt_mode={prompt_mode!r}: expected one of {PROMPT_MODES}")


def completion_text(tokenizer, tokens: list[int], stop_reason: str | None, prompt_mode: str) -> str:
    """Decoded completion without its stop token; base mode also drops everything from the next "Problem:"."""
    if stop_reason == "stop" and tokens:
        tokens = tokens[:-1]
    text = tokenizer.decode(tokens)
    if prompt_mode == "base":
        text = text.split(BASE_STOP_TEXT, 1)[0]
    return text


def prompts_that_fit(prompts: list[list[int]], max_seq_len: int) -> list[int]:
    """Indices of the prompts that leave room for at least one generated token in a context of `max_seq_len`."""
    return [i for i, prompt in enumerate(prompts) if len(prompt) < max_seq_len]
