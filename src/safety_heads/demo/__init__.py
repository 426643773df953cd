"""The trained demo chat model shipped with the package, and the scripts that train and measure it.

`DEMO_MODEL_PATH` is the Hugging Face folder of the trained demo chat model (a small Llama that refuses harmful
requests; see README.md here for its model card). `train.py` rebuilds it and `measure.py` measures it; nothing is
trained or downloaded at run time. (The untrained built-in `tiny` model is safety_heads/tiny.py.)

    python -c "from safety_heads.demo import DEMO_MODEL_PATH; print(DEMO_MODEL_PATH)"
"""

from pathlib import Path

# The name `--model` is meant to accept for the trained demo chat model.
DEMO_MODEL_NAME = "demo"
DEMO_MODEL_PATH = Path(__file__).parent / "model"
