"""Optional lm-evaluation-harness tasks (`pip install "clakit[lm-eval]"`) run on the already-loaded model."""

from clakit.errors import ClakitError

INSTALL_HINT = 'pip install "clakit[lm-eval]"'


def parse_tasks(tasks: str | list[str] | None) -> list[str]:
    if not tasks:
        return []
    names = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    return [t.strip() for t in names if t.strip()]


def require_lm_eval() -> None:
    """Fail before any expensive work when lm_eval is missing."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ClakitError(f"--lm-eval-tasks needs lm-evaluation-harness (not installed): {INSTALL_HINT}") from None


def run_tasks(model, tokenizer, tasks: list[str], batch_size: int) -> dict:
    """lm-eval's HF wrapper around the in-memory model (CLA classes are registered by `import clakit`)."""
    require_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        results = simple_evaluate(model=lm, tasks=tasks)
    except Exception as e:  # unknown task names, datasets offline: user-facing
        raise ClakitError(f"lm-eval could not run {','.join(tasks)}: {str(e).strip().splitlines()[0][:300]}") from None
    return {
        task: {k: v for k, v in scores.items() if isinstance(v, int | float)}
        for task, scores in results["results"].items()
    }
