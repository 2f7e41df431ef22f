"""The `ft` command line: one thin function per command.

Each command parses its flags, calls the library and sets the exit code; no logic lives here. Heavy
libraries are imported inside the commands that need them, so `ft --help` answers at once.
Exit codes: 0 ok, 2 a problem with the input (one line on stderr), 1 a bug, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ft.errors import FtError

MAIN_HELP = """\
examples:
  ft run                                   # the whole loop on the built-in default recipe
  ft run --recipe tiny                     # offline CPU smoke run with a tiny model (seconds)
  ft data check --train data/train.jsonl   # validate your data against the default recipe
  ft size --gpu rtx4090                    # will the recipe fit on a 24 GB card, and how long?
  ft verify bundles/default-*.tar.gz       # check a sealed bundle someone sent you

The loop: size -> check data -> train (QLoRA) -> eval vs the untouched base -> KEEP/DISCARD -> seal.
Every setting comes from a recipe (built-in name or YAML file), FT_* environment variables
(FT_TRAIN__LEARNING_RATE=1e-4) or --set train.learning_rate=1e-4, strongest last.
"""


def _recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--recipe",
        "-r",
        default=os.environ.get("FT_RECIPE") or "default",
        help="built-in recipe name (see `ft recipes`) or a YAML file [env FT_RECIPE; default: default]",
    )
    p.add_argument(
        "--set",
        "-s",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one setting, e.g. --set lora.r=32 (repeatable)",
    )


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def _sub(subs, name: str, help: str, example: str, func) -> argparse.ArgumentParser:
    p = subs.add_parser(
        name,
        help=help,
        description=f"example:\n  {example}\n\n{help}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(p)
    p.set_defaults(func=func)
    return p


def _settings(args):
    from ft.config import load_settings

    overrides = list(args.overrides)
    if getattr(args, "train_files", None):
        overrides.append(f"data.train={json.dumps(args.train_files)}")
    if getattr(args, "eval_files", None):
        overrides.append(f"data.eval={json.dumps(args.eval_files)}")
    return load_settings(args.recipe, overrides)


def _out(text: str) -> None:
    from ft.secrets import redact

    print(redact(text), flush=True)


# -- commands -----------------------------------------------------------------------------------------
def cmd_env(args) -> int:
    from ft import manifest

    env = manifest.capture(with_torch=not args.short, full=args.json)
    _out(json.dumps(env, indent=2) if args.json else manifest.render(env))
    return 0


def cmd_recipes(args) -> int:
    from ft.config import builtin_recipes, field_docs, load_settings

    if args.name:
        _out(load_settings(args.name).to_yaml())
        return 0
    recipes = sorted(builtin_recipes().items())
    width = max(len(name) for name, _ in recipes)
    for name, path in recipes:
        _out(f"{name:{width}s}  {load_settings(path).description}")
    if args.reference:
        _out("")
        for key, default, doc in field_docs():
            _out(f"{key:28s} {default:24s} {doc}")
    return 0


def cmd_data_check(args) -> int:
    settings = _settings(args)
    from ft import data
    from ft.pipeline import check_data

    def show(problem: str) -> None:  # -v: every problem as it is found, however many
        from ft.secrets import redact

        print(redact(problem), file=sys.stderr, flush=True)

    prep = check_data(settings, on_problem=show if args.verbose else None)
    _out(json.dumps(prep.check.report, indent=2) if args.json else data.render_report(prep.check.report))
    return 0


def cmd_size(args) -> int:
    from ft import sizing

    if args.list_models:
        _out(json.dumps(sizing.preset_table(), indent=2) if args.json else sizing.render_presets())
        return 0
    overrides = list(args.overrides)
    if args.model:
        overrides.append(f"model.name_or_path={args.model}")
    if args.seq is not None:
        if args.seq < 1:
            raise FtError(f"--seq {args.seq}: must be at least 1")
        overrides.append(f"train.max_seq_length={args.seq}")
    if args.micro_batch is not None and args.micro_batch < 1:
        raise FtError(f"--micro-batch {args.micro_batch}: must be at least 1")
    args.overrides = overrides
    settings = _settings(args)
    backend = None
    if args.probe:
        from ft import backends
        from ft.manifest import cuda_available

        if not cuda_available():
            raise FtError("ft size --probe needs a CUDA GPU; without one, ft size only predicts")
        # First, before anything loads transformers: Unsloth, if that is the backend, must come first.
        _, name, reason = backends.prepare(settings, device="cuda")
        backend = (name, reason)
    ranks = {
        "nproc": args.nproc,
        "nodes": args.nodes,
        "distributed": args.distributed,
        "interconnect": args.interconnect,
    }
    if args.nproc is None and (args.nodes != 1 or args.distributed or args.interconnect):
        raise FtError("--nodes, --distributed and --interconnect size several processes: add --nproc N")
    stated = sizing.stated_data(settings, rows=args.rows, tokens=args.tokens)
    report = sizing.size_report(
        settings, gpu=args.gpu, micro_batch=args.micro_batch, backend=backend, data_stats=stated, **ranks
    )
    if args.probe:
        # Measured at the micro-batch the prediction is for, then the report again with the measured
        # tokens/s in the time estimate.
        measured = sizing.probe(settings, micro_batch=report.estimate.inputs["micro_batch"])
        report = sizing.size_report(
            settings,
            gpu=args.gpu,
            micro_batch=report.estimate.inputs["micro_batch"],
            backend=backend,
            data_stats=stated,
            probe_result=measured,
            **ranks,
        )
    _out(json.dumps(report.to_dict(), indent=2) if args.json else report.render())
    return 0


def _prepare_run(args, settings, finished):
    """Check the data, then the run: --run-dir, an unfinished one (--resume) or a new one."""
    from ft import pipeline

    prep, run_dir, new = pipeline.prepare_run(
        settings, run_dir=args.run_dir, resume=args.resume, finished=finished
    )
    pipeline.say(f"run directory: {run_dir}")
    return prep, run_dir, new


def cmd_train(args) -> int:
    from ft import pipeline
    from ft.sizing import preflight

    settings = _settings(args)
    # GPU, driver and disk; then the backend (Unsloth imported before anything loads transformers or
    # initialises CUDA); then VRAM by the sizing model
    preflight.gate(settings)
    prep, run_dir, new = _prepare_run(args, settings, pipeline.FINISHED_TRAINING)
    result = pipeline.train_stage(prep, run_dir, resume=args.resume, force=args.force, new_run=new)
    if pipeline.rank_done():  # torchrun: ranks other than 0 end here
        return 0
    _out(
        f"adapter: {result.adapter_dir}  ({result.steps} steps, {result.runtime_s:.1f} s, backend {result.backend})"
    )
    return 0


def cmd_eval(args) -> int:
    from ft import backends, pipeline
    from ft.train import distributed

    if not distributed.is_main():  # started by a launcher: rank 0 evaluates, as after `ft run`
        return 0
    run_dir = Path(args.run_dir)
    settings = pipeline.settings_of_run(run_dir)
    meta = pipeline.read_run(run_dir)
    # Evaluate on the backend the run trained with; Unsloth, if so, before transformers is imported.
    backends.prepare(settings, device=meta.get("device"), backend=meta.get("backend"))
    prep = pipeline.check_data(settings)
    if meta.get("data_sha256") != prep.data_sha256:
        raise FtError(
            f"{run_dir}: the data changed since this run was trained (sha256 differs); evaluate a new run"
        )
    report = pipeline.eval_stage(prep, run_dir)
    _out((run_dir / "decision.md").read_text(encoding="utf-8"))
    return 0 if report["decision"]["verdict"] == "KEEP" or not args.strict else 3


def cmd_package(args) -> int:
    from ft import pipeline
    from ft.bundle import render_package

    run_dir = Path(args.run_dir)
    settings = pipeline.settings_of_run(run_dir)
    if args.out:
        settings.output.bundle_dir = args.out
    result = pipeline.package_stage(
        settings, run_dir, include_data=args.include_data or None, sign_key=args.sign_key
    )
    _out(render_package(result))
    return 0


def cmd_verify(args) -> int:
    from ft import bundle

    report = bundle.verify(
        Path(args.bundle),
        key=Path(args.key) if args.key else None,
        require_signature=args.require_signature,
        raise_on_failure=False,
    )
    if not report.ok:
        print(report.render(), file=sys.stderr)
        raise FtError(report.one_line())
    _out(report.render())
    return 0


def cmd_report(args) -> int:
    from ft.report.build import build

    _out(f"wrote {build([Path(t) for t in args.targets], Path(args.out) if args.out else None)}")
    return 0


def cmd_keygen(args) -> int:
    from ft.bundle import signing

    signing.generate_keypair(Path(args.private), Path(args.public))
    _out(f"wrote {args.private} (keep it secret) and {args.public} (share it)")
    return 0


def cmd_reproduce(args) -> int:
    from ft.bundle.reproduce import reproduce

    outcome = reproduce(
        Path(args.bundle),
        Path(args.work),
        key=Path(args.key) if args.key else None,
        trust_remote_code=args.trust_remote_code,
        export_bundle=Path(args.export) if args.export else None,
    )
    _out(outcome.render())
    return 0 if outcome.passed else 3


def cmd_run(args) -> int:
    from ft import pipeline
    from ft.sizing import preflight

    settings = _settings(args)
    # GPU, driver and disk; then the backend (Unsloth imported before anything loads transformers or
    # initialises CUDA); then VRAM by the sizing model
    preflight.gate(settings)
    prep, run_dir, new = _prepare_run(args, settings, pipeline.FINISHED_RUN)
    meta = pipeline.read_run(run_dir)
    if meta.get("status") not in ("trained", "complete"):
        pipeline.train_stage(prep, run_dir, resume=args.resume, force=args.force, new_run=new)
    if pipeline.rank_done():  # torchrun: rank 0 alone evaluates and packages
        return 0
    report = pipeline.eval_stage(prep, run_dir)
    _out((run_dir / "decision.md").read_text(encoding="utf-8"))
    if not args.no_package:
        from ft.bundle import render_package

        bundle_dir = pipeline.package_stage(settings, run_dir, include_data=args.include_data or None)
        _out(render_package(bundle_dir))
        if settings.export.formats and report["decision"]["verdict"] == "KEEP":  # export.formats: last step
            _export(bundle_dir, settings.export.formats, None, None, force=False)
    return 0 if report["decision"]["verdict"] == "KEEP" or not args.strict else 3


def cmd_launch(args) -> int:
    from ft import launch

    plan = launch.plan(
        args.target,
        nodes=args.nodes,
        gpus=args.gpus,
        out_dir=Path(args.out) if args.out else None,
        image=args.image,
        cloud=args.cloud,
        overrides=args.overrides,
        cluster=args.cluster,
    )
    _out(plan.render())
    if args.up:
        launch.up(plan)
    return 0


def _export(target: Path, formats, quants, out, *, force: bool) -> None:
    from ft import export

    result = export.export(
        target, export.parse_formats(formats), out_dir=out, quantizations=quants, force=force
    )
    _out((result.bundle / "export" / "report.md").read_text(encoding="utf-8"))
    _out(f"export sealed in {result.bundle} (`ft verify {result.bundle}`)")
    if result.breaches:
        raise FtError(export.breach_message(result))


def cmd_export(args) -> int:
    from ft.pipeline import settings_of_run

    target = Path(args.target)
    formats = args.to
    if formats is None:  # the recipe's export.formats, else everything
        run_like = target if target.is_dir() else None
        recipe_formats = (
            settings_of_run(run_like).export.formats
            if run_like and (run_like / "recipe.resolved.yaml").is_file()
            else []
        )
        formats = recipe_formats or "all"
    quants = [q for q in args.quant.split(",") if q] if args.quant is not None else None
    _export(target, formats, quants, Path(args.out) if args.out else None, force=args.force)
    return 0


def cmd_push(args) -> int:
    from ft.export.push import push

    url = push(Path(args.bundle), args.repo, what=args.what, private=args.private, revision=args.revision)
    _out(f"pushed {args.what} of {args.bundle} to {url}")
    return 0


# -- parser -------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from ft import __version__

    parser = argparse.ArgumentParser(
        prog="ft", description=MAIN_HELP, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"ft {__version__}")
    _common(parser)
    subs = parser.add_subparsers(dest="command", metavar="COMMAND")

    def data_flags(p):
        p.add_argument(
            "--train", dest="train_files", action="append", metavar="FILE", help="training file (repeatable)"
        )
        p.add_argument(
            "--eval", dest="eval_files", action="append", metavar="FILE", help="held-out file (repeatable)"
        )

    def train_flags(p):
        _recipe_args(p)
        data_flags(p)
        p.add_argument(
            "--resume",
            nargs="?",
            const="auto",
            default=None,
            metavar="auto|CHECKPOINT",
            help="continue the newest unfinished run of this recipe from its last complete checkpoint",
        )
        p.add_argument("--force", action="store_true", help="resume even if the recipe or data changed")
        p.add_argument("--run-dir", help="use this run directory (default: a new one under output.dir)")

    p = _sub(
        subs, "run", "check -> train -> eval -> package, in one command", "ft run --recipe tiny", cmd_run
    )
    train_flags(p)
    p.add_argument("--no-package", action="store_true", help="stop after the evaluation")
    p.add_argument("--include-data", action="store_true", help="copy the data files into the bundle")
    p.add_argument("--strict", action="store_true", help="exit with 3 when the verdict is DISCARD")

    p = _sub(subs, "data", "data commands", "ft data check --train data/train.jsonl", None)
    dsubs = p.add_subparsers(dest="data_command", metavar="check")
    p = _sub(
        dsubs,
        "check",
        "validate, normalise and describe the data under a recipe",
        "ft data check --recipe default --train data/train.jsonl --eval data/eval.jsonl",
        cmd_data_check,
    )
    _recipe_args(p)
    data_flags(p)
    p.add_argument("--json", action="store_true", help="print the data manifest as JSON")
    p.add_argument("--verbose", "-v", action="store_true", help="list every problem, not just the first")

    p = _sub(
        subs,
        "size",
        "predict peak GPU memory, the largest micro-batch that fits and the wall time",
        "ft size --recipe default --gpu 24GiB --seq 2048",
        cmd_size,
    )
    _recipe_args(p)
    p.add_argument(
        "--model",
        help="Hub id, local directory or built-in shape (e.g. qwen2.5-7b; see --list-models); "
        "default: the recipe's",
    )
    p.add_argument("--seq", type=int, help="sequence length (default: train.max_seq_length)")
    p.add_argument(
        "--micro-batch",
        type=int,
        help="micro-batch to predict for (default: the recipe's or the largest fit)",
    )
    p.add_argument(
        "--gpu", help="GPU to size against: the one present, a size (24GiB, 80GB) or a name (rtx4090, h100)"
    )
    p.add_argument("--probe", action="store_true", help="also run a few real steps on the GPU and measure")
    p.add_argument(
        "--nproc",
        type=int,
        metavar="N",
        help="also size N GPU processes per node (torchrun --nproc-per-node): memory per GPU and wall time",
    )
    p.add_argument("--nodes", type=int, default=1, help="machines, each with --nproc GPUs (default: 1)")
    p.add_argument(
        "--distributed",
        choices=["ddp", "fsdp"],
        help="ddp replicates the model on every GPU, fsdp shards it (default: train.distributed, else ddp)",
    )
    p.add_argument(
        "--interconnect",
        choices=["nvlink", "pcie", "network"],
        help="what links the GPUs, for the assumed scaling efficiency (default: nvlink, network with --nodes > 1)",
    )
    p.add_argument(
        "--list-models",
        action="store_true",
        help="list the built-in model shapes (usable as --model NAME, offline) and exit",
    )
    p.add_argument(
        "--rows",
        metavar="N",
        help="size the ETA for this many rows of training data (e.g. 75k, `ft data check`'s rows read) "
        "instead of the line count of the recipe's files",
    )
    p.add_argument(
        "--tokens",
        metavar="N",
        help="and this many tokens in those rows (e.g. 3.1M, `ft data check`'s tokens total; needs --rows) "
        "instead of the upper bound of every row at max_seq_length",
    )
    p.add_argument("--json", action="store_true", help="print the prediction as JSON")

    p = _sub(
        subs,
        "train",
        "train a LoRA adapter (checkpoints, --resume auto)",
        "ft train --recipe tiny --resume auto",
        cmd_train,
    )
    train_flags(p)

    p = _sub(
        subs,
        "eval",
        "base vs tuned on the held-out prompts, then KEEP or DISCARD",
        "ft eval runs/tiny-20261122-101500-1a2b3c4d",
        cmd_eval,
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a trained run directory (runs/NAME)")
    p.add_argument("--strict", action="store_true", help="exit with 3 when the verdict is DISCARD")

    p = _sub(
        subs,
        "package",
        "seal a finished run into a verifiable bundle (+ .tar.gz)",
        "ft package runs/tiny-20261122-101500-1a2b3c4d",
        cmd_package,
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="an evaluated run directory (runs/NAME)")
    p.add_argument("--out", help="bundle directory (default: output.bundle_dir)")
    p.add_argument("--include-data", action="store_true", help="copy the data files into the bundle")
    p.add_argument(
        "--sign-key", help="Ed25519 private key (PEM) to sign MANIFEST.json with (see `ft keygen`)"
    )

    p = _sub(
        subs,
        "verify",
        "recompute every checksum of a bundle (directory or .tar.gz)",
        "ft verify bundles/tiny-20261122-101500-1a2b3c4d.tar.gz --key ft.pub",
        cmd_verify,
    )
    p.add_argument("bundle", metavar="BUNDLE", help="a bundle directory or its .tar.gz")
    p.add_argument("--key", help="public key (PEM) that must have signed MANIFEST.json")
    p.add_argument(
        "--require-signature",
        action="store_true",
        help="fail unless the bundle is signed and the signature was checked with --key",
    )

    p = _sub(
        subs,
        "reproduce",
        "re-run a bundle's recipe on its data and compare environment and metrics",
        "ft reproduce bundles/tiny-20261122-101500-1a2b3c4d.tar.gz",
        cmd_reproduce,
    )
    p.add_argument("bundle", metavar="BUNDLE", help="a bundle directory or its .tar.gz (verified first)")
    p.add_argument(
        "--work",
        default="reproduce",
        help="where to re-run; each run gets a fresh WORK/<bundle>-<n>/ (default: ./reproduce)",
    )
    p.add_argument("--key", help="signer's public key (PEM): the bundle's signature must verify with it")
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow a recipe with model.trust_remote_code (Hub model code); needs a signature checked by --key",
    )
    p.add_argument(
        "--export",
        metavar="EXPORT_BUNDLE",
        help="also re-convert the re-run to f16 GGUF and compare its sha256 with this sealed export's "
        "(bundles/exports/NAME, made by `ft export`)",
    )

    p = _sub(
        subs,
        "report",
        "(re)build a run's or bundle's report.html, or compare two runs or bundles side by side",
        "ft report runs/tiny-20261122-101500-1a2b3c4d runs/tiny-20261122-113000-5e6f7a8b",
        cmd_report,
    )
    p.add_argument(
        "targets",
        nargs="+",
        metavar="RUN_OR_BUNDLE",
        help="one run directory, bundle or .tar.gz (its page), or two (a comparison page)",
    )
    p.add_argument(
        "--out",
        help="where to write the page (default: RUN/eval/report.html; beside a bundle, "
        "BUNDLE.report.html; for two, ./compare-A-vs-B.html)",
    )

    p = _sub(
        subs, "keygen", "make an Ed25519 key pair for signing bundles", "ft keygen ft.key ft.pub", cmd_keygen
    )
    p.add_argument("private", metavar="PRIVATE", help="where to write the private key (PEM; keep it secret)")
    p.add_argument("public", metavar="PUBLIC", help="where to write the public key (PEM; share it)")

    p = _sub(
        subs, "env", "print the environment manifest recorded with every result", "ft env --json", cmd_env
    )
    p.add_argument("--json", action="store_true", help="full manifest including every installed distribution")
    p.add_argument("--short", action="store_true", help="skip torch (fast)")

    p = _sub(
        subs,
        "recipes",
        "list built-in recipes, show one resolved, or print the settings reference",
        "ft recipes default",
        cmd_recipes,
    )
    p.add_argument("name", nargs="?", help="show this recipe fully resolved")
    p.add_argument("--reference", action="store_true", help="every setting with its default and meaning")

    p = _sub(
        subs,
        "export",
        "export a bundle's model (merged safetensors, GGUF, Ollama Modelfile), each loaded back and scored",
        "ft export bundles/tiny-20260101-abc123 --to all",
        cmd_export,
    )
    p.add_argument("target", help="a bundle (directory or .tar.gz) or a finished run directory")
    p.add_argument("--to", help="merged,gguf,ollama or all (default: the recipe's export.formats, else all)")
    p.add_argument("--quant", help="GGUF quantisations, comma-separated (default: export.quantizations)")
    p.add_argument(
        "--out", help="directory for the sealed export bundle (default: exports/ beside the bundle)"
    )
    p.add_argument("--force", action="store_true", help="export even if the evaluation verdict was not KEEP")

    p = _sub(
        subs,
        "launch",
        "write (and with --up start) a SkyPilot task: the recipe or bundle on N machines through torchrun",
        "ft launch default --nodes 2 --gpus H100:8 --image ghcr.io/you/ft@sha256:<digest> --up",
        cmd_launch,
    )
    p.add_argument(
        "target", metavar="RECIPE_OR_BUNDLE", help="recipe name or YAML, or a bundle (.tar.gz or dir)"
    )
    p.add_argument("--nodes", type=int, default=1, help="machines (default: 1)")
    p.add_argument("--gpus", required=True, help="accelerators per machine, NAME:COUNT (e.g. H100:8)")
    p.add_argument("--cloud", help="cloud for SkyPilot (aws, gcp, azure, kubernetes, ...; default: cheapest)")
    p.add_argument(
        "--image", help="the ft image by digest, REF@sha256:<64 hex> (default: a local build's pushed digest)"
    )
    p.add_argument("--cluster", help="SkyPilot cluster name (default: ft-<recipe or bundle name>)")
    p.add_argument("--out", help="where to write task.yaml and its workdir (default: launch/CLUSTER)")
    p.add_argument(
        "--set",
        "-s",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one recipe setting, e.g. --set train.distributed=fsdp (repeatable)",
    )
    p.add_argument(
        "--up", action="store_true", help="also start it through SkyPilot (pip install ft[launch])"
    )

    p = _sub(
        subs,
        "push",
        "upload a bundle's adapter or export to the Hugging Face Hub with a generated model card (HF_TOKEN)",
        "ft push bundles/tiny-20260101-abc123 --repo user/tickets-json",
        cmd_push,
    )
    p.add_argument("bundle", help="a sealed bundle directory (for merged/gguf: its export bundle)")
    p.add_argument("--repo", required=True, help="Hub repository id, user/name")
    p.add_argument("--what", choices=["adapter", "merged", "gguf"], default="adapter", help="what to upload")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--revision", help="branch to upload to (default: main)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from ft import quiet

    quiet.install()  # third-party log lines that are noise for a user, before any library logs
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help() if args.command is None else parser.parse_args([args.command, "--help"])
        return 0 if args.command is None else 2
    try:
        return args.func(args)
    except FtError as exc:
        if args.debug:
            raise
        from ft.secrets import redact

        print(f"error: {redact(str(exc))}", file=sys.stderr, flush=True)
        return exc.exit_code
    except BrokenPipeError:
        # `ft ... | head`: the reader left; exit quietly like other Unix tools (stdout is gone).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except KeyboardInterrupt as exc:  # ft.train.signals.Interrupted says what was saved and its exit code
        message = getattr(exc, "message", None)
        print(
            message or "interrupted; a complete checkpoint, if any, can be resumed with --resume auto",
            file=sys.stderr,
        )
        return getattr(exc, "exit_code", 130)
    except Exception as exc:  # noqa: BLE001 - the one place that turns bugs into a readable line
        if args.debug:
            raise
        print(
            f"error: internal error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
            "(rerun with --debug for the traceback)",
            file=sys.stderr,
            flush=True,
        )
        return 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
