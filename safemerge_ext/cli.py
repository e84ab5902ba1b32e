"""``safemerge``: score, merge and project LoRA adapters against a model's safety subspace.

A thin face over ``safemerge_ext.pipeline``. Parsing imports nothing heavy, so ``--help`` answers
without torch; every bad input ends as one line and exit code 2: ``safemerge: error: ...`` for what a
run finds, ``safemerge <command>: error: ...`` for what the command line itself gets wrong.
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import sys
from typing import Any, NoReturn, Sequence

from safemerge_ext.backends import PRECISION_ENV_VAR, PRECISIONS  # (no torch)

BACKENDS = ("auto", "triton", "cuda", "cpp", "torch")
METHODS = ("linear", "ties", "dare_linear", "dare_ties", "peft-linear")

_MODELS_HELP = {
    "aligned": "the aligned (chat/instruct) model folder the adapters were trained on, e.g. Llama-2-7b-chat-hf "
               "(safetensors, single file or sharded)",
    "unaligned": "the unaligned base model folder the aligned one was tuned from, e.g. Llama-2-7b-hf; "
                 "V = W_aligned - W_unaligned spans the safety subspace",
}


def _add_models(p: argparse.ArgumentParser) -> None:
    p.add_argument("--aligned", required=True, metavar="DIR", type=_home, help=_MODELS_HELP["aligned"])
    p.add_argument("--unaligned", required=True, metavar="DIR", type=_home, help=_MODELS_HELP["unaligned"])


def _add_runtime(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=BACKENDS, default=None,
                   help="scoring backend: auto = triton on CUDA, else the CUDA extension; the C++ extension on the CPU; "
                        "torch is the pure-PyTorch reference. Env SAFEMERGE_BACKEND sets the default (default: auto)")
    p.add_argument("--device", default="cpu", metavar="cpu|cuda[:N]",
                   help="device the weights are scored on; cuda (or cuda:N) stages through pinned memory (default: cpu)")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="operand precision the triton kernels may use on a GPU: ieee = exact fp32 (default); tf32x3 "
                        "near-fp32 on tensor cores; tf32 and bf16 (about 3 digits per product) trade accuracy for the "
                        f"tensor cores' rate. Other backends always compute in exact fp32. Env {PRECISION_ENV_VAR} "
                        "sets the default")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar over layers")


def _add_out(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, metavar="DIR", type=_home,
                   help="output folder; written to a temporary sibling and renamed at the end, so a failed run leaves nothing")
    p.add_argument("--output", choices=("adapter", "model"), default="adapter",
                   help="adapter: a PEFT LoRA adapter for --aligned (default); model: the full aligned model with the "
                        "updates added, same sharding, config and tokenizer files copied")
    p.add_argument("--adapter-ranks", choices=("uniform", "per-module"), default=None,
                   help="with --output adapter: uniform (default) writes every module at one rank, the largest, "
                        "zero-padded, which vLLM, llama.cpp, Ollama, TGI and LoRAX read as PEFT does; per-module keeps "
                        "each module's own rank through rank_pattern/alpha_pattern: a smaller file that PEFT and "
                        "transformers' load_adapter read, those others not")
    p.add_argument("--force", action="store_true",
                   help="replace --out if it exists: a previous output (it holds safemerge_report.json) or an "
                        "empty folder, and only once the run has succeeded")
    p.add_argument("--no-plot", dest="plot", action="store_false",
                   help="skip the report's PNG plot (matplotlib: 0.3-0.5 s of start-up and 55-190 ms a render; "
                        "the JSON report is always written)")


def _unit_float(name: str, lo: float, hi: float, lo_open: bool = False):
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number; got {text!r}") from None
        if not (lo < v <= hi if lo_open else lo <= v <= hi):
            raise argparse.ArgumentTypeError(f"{name} must lie in {'(' if lo_open else '['}{lo:g}, {hi:g}]; got {text}")
        return v
    return parse


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number; got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1; got {v}")
    return v


def _home(value: str) -> str:
    """A path with a leading ``~`` expanded, as recipes' paths are: the shell leaves it in
    ``--out=~/x``, in quotes, and on Windows, where a folder named "~" was made instead."""
    return os.path.expanduser(value) if value.startswith("~") else value


def _report_file(value: str) -> str:
    """``--report``'s FILE; ``-`` is standard output, as ``/dev/stdout`` (a file named "-" was written)."""
    if value != "-":
        return _home(value)
    if not os.path.exists("/dev/stdout"):
        raise argparse.ArgumentTypeError("- (standard output) needs /dev/stdout, which this system lacks; give a file name")
    return "/dev/stdout"


