"""The embedded default with tool-use demonstrations: `pretrain_tiny` over the `byte+tools`
tokenizer (the tool-call tokens at ids 261..264, so the model's vocabulary grows to 272), with the
`calc` task beside copy, add and mul. Half of the `calc` demonstrations call the calculator; the
other half multiply in the head. About 10 minutes on a 2-core CPU; `configs/cispo_tools.py` starts
from it:

    python -m experiments.pretrain --config configs/pretrain_tools.py --workdir runs/pretrain_tools
"""

import importlib.util
import os


def get_config():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrain_tiny.py")
    spec = importlib.util.spec_from_file_location("pretrain_tiny", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    c.model.vocab_size = 272
    c.data.tokenizer = "byte+tools"
    c.data.tasks = ("copy", "add", "mul", "calc")
    return c
