"""Train a zoo model: ``python -m attrlab.zoo.train TASK``.

Reproducible: the data stream, the initialization and the batch order follow
``--seed``, and training runs on one CPU thread (``--threads``), so the same
command on the same machine gives the same weights. The shipped weights in
``attrlab/zoo/models/TASK`` are this command's output with the defaults.

The loss is the causal LM loss over every token of each training text, plus
(for generated tasks) ``answer_weight`` times the loss at the answer position.
The facts model is trained on its document corpus alone, with the plain LM
loss, so that training-data attribution has a clean ground truth.

Example:
    >>> from attrlab.zoo.train import SPECS
    >>> SPECS["ioi"].family
    'gpt2'
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from . import DATA_DIR, MODELS_DIR, task
from .tokenizer import build_tokenizer, save_tokenizer


@dataclass(frozen=True)
class Spec:
    """Architecture and training hyper-parameters of one zoo model."""

    family: str = "gpt2"
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    d_mlp: int = 512
    n_ctx: int = 128
    steps: int = 2000
    batch: int = 64
    lr: float = 1e-3
    warmup: int = 1
    weight_decay: float = 0.01
    answer_weight: float = 1.0
    lm_weight: float = 1.0
    continuation_weight: float = 0.0
    final_lr_frac: float = 1.0
    clip: float = 0.0
    eval_every: int = 100


SPECS: dict[str, Spec] = {
    "ioi": Spec(
        family="gpt2",
        d_model=64,
        n_layers=2,
        n_heads=4,
        d_mlp=256,
        n_ctx=32,
        steps=2000,
        lr=3e-3,
        lm_weight=1.0,  # a language model of the whole text, not a last-token classifier
    ),
    "induction": Spec(
        family="llama",
        d_model=64,
        n_layers=2,
        n_heads=4,
        d_mlp=256,
        n_ctx=64,
        steps=1500,
        lr=3e-3,
        lm_weight=0.0,
        continuation_weight=1.0,
    ),
    "facts": Spec(
        family="gpt2",
        d_model=128,
        n_layers=2,
        n_heads=4,
        steps=3000,
        lr=3e-3,
        warmup=100,
        final_lr_frac=0.02,
        clip=1.0,
        answer_weight=0.0,
        eval_every=250,
    ),
    "context_qa": Spec(
        family="llama",
        d_model=64,
        n_layers=2,
        n_heads=4,
        d_mlp=256,
        n_ctx=96,
        steps=800,
        lr=3e-3,
        warmup=50,
        final_lr_frac=0.1,
        clip=1.0,
        lm_weight=0.0,
    ),
    "reasoning": Spec(
        family="llama",
        d_model=64,
        n_layers=3,
        n_heads=4,
        d_mlp=256,
        n_ctx=160,
        steps=1500,
        lr=3e-3,
        warmup=50,
        final_lr_frac=0.1,
        clip=1.0,
        lm_weight=0.0,
        continuation_weight=1.0,  # the whole trace, not only its first token
        eval_every=250,
    ),
}


def make_tokenizer(name: str) -> Any:
    """The word-level tokenizer of task ``name`` (deterministic)."""
    texts, words = task(name).vocabulary()
    return build_tokenizer(texts, words)


def make_model(spec: Spec, vocab_size: int, seed: int) -> Any:
    """A freshly initialized Hugging Face causal LM for ``spec``."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    common: dict[str, Any] = dict(
        vocab_size=vocab_size, bos_token_id=0, eos_token_id=0, pad_token_id=0
    )
    if spec.family == "gpt2":
        cfg: Any = GPT2Config(
            n_embd=spec.d_model,
            n_layer=spec.n_layers,
            n_head=spec.n_heads,
            n_inner=spec.d_mlp,
            n_positions=spec.n_ctx,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **common,
        )
    elif spec.family == "llama":
        cfg = LlamaConfig(
            hidden_size=spec.d_model,
            intermediate_size=spec.d_mlp,
            num_hidden_layers=spec.n_layers,
            num_attention_heads=spec.n_heads,
            num_key_value_heads=spec.n_heads,
            max_position_embeddings=spec.n_ctx,
            tie_word_embeddings=True,
            **common,
        )
    else:
        raise ValueError(f"unknown family {spec.family!r}")
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32)


def _encode(tok: Any, texts: list[str], prompts: list[str | None]) -> tuple[torch.Tensor, ...]:
    """Right-padded ids ``[b, pos]``, mask, and answer positions ``[b]`` (-1 = none)."""
    rows = tok(texts)["input_ids"]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    ans = torch.full((len(rows),), -1, dtype=torch.long)
    have = [i for i, p in enumerate(prompts) if p is not None]
    if have:
        lens = [len(r) for r in tok([prompts[i] for i in have])["input_ids"]]
        ans[have] = torch.tensor(lens)  # index of the answer token
    return ids, mask, ans


def _loss(
    model: torch.nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor,
    ans: torch.Tensor,
    w: float,
    lm_weight: float = 1.0,
    cont_weight: float = 0.0,
) -> torch.Tensor:
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # [b, pos, vocab]
    lp = logits[:, :-1].log_softmax(-1)
    nll = -lp.gather(-1, ids[:, 1:, None])[..., 0]  # [b, pos-1]
    m = mask[:, 1:].float()
    loss = lm_weight * (nll * m).sum() / m.sum()
    has = ans >= 0
    if w > 0 and bool(has.any()):
        rows = torch.arange(len(ids))[has]
        loss = loss + w * nll[rows, ans[has] - 1].mean()
    if cont_weight > 0 and bool(has.any()):
        # every token after the answer (e.g. the rest of a repeated sequence)
        col = torch.arange(nll.shape[1])[None, :]
        after = (col >= ans[:, None]) & has[:, None] & (m > 0)
        loss = loss + cont_weight * (nll * after).sum() / after.sum().clamp(min=1)
    return loss


