"""GSM8K in the iCoT format (Deng et al. 2023; the data Coconut trains on): a question, its list of calculation steps
and the answer, for the latent-reasoning curriculum (reasoning/latent.py, scripts/chat_latent.py).

The steps are the calculator annotations of the reference solution, in order: "Natalia sold 48/2 = <<48/2=24>>24
clips ... #### 72" -> steps ["48/2=24", "48+24=72"], answer "72" (iCoT writes them as `<<48/2=24>> <<48+24=72>>
### 72`). The same local JSONL files (or hub rows) as tasks/gsm8k.py, so it runs offline on ../shared/data; a
solution without any annotation keeps an empty step list (its layout is the answer alone). The assistant turn is
the steps, one per line, then "The answer is \\boxed{N}.", and grading is GSM8K's (math_equal on the boxed answer).
"""

from __future__ import annotations

from tasks.gsm8k import _CALCULATION_RE, GSM8K


def icot_steps(answer: str) -> list[str]:
    """The `<<expression=result>>` annotations of a GSM8K reference solution, without the brackets."""
    body = answer.rpartition("####")[0]
    return [match.group(1).strip() for match in _CALCULATION_RE.finditer(body) if match.group(1).strip()]


class GSM8KiCoT(GSM8K):
    """GSM8K examples with "steps" (iCoT) and an assistant turn that writes them; everything else as GSM8K."""

    def get_example(self, index: int) -> dict:
        example = super().get_example(index)
        steps = icot_steps(self.rows[index]["answer"])
        text = "".join(step + "\n" for step in steps) + f"The answer is \\boxed{{{example['answer']}}}."
        user = example["messages"][0]
        return dict(example, messages=[user, {"role": "assistant", "content": text}], steps=steps,
                    id=f"gsm8k-icot/{self.split}/{index}")
