"""SmolTalk: general chat conversations (HuggingFaceTB/smol-smoltalk) that keep an SFT model able to just talk.

Mixed into SFT next to the math sources so the model keeps following ordinary instructions. Rows are
{"messages": [{"role", "content"}, ...]} with an optional leading system message; there is no grader (the task
is for training only). Local data: a parquet or JSONL file of such rows (smoltalk_<split>.parquet / .jsonl).
Conversations are checked when read: roles must alternate user/assistant after an optional system message.
"""

from __future__ import annotations

from tasks.common import Task
from tasks.sources import load_rows

HUB_ID = "HuggingFaceTB/smol-smoltalk"


def normalize_messages(messages, where: str) -> list[dict]:
    """Plain {"role", "content": str} messages in chat order; ValueError naming `where` otherwise."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: expected a non-empty 'messages' list")
    has_system = messages[0].get("role") == "system" if isinstance(messages[0], dict) else False
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str) or not message["content"]:
            raise ValueError(f"{where}: message {i} needs a non-empty string 'content'")
        turn = i - has_system  # user turns are even, assistant turns odd
        expected = "system" if turn < 0 else ("user" if turn % 2 == 0 else "assistant")
        if message.get("role") != expected:
            raise ValueError(f"{where}: message {i} has role {message.get('role')!r}, expected {expected!r}")
        out.append({"role": expected, "content": message["content"]})
    if out[-1]["role"] != "assistant":
        raise ValueError(f"{where}: the conversation must end with an assistant message")
    return out


class SmolTalk(Task):
    def __init__(self, split: str = "train", data_path: str | None = None, hub_id: str = HUB_ID):
        if split not in ("train", "test"):
            raise ValueError(f"split={split!r}: expected 'train' or 'test'")
        self.split = split
        self.rows = load_rows("SmolTalk", data_path=data_path, hub_id=hub_id, hub_config=None, split=split,
                              filenames=[f"smoltalk_{split}{s}" for s in (".parquet", ".jsonl", ".json")],
                              expected='parquet/JSONL rows {"messages": [...]}')

    def __len__(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict:
        messages = normalize_messages(self.rows[index].get("messages"), f"SmolTalk {self.split} row {index}")
        return dict(messages=messages, id=f"smoltalk/{self.split}/{index}")
