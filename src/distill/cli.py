"""The `distill` command: one subcommand per stage, plus `run` for the whole job.

User-fixable problems (`DistillError`) print one clear message and exit non-zero, never a traceback.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from distill.distributed import is_main_process, main_process_first
from distill.errors import DistillError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Distil a large language model into a small one.")
models_app = typer.Typer(no_args_is_help=True, help="Built-in and cached models.")
data_app = typer.Typer(no_args_is_help=True, help="Look at datasets.")
app.add_typer(models_app, name="models")
app.add_typer(data_app, name="data")
console = Console(stderr=True)

JobArg = Annotated[Path, typer.Argument(help="The YAML job file.")]
Overrides = Annotated[list[str] | None, typer.Argument(help="Overrides as key.path=value, e.g. training.max_steps=10")]


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(message)s",
        datefmt="[%X]",
        handlers=[RichHandler(console=console, show_path=False, rich_tracebacks=True)],
        force=True,
    )
    for noisy in ("httpx", "httpcore", "transformers", "datasets", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.INFO if verbose else logging.WARNING)
    if not is_main_process():  # under a launcher, one process tells the story; every one still warns
        logging.getLogger("distill").setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _job(path: Path, overrides: list[str] | None):
    from distill.config import load_job

    return load_job(path, overrides or [])


@app.command()
def run(job: JobArg, overrides: Overrides = None) -> None:
    """Run the whole job: generate, train, evaluate, report."""
    from distill.pipeline import run_job

    report = run_job(_job(job, overrides))
    if report is not None:
        console.print(f"[bold green]done.[/] report: {report}  (HTML: {report.with_suffix('.html')})")


@app.command()
def generate(job: JobArg, overrides: Overrides = None) -> None:
    """Only the teacher's answers (resumes an interrupted run)."""
    from distill.pipeline import generate as generate_stage
    from distill.pipeline import prepare

    with main_process_first():  # under a launcher the others find the answers done
        store = generate_stage(prepare(_job(job, overrides)))
    if is_main_process():
        console.print(f"[bold green]done.[/] {len(store.done_ids())} answers in {store.path}")


@app.command()
def train(job: JobArg, overrides: Overrides = None) -> None:
    """Generate if needed, then train the student."""
    from distill.pipeline import prepare_data
    from distill.pipeline import train as train_stage

    out = train_stage(*prepare_data(_job(job, overrides)))
    if is_main_process():
        console.print(f"[bold green]done.[/] student saved in {out}")


@app.command("cache-logits")
def cache_logits(job: JobArg, overrides: Overrides = None) -> None:
    """Generate if needed, then run the teacher once and cache its top-k log-probs for training."""
    from distill.pipeline import cache_logits as cache_stage
    from distill.pipeline import prepare_data

    run, parts = prepare_data(_job(job, overrides))
    with main_process_first():
        cache = cache_stage(run, parts)
    if is_main_process():
        console.print(f"[bold green]done.[/] logit cache in {cache.path} ({cache.bytes_per_token} bytes per token)")


@app.command("eval")
def eval_(
    teacher: Annotated[str, typer.Option(help="Teacher model reference.")],
    student: Annotated[str, typer.Option(help="Student model reference.")],
    data: Annotated[Path, typer.Option(help="Prompt file (`prompt` or `messages`; references used when present).")],
    baseline: Annotated[list[str] | None, typer.Option(help="Further models to compare (repeatable).")] = None,
    task: Annotated[str, typer.Option(help="Task preset.")] = "conversation",
    limit: Annotated[int | None, typer.Option(help="At most N prompts.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Answer length.")] = 64,
    out: Annotated[Path, typer.Option(help="Folder for metrics.json and the report.")] = Path("runs/eval"),
    min_retention: Annotated[float | None, typer.Option(help="Gate: least quality retention.")] = None,
    min_speedup: Annotated[float | None, typer.Option(help="Gate: least decode speed-up.")] = None,
) -> None:
    """Compare a student with its teacher (and baselines) on any prompt file, with a report."""
    from distill.evaluate.harness import evaluate_file

    report = evaluate_file(
        teacher=teacher,
        student=student,
        baselines=baseline or [],
        data=data,
        task=task,
        limit=limit,
        max_new_tokens=max_new_tokens,
        out_dir=out,
        min_retention=min_retention,
        min_speedup=min_speedup,
    )
    console.print(f"[bold green]done.[/] report: {report}")


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="A run folder holding metrics.json.")]) -> None:
    """Rebuild report.md and report.html from a run folder."""
    from distill.evaluate.report import write_report

    if not (run_dir / "metrics.json").is_file():
        raise DistillError(f"{run_dir}: no metrics.json; run `distill run` (or `distill eval`) first")
    md, html = write_report(run_dir)
    console.print(f"[bold green]done.[/] {md}, {html}")


@app.command()
def config() -> None:
    """List every job-file field with its default and meaning."""
    from distill.config import describe_fields

    table = Table("field", "default", "meaning", show_lines=False)
    for key, default, doc in describe_fields():
        table.add_row(key, default, doc)
    Console().print(table)


@models_app.command("list")
def models_list() -> None:
    """Built-in models and the conversion cache."""
    from distill.models import BUILTINS, cached_models, distill_home

    table = Table("model", "license", "how to get it", title="built-in models")
    for spec in BUILTINS.values():
        table.add_row(f"builtin:{spec.name}", spec.license, spec.install)
    out = Console()
    out.print(table)
    cache = Table("name", "folder", "size", title=f"cache ({distill_home() / 'models'})")
    for name, folder, size in cached_models():
        cache.add_row(name, str(folder), f"{size / 2**20:.0f} MiB")
    out.print(cache)


@data_app.command("inspect")
def data_inspect(path: Annotated[Path, typer.Argument(help="A dataset folder or JSONL file of teacher answers.")]):
    """Counts, length histogram, filter summary and a few samples of a dataset."""
    from distill.data.inspect import inspect_dataset, render_inspection

    Console().print(render_inspection(inspect_dataset(path)))


def main() -> None:
    """Console entry point."""
    _setup_logging(verbose=bool(os.environ.get("DISTILL_VERBOSE")))
    try:
        app(standalone_mode=False)
    except DistillError as e:
        console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted.[/] Run the same command again to resume where it stopped.")
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except Exception as e:  # click usage errors come through here in standalone_mode=False
        import click

        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(e.exit_code)
        raise


if __name__ == "__main__":
    main()
