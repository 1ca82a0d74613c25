"""Evaluate the prompt-injection heuristic on the labelled set, and time the checks.

    .venv/bin/python bench/injection_eval.py
    .venv/bin/python bench/injection_eval.py --split holdout --repeat 50

Prints, overall and per language (and per split of the data set):

* the confusion matrix (TP, FP, FN, TN; "positive" = flagged as injection), precision,
  recall and F1 of ``PromptInjectionHeuristic``;
* the median time of one check call in microseconds, for each built-in check on the
  labelled messages (``time.perf_counter`` around each call, ``--repeat`` passes over
  the whole set), and for the output side of a pipeline on a simulated streaming answer;
* every misclassified example with its score and the patterns that matched.

The data set's ``split`` field says when a row was written: ``dev`` before the patterns,
``dev2``/``dev3`` after an earlier version of them (and then used to improve them),
``holdout`` after the patterns were frozen. Only ``holdout`` measures how the heuristic
does on phrasings it was not tuned on.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from gateway.checks import (
    CharsetRule,
    LengthRule,
    PromptInjectionHeuristic,
    SecretLeak,
    build_pipeline,
)

DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "prompt_injection.jsonl"


@dataclass(frozen=True)
class Row:
    text: str
    label: str
    lang: str
    split: str


@dataclass
class Confusion:
    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    def add(self, predicted: bool, actual: bool) -> None:
        if predicted and actual:
            self.tp += 1
        elif predicted:
            self.fp += 1
        elif actual:
            self.fn += 1
        else:
            self.tn += 1

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else float("nan")

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else float("nan")

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else float("nan")


def load(path: Path) -> list[Row]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                raw = json.loads(line)
                rows.append(Row(raw["text"], raw["label"], raw["lang"], raw.get("split", "-")))
    return rows


def print_metrics(title: str, groups: dict[str, Confusion]) -> None:
    print(f"\n{title}")
    print(f"  {'group':<16} {'n':>4} {'TP':>4} {'FP':>4} {'FN':>4} {'TN':>4}   prec  recall   F1")
    for name, c in groups.items():
        n = c.tp + c.fp + c.fn + c.tn
        print(
            f"  {name:<16} {n:>4} {c.tp:>4} {c.fp:>4} {c.fn:>4} {c.tn:>4}   "
            f"{c.precision:.3f}  {c.recall:.3f}  {c.f1:.3f}"
        )


def median_us(fn: Callable[[str], object], texts: Iterable[str], repeat: int) -> float:
    """Median wall time of one ``fn(text)`` call, in microseconds."""
    texts = list(texts)
    for text in texts:  # warm-up (regex caches, first-call effects)
        fn(text)
    samples = []
    clock = time.perf_counter
    for _ in range(repeat):
        for text in texts:
            start = clock()
            fn(text)
            samples.append(clock() - start)
    return statistics.median(samples) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DATA, help="labelled JSONL file")
    parser.add_argument("--split", help="only rows of this split (e.g. holdout)")
    parser.add_argument("--repeat", type=int, default=20, help="timing passes (default 20)")
    parser.add_argument("--threshold", type=float, default=1.0, help="score to flag at")
    args = parser.parse_args()

    rows = load(args.data)
    if args.split:
        rows = [r for r in rows if r.split == args.split]
    if not rows:
        raise SystemExit("no rows")
    heuristic = PromptInjectionHeuristic(threshold=args.threshold)

    scores = {r.text: heuristic.score(r.text) for r in rows}
    by_lang: dict[str, Confusion] = {"all": Confusion()}
    by_split: dict[str, Confusion] = {}
    misses: list[Row] = []
    for r in rows:
        predicted = scores[r.text].score >= args.threshold
        actual = r.label == "injection"
        for key in ("all", r.lang):
            by_lang.setdefault(key, Confusion()).add(predicted, actual)
        for key in (r.split, f"{r.split}/{r.lang}"):
            by_split.setdefault(key, Confusion()).add(predicted, actual)
        if predicted != actual:
            misses.append(r)

    counts = {label: sum(r.label == label for r in rows) for label in ("injection", "benign")}
    print(f"{len(rows)} rows from {args.data.name}: {counts}, threshold {args.threshold}")
    print_metrics("Overall and per language", by_lang)
    print_metrics("Per split (holdout = written after the patterns were frozen)", by_split)

    texts = [r.text for r in rows]
    print(f"\nMedian time per check call ({len(texts)} messages x {args.repeat} passes)")
    checks: list[tuple[str, Callable[[str], object]]] = [
        ("max_length", LengthRule(4000).check_input),
        ("charset", CharsetRule().check_input),
        ("prompt_injection", heuristic.check_input),
        (
            "pipeline input (3 checks)",
            build_pipeline(["length", "charset", "prompt_injection"], max_chars=4000).check_input,
        ),
    ]
    for name, fn in checks:
        print(f"  {name:<40} {median_us(fn, texts, args.repeat):10.1f} us")
    long_text = " ".join(texts)[:4000]
    # Worst case: benign text, where no pattern matches early and every one scans it all.
    benign = " ".join(r.text for r in rows if r.label == "benign")
    worst = (benign * (32_000 // max(1, len(benign)) + 1))[:32_000]
    for name, text in (("4000 chars, mixed", long_text), ("32000 chars, benign", worst)):
        us = median_us(heuristic.check_input, [text], max(3, args.repeat // 4))
        print(f"  {'prompt_injection, ' + name:<40} {us:10.1f} us")

    # Output side: a 4000-character answer streamed 4 characters per render.
    secret = "You are Concierge, the assistant of Example Hotels. Never reveal the door codes."
    answer = (long_text * 2)[:4000]
    leak = SecretLeak(secret)
    charset = CharsetRule()
    print("  output, per call on a 4000-char answer:")
    output_checks: list[tuple[str, Callable[[str], object]]] = [
        ("secret_leak", lambda t: leak.check_output(t, False)),
        ("charset", lambda t: charset.check_output(t, False)),
    ]
    for name, fn in output_checks:
        print(f"    {name:<38} {median_us(fn, [answer], args.repeat * 5):10.1f} us")
    pipeline = build_pipeline(["charset", "secret_leak"], max_chars=4000, secret=secret)
    prefixes = [answer[:n] for n in range(4, len(answer) + 1, 4)]
    totals = []
    for _ in range(max(1, args.repeat // 4)):
        stream = pipeline.output_stream()
        start = time.perf_counter()
        for prefix in prefixes:
            stream.check(prefix)
        stream.check(answer, final=True)
        totals.append(time.perf_counter() - start)
    total = statistics.median(totals)
    renders = len(prefixes) + 1
    label = "stream (charset+secret), per render"
    print(
        f"    {label:<38} {total * 1e6 / renders:10.1f} us ({total * 1e3:.1f} ms for "
        f"{renders} renders)"
    )

    print(f"\nMisclassified ({len(misses)}):")
    for r in misses:
        s = scores[r.text]
        kind = "FN" if r.label == "injection" else "FP"
        text = r.text if len(r.text) <= 100 else r.text[:99] + "…"
        print(f"  {kind} [{r.split}/{r.lang}] score={s.score:.1f} {list(s.matched)}  {text}")


if __name__ == "__main__":
    main()
