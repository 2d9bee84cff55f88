"""Tasks: indexable collections of conversations with a grader attached.

Every data set the chat stages touch (SFT mixtures, RL prompts, eval suites) is a `Task`: `len(task)`,
`task[i]` -> example dict with at least `"messages"` (see dev/INTERFACES.md for the conversation format) plus
whatever fields its grader needs, and `evaluate(example, completion) -> bool` / `reward(...) -> float`.

Slicing (`task[100:200]`, `task[::2]`) returns a lightweight view, so a split or a subset never copies data.
`TaskMixture` shuffles several tasks together (deterministically, by seed) and stamps each example with the name
of the task it came from so `evaluate`/`reward` on the mixture can hand the example back to the task that knows
how to grade it.
"""

from __future__ import annotations

import bisect
import operator

import numpy as np

from reasoning.rewards import Completion, answer_text
from reasoning.verifiers import extract_answer

GRADER_DESCRIPTION = ("reasoning.verifiers.math_equal(gold, extract_answer(text after the think span, "
                      "strict=False)); no think-span close -> no answer")


def final_answer(completion: str) -> str | None:
    """The answer a completion commits to, or None (think span never closed, or nothing extractable)."""
    visible = answer_text(Completion(text=completion))
    return None if visible is None else extract_answer(visible, strict=False)


class Task:
    """Base class. Subclasses implement `__len__`, `get_example(index)` (0 <= index < len) and `evaluate`."""

    eval_type = "generative"

    @property
    def name(self) -> str:
        return type(self).__name__

    def __len__(self) -> int:
        raise NotImplementedError

    def get_example(self, index: int) -> dict:
        raise NotImplementedError

    def evaluate(self, example: dict, completion: str) -> bool:
        raise NotImplementedError(f"{self.name} has no grader")

    def reward(self, example: dict, completion: str) -> float:
        """Scalar reward for RL; by default 1.0 for a correct completion and 0.0 otherwise."""
        return float(self.evaluate(example, completion))

    def extract(self, completion: str) -> str | None:
        """The answer a completion commits to, for eval records and maj@k (default: the last box after the
        think span)."""
        return final_answer(completion)

    @property
    def grader_description(self) -> str:
        """What decides correctness, saved in an eval's protocol (a view grades like its parent)."""
        owner = getattr(self, "parent", self)
        return f"{type(owner).__module__}.{type(owner).__name__}.evaluate"

    def __getitem__(self, key):
        if isinstance(key, slice):
            return TaskView(self, range(len(self))[key])
        index = operator.index(key)
        size = len(self)
        if index < 0:
            index += size
        if not 0 <= index < size:
            raise IndexError(f"{self.name}: index {key} out of range for {size} examples")
        return self.get_example(index)

    def __iter__(self):
        for index in range(len(self)):
            yield self.get_example(index)

    def _graders(self) -> dict[str, "Task"]:
        """Task name -> the task able to grade examples stamped with that name (composites merge children)."""
        return {self.name: self}

    def __repr__(self) -> str:
        return f"{self.name}(len={len(self)})"


class TaskView(Task):
    """A sub-range of another task (what slicing returns); grading is delegated to the parent."""

    def __init__(self, parent: Task, indices: range):
        self.parent = parent
        self.indices = indices
        self.eval_type = parent.eval_type

    @property
    def name(self) -> str:
        return self.parent.name

    def __len__(self) -> int:
        return len(self.indices)

    def get_example(self, index: int) -> dict:
        return self.parent.get_example(self.indices[index])

    def __getitem__(self, key):
        if isinstance(key, slice):  # a view of a view is a view of the parent: no chains of indirection
            return TaskView(self.parent, self.indices[key])
        return super().__getitem__(key)

    def evaluate(self, example: dict, completion: str) -> bool:
        return self.parent.evaluate(example, completion)

    def reward(self, example: dict, completion: str) -> float:
        return self.parent.reward(example, completion)

    def _graders(self) -> dict[str, Task]:
        return self.parent._graders()


class TaskMixture(Task):
    """All examples of all tasks behind one index space, shuffled with a fixed seed. List a task twice to
    oversample it 2x."""

    def __init__(self, tasks, seed: int = 0):
        tasks = list(tasks)
        if not tasks:
            raise ValueError(f"{type(self).__name__} needs at least one task")
        for task in tasks:
            if not isinstance(task, Task):
                raise ValueError(f"{type(self).__name__}: expected Task objects, got {type(task).__name__}")
        self.tasks = tasks
        # offsets[k] = first global index of tasks[k]; bisect maps a global index back to (task, local index)
        self.offsets = np.cumsum([0] + [len(t) for t in tasks]).tolist()
        total = self.offsets[-1]
        self.order = np.random.default_rng(seed).permutation(total)
        self.graders = {}
        for task in tasks:
            for name, grader in task._graders().items():
                known = self.graders.setdefault(name, grader)
                # same name, different grading code would make dispatch ambiguous; same class is harmless
                if type(known) is not type(grader):
                    raise ValueError(f"{type(self).__name__}: two different tasks are both named {name!r}")

    def __len__(self) -> int:
        return self.offsets[-1]

    def locate(self, index: int) -> tuple[int, int]:
        """Global index -> (position in self.tasks, index inside that task)."""
        index = int(self.order[index])
        task_pos = bisect.bisect_right(self.offsets, index) - 1
        return task_pos, index - self.offsets[task_pos]

    def get_example(self, index: int) -> dict:
        task_pos, local = self.locate(index)
        task = self.tasks[task_pos]
        example = dict(task[local])  # shallow copy: never mutate what a task may have cached
        example.setdefault("task", task.name)  # nested composites keep the innermost (grading) name
        return example

    def _grader_for(self, example: dict) -> Task:
        name = example.get("task")
        if name not in self.graders:
            raise ValueError(f"{type(self).__name__}: example has task={name!r}, expected one of "
                             f"{sorted(self.graders)}")
        return self.graders[name]

    def evaluate(self, example: dict, completion: str) -> bool:
        return self._grader_for(example).evaluate(example, completion)

    def reward(self, example: dict, completion: str) -> float:
        return self._grader_for(example).reward(example, completion)

    def _graders(self) -> dict[str, Task]:
        return dict(self.graders)
