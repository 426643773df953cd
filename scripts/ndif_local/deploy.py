"""Deploy a local model folder on the local NDIF server (run with the server's own Python, `scripts/ndif-local`).

nnsight names a model by a key whose repo_id it canonicalises through the Hugging Face hub; a folder has no hub
entry, so the folder's absolute path is entered in nnsight's id cache first and the key's repo_id is the path itself.
safety-heads does the same on the client side (models.load_remote_model with a loopback host), so the keys match.
"""

import os
import sys

import nnsight.modeling.huggingface as huggingface
from ndif.cli import cli

folder = os.path.abspath(sys.argv[1])
huggingface._ID_CACHE[folder] = folder
size = sum(os.path.getsize(os.path.join(folder, name)) for name in os.listdir(folder))
# --task and --size-bytes: offline, ndif cannot ask the hub for either.
cli(["deploy", folder, "--task", "text-generation", "--dtype", sys.argv[2], "--size-bytes", str(size)])
