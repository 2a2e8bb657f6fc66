"""`selfplay world ...`: the world's own commands (mounted by flows/cli.py)."""

from __future__ import annotations

import json

import typer

from .check import world_check

app = typer.Typer(help="ShapeWorld: the embedded model's synthetic world and its exact oracle.",
                  no_args_is_help=True, add_completion=False)


@app.callback()
def _main() -> None:
    """Keeps `check` a subcommand even while it is the only one."""


@app.command()
def check(n: int = typer.Option(10000, "--n", help="prompts (each: one true and one perturbed render)"),
          seed: int = typer.Option(0, "--seed"),
          size: int = typer.Option(32, "--size", help="canvas size in pixels")) -> None:
    """Oracle accuracy on true renders, rejection of perturbed renders, parse round trip; JSON on the last line."""
    res = world_check(n, seed, size)
    typer.echo(f"world check: {n} prompts, seed {seed}, {size}x{size}, {res['distinct_prompts']:,} distinct prompts")
    for cat, r in res["per_category"].items():
        typer.echo(f"  {cat:<17} n={r['n']:<5} acc_gt={r['oracle_acc_gt']:.4f} "
                   f"reject={r['oracle_reject_perturbed']:.4f} prompts={r['distinct_prompts']:,}")
    typer.echo(f"  oracle_acc_gt={res['oracle_acc_gt']:.4f} "
               f"oracle_reject_perturbed={res['oracle_reject_perturbed']:.4f} "
               f"parse_roundtrip={res['parse_roundtrip']:.4f} ({res['verifications_per_s']} verifications/s)")
    typer.echo(f"  after noise + 1-px edge error: acc={res['oracle_acc_noisy']:.4f} "
               f"reject={res['oracle_reject_noisy']:.4f}")
    typer.echo(json.dumps(res, sort_keys=True))


if __name__ == "__main__":
    app()
