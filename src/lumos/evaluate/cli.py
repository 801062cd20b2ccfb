"""``lumos eval``: score a model (or real clips) on the evaluation prompts; a text table, JSON."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from lumos.data import CLASSES
from lumos.devices import COMPILE_CHOICES, DTYPE_CHOICES
from lumos.evaluate.classifier import CLASSIFIER_DIR, load_classifier, train_classifier
from lumos.evaluate.compare import compare_results
from lumos.evaluate.run import check_window, evaluate, evaluate_real, evaluate_tokenizer
from lumos.settings import add_sampling_flags, sampling_overrides


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def _grid(rows: list[list[str]], rule: bool = True) -> str:
    """Right-aligned text columns; with `rule`, a line of dashes under the first row."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    if rule:
        lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """A text table of ``{row name: evaluate() result}``."""
    cols = [
        ("clips", "n_clips"),
        ("class", "class_accuracy"),
        ("colour", "colour_accuracy"),
        ("direction", "direction_accuracy"),
        ("identity", "identity_consistency"),
        ("all", "all_correct"),
        ("FD items", "frechet_distance"),
        ("FD frames", "frechet_distance_frames"),
    ]
    rows = [["split", *(c for c, _ in cols)]]
    for name, r in results.items():
        rows.append([name, *(_fmt(r.get(k)) for _, k in cols)])
    return _grid(rows)


def format_confusion(conf: dict[str, dict[str, int]], title: str = "") -> str:
    """A text table of an ``evaluate()["confusion"]``: rows asked, columns predicted classes."""
    cols = [c for c in (*CLASSES, "none") if any(c in row for row in conf.values())]
    short = {c: c.replace("ankle boot", "boot").replace("pullover", "pullov") for c in cols}
    head = [f"{title} asked \\ got", *(short[c] for c in cols), "correct"]
    rows = [head]
    for cls, row in conf.items():
        n = sum(row.values())
        cells = [str(row.get(c, 0)) for c in cols]
        rows.append([cls, *cells, f"{row.get(cls, 0) / max(n, 1):.2f}"])
    return _grid(rows, rule=False)


def format_per_frame(pf: dict[str, list[float]], title: str = "") -> str:
    """A text table of an ``evaluate()["per_frame"]``: one row per frame."""
    lines = [f"{title} frame  present  class  identity"]
    for f, (a, b, c) in enumerate(zip(pf["present"], pf["class"], pf["identity"])):
        lines.append(f"{f:>{len(title) + 6}}  {a:7.3f}  {b:5.3f}  {c:8.3f}")
    return "\n".join(lines)


def format_comparison(cmp: dict[str, dict[str, dict[str, Any]]], tolerance: float) -> str:
    """A text table of `lumos.evaluate.compare.compare_results`: one row per split and metric."""
    rows = [["split", "metric", "new", "base", "new - base", "95% interval", "verdict"]]
    for split, metrics in cmp.items():
        for name, m in metrics.items():
            rows.append(
                [
                    split,
                    name,
                    f"{m['new']:.3f}",
                    f"{m['base']:.3f}",
                    f"{m['diff']:+.3f}",
                    f"[{m['low']:+.3f}, {m['high']:+.3f}]",
                    m["verdict"],
                ]
            )
    head = f"paired against the base run (tolerance {tolerance:g}: no worse = interval above -tol)"
    return f"{head}\n{_grid(rows)}"


