"""rcar_fast's benchmark suite (run it as ``python -m bench``; bench/README.md explains it).

  flops.py         counted FLOPs of a shard (SPEC.md's cost table)
  release_loop.py  the baseline: the public release's per-caption loop
  shapes.py        the Flickr30K- and MSCOCO-shaped shards and their seeded inputs
  harness.py       timing, peak memory, matmul rate, device and version stamps
  report.py        CSV history rows and the markdown table
  suite.py         cases, rows, the command line
  plot.py          optional PNG charts (matplotlib)
  device_suite.sh  the one-call run on the GPU machine
  resources.py     compile report of the Triton and CUDA kernels (registers, shared memory, SASS), no GPU needed
  cuda_resources.py  its CUDA half: nvcc -Xptxas -v and cuobjdump per csrc/cuda/*.cu and architecture
  cuda_plan.cpp    host program evaluating csrc/cuda/plan.h (the kernels' shared memory per launch)
  roofline.py      cost model: every launch's work and bytes, the H200 time it predicts
  train_memory.py  peak memory of one training step per backend (CPU allocator), fitted to 128 x 128
"""
