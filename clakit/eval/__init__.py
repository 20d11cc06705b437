"""The eval suite: perplexity (token, word, bits per byte), KV-cache bytes, speed and reports (the demo, which
orchestrates convert, uptrain and eval, is `clakit.demo`).

from clakit.eval import evaluate, write_json, report
r = evaluate("out/cla2", data=["heldout.txt"], seq_len=512, max_tokens=8192)
write_json(r, "cla2.json"); report(["orig.json", "cla2.json"], "report/")
"""

from clakit.eval.comparison import report
from clakit.eval.config import EvalConfig
from clakit.eval.records import read_report, write_json
from clakit.eval.suite import evaluate

__all__ = ["EvalConfig", "evaluate", "read_report", "report", "write_json"]
