"""Task base class, slicing views, TaskMixture (seeded shuffle, oversampling, dispatch)."""

from collections import Counter

import pytest

from tasks.common import Task, TaskMixture


class LetterTask(Task):
    """n examples whose answer is `prefix` + index; evaluate checks the completion ends with the answer."""

    def __init__(self, prefix, n, name=None):
        self.prefix, self.n, self._name = prefix, n, name

    @property
    def name(self):
        return self._name or f"Letter{self.prefix}"

    def __len__(self):
        return self.n

    def get_example(self, index):
        answer = f"{self.prefix}{index}"
        return {"messages": [{"role": "user", "content": f"say {answer}"},
                             {"role": "assistant", "content": answer}], "answer": answer}

    def evaluate(self, example, completion):
        return completion.strip().endswith(example["answer"])


class HalfRewardTask(LetterTask):
    """Overrides reward so dispatch through a composite can be told apart from the default float(evaluate)."""

    def reward(self, example, completion):
        return 0.5 if self.evaluate(example, completion) else -1.0


def answers(task):
    return [task[i]["answer"] for i in range(len(task))]


def test_indexing_len_and_negative_index():
    task = LetterTask("a", 5)
    assert len(task) == 5
    assert task[0]["answer"] == "a0"
    assert task[-1]["answer"] == "a4"
    assert task.eval_type == "generative"
    with pytest.raises(IndexError):
        task[5]
    with pytest.raises(IndexError):
        task[-6]
    assert [ex["answer"] for ex in task] == answers(task)


def test_slicing_returns_views_that_compose():
    task = LetterTask("a", 10)
    view = task[2:8]
    assert isinstance(view, Task) and len(view) == 6
    assert answers(view) == [f"a{i}" for i in range(2, 8)]
    assert answers(view[1::2]) == ["a3", "a5", "a7"]
    assert answers(task[::-3]) == ["a9", "a6", "a3", "a0"]
    assert len(task[20:30]) == 0
    assert view[-1]["answer"] == "a7"
    assert view.name == task.name
    ex = view[0]
    assert view.evaluate(ex, "a2") and not view.evaluate(ex, "a3")
    assert view.reward(ex, "a2") == 1.0 and view.reward(ex, "zz") == 0.0


def test_reward_defaults_to_evaluate():
    task = LetterTask("a", 3)
    assert task.reward(task[1], "a1") == 1.0
    assert task.reward(task[1], "a2") == 0.0
    with pytest.raises(NotImplementedError):
        Task().evaluate({}, "x")


def test_mixture_is_a_deterministic_permutation():
    a, b = LetterTask("a", 30), LetterTask("b", 20)
    mix = TaskMixture([a, b], seed=3)
    assert len(mix) == 50
    got = answers(mix)
    assert sorted(got) == sorted(answers(a) + answers(b))  # every example exactly once
    assert got == answers(TaskMixture([a, b], seed=3))
    assert got != answers(TaskMixture([a, b], seed=4))
    assert got[:30] != answers(a)  # actually shuffled, not concatenated
    # both sources spread over the whole range rather than in blocks
    first_half = Counter(x[0] for x in got[:25])
    assert first_half["a"] > 5 and first_half["b"] > 5


def test_mixture_oversampling_counts():
    a, b = LetterTask("a", 10), LetterTask("b", 10)
    mix = TaskMixture([a, a, a, b], seed=0)
    assert len(mix) == 40
    counts = Counter(answers(mix))
    assert all(counts[f"a{i}"] == 3 for i in range(10))
    assert all(counts[f"b{i}"] == 1 for i in range(10))


def test_mixture_examples_remember_source_and_dispatch_grading():
    a, h = LetterTask("a", 4), HalfRewardTask("h", 4, name="Half")
    mix = TaskMixture([a, h], seed=1)
    for i in range(len(mix)):
        ex = mix[i]
        source = a if ex["answer"].startswith("a") else h
        assert ex["task"] == source.name
        assert mix.evaluate(ex, ex["answer"]) and not mix.evaluate(ex, "nope")
        assert mix.reward(ex, ex["answer"]) == source.reward(ex, ex["answer"])
        assert mix.reward(ex, "nope") == source.reward(ex, "nope")
    assert {mix.reward(mix[i], "nope") for i in range(len(mix))} == {0.0, -1.0}
    # the source example is not mutated by stamping
    assert "task" not in a[0]


def test_unknown_source_and_ambiguous_names_are_rejected():
    mix = TaskMixture([LetterTask("a", 2)])
    with pytest.raises(ValueError, match="task="):
        mix.evaluate({"answer": "a0", "task": "Nope"}, "a0")
    with pytest.raises(ValueError, match="named"):
        TaskMixture([LetterTask("a", 2, name="Same"), HalfRewardTask("b", 2, name="Same")])
    with pytest.raises(ValueError):
        TaskMixture([])
    with pytest.raises(ValueError):
        TaskMixture([["not a task"]])


def test_nested_composites_dispatch_to_the_leaf_task():
    a, h = LetterTask("a", 3), HalfRewardTask("h", 3, name="Half")
    outer = TaskMixture([TaskMixture([a, h], seed=1), LetterTask("c", 2)], seed=0)
    assert len(outer) == 8
    for i in range(len(outer)):
        ex = outer[i]
        if ex["answer"].startswith("h"):
            assert ex["task"] == "Half"
            assert outer.reward(ex, "nope") == -1.0
        assert outer.evaluate(ex, ex["answer"])
