"""Engine.run alone on bench_engine's configurations (every single-head set of one prompt), to compare two versions
of the package: one version per process (PYTHONPATH chooses it), minimum wall and process CPU time over N runs after
a warm-up, one torch thread. Run the versions interleaved, several rounds, and compare minima:

    for round in 1 2 3; do for v in before after; do
        PYTHONPATH=/path/to/$v/src python benchmarks/engine_speed.py 15 4x8-h128 8x16-h1024; done; done
"""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(1)
from bench_engine import CONFIGS, build  # noqa: E402

import safety_heads  # noqa: E402
from safety_heads.engine import Engine  # noqa: E402
from safety_heads.models import wrap  # noqa: E402
from safety_heads.tiny import byte_tokenizer  # noqa: E402

for name in sys.argv[2:]:  # usage: engine_speed.py RUNS CONFIG...
    layers, heads_n, kv, hidden, inter, tokens, _ = CONFIGS[name]
    module = build(layers, heads_n, kv, hidden, inter)
    engine = Engine(wrap(module, byte_tokenizer(), name))
    torch.manual_seed(0)
    ids = torch.randint(0, 250, (1, tokens))
    heads = [[(l, h)] for l in range(layers) for h in range(heads_n)]
    engine.run([ids[0].tolist()], heads)  # warm-up
    walls, cpus = [], []
    for _ in range(int(sys.argv[1])):
        t, c = time.perf_counter(), time.process_time()
        engine.run([ids[0].tolist()], heads)
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    print(f"{safety_heads.__file__.split('/src/')[0]} {name}: wall min {min(walls) * 1e3:.1f} ms, "
          f"cpu min {min(cpus) * 1e3:.1f} ms over {len(walls)}")
