"""Training and evaluation engine.

Training: augmentation and batching (`data`), the loop (`train*`). Evaluation: the `harness eval` grid (`grid`:
orchestration; `grid_config`, `grid_plan`: options, settings, images; `grid_data`: decode / corrupt / transform
workers; `grid_score`: post-processing and scoring processes; `grid_stats`, `grid_store`: exactly mergeable cell
statistics and their files; `grid_results`: the tables; `grid_merge`: shard merging; `grid_extras`:
thing-preference outputs), its single-cell form (`evaluate`), in-memory scoring (`scoring`), the results schema
(`results`), saved candidates (`candidates_io`) and torchrun helpers (`distributed`).

Importing this package is cheap; torch is imported by the submodules.
"""
