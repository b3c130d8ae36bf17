"""`ktc run ARTIFACT`: generate from a text prompt (streamed) or from token ids."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

from ktc.cli.app import app, err, out
from ktc.errors import InputError, KtcError


def parse_tokens(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise InputError(f"--tokens {text!r} is not a comma-separated list of integers, e.g. --tokens 1,2,3") from None
    if not ids:
        raise InputError("--tokens is empty: give at least one token id, e.g. --tokens 1,2,3")
    return ids


@app.command("run")
def run_cmd(
    artifact: Path = typer.Argument(..., help="A compiled artifact (ktc compile ... -o ARTIFACT)"),
    prompt: str = typer.Option(None, help="Text prompt (needs a tokenizer in the artifact)"),
    tokens: str = typer.Option(None, help="Prompt as token ids, e.g. 1,2,3"),
    max_new_tokens: int = typer.Option(16, help="How many tokens to generate"),
    temperature: float = typer.Option(0.0, help="0 = greedy"),
    top_k: int = typer.Option(0, help="Sample among the k most likely tokens (0 = all)"),
    top_p: float = typer.Option(1.0, help="Nucleus sampling threshold"),
    seed: int = typer.Option(None, help="Random seed for sampling"),
    verify: str = typer.Option("full", help="Artifact check before running: full (sha256) or sizes"),
) -> None:
    """Run a compiled model: prefill the prompt, then decode token by token."""
    import torch

    import ktc

    if (prompt is None) == (tokens is None):
        raise InputError("give exactly one of --prompt TEXT or --tokens 1,2,3")
    if max_new_tokens < 1:
        raise InputError("--max-new-tokens must be at least 1")
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeElapsedColumn(),
                  console=err, transient=True) as bar:
        task = bar.add_task("checking", total=None)

        def loading(stage: str, rel: str, done: int, total: int) -> None:
            bar.update(task, description=f"{'checking' if stage == 'verify' else 'loading'} {rel}",
                       completed=done, total=total)

        model = ktc.load(str(artifact), verify=verify, progress=loading)
    tok = model.tokenizer
    if prompt is not None:
        if tok is None:
            raise KtcError(f"{artifact} has no tokenizer (the model folder had no tokenizer.json): use --tokens 1,2,3")
        ids = tok.encode(prompt).ids
        if not ids:
            raise InputError("the prompt encodes to no tokens: give some text")
    else:
        ids = parse_tokens(tokens)
    input_ids = torch.tensor([ids], dtype=torch.long)
    start = time.perf_counter()
    first: list[float] = []
    new_ids: list[int] = []
    shown = ""

    def stream(step_ids: torch.Tensor) -> None:
        nonlocal shown
        if not first:
            first.append(time.perf_counter() - start)
        new_ids.append(int(step_ids.reshape(-1)[0]))
        if prompt is not None:
            text = tok.decode(new_ids)
            if text.endswith("\ufffd"):   # a multi-byte character split across tokens: wait for the rest
                return
            sys.stdout.write(text[len(shown):])
            shown = text
        else:
            sys.stdout.write(("," if len(new_ids) > 1 else "") + str(new_ids[-1]))
        sys.stdout.flush()

    if prompt is not None:
        sys.stdout.write(prompt)
    model.generate(input_ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                   seed=seed, stream=stream)
    total = time.perf_counter() - start
    if prompt is not None:
        sys.stdout.write(tok.decode(new_ids)[len(shown):])
    sys.stdout.write("\n")
    n = len(new_ids)
    decode = (total - first[0]) / max(n - 1, 1) if first else 0.0
    err.print(f"[dim]{len(ids)} prompt tokens, {n} new; prefill+first token {first[0] * 1e3 if first else 0:.0f} ms, "
              f"decode {1 / decode if decode else 0:.1f} tok/s[/]")
    out.file.flush()