def main(argv: list[str] | None = None) -> int:
    """``lumos eval``: score a model (or real clips) on the evaluation prompts."""
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(
        prog="lumos eval", description="evaluate a model on Moving Fashion-MNIST prompts"
    )
    p.add_argument("--model", default=None, help="model folder, or 'random' (default: bundled)")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    p.add_argument("--split", default="seen,heldout", help="comma list of seen, heldout")
    p.add_argument("--prompts", type=int, default=None, help="prompts per split (default: all)")
    p.add_argument("--seeds", type=int, default=1, help="clips (seeds) per prompt")
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: model's)")
    p.add_argument("--cfg", type=float, default=None, help="guidance scale (default: model's)")
    p.add_argument("--frames", type=int, default=None, help="RGB frames (default: model's)")
    p.add_argument(
        "--window-from",
        type=int,
        default=None,
        help="score only RGB frames [N, frames) of each clip (e.g. --frames 256 --window-from 240)",
    )
    add_sampling_flags(p)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES)
    p.add_argument(
        "--compile",
        default="off",
        choices=COMPILE_CHOICES,
        help="compile the frame steps first (lumos.model.CompiledLayers; auto: AMX CPUs in bf16)",
    )
    p.add_argument("--real", action="store_true", help="also score real clips (the ceiling)")
    p.add_argument("--real-only", action="store_true", help="score real clips only, no model")
    p.add_argument(
        "--tokenizer-ceiling",
        action="store_true",
        help="also score the real clips after a round trip through the model's tokenizer",
    )
    p.add_argument("--classifier", default=None, help="classifier folder (default: bundled)")
    p.add_argument(
        "--train-classifier",
        action="store_true",
        help="train a classifier into --classifier DIR and exit (never the bundled one)",
    )
    p.add_argument(
        "--confusion", action="store_true", help="also print the class confusion per split"
    )
    p.add_argument(
        "--per-frame", action="store_true", help="also print presence/class/identity per frame"
    )
    p.add_argument(
        "--motion", action="store_true", help="also print how directions go wrong, speeds, jumps"
    )
    p.add_argument(
        "--against",
        default=None,
        metavar="BASE.json",
        help="compare with an earlier --json run on the same prompts and seeds, item by item",
    )
    p.add_argument(
        "--results",
        default=None,
        metavar="NEW.json",
        help="with --against: compare this stored run instead of running a model",
    )
    p.add_argument(
        "--tolerance", type=float, default=0.03, help="--against: how much worse is no worse"
    )
    p.add_argument("--epochs", type=int, default=3, help="epochs for --train-classifier")
    p.add_argument("-q", "--quiet", action="store_true")
    args = p.parse_args(argv)
    log = None if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))

    if args.train_classifier:
        if not args.classifier:
            p.error("--train-classifier needs --classifier DIR (where to write it)")
        if Path(args.classifier).resolve() == CLASSIFIER_DIR.resolve():
            p.error(f"--classifier {args.classifier}: refusing to overwrite the bundled classifier")
        meta = train_classifier(args.classifier, args.epochs, args.seed, log=log)
        print(f"classifier t10k test accuracy: {meta['test_accuracy']:.4f}")
        return 0

    if args.results and not args.against:
        p.error("--results compares a stored run: it needs --against BASE.json")
    if not args.tolerance >= 0:
        p.error(f"--tolerance must be >= 0, got {args.tolerance}")
    base = _read_results(p, args.against, "--against") if args.against else None
    if args.results:
        return _print_comparison(p, _read_results(p, args.results, "--results"), base, args)

    splits = [s.strip() for s in args.split.split(",") if s.strip()]
    for s in splits:
        if s not in ("seen", "heldout"):
            p.error(f"--split: unknown split {s!r} (use seen, heldout)")
    if args.prompts is not None and args.prompts < 1:
        p.error("--prompts must be >= 1")
    if args.seeds < 1:
        p.error("--seeds must be >= 1")
    try:
        classifier = load_classifier(args.classifier)
    except FileNotFoundError as e:
        raise SystemExit(f"lumos eval: {e}") from None
    seeds = list(range(args.seed, args.seed + args.seeds))

    def check_window_flag(frames: int) -> None:
        try:
            check_window(args.window_from, frames)
        except ValueError:
            p.error(f"--window-from must be in [0, {frames}) (the clip's RGB frames)")

    results: dict[str, Any] = {
        "classifier": {
            "test_accuracy": classifier.meta.get("test_accuracy"),
            "path": str(Path(args.classifier) if args.classifier else CLASSIFIER_DIR),
        },
        "model": args.model or "bundled",
        "settings": {
            "splits": splits,
            "prompts": args.prompts,
            "seeds": seeds,
            "steps": args.steps,
            "cfg": args.cfg,
            "frames": args.frames,
            "window_from": args.window_from,
            "dtype": args.dtype,
            "compile": args.compile,
            "temperature": args.temperature,
            "top_p": args.top_p,
            "top_k": args.top_k,
            "tau0": args.tau0,
            "history_mask": args.history_mask,
        },
        "splits": {},
    }
    rows: dict[str, dict[str, Any]] = {}
    if not args.real_only:
        from lumos.pipeline import Pipeline

        try:
            pipe = Pipeline.from_folder(
                args.model, device=args.device, dtype=args.dtype, compile=args.compile
            )
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"lumos eval: {e}") from None
        try:
            pipe.set_sampling(**sampling_overrides(args))
        except ValueError as e:
            p.error(str(e))
        frames = args.frames or pipe.settings.frames
        results["settings"]["frames"] = frames
        check_window_flag(frames)
        for s in splits:
            r = evaluate(
                pipe,
                s,
                args.prompts,
                seeds,
                frames,
                args.steps,
                args.cfg,
                classifier,
                log,
                window_from=args.window_from,
            )
            results["splits"][s] = r
            rows[s] = r
        if args.tokenizer_ceiling:
            results["tokenizer"] = {}
            for s in splits:
                r = evaluate_tokenizer(pipe, s, args.prompts, seeds, frames, classifier, log)
                results["tokenizer"][s] = r
                rows[f"tokenized real {s}"] = r
    if args.real or args.real_only:
        frames = results["settings"]["frames"] or 16
        check_window_flag(frames)
        results["real"] = {}
        for s in splits:
            r = evaluate_real(s, args.prompts, seeds, frames, classifier, log, args.window_from)
            results["real"][s] = r
            rows[f"real {s}"] = r
    print(f"classifier t10k accuracy: {_fmt(results['classifier']['test_accuracy'])}")
    print(format_table(rows))
    for name, r in rows.items():
        if args.confusion:
            print(f"\n{format_confusion(r['confusion'], name)}")
        if args.per_frame:
            print(f"\n{format_per_frame(r['per_frame'], name)}")
        if args.motion:
            m = r["motion"]
            print(f"\n{name} motion: {m['kinds']}, px/frame when right {m['speed_px']}, "
                  f"jump rate {_fmt(m['jump_rate'])}")  # fmt: skip
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {path}")
    if base is not None:
        return _print_comparison(p, results, base, args)
    return 0


def _read_results(p: argparse.ArgumentParser, path: str, flag: str) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        p.error(f"{flag} {path}: no such file")
    except (OSError, ValueError) as e:
        p.error(f"{flag} {path}: not a lumos eval --json file ({e})")
    if not isinstance(data, dict) or not isinstance(data.get("splits"), dict):
        p.error(f"{flag} {path}: not a lumos eval --json file (no 'splits')")
    return data


def _print_comparison(
    p: argparse.ArgumentParser, new: dict[str, Any], base: dict[str, Any], args: Any
) -> int:
    try:
        cmp = compare_results(new, base, args.tolerance)
    except (KeyError, TypeError, ValueError) as e:
        p.error(f"--against: {e}")
    print(format_comparison(cmp, args.tolerance))
    return 0
