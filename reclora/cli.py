"""`reclora` console script: dispatches to the subcommands' own modules.

    reclora data ...   datasets: fetch, stats (reclora.data.cli)
    reclora run ...    the main job: Few2Many RecLoRA with baselines (reclora.pipeline)
    reclora score ...  serve a finished run: P(click) for requests (reclora.serving)
    reclora rank ...   serve a finished run: a user's candidates by P(click)

Every entry point (these, and `python -m reclora.crm`) reports a bad option or a bad file as
one line on stderr and a non-zero exit: `guarded` below. `--debug` anywhere on the command
line, or RECLORA_DEBUG=1, shows the full traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable

SUBCOMMANDS = {
    "data": ("reclora.data.cli", "datasets: fetch, stats and embed"),
    "run": ("reclora.pipeline", "the main job: CRMs, LLM baselines and RecLoRA on a dataset"),
    "score": ("reclora.serving:score_main", "P(click) for requests, from a finished run"),
    "rank": ("reclora.serving:rank_main", "a user's candidate items by P(click)"),
}
DEBUG_FLAG = "--debug"
DEBUG_HELP = f"({DEBUG_FLAG} or RECLORA_DEBUG=1: full tracebacks on errors)"


# ------------------------------------------------------------------ error reporting
class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block): `prog: error: message`."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (--help lists the options)\n")


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    if isinstance(err, KeyError):  # str(KeyError('x')) is "'x'": say what it is
        text = f"missing key {text}"
    return text[:500] or type(err).__name__


class CLIError(Exception):
    """An error whose message tells the user all they need (e.g. a locked run folder)."""


# Exceptions that report a bad option or a bad input (their message says which); anything
# else is a bug, named by its type.
USER_ERRORS: tuple[type[BaseException], ...] = (CLIError, ValueError, OSError, LookupError)


def _user_errors() -> tuple[type[BaseException], ...]:
    from reclora.data.base import DataError

    return (*USER_ERRORS, DataError)


def debug_requested(argv: list[str]) -> bool:
    return DEBUG_FLAG in argv or os.environ.get("RECLORA_DEBUG", "") not in ("", "0")


def guarded(prog: str, main: Callable[[list[str]], int | None], argv: list[str] | None) -> int:
    """Run main(argv without --debug); an exception becomes one line on stderr and exit 1
    (130 on Ctrl-C), unless --debug or RECLORA_DEBUG=1 asks for the traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    argv = [a for a in argv if a != DEBUG_FLAG]
    try:
        return int(main(argv) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if debug:
            raise
        if isinstance(err, _user_errors()):
            print(f"{prog}: error: {_one_line(err)}", file=sys.stderr)
        else:
            print(f"{prog}: error: {type(err).__name__}: {_one_line(err)} "
                  f"({DEBUG_FLAG} shows the traceback)", file=sys.stderr)
        return 1


# ------------------------------------------------------------------ option types
# --seed's range (`reclora run`, `python -m reclora.crm`): numpy's and torch's seeds take it,
# with room for the offsets a run adds (seed + 1, + 2 for the subsets, + i for --seeds); past
# 2**64 torch failed late and unclearly.
SEED_MAX = 2**32 - 1
# --k-id's range (`reclora run`, `python -m reclora.crm`): every history is padded to K_id, and
# a CRM's eval batch (4,096 samples) holds [4096, K_id, 64] float32 activations, 1 GiB each at
# 1,000; that is 16x the paper's 60 and longer than any ML-100K history (647). --k-id 100000
# was OOM-killed without a message.
K_ID_MAX = 1000
# `reclora run`'s --k-text, --k and --r ranges. --k-text: the retriever's table is [samples,
# K_text] and a prompt lists them (the paper's 10-60; --max-length cuts far fewer); 1e11
# asked for 4 TB at the retrieval. --k (meta-LoRAs) and --r (rank): each injected layer
# holds K r (d_in + d_out) bank values; --k 1e9 trained every other model, then failed
# allocating 240 GB with no option named. 1024 is 64x the paper's K and past any embedded
# model's width (at most 640).
K_TEXT_MAX = 1000
K_MAX = 1024
RANK_MAX = 1024
# The learning rates' range (--lr, --plain-lr, --gate-lr; the CRMs' --lr): an AdamW step moves
# a weight by about lr, so past 1 a step outgrows the weights (LoRA factors, gates, CRM
# embeddings are O(0.01-1)) and training ends in NaN, seen only when the run scores; below
# 1e-8 a step is under float32's resolution (6e-8 relative) for weights of O(0.1).
LR_RANGE = (1e-8, 1.0)


def threads_max() -> int:
    """--threads' upper bound: the logical CPUs. libgomp sets up every thread when the count
    is set (--threads 1000000000 aborted with "Out of memory", naming no option), and past
    the CPUs more threads only spin against each other."""
    return os.cpu_count() or 1


def threads_option(allow_auto: bool = False) -> Callable[[str], int | str]:
    """argparse type for --threads: a count in [1, threads_max()] in ASCII digits (int()
    also reads '٣' and '1_0'), or "auto" where allow_auto."""

    def parse(text: str) -> int | str:
        if allow_auto and text == "auto":
            return text
        high = threads_max()
        if not (text.isascii() and text.isdigit() and 1 <= int(text) <= high):
            auto = "auto or " if allow_auto else ""
            raise argparse.ArgumentTypeError(
                f"expected {auto}a count in [1, {high}] (this machine's CPUs), got {text!r}")
        return int(text)

    parse.__name__ = "thread count"
    return parse


def nonempty_path(text: str) -> str:
    """argparse type: a path (or name) that is not empty or blank: Path("") is the current
    folder, so --output "" wrote a run into it."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"expected a path, got {text!r}")
    return text


class StoreOnce(argparse.Action):
    """argparse action "store" that refuses the option a second time (argparse keeps the
    last one: `--output a ... --output b` wrote into b without a word)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        given = f"_{self.dest}_given"
        if getattr(namespace, given, False):
            parser.error(f"{'/'.join(self.option_strings)} given twice")
        setattr(namespace, given, True)
        setattr(namespace, self.dest, values)


def int_at_least(low: int) -> Callable[[str], int]:
    """argparse type: an int >= low."""
    return int_between(low, None)


def int_between(low: int, high: int | None) -> Callable[[str], int]:
    """argparse type: an int in [low, high] (high None: no upper bound)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            within = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"must be {within}, got {value}")
        return value

    parse.__name__ = f"int>={low}" if high is None else f"int in [{low}, {high}]"
    return parse


def positive_float(text: str) -> float:
    """argparse type: a finite float > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (value > 0 and value < float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def float_between(low: float, high: float) -> Callable[[str], float]:
    """argparse type: a float in [low, high]."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not low <= value <= high:  # nan fails both
            raise argparse.ArgumentTypeError(f"must be in [{low:g}, {high:g}], got {text}")
        return value

    parse.__name__ = f"number in [{low:g}, {high:g}]"
    return parse


def device_option(text: str, allow_auto: bool = True) -> str:
    """argparse type: "auto" or a torch device that exists here (cuda needs a GPU)."""
    if allow_auto and text == "auto":
        return text
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}"
                                         ) from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(f"{text!r}: no CUDA GPU is visible here")
        if dev.index is not None and dev.index >= count:
            raise argparse.ArgumentTypeError(f"{text!r}: only {count} CUDA device(s) here")
    elif dev.type != "cpu":
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")
    return text


# ------------------------------------------------------------------ dispatch
def _dispatch(argv: list[str], extra: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: reclora {" + ",".join(SUBCOMMANDS) + "} ... " + DEBUG_HELP + "\n")
        for name, (_, doc) in SUBCOMMANDS.items():
            print(f"  {name:6s} {doc}")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"reclora: unknown command {name!r}; choose from {list(SUBCOMMANDS)}",
              file=sys.stderr)
        return 2
    target, _, func = SUBCOMMANDS[name][0].partition(":")  # "module" or "module:function"
    module = importlib.import_module(target)
    return int(getattr(module, func or "main")(rest + extra) or 0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # The subcommand's own main is guarded too (and is handed --debug back); this one
    # catches what fails before it, such as its import.
    debug = [DEBUG_FLAG] if DEBUG_FLAG in argv else []
    return guarded("reclora", lambda rest: _dispatch(rest, debug), argv)


if __name__ == "__main__":
    sys.exit(main())