class _Parser(argparse.ArgumentParser):
    """argparse with its errors as one line (what is wrong, and where the usage is) and exit code 2;
    subcommands' parsers are of this class too. Flags are taken whole: an abbreviation ("--thresh")
    is refused, as a misspelt recipe parameter is, so a script's flags cannot change meaning when a
    later version adds a flag with the same start."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        # (argparse reads "-1e-3" and "-inf" as flags, "expected one argument", where "-0.001" is a
        # number; no flag here looks like a number)
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|infinity|nan)$",
                                                   re.IGNORECASE)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> argparse.Namespace:  # type: ignore[override]
        argv = list(sys.argv[1:] if args is None else args)
        commands = [c for a in self._actions if isinstance(a, argparse._SubParsersAction) for c in a.choices]
        if commands and not any(a in commands for a in argv):  # (argparse would only say a command is missing)
            unknown = [a for a in argv if a.startswith("-") and a not in self._option_string_actions]
            if unknown:
                self.error(f"unrecognized arguments: {' '.join(unknown)}, and no command (one of {', '.join(commands)})")
        ns, extra = self.parse_known_args(args, namespace)
        if extra:  # (argparse says so in the top parser's name, pointing at a --help without the flags)
            argv = list(sys.argv[1:] if args is None else args)
            command = getattr(ns, "command", None)
            before = argv[:argv.index(command)] if command in argv else argv
            (self if any(e in before for e in extra) else self._chosen(ns)).error(
                f"unrecognized arguments: {' '.join(extra)}")
        return ns

    def _chosen(self, ns: argparse.Namespace) -> "_Parser":
        """The (sub)command parser the arguments chose."""
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                sub = action.choices.get(getattr(ns, action.dest, None))
                if isinstance(sub, _Parser):
                    return sub._chosen(ns)
        return self


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="safemerge",
        description="SafeMERGE: find the layers where fine-tuning drifted out of the model's safety subspace "
                    "(cos(C dW, dW) with C = V V^T/||V||, V = W_aligned - W_unaligned) and merge only those "
                    "with a safety update. Reads one tensor at a time from safetensors.",
    )
    from safemerge_ext import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("score", help="score an adapter's layers; no merge",
                       description="Score every layer of a LoRA adapter against the safety subspace and report it.")
    _add_models(p)
    p.add_argument("--adapter", required=True, metavar="DIR", type=_home, help="the PEFT LoRA adapter folder to score")
    p.add_argument("--threshold", type=_unit_float("--threshold", -1, 1), default=0.35,
                   help="layers with cosine < threshold are marked as SafeMERGE would flag them (default: 0.35)")
    p.add_argument("--report", metavar="FILE", type=_report_file, help="write the JSON report here (- for stdout)")
    p.add_argument("--plot", metavar="FILE", type=_home, help="write the per-layer cosine plot here (.png, .pdf, .svg, ...)")
    _add_runtime(p)

    p = sub.add_parser("merge", help="SafeMERGE a task adapter with a safety adapter",
                       description="Score the task adapter; merge the flagged layers with the safety adapter "
                                   "(alpha * dW_task + (1 - alpha) * dW_safety, or ties/DARE); keep every other layer.")
    _add_models(p)
    p.add_argument("--task-adapter", required=True, metavar="DIR", type=_home, help="the task (fine-tuning) LoRA adapter")
    p.add_argument("--safety-adapter", required=True, metavar="DIR", type=_home,
                   help="a LoRA adapter trained on safety data on the same aligned model and target modules")
    _add_out(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--threshold", type=_unit_float("--threshold", -1, 1),
                   help="flag layers with cosine < threshold (default: 0.35)")
    g.add_argument("--num-layers", type=positive_int, metavar="K",
                   help="flag the K layers with the lowest cosine (equal cosines: the earlier layer first)")
    g.add_argument("--fraction", type=_unit_float("--fraction", 0, 1, lo_open=True), metavar="F",
                   help="flag the lowest ceil(F x n) of the n scored layers (equal cosines: the earlier layer first)")
    p.add_argument("--alpha", type=_unit_float("--alpha", 0, 1), default=0.8,
                   help="weight of the task update in flagged layers; the safety update gets 1 - alpha (default: 0.8)")
    p.add_argument("--method", choices=METHODS, default="linear",
                   help="how flagged layers combine: linear is exact (rank r_task + r_safety); ties/dare run "
                        "peft.utils.merge_utils on the full update, re-factorized by SVD for adapter output; "
                        "peft-linear is the reference code's PEFT add_weighted_adapter 'linear' (cross terms, equal "
                        "ranks), to reproduce its numbers (default: linear)")
    p.add_argument("--density", type=_unit_float("--density", 0, 1, lo_open=True), default=None,
                   help="ties/dare: fraction of each update kept (default: 1.0)")
    p.add_argument("--seed", type=int, default=None,
                   help="dare: seed of the random masks; a run is reproducible per seed (default: 0)")
    _add_runtime(p)

    p = sub.add_parser("project", help="Safe LoRA: project flagged layers onto the safety subspace",
                       description="Safe LoRA baseline: layers with cosine <= threshold (or the K lowest) get lora_B <- C lora_B.")
    _add_models(p)
    p.add_argument("--adapter", required=True, metavar="DIR", type=_home, help="the PEFT LoRA adapter to project")
    _add_out(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--threshold", type=_unit_float("--threshold", -1, 1),
                   help="project layers with cosine <= threshold (default: 0.5)")
    g.add_argument("--num-layers", type=positive_int, metavar="K",
                   help="project the K layers with the lowest cosine (equal cosines: the earlier layer first)")
    _add_runtime(p)

    p = sub.add_parser("backends", help="list the scoring backends and why any is unavailable",
                       description="List every scoring backend: usable here, or the reason it is not.")

    p = sub.add_parser("autoload", help="let plain mergekit-yaml find the safemerge methods",
                       description="Write (enable) or remove (disable) the .pth hook in this environment's site-packages "
                                   "that registers safemerge, safelora and resta when mergekit loads its methods, "
                                   "or say whether it is in place and active (status).")
    p.add_argument("action", choices=("enable", "disable", "status"), help="what to do with the hook")

    from safemerge_ext.evaluation import cli as evaluation_cli  # argparse only: --help stays torch-free

    evaluation_cli.add_parsers(sub)
    return parser


def _run(args: argparse.Namespace) -> int:
    if args.command in ("eval", "data"):
        from safemerge_ext.evaluation import cli as evaluation_cli

        return evaluation_cli.run(args)
    if args.command == "backends":
        from safemerge_ext.backends import available_backends, backend_detail

        for name, reason in available_backends(load=True).items():
            detail = backend_detail(name) if reason is None else None
            state = ("available" + (f" ({detail})" if detail else "")) if reason is None else "unavailable: " + reason
            print(f"{name:7s} {state}")
        return 0
    if args.command == "autoload":
        from safemerge_ext import autoload

        print(autoload.status(check=True) if args.action == "status" else getattr(autoload, args.action)())
        return 0

    from safemerge_ext import pipeline

    progress = False if args.no_progress else None
    # (SAFEMERGE_BACKEND sets the default: an explicit --backend, auto included, wins over it)
    common = {"backend": args.backend or "auto", "honour_env": args.backend is None, "device": args.device,
              "precision": args.precision, "progress": progress}
    if args.command in ("merge", "project") and args.adapter_ranks is not None and args.output != "adapter":
        raise ValueError(f"--adapter-ranks applies to --output adapter; --output {args.output} writes the model's "
                         "weights: leave --adapter-ranks out")
    if args.command == "score":
        report = pipeline.score(args.aligned, args.unaligned, args.adapter, threshold=args.threshold,
                                report_path=args.report, plot_path=args.plot, **common)
    elif args.command == "merge":
        from safemerge_ext.merge import USES_DENSITY, USES_SEED

        if args.density is not None and args.method not in USES_DENSITY:
            raise ValueError(f"--density applies to --method ties, dare_linear and dare_ties; {args.method} keeps every entry")
        if args.seed is not None and args.method not in USES_SEED:
            raise ValueError(f"--seed applies to --method dare_linear and dare_ties (their random masks); "
                             f"{args.method} draws nothing")
        threshold = 0.35 if args.num_layers is None and args.fraction is None and args.threshold is None else args.threshold
        settings = pipeline.MergeSettings(
            pipeline.Selection(threshold=threshold, num_layers=args.num_layers, fraction=args.fraction),
            alpha=args.alpha, method=args.method, density=1.0 if args.density is None else args.density,
            seed=args.seed or 0, output=args.output, adapter_ranks=args.adapter_ranks or "uniform",
        )
        report = pipeline.merge(args.aligned, args.unaligned, args.task_adapter, args.safety_adapter, args.out,
                                settings, force=args.force, plot=args.plot, **common)
    else:
        threshold = 0.5 if args.num_layers is None and args.threshold is None else args.threshold
        selection = pipeline.Selection(threshold=threshold, num_layers=args.num_layers, inclusive=True)
        report = pipeline.project(args.aligned, args.unaligned, args.adapter, args.out, selection,
                                  output=args.output, adapter_ranks=args.adapter_ranks or "uniform", force=args.force,
                                  plot=args.plot, **common)
    return _say_done(args, report)


def _say_done(args: argparse.Namespace, report: dict) -> int:
    """Print the summary of a run whose output is in place. What cuts the printing short (a closed
    pipe, a terminal that cannot show a path, Ctrl-C) no longer concerns the output: a warning, not
    'nothing was written'."""
    from safemerge_ext._signals import exit_code, what_ended
    from safemerge_ext.report import layer_table, summary_table

    out = getattr(args, "out", None)
    written = _target(args) or "the run"
    try:
        # (score's output is the per-layer table; merge and project name their flagged layers)
        per_layer = args.command == "score"
        lines = [layer_table(report), ""] if per_layer else []
        lines.append(summary_table(report, name_flagged=not per_layer))
        if out:
            lines.append(f"wrote {out} (report: safemerge_report.json{', plot: safemerge_report.png' if args.plot else ''})")
        # (a report sent to stdout, `--report /dev/stdout | jq .`, keeps stdout to itself)
        from safemerge_ext.io.output import descriptor_of

        sent = [getattr(args, name, None) for name in ("report", "plot")] if per_layer else []
        stream = sys.stderr if any(p and descriptor_of(p) == 1 for p in sent) else sys.stdout
        if stream is None:  # (started with it closed, `>&-`: print() would drop the lines without a word)
            raise OSError(errno.EBADF, "standard output is closed")
        enc = getattr(stream, "encoding", None) or "utf-8"  # (a path the terminal cannot show: escaped)
        print("\n".join(lines).encode(enc, "backslashreplace").decode(enc, "replace"), file=stream, flush=True)
    except OSError as exc:  # (a pipe closed early: `safemerge merge ... | head`)
        try:  # (and no second broken-pipe error when the interpreter flushes stdout at exit)
            if sys.stdout is not None:  # (closed at start: fd 1 may be one of this run's files now)
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        if args.command == "score" and _target(args) is None and exc.errno != errno.EPIPE:
            # (the table was score's only output: a full disk or an I/O error lost it; a reader that
            # closed the pipe, `| head`, took what it wanted)
            print(f"safemerge: error: the scores could not be printed ({exc.strerror or exc}); score wrote nothing "
                  "else (--report FILE keeps them in a file)", file=sys.stderr)
            return 2
        _warn(f"{written} is complete; its summary could not be printed ({exc.strerror or exc})")
    except KeyboardInterrupt as exc:
        _warn(f"{what_ended(exc)} after the run: {written} is complete; its summary was cut short", prefix="safemerge")
        return exit_code(exc)
    return 0


def _target(args: argparse.Namespace) -> str | None:
    """What the command writes, as its flags name it (``--out DIR``; score's ``--report FILE``
    and ``--plot FILE``), if anything."""
    if getattr(args, "out", None):
        return f"--out {args.out}"
    given = [f"{flag} {path}" for flag, path in (("--report", getattr(args, "report", None)),
                                                  ("--plot", getattr(args, "plot", None) if args.command == "score" else None))
             if path]
    return " and ".join(given) or None


# a write that found no room: what it means, in words
_FULL = {errno.ENOSPC: "its file system is full", errno.EDQUOT: "the disk quota there is used up",
         errno.EFBIG: "a file grew past what its file system (or ulimit -f) allows"}


def _warn(text: str, prefix: str = "safemerge: warning") -> None:
    try:
        print(f"{prefix}: {text}", file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        from safemerge_ext._signals import (exit_code, exit_on_signal, interrupts_held, pending_signal,
                                            sigterm_as_interrupt)
        from safemerge_ext.errors import SafeMergeError, symlink_loop

        target = _target(args)
        if args.command in ("score", "merge", "project"):  # (the commands that map model files)
            from safemerge_ext._faults import bus_error_line, explain_bus_errors

            explain_bus_errors(bus_error_line("safemerge", f"nothing was written to {target}" if target else None))
    except KeyboardInterrupt:  # (a Ctrl-C in the first tenth of a second, before the run's handlers)
        print("safemerge: interrupted; nothing was written", file=sys.stderr)
        return 130
    code = None
    try:
        with sigterm_as_interrupt():
            code = _run(args)
            late = pending_signal()  # (one that waited for an import, or was swallowed, as the run finished)
        if late is not None and code == 0:
            _warn(_ended_after_the_run(late, target), prefix="safemerge")
            code = exit_code(late)
        return code
    except (SafeMergeError, ValueError, OSError, KeyboardInterrupt) as exc:
        with interrupts_held(resend=False):  # (the run is over: a second Ctrl-C does not cut its one line short)
            code = _failed(exc, args, target)
        return code
    except RuntimeError as exc:
        loop = symlink_loop(exc)
        if loop is None:
            raise
        with interrupts_held(resend=False):
            code = _failed(loop, args, target)
        return code
    finally:
        with interrupts_held(resend=False):
            if "safemerge_ext.report" in sys.modules:
                sys.modules["safemerge_ext.report"].finish_preloads()
        if argv is None and code is not None:  # (the console script: the interpreter's teardown is all that is left)
            exit_on_signal(lambda signum, code=code: _after_the_run(signum, code, target))
            if args.command in _EXIT_AT_ONCE:
                _exit_now(code)


_EXIT_AT_ONCE = ("score", "merge", "project")
"""Commands whose console-script process ends with os._exit once its output is written and its
lines are out (as safemerge-yaml's does): torch's teardown takes half a second (mergekit's a
second), during which a Ctrl-C or SIGTERM would kill the process with no word (late in it,
Python's handlers are gone). Their outputs are closed and synced before the summary; the exit
handlers (atexit: multiprocessing's, which unlink the semaphores a progress bar may have made,
torch's) still run, in a few ms; only the modules' teardown is skipped. (Not eval: vLLM's engine
process is shut down as the interpreter exits.)"""


def _exit_now(code: int) -> None:
    import atexit

    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:  # (None: the process started with that descriptor closed)
                stream.flush()
        except (OSError, ValueError):  # (a closed pipe: its line was lost already, and said so if it could be)
            pass
    try:
        atexit._run_exitfuncs()  # (what Python runs first at exit; it reports a handler's error itself)
    finally:
        os._exit(code)


def _failed(exc: BaseException, args: argparse.Namespace, target: str | None) -> int:
    """The one line for a run that ended on ``exc``, printed; its exit code."""
    from safemerge_ext._signals import exit_code, say, what_ended

    if isinstance(exc, KeyboardInterrupt):
        from safemerge_ext.io.output import committed

        what = what_ended(exc)
        outputs = (getattr(args, "out", None), getattr(args, "report", None),
                   getattr(args, "plot", None) if args.command == "score" else None)  # (merge's "plot" is a switch)
        if any(p and committed(p) for p in outputs):  # (it came as they were put in place)
            _warn(f"{what} after the run: {target} is complete; its summary was cut short", prefix="safemerge")
        else:
            say(f"safemerge: {what}; nothing was written" + (f" to {target}" if target else ""))
        return exit_code(exc)
    if isinstance(exc, OSError):  # disk full, permissions, a path that vanished: still one line
        if exc.errno in _FULL and target:  # (named by what the user asked for, not the temporary file that filled)
            print(f"safemerge: error: {target}: {_FULL[exc.errno]} ({exc.strerror or exc}); free space there or write "
                  "elsewhere; nothing was written", file=sys.stderr)
            return 2
        # (an error without a file name may come from reading as well as from writing)
        where = f": {exc.filename}" if exc.filename else ""
        print(f"safemerge: error: {exc.strerror or exc}{where}; nothing was written" + (f" to {target}" if target else ""),
              file=sys.stderr)
        return 2
    print(f"safemerge: error: {exc}", file=sys.stderr)
    return 2


def _ended_after_the_run(signum: int, target: str | None) -> str:
    from safemerge_ext._signals import what_ended

    return f"{what_ended(signum)} after the run" + (f": {target} is complete" if target else "")


def _after_the_run(signum: int, code: int, target: str | None) -> str | None:
    """The line for a signal that comes while the process exits after its run (whose own line is out)."""
    return f"safemerge: {_ended_after_the_run(signum, target)}" if code == 0 else None


def yaml_main(argv: Sequence[str] | None = None) -> None:
    """``safemerge-yaml``: mergekit-yaml with the plugin; one line when mergekit is not installed.
    Ctrl-C and SIGTERM are handled from the start: mergekit's imports take seconds."""
    from safemerge_ext._signals import exit_code, pending_signal, say, sigterm_as_interrupt, what_ended

    code: object = None
    try:
        with sigterm_as_interrupt():
            try:
                from safemerge_ext import yaml_cli
            except ImportError as exc:
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                missing = isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] == "mergekit"
                print("safemerge-yaml: error: it needs mergekit: pip install 'safemerge-ext[mergekit]'" if missing else
                      f"safemerge-yaml: error: mergekit is installed but does not import ({first}); install the "
                      "versions of its requirements it supports (python -c 'import mergekit.options' shows where "
                      "it fails)", file=sys.stderr)
                sys.exit(1)
            try:
                yaml_cli.main(None if argv is None else list(argv))
            except SystemExit as exc:
                code = exc.code
                late = pending_signal()  # (one that waited for an import, or was swallowed, as the run finished)
                if late is not None and code == 0:
                    say(yaml_cli.after_the_run(late) or f"safemerge-yaml: {what_ended(late)} after the run")
                    code = exit_code(late)
                    raise SystemExit(code) from None
                raise
    except KeyboardInterrupt as exc:  # (during the imports, or in the moments around the command's own handling)
        yaml_cli = sys.modules.get("safemerge_ext.yaml_cli")
        done = yaml_cli.after_the_run(exc) if yaml_cli is not None else None
        say(done or f"safemerge-yaml: {what_ended(exc)}; nothing was written")
        sys.exit(exit_code(exc))
    finally:  # (the handlers above are gone by now: the interpreter's teardown, a second or so, is left)
        if argv is None and "safemerge_ext.yaml_cli" in sys.modules:
            from safemerge_ext._signals import exit_on_signal

            exit_on_signal(sys.modules["safemerge_ext.yaml_cli"].after_the_run)
            if isinstance(code, int):  # (the exit handlers, the plugin's report hook among them, still run)
                _exit_now(code)


if __name__ == "__main__":
    sys.exit(main())
