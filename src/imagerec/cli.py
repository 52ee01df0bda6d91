"""`imagerec` command line. Each subcommand parses arguments and calls one library function."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from imagerec.cli_parser import build_parser
from imagerec.utils import ImageRecError, write_error_text


def cmd_train(args: argparse.Namespace) -> int:
    from imagerec.config import TrainConfig, apply_overrides, load_config_file
    from imagerec.engine.run import train

    known = {f.name for f in dataclasses.fields(TrainConfig)}
    overrides = {k: v for k, v in vars(args).items() if k in known and k != "data"}
    if args.resume:
        data = {"data": args.data} if args.data else {}  # checked against the run's own: never ignored
        # A --config file's keys are resume overrides too, checked like flags (which win over it).
        from_file = load_config_file(args.config) if args.config else None
        in_file = {k: getattr(from_file, k) for k in from_file.explicit} if from_file is not None else {}
        result = train(resume=args.resume, **{**in_file, **data, **overrides})
    else:
        cfg = load_config_file(args.config) if args.config else TrainConfig()
        # a --config file's `data:` (every run's config.yaml has one) is used when DATA is not given
        data = args.data or (cfg.data if "data" in cfg.explicit else None)
        if not data:
            raise ImageRecError("imagerec train needs DATA (a folder, archive, manifest or dataset name), "
                                "a --config file with a data: key, or --resume DIR")
        cfg = apply_overrides(cfg, {"data": data, **overrides}, "the command line")
        result = train(cfg)
    if not result.main_process:  # torchrun rank > 0: rank 0 records and reports the run
        return 130 if result.interrupted else 0
    _record(result.run_dir, "interrupted" if result.interrupted else "completed", args.db)
    if result.interrupted:
        return 130
    _print_run_summary(result)
    return 0


def _record(run_dir: Path, status: str | None, db: str | None) -> None:
    """Record a run (and its evaluations) in the store; a store problem never fails a finished run."""
    from sqlalchemy.exc import SQLAlchemyError

    from imagerec.store import open_store, record_run_dir

    try:
        with open_store(db) as store:
            record_run_dir(store, run_dir, status)
    except (ImageRecError, OSError, SQLAlchemyError) as e:  # the store turns its own failures into ImageRecError
        logging.getLogger("imagerec").warning("run not recorded in the store: %s", (str(e).splitlines() or [repr(e)])[0])


def _print_run_summary(result: Any) -> None:
    from imagerec.report import summary_line

    m = result.metrics
    for split in ("val", "test"):
        if split in m:
            print(f"{split}: {summary_line(m[split])}")
    print(f"run saved in {result.run_dir}")


def cmd_eval(args: argparse.Namespace) -> int:
    from rich.console import Console

    from imagerec.engine.evaluate import evaluate_run, write_eval_outputs
    from imagerec.report import metrics_table, summary_line

    m = evaluate_run(args.run, args.data, args.split, batch_size=args.batch_size, device=args.device,
                     precision=args.precision, write=False)
    # The numbers are shown before they are saved: a run folder that cannot be written to (read-only,
    # another user's) costs the files, never the evaluation's result.
    out = Path(args.out) if args.out else Path(args.run)
    if args.format == "json":
        print(json.dumps(m), flush=True)
    else:
        console = Console(soft_wrap=True)  # run, data and class names are printed as written, never as markup
        console.print(metrics_table(m, f"{args.run} on {m['data']} [{m['split']}]"))
        console.print(summary_line(m), highlight=False)
        if m["skipped_files"]:
            console.print(f"skipped {len(m['skipped_files'])} unreadable file(s)")
    try:
        if args.out:
            try:
                out.mkdir(parents=True, exist_ok=True)
            except OSError as e:  # a file where a folder of --out should be, no permission
                raise ImageRecError(f"cannot create --out {out}: {write_error_text(e)}") from e
        write_eval_outputs(out, m["split"], m)
    except (ImageRecError, OSError) as e:
        hint = "" if args.out else "; pass --out DIR to save them elsewhere"
        raise ImageRecError(f"the evaluation above was not saved: {e}{hint}") from e
    if not args.out:
        _record(Path(args.run), None, args.db)  # the run keeps its own status (an evaluation does not finish it)
    if args.format != "json":
        written = out / f"eval-{m['split']}.json"
        console.print(f"written: {written}", markup=False, highlight=False)
    return 0


def cmd_robustness(args: argparse.Namespace) -> int:
    from imagerec.robustness import robustness_command

    return robustness_command(args.run, args.data, args.split, args.limit, args.corruptions, args.severities, args.attacks,
                              args.eps, fmt=args.format, seed=args.seed, device=args.device)


def cmd_predict(args: argparse.Namespace) -> int:
    from imagerec.predict_run import run_predict

    return run_predict(args.run, args.paths, top_k=args.top_k, fmt=args.format, output=args.output,
                       resume=args.resume, every=args.every, batch_size=args.batch_size, device=args.device,
                       max_pixels=args.max_pixels)


def cmd_check(args: argparse.Namespace) -> int:
    from imagerec.doctor import check_command

    if not args.data and not args.undo:
        raise ImageRecError("imagerec check needs DATA, or --undo MANIFEST")
    fix, dest = (args.fix[0], args.fix[1]) if args.fix else (None, None)
    if fix is not None and fix != "quarantine":
        raise ImageRecError(f"unknown --fix action '{fix}': the only action is 'quarantine DIR' (files are moved, never deleted)")
    return check_command(args.data, fmt=args.format, html=args.html, fix=fix, fix_dest=dest, undo=args.undo,
                         max_pixels=args.max_pixels, data_dir=args.data_dir)


def cmd_ingest(args: argparse.Namespace) -> int:
    from imagerec.store import ingest_command

    return ingest_command(args.source, args.dataset, args.split, args.db, update=args.update, data_dir=args.data_dir,
                          max_pixels=args.max_pixels)


def cmd_datasets(args: argparse.Namespace) -> int:
    from imagerec.store import datasets_command

    return datasets_command(args.db, args.format)


def cmd_runs(args: argparse.Namespace) -> int:
    from imagerec.store import runs_command

    # run ids no store can hold are refused by compare_runs, like missing ones
    return runs_command(args.db, args.format, args.compare)


def cmd_export_dataset(args: argparse.Namespace) -> int:
    from imagerec.store import export_dataset_command

    return export_dataset_command(args.name.removeprefix("store:"), args.out, args.db)


def cmd_export(args: argparse.Namespace) -> int:
    from imagerec.export import export_command

    return export_command(args.run, args.format, args.out, int8=args.int8, parity_images=args.parity_images,
                          max_drop=args.max_drop, data=args.data, overwrite=args.overwrite,
                          min_agreement=args.min_agreement)


def cmd_benchmark(args: argparse.Namespace) -> int:
    from imagerec.export import benchmark_command

    return benchmark_command(args.source, args.format, tuple(args.batch_sizes), args.seconds)


def cmd_serve(args: argparse.Namespace) -> int:
    from imagerec.serve import serve

    serve(args.models, host=args.host, port=args.port, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
          adaptive_wait=not args.fixed_wait, queue_size=args.queue_size, instances=args.instances, api_key_file=args.api_key_file, max_body_mb=args.max_body_mb,
          max_pixels=args.max_pixels, timeout_s=args.timeout_s, cors_origins=args.cors_origin or (), db=args.db,
          workers=args.workers)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from imagerec.models import count_parameters, create_model, describe_model, list_models

    table = Table(title="imagerec models (parameters for 10 classes, 3x32x32 input)")
    for col in ("name", "params", "description"):
        table.add_column(col, justify="right" if col == "params" else "left")
    for name in list_models(args.pattern):
        n = count_parameters(create_model(name, num_classes=10, in_chans=3, img_size=32))
        table.add_row(name, f"{n / 1e6:.2f}M", describe_model(name))
    console = Console(soft_wrap=True)
    console.print(table)
    console.print("any timm architecture: timm/<name>, e.g. timm/efficientnet_b0, timm/convnext_tiny")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from imagerec.demo import run_demo

    run_demo(out=args.out, epochs=args.epochs)
    return 0


COMMANDS = {
    "train": cmd_train,
    "eval": cmd_eval,
    "robustness": cmd_robustness,
    "predict": cmd_predict,
    "check": cmd_check,
    "ingest": cmd_ingest,
    "datasets": cmd_datasets,
    "runs": cmd_runs,
    "export-dataset": cmd_export_dataset,
    "export": cmd_export,
    "benchmark": cmd_benchmark,
    "serve": cmd_serve,
    "models": cmd_models,
    "demo": cmd_demo,
}


@contextlib.contextmanager
def _env_for_command(name: str, value: str | None) -> Iterator[None]:
    """Set `$name` to `value` (when given) for the command, so the data layer, loader workers and
    torchrun's ranks see the flag too: `--db URL` is the store of everything the command does
    (`$IMAGEREC_DB`: the images of a `store:NAME` DATA as well as the records it writes), and
    `--data-dir DIR` is where named datasets are looked for first (`$IMAGEREC_DATA`)."""
    if not value:
        yield
        return
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    if not args.command:
        parser.print_help()
        return 2
    try:
        with _env_for_command("IMAGEREC_DB", getattr(args, "db", None)), \
                _env_for_command("IMAGEREC_DATA", getattr(args, "data_dir", None)):
            code = COMMANDS[args.command](args)
            sys.stdout.flush()  # here, so a reader that has gone (`| head`) is seen below, not at exit
            return code
    except ImageRecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # before OSError, its base: `imagerec predict ... | head` stops quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the flush at exit must not fail again
        return 0
    except OSError as e:  # an output path that is a file, a folder, read-only, on a full disk, ...
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}; choose another path or fix its permissions", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
