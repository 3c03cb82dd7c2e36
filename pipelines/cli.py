"""The `dit-sparse` command line: generate, eval, bench, train-reference."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

NOT_BUILT = 3  # exit code of a subcommand whose issue has not landed yet


def _not_built(what: str) -> Callable[[argparse.Namespace], int]:
    def run(_: argparse.Namespace) -> int:
        print(f"dit-sparse {what}: not yet built", file=sys.stderr)
        return NOT_BUILT

    return run


def _add_generate(sub) -> None:
    from .generate import add_arguments, run

    p = sub.add_parser("generate", help="generate a video with sparse attention (bundled model by default)")
    add_arguments(p)
    p.set_defaults(func=run)


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="quality-vs-speed evaluation of methods x sparsities against dense")
    try:
        from .evaluate import add_arguments, run
    except ImportError:
        p.set_defaults(func=_not_built("eval"))
        return
    add_arguments(p)
    p.set_defaults(func=run)


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="GPU benchmarks: `bench kernels`, `bench call` or `bench e2e`")
    bsub = p.add_subparsers(dest="bench", required=True)
    for name, module, help_text in (
        ("kernels", "dit_sparse.kernels.bench", "block-sparse kernels vs cuDNN SDPA and FlexAttention"),
        ("call", "dit_sparse.eval.bench_call", "one whole sparse attention call per method, planning included"),
        ("e2e", "dit_sparse.eval.bench_e2e", "one transformer forward at real model sizes"),
    ):
        q = bsub.add_parser(name, help=help_text, add_help=False)
        q.add_argument("args", nargs=argparse.REMAINDER)
        q.set_defaults(func=_delegate(module, f"bench {name}"))


def _add_train(sub) -> None:
    p = sub.add_parser("train-reference", help="train the bundled reference video DiT (GPU)", add_help=False)
    p.add_argument("args", nargs=argparse.REMAINDER)
    p.set_defaults(func=_delegate("dit_sparse.pipelines.train_reference", "train-reference"))


def _delegate(module: str, what: str) -> Callable[[argparse.Namespace], int]:
    def run(ns: argparse.Namespace) -> int:
        import importlib

        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name == module:
                return _not_built(what)(ns)
            raise
        return int(mod.main(ns.args) or 0)

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dit-sparse",
        description="Training-free sparse attention for video diffusion transformers (Diffusers).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{generate,eval,bench,train-reference}")
    _add_generate(sub)
    _add_eval(sub)
    _add_bench(sub)
    _add_train(sub)
    return parser


_PASSTHROUGH = {
    ("bench", "kernels"): ("dit_sparse.kernels.bench", "bench kernels"),
    ("bench", "call"): ("dit_sparse.eval.bench_call", "bench call"),
    ("bench", "e2e"): ("dit_sparse.eval.bench_e2e", "bench e2e"),
    ("train-reference",): ("dit_sparse.pipelines.train_reference", "train-reference"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Subcommands with their own parsers get their arguments untouched (argparse's REMAINDER would
    # reject leading options such as `--models`).
    for prefix, (module, what) in _PASSTHROUGH.items():
        if tuple(argv[: len(prefix)]) == prefix and "-h" not in argv[: len(prefix)]:
            return _delegate(module, what)(argparse.Namespace(args=argv[len(prefix):]))
    parser = build_parser()
    ns = parser.parse_args(argv)
    return int(ns.func(ns) or 0)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
