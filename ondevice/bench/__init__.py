"""Benchmark harness: speed, memory and quality per device, across runtimes, stored and plotted.

- `backends/`: one adapter per runtime (ondevice, llama.cpp, transformers, null) with a registry;
- `worker`: one job per fresh process (`python -m ondevice.bench.worker`, JSON lines on stdout);
- `runner`: plans and runs (backend, artifact, setting) jobs, records each as it ends;
- `store`: SQLite results (versioned schema, WAL, transactional writes), JSON import/export;
- `fingerprint`: device facts and a stable device id;
- `report`: markdown/HTML/CSV/JSON tables and matplotlib charts;
- `quality`: perplexity, KL divergence and top-1 agreement from logits (pure numpy);
- `evaluate`: `ondevice eval`; `fit`: `ondevice fit` roofline estimates over device profiles.
"""
