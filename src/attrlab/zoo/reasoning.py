"""Reasoning: execute a short program step by step, then state the value asked for.

The prompt is a program of 6 assignments to the variables ``a`` to ``f`` (in
that order; constants and sums modulo 10), and a question; the model writes a chain of thought,
one sentence per assignment in program order (a constant is restated, a sum is
restated with its operands' values, copied from the earlier steps, and its
value; every step ends with ``<name> is <value> .``), then the answer::

    a = 3 , b = a + 4 , c = 2 , d = b + c , e = c + 1 . ask d :
    -> a is 3 . b = a + 4 = 3 + 4 ; b is 7 . c is 2 . d = b + c = 7 + 2 ; d is 9 .
       e = c + 1 = 2 + 1 ; e is 3 . answer d is 9 .

Ground truth is the dependency graph of the trace's sentences (steps): step
``j`` reads the values of its ``parents[j]``; the answer sentence (the last
one) reads the step of the asked variable. ``answer_deps`` are the steps the
answer depends on (the asked step and its ancestors); ``distractors`` are the
other steps, which the answer does not depend on (at least one per prompt).

The model is trained on traces in which, for 30% of the prompts, one step's
value is replaced by another digit and every later step follows the replaced
value; so the later steps read the values written in the trace (not
recomputed from the prompt), and a resampled step changes the answer exactly
when the answer depends on it. The greedy trace is the correct one.

``answer`` is the answer digit (``" 9"``); ``counterfactual`` changes one
constant the answer depends on (same token length), its answer is ``wrong``.
The model writes the trace first: evaluate with :meth:`Reasoning.accuracy`
(greedy generation), not with a next-token check.

Example:
    >>> import attrlab as al
    >>> ex = al.zoo.task("reasoning").examples(1, seed=0)[0]
    >>> ex.trace.endswith(ex.answer + " .") and "answer" in ex.steps[-1]
    True
    >>> set(ex.answer_deps).isdisjoint(ex.distractors)
    True
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from .task import Example, Task

VARIABLES = tuple("abcdefgh")
DIGITS = tuple(str(d) for d in range(10))
ASK = "ask"
ANSWER = "answer"
IS = "is"
CORRUPT_P = 0.3  # fraction of training traces with one replaced step value


@dataclass
class ReasoningExample(Example):
    """A program with its correct trace and the trace's dependency graph.

    Attributes:
        program: the statements, e.g. ``["a = 3", "b = a + 4"]``.
        steps: the trace's sentences, one per statement, then the answer
            sentence (``"answer d is 9 ."``); ``trace`` is them joined, each with a
            leading space.
        parents: for each sentence of ``steps``, the indices of the earlier
            sentences whose value it reads (the answer sentence reads the asked step).
        query: index of the asked step.
        answer_deps: the steps the answer depends on (``query`` and its ancestors), sorted.
        distractors: the other steps (not the answer sentence), sorted.
        values: the value of each step.
    """

    program: list[str] = field(default_factory=list)
    steps: list[str] = field(default_factory=list)
    parents: list[list[int]] = field(default_factory=list)
    query: int = 0
    answer_deps: list[int] = field(default_factory=list)
    distractors: list[int] = field(default_factory=list)
    values: list[int] = field(default_factory=list)

    @property
    def trace(self) -> str:
        """The correct chain of thought (what the model writes after the prompt)."""
        return "".join(" " + s for s in self.steps)

    def dependency_matrix(self) -> list[list[int]]:
        """``D[j][i] = 1`` when sentence ``j`` reads sentence ``i`` (rows = receiving sentence)."""
        n = len(self.steps)
        return [[int(i in self.parents[j]) for i in range(n)] for j in range(n)]


def _evaluate(stmts: list[tuple[str, Any]], override: dict[int, int] | None = None) -> list[int]:
    """Values of the statements (``("const", d)`` or ``("add", (x, k_or_y))``) in
    order; ``override`` replaces some step values (later steps follow them)."""
    vals: list[int] = []
    for i, (kind, arg) in enumerate(stmts):
        if kind == "const":
            v = int(arg)
        else:
            x, y = arg
            v = (vals[x] + (vals[y[1]] if isinstance(y, tuple) else int(y))) % 10
        if override and i in override:
            v = override[i]
        vals.append(v)
    return vals


def _sentence(name: str, kind: str, arg: Any, names: list[str], vals: list[int], i: int) -> str:
    """A step of the trace: a constant restated (``a is 3 .``), or a sum restated
    with its operands' values (copied from the earlier steps) and its value
    (``d = b + c = 7 + 2 ; d is 9 .``). Every step ends with ``<name> is <value> .``."""
    if kind == "const":
        return f"{name} {IS} {vals[i]} ."
    x, y = arg
    if isinstance(y, tuple):
        rhs, nums = f"{names[x]} + {names[y[1]]}", f"{vals[x]} + {vals[y[1]]}"
    else:
        rhs, nums = f"{names[x]} + {y}", f"{vals[x]} + {y}"
    return f"{name} = {rhs} = {nums} ; {name} {IS} {vals[i]} ."


def _statement(name: str, kind: str, arg: Any, names: list[str]) -> str:
    if kind == "const":
        return f"{name} = {arg}"
    x, y = arg
    return f"{name} = {names[x]} + {names[y[1]] if isinstance(y, tuple) else y}"


def build_prompt(program: list[str], ask: str) -> str:
    """The prompt of a program and the asked variable.

    Example:
        >>> build_prompt(["a = 3", "b = a + 4"], "b")
        'a = 3 , b = a + 4 . ask b :'
    """
    return " , ".join(program) + f" . {ASK} {ask} :"


class Reasoning(Task):
    """Programs of 6 assignments (``min_steps`` to ``max_steps``; constants and
    mod-10 sums) executed step by step in a chain of thought.

    Example:
        >>> from attrlab.zoo.reasoning import Reasoning
        >>> ex = Reasoning().examples(1, seed=3)[0]
        >>> len(ex.steps) == len(ex.program) + 1
        True
    """

    name = "reasoning"
    description = "execute a small program in a chain of thought; known step dependencies"
    ends_with_eos = True

    def __init__(self, min_steps: int = 6, max_steps: int = 6):
        self.min_steps, self.max_steps = min_steps, max_steps

    # ------------------------------------------------------------- generation
    def _structure(self, rng: random.Random) -> tuple[list[str], list[tuple[str, Any]]]:
        n = rng.randint(self.min_steps, self.max_steps)
        names = list(VARIABLES[:n])  # in order: the next step's name is the next letter
        stmts: list[tuple[str, Any]] = []
        for i in range(n):
            r = rng.random()
            if i == 0 or (i == 1 and r < 0.5) or (i > 1 and r < 0.25):
                stmts.append(("const", rng.randrange(10)))
            elif i > 1 and r < 0.6:
                x, y = rng.sample(range(i), 2)
                stmts.append(("add", (x, ("var", y))))
            else:
                stmts.append(("add", (rng.randrange(i), rng.randrange(1, 10))))
        return names, stmts

    def _sample(self, rng: random.Random, split: str) -> ReasoningExample | None:
        names, stmts = self._structure(rng)
        n = len(stmts)
        parents: list[list[int]] = []
        for kind, arg in stmts:
            if kind == "const":
                parents.append([])
            else:
                x, y = arg
                parents.append(sorted({x, *([y[1]] if isinstance(y, tuple) else [])}))
        computed = [i for i in range(n) if parents[i]]
        if not computed:
            return None
        query = rng.choice(computed)
        deps = _ancestors(parents, query)
        distractors = [i for i in range(n) if i not in deps]
        if not distractors:
            return None
        override: dict[int, int] = {}
        if split == "train" and rng.random() < CORRUPT_P:  # a step the trace gets "wrong"
            i = rng.randrange(n)
            true = _evaluate(stmts)[i]
            override[i] = rng.choice([d for d in range(10) if d != true])
        vals = _evaluate(stmts, override)
        program = [_statement(names[i], k, a, names) for i, (k, a) in enumerate(stmts)]
        steps = [_sentence(names[i], k, a, names, vals, i) for i, (k, a) in enumerate(stmts)]
        steps.append(f"{ANSWER} {names[query]} {IS} {vals[query]} .")
        # counterfactual: change a constant the answer depends on
        consts = [i for i in deps if stmts[i][0] == "const"]
        c = rng.choice(consts)
        cf_stmts = list(stmts)
        true_vals = _evaluate(stmts)
        for d in rng.sample(range(10), 10):
            cf_stmts[c] = ("const", d)
            cf_vals = _evaluate(cf_stmts)
            if cf_vals[query] != true_vals[query]:
                break
        cf_program = [_statement(names[i], k, a, names) for i, (k, a) in enumerate(cf_stmts)]
        return ReasoningExample(
            prompt=build_prompt(program, names[query]),
            answer=f" {vals[query]}",
            wrong=f" {cf_vals[query]}",
            counterfactual=build_prompt(cf_program, names[query]),
            meta={"corrupted": sorted(override)},
            program=program,
            steps=steps,
            parents=[*parents, [query]],
            query=query,
            answer_deps=sorted(deps),
            distractors=distractors,
            values=vals,
        )

    def _in_split(self, ex: Example, split: str) -> bool:
        from .task import is_test

        return is_test(ex.prompt) == (split == "test")

    def training_text(self, ex: Example) -> str:
        assert isinstance(ex, ReasoningExample)
        return ex.prompt + ex.trace

    def vocabulary(self) -> tuple[list[str], list[str]]:
        words = [*VARIABLES, *DIGITS, "=", "+", ",", ";", ".", ":", ASK, ANSWER, IS]
        return self.sample_texts(50), words

    # ------------------------------------------------------------- evaluation
    def accuracy(self, lm: Any, examples: list[Any], max_new_tokens: int = 96) -> float:
        """Fraction of ``examples`` whose greedy trace (by wrapped model ``lm``)
        ends with the correct answer sentence.

        Example:
            >>> import attrlab as al
            >>> t = al.zoo.task("reasoning")
            >>> t.accuracy(al.zoo.load("reasoning"), t.examples(5)) >= 0.8
            True
        """
        traces = generate_traces(lm, [e.prompt for e in examples], max_new_tokens)
        return sum(answer_of(t) == e.answer.strip() for t, e in zip(traces, examples)) / max(
            1, len(examples)
        )


def _ancestors(parents: list[list[int]], i: int) -> set[int]:
    out, todo = {i}, [i]
    while todo:
        for p in parents[todo.pop()]:
            if p not in out:
                out.add(p)
                todo.append(p)
    return out


def answer_of(trace: str) -> str | None:
    """The answer stated in a trace (the value in its last ``answer <name> is
    <value>`` sentence), or None.

    Example:
        >>> answer_of(" a is 3 . answer a is 3 .")
        '3'
    """
    words = trace.split()
    for k in range(len(words) - 1, -1, -1):
        if words[k] == ANSWER and k + 3 < len(words) and words[k + 2] == IS:
            return words[k + 3]
    return None


def generate_traces(lm: Any, prompts: list[str], max_new_tokens: int = 96) -> list[str]:
    """Greedy traces of wrapped model ``lm`` for ``prompts`` (batched, stops at
    the end-of-text token), decoded without the prompt.

    Example:
        >>> import attrlab as al
        >>> ex = al.zoo.task("reasoning").examples(1)[0]
        >>> generate_traces(al.zoo.load("reasoning"), [ex.prompt])[0] == ex.trace
        True
    """
    import torch

    tok = lm.tokenizer
    enc = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = lm.model.generate(
            enc["input_ids"].to(lm.device),
            attention_mask=enc["attention_mask"].to(lm.device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    gen = out[:, enc["input_ids"].shape[1] :]
    return [tok.decode(g, skip_special_tokens=True) for g in gen]


# ------------------------------------------------------- Thought Anchors check
def auroc(scores: list[float], labels: list[int]) -> float:
    """Area under the ROC curve of ``scores`` for binary ``labels`` (ties count
    half); NaN without both classes.

    Example:
        >>> auroc([0.9, 0.8, 0.1], [1, 0, 0]), auroc([0.5, 0.5], [1, 0])
        (1.0, 0.5)
    """
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        return float("nan")
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def _edge_scores(lm: Any, ex: ReasoningExample, units: Any) -> tuple[list[float], list[int]]:
    """Attention-suppression scores of every pair ``i < j`` of sentences and
    whether ``i`` is a parent of ``j``."""
    import attrlab as al

    m = al.attribute(lm, ex.prompt, units=units, method="attention-suppression").scores
    s, y = [], []
    for j in range(len(ex.steps)):
        for i in range(j):
            s.append(float(m[j, i]))
            y.append(int(i in ex.parents[j]))
    return s, y


def suppression_auroc(lm: Any, examples: list[ReasoningExample]) -> dict[str, float]:
    """AUROC of the attention-suppression matrix for the dependency edges, per
    prompt (mean) and pooled, over the prompts whose greedy trace is correct
    (cheap: one batched forward per prompt).

    Example:
        >>> import attrlab as al
        >>> t = al.zoo.task("reasoning")
        >>> suppression_auroc(al.zoo.load("reasoning"), t.examples(3))["evaluated"]
        3
    """
    from ..units.trace import Trace

    units = Trace()
    per, ps, py = [], [], []
    for ex in examples:
        if units.prepare(lm, ex.prompt).texts != ex.steps:
            continue
        s, y = _edge_scores(lm, ex, units)
        per.append(auroc(s, y))
        ps += s
        py += y
    return {
        "evaluated": len(per),
        "auroc_mean": sum(per) / max(1, len(per)),
        "auroc_pooled": auroc(ps, py),
    }


def anchor_metrics(
    lm: Any,
    examples: list[ReasoningExample],
    rollouts: int = 20,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """The Thought Anchors methods on ``examples`` against the ground truth.

    For each prompt whose greedy trace is the correct one (others are counted
    and skipped): ``top_is_dependency`` — the program step with the highest
    counterfactual-resampling importance is one the answer depends on (the
    answer sentence itself is left out of the ranking); ``distractors_below`` —
    every distractor step scores below every step the answer depends on;
    ``auroc`` — the attention-suppression matrix as a score for the direct
    dependency edges (``parents``) among all pairs ``i < j`` of sentences
    (answer sentence included), per prompt (mean) and pooled over prompts.

    Example:
        >>> import attrlab as al
        >>> t = al.zoo.task("reasoning")
        >>> m = anchor_metrics(al.zoo.load("reasoning"), t.examples(1), rollouts=1, progress=False)
        >>> m["n"], m["top_is_dependency"] in (0.0, 1.0)
        (1, True)
    """
    import attrlab as al

    from ..units.trace import Trace

    units = Trace()
    top, below, aurocs, skipped = [], [], [], 0
    pooled_s: list[float] = []
    pooled_y: list[int] = []
    it = examples
    if progress:
        from tqdm import tqdm

        it = tqdm(examples, desc="anchor metrics")
    for ex in it:
        view = units.prepare(lm, ex.prompt)
        if view.texts != ex.steps:
            skipped += 1
            continue
        r = al.attribute(
            lm,
            ex.prompt,
            units=units,
            method="resampling",
            rollouts=rollouts,
            seed=seed,
            progress=False,
        )
        steps = r.scores[: len(ex.program)].tolist()
        best = max(range(len(steps)), key=lambda i: steps[i])
        top.append(best in ex.answer_deps)
        below.append(max(steps[i] for i in ex.distractors) < min(steps[i] for i in ex.answer_deps))
        s, y = _edge_scores(lm, ex, units)
        aurocs.append(auroc(s, y))
        pooled_s += s
        pooled_y += y
    n = len(top)
    return {
        "n": len(examples),
        "evaluated": n,
        "wrong_trace": skipped,
        "top_is_dependency": sum(top) / max(1, n),
        "distractors_below": sum(below) / max(1, n),
        "auroc_mean": sum(aurocs) / max(1, n),
        "auroc_pooled": auroc(pooled_s, pooled_y),
        "rollouts": rollouts,
        "seed": seed,
    }