@torch.no_grad()
def accuracy(lm: Any, examples: list[Any], batch_size: int = 250) -> float:
    """Top-1 accuracy of wrapped model ``lm`` on ``examples`` (batched forwards).

    Example:
        >>> import attrlab as al
        >>> from attrlab.zoo.train import accuracy
        >>> acc = accuracy(al.zoo.load("ioi"), al.zoo.task("ioi").examples(20))
        >>> 0.0 <= acc <= 1.0
        True
    """
    correct = 0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        logits, _ = lm.run([e.prompt for e in chunk], last_only=True)
        pred = logits[:, -1].argmax(-1)
        gold = torch.tensor([lm.token_id(e.answer) for e in chunk], device=pred.device)
        correct += int((pred == gold).sum())
    return correct / max(1, len(examples))


def train(
    name: str,
    out: Path | None = None,
    seed: int = 0,
    steps: int | None = None,
    threads: int = 1,
    progress: bool = True,
    eval_examples: int = 200,
    **overrides: Any,
) -> dict[str, Any]:
    """Train the zoo model of task ``name``, save it in HF format to ``out``; return the log.

    Example:
        >>> from attrlab.zoo.train import train
        >>> import tempfile
        >>> log = train("ioi", tempfile.mkdtemp(), steps=2, progress=False)
        >>> log["steps"]
        2
    """
    from ..model.wrapper import LM

    torch.set_num_threads(threads)
    spec = replace(SPECS[name], **overrides)
    n_steps = spec.steps if steps is None else steps
    bundled = out is None
    out = Path(out) if out is not None else MODELS_DIR / name
    t = task(name)
    tok = make_tokenizer(name)
    model = make_model(spec, len(tok), seed)
    eos = tok.eos_token if getattr(t, "ends_with_eos", False) else ""

    def score(examples: list[Any]) -> float:
        return t.accuracy(LM(model, tok), examples)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": spec.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=spec.lr,
        betas=(0.9, 0.98),
    )

    def lr_at(step: int) -> float:
        if step < spec.warmup:
            return (step + 1) / spec.warmup
        frac = (step - spec.warmup) / max(1, n_steps - spec.warmup)
        f = spec.final_lr_frac
        return f + (1 - f) * 0.5 * (1 + math.cos(math.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    stream = t.training_stream(seed)
    val = t.examples(eval_examples, seed=10_000 + seed, split="train")
    held = t.examples(
        eval_examples, seed=20_000 + seed, split="test"
    )  # logged only, never used to select
    log: dict[str, Any] = {
        "task": name,
        "seed": seed,
        "steps": n_steps,
        "threads": threads,
        "spec": asdict(spec),
        "evals": [],
    }
    start = time.perf_counter()
    bar = tqdm(range(n_steps), disable=not progress, desc=f"train {name}")
    for step in bar:
        model.train()
        pairs = [next(stream) for _ in range(spec.batch)]
        ids, mask, ans = _encode(tok, [p[0] + eos for p in pairs], [p[1] for p in pairs])
        loss = _loss(
            model, ids, mask, ans, spec.answer_weight, spec.lm_weight, spec.continuation_weight
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if spec.clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), spec.clip)
        opt.step()
        sched.step()
        if (step + 1) % spec.eval_every == 0 or step + 1 == n_steps:
            model.eval()
            acc = score(val)
            log["evals"].append(
                {
                    "step": step + 1,
                    "loss": float(loss.detach()),
                    "val_acc": acc,
                    "test_acc": score(held),
                    "seconds": time.perf_counter() - start,
                }
            )
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", val_acc=f"{acc:.3f}")
            if progress:  # one JSON line per evaluation (the log keeps them all)
                print(json.dumps(log["evals"][-1]), flush=True)
    model.eval()
    log["train_seconds"] = time.perf_counter() - start
    log["test_acc_500"] = score(t.examples(500, seed=0, split="test"))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    save_tokenizer(tok, out)
    (out / "training_log.json").write_text(json.dumps(log, indent=1))
    if name == "facts":  # ship the training corpus with its ground truth
        t.write_corpus((DATA_DIR if bundled else out) / "facts_corpus.jsonl")
    return log


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    p = argparse.ArgumentParser(
        prog="python -m attrlab.zoo.train", description=__doc__.split("\n")[0]
    )
    p.add_argument("task", choices=list(SPECS))
    p.add_argument(
        "--out", type=Path, default=None, help="output folder (default: the bundled one)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override Spec fields")
    a = p.parse_args(argv)
    overrides = {}
    for kv in a.set:
        k, v = kv.split("=", 1)
        overrides[k] = type(getattr(SPECS[a.task], k))(v)
    log = train(a.task, a.out, a.seed, a.steps, a.threads, progress=True, **overrides)
    print(f"{a.task}: {log['train_seconds']:.0f}s, test accuracy {log['test_acc_500']:.3f}")


if __name__ == "__main__":
    main()
